"""Media I/O a server can trust: probe and decode in a child process, atomic outputs.

Decoding (reliability notes §2c): every probe and decode of a video runs in a fresh child
process (engine/_media_worker.py under `python -I`) with an address-space and CPU-time rlimit and
a wall-clock budget. A native decoder crash, hang or memory blow-up ends only that child and
surfaces here as MediaError; the next call starts a new child. The stream header is checked
against MediaLimits (pixels, frames, duration, fps, codec, container) before a single frame is
decoded, and frames come back one at a time over a pipe whose small buffer is the back-pressure:
the parent holds O(one frame) however long the video is.

Images are parsed in-process by Pillow restricted to PNG/JPEG/WEBP, with the declared size checked
from the header before any pixel is decoded.

Outputs (§2d): VideoWriter and write_json_atomic write `<dir>/.<name>.<rand>.partial`, fsync it,
os.replace it onto the final name and fsync the directory, so the final name only ever holds a
complete file; cleanup_partials removes what a killed writer left behind.
"""
from __future__ import annotations

import dataclasses
import datetime
import fractions
import json
import math
import os
import platform
import secrets
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .errors import MediaError, ValidationError

__all__ = ["VideoInfo", "MediaLimits", "FrameStream", "probe_video", "iter_frames", "read_video",
           "load_image", "frame_indices", "check_limits", "VideoWriter", "write_json_atomic",
           "sidecar_payload", "cleanup_partials"]

_WORKER = Path(__file__).with_name("_media_worker.py")

# Container names as FFmpeg reports them (`container.format.name`).
DEFAULT_CONTAINERS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm")
DEFAULT_CODECS = ("h264", "hevc", "vp8", "vp9", "av1", "libdav1d", "mpeg4")


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: float
    n_frames: int
    duration_s: float
    codec: str
    container: str = ""


