"""Replace-mode person masks: dilation, coarsening, background and the mask video frames.

Official rules (reference/preprocess/README.md §10), given a binary person mask m (uint8 0/1):
- `iterations > 0`: dilate with a k x k box `iterations` times, then coarsen on a w_len x h_len
  grid over the mask's bounding box (a block becomes 1 if it holds any 1). With the defaults
  (k 7, 3 iterations, 1 x 1 grid) the mask becomes its bounding box except the last row and
  column. `iterations == 0` skips BOTH steps (the raw mask is used);
- src_bg = frame * (1 - mask), src_mask = mask * 255 on three channels.

Where the mask comes from is a backend choice (SAM-2 in the official pipeline, the selfie
segmenter in the embedded one); `pose_region_mask` builds one from the skeleton alone, the last
resort when no segmenter is available. An empty mask (the person left the frame) is kept empty:
the official code crashes there (Wan2.2 issue #300); we coarsen nothing and the whole frame is
background for that frame.
"""
from __future__ import annotations

import cv2
import numpy as np

from .draw import LIMBS
from .keypoints import PoseMeta

DEFAULT_K = 7
DEFAULT_ITERATIONS = 3
DEFAULT_GRID = (1, 1)           # (w_len, h_len)
SAM_CHUNK = 400
SAM_PROMPT_ROWS = (0, 1, 2, 5, 8, 11, 10, 13)   # nose, neck, shoulders, hips, ankles


def coarsen(mask: np.ndarray, w_len: int, h_len: int) -> np.ndarray:
    """Fill each grid block of the mask's bounding box that holds any pixel (in place).

    Blocks end at the bounding box's last row/column *exclusive*, so those keep their values
    (the official grid)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return mask
    x_min, x_max, y_min, y_max = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
    # The official step is int32((max - min) / len); a zero step crashes there, 1 is the limit.
    w_step = max(int(np.int32((x_max - x_min) / w_len)), 1)
    h_step = max(int(np.int32((y_max - y_min) / h_len)), 1)
    for x0 in range(x_min, x_max, w_step):
        x1 = min(x0 + w_step, x_max)
        for y0 in range(y_min, y_max, h_step):
            y1 = min(y0 + h_step, y_max)
            block = mask[y0:y1, x0:x1]
            if block.any():
                block[...] = 1
    return mask


def refine_mask(mask: np.ndarray, k: int = DEFAULT_K, iterations: int = DEFAULT_ITERATIONS,
                w_len: int = 1, h_len: int = 1) -> np.ndarray:
    """Dilate then coarsen a 0/1 uint8 mask (both skipped when iterations == 0)."""
    if iterations <= 0:
        return mask
    dilated = cv2.dilate(mask, np.ones((k, k), np.uint8), iterations=iterations)
    return coarsen(dilated, w_len, h_len)


def background(frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The frame with the person's region blacked out (src_bg)."""
    return frame * (1 - mask[:, :, None])


def mask_frame(mask: np.ndarray) -> np.ndarray:
    """0/1 mask -> 0/255 three-channel uint8 frame (src_mask)."""
    m = mask * 255
    return np.stack([m, m, m], axis=2)


def sam_chunks(n_frames: int, chunk: int = SAM_CHUNK) -> list[tuple[int, int]]:
    """[start, end) of each SAM-2 chunk, official split (an empty last chunk is skipped)."""
    n_chunks = 1 if n_frames < chunk else (n_frames + chunk) // chunk
    out = []
    for i in range(n_chunks):
        s, e = i * chunk, min((i + 1) * chunk, n_frames)
        if e > s:
            out.append((s, e))
    return out


def sam_key_frames(n: int) -> list[int]:
    """Key frames (within a chunk of n frames) that get point prompts."""
    key = 4 if n > 4 else 1
    return list(range(0, n, n // key))


def sam_prompt_points(meta: PoseMeta, width: int, height: int) -> np.ndarray:
    """[8, 2] int32 positive prompts: nose, neck, shoulders, hips, ankles, whatever their scores."""
    rows = meta.body[list(SAM_PROMPT_ROWS), :2]
    return (rows * np.array([[width, height]])).astype(np.int32)


def pose_region_mask(meta: PoseMeta, height: int, width: int, threshold: float = 0.3) -> np.ndarray:
    """A 0/1 person mask from the skeleton alone: thick limbs, the torso polygon, a head disc and
    the hands' hulls. Coarse on purpose; replace mode dilates and boxes it anyway."""
    mask = np.zeros((height, width), np.uint8)
    body = meta.body[:, :2].astype(np.float64) * (width, height)
    ok = meta.body[:, 2] >= threshold
    if ok.sum() == 0:
        return mask
    pts = body[ok]
    # Limb thickness from the shoulder width (or the visible extent when shoulders are missing).
    if ok[2] and ok[5]:
        scale = np.linalg.norm(body[2] - body[5])
    else:
        scale = 0.25 * max(np.ptp(pts[:, 0]), np.ptp(pts[:, 1]))
    thick = max(int(round(0.45 * scale)), 3)
    for a, b in LIMBS:
        if ok[a] and ok[b]:
            cv2.line(mask, tuple(np.int32(body[a])), tuple(np.int32(body[b])), 1, thick)
    torso = [r for r in (2, 5, 11, 8) if ok[r]]
    if len(torso) >= 3:
        cv2.fillConvexPoly(mask, np.int32(body[torso]), 1)
    if ok[0]:
        cv2.circle(mask, tuple(np.int32(body[0])), max(int(0.55 * scale), 3), 1, -1)
    for hand in (meta.lhand, meta.rhand):
        hv = hand[:, 2] >= threshold
        if hv.sum() >= 3:
            hull = cv2.convexHull(np.int32(hand[hv, :2] * (width, height)))
            cv2.fillConvexPoly(mask, hull, 1)
            cv2.polylines(mask, [hull], True, 1, max(thick // 2, 2))
    return mask
