"""Keypoint layouts: the 133-point COCO-WholeBody array and the split the official drawing uses.

Every pose source (ViTPose in the official backend, the mediapipe models in the embedded one)
produces per frame a float32 [133, 3] array of (x, y, score) in image pixels:

    0 nose, 1/2 left/right eye, 3/4 left/right ear, 5/6 shoulders, 7/8 elbows, 9/10 wrists,
    11/12 hips, 13/14 knees, 15/16 ankles, 17-19 left big toe / small toe / heel,
    20-22 right big toe / small toe / heel, 23-90 the 68 face points, 91-111 left hand,
    112-132 right hand ("left" = the person's left).

`normalise_sequence` turns a sequence of those into `PoseMeta`s (normalised coordinates, the
20-row OpenPose-style body, 21 + 21 hand rows and 69 "face" rows), and `PoseMeta.to_pixels`
gives the `PixelPose` that drawing and face boxes consume. The float32/float64 steps match the
official code exactly (reference/preprocess/README.md §1) because drawing truncates the float64
pixel coordinates with int(): one ulp can move a stick by a pixel.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable

import numpy as np

N_WHOLEBODY = 133

# Body row r = mean of COCO points (a_r, b_r); names follow OpenPose.
BODY_NAMES = ("Nose", "Neck", "RShoulder", "RElbow", "RWrist", "LShoulder", "LElbow", "LWrist",
              "RHip", "RKnee", "RAnkle", "LHip", "LKnee", "LAnkle", "REye", "LEye", "REar",
              "LEar", "LToe", "RToe")
BODY_SRC_A = np.array([0, 6, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3, 17, 20])
BODY_SRC_B = np.array([0, 5, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3, 18, 21])
LHAND = slice(91, 112)
RHAND = slice(112, 133)
# The official "face" block starts one row early: its row 0 is the right heel (COCO 22); the
# face box drops that row again. Kept so that stored metas line up with the official ones.
FACE = slice(22, 91)
FACE68 = slice(23, 91)


@dataclass
class PoseMeta:
    """One frame's pose, normalised by the frame size (x / width, y / height), float32."""
    width: int
    height: int
    body: np.ndarray        # [20, 3] x, y, score
    lhand: np.ndarray       # [21, 3]
    rhand: np.ndarray       # [21, 3]
    face: np.ndarray        # [69, 3]; row 0 is the right heel, rows 1..68 the face

    def to_pixels(self) -> "PixelPose":
        # float32 normalised values times the integer size, in float64: the official round trip
        # (x is float64(float32(x / W)) * W, not x).
        wh = np.array([self.width, self.height], dtype=np.float64)
        def px(a: np.ndarray) -> np.ndarray:
            return a[:, :2].astype(np.float64) * wh
        return PixelPose(self.width, self.height,
                         px(self.body), self.body[:, 2].copy(),
                         px(self.lhand), self.lhand[:, 2].copy(),
                         px(self.rhand), self.rhand[:, 2].copy(),
                         px(self.face), self.face[:, 2].copy())

    def copy(self) -> "PoseMeta":
        return replace(self, body=self.body.copy(), lhand=self.lhand.copy(),
                       rhand=self.rhand.copy(), face=self.face.copy())


@dataclass
class PixelPose:
    """A pose in canvas pixels (float64), ready to draw. Scores keep their source dtype.

    Hand points that do not exist (retargeting drops low-confidence ones) are NaN with score 0.
    """
    width: int
    height: int
    body: np.ndarray        # [20, 2]
    body_p: np.ndarray      # [20]
    lhand: np.ndarray       # [21, 2]
    lhand_p: np.ndarray     # [21]
    rhand: np.ndarray       # [21, 2]
    rhand_p: np.ndarray     # [21]
    face: np.ndarray | None = None      # [69, 2]
    face_p: np.ndarray | None = None


def split_wholebody(kp: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """[133, 3] -> body [20, 3], left hand [21, 3], right hand [21, 3], face [69, 3].

    Body rows average two COCO points (x, y and score alike) in the input dtype."""
    body = (kp[BODY_SRC_A] + kp[BODY_SRC_B]) / 2
    return body, kp[LHAND].copy(), kp[RHAND].copy(), kp[FACE].copy()


def body_is_off_image(body: np.ndarray) -> bool:
    """True when every body row has a negative x or y (the official reuse rule)."""
    return bool(body[:, :2].min(axis=1).max() < 0)


def normalise_frame(kp: np.ndarray, width: int, height: int,
                    previous_body: np.ndarray | None = None) -> PoseMeta:
    """One frame of [133, 3] pixel keypoints -> PoseMeta.

    When the whole body is off the image (every row has a negative coordinate) the previous
    frame's body is reused, as the official code does. On the first frame there is none: the
    official code crashes there (UnboundLocalError); we keep the frame's own body, whose points
    all lie off the canvas."""
    if kp.shape != (N_WHOLEBODY, 3):
        raise ValueError(f"expected [133, 3] keypoints, got {kp.shape}")
    kps = np.array(kp, dtype=np.float32, copy=True)
    # In place on float32 with a Python int: the division happens in float32, as officially.
    kps[:, 0] /= width
    kps[:, 1] /= height
    body, lhand, rhand, face = split_wholebody(kps)
    if previous_body is not None and body_is_off_image(body):
        body = previous_body
    return PoseMeta(int(width), int(height), body, lhand, rhand, face)


def normalise_sequence(kp_seq: Iterable[np.ndarray], width: int, height: int) -> list[PoseMeta]:
    """[T, 133, 3] pixel keypoints of frames of one size -> T PoseMetas (reuse rule applied)."""
    metas: list[PoseMeta] = []
    prev = None
    for kp in kp_seq:
        meta = normalise_frame(kp, width, height, prev)
        prev = meta.body
        metas.append(meta)
    return metas


class BodyTracker:
    """Streaming form of `normalise_sequence`: feed frames one at a time."""

    def __init__(self) -> None:
        self._prev: np.ndarray | None = None

    def __call__(self, kp: np.ndarray, width: int, height: int) -> PoseMeta:
        meta = normalise_frame(kp, width, height, self._prev)
        self._prev = meta.body
        return meta
