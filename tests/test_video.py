"""engine/video.py: subprocess decoding with limits, crash isolation, atomic outputs, images."""
from __future__ import annotations

import json
import math
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from wanimate.engine.errors import MediaError, ValidationError
from wanimate.engine.video import (MediaLimits, VideoInfo, VideoWriter, cleanup_partials,
                                   frame_indices, iter_frames, load_image, probe_video,
                                   read_video, sidecar_payload, write_json_atomic)

PREPROCESS = Path(__file__).parent / "data" / "preprocess"


# ---------------------------------------------------------------------------------- helpers

def smooth_frames(n: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Moving sinusoids with random frequencies and phases: natural-image-like content."""
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    out = np.empty((n, h, w, 3), np.uint8)
    f = rng.uniform(0.02, 0.08, size=(3, 2))
    ph = rng.uniform(0, 2 * np.pi, size=3)
    for i in range(n):
        for c in range(3):
            v = 128 + 90 * np.sin(f[c, 0] * xx + f[c, 1] * yy + ph[c] + 0.15 * i * (c + 1))
            out[i, ..., c] = v.astype(np.uint8)
    return out


def write(path: Path, frames: np.ndarray, fps: float = 24, **kw) -> Path:
    with VideoWriter(path, fps, frames.shape[2], frames.shape[1], **kw) as w:
        w.write(frames)
    return path


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255.0 ** 2 / mse) if mse > 0 else math.inf


def children() -> list[int]:
    """Live child processes of this process (zombies count: they would be a leak too)."""
    me = str(os.getpid())
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[1] == me:
            out.append(int(d))
    return out


def n_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng()
    frames = smooth_frames(24, 96, 128, rng)
    path = write(tmp_path_factory.mktemp("clip") / "clip.mp4", frames, fps=24, crf=10)
    return path, frames


# ----------------------------------------------------------------------------- round trip

def test_round_trip(clip):
    path, frames = clip
    info = probe_video(path)
    assert isinstance(info, VideoInfo)
    assert (info.width, info.height, info.n_frames, info.codec) == (128, 96, 24, "h264")
    assert info.fps == pytest.approx(24.0) and info.duration_s == pytest.approx(1.0, abs=0.05)
    video = read_video(path)
    assert video.shape == (24, 96, 128, 3) and video.dtype == np.uint8
    assert psnr(video, frames) > 35
    assert psnr(video, frames[::-1]) < 30        # the comparison can fail: order matters
    streamed = np.stack(list(iter_frames(path)))
    assert np.array_equal(streamed, video)


def test_indices_size_and_repeats(clip):
    import cv2
    path, _ = clip
    full = read_video(path)
    idx = [0, 0, 3, 5, 5, 5, 23]
    with iter_frames(path, indices=idx) as s:
        got = list(s)
    assert len(got) == len(idx)
    assert all(np.array_equal(g, full[i]) for g, i in zip(got, idx))
    got[0][:] = 0                                  # repeats are independent copies
    assert np.array_equal(got[1], full[0])
    small = read_video(path, indices=[2, 7], size=(64, 40))
    assert small.shape == (2, 40, 64, 3)
    for k, i in enumerate([2, 7]):
        assert np.array_equal(small[k], cv2.resize(full[i], (64, 40), interpolation=cv2.INTER_AREA))
    assert read_video(path, indices=[]).shape == (0, 96, 128, 3)


@pytest.mark.parametrize("indices", [[3, 1], [-1, 2], [0.5], [True], "abc"])
def test_bad_indices(clip, indices):
    with pytest.raises(ValidationError):
        iter_frames(clip[0], indices=indices)


@pytest.mark.parametrize("size", [(0, 10), (10,), (1.5, 2), (100000, 100000), "64x64"])
def test_bad_size(clip, size):
    with pytest.raises(ValidationError):
        iter_frames(clip[0], size=size)


def test_index_past_the_end(clip):
    with pytest.raises(MediaError, match="frame 24 was requested"):
        list(iter_frames(clip[0], indices=[1, 24]))


def test_vp9_webm(tmp_path):
    import av
    frames = smooth_frames(6, 64, 96, np.random.default_rng())
    with av.open(str(tmp_path / "v.webm"), "w") as c:
        s = c.add_stream("libvpx-vp9", rate=30)
        s.width, s.height, s.pix_fmt = 96, 64, "yuv420p"
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts = i
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    info = probe_video(tmp_path / "v.webm")
    assert info.codec == "vp9" and info.n_frames == 6     # counted by demuxing: webm stores none
    assert read_video(tmp_path / "v.webm").shape == (6, 64, 96, 3)


# ------------------------------------------------------------------------------ the writer

@pytest.mark.parametrize("kwargs", [
    dict(width=65, height=64), dict(width=64, height=0), dict(fps=0), dict(fps=math.nan),
    dict(crf=60), dict(crf=1.5), dict(path="out.avi"), dict(path="missing_dir/out.mp4"),
])
def test_writer_validation(tmp_path, kwargs):
    args = dict(path="out.mp4", fps=24, width=64, height=64)
    args.update(kwargs)
    args["path"] = tmp_path / args["path"]
    with pytest.raises(ValidationError):
        VideoWriter(**args)
    assert not list(tmp_path.glob(".*.partial"))


def test_writer_bad_frames(tmp_path):
    with VideoWriter(tmp_path / "o.mp4", 24, 64, 48) as w:
        for bad in (np.zeros((48, 64, 3), np.float32), np.zeros((48, 64), np.uint8),
                    np.zeros((2, 64, 48, 3), np.uint8)):
            with pytest.raises(ValidationError):
                w.write(bad)
        w.write(np.zeros((48, 64, 3), np.uint8))
    assert probe_video(tmp_path / "o.mp4").n_frames == 1
    with pytest.raises(ValidationError):
        with VideoWriter(tmp_path / "empty.mp4", 24, 64, 48):
            pass
    assert not (tmp_path / "empty.mp4").exists() and not list(tmp_path.glob(".*.partial"))


def test_atomic_write_exception(tmp_path):
    frames = smooth_frames(80, 48, 64, np.random.default_rng())
    final = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError, match="boom"):
        with VideoWriter(final, 24, 64, 48) as w:
            w.write(frames)              # past x264's lookahead: packets reach the file
            partial = list(tmp_path.glob(".out.mp4.*.partial"))
            assert len(partial) == 1 and partial[0].stat().st_size > 0
            assert not final.exists()
            assert not final.exists()
            raise RuntimeError("boom")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


_KILLED_WRITER = r"""
import sys, time, numpy as np
from wanimate.engine.video import VideoWriter
w = VideoWriter(sys.argv[1], 24, 64, 48)
for i in range(100000):
    w.write(np.full((48, 64, 3), i % 255, np.uint8))
    if i == 100:  # past x264's lookahead, so packets have reached the partial file
        print("writing", flush=True)
    time.sleep(0.005)
"""


def test_atomic_write_killed(tmp_path):
    """kill -9 mid-write: the final name keeps the previous complete file, the partial is left
    for cleanup_partials, and the next write works."""
    final, fresh = tmp_path / "out.mp4", tmp_path / "fresh.mp4"
    old = smooth_frames(3, 48, 64, np.random.default_rng())
    write(final, old)
    before = final.read_bytes()
    for target in (final, fresh):
        proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target)],
                                stdout=subprocess.PIPE, text=True, env=dict(os.environ))
        assert proc.stdout.readline().strip() == "writing"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stdout.close()
    assert not fresh.exists()                              # never a half file under the name
    assert final.read_bytes() == before                    # untouched, still plays
    assert probe_video(final).n_frames == 3
    partials = sorted(tmp_path.glob(".*.partial"))
    assert len(partials) == 2 and all(p.stat().st_size > 0 for p in partials)
    (tmp_path / "user.partial").write_text("not ours")     # only our pattern is removed
    assert sorted(cleanup_partials(tmp_path)) == partials
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4", "user.partial"]
    write(final, old[:2])
    assert probe_video(final).n_frames == 2 and not list(tmp_path.glob(".*.partial"))


def test_cleanup_partials_min_age(tmp_path):
    p = tmp_path / ".x.mp4.abc.partial"
    p.write_bytes(b"x")
    assert cleanup_partials(tmp_path, min_age_s=3600) == [] and p.exists()
    os.utime(p, (time.time() - 7200, time.time() - 7200))
    assert cleanup_partials(tmp_path, min_age_s=3600) == [p] and not p.exists()
    with pytest.raises(ValidationError):
        cleanup_partials(tmp_path / "nope")


@dataclass(frozen=True)
class _Settings:
    steps: int
    size: tuple


def test_json_and_sidecar(tmp_path):
    payload = sidecar_payload(2**62 + 5, {"cfg": _Settings(20, (1280, 720)), "out": tmp_path,
                                          "g": np.float32(1.5)}, "ab" * 32)
    path = write_json_atomic(tmp_path / "out.json", payload)
    back = json.loads(path.read_text())
    assert back["seed"] == 2**62 + 5 and back["manifest_hash"] == "ab" * 32
    assert back["settings"] == {"cfg": {"steps": 20, "size": [1280, 720]}, "out": str(tmp_path),
                                "g": 1.5}
    assert set(back["versions"]) >= {"python", "torch", "numpy", "av", "wanimate"}
    assert all(back["versions"][k] for k in ("python", "torch", "numpy", "av", "wanimate"))
    assert back["device"] and back["created_utc"].endswith("+00:00")
    write_json_atomic(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 2}
    with pytest.raises(ValidationError):
        write_json_atomic(path, {"bad": math.nan})
    with pytest.raises(ValidationError):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    for seed in (-1, 2**63, 1.0, True, "7"):
        with pytest.raises(ValidationError):
            sidecar_payload(seed, {}, None)


# ---------------------------------------------------------------------------- bad inputs

def _mux(path: Path, codec: str, frames: np.ndarray, **open_kw) -> Path:
    import av
    with av.open(str(path), "w", **open_kw) as c:
        s = c.add_stream(codec, rate=30)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        if codec == "libx264":
            s.options = {"preset": "ultrafast"}
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts = i
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


def _audio_only(path: Path) -> Path:
    import av
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=44100)
        for i in range(8):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            f.sample_rate, f.pts = 44100, i * 1024
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


def _zero_frames(path: Path) -> Path:
    """A Matroska file with an H.264 video track that holds no frame (and some audio)."""
    import av
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=30)
        v.width, v.height, v.pix_fmt = 64, 64, "yuv420p"
        a = c.add_stream("aac", rate=44100)
        for i in range(4):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            f.sample_rate, f.pts = 44100, i * 1024
            for p in a.encode(f):
                c.mux(p)
        for p in a.encode(None):
            c.mux(p)
    return path


def _bad_video(kind: str, tmp: Path) -> Path:
    frames = smooth_frames(8, 48, 64, np.random.default_rng())
    if kind == "missing":
        return tmp / "nope.mp4"
    if kind == "empty":
        (tmp / "e.mp4").write_bytes(b"")
        return tmp / "e.mp4"
    if kind == "text":
        (tmp / "t.mp4").write_text("this is not a video\n" * 20)
        return tmp / "t.mp4"
    if kind == "truncated":          # moov at the end: cut before it
        data = write(tmp / "full.mp4", frames).read_bytes()
        (tmp / "cut.mp4").write_bytes(data[: len(data) // 3])
        return tmp / "cut.mp4"
    if kind == "truncated_first_frame":   # faststart: header complete, data cut inside frame 0
        data = _mux(tmp / "fs.mp4", "libx264", frames, options={"movflags": "faststart"}).read_bytes()
        (tmp / "fs_cut.mp4").write_bytes(data[: data.find(b"mdat") + 64])
        return tmp / "fs_cut.mp4"
    if kind == "zero_frames":
        return _zero_frames(tmp / "z.mkv")
    if kind == "audio_only":
        return _audio_only(tmp / "a.mp4")
    if kind == "gif":
        from PIL import Image
        ims = [Image.fromarray(f) for f in frames]
        ims[0].save(tmp / "a.gif", save_all=True, append_images=ims[1:])
        return tmp / "a.gif"
    if kind == "ffv1":
        return _mux(tmp / "f.mkv", "ffv1", frames)
    if kind == "directory":
        return tmp
    raise AssertionError(kind)


BAD_VIDEOS = {
    "missing": "not found", "empty": "empty", "text": "corrupt", "truncated": "corrupt",
    "truncated_first_frame": "corrupt", "zero_frames": "no frames", "audio_only": "audio-only",
    "gif": "container 'gif' is not accepted", "ffv1": "codec 'ffv1' is not accepted",
    "directory": "not a regular file",
}


@pytest.mark.parametrize("kind", sorted(BAD_VIDEOS))
def test_bad_video(tmp_path, kind):
    path = _bad_video(kind, tmp_path)
    with pytest.raises(MediaError, match=BAD_VIDEOS[kind]):
        list(iter_frames(path))
    assert children() == []


def test_bad_limits_type():
    with pytest.raises(ValidationError):
        MediaLimits(max_pixels=0)
    with pytest.raises(ValidationError):
        MediaLimits(timeout_s=math.inf)


# ---------------------------------------------------------------------- limits and isolation

@pytest.mark.parametrize("limits,match", [
    (MediaLimits(max_pixels=64 * 64), "above the limit of 4096 pixels"),
    (MediaLimits(max_frames=10), "24 frames are above the limit of 10"),
    (MediaLimits(max_duration_s=0.5), "above the limit of 0.5 s"),
    (MediaLimits(max_fps=20.0), "24 fps is above the limit of 20"),
    (MediaLimits(max_file_bytes=100), "above the limit of 100"),
    (MediaLimits(codecs=("hevc",)), "codec 'h264' is not accepted"),
])
def test_limits_enforced_before_decoding(clip, limits, match):
    # The injected fault would crash the child as soon as it started decoding; getting the limit
    # error instead proves the probe was refused before a single frame was decoded.
    with pytest.raises(MediaError, match=match):
        iter_frames(clip[0], limits, _fault="decode:segv")
    with pytest.raises(MediaError, match=match):
        read_video(clip[0], limits)
    with pytest.raises(MediaError, match="crashed"):
        list(iter_frames(clip[0], MediaLimits(), _fault="decode:segv"))


def test_oversized_video_rejected_from_header(tmp_path):
    """An 8K video is refused from its header; the parent never holds a frame of it."""
    frames = np.zeros((2, 4352, 7744, 3), np.uint8)   # 33.7 Mpx, above the 3840x2160 default
    path = _mux(tmp_path / "8k.mp4", "libx264", frames)
    del frames
    base = rss_bytes()
    with pytest.raises(MediaError, match="7744x4352 frames are above the limit"):
        iter_frames(path, _fault="decode:segv")
    assert rss_bytes() - base < 16 << 20


@pytest.mark.parametrize("fault,match", [
    ("start:segv", "crashed \\(SIGSEGV\\)"),
    ("probe:segv", "crashed \\(SIGSEGV\\)"),
    ("frame:segv", "crashed \\(SIGSEGV\\)"),
    ("decode:garbage", "broke its protocol"),
    ("start:oom", "memory limit"),
])
def test_decoder_crash_is_isolated(clip, fault, match):
    path, frames = clip
    fds = n_fds()
    with pytest.raises(MediaError, match=match):
        list(iter_frames(path, _fault=fault))
    assert children() == [] and n_fds() == fds
    assert psnr(read_video(path), frames) > 35       # the next call just works
    assert children() == [] and n_fds() == fds


def test_probe_crash_is_isolated(clip):
    with pytest.raises(MediaError, match="SIGSEGV"):
        probe_video(clip[0], _fault="probe:segv")
    assert probe_video(clip[0]).n_frames == 24 and children() == []


def test_decoder_hang_times_out(clip):
    t0 = time.monotonic()
    with pytest.raises(MediaError, match="timed out after 1.5 s"):
        list(iter_frames(clip[0], MediaLimits(timeout_s=1.5), _fault="decode:hang"))
    assert time.monotonic() - t0 < 10
    assert children() == []


_ORPHAN = r"""
import sys, time
from wanimate.engine.video import iter_frames
s = iter_frames(sys.argv[1], _fault="decode:hang")
print(s._worker.proc.pid, flush=True)
time.sleep(60)
"""


def test_decoder_dies_with_its_parent(clip):
    proc = subprocess.Popen([sys.executable, "-c", _ORPHAN, str(clip[0])], stdout=subprocess.PIPE,
                            text=True)
    child = int(proc.stdout.readline())
    assert Path(f"/proc/{child}").exists()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdout.close()
    def alive() -> bool:  # a zombie awaiting a reaper (pid 1 in a container) is dead
        try:
            return Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 5
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive()


def test_early_close_and_gc_leave_nothing(clip):
    path, _ = clip
    fds = n_fds()
    for _ in range(3):
        with iter_frames(path) as s:
            next(s)
        s2 = iter_frames(path)
        next(s2)
        del s2                            # garbage collection ends the child as well
    probe_video(path)
    assert children() == [] and n_fds() == fds


def test_bounded_parent_memory(tmp_path):
    """600 frames of 1280x720 (1.66 GB decoded) stream through the parent in O(one frame)."""
    rng = np.random.default_rng()
    h, w, n = 720, 1280, 600
    tex = smooth_frames(1, h, 2 * w, rng)[0]
    with VideoWriter(tmp_path / "long.mp4", 30, w, h, crf=40, preset="ultrafast") as wr:
        for i in range(n):
            off = (i * 9) % w
            wr.write(tex[:, off: off + w])
    del tex
    peak = base = rss_bytes()
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss_bytes())
            time.sleep(0.01)

    t = threading.Thread(target=sample)
    t.start()
    count, checksum = 0, 0
    try:
        with iter_frames(tmp_path / "long.mp4") as stream:
            for frame in stream:
                count += 1
                checksum += int(frame[::64, ::64].sum())
            child_peak = stream.stats["child_peak_rss_bytes"]
    finally:
        stop.set()
        t.join()
    decoded = n * h * w * 3
    assert count == n and checksum > 0
    assert peak - base < 48 << 20, f"parent RSS grew {(peak - base) / 2**20:.0f} MiB"
    assert peak - base < decoded / 30
    assert 0 < child_peak < 1 << 30


# -------------------------------------------------------------------------------- images

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def forged_png(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose IHDR declares width x height (the pixel data is a few bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
                     + _png_chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("w,h", [(50000, 50000), (8000, 8000)])
def test_forged_png_header(tmp_path, w, h):
    path = forged_png(tmp_path / "bomb.png", w, h)
    assert path.stat().st_size < 200
    base = rss_bytes()
    with pytest.raises(MediaError, match="enormous|above the limit"):
        load_image(path)
    assert rss_bytes() - base < 16 << 20
    # a raised limit lets the 8000x8000 header through to decoding, where its data is too short
    if w == 8000:
        with pytest.raises(MediaError, match="corrupt or truncated"):
            load_image(path, MediaLimits(max_image_pixels=70_000_000))


def test_image_formats_and_modes(tmp_path):
    from PIL import Image
    rng = np.random.default_rng()
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    assert np.array_equal(load_image(tmp_path / "a.png"), rgb)
    rgba = np.concatenate([rgb, rng.integers(0, 256, (37, 53, 1), dtype=np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(load_image(tmp_path / "rgba.png"), rgb)          # alpha dropped
    Image.fromarray(rgb).save(tmp_path / "a.webp", lossless=True)
    assert np.array_equal(load_image(tmp_path / "a.webp"), rgb)
    g16 = rng.integers(0, 65536, (20, 30), dtype=np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    got = load_image(tmp_path / "g16.png")
    assert got.shape == (20, 30, 3) and np.array_equal(got[..., 1], (g16 >> 8).astype(np.uint8))
    Image.fromarray(rgb[..., 0]).convert("P").save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").shape == (37, 53, 3)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    cmyk = load_image(tmp_path / "cmyk.jpg")
    assert cmyk.shape == (37, 53, 3) and psnr(cmyk, rgb) > 25
    # EXIF orientation 6 (rotate 90 cw): cv2.imread applies it, so do we
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    assert load_image(tmp_path / "rot.jpg").shape == (53, 37, 3)


@pytest.mark.parametrize("kind,match", [
    ("gif", "not a PNG, JPEG or WEBP"), ("bmp", "not a PNG, JPEG or WEBP"),
    ("text", "not a PNG, JPEG or WEBP"), ("truncated", "corrupt or truncated"),
    ("missing", "not found"), ("empty", "empty"),
])
def test_bad_image(tmp_path, kind, match):
    from PIL import Image
    rgb = np.random.default_rng().integers(0, 256, (64, 64, 3), dtype=np.uint8)
    p = tmp_path / f"x.{kind}"
    if kind in ("gif", "bmp"):
        Image.fromarray(rgb).save(p, format=kind.upper())
    elif kind == "text":
        p.write_text("hello")
    elif kind == "truncated":
        Image.fromarray(rgb).save(tmp_path / "full.png")
        p.write_bytes((tmp_path / "full.png").read_bytes()[:300])
    elif kind == "empty":
        p.write_bytes(b"")
    with pytest.raises(MediaError, match=match):
        load_image(p)


# -------------------------------------------------------------------------- frame indices

def test_frame_indices_fixture():
    meta = json.loads((PREPROCESS / "frame_indices.json").read_text())
    d = np.load(PREPROCESS / "frame_indices.npz")
    off = d["out_offsets"]
    n_cases = len(d["in_frame_num"])
    assert n_cases == len(meta["args"]["labels"]) == len(off) - 1
    for i in range(n_cases):
        got = frame_indices(int(d["in_frame_num"][i]), float(d["in_video_fps"][i]),
                            float(d["in_fps"][i]), float(d["in_last_ts"][i, 1]))
        want = d["out_indices"][off[i]:off[i + 1]].tolist()
        assert got == want, meta["args"]["labels"][i]
        assert len(got) == int(d["mid_target_num"][i])


def test_frame_indices_rules():
    assert frame_indices(90, 30, 30) == list(range(90))
    assert frame_indices(120, 60, 30) == list(range(0, 120, 2))
    assert frame_indices(100, 30, -1, duration_s=4.0)[-1] == 119           # official: past the end
    assert max(frame_indices(100, 30, -1, duration_s=4.0, clamp=True)) == 99
    assert frame_indices(1, 30, 15) == []
    for bad in [(0, 30, 30), (10, 0, 30), (10, 30, 0), (10, 30, -2), (10, math.nan, 30),
                (10, 30, 30, -1.0), (True, 30, 30), (2.5, 30, 30)]:
        with pytest.raises(ValidationError):
            frame_indices(*bad)


def test_prefix_decodes_of_a_real_video_never_hang():
    """Asking the decoder child for only the first frames stops a frame-threaded decode early; the
    child then leaves without tearing FFmpeg's threads down (that teardown deadlocked in about 1 of
    25 prefix decodes). 30 prefix decodes of the example video, each bounded by a short timeout."""
    video = Path(__file__).resolve().parents[1] / "examples" / "drive.mp4"
    limits = MediaLimits(timeout_s=20.0)
    for i in range(30):
        frames = list(iter_frames(video, limits, indices=range(2 + i % 5)))
        assert len(frames) == 2 + i % 5 and frames[0].ndim == 3