@dataclass(frozen=True)
class MediaLimits:
    max_pixels: int = 3840 * 2160           # per video frame
    max_frames: int = 36000                 # 20 min at 30 fps
    max_duration_s: float = 1200.0
    timeout_s: float = 600.0                # wall-clock time spent waiting on the decoder
    max_image_pixels: int = 50_000_000
    max_file_bytes: int = 4 << 30
    max_fps: float = 240.0
    max_decoder_bytes: int = 4 << 30        # address-space rlimit of the decoder child
    containers: tuple[str, ...] = DEFAULT_CONTAINERS
    codecs: tuple[str, ...] = DEFAULT_CODECS

    def __post_init__(self):
        for name in ("max_pixels", "max_frames", "max_image_pixels", "max_file_bytes",
                     "max_decoder_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValidationError(f"MediaLimits.{name} must be a positive int, got {v!r}")
        for name in ("max_duration_s", "timeout_s", "max_fps"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValidationError(f"MediaLimits.{name} must be a positive finite number, got {v!r}")


# ----------------------------------------------------------------------------------- decoding

class _Worker:
    """One decoder child process and the read side of its pipe."""

    def __init__(self, request: dict, limits: MediaLimits):
        self.limits = limits
        self.waited = 0.0
        self.stderr = tempfile.TemporaryFile()
        cpu_s = int(limits.timeout_s * max(1, min(os.cpu_count() or 1, 8))) + 10
        request = dict(request, rlimit_as_bytes=limits.max_decoder_bytes, rlimit_cpu_s=cpu_s,
                       max_frames=limits.max_frames, io_timeout_s=min(limits.timeout_s, 60.0))
        env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "LC_ALL": "C", "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
               "WANIMATE_DECODER_PARENT": str(os.getpid())}
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", str(_WORKER)], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=self.stderr, close_fds=True, env=env,
                start_new_session=True)  # terminal signals to our group do not reach it
        except OSError as e:
            self.stderr.close()
            raise MediaError(f"cannot start the decoder process: {e}") from None
        self.fd = self.proc.stdout.fileno()
        try:  # a 1 MiB pipe (the Linux default cap) cuts syscalls 16x; still O(one frame) held
            import fcntl
            fcntl.fcntl(self.fd, 1031, 1 << 20)  # F_SETPIPE_SZ
        except OSError:
            pass
        self.send((json.dumps(request) + "\n").encode())

    def send(self, data: bytes) -> None:
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the child is gone; the next read reports why

    def read_into(self, buf: memoryview, what: str) -> None:
        """Fill buf from the pipe, charging the wait to the wall-clock budget."""
        got, n = 0, len(buf)
        while got < n:
            remaining = self.limits.timeout_s - self.waited
            t0 = time.monotonic()
            ready, _, _ = select.select([self.fd], [], [], max(0.0, remaining))
            if ready:
                k = os.readv(self.fd, [buf[got:]])
            self.waited += time.monotonic() - t0
            if not ready:
                self.close()
                raise MediaError(
                    f"decoding timed out after {self.limits.timeout_s:g} s while reading {what}; "
                    "the file may be malformed or too long: shorten it or raise MediaLimits.timeout_s")
            if k == 0:
                raise self.died(what)
            got += k

    def read_bytes(self, n: int, what: str) -> bytes:
        buf = bytearray(n)
        self.read_into(memoryview(buf), what)
        return bytes(buf)

    def read_message(self) -> tuple[bytes, object]:
        tag = self.read_bytes(1, "a message")
        if tag in (b"I", b"E", b"X"):
            (length,) = struct.unpack("<I", self.read_bytes(4, "a message length"))
            if length > 1 << 20:
                raise self.protocol(f"oversized message ({length} bytes)")
            try:
                return tag, json.loads(self.read_bytes(length, "a message"))
            except ValueError:
                raise self.protocol("unreadable message") from None
        if tag == b"F":
            return tag, struct.unpack("<qii", self.read_bytes(16, "a frame header"))
        raise self.protocol(f"unknown message tag {tag!r}")

    def protocol(self, what: str) -> MediaError:
        self.close()
        return MediaError(f"the decoder process broke its protocol ({what}); the file is probably "
                          "corrupt: re-encode it (e.g. ffmpeg -i in.mp4 -c:v libx264 out.mp4)")

    def died(self, what: str) -> MediaError:
        try:
            rc = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            rc = None
        tail = self.stderr_tail()
        self.close()
        if rc is not None and rc < 0:
            sig = -rc
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
            if sig == signal.SIGXCPU:
                cause = "exceeded its CPU-time limit"
            elif sig == signal.SIGKILL:
                cause = "was killed (memory or time limit)"
            else:
                cause = f"crashed ({name})"
            msg = (f"the video decoder {cause} while reading {what}; the file is probably corrupt or "
                   "hostile: re-encode it (e.g. ffmpeg -i in.mp4 -c:v libx264 out.mp4)")
        else:
            msg = f"the video decoder exited unexpectedly (status {rc}) while reading {what}"
        if tail:
            msg += f" [decoder log: {tail}]"
        return MediaError(msg)

    def stderr_tail(self, n: int = 400) -> str:
        try:
            self.stderr.seek(0, os.SEEK_END)
            size = self.stderr.tell()
            self.stderr.seek(max(0, size - n))
            return self.stderr.read().decode(errors="replace").strip().replace("\n", " | ")
        except (OSError, ValueError):
            return ""

    def close(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self.stderr.close()
        self.proc = None


def _check_path(path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise ValidationError(f"media path must be a str or os.PathLike, got {type(path).__name__}")
    p = Path(path)
    if not p.exists():
        raise MediaError(f"{p}: file not found; check the path")
    if not p.is_file():
        raise MediaError(f"{p}: not a regular file; pass a video or image file")
    return p


def _check_file_size(p: Path, limits: MediaLimits) -> None:
    size = p.stat().st_size
    if size == 0:
        raise MediaError(f"{p}: the file is empty; re-export it")
    if size > limits.max_file_bytes:
        raise MediaError(f"{p}: {size} bytes is above the limit of {limits.max_file_bytes}; "
                         "re-encode at a lower bitrate or raise MediaLimits.max_file_bytes")


_REFUSAL_HINTS = {
    "missing": "check the path",
    "corrupt": "the file is corrupt, truncated or not a video: re-export or re-encode it "
               "(e.g. ffmpeg -i in.mp4 -c:v libx264 out.mp4)",
    "audio_only": "this is an audio-only file: pass a video with a picture track",
    "no_video": "the file has no video stream: pass a video",
    "too_many_frames": "the stream holds more frames than its header says: shorten or re-encode "
                       "the video, or raise MediaLimits.max_frames",
    "memory": "the decoder hit its memory limit: downscale the video or raise "
              "MediaLimits.max_decoder_bytes",
}


def _refusal(p: Path, payload: dict) -> MediaError:
    kind = str(payload.get("kind", "corrupt"))
    hint = _REFUSAL_HINTS.get(kind, _REFUSAL_HINTS["corrupt"])
    return MediaError(f"{p}: {payload.get('message', 'decoder failure')}; {hint}")


def _info_from(p: Path, payload: dict) -> VideoInfo:
    try:
        return VideoInfo(width=int(payload["width"]), height=int(payload["height"]),
                         fps=float(payload["fps"]), n_frames=int(payload["n_frames"]),
                         duration_s=float(payload["duration_s"]), codec=str(payload["codec"]),
                         container=str(payload.get("container", "")))
    except (KeyError, TypeError, ValueError):
        raise MediaError(f"{p}: the decoder returned malformed stream information; "
                         "re-encode the file") from None


def check_limits(p, info: VideoInfo, limits: MediaLimits) -> None:
    """Refuse a probed video that is over a limit, before anything is decoded."""
    if info.container not in limits.containers:
        raise MediaError(f"{p}: container '{info.container}' is not accepted; use MP4/MOV/MKV/WebM "
                         "(e.g. ffmpeg -i in -c:v libx264 out.mp4)")
    if info.codec not in limits.codecs:
        raise MediaError(f"{p}: video codec '{info.codec}' is not accepted (allowed: "
                         f"{', '.join(limits.codecs)}); re-encode with H.264 (libx264)")
    if info.width <= 0 or info.height <= 0:
        raise MediaError(f"{p}: the stream declares a {info.width}x{info.height} picture; "
                         "the file is corrupt, re-encode it")
    if info.n_frames <= 0:
        raise MediaError(f"{p}: the video has no frames; pass a video with at least one frame")
    if info.width * info.height > limits.max_pixels:
        raise MediaError(f"{p}: {info.width}x{info.height} frames are above the limit of "
                         f"{limits.max_pixels} pixels; downscale the video (e.g. to 1280x720) or "
                         "raise MediaLimits.max_pixels")
    if info.n_frames > limits.max_frames:
        raise MediaError(f"{p}: {info.n_frames} frames are above the limit of {limits.max_frames}; "
                         "trim the video or raise MediaLimits.max_frames")
    if not math.isfinite(info.duration_s) or info.duration_s > limits.max_duration_s:
        raise MediaError(f"{p}: a duration of {info.duration_s:.1f} s is above the limit of "
                         f"{limits.max_duration_s:g} s; trim the video or raise "
                         "MediaLimits.max_duration_s")
    if not math.isfinite(info.fps) or info.fps <= 0:
        raise MediaError(f"{p}: the stream declares no usable frame rate ({info.fps}); "
                         "re-encode it with a fixed rate (ffmpeg -r 30)")
    if info.fps > limits.max_fps:
        raise MediaError(f"{p}: {info.fps:g} fps is above the limit of {limits.max_fps:g}; "
                         "re-encode at a lower frame rate or raise MediaLimits.max_fps")


def _start(p: Path, op: str, limits: MediaLimits, extra: dict, fault: str | None):
    if not isinstance(limits, MediaLimits):
        raise ValidationError(f"limits must be a MediaLimits, got {type(limits).__name__}")
    _check_file_size(p, limits)
    worker = _Worker(dict(extra, op=op, path=str(p.resolve()), fault=fault), limits)
    try:
        tag, payload = worker.read_message()
        if tag == b"X":
            raise _refusal(p, payload)
        if tag != b"I":
            raise worker.protocol("expected stream information first")
        info = _info_from(p, payload)
        check_limits(p, info, limits)
    except BaseException:
        worker.close()
        raise
    return worker, info


def probe_video(path, limits: MediaLimits = MediaLimits(), *, _fault: str | None = None) -> VideoInfo:
    """Stream metadata (no frame is decoded), read in a child process; over-limit files raise."""
    p = _check_path(path)
    worker, info = _start(p, "probe", limits, {}, _fault)
    worker.close()
    return info


def _check_indices(indices) -> list[int] | None:
    if indices is None:
        return None
    out = []
    for i in indices:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise ValidationError(f"frame indices must be ints, got {i!r}")
        i = int(i)
        if i < 0:
            raise ValidationError(f"frame indices must be >= 0, got {i}")
        if out and i < out[-1]:
            raise ValidationError("frame indices must be sorted (non-decreasing); sort them first")
        out.append(i)
    return out


def _check_size(size, limits: MediaLimits):
    if size is None:
        return None
    try:
        w, h = size
    except (TypeError, ValueError):
        raise ValidationError(f"size must be (width, height), got {size!r}") from None
    for v in (w, h):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValidationError(f"size must be two positive ints (width, height), got {size!r}")
    if int(w) * int(h) > limits.max_pixels:
        raise ValidationError(f"output size {w}x{h} is above MediaLimits.max_pixels")
    return int(w), int(h)


class FrameStream:
    """Iterator over decoded RGB uint8 frames [H, W, 3]; the decoder child lives as long as it.

    Use as a context manager (or call close()) when stopping early, so the child is ended at once
    rather than at garbage collection. `info` is the probe; `stats` is filled at the end of the
    stream with the child's peak RSS.
    """

    def __init__(self, path, limits: MediaLimits = MediaLimits(), indices=None, size=None,
                 *, _fault: str | None = None):
        p = _check_path(path)
        self.path = p
        self._want = _check_indices(indices)
        self._size = _check_size(size, limits)
        unique = None if self._want is None else sorted(set(self._want))
        self.stats: dict = {}
        self._worker = None
        self._repeat: list[np.ndarray] = []
        if self._want is not None and not self._want:
            self.info = probe_video(p, limits, _fault=_fault)
            return
        self._worker, self.info = _start(
            p, "decode", limits, {"indices": unique, "size": self._size}, _fault)
        self._out_hw = ((self._size[1], self._size[0]) if self._size is not None
                        else (self.info.height, self.info.width))
        self._pos = 0          # next position in self._want
        self._next_index = 0   # next frame index the child may send (all-frames mode)
        self._worker.send(b"go\n")

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        if self._repeat:
            return self._repeat.pop()
        w = self._worker
        if w is None:
            raise StopIteration
        try:
            tag, payload = w.read_message()
            if tag == b"F":
                return self._frame(*payload)
            if tag == b"E":
                self._end(payload)
            elif tag == b"X":
                raise _refusal(self.path, payload)
            else:
                raise w.protocol("unexpected message")
        except BaseException:
            self.close()
            raise
        self.close()
        raise StopIteration

    def _frame(self, index: int, h: int, w: int) -> np.ndarray:
        if (h, w) != self._out_hw:
            raise self._worker.protocol(f"frame of {w}x{h}, expected {self._out_hw[1]}x{self._out_hw[0]}")
        if self._want is None:
            if index != self._next_index:
                raise self._worker.protocol(f"frame {index} out of order")
            self._next_index += 1
            count = 1
        else:
            if self._pos >= len(self._want) or index != self._want[self._pos]:
                raise self._worker.protocol(f"frame {index} was not requested")
            count = 0
            while self._pos < len(self._want) and self._want[self._pos] == index:
                self._pos += 1
                count += 1
        frame = np.empty((h, w, 3), dtype=np.uint8)
        self._worker.read_into(memoryview(frame).cast("B"), f"frame {index}")
        # Repeated indices (fps upsampling) yield independent copies: a consumer may edit in place.
        self._repeat = [frame.copy() for _ in range(count - 1)]
        return frame

    def _end(self, payload: dict) -> None:
        self.stats = {"decoded_frames": int(payload.get("decoded", 0)),
                      "child_peak_rss_bytes": int(payload.get("peak_rss_bytes", 0)),
                      "decode_wait_s": self._worker.waited}
        if self.stats["decoded_frames"] == 0:
            raise MediaError(f"{self.path}: no frame could be decoded although the header declares "
                             f"{self.info.n_frames}; the file is corrupt: re-encode it")
        if self._want is not None and self._pos < len(self._want):
            missing = self._want[self._pos]
            raise MediaError(f"{self.path}: frame {missing} was requested but the video decoded only "
                             f"{self.stats['decoded_frames']} frames (the header claims "
                             f"{self.info.n_frames}); request indices below the real frame count")

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None
        self._repeat = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def iter_frames(path, limits: MediaLimits = MediaLimits(), indices: Sequence[int] | None = None,
                size: tuple[int, int] | None = None, *, _fault: str | None = None) -> FrameStream:
    """Stream RGB uint8 [H, W, 3] frames decoded in a child process.

    indices: non-decreasing frame indices to keep (a repeated index yields the frame again, as
    fps upsampling needs); others are decoded but never converted or sent. size: (W, H) to resize
    each kept frame with cv2.INTER_AREA in the child. The probe is checked against `limits` before
    this returns, so an over-limit file raises here, before any frame is decoded.
    `_fault` is a test-only failure injection ("start:segv", "frame:segv", "decode:hang", ...).
    """
    return FrameStream(path, limits, indices, size, _fault=_fault)


def read_video(path, limits: MediaLimits = MediaLimits(), indices: Sequence[int] | None = None,
               size: tuple[int, int] | None = None, max_bytes: int = 2 << 30) -> np.ndarray:
    """All (selected) frames as one uint8 array [N, H, W, 3]; for small videos only."""
    with FrameStream(path, limits, indices, size) as stream:
        info = stream.info
        w, h = (size if size is not None else (info.width, info.height))
        n = len(stream._want) if stream._want is not None else info.n_frames
        if n * h * w * 3 > max_bytes:
            raise MediaError(f"{path}: {n} frames of {w}x{h} need {n * h * w * 3} bytes, above "
                             f"read_video's max_bytes={max_bytes}; use iter_frames to stream them")
        out = np.empty((n, h, w, 3), dtype=np.uint8)
        extra = []
        k = 0
        for frame in stream:
            if k < n:
                out[k] = frame
            else:  # the header under-counted; keep going within the limits already enforced
                extra.append(frame)
                if (k + 1) * h * w * 3 > max_bytes:
                    raise MediaError(f"{path}: more frames than the header declares, above "
                                     f"max_bytes={max_bytes}; use iter_frames")
            k += 1
    if extra:
        return np.concatenate([out, np.stack(extra)])
    return out[:k]


# ------------------------------------------------------------------------------------- images

_IMAGE_FORMATS = ["PNG", "JPEG", "WEBP"]


def load_image(path, limits: MediaLimits = MediaLimits()) -> np.ndarray:
    """Decode a PNG/JPEG/WEBP image to RGB uint8 [H, W, 3].

    The declared size is checked against limits.max_image_pixels from the header, before any
    pixel is decoded. EXIF orientation is applied (as cv2.imread, used by the official pipeline,
    does); alpha is dropped without compositing (as cv2.imread); palette, grey, CMYK and YCbCr
    become RGB; 16-bit samples keep their high byte.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = _check_path(path)
    if not isinstance(limits, MediaLimits):
        raise ValidationError(f"limits must be a MediaLimits, got {type(limits).__name__}")
    _check_file_size(p, limits)
    try:
        im = Image.open(p, formats=_IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise MediaError(f"{p}: not a PNG, JPEG or WEBP image (or a corrupt one); "
                         "convert it to PNG or JPEG") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise MediaError(f"{p}: the image header declares an enormous picture ({e}); "
                         "pass an image below the pixel limit") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise MediaError(f"{p}: cannot read the image header ({e}); re-export the image") from None
    with im:
        w, h = im.size
        if w <= 0 or h <= 0 or w * h > limits.max_image_pixels:
            raise MediaError(f"{p}: the image is {w}x{h} ({w * h} pixels), above the limit of "
                             f"{limits.max_image_pixels}; downscale it or raise "
                             "MediaLimits.max_image_pixels")
        try:
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb8(im, p)
        except MediaError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise MediaError(f"{p}: the image data is corrupt or truncated ({e}); re-export it") from None


def _to_rgb8(im, p: Path) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im).astype(np.int64)
        # Pillow uses "I" (int32) for 16-bit grey too; cv2.imread keeps the high byte.
        g = (np.clip(a, 0, 65535) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(g[..., None], 3, axis=2))
    if mode in ("RGB", "RGBA", "RGBX", "RGBa", "LA", "La", "L", "1", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        if mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")  # palette transparency is applied via RGBA, then dropped
        if mode == "RGBa":
            im = im.convert("RGBA")
        rgb = im.convert("RGB") if im.mode != "RGB" else im
        return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
    raise MediaError(f"{p}: unsupported pixel mode '{mode}'; convert the image to 8-bit RGB")


# ------------------------------------------------------------------------------- frame indices

def frame_indices(n_frames: int, src_fps: float, dst_fps: float, duration_s: float | None = None,
                  *, clamp: bool = False) -> list[int]:
    """The official preprocessing's frame resampling (ProcessPipeline + utils.get_frame_indices).

    n_frames: frames the container reports; duration_s: end time of the last frame. When the
    count disagrees with round(duration * src_fps) by more than 10 % the duration-derived count
    wins (officially; it can exceed the real count, so indices past the end come out: pass
    clamp=True to clip them to n_frames - 1). dst_fps = -1 keeps src_fps. The output count is
    int(count / src_fps * dst_fps) (truncated), index k = round-half-even(k / dst_fps * src_fps).
    """
    if isinstance(n_frames, bool) or not isinstance(n_frames, (int, np.integer)) or n_frames < 1:
        raise ValidationError(f"n_frames must be an int >= 1, got {n_frames!r}")
    src_fps = float(src_fps)
    dst_fps = float(dst_fps)
    if not math.isfinite(src_fps) or src_fps <= 0:
        raise ValidationError(f"src_fps must be a positive number, got {src_fps}")
    if dst_fps != -1 and (not math.isfinite(dst_fps) or dst_fps <= 0):
        raise ValidationError(f"dst_fps must be a positive number or -1 (keep the video's fps), "
                              f"got {dst_fps}")
    count = int(n_frames)
    if duration_s is not None:
        duration_s = float(duration_s)
        if not math.isfinite(duration_s) or duration_s < 0:
            raise ValidationError(f"duration_s must be a finite number >= 0, got {duration_s}")
        expected = int(duration_s * src_fps + 0.5)        # float64, as numpy 1.x computed it
        if abs((count - expected) / count) > 0.1:
            count = expected
    fps = src_fps if dst_fps == -1 else dst_fps
    target = int(count / src_fps * fps)
    if target <= 0:
        return []
    idx = np.round(np.arange(target) / fps * src_fps).astype(np.int64)
    idx = np.clip(idx, 0, count - 1)
    if clamp:
        idx = np.minimum(idx, n_frames - 1)
    return idx.tolist()


# ------------------------------------------------------------------------------ atomic outputs

def _partial_path(final: Path) -> Path:
    return final.parent / f".{final.name}.{secrets.token_hex(6)}.partial"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def _output_dir(path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise ValidationError(f"output path must be a str or os.PathLike, got {type(path).__name__}")
    final = Path(path)
    if not final.name or final.name in (".", ".."):
        raise ValidationError(f"output path {final} has no file name")
    if not final.parent.is_dir():
        raise ValidationError(f"output directory {final.parent} does not exist; create it first")
    return final


_MUXERS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska"}


class VideoWriter:
    """Stream frames to an H.264 file that appears under its final name only once complete.

        with VideoWriter("out.mp4", fps=30, width=1280, height=720) as w:
            w.write(frames)            # uint8 [N, H, W, 3] or [H, W, 3], RGB

    Frames are encoded as they come (memory stays O(one frame)) into `.<name>.<rand>.partial`
    beside the final path. close() flushes the encoder and muxer, fsyncs, renames onto the final
    name and fsyncs the directory. An exception inside the `with` (or abort()) deletes the partial.
    """

    def __init__(self, path, fps: float, width: int, height: int, crf: int = 18,
                 pix_fmt: str = "yuv420p", *, codec: str = "libx264", preset: str = "medium"):
        import av

        final = _output_dir(path)
        muxer = _MUXERS.get(final.suffix.lower())
        if muxer is None:
            raise ValidationError(f"output {final.name}: use a .mp4, .mov or .mkv name")
        for name, v in (("width", width), ("height", height)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValidationError(f"{name} must be a positive int, got {v!r}")
        if pix_fmt in ("yuv420p", "yuv422p") and (width % 2 or height % 2):
            raise ValidationError(f"{pix_fmt} needs an even width and height, got {width}x{height}; "
                                  "crop or pad by one pixel, or use pix_fmt='yuv444p'")
        if isinstance(fps, bool) or not isinstance(fps, (int, float, np.floating)) \
                or not math.isfinite(fps) or not 0 < fps <= 1000:
            raise ValidationError(f"fps must be a number in (0, 1000], got {fps!r}")
        if isinstance(crf, bool) or not isinstance(crf, (int, np.integer)) or not 0 <= crf <= 51:
            raise ValidationError(f"crf must be an int in [0, 51] (lower = better), got {crf!r}")
        self.path = final
        self.width, self.height = int(width), int(height)
        self.frames_written = 0
        self._partial = _partial_path(final)
        self._done = False
        rate = fractions.Fraction(float(fps)).limit_denominator(1001)
        self._container = av.open(str(self._partial), mode="w", format=muxer)
        try:
            self._stream = self._container.add_stream(codec, rate=rate)
            self._stream.width, self._stream.height = self.width, self.height
            self._stream.pix_fmt = pix_fmt
            self._stream.options = {"crf": str(int(crf)), "preset": preset}
            # One encoder thread: with frame threads, x264 here produced different bitstreams for
            # the same frames from run to run (measured: 2 of 6 runs differed), and a seed must
            # reproduce the same file. Encoding is a small fraction of generation time.
            self._stream.codec_context.thread_count = 1
        except Exception as e:
            self.abort()
            raise ValidationError(f"cannot set up the {codec} encoder ({e}); check pix_fmt/codec") from None
        self._av = av

    def write(self, frames) -> None:
        if self._done:
            raise ValidationError("VideoWriter is closed")
        arr = np.asarray(frames)
        if arr.dtype != np.uint8:
            raise ValidationError(f"frames must be uint8 RGB, got dtype {arr.dtype}; "
                                  "convert with (x.clip(0, 1) * 255).round().astype(np.uint8)")
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[1:] != (self.height, self.width, 3):
            raise ValidationError(f"frames must be [N, {self.height}, {self.width}, 3] or "
                                  f"[{self.height}, {self.width}, 3], got {list(np.shape(frames))}")
        for frame in arr:
            vf = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            vf.pts = self.frames_written
            for packet in self._stream.encode(vf):
                self._container.mux(packet)
            self.frames_written += 1

    def close(self) -> Path:
        """Finish the file and move it onto its final name; returns the final path."""
        if self._done:
            return self.path
        if self.frames_written == 0:
            self.abort()
            raise ValidationError(f"no frames were written to {self.path.name}; nothing saved")
        try:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
            _fsync_file(self._partial)
            os.replace(self._partial, self.path)
        except BaseException:
            self.abort()
            raise
        self._done = True
        fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        """Drop everything written so far; nothing appears under the final name."""
        self._done = True
        container = getattr(self, "_container", None)
        if container is not None:
            try:
                container.close()
            except Exception:
                pass
            self._container = None
        try:
            self._partial.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
            return False
        self.close()
        return False

    def __del__(self):
        # A writer dropped without close() must not leave a half file behind.
        if not getattr(self, "_done", True):
            try:
                self.abort()
            except Exception:
                pass


def write_json_atomic(path, payload: dict) -> Path:
    """Write JSON so that `path` holds either the previous file or the complete new one."""
    final = _output_dir(path)
    if not isinstance(payload, dict):
        raise ValidationError(f"payload must be a dict, got {type(payload).__name__}")
    try:
        data = json.dumps(payload, indent=2, allow_nan=False, ensure_ascii=False) + "\n"
    except (TypeError, ValueError) as e:
        raise ValidationError(f"payload is not JSON-serialisable ({e}); pass plain str/int/float/"
                              "list/dict values (no NaN)") from None
    tmp = _partial_path(final)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    fsync_dir(final.parent)
    return final


def cleanup_partials(directory, min_age_s: float = 0.0) -> list[Path]:
    """Remove the `.<name>.<rand>.partial` files a killed writer left; returns what was removed.

    Only names this module creates (leading dot, `.partial` suffix) are touched. min_age_s > 0
    spares files younger than that, for directories other live writers share.
    """
    d = Path(directory)
    if not d.is_dir():
        raise ValidationError(f"{d} is not a directory")
    removed = []
    now = time.time()
    for p in d.glob(".*.partial"):
        try:
            if not p.is_file() or p.is_symlink():
                continue
            if min_age_s > 0 and now - p.stat().st_mtime < min_age_s:
                continue
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            continue
    return removed


# ---------------------------------------------------------------------------------- sidecar

def _jsonable(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)  # dtypes, devices, enums: their printed name is what a reader wants


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:
        return None


def sidecar_payload(seed, settings: dict, manifest_hash: str | None, *, device=None) -> dict:
    """What a run writes beside its video: the seed actually used, settings, versions, device."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**63:
        raise ValidationError(f"seed must be the resolved int in [0, 2**63), got {seed!r}")
    if not isinstance(settings, dict):
        raise ValidationError(f"settings must be a dict, got {type(settings).__name__}")
    if manifest_hash is not None and not isinstance(manifest_hash, str):
        raise ValidationError("manifest_hash must be a str or None")
    import torch
    from .. import __version__ as wanimate_version

    if device is None:
        if torch.cuda.is_available():
            device_name = torch.cuda.get_device_name(torch.cuda.current_device())
        else:
            device_name = f"cpu ({platform.processor() or platform.machine()})"
    else:
        dev = torch.device(device)
        device_name = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                       else f"{dev.type} ({platform.processor() or platform.machine()})")
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "seed": int(seed),
        "settings": _jsonable(settings),
        "manifest_hash": manifest_hash,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "av": _version("av"),
            "wanimate": wanimate_version,
            "cuda": torch.version.cuda,
        },
        "device": device_name,
        "created_utc": now.isoformat(timespec="seconds"),
    }
