"""Skeleton drawing, pixel for pixel as the official `draw_aapose_by_meta_new` draws it.

The DiT was trained on these pictures, so every detail matters: widths from the canvas size,
limb ellipses with the angle truncated to whole degrees, no antialiasing, colours written into
channels (0, 1, 2) as given (the canvases are RGB), hand joints only where int(x), int(y) >= 1,
and no drawing of the 68 face points. reference/preprocess/README.md §2 is the specification.

OpenCV does the rasterising (ellipse2Poly, fillConvexPoly, circle, line), because OpenCV's
integer sine table and polygon filler are the reference. One primitive changed in OpenCV 5:
`cv2.line` no longer rasterises lines whose ends leave the canvas as 4.x does. `hand_line`
reproduces the 4.x behaviour (see its docstring), so the result is the same on OpenCV 4 and 5.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from .keypoints import PixelPose

# (row_a, row_b) per limb, in drawing order, on the 20 body rows.
LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11),
         (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (13, 18), (10, 19))
# Full colours, indexed by limb number for limbs (drawn at 60 %) and by row number for joints.
COLORS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
          (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
          (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
          (200, 200, 0), (100, 100, 0))
LIMB_COLORS = tuple(tuple(int(c * 0.6) for c in col) for col in COLORS)
HAND_EDGES = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10),
              (10, 11), (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18),
              (18, 19), (19, 20))
# matplotlib hsv_to_rgb([e / 20, 1, 1]) * 255 as OpenCV rounds it; the asymmetric values
# (229 vs 230, 178 vs 179) come from float error in hsv_to_rgb and are what the DiT saw.
HAND_EDGE_COLORS = ((255, 0, 0), (255, 77, 0), (255, 153, 0), (255, 229, 0), (204, 255, 0),
                    (128, 255, 0), (51, 255, 0), (0, 255, 25), (0, 255, 102), (0, 255, 179),
                    (0, 255, 255), (0, 178, 255), (0, 102, 255), (0, 25, 255), (51, 0, 255),
                    (128, 0, 255), (204, 0, 255), (255, 0, 230), (255, 0, 153), (255, 0, 77))
HAND_JOINT_COLOR = (0, 0, 255)


def stick_widths(height: int, width: int) -> tuple[int, int]:
    """(body half-width and joint radius, hand line thickness and joint radius)."""
    sw = max(int(min(height, width) / 200) - 1, 1)
    return sw, max(sw // 2, 1)


def _limb(img: np.ndarray, p: np.ndarray, q: np.ndarray, half_width: int, color) -> None:
    # Float64 throughout; only the centre, half length and angle are truncated, as officially.
    mx = (p[0] + q[0]) / 2
    my = (p[1] + q[1]) / 2
    dx = p[0] - q[0]
    dy = p[1] - q[1]
    length = (dy ** 2 + dx ** 2) ** 0.5
    angle = math.degrees(math.atan2(dy, dx))
    poly = cv2.ellipse2Poly((int(mx), int(my)), (int(length / 2), half_width), int(angle), 0, 360, 1)
    cv2.fillConvexPoly(img, poly, color)


def hand_line(img: np.ndarray, p: tuple[int, int], q: tuple[int, int], color, thickness: int) -> None:
    """cv2.line(img, p, q, color, thickness) exactly as OpenCV 4.x rasterises it.

    1-pixel lines are the same in OpenCV 4 and 5. Thicker ones are not when an end leaves the
    canvas: OpenCV 5 clips the segment first, 4.x does not. 4.x draws a thick LINE_8 line as a
    quadrilateral in 16-bit fixed point (the ends offset by the rounded normal of half the
    thickness) filled with fillConvexPoly, plus a filled circle of radius (t + 1) // 2 at each
    end; both primitives are unchanged in OpenCV 5, so that construction is done here."""
    if thickness <= 1:
        cv2.line(img, p, q, color, thickness)
        return
    one = 1 << 16
    x0, y0 = p[0] * one, p[1] * one
    x1, y1 = q[0] * one, q[1] * one
    dx = float(p[0] - q[0])
    dy = float(q[1] - p[1])
    r2 = dx * dx + dy * dy
    if r2 > 2.220446049250313e-16:
        r = (thickness * (one >> 1) + (thickness & 1) * one * 0.5) / math.sqrt(r2)
        ox, oy = round(dy * r), round(dx * r)     # cvRound: half to even, as Python's round
        quad = np.array([[x0 + ox, y0 + oy], [x0 - ox, y0 - oy],
                         [x1 - ox, y1 - oy], [x1 + ox, y1 + oy]], dtype=np.int64)
        cv2.fillConvexPoly(img, quad.astype(np.int32), color, cv2.LINE_8, 16)
    radius = (thickness * (one >> 1) + (one >> 1)) >> 16
    cv2.circle(img, p, radius, color, -1)
    cv2.circle(img, q, radius, color, -1)


def _hand(img: np.ndarray, xy: np.ndarray, p: np.ndarray, threshold: float, hw: int) -> None:
    for e, (a, b) in enumerate(HAND_EDGES):
        if p[a] < threshold or p[b] < threshold:
            continue
        x1, y1, x2, y2 = int(xy[a, 0]), int(xy[a, 1]), int(xy[b, 0]), int(xy[b, 1])
        # Official test is "> 0.01" on the truncated ints, i.e. >= 1: points on row/column 0
        # or beyond the left/top border are not connected.
        if x1 > 0 and y1 > 0 and x2 > 0 and y2 > 0:
            hand_line(img, (x1, y1), (x2, y2), HAND_EDGE_COLORS[e], hw)
    for k in range(xy.shape[0]):
        if p[k] < threshold:
            continue
        x, y = int(xy[k, 0]), int(xy[k, 1])
        if x > 0 and y > 0:
            cv2.circle(img, (x, y), hw, HAND_JOINT_COLOR, thickness=-1)


def draw_pose(canvas: np.ndarray, pose: PixelPose, threshold: float = 0.5,
              draw_hands: bool = True, draw_head: bool = True) -> np.ndarray:
    """Draw `pose` on `canvas` (uint8 H x W x 3, modified in place and returned).

    Body limbs, then body joints, then the left hand and the right hand."""
    h, w = canvas.shape[:2]
    sw, hw = stick_widths(h, w)
    body = np.asarray(pose.body, dtype=np.float64)
    # Scores compared in float64, as officially (the score column joins the float64 coordinates).
    p = np.asarray(pose.body_p, dtype=np.float64).copy()
    if not draw_head:
        p[[0, 14, 15, 16, 17]] = 0
    for k, (a, b) in enumerate(LIMBS):
        if p[a] < threshold or p[b] < threshold:
            continue
        _limb(canvas, body[a], body[b], sw, LIMB_COLORS[k])
    for r in range(body.shape[0]):
        if p[r] < threshold:
            continue
        cv2.circle(canvas, (int(body[r, 0]), int(body[r, 1])), sw, COLORS[r], thickness=-1)
    if draw_hands:
        for xy, hp in ((pose.lhand, pose.lhand_p), (pose.rhand, pose.rhand_p)):
            _hand(canvas, np.asarray(xy, dtype=np.float64), np.asarray(hp, dtype=np.float64),
                  threshold, hw)
    return canvas


def draw_pose_frame(pose: PixelPose, height: int, width: int, threshold: float = 0.5) -> np.ndarray:
    """A fresh black RGB canvas with `pose` drawn on it."""
    return draw_pose(np.zeros((height, width, 3), np.uint8), pose, threshold)
