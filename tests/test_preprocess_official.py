"""The official backend's pre- and post-processing end to end on tiny ONNX models with the
official signatures (YOLOv10 [1,3,640,640] -> [1,300,6]; ViTPose [B,3,256,192] -> [B,133,64,48]),
and preprocess() with it: files, sizes, fps, hard cases, atomic output."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper

from wanimate.engine.preprocess import NoPersonError, PreprocessWarning, preprocess
from wanimate.engine.preprocess import official as O
from wanimate.engine.video import VideoWriter, iter_frames, probe_video

HM_H, HM_W = 64, 48


def _save(graph, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def make_detector(path: Path, rows: list[list[float]]) -> None:
    """Constant detections (x1, y1, x2, y2, score, class in 640-pixel units), wired to the input."""
    det = np.zeros((1, 300, 6), np.float32)
    det[0, :, 5] = 0
    det[0, :len(rows)] = rows
    nodes = [helper.make_node("ReduceMean", ["images"], ["m"], keepdims=1),     # [1, 1, 1, 1]
             helper.make_node("Reshape", ["m", "shape3"], ["m3"]),
             helper.make_node("Mul", ["m3", "zero"], ["z"]),
             helper.make_node("Add", ["det", "z"], ["output0"])]
    graph = helper.make_graph(
        nodes, "tiny_yolo",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 640, 640])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 300, 6])],
        [numpy_helper.from_array(det, "det"), numpy_helper.from_array(np.zeros(1, np.float32), "zero"),
         numpy_helper.from_array(np.array([1, 1, 1], np.int64), "shape3")])
    _save(graph, path)


def skeleton_points() -> np.ndarray:
    """[133, 2] heatmap-grid positions of a standing person (integer cells)."""
    p = np.zeros((133, 2), np.int64)
    body = [(24, 10), (22, 9), (26, 9), (20, 10), (28, 10), (18, 16), (30, 16), (16, 24), (32, 24),
            (15, 31), (33, 31), (20, 34), (28, 34), (20, 45), (28, 45), (20, 55), (28, 55),
            (19, 58), (18, 58), (21, 57), (29, 58), (30, 58), (27, 57)]
    p[:23] = body
    t = np.linspace(0, 2 * np.pi, 68, endpoint=False)
    p[23:91, 0] = np.round(24 + 3 * np.cos(t))
    p[23:91, 1] = np.round(10 + 4 * np.sin(t))
    for start, (wx, wy) in ((91, (15, 31)), (112, (33, 31))):
        k = np.arange(21)
        p[start:start + 21, 0] = wx + (k % 3) - 1
        p[start:start + 21, 1] = wy + 1 + k // 7
    return p


def make_pose(path: Path) -> None:
    """Gaussian peaks at `skeleton_points`; face maps gated by the input's brightness, so a
    black crop has no face (dead maps)."""
    pts = skeleton_points()
    yy, xx = np.mgrid[0:HM_H, 0:HM_W]
    tb = np.zeros((1, 133, HM_H, HM_W), np.float32)
    tf = np.zeros_like(tb)
    for k, (x, y) in enumerate(pts):
        g = 0.9 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.5 ** 2))
        (tf if 23 <= k < 91 else tb)[0, k] = g
    nodes = [helper.make_node("ReduceMean", ["input"], ["m"], axes=[1, 2, 3], keepdims=1),   # [B,1,1,1]
             helper.make_node("Mul", ["m", "ten"], ["m10"]),
             helper.make_node("Clip", ["m10", "lo", "hi"], ["gate"]),
             helper.make_node("Mul", ["tf", "gate"], ["face"]),
             helper.make_node("Add", ["tb", "face"], ["heatmaps"])]
    graph = helper.make_graph(
        nodes, "tiny_vitpose",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["B", 3, 256, 192])],
        [helper.make_tensor_value_info("heatmaps", TensorProto.FLOAT, ["B", 133, HM_H, HM_W])],
        [numpy_helper.from_array(tb, "tb"), numpy_helper.from_array(tf, "tf"),
         numpy_helper.from_array(np.array(10, np.float32), "ten"),
         numpy_helper.from_array(np.array(0, np.float32), "lo"),
         numpy_helper.from_array(np.array(1, np.float32), "hi")])
    _save(graph, path)


PERSON = [200, 100, 440, 600, 0.9, 0]            # in detector (640 x 640) units


def make_ckpt(root: Path, rows=(PERSON,)) -> Path:
    make_detector(root / O.DET_RELPATH, [list(r) for r in rows])
    make_pose(root / O.POSE_RELPATH)
    return root


def make_video(path: Path, n: int, w: int = 320, h: int = 240, black=(), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with VideoWriter(path, 30, w, h) as wr:
        for t in range(n):
            f = np.zeros((h, w, 3), np.uint8) if t in black else \
                rng.integers(120, 255, (h, w, 3), dtype=np.uint8)
            wr.write(f)
    return path


def make_image(path: Path, w: int = 300, h: int = 400) -> Path:
    import cv2
    img = np.random.default_rng(1).integers(100, 255, (h, w, 3), dtype=np.uint8)
    cv2.imwrite(str(path), img)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_ckpt(tmp_path_factory.mktemp("ckpt"))


def test_backend_keypoints_land_where_the_heatmaps_put_them(ckpt):
    be = O.OfficialBackend(ckpt, batch_size=4)
    frame = np.full((360, 640, 3), 200, np.uint8)
    fp = be([frame])[0]
    assert fp.person and fp.n_people == 1
    x1, y1, x2, y2 = 200, int(100 * 360 / 640), 440, int(100 * 360 / 640) + int(500 * 360 / 640)
    assert fp.bbox[:4].tolist() == [x1, y1, x2, y2]
    # crop geometry, written out independently: a 3:4 box around the detection, 1.25x margin
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    hb = max((x2 - x1) * 256 / 192, y2 - y1) * 1.25
    wb = hb * 192 / 256
    pts = skeleton_points()
    want_x = pts[:, 0] * wb / HM_W + cx - wb / 2
    want_y = pts[:, 1] * hb / HM_H + cy - hb / 2
    assert np.abs(fp.keypoints[:, 0] - want_x).max() < 1e-3
    assert np.abs(fp.keypoints[:, 1] - want_y).max() < 1e-3
    assert np.allclose(fp.keypoints[:, 2], 0.9, atol=1e-6)


def test_batching_does_not_change_results(ckpt):
    rng = np.random.default_rng(5)
    frames = [rng.integers(0, 255, (240, 320, 3), dtype=np.uint8) for _ in range(5)]
    a = O.OfficialBackend(ckpt, batch_size=1)(frames)
    b = O.OfficialBackend(ckpt, batch_size=4)(frames)
    for x, y in zip(a, b):
        assert np.array_equal(x.keypoints, y.keypoints) and np.array_equal(x.bbox, y.bbox)


def test_providers_hook(tmp_path, ckpt):
    model = ckpt / O.POSE_RELPATH
    prov = O.pick_providers(model, engine_dir=tmp_path)
    assert prov[-1] == "CPUExecutionProvider"
    import onnxruntime as ort
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        (tmp_path / model.stem).mkdir()
        assert O.pick_providers(model, engine_dir=tmp_path) == prov


def test_missing_checkpoint_is_a_typed_error(tmp_path):
    from wanimate.engine.errors import CheckpointError
    with pytest.raises(CheckpointError, match="process_checkpoint"):
        O.OfficialBackend(tmp_path)


def _frames(path):
    with iter_frames(path) as s:
        return [f for f in s]


def test_preprocess_animate_end_to_end(tmp_path, ckpt):
    video = make_video(tmp_path / "v.mp4", 12, black=(0, 5, 6))
    image = make_image(tmp_path / "ref.jpg")
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        r = preprocess(image, video, out, backend="official", ckpt_dir=ckpt, fps=30,
                       resolution_area=(320, 240), progress=False)
    msgs = [str(x.message) for x in w if issubclass(x.category, PreprocessWarning)]
    assert sorted(p.name for p in out.iterdir()) == ["preprocess.json", "src_face.mp4", "src_pose.mp4",
                                                     "src_ref.png"]
    assert (out / "src_ref.png").read_bytes() == image.read_bytes()      # byte copy, as officially
    assert r.backend == "official" and r.n_frames == 12 and r.fps == 30
    # reference 300x400 at an area of 320*240: h = sqrt(76800 / 0.75) = 320, w = 240
    assert r.size == (240, 320)
    pose = probe_video(out / "src_pose.mp4")
    face = probe_video(out / "src_face.mp4")
    assert (pose.width, pose.height) == r.size and (face.width, face.height) == (512, 512)
    assert pose.n_frames == face.n_frames == 12 and abs(pose.fps - 30) < 1e-6
    # black frames have no face: 0 held from frame 1, 5 and 6 interpolated
    assert (r.face_found, r.face_interpolated, r.face_held) == (9, 2, 1)
    assert any("shorter than one 77-frame" in m for m in msgs)
    assert any("face was lost in 3 of 12" in m for m in msgs)
    assert json.loads((out / "preprocess.json").read_text())["n_frames"] == 12
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_preprocess_replace_and_retarget(tmp_path, ckpt):
    video = make_video(tmp_path / "v.mp4", 6, w=400, h=224)
    image = make_image(tmp_path / "ref.png")
    r = preprocess(image, video, tmp_path / "rep", mode="replace", backend="official", ckpt_dir=ckpt,
                   fps=15, resolution_area=(320, 192), progress=False)
    names = sorted(p.name for p in (tmp_path / "rep").iterdir())
    assert names == ["preprocess.json", "src_bg.mp4", "src_face.mp4", "src_mask.mp4", "src_pose.mp4",
                     "src_ref.png"]
    assert r.n_frames == 3 and r.fps == 15 and r.mask_source in ("mediapipe-selfie-segmentation", "pose-region")
    for name in ("src_bg.mp4", "src_mask.mp4", "src_pose.mp4"):
        info = probe_video(tmp_path / "rep" / name)
        assert (info.width, info.height) == r.size and r.size[0] % 16 == 0 and r.size[1] % 16 == 0
    r2 = preprocess(image, video, tmp_path / "ret", retarget=True, backend="official", ckpt_dir=ckpt,
                    resolution_area=(320, 192), progress=False)
    assert r2.retargeted and _frames(tmp_path / "ret" / "src_pose.mp4")[0].max() > 0


def test_several_people_warn(tmp_path):
    ck = make_ckpt(tmp_path / "ck", rows=(PERSON, [460, 120, 620, 560, 0.8, 0]))
    video = make_video(tmp_path / "v.mp4", 3)
    with pytest.warns(PreprocessWarning, match="several people in 3 of 3"):
        r = preprocess(make_image(tmp_path / "r.jpg"), video, tmp_path / "o", backend="official",
                       ckpt_dir=ck, resolution_area=(320, 240), progress=False)
    assert r.multi_person_frames == 3


def test_no_person_is_a_typed_error_and_leaves_nothing(tmp_path):
    ck = make_ckpt(tmp_path / "ck", rows=([10, 10, 50, 50, 0.9, 56],))      # a chair, no person
    video = make_video(tmp_path / "v.mp4", 3)
    with pytest.raises(NoPersonError):
        preprocess(make_image(tmp_path / "r.jpg"), video, tmp_path / "o", backend="official",
                   ckpt_dir=ck, resolution_area=(320, 240), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "r.jpg", "v.mp4"]


def test_bad_arguments(tmp_path, ckpt):
    from wanimate.engine.errors import ValidationError
    video = make_video(tmp_path / "v.mp4", 2)
    image = make_image(tmp_path / "r.jpg")
    with pytest.raises(ValidationError, match="retarget"):
        preprocess(image, video, tmp_path / "o", mode="replace", retarget=True, progress=False)
    with pytest.raises(ValidationError, match="mode"):
        preprocess(image, video, tmp_path / "o", mode="dance", progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(ValidationError, match="not empty"):
        preprocess(image, video, tmp_path / "full", backend="official", ckpt_dir=ckpt, progress=False)
    assert (tmp_path / "full" / "x").read_text() == "keep"
