"""Face boxes and the 512x512 face crops (src_face.mp4).

`face_box` is the official rule (reference/preprocess/README.md §6): the box around the 68 face
points, its area grown by 1.3 at the same aspect ratio, three quarters of the vertical growth
going upward (towards the forehead), clamped to the frame, each side truncated with int().
Scores are ignored, as officially. The crop is stretched to 512x512 (aspect not kept).

Frames where the face is lost are the engine's addition (the official code divides by zero or
crashes in cv2.resize there). `fill_face_boxes` decides per frame:
- a frame whose 68 points give a usable box keeps it (identical to the official box);
- a frame without one (no face points, a degenerate or empty box) gets its box **linearly
  interpolated** between the nearest usable frames before and after it, or **held** from the
  nearest usable frame at the start or end of the video;
- if no frame of the video has a usable face box, a box is made from the head points of the body
  (nose, eyes, ears, neck); if those are missing too, `FaceNotFoundError` is raised.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ..errors import MediaError

FACE_SIZE = 512
FACE_SCALE = 1.3


class FaceNotFoundError(MediaError):
    """No frame of the driving video shows a face (nor head keypoints to place one)."""


def face_box(face_xy: np.ndarray, width: int, height: int, scale: float = FACE_SCALE
             ) -> tuple[int, int, int, int] | None:
    """[x1, x2, y1, y2] (note the order) of the face crop, from the 69 normalised "face" rows
    of a PoseMeta (row 0, the right heel, is skipped). None when the box is unusable."""
    pts = face_xy[1:, :2] * (width, height)          # float32 x int -> float64, as officially
    if not np.isfinite(pts).all():
        return None
    min_x, min_y = pts.min(axis=0)
    max_x, max_y = pts.max(axis=0)
    w0 = max_x - min_x
    h0 = max_y - min_y
    if not (w0 > 0 and h0 > 0):
        return None
    area = w0 * h0 * scale
    w1 = np.sqrt(area * (w0 / h0))
    h1 = np.sqrt(area * (h0 / w0))
    dw = (w1 - w0) / 2
    dh = (h1 - h0) / 4
    x1 = int(max(min_x - dw, 0))
    x2 = int(min(max_x + dw, width))
    y1 = int(max(min_y - 3 * dh, 0))
    y2 = int(min(max_y + dh, height))
    if x2 <= x1 or y2 <= y1:
        return None
    return x1, x2, y1, y2


def crop_face(frame: np.ndarray, box: tuple[int, int, int, int], size: int = FACE_SIZE) -> np.ndarray:
    """Stretch frame[y1:y2, x1:x2] to size x size (INTER_LINEAR)."""
    x1, x2, y1, y2 = box
    return cv2.resize(frame[y1:y2, x1:x2], (size, size))


def head_box_from_body(body: np.ndarray, width: int, height: int) -> tuple[int, int, int, int] | None:
    """A square-ish head box from the body's nose/eye/ear/neck rows (normalised [20, 3]),
    used only when no frame has face points. Rows with score < 0.3 are ignored."""
    rows = [0, 14, 15, 16, 17]
    pts = [body[r, :2] * (width, height) for r in rows if body[r, 2] >= 0.3]
    if len(pts) < 2:
        return None
    pts = np.array(pts, dtype=np.float64)
    cx, cy = pts.mean(axis=0)
    span = max(np.ptp(pts[:, 0]), np.ptp(pts[:, 1]))
    if body[1, 2] >= 0.3:     # nose-to-neck distance is a steadier head size than the ear span
        span = max(span, 0.9 * abs(body[1, 1] * height - cy))
    half = max(span, 8.0)
    x1, x2 = int(max(cx - half, 0)), int(min(cx + half, width))
    y1, y2 = int(max(cy - 1.3 * half, 0)), int(min(cy + 0.9 * half, height))
    if x2 <= x1 or y2 <= y1:
        return None
    return x1, x2, y1, y2


@dataclass
class FaceFill:
    boxes: np.ndarray          # [T, 4] int64 x1, x2, y1, y2
    found: np.ndarray          # [T] bool: the frame's own face points gave the box
    interpolated: int          # frames filled between two found frames
    held: int                  # frames filled from the nearest found frame at an end
    from_head: bool            # no face anywhere: boxes came from head keypoints


def fill_face_boxes(boxes: list[tuple[int, int, int, int] | None],
                    head_boxes: list[tuple[int, int, int, int] | None] | None = None) -> FaceFill:
    """Fill the missing boxes of a sequence: interpolate inside gaps, hold at the ends."""
    n = len(boxes)
    found = np.array([b is not None for b in boxes], dtype=bool)
    from_head = False
    if not found.any():
        if head_boxes is None or all(b is None for b in head_boxes):
            raise FaceNotFoundError(
                "no face was found in any frame of the driving video (and no head keypoints "
                "to place one); use a video in which the performer's face is visible")
        boxes, from_head = list(head_boxes), True
        found = np.array([b is not None for b in boxes], dtype=bool)
    out = np.zeros((n, 4), dtype=np.int64)
    idx = np.flatnonzero(found)
    out[idx] = np.array([boxes[i] for i in idx], dtype=np.int64)
    interpolated = held = 0
    for t in np.flatnonzero(~found):
        after = idx[np.searchsorted(idx, t):]
        before = idx[:np.searchsorted(idx, t)]
        if len(before) and len(after):
            a, b = before[-1], after[0]
            w = (t - a) / (b - a)
            out[t] = np.round(out[a] * (1 - w) + out[b] * w).astype(np.int64)
            interpolated += 1
        else:
            out[t] = out[before[-1] if len(before) else after[0]]
            held += 1
    return FaceFill(out, found if not from_head else np.zeros(n, bool), interpolated, held, from_head)
