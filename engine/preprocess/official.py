"""The official pose backend: YOLOv10m person detection + ViTPose-H whole-body through ONNX Runtime.

Uses the checkpoint's `process_checkpoint/det/yolov10m.onnx` and
`process_checkpoint/pose2d/vitpose_h_wholebody.onnx`. Pre- and post-processing reproduce the
official `pose2d.py` (reference/preprocess/README.md §3-5), including its quirks:
- the detector sees the frame stretched to 640x640 (no letterbox), RGB, /255;
- detections: score >= 0.05, boxes scaled back in float32 and truncated to int, class-agnostic
  NMS (IoU 0.5) that drops a score of exactly float32(0.05); the person with the largest area
  wins unless its longest side is under 0.4x the longest side seen so far;
- ViTPose sees a BGR crop normalised with RGB ImageNet statistics (the official code swaps
  channels twice on the detector path and once on this one);
- heatmaps are decoded with DARK (Gaussian modulation + a second-order Taylor step), the Taylor
  arithmetic in float64 and the back-projection in float32 as NumPy 1.x did it.

Unlike the official code, frames go through the networks in batches (when the ONNX graph has a
dynamic batch axis), and the execution providers are chosen by `pick_providers`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from ..errors import CheckpointError

DET_SIZE = 640
DET_SCORE = 0.05
DET_IOU = 0.5
MULTI_PERSON_AREA = 0.1          # another person counts when its box is > 10 % of the chosen one
SHAPE_RATIO = 0.4
POSE_INPUT_HW = (256, 192)
POSE_RESCALE = 1.25
HEATMAP_HW = (64, 48)
DARK_KERNEL = 11
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])

DET_RELPATH = Path("process_checkpoint/det/yolov10m.onnx")
POSE_RELPATH = Path("process_checkpoint/pose2d/vitpose_h_wholebody.onnx")


# ------------------------------------------------------------------------------------ detector

def detector_input(frame: np.ndarray) -> np.ndarray:
    """RGB uint8 frame -> [3, 640, 640] float32 in [0, 1] (a stretch, not a letterbox)."""
    resized = cv2.resize(frame, (DET_SIZE, DET_SIZE))
    return (resized / 255.0).transpose(2, 0, 1).astype(np.float32)


def _rect_overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """OpenCV's rectOverlap (1 - Jaccard distance) of two integer x, y, w, h rectangles."""
    area_a, area_b = a[2] * a[3], b[2] * b[3]
    if area_a + area_b <= 0:
        return 1.0
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    inter = float((x2 - x1) * (y2 - y1)) if (x2 > x1 and y2 > y1 and a[2] > 0 and a[3] > 0
                                              and b[2] > 0 and b[3] > 0) else 0.0
    return 1.0 - (1.0 - inter / (area_a + area_b - inter))


def nms(boxes_xywh: np.ndarray, scores: np.ndarray, score_thr: float = DET_SCORE,
        iou_thr: float = DET_IOU) -> list[int]:
    """cv2.dnn.NMSBoxes: keep scores > score_thr (float32), visit by descending score (stable),
    keep a box when its overlap with every kept box is <= iou_thr. Class-agnostic."""
    s = np.asarray(scores, dtype=np.float32)
    cand = [i for i in range(len(s)) if s[i] > np.float32(score_thr)]
    cand.sort(key=lambda i: -float(s[i]))          # Python's sort is stable, like std::stable_sort
    kept: list[int] = []
    boxes = [tuple(int(v) for v in b) for b in boxes_xywh]
    for i in cand:
        if all(_rect_overlap(boxes[i], boxes[k]) <= iou_thr for k in kept):
            kept.append(i)
    return kept


