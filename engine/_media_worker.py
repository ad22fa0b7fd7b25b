"""Decoder child process for engine/video.py. Run as a script: `python -I _media_worker.py`.

Untrusted media is parsed and decoded here, never in the engine process: a native crash
(FFmpeg/PyAV segfaults on some corrupt files), a hang or a memory blow-up then ends only this
process. It imports nothing from wanimate, so it runs under `python -I` with only site-packages.

Protocol (all integers little-endian):
  parent -> child, stdin:  one JSON line (the request); for "decode" later a line "go\n" once
                           the parent has checked the probe against its limits (or EOF = stop).
  child -> parent, stdout: messages, each a 1-byte tag:
     b"I" u32 len + JSON   stream info (the probe)
     b"F" i64 index, i32 h, i32 w, then h*w*3 bytes of RGB uint8
     b"E" u32 len + JSON   end of stream (decoded frame count, peak RSS)
     b"X" u32 len + JSON   a failure the child understood (message, kind)
"""
import json
import os
import resource
import signal
import struct
import sys
import time



def _peak_rss_bytes() -> int:
    """This process's own peak resident memory. VmHWM belongs to the post-exec address space;
    ru_maxrss also counts the pre-exec copy of a large parent (Linux folds it in at exec), which
    would report the engine's memory as the decoder's."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: KiB

def _send_json(out, tag: bytes, payload: dict) -> None:
    data = json.dumps(payload).encode()
    out.write(tag + struct.pack("<I", len(data)) + data)
    out.flush()


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the engine process dies, so a hung decoder never outlives it."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        return
    if os.getppid() != int(os.environ.get("WANIMATE_DECODER_PARENT", os.getppid())):
        os._exit(1)  # the parent died before prctl took effect


def _apply_rlimits(req: dict) -> None:
    # No core files: a crash on a hostile file should not leave gigabytes on disk.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    cpu = req.get("rlimit_cpu_s")
    if cpu:
        # The soft limit sends SIGXCPU (reported as "CPU time limit"); the hard one kills.
        resource.setrlimit(resource.RLIMIT_CPU, (int(cpu), int(cpu) + 5))
    mem = req.get("rlimit_as_bytes")
    if mem:
        resource.setrlimit(resource.RLIMIT_AS, (int(mem), int(mem)))


def _fault(req: dict, stage: str) -> None:
    """Test-only failure injection, requested explicitly by the parent for one call."""
    fault = req.get("fault")
    if not fault or not fault.startswith(stage + ":"):
        return
    what = fault.split(":", 1)[1]
    if what == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif what == "hang":
        time.sleep(10_000)
    elif what == "oom":
        bytearray(1 << 40)  # far above any address-space limit: MemoryError
    elif what == "garbage":
        raise _Garbage()


def _probe(av, container, req: dict) -> dict:
    fmt = container.format.name
    videos = list(container.streams.video)
    if not videos:
        n_audio = len(container.streams.audio)
        kind = "audio_only" if n_audio else "no_video"
        raise _Refused(kind, f"container '{fmt}' has {n_audio} audio and no video stream")
    stream = videos[0]
    cc = stream.codec_context
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / 1_000_000  # AV_TIME_BASE
    else:
        duration = 0.0
    n_frames = int(stream.frames or 0)
    counted = False
    if n_frames <= 0:
        # Matroska/WebM do not store a frame count: count packets (demux only, no decoding),
        # stopping one past the frame limit so a hostile file cannot make this unbounded.
        cap = int(req.get("max_frames", 1 << 62)) + 1
        for packet in container.demux(stream):
            if packet.size:
                n_frames += 1
                if n_frames >= cap:
                    break
        counted = True
    return {
        "width": int(cc.width), "height": int(cc.height), "fps": fps, "n_frames": n_frames,
        "duration_s": duration, "codec": cc.name, "container": fmt,
        "pix_fmt": str(cc.pix_fmt or ""), "frames_counted": counted,
    }


class _Garbage(Exception):
    """Test-only: make the child break the protocol."""


class _Refused(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _decode(av, container, info: dict, req: dict, out) -> int:
    import numpy as np
    cv2 = None
    size = req.get("size")
    if size is not None:
        import cv2  # only when resizing; the official preprocessing resizes with OpenCV
        cv2.setNumThreads(1)
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    width, height = info["width"], info["height"]
    wanted = req.get("indices")  # sorted, unique; None = every frame
    pos = 0
    max_frames = int(req["max_frames"])
    header = struct.Struct("<qii")
    n = 0
    for frame in container.decode(stream):
        if n >= max_frames:
            raise _Refused("too_many_frames", f"the stream holds more than {max_frames} frames")
        index = n
        n += 1
        if wanted is not None:
            if pos >= len(wanted):
                break
            if index != wanted[pos]:
                continue
            pos += 1
        if frame.width != width or frame.height != height:
            # A mid-stream resolution change: keep every frame at the probed size.
            rgb = frame.reformat(width=width, height=height, format="rgb24").to_ndarray()
        else:
            rgb = frame.to_ndarray(format="rgb24")
        if size is not None:
            rgb = cv2.resize(rgb, (int(size[0]), int(size[1])), interpolation=cv2.INTER_AREA)
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        h, w = rgb.shape[:2]
        out.write(b"F" + header.pack(index, h, w))
        out.write(memoryview(rgb).cast("B"))
        if index == 0:
            _fault(req, "frame")
    out.flush()
    return n


def _finish(out, n: int) -> None:
    """Send the end message and leave at once, without closing the container: stopping a
    frame-threaded decode early (only the first frames wanted) and then tearing FFmpeg's decoder
    threads down can deadlock (seen in 1 of 25 prefix decodes: the child sat in a futex wait until
    the parent's timeout). The child is disposable, so the OS reclaims everything instead."""
    _send_json(out, b"E", {"decoded": n, "peak_rss_bytes": _peak_rss_bytes()})
    out.flush()
    os._exit(0)


def main() -> int:
    # Frames go to a private dup of fd 1; fd 1 itself is pointed at stderr so that anything a
    # library prints cannot corrupt the binary stream.
    _die_with_parent()
    out = os.fdopen(os.dup(1), "wb", buffering=1 << 20)
    os.dup2(2, 1)
    line = sys.stdin.buffer.readline()
    try:
        req = json.loads(line)
    except ValueError:
        return 2
    _apply_rlimits(req)
    try:
        _fault(req, "start")
        import av
        try:
            av.logging.set_level(av.logging.ERROR)
        except Exception:
            pass
        try:
            container = av.open(req["path"], mode="r", timeout=float(req.get("io_timeout_s", 30)))
        except av.error.FileNotFoundError:
            raise _Refused("missing", "file not found")
        except (av.error.InvalidDataError, av.error.EOFError) as e:
            raise _Refused("corrupt", f"not a readable media file ({e})")
        with container:
            _fault(req, "probe")
            info = _probe(av, container, req)
            _send_json(out, b"I", info)
            if req["op"] == "probe":
                return 0
            go = sys.stdin.buffer.readline()
            if go.strip() != b"go":
                return 0
            _fault(req, "decode")
            if not info["frames_counted"]:
                _finish(out, _decode(av, container, info, req, out))
        # Counting demuxed the whole file; a fresh open is simpler and safer than a seek.
        c2 = av.open(req["path"], mode="r", timeout=float(req.get("io_timeout_s", 30)))
        _finish(out, _decode(av, c2, info, req, out))
    except _Refused as e:
        _send_json(out, b"X", {"kind": e.kind, "message": str(e)})
        return 0
    except MemoryError:
        _send_json(out, b"X", {"kind": "memory", "message": "the decoder ran out of its memory limit"})
        return 0
    except _Garbage:
        out.write(b"Z" * 64)
        out.flush()
        return 0
    except BrokenPipeError:
        return 0  # the parent stopped reading (consumer closed the stream early)
    except Exception as e:  # any other decoder failure: report it as data, the parent types it
        try:
            _send_json(out, b"X", {"kind": "corrupt", "message": f"{type(e).__name__}: {e}"})
        except BrokenPipeError:
            pass
        return 0


if __name__ == "__main__":
    sys.exit(main())
