"""bench/preprocess.py: the stage timer, the ONNX stand-ins (official signatures, a person where
the template puts one), the staged run against preprocess() itself, and the mediapipe packer."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from wanimate.bench import preprocess as bench

REPO = Path(bench.__file__).resolve().parents[1]
IMAGE, VIDEO = REPO / "examples" / "astronaut.jpg", REPO / "examples" / "drive.mp4"


def _has(mod: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(mod) is not None


def _mediapipe_ok() -> bool:
    from wanimate.engine.preprocess.embedded import available
    return available()


def test_stages_time_blocks_and_iterator_waits():
    st = bench.Stages()
    with st("pose"):
        time.sleep(0.05)

    def slow():
        for i in range(3):
            time.sleep(0.02)
            yield i
    from wanimate.engine.preprocess.pipeline import _timed
    got = []
    for x in _timed(st, "decode", slow()):
        got.append(x)
        time.sleep(0.03)            # the consumer's time is not decode time
    assert got == [0, 1, 2]
    assert 0.05 <= st.seconds["pose"] < 0.15
    assert 0.06 <= st.seconds["decode"] < 0.085
    assert st.seconds["encode"] == 0.0


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    if not (_has("onnx") and _has("onnxruntime")):
        pytest.skip("needs onnx and onnxruntime")
    root = tmp_path_factory.mktemp("standins")
    ck = bench.build_standins(root, smoke=True)
    for v in ck.values():
        bench.ensure_weights(v)
    return ck


def test_standins_have_the_official_signatures_and_show_a_person(standins):
    from wanimate.engine.preprocess import official as O
    from wanimate.engine.video import load_image

    img = load_image(IMAGE)
    h, w = img.shape[:2]
    got = {}
    for variant in ("tiny", "vith"):
        be = O.OfficialBackend(standins[variant])       # checks the input signatures
        assert be.det.get_outputs()[0].shape == [1, 300, 6]
        assert be.pose.get_outputs()[0].shape[1:] == [133, 64, 48]
        fp = be([img, img])
        assert all(f.person and f.n_people == 1 for f in fp)
        # the detector's person row, scaled from 640 units to the image
        np.testing.assert_allclose(fp[0].bbox[:4], [int(200 * w / 640), int(100 * h / 640),
                                                     int(440 * w / 640), int(600 * h / 640)], atol=1)
        kp = fp[0].keypoints
        assert np.isfinite(kp).all() and (kp[:, 2] > 0.85).all()
        assert (kp[:, 0] > fp[0].bbox[0] - 60).all() and (kp[:, 0] < fp[0].bbox[2] + 60).all()
        got[variant] = kp
    # the networks only nudge the template: both variants put the skeleton in the same place
    assert np.abs(got["tiny"][:, :2] - got["vith"][:, :2]).max() < 1.0


def test_weights_are_regenerated_when_missing_or_truncated(standins, tmp_path):
    import shutil
    ck = tmp_path / "ck"
    shutil.copytree(standins["vith"], ck)
    files = sorted(ck.rglob("weights.bin"))
    assert len(files) == 2
    ref = [f.read_bytes() for f in files]
    files[0].write_bytes(ref[0][:100])
    files[1].unlink()
    bench.ensure_weights(ck)
    assert [f.read_bytes() for f in files] == ref          # same seed, same bytes
    spec = json.loads((files[1].parent / "weights.json").read_text())
    assert files[1].stat().st_size == spec["bytes"]


def test_make_clip_keeps_the_first_frames(tmp_path):
    from wanimate.engine.video import probe_video
    clip = bench.make_clip(VIDEO, 4, tmp_path / "c.mp4")
    info, src = probe_video(clip), probe_video(VIDEO)
    assert (info.n_frames, info.width, info.height, info.fps) == (4, src.width, src.height, src.fps)
    first = _decoded(VIDEO, 4)
    got = _decoded(clip)
    assert got.shape == first.shape
    # re-encoded at crf 18: close to the source, not identical
    assert 0 < np.abs(got.astype(np.int16) - first).mean() < 3
    assert bench.make_clip(VIDEO, 10 ** 6, tmp_path / "d.mp4") == VIDEO


def _decoded(path: Path, n: int | None = None) -> np.ndarray:
    from wanimate.engine.video import iter_frames
    with iter_frames(path) as s:
        return np.stack([f for _, f in zip(range(n or 10 ** 9), s)])


@pytest.mark.parametrize("mode", ["animate", "replace"])
def test_stage_timer_sees_every_stage_and_changes_nothing(standins, tmp_path, mode):
    """preprocess(timer=...) (what the bench's staged rows run): every stage of the mode gets time,
    the stages fit in the run, and the videos are those of the untimed call."""
    from wanimate.engine.preprocess import preprocess

    clip = bench.make_clip(VIDEO, 5, tmp_path / "clip.mp4")
    st = bench.Stages()
    with pytest.warns(Warning):     # shorter than a segment
        timed = preprocess(IMAGE, clip, tmp_path / "timed", mode=mode, backend="official",
                           ckpt_dir=standins["tiny"], progress=False, timer=st)
    with pytest.warns(Warning):
        plain = preprocess(IMAGE, clip, tmp_path / "plain", mode=mode, backend="official",
                           ckpt_dir=standins["tiny"], progress=False)
    assert timed.n_frames == plain.n_frames == 5
    assert sum(st.seconds.values()) <= timed.seconds
    assert all(st.seconds[s] > 0 for s in ("load", "decode", "pose", "face", "draw", "encode"))
    assert (st.seconds["masks"] > 0) == (mode == "replace")
    for name in ("src_pose.mp4", "src_face.mp4") + (("src_bg.mp4", "src_mask.mp4") if mode == "replace" else ()):
        np.testing.assert_array_equal(_decoded(timed.out_dir / name), _decoded(plain.out_dir / name))


@pytest.mark.slow
def test_bench_smoke_rows(tmp_path):
    if not _has("onnx"):
        pytest.skip("needs onnx for the stand-ins")
    backends = "official-tiny,official-vith" + (",embedded" if _mediapipe_ok() else "")
    out = tmp_path / "p.json"
    res = bench.main(["--smoke", "--backends", backends, "--modes", "animate,replace",
                      "--e2e-backends", "official-tiny", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(res["rows"], default=str))
    rows = res["rows"]
    assert not [r for r in rows if "error" in r], [r for r in rows if "error" in r]
    want = {(b, m) for b in backends.split(",") for m in ("animate", "replace")}
    assert {(r["backend"], r["mode"]) for r in rows if r["what"] == "staged"} == want
    assert sum(r["what"] == "e2e" for r in rows) == 2
    nets = [r for r in rows if r["what"] == "networks"]      # --smoke: toy nets on the CPU
    assert len(nets) == 1 and nets[0]["pose_out_shape"] == [8, 133, 64, 48]
    assert nets[0]["pose_float32_ms_per_frame"] > 0 and nets[0]["gpu_used"] is False
    for r in rows:
        if r in nets:
            continue
        assert r["frames"] == 6 and r["fps"] > 0
        assert r["gpu_used"] == res["env"]["ort_cuda_ep"] or r["backend"] == "embedded"
        if r["what"] == "staged":
            assert 0 <= r["other_s"] < r["seconds"]
    assert all(not r["gpu_used"] for r in rows if r["backend"] == "embedded")


@pytest.mark.slow
def test_packed_mediapipe_imports_and_runs_alone(tmp_path):
    if not _mediapipe_ok():
        pytest.skip("mediapipe 0.10.21 is not installed")
    import importlib.util
    site = Path(importlib.util.find_spec("mediapipe").submodule_search_locations[0]).parent
    info = bench.pack_mediapipe(site, tmp_path / "mp.tar.xz", preset=0)
    with tarfile.open(tmp_path / "mp.tar.xz") as tar:
        names = set(tar.getnames())
    tflite = {n for n in names if n.endswith(".tflite")}
    assert tflite == {f"mediapipe/modules/{m}" for m in bench.MEDIAPIPE_MODELS}
    assert not [n for n in names if n.endswith("_test.py")]
    assert info["files"] == len(names) and info["raw_bytes"] < 60e6
    dest = tmp_path / "site"
    with tarfile.open(tmp_path / "mp.tar.xz") as tar:
        tar.extractall(dest)
    code = ("import sys, mediapipe, numpy as np, cv2\n"
            f"assert mediapipe.__file__.startswith({str(dest)!r}), mediapipe.__file__\n"
            "from wanimate.engine.preprocess.embedded import EmbeddedBackend\n"
            f"img = np.ascontiguousarray(cv2.imread({str(IMAGE)!r})[..., ::-1])\n"
            "b = EmbeddedBackend(segment=True)\n"
            "fp = b([img])[0]\n"
            "print('RESULT', fp.person, int(fp.mask.sum() > 0))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(dest), *sys.path]))
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "RESULT True 1" in p.stdout, p.stdout + p.stderr[-3000:]
