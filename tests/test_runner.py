"""`wanimate run` end to end on the embedded model, and every bad input: a typed error that says
what to change, raised before any model work, with no output file left behind."""
from __future__ import annotations

import json
import shutil

import av
import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from test_video import _bad_video
from wanimate.cli import app
from wanimate.engine.errors import MediaError, ValidationError
from wanimate.engine.pipeline import GenerateOptions
from wanimate.engine.runner import run
from wanimate.engine.video import VideoWriter


def make_src(directory, n=7, h=32, w=48, face_n=None, mode="animate", seed=0):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    with VideoWriter(directory / "src_pose.mp4", fps=30, width=w, height=h) as out:
        out.write(rng.integers(0, 255, (n, h, w, 3), dtype=np.uint8))
    with VideoWriter(directory / "src_face.mp4", fps=30, width=64, height=64) as out:
        out.write(rng.integers(0, 255, (face_n or n, 64, 64, 3), dtype=np.uint8))
    cv2.imwrite(str(directory / "src_ref.png"), rng.integers(0, 255, (40, 30, 3), dtype=np.uint8))
    if mode == "replace":
        with VideoWriter(directory / "src_bg.mp4", fps=30, width=w, height=h) as out:
            out.write(rng.integers(0, 255, (n, h, w, 3), dtype=np.uint8))
        mask = np.zeros((n, h, w, 3), np.uint8)
        mask[:, 8:24, 12:36] = 255
        with VideoWriter(directory / "src_mask.mp4", fps=30, width=w, height=h) as out:
            out.write(mask)
    return directory


FAST = GenerateOptions(steps=1, clip_len=5, seed=5)


@pytest.fixture(scope="module")
def tiny():
    from wanimate.engine.components import embedded_pipeline
    return embedded_pipeline()


def _nothing_written(tmp_path):
    assert not (tmp_path / "out.mp4").exists() and not (tmp_path / "out.json").exists()
    assert not [p.name for p in tmp_path.rglob("*") if "partial" in p.name]


@pytest.mark.parametrize("mode", ["animate", "replace"])
def test_run_writes_decodable_video_and_sidecar(tmp_path, tiny, mode):
    src = make_src(tmp_path / "src", n=7, mode=mode)
    out = tmp_path / "out.mp4"
    report = run(out, GenerateOptions(mode=mode, steps=1, clip_len=5, seed=-1), src=src, pipeline=tiny)
    with av.open(str(out)) as c:
        frames = [f for f in c.decode(video=0)]
    assert len(frames) == 7 and (frames[0].height, frames[0].width) == (32, 48)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["seed"] == report.seed and report.seed >= 0
    assert meta["settings"]["mode"] == mode and meta["settings"]["frames"] == 7
    assert meta["versions"]["torch"] and "timings" in meta
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_sidecar_records_the_quantization(tmp_path):
    """A float run records quant: null; an FP8 run the linears per scheme (the default policy's
    int8_wo_cs exemptions included) and the weight size."""
    from wanimate.engine.components import embedded_pipeline
    from wanimate.quant import QuantConfig, quantize_
    src = make_src(tmp_path / "src")
    pipe = embedded_pipeline()
    run(tmp_path / "f.mp4", FAST, src=src, pipeline=pipe)
    assert json.loads((tmp_path / "f.json").read_text())["settings"]["quant"] is None
    quantize_(pipe.dit, QuantConfig("fp8", kernel="reference"))
    run(tmp_path / "q.mp4", FAST, src=src, pipeline=pipe)
    quant = json.loads((tmp_path / "q.json").read_text())["settings"]["quant"]
    assert quant["linears_per_scheme"]["fp8"] > 0 and quant["linears_per_scheme"]["int8_wo_cs"] > 0
    assert quant["weight_gb"] > 0


def test_same_seed_same_file_content(tmp_path, tiny):
    src = make_src(tmp_path / "src")
    a = run(tmp_path / "a.mp4", FAST, src=src, pipeline=tiny)
    b = run(tmp_path / "b.mp4", FAST, src=src, pipeline=tiny)
    read = lambda p: np.stack([f.to_ndarray(format="rgb24") for f in av.open(str(p)).decode(video=0)])
    assert a.seed == b.seed == 5 and np.array_equal(read(a.output), read(b.output))


