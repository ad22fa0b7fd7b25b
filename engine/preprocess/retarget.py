"""Retargeting: give the driving skeleton the reference character's limb proportions.

Reproduces the official `get_retarget_pose` without FLUX (reference/preprocess/README.md §9),
bit for bit: everything is Python float (double) arithmetic in the official order. In short:

1. a global scale `scale_min` = driving height / reference height (nose-to-ankles if both are
   confidently full-body, else nose-to-hips, else sqrt of the canvas-area ratio);
2. one ratio per limb = reference length / driving length on frame 0, measured in the reference
   canvas scaled by `scale_min`; paired limbs take the larger ratio, eyes and ears the mean;
3. each driving frame's limbs are rescaled along their own direction, outward from the neck,
   then shifted so that the feet (full bodies) or the neck land where the reference has them,
   and scaled back by 1 / scale_min into the reference canvas;
4. hands are scaled about their root and re-attached to the moved wrists.

The official code swaps the left/right hand labels on the way (invisible in the drawing, which
draws both hands alike); `RetargetedPose` keeps that order so its arrays match the official ones.

The FLUX branch of the official pipeline (`--use_flux`: FLUX.1-Kontext edits the reference and
a driving frame into a canonical pose first, then proportions are measured on the edits) is not
run by this engine. `Retargeter` still accepts the two edited skeletons (`src_edit`, `ref_edit`)
so that proportions measured elsewhere can be used; that path is what the official code does
with them.

Streaming: `Retargeter(src0, ref)` computes everything from frame 0 and the reference once;
`retargeter(meta, index)` then maps one frame at a time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .draw import LIMBS
from .keypoints import PixelPose, PoseMeta

THRESHOLD = 0.4
# Limb pairs whose ratios are unified (larger of the two), by limb number.
PAIRED_LIMBS = ((0, 1), (2, 4), (3, 5), (6, 9), (7, 10), (8, 11), (17, 18))
AVERAGED_LIMBS = ((13, 15), (14, 16))
FULL, THREE_QUARTER, HALF = 2, 1, 0


def _rows(a: np.ndarray) -> list[list[float]]:
    return a.tolist()


def _hand_pixels(hand: np.ndarray, width: int, height: int) -> list[list[float]]:
    # float32 normalised x float64 size, as officially (the round trip is not exact).
    return (hand * np.array([[width, height, 1.0]])).tolist()


@dataclass
class _Skeleton:
    width: int
    height: int
    body: list[list[float]]     # normalised [x, y, score]

    @classmethod
    def of(cls, meta: PoseMeta) -> "_Skeleton":
        return cls(meta.width, meta.height, _rows(meta.body))


def _limb_length(sk: _Skeleton, limb: tuple[int, int], width=None, height=None) -> float:
    a, b = sk.body[limb[0]], sk.body[limb[1]]
    w = float(sk.width if width is None else width)
    h = float(sk.height if height is None else height)
    dx = a[0] * w - b[0] * w
    dy = a[1] * h - b[1] * h
    return (dx ** 2 + dy ** 2) ** 0.5


def _height_scale(src: _Skeleton, dst: _Skeleton) -> tuple[float, bool]:
    """(scale_min, fell_back_to_area): driving height / reference height."""
    for lower in ((10, 13), (8, 11)):
        rows = (0,) + lower
        if all(src.body[r][2] > 0.5 for r in rows) and all(dst.body[r][2] > 0.5 for r in rows):
            def span(sk: _Skeleton) -> float:
                return sk.height * abs((sk.body[lower[0]][1] + sk.body[lower[1]][1]) / 2 - sk.body[0][1])
            hs, hd = span(src), span(dst)
            if hs > 0 and hd > 0:      # official divides by zero here; fall through instead
                return 1.0 * hs / hd, False
    return math.sqrt(src.height * src.width) / math.sqrt(dst.height * dst.width), True


def _edit_compensation(sk: _Skeleton, edit: _Skeleton, enabled: bool) -> float:
    """How much FLUX changed the scale: larger of the head-width and shoulder ratios."""
    if not enabled:
        return 1
    head = (0, 14, 15, 16, 17)
    def head_width(s: _Skeleton) -> float:
        xs = [s.body[r][0] for r in head]
        return max(xs) - min(xs)
    shoulder = (5, 2)
    return max(head_width(sk) / head_width(edit),
               _limb_length(sk, shoulder) / _limb_length(edit, shoulder))


def _body_class(body: list[list[float]], threshold: float = THRESHOLD) -> int:
    def ok(r: int) -> bool:
        return body[r][1] <= 1 and body[r][2] >= threshold
    if ok(10) and ok(13) and ok(8) and ok(11):
        return FULL
    if ok(8) and ok(11):
        return THREE_QUARTER
    return HALF


def _limb_geometry(pts: list[list[float]], ratios: list[float]) -> tuple[list[float], list[float]]:
    """New length and direction (degrees) of every limb, from pixel points."""
    lengths, angles = [], []
    for k, (i, j) in enumerate(LIMBS):
        dy = pts[i][1] - pts[j][1]
        dx = pts[i][0] - pts[j][0]
        lengths.append((dy ** 2 + dx ** 2) ** 0.5 * ratios[k])
        angles.append(math.degrees(math.atan2(dy, dx)))
    return lengths, angles


def _rebuild_chain(pts: list[list[float]], lengths: list[float], angles: list[float]) -> list[list[float]]:
    """Walk the limbs from the neck outwards, placing each far end at its new length."""
    out = list(pts)
    for k, (i, j) in enumerate(LIMBS):
        rad = math.radians(angles[k])
        out[j] = [out[i][0] - lengths[k] * math.cos(rad),
                  out[i][1] - lengths[k] * math.sin(rad)] + out[j][2:]
    return out


@dataclass
class RetargetedPose:
    """One retargeted frame in the reference canvas (the official AAPoseMeta fields)."""
    pixels: PixelPose               # hands: NaN where the official meta holds None


class Retargeter:
    """Maps driving-frame PoseMetas into the reference's proportions and canvas."""

    def __init__(self, src0: PoseMeta, ref: PoseMeta, src_edit: PoseMeta | None = None,
                 ref_edit: PoseMeta | None = None, threshold: float = THRESHOLD) -> None:
        self.threshold = threshold
        src, dst = _Skeleton.of(src0), _Skeleton.of(ref)
        self.out_width, self.out_height = ref.width, ref.height
        self.scale_min, _ = _height_scale(src, dst)
        use_edit = src_edit is not None and ref_edit is not None
        if use_edit:
            src_e, dst_e = _Skeleton.of(src_edit), _Skeleton.of(ref_edit)
            scale_edit, area_rule = _height_scale(src_e, dst_e)
            ratio_src = _edit_compensation(src, src_e, area_rule)
            ratio_dst = _edit_compensation(dst, dst_e, area_rule)
            dst_e.width, dst_e.height = int(dst_e.width * scale_edit), int(dst_e.height * scale_edit)
        # Reference lengths are measured in its canvas resized by scale_min (ints, as officially).
        dst.height, dst.width = int(dst.height * self.scale_min), int(dst.width * self.scale_min)
        self.body_class = min(_body_class(dst.body, threshold), _body_class(src.body, threshold))

        ratios: list[float] = []
        for limb in LIMBS:
            if use_edit:
                ls, ld = _limb_length(src_e, limb), _limb_length(dst_e, limb)
                ratio = 1.0 * ld * ratio_dst / ls / ratio_src if ls > 0 else -1
            else:
                ls, ld = _limb_length(src, limb), _limb_length(dst, limb)
                # A zero-length driving limb makes the official ratio inf; treat it as unknown.
                ratio = 1.0 * ld / ls if ls > 0 else -1
            ratios.append(ratio)
        if ratios[0] != -1 and ratios[1] != -1:
            ratios = [(ratios[0] + ratios[1]) / 2 if r == -1 else r for r in ratios]
        ratios = [1.0 if r == -1 else r for r in ratios]   # only reachable with degenerate shoulders
        for a, b in PAIRED_LIMBS:
            ratios[a] = ratios[b] = max(ratios[a], ratios[b])
        for a, b in AVERAGED_LIMBS:
            ratios[a] = ratios[b] = (ratios[a] + ratios[b]) / 2
        self.ratios = ratios

        # Frame 0 rescaled (no foot clamp here, as officially), for the anchor.
        src_px = [[r[0] * src.width, r[1] * src.height] for r in src.body]
        rs = _rebuild_chain(src_px, *_limb_geometry(src_px, ratios))
        b = dst.body
        if self.body_class == FULL:
            right_mid = (b[10][1] + b[19][1]) / 2
            left_mid = (b[13][1] + b[18][1]) / 2
            ground_y = max(left_mid, right_mid) * dst.height
            self.delta_y = max(rs[10][1], rs[13][1]) - ground_y
            self.src_ground_x = (rs[8][0] + rs[11][0]) / 2
            self.delta_x = self.src_ground_x - (b[8][0] + b[11][0]) * dst.width / 2
        else:
            self.delta_y = rs[1][1] - b[1][1] * dst.height
            self.delta_x = rs[1][0] - b[1][0] * dst.width
            self.src_ground_x = rs[1][0]

    def __call__(self, meta: PoseMeta, index: int) -> RetargetedPose:
        src_w, src_h = meta.width, meta.height
        W, H = self.out_width, self.out_height
        pts = [[r[0] * src_w, r[1] * src_h, r[2]] for r in _rows(meta.body)]
        lengths, angles = _limb_geometry(pts, self.ratios)
        # Feet no longer than half the shin.
        if lengths[18] > lengths[8] * 0.5:
            lengths[18] = lengths[8] * 0.5
        if lengths[17] > lengths[11] * 0.5:
            lengths[17] = lengths[11] * 0.5
        moved = _rebuild_chain(pts, lengths, angles)

        delta_x, delta_y = self.delta_x, self.delta_y
        if index == 0:
            # Zero in the pipeline (frame 0 is the source); kept for callers whose src differs.
            if self.body_class == FULL:
                delta_x += (moved[8][0] + moved[11][0]) / 2 - self.src_ground_x
            elif self.body_class == HALF:
                delta_x += moved[1][0] - self.src_ground_x
        body = [[(p[0] - delta_x) / self.scale_min, (p[1] - delta_y) / self.scale_min, p[2]]
                for p in moved]

        lhand, rhand = self._hands(meta, pts, body)
        body_n = np.array([[p[0] / W, p[1] / H, p[2]] for p in body], dtype=np.float64)
        wh = np.array([W, H], dtype=np.float64)
        pixels = PixelPose(W, H, body_n[:, :2] * wh, body_n[:, 2].copy(),
                           lhand[:, :2].copy(), lhand[:, 2].copy(),
                           rhand[:, :2].copy(), rhand[:, 2].copy())
        return RetargetedPose(pixels)

    def _hands(self, meta: PoseMeta, pts: list[list[float]], body: list[list[float]]):
        src_w, src_h = meta.width, meta.height
        r = max(self.ratios[0], self.ratios[1]) / self.scale_min
        # Normalised again after the pixel round trip (not bit-identical to the input).
        hands = {}
        for name, arr in (("left", meta.lhand), ("right", meta.rhand)):
            px = _hand_pixels(arr, src_w, src_h)
            hands[name] = [[p[0] / src_w, p[1] / src_h, p[2]] for p in px]

        def scaled(hand: list[list[float]]) -> list[list[float]]:
            root_dx = hand[0][0] * (r - 1)
            root_dy = hand[0][1] * (r - 1)
            return [[-1, -1, 0] if p[2] < self.threshold else
                    [p[0] * r - root_dx, p[1] * r - root_dy, p[2]] for p in hand]

        # The official helper returns (right, left) and its caller unpacks (left, right).
        first, second = scaled(hands["right"]), scaled(hands["left"])
        k4, k7 = pts[4], pts[7]
        d_first = np.array(body[4][:2]) - np.array(k4[:2])
        d_second = np.array(body[7][:2]) - np.array(k7[:2])
        if first[0][0] != -1:
            d_first += np.array((k4[0] - first[0][0] * src_w, k4[1] - first[0][1] * src_h))
        if second[0][0] != -1:
            d_second += np.array((k7[0] - second[0][0] * src_w, k7[1] - second[0][1] * src_h))
        dist_first = ((k4[0] - first[0][0] * src_w) ** 2 + (k4[1] - first[0][1] * src_h) ** 2) ** 0.5
        dist_second = ((k7[0] - first[0][0] * src_w) ** 2 + (k7[1] - first[0][1] * src_h) ** 2) ** 0.5

        def place(hand: list[list[float]], d: np.ndarray) -> np.ndarray:
            out = np.full((len(hand), 3), np.nan)
            for i, p in enumerate(hand):
                if p[2] == 0:
                    out[i, 2] = 0.0
                else:
                    out[i] = (int(p[0] * src_w + d[0]), int(p[1] * src_h + d[1]), p[2])
            return out

        if dist_first > dist_second:
            return place(second, d_first), place(first, d_second)
        return place(first, d_first), place(second, d_second)
