"""Resizing as the official preprocessing does it (reference/preprocess/README.md §7).

`size_by_area` is the size rule: keep the aspect ratio, hit the target area, floor both sides to
a multiple of 16. (The official `calculate_new_size` always raises a TypeError and its fallback
is what runs; this is that fallback.) `letterbox` is the official `padding_resize`: scale to fit,
centre, pad with a colour.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from ..errors import ValidationError


def size_by_area(width: int, height: int, target_area: int, divisor: int = 16) -> tuple[int, int]:
    """(new_width, new_height) with about `target_area` pixels, both multiples of `divisor`."""
    if width <= 0 or height <= 0:
        raise ValidationError(f"cannot resize an empty image ({width}x{height})")
    aspect = width / height
    new_h = math.sqrt(target_area / aspect)
    new_w = target_area / new_h
    new_w, new_h = int((new_w // divisor) * divisor), int((new_h // divisor) * divisor)
    if new_w <= 0 or new_h <= 0:
        raise ValidationError(
            f"an image of {width}x{height} at a target area of {target_area} rounds to "
            f"{new_w}x{new_h}; use a less extreme aspect ratio or a larger resolution area")
    return new_w, new_h


def letterbox(img: np.ndarray, height: int, width: int, color=(0, 0, 0),
              interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """Fit `img` (H x W x C uint8) into height x width keeping its aspect ratio, centred, padded."""
    ih, iw = img.shape[:2]
    channels = img.shape[2] if img.ndim == 3 else 1
    out = np.empty((height, width, channels), np.uint8)
    out[...] = np.asarray(color[:channels], dtype=np.uint8) if channels > 1 else color[0]
    if ih / iw > height / width:            # relatively taller: bars left and right
        new_w = int(height / ih * iw)
        scaled = cv2.resize(img, (new_w, height), interpolation=interpolation)
        pad = int((width - new_w) / 2)
        out[:, pad:pad + new_w] = scaled.reshape(height, new_w, channels)
    else:                                   # wider or equal: bars above and below
        new_h = int(width / iw * ih)
        scaled = cv2.resize(img, (width, new_h), interpolation=interpolation)
        pad = int((height - new_h) / 2)
        out[pad:pad + new_h] = scaled.reshape(new_h, width, channels)
    return out if img.ndim == 3 else out[..., 0]


def area_interpolation(src_w: int, src_h: int, dst_w: int, dst_h: int) -> int:
    """INTER_AREA when shrinking, INTER_LINEAR otherwise (the official choice)."""
    return cv2.INTER_AREA if dst_w * dst_h < src_w * src_h else cv2.INTER_LINEAR


def resize_by_area(img: np.ndarray, target_area: int, divisor: int = 16) -> np.ndarray:
    """Resize to `size_by_area` and letterbox, as the official `resize_by_area`."""
    h, w = img.shape[:2]
    new_w, new_h = size_by_area(w, h, target_area, divisor)
    return letterbox(img, new_h, new_w, interpolation=area_interpolation(w, h, new_w, new_h))
