"""The embedded (mediapipe) backend on the shared example (a talk-show host, 1920x1080, 30 fps)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from wanimate.engine.preprocess import embedded as E
from wanimate.engine.preprocess.keypoints import normalise_sequence
from wanimate.engine.preprocess.pipeline import face_boxes
from wanimate.engine.video import iter_frames, probe_video

DATA = Path(__file__).parent / "data" / "prep_extra"
VIDEO = Path(__file__).parents[1] / "examples" / "drive.mp4"   # the official example driving video
IMAGE = DATA / "example_image.jpeg"

needs_mediapipe = pytest.mark.skipif(not E.available(), reason="mediapipe 0.10.21 not installed")


def _lm(x, y, v=1.0):
    return SimpleNamespace(x=x, y=y, visibility=v)


def test_mapping_onto_wholebody():
    pose = SimpleNamespace(landmark=[_lm(0.1 + i / 100, 0.2 + i / 200, 0.8) for i in range(33)])
    face = SimpleNamespace(landmark=[_lm(0.5 + i / 5000, 0.3 + (i % 7) / 500) for i in range(468)])
    hand = SimpleNamespace(landmark=[_lm(1.05 if i == 20 else 0.6, 0.5) for i in range(21)])
    res = SimpleNamespace(pose_landmarks=pose, face_landmarks=face, left_hand_landmarks=hand,
                          right_hand_landmarks=None)
    kp, person = E.to_wholebody(res, 200, 100)
    assert person and kp.shape == (133, 3) and kp.dtype == np.float32
    assert np.allclose(kp[9, :2], [(0.1 + 0.15) * 200, (0.2 + 0.075) * 100])   # left wrist <- 15
    assert np.allclose(kp[17], kp[18]) and np.allclose(kp[17, 0], (0.1 + 0.31) * 200)
    assert np.allclose(kp[23:91, 2], 1.0)
    assert kp[91, 2] == pytest.approx(E.HAND_IN_FRAME) and kp[111, 2] == pytest.approx(E.HAND_OFF_FRAME)
    assert not kp[112:, 2].any()                                              # right hand missing
    kp, person = E.to_wholebody(SimpleNamespace(pose_landmarks=None), 200, 100)
    assert not person and (kp[:23, :2] < 0).all() and not kp[:, 2].any()


def _example_frames(step: int):
    info = probe_video(VIDEO)
    with iter_frames(VIDEO, indices=list(range(0, info.n_frames, step))) as s:
        return [f for f in s]


def _face_detector_boxes(frames):
    from mediapipe.python.solutions import face_detection
    out = []
    with face_detection.FaceDetection(model_selection=1, min_detection_confidence=0.5) as fd:
        for f in frames:
            d = fd.process(f).detections
            if not d:
                out.append(None)
                continue
            b = max(d, key=lambda x: x.score[0]).location_data.relative_bounding_box
            h, w = f.shape[:2]
            out.append((b.xmin * w, b.ymin * h, (b.xmin + b.width) * w, (b.ymin + b.height) * h))
    return out


def _check_faces(frames, found):
    h, w = frames[0].shape[:2]
    metas = normalise_sequence([f.keypoints for f in found], w, h)
    fill = face_boxes(metas)
    heads = _face_detector_boxes(frames)
    checked = 0
    for (x1, x2, y1, y2), head in zip(fill.boxes, heads):
        if head is None:
            continue
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        assert head[0] <= cx <= head[2] and head[1] <= cy <= head[3], ((x1, x2, y1, y2), head)
        checked += 1
    assert checked >= 0.9 * len(frames)


@needs_mediapipe
def test_example_frames_person_face_and_mask():
    frames = _example_frames(step=12)                 # 9 frames across the clip
    be = E.EmbeddedBackend(segment=True)
    try:
        found = be(frames)
    finally:
        be.close()
    assert all(f.person for f in found)
    _check_faces(frames, found)
    h, w = frames[0].shape[:2]
    for f in found:
        m = f.mask
        assert m.shape == (h, w) and m.dtype == np.uint8
        kp = f.keypoints
        for i in (0, 5, 6):                            # nose and shoulders are on the person
            x, y = int(kp[i, 0]), int(kp[i, 1])
            assert m[y, x] == 1
        # the inset picture (top left) and the left margin are background
        assert m[: h // 2, : int(0.35 * w)].mean() < 0.02
        assert 0.05 < m.mean() < 0.6


@needs_mediapipe
def test_reference_image_has_a_person():
    from wanimate.engine.video import load_image
    be = E.EmbeddedBackend()
    try:
        fp = be.image(load_image(IMAGE))
    finally:
        be.close()
    assert fp.person and fp.keypoints[0, 2] > 0.5


@needs_mediapipe
@pytest.mark.slow
def test_example_video_detection_rate_and_faces(tmp_path, capsys):
    from wanimate.engine.preprocess import preprocess
    r = preprocess(IMAGE, VIDEO, tmp_path / "out", backend="embedded", progress=True)
    out = capsys.readouterr().out
    assert "frames/s" in out
    assert r.n_frames == 106 and r.person_rate >= 0.95
    assert r.face_found >= 100
    frames = _example_frames(step=1)
    be = E.EmbeddedBackend()
    try:
        found = be(frames)
    finally:
        be.close()
    assert np.mean([f.person for f in found]) >= 0.95
    _check_faces(frames, found)
    print(f"embedded throughput {r.throughput_fps:.2f} frames/s, pose pass {r.pose_fps:.2f} frames/s")


@needs_mediapipe
def test_small_clip_replace_mode(tmp_path):
    from wanimate.engine.preprocess import preprocess
    r = preprocess(DATA / "small_image.jpg", DATA / "small_video.mp4", tmp_path / "out", mode="replace",
                   backend="auto", fps=15, resolution_area=(480, 272), progress=False)
    assert r.backend == "embedded" and r.mask_source == "mediapipe-pose-segmentation"
    assert r.n_frames == 12 and r.person_rate == 1.0
    with iter_frames(tmp_path / "out" / "src_mask.mp4") as s:
        masks = [f for f in s]
    assert len(masks) == 12
    m = masks[6][..., 0] > 127
    assert 0.05 < m.mean() < 0.7 and not m[: m.shape[0] // 2, : int(0.3 * m.shape[1])].any()