def detections(raw: np.ndarray, frame_h: int, frame_w: int) -> np.ndarray:
    """YOLOv10 output rows [N, 6] (x1, y1, x2, y2, score, class; 640-pixel units) ->
    NMS survivors [K, 6] float64 in frame pixels, in NMS order."""
    out = np.asarray(raw, dtype=np.float32).reshape(-1, 6)
    keep = out[:, 4] >= np.float32(DET_SCORE)
    rows = out[keep]
    boxes = rows[:, :4].copy()
    # NumPy 1.x arithmetic: a float32 array times a float64 scalar stays float32.
    boxes[:, [0, 2]] *= np.float32(frame_w / DET_SIZE)
    boxes[:, [1, 3]] *= np.float32(frame_h / DET_SIZE)
    boxes[:, 2] = boxes[:, 2] - boxes[:, 0]
    boxes[:, 3] = boxes[:, 3] - boxes[:, 1]
    boxes = boxes.astype(np.int32)
    order = nms(boxes, rows[:, 4])
    res = [[int(boxes[i, 0]), int(boxes[i, 1]), int(boxes[i, 0]) + int(boxes[i, 2]),
            int(boxes[i, 1]) + int(boxes[i, 3]), float(rows[i, 4]), float(rows[i, 5])] for i in order]
    return np.array(res, dtype=np.float64).reshape(-1, 6)


def choose_person(dets: np.ndarray, frame_h: int, frame_w: int) -> tuple[np.ndarray, int]:
    """(bbox [x1, y1, x2, y2, score] float64, number of people) from NMS survivors.

    The largest-area person wins, except that a box whose longest side is under 0.4x the
    longest side of the current best (initially: of any person) is skipped. With nobody, the
    whole frame with score -1 is returned and the count is 0. Other people are counted when
    their area is between 10 % and 100 % of the chosen one (the official multi-person count)."""
    whole = np.array([0.0, 0.0, 1.0 * frame_w, 1.0 * frame_h, -1.0])
    persons = [d for d in dets if d[5] + 1 == 1 and d[4] > DET_SCORE]
    if not persons:
        return whole, 0
    def side(d):
        return max(d[2] - d[0], d[3] - d[1])
    best_area, best_side, best = frame_h * frame_w * -10, max(side(d) for d in persons), None
    for d in persons:
        area = (d[2] - d[0]) * (d[3] - d[1])
        if area > best_area:
            if side(d) < best_side * SHAPE_RATIO:
                continue
            best_area, best_side, best = area, side(d), d
    if best is None:
        return whole, 0
    count = 1
    for d in persons:
        area = (d[2] - d[0]) * (d[3] - d[1])
        if d is not best and best_area * MULTI_PERSON_AREA < area < best_area:
            count += 1
    return np.array(best[:5], dtype=np.float64), count


# ------------------------------------------------------------------------------------ ViTPose