def test_size_not_multiple_of_16(tmp_path, tiny):
    src = make_src(tmp_path / "src", h=40, w=48)
    with pytest.raises(ValidationError, match="multiples of 16"):
        run(tmp_path / "out.mp4", FAST, src=src, pipeline=tiny)
    _nothing_written(tmp_path)


def test_pose_and_face_lengths_differ(tmp_path, tiny):
    src = make_src(tmp_path / "src", n=7, face_n=6)
    with pytest.raises(ValidationError, match="7 frames but face video has 6"):
        run(tmp_path / "out.mp4", FAST, src=src, pipeline=tiny)
    _nothing_written(tmp_path)


@pytest.mark.parametrize("kind", ["truncated", "zero_frames", "audio_only", "text", "empty"])
def test_bad_pose_video(tmp_path, tiny, kind):
    src = make_src(tmp_path / "src")
    shutil.copy(_bad_video(kind, tmp_path), src / "src_pose.mp4")
    with pytest.raises(MediaError):
        run(tmp_path / "out.mp4", FAST, src=src, pipeline=tiny)
    _nothing_written(tmp_path)


def test_huge_reference_header(tmp_path, tiny):
    import struct, zlib
    src = make_src(tmp_path / "src")
    ihdr = struct.pack(">IIBBBBB", 50000, 50000, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    (src / "src_ref.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    with pytest.raises(MediaError, match="pixels"):
        run(tmp_path / "out.mp4", FAST, src=src, pipeline=tiny)
    _nothing_written(tmp_path)


def test_missing_files(tmp_path, tiny):
    src = make_src(tmp_path / "src")
    (src / "src_face.mp4").unlink()
    with pytest.raises(MediaError, match="src_face.mp4"):
        run(tmp_path / "out.mp4", FAST, src=src, pipeline=tiny)
    with pytest.raises(MediaError, match="src_bg.mp4"):
        run(tmp_path / "out.mp4", GenerateOptions(mode="replace", steps=1, clip_len=5), src=make_src(tmp_path / "s2"),
            pipeline=tiny)
    with pytest.raises(MediaError, match="does not exist"):
        run(tmp_path / "out.mp4", FAST, image=tmp_path / "no.png", video=tmp_path / "no.mp4", pipeline=tiny)
    _nothing_written(tmp_path)


@pytest.mark.parametrize("output,match", [("out.avi", r"\.mp4"), ("missing/out.mp4", "does not exist")])
def test_bad_output_path(tmp_path, tiny, output, match):
    with pytest.raises(ValidationError, match=match):
        run(tmp_path / output, FAST, src=make_src(tmp_path / "src"), pipeline=tiny)


def test_bad_options_fail_before_reading_inputs(tmp_path):
    """Invalid options are refused before the (non-existent) inputs are even looked at."""
    with pytest.raises(ValidationError, match="4n\\+1"):
        run(tmp_path / "out.mp4", GenerateOptions(clip_len=8), src=tmp_path / "nothing")


def test_cli_errors_are_clean(tmp_path):
    result = CliRunner().invoke(app, ["run", "--src", str(tmp_path / "none"), "-o", str(tmp_path / "o.mp4")])
    assert result.exit_code == 2 and "error:" in result.output and "is not a folder" in result.output
    result = CliRunner().invoke(app, ["run", "--src", str(tmp_path), "-o", str(tmp_path / "o.mp4"), "--size", "100x64"])
    assert result.exit_code == 2
    result = CliRunner().invoke(app, ["run", "--src", str(tmp_path), "-o", str(tmp_path / "o.mp4"), "--refert-num", "3"])
    assert result.exit_code == 2 and "refert_num must be 1 or 5" in result.output


@pytest.mark.slow
def test_cli_embedded_run_on_src(tmp_path):
    src = make_src(tmp_path / "src", n=6)
    result = CliRunner().invoke(app, ["run", "--src", str(src), "-o", str(tmp_path / "o.mp4"), "--clip-len", "5",
                                      "--steps", "1", "--device", "cpu", "--seed", "11"])
    assert result.exit_code == 0, result.output
    assert "random weights" in result.output and (tmp_path / "o.json").exists()
    assert json.loads((tmp_path / "o.json").read_text())["seed"] == 11
