"""Skeleton drawing details that the fixtures do not pin down alone."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from wanimate.engine.preprocess.draw import draw_pose, hand_line, stick_widths
from wanimate.engine.preprocess.keypoints import normalise_sequence

from pathlib import Path
DATA = Path(__file__).parent / "data"


def test_hand_line_matches_opencv_4_10():
    # 600 random lines, ends inside and outside the canvas, thickness 1-4, rasterised by
    # OpenCV 4.10.0 (the official environment) and stored as hashes.
    ref = json.loads((DATA / "prep_extra" / "cv4_lines.json").read_text())
    color = tuple(ref["color"])
    bad = []
    for c in ref["cases"]:
        img = np.zeros((c["h"], c["w"], 3), np.uint8)
        hand_line(img, tuple(c["p"]), tuple(c["q"]), color, c["t"])
        if hashlib.sha256(img.tobytes()).hexdigest() != c["sha256"]:
            bad.append(c)
    assert not bad, f"{len(bad)} lines differ, first {bad[0]}"


@pytest.mark.parametrize("h,w,sw,hw", [(320, 256, 1, 1), (720, 1280, 2, 1), (1024, 1024, 4, 2),
                                        (1080, 1920, 4, 2), (1400, 1400, 6, 3)])
def test_stick_widths(h, w, sw, hw):
    assert stick_widths(h, w) == (sw, hw)


def test_scores_gate_drawing():
    rng = np.random.default_rng(3)
    kp = np.zeros((1, 133, 3), np.float32)
    kp[0, :, 0] = rng.uniform(50, 590, 133)
    kp[0, :, 1] = rng.uniform(50, 430, 133)
    kp[0, :, 2] = 0.9
    full = draw_pose(np.zeros((480, 640, 3), np.uint8), normalise_sequence(kp, 640, 480)[0].to_pixels())
    kp[0, :, 2] = 0.49
    none = draw_pose(np.zeros((480, 640, 3), np.uint8), normalise_sequence(kp, 640, 480)[0].to_pixels())
    assert full.any() and not none.any()
    kp[0, 23:91, 2] = 0.9          # face points are never drawn
    assert not draw_pose(np.zeros((480, 640, 3), np.uint8),
                         normalise_sequence(kp, 640, 480)[0].to_pixels()).any()