def box_center_scale(bbox: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre and scale (in units of 200 px, with the 1.25 margin) of the 3:4 crop around a box."""
    aspect = POSE_INPUT_HW[0] / float(POSE_INPUT_HW[1])
    center = np.array([(bbox[0] + bbox[2]) / 2.0, (bbox[1] + bbox[3]) / 2.0])
    size = max((bbox[2] - bbox[0]) * aspect, bbox[3] - bbox[1])
    scale = np.array([size / aspect, size]) / 200.0
    scale *= POSE_RESCALE
    return center, scale


def _crop_corners(center: np.ndarray, s: float) -> tuple[np.ndarray, np.ndarray]:
    """Upper-left and bottom-right source pixels of the crop: the inverse of the crop affine
    applied to the output corners, rounded half to even (the official arithmetic)."""
    rows, cols = POSE_INPUT_HW
    h = 200 * s
    w = h / (rows / float(cols))
    t = np.zeros((3, 3))
    t[0, 0] = float(cols) / w
    t[1, 1] = float(rows) / h
    t[0, 2] = cols * (-float(center[0]) / w + .5)
    t[1, 2] = rows * (-float(center[1]) / h + .5)
    t[2, 2] = 1
    inv = np.linalg.inv(t)
    def corner(x, y):
        p = np.dot(inv, np.array([x, y, 1.0]).T)
        return np.array([round(p[0]), round(p[1])], dtype=int)
    return corner(0, 0), corner(cols, rows)


def pose_input(frame_rgb: np.ndarray, bbox: np.ndarray | None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input [3, 256, 192] float32, center [2], scale [2]) for ViTPose from an RGB frame.

    A missing box, a non-positive score or a side under 10 px means the whole frame."""
    img = frame_rgb[..., ::-1]        # the network sees BGR (official double-swap quirk)
    H, W = img.shape[:2]
    if bbox is None or bbox[-1] <= 0 or (bbox[2] - bbox[0]) < 10 or (bbox[3] - bbox[1]) < 10:
        bbox = np.array([0, 0, W, H])
    center, scale = box_center_scale(bbox)
    ul, br = _crop_corners(center, max(scale))
    crop = np.zeros((br[1] - ul[1], br[0] - ul[0], 3), dtype=np.float32)
    new_x = max(0, -ul[0]), min(br[0], W) - ul[0]
    new_y = max(0, -ul[1]), min(br[1], H) - ul[1]
    old_x = max(0, ul[0]), min(W, br[0])
    old_y = max(0, ul[1]), min(H, br[1])
    try:
        crop[new_y[0]:new_y[1], new_x[0]:new_x[1]] = img[old_y[0]:old_y[1], old_x[0]:old_x[1]]
    except ValueError:
        pass    # a crop entirely off the frame stays black, as officially
    crop = cv2.resize(crop, (POSE_INPUT_HW[1], POSE_INPUT_HW[0]))
    norm = (crop / 255. - IMAGENET_MEAN) / IMAGENET_STD
    return norm.transpose(2, 0, 1).astype(np.float32), center, scale


def _modulate(heatmaps: np.ndarray) -> np.ndarray:
    """DARK modulation of [K, h, w] float32 maps: Gaussian blur (11x11, sigma 2) with a zero
    border, rescaled to the original maximum, then log."""
    k, h, w = heatmaps.shape
    b = (DARK_KERNEL - 1) // 2
    out = np.empty_like(heatmaps)
    for j in range(k):
        m = heatmaps[j]
        peak = np.max(m)
        padded = np.zeros((h + 2 * b, w + 2 * b), dtype=np.float32)
        padded[b:-b, b:-b] = m
        blurred = cv2.GaussianBlur(padded, (DARK_KERNEL, DARK_KERNEL), 0)[b:-b, b:-b]
        with np.errstate(invalid="ignore", divide="ignore"):
            out[j] = blurred * (peak / np.max(blurred))
    return np.log(np.maximum(out, np.float32(1e-10)))


def decode_heatmaps(heatmaps: np.ndarray, center: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """[N, K, 64, 48] heatmaps + crop centre/scale -> [N, K, 3] float32 (x, y, score) in pixels.

    `scale` is the crop scale from `box_center_scale` (units of 200 px)."""
    n, k, h, w = heatmaps.shape
    flat = heatmaps.reshape(n, k, -1)
    idx = np.argmax(flat, axis=2)
    maxvals = np.max(flat, axis=2).astype(np.float32)
    preds = np.stack([idx % w, idx // w], axis=2).astype(np.float32)
    preds = np.where((maxvals > 0.0)[..., None], preds, np.float32(-1))
    for i in range(n):
        logmap = _modulate(heatmaps[i].copy())
        for j in range(k):
            preds[i, j] = _taylor(logmap[j], preds[i, j])
    out = np.empty((n, k, 3), dtype=np.float32)
    for i in range(n):
        size = scale[i] * 200
        # NumPy 1.x: float32 array op float64 scalar -> the scalar is rounded to float32 first.
        sx = np.float32(size[0] / w)
        sy = np.float32(size[1] / h)
        out[i, :, 0] = preds[i, :, 0] * sx + np.float32(center[i][0]) - np.float32(size[0] * 0.5)
        out[i, :, 1] = preds[i, :, 1] * sy + np.float32(center[i][1]) - np.float32(size[1] * 0.5)
    out[..., 2] = maxvals
    return out


def _taylor(hm: np.ndarray, coord: np.ndarray) -> np.ndarray:
    """One second-order Taylor step at the integer peak (interior peaks only).

    Differences of the float32 log map are float32; everything multiplied by a Python number is
    float64 (NumPy 1.x scalar promotion), and the result is added back in float64."""
    h, w = hm.shape
    px, py = int(coord[0]), int(coord[1])
    if not (1 < px < w - 2 and 1 < py < h - 2):
        return coord
    f = np.float64
    dx = 0.5 * f(hm[py, px + 1] - hm[py, px - 1])
    dy = 0.5 * f(hm[py + 1, px] - hm[py - 1, px])
    dxx = 0.25 * (f(hm[py, px + 2]) - 2 * f(hm[py, px]) + f(hm[py, px - 2]))
    dxy = 0.25 * f(hm[py + 1, px + 1] - hm[py - 1, px + 1] - hm[py + 1, px - 1] + hm[py - 1, px - 1])
    dyy = 0.25 * (f(hm[py + 2, px]) - 2 * f(hm[py, px]) + f(hm[py - 2, px]))
    if dxx * dyy - dxy ** 2 == 0:
        return coord
    hessian = np.array([[dxx, dxy], [dxy, dyy]])
    offset = -np.linalg.inv(hessian) @ np.array([[dx], [dy]])
    return (coord.astype(np.float64) + offset[:, 0]).astype(np.float32)


# ------------------------------------------------------------------------------ ONNX sessions

def pick_providers(model_path: Path, engine_dir: Path | None = None) -> list:
    """Execution providers for one ONNX model, best first.

    TensorRT when ONNX Runtime has its provider and `engine_dir/<model stem>/` exists (the
    engine cache that `wanimate export` will write; until then this branch is never taken),
    then CUDA when available, then CPU. This is the single place that decides; pass the
    result to `open_session`."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    providers: list = []
    if engine_dir is not None and "TensorrtExecutionProvider" in available:
        cache = Path(engine_dir) / Path(model_path).stem
        if cache.is_dir():
            providers.append(("TensorrtExecutionProvider",
                              {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache)}))
    if "CUDAExecutionProvider" in available:
        providers.append("CUDAExecutionProvider")
    providers.append("CPUExecutionProvider")
    return providers


def open_session(model_path: Path, providers: list | None = None):
    import onnxruntime as ort

    model_path = Path(model_path)
    if not model_path.is_file():
        raise CheckpointError(f"{model_path} not found: the official preprocessing backend needs "
                              "the checkpoint's process_checkpoint/ folder (det/yolov10m.onnx, "
                              "pose2d/vitpose_h_wholebody.onnx); or use --backend embedded")
    try:
        return ort.InferenceSession(str(model_path), providers=providers or pick_providers(model_path))
    except Exception as e:    # onnxruntime raises its own exception types
        raise CheckpointError(f"{model_path}: ONNX Runtime cannot load it ({e}); "
                              "re-download the file") from None


def _run_batched(session, batch: np.ndarray, max_batch: int) -> np.ndarray:
    """Run a single-input graph on [N, ...], in chunks; one item at a time if its batch is fixed."""
    inp = session.get_inputs()[0]
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) else None
    step = fixed if fixed else max_batch
    outs = []
    for s in range(0, len(batch), step):
        chunk = batch[s:s + step]
        if fixed and len(chunk) != fixed:
            raise CheckpointError(f"{inp.name} takes a fixed batch of {fixed}")
        outs.append(session.run(None, {inp.name: chunk})[0])
    return np.concatenate(outs, axis=0)


@dataclass
class FramePose:
    """What a backend found in one frame."""
    keypoints: np.ndarray           # [133, 3] float32, pixels (x, y, score)
    person: bool                    # a person was detected (else keypoints are a guess or zeros)
    n_people: int                   # people seen (official multi-person count)
    bbox: np.ndarray | None = None  # [x1, y1, x2, y2, score] of the chosen person
    mask: np.ndarray | None = None  # [H, W] uint8 0/1 person mask, when the backend segments


class OfficialBackend:
    """YOLOv10m + ViTPose-H through ONNX Runtime, batched."""
    name = "official"
    segments = False

    def __init__(self, ckpt_dir: Path, *, batch_size: int = 8, engine_dir: Path | None = None,
                 det_path: Path | None = None, pose_path: Path | None = None) -> None:
        ckpt_dir = Path(ckpt_dir)
        det_path = Path(det_path) if det_path else self._find(ckpt_dir, DET_RELPATH)
        pose_path = Path(pose_path) if pose_path else self._find(ckpt_dir, POSE_RELPATH)
        self.det = open_session(det_path, pick_providers(det_path, engine_dir))
        self.pose = open_session(pose_path, pick_providers(pose_path, engine_dir))
        self.batch_size = batch_size
        self._check_signatures()

    @staticmethod
    def _find(ckpt_dir: Path, rel: Path) -> Path:
        for cand in (ckpt_dir / rel, ckpt_dir / rel.relative_to("process_checkpoint")):
            if cand.is_file():
                return cand
        return ckpt_dir / rel

    def _check_signatures(self) -> None:
        d, p = self.det.get_inputs()[0], self.pose.get_inputs()[0]
        if list(d.shape[1:]) != [3, DET_SIZE, DET_SIZE]:
            raise CheckpointError(f"detector input is {d.shape}, expected [B, 3, 640, 640]")
        if list(p.shape[1:]) != [3, *POSE_INPUT_HW]:
            raise CheckpointError(f"pose input is {p.shape}, expected [B, 3, 256, 192]")

    @property
    def providers(self) -> list[str]:
        return list(self.pose.get_providers())

    def image(self, img: np.ndarray) -> FramePose:
        """A still image (the reference)."""
        return self([img])[0]

    def close(self) -> None:
        pass

    def __call__(self, frames: Sequence[np.ndarray]) -> list[FramePose]:
        """Detect and estimate the pose of the chosen person in each RGB frame."""
        return estimate_poses(frames, lambda x: _run_batched(self.det, x, self.batch_size),
                              lambda x: _run_batched(self.pose, x, self.batch_size))


def estimate_poses(frames: Sequence[np.ndarray], run_detector, run_pose) -> list[FramePose]:
    """The official Pose2d steps on a batch of RGB frames, with the two networks passed in:
    run_detector([B, 3, 640, 640]) -> [B, 300, 6], run_pose([B, 3, 256, 192]) -> [B, 133, 64, 48]."""
    if len(frames) == 0:
        return []
    raw = np.asarray(run_detector(np.stack([detector_input(f) for f in frames])))
    if raw.ndim != 3 or raw.shape[0] != len(frames) or raw.shape[-1] != 6:
        raise CheckpointError(f"detector output is {raw.shape}; expected [B, N, 6] "
                              "(YOLOv10 rows x1, y1, x2, y2, score, class)")
    chosen = []
    for f, r in zip(frames, raw):
        h, w = f.shape[:2]
        chosen.append(choose_person(detections(r, h, w), h, w))
    inputs, centers, scales = zip(*(pose_input(f, b) for f, (b, _) in zip(frames, chosen)))
    heat = np.asarray(run_pose(np.stack(inputs)))
    if heat.shape != (len(frames), 133, *HEATMAP_HW):
        raise CheckpointError(f"pose output is {heat.shape}; expected [B, 133, 64, 48]")
    kps = decode_heatmaps(heat.astype(np.float32), np.stack(centers), np.stack(scales))
    return [FramePose(kp, n > 0, n, b) for kp, (b, n) in zip(kps, chosen)]
