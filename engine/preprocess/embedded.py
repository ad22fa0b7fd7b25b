"""The embedded pose backend: the models shipped inside the mediapipe 0.10.21 wheel, so that
`wanimate preprocess` works on a fresh machine with no checkpoint.

One MediaPipe Holistic graph per stream (BlazePose-full body, FaceMesh, the two hand-landmark
models and the pose segmentation head, all .tflite files inside the wheel) gives per frame 33
body, 468 face and 2 x 21 hand landmarks and a person mask. They are mapped onto the 133-point
COCO-WholeBody layout that the official ViTPose produces, so everything downstream (drawing,
face boxes, retargeting, masks) is shared with the official backend:

- body 0-16: the matching BlazePose points; score = BlazePose visibility;
- feet 17-22: big and small toe both = BlazePose foot index, heel = heel;
- face 23-90: 68 FaceMesh vertices in iBUG-68 order (jaw, brows, nose, eyes, mouth), score 1;
- hands 91-132: the 21 hand landmarks (same order as COCO-WholeBody), score 0.9 inside the
  frame, 0.3 outside (so off-frame joints are not drawn);
- missing parts: score 0 and coordinates 0 (face, hands) or -1 (a frame with no person: every
  body row negative, so the official rule reuses the previous frame's body).

Differences from the official backend, by construction: it is a different network (poses are
close, not identical); MediaPipe follows the most salient person it finds (not necessarily the
largest box) and tracks it from frame to frame; frames go through the graph one at a time (the
graph is stateful). The number of people is counted with the full-range face detector every
`count_every` frames, for the several-people warning.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from ..errors import CheckpointError
from .official import FramePose

# COCO-WholeBody index -> BlazePose index for the body and feet.
_BODY = {0: 0, 1: 2, 2: 5, 3: 7, 4: 8, 5: 11, 6: 12, 7: 13, 8: 14, 9: 15, 10: 16, 11: 23, 12: 24,
         13: 25, 14: 26, 15: 27, 16: 28, 17: 31, 18: 31, 19: 29, 20: 32, 21: 32, 22: 30}
# FaceMesh vertex for each iBUG-68 point (subject's right side first, as iBUG).
FACE68 = (162, 234, 93, 58, 172, 136, 149, 148, 152, 377, 378, 365, 397, 288, 323, 454, 389,
          71, 63, 105, 66, 107, 336, 296, 334, 293, 301,
          168, 197, 5, 4, 75, 97, 2, 326, 305,
          33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,
          61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181, 78, 82, 13, 312, 308, 317, 14, 87)
HAND_IN_FRAME, HAND_OFF_FRAME = 0.9, 0.3
MAX_SIDE = 1280               # frames are downscaled to this long side before the graph


def _solutions():
    try:
        from mediapipe.python.solutions import face_detection, holistic
    except Exception as e:     # ImportError, or a protobuf/numpy mismatch inside mediapipe
        raise CheckpointError(
            "the embedded preprocessing backend needs mediapipe 0.10.21 (the last release that "
            "ships its .tflite models): pip install --no-deps mediapipe==0.10.21 absl-py attrs "
            f"matplotlib 'protobuf>=6.31,<7'  ({type(e).__name__}: {e}); or pass --ckpt-dir with "
            "the official process_checkpoint for --backend official") from None
    return holistic, face_detection


def available() -> bool:
    try:
        _solutions()
        return True
    except CheckpointError:
        return False


def to_wholebody(result, width: int, height: int) -> tuple[np.ndarray, bool]:
    """Holistic result -> ([133, 3] float32 pixel keypoints, person found)."""
    kp = np.zeros((133, 3), np.float32)
    if result.pose_landmarks is None:
        kp[:23, :2] = -1
        return kp, False
    lm = result.pose_landmarks.landmark
    for coco, bp in _BODY.items():
        p = lm[bp]
        kp[coco] = (p.x * width, p.y * height, p.visibility)
    if result.face_landmarks is not None:
        fl = result.face_landmarks.landmark
        for i, v in enumerate(FACE68):
            kp[23 + i] = (fl[v].x * width, fl[v].y * height, 1.0)
    for start, hand in ((91, result.left_hand_landmarks), (112, result.right_hand_landmarks)):
        if hand is None:
            continue
        for i, p in enumerate(hand.landmark):
            inside = 0.0 <= p.x <= 1.0 and 0.0 <= p.y <= 1.0
            kp[start + i] = (p.x * width, p.y * height, HAND_IN_FRAME if inside else HAND_OFF_FRAME)
    return kp, True


def _small(frame: np.ndarray, max_side: int) -> np.ndarray:
    h, w = frame.shape[:2]
    s = max_side / max(h, w)
    if s >= 1:
        return np.ascontiguousarray(frame)
    return cv2.resize(frame, (max(int(round(w * s)), 1), max(int(round(h * s)), 1)),
                      interpolation=cv2.INTER_AREA)


def count_faces(detections, min_area_ratio: float = 0.1) -> int:
    """People in a frame, from face detections: faces over 10 % of the largest face's area."""
    if not detections:
        return 0
    areas = [d.location_data.relative_bounding_box.width * d.location_data.relative_bounding_box.height
             for d in detections]
    big = max(areas)
    return sum(a >= big * min_area_ratio for a in areas)


class EmbeddedBackend:
    """MediaPipe Holistic (+ face detector for counting people), one stream at a time."""
    name = "embedded"

    def __init__(self, *, segment: bool = False, max_side: int = MAX_SIDE, count_every: int = 10,
                 min_confidence: float = 0.5) -> None:
        holistic, face_detection = _solutions()
        self._holistic_mod = holistic
        self.segments = segment
        self.max_side = max_side
        self.count_every = max(int(count_every), 1)
        self.min_confidence = min_confidence
        self._video = holistic.Holistic(static_image_mode=False, model_complexity=1,
                                        enable_segmentation=segment, refine_face_landmarks=False,
                                        min_detection_confidence=min_confidence,
                                        min_tracking_confidence=0.5)
        self._faces = face_detection.FaceDetection(model_selection=1, min_detection_confidence=0.5)
        self._seen = 0
        self._people = 0

    @property
    def providers(self) -> list[str]:
        return ["mediapipe-0.10.21-cpu"]

    def _one(self, graph, frame: np.ndarray, count: bool) -> FramePose:
        h, w = frame.shape[:2]
        small = _small(frame, self.max_side)
        res = graph.process(small)
        kp, person = to_wholebody(res, w, h)
        if count:
            self._people = count_faces(self._faces.process(small).detections)
        n = max(self._people, 1) if person else self._people
        mask = None
        if self.segments:
            if person and res.segmentation_mask is not None:
                m = res.segmentation_mask
                if m.shape[:2] != (h, w):
                    m = cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR)
                mask = (m > 0.5).astype(np.uint8)
            else:
                mask = np.zeros((h, w), np.uint8)
        return FramePose(kp, person, n, None, mask)

    def __call__(self, frames: Sequence[np.ndarray]) -> list[FramePose]:
        out = []
        for f in frames:
            out.append(self._one(self._video, f, self._seen % self.count_every == 0))
            self._seen += 1
        return out

    def image(self, img: np.ndarray) -> FramePose:
        """A still image (the reference), with its own graph in static mode."""
        with self._holistic_mod.Holistic(static_image_mode=True, model_complexity=1,
                                         enable_segmentation=False,
                                         min_detection_confidence=self.min_confidence) as g:
            seg, self.segments = self.segments, False
            try:
                return self._one(g, img, True)
            finally:
                self.segments = seg

    def close(self) -> None:
        self._video.close()
        self._faces.close()
