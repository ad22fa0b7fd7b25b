"""Peak host memory while decoding a long driving video through engine.video.iter_frames.

    python -m wanimate.bench.video_memory [--minutes 10] [--width 1920] [--height 1080] [--fps 30]

1. A synthetic driving video (scrolling texture + a moving disc, low bitrate so the file stays
   small) is generated to /tmp by VideoWriter in a separate process, so the encoder's memory does
   not count against the decode measurement.
2. This process then streams it twice: (a) every frame at full size, (b) the official
   preprocessing's path: frame_indices resampling to 30 fps and a (W, H) resize in the child.
   Each frame is "processed" (a per-channel mean) and dropped.
The parent's RSS is sampled every 20 ms by a thread (VmRSS, so the baseline after imports is
known); the child reports its own peak (ru_maxrss). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class RssSampler:
    def __init__(self, period_s: float = 0.02):
        self.period_s = period_s
        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.period_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def generate(path: Path, minutes: float, width: int, height: int, fps: int) -> dict:
    """Write the synthetic video; runs in its own process (see main)."""
    from wanimate.engine.video import VideoWriter

    n = int(round(minutes * 60 * fps))
    yy, xx = np.mgrid[:height, : 2 * width].astype(np.float32)
    tex = np.stack([127 + 90 * np.sin(xx / 37.0), 127 + 90 * np.cos(yy / 23.0),
                    127 + 90 * np.sin((xx + yy) / 51.0)], axis=-1).astype(np.uint8)
    yy1, xx1 = np.mgrid[:height, :width]
    t0 = time.time()
    with VideoWriter(path, fps, width, height, crf=38, preset="ultrafast") as w:
        for i in range(n):
            off = (i * 7) % width
            frame = tex[:, off: off + width].copy()
            cx = width / 2 + width / 3 * np.sin(i / 40.0)
            cy = height / 2 + height / 4 * np.cos(i / 55.0)
            r = height // 8
            y0, y1 = int(max(cy - r, 0)), int(min(cy + r, height))
            x0, x1 = int(max(cx - r, 0)), int(min(cx + r, width))
            d = (xx1[y0:y1, x0:x1] - cx) ** 2 + (yy1[y0:y1, x0:x1] - cy) ** 2 < r * r
            frame[y0:y1, x0:x1][d] = (230, 60, 40)
            w.write(frame)
    import resource
    return {"frames": n, "encode_s": time.time() - t0, "file_bytes": path.stat().st_size,
            "writer_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def decode_pass(path: Path, label: str, indices=None, size=None) -> dict:
    from wanimate.engine.video import iter_frames

    base = _rss_bytes()
    t0 = time.time()
    n = 0
    acc = 0
    with RssSampler() as s:
        with iter_frames(path, indices=indices, size=size) as stream:
            info = stream.info
            for frame in stream:
                acc += int(frame[::16, ::16].sum())  # a cheap stand-in for per-frame work
                n += 1
            stats = dict(stream.stats)
    h, w = (size[1], size[0]) if size else (info.height, info.width)
    return {"pass": label, "frames": n, "frame_shape": [h, w, 3], "seconds": time.time() - t0,
            "decoded_bytes": n * h * w * 3, "parent_rss_baseline_bytes": base,
            "parent_peak_rss_bytes": s.peak, "parent_rss_growth_bytes": s.peak - base,
            "child_peak_rss_bytes": stats.get("child_peak_rss_bytes"),
            "decode_wait_s": stats.get("decode_wait_s")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--video", type=Path, default=None, help="reuse this video instead of generating")
    ap.add_argument("--json", type=Path, default=Path("/tmp/video_memory.json"))
    ap.add_argument("--_generate", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._generate is not None:
        print(json.dumps(generate(args._generate, args.minutes, args.width, args.height, args.fps)))
        return 0

    from wanimate.engine.video import frame_indices, probe_video

    gen = None
    video = args.video
    if video is None:
        video = Path(f"/tmp/wanimate_drive_{args.minutes:g}min_{args.height}p.mp4")
        res = subprocess.run([sys.executable, "-m", "wanimate.bench.video_memory",
                              "--minutes", str(args.minutes), "--width", str(args.width),
                              "--height", str(args.height), "--fps", str(args.fps),
                              "--_generate", str(video)], capture_output=True, text=True, check=True)
        gen = json.loads(res.stdout.strip().splitlines()[-1])
    info = probe_video(video)
    idx = frame_indices(info.n_frames, info.fps, 30, info.duration_s)
    passes = [decode_pass(video, "full-size frames", None, None),
              decode_pass(video, "resampled to 30 fps + resized 1280x720", idx, (1280, 720))]
    result = {"video": str(video), "info": info.__dict__, "generate": gen, "passes": passes,
              "host": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    args.json.write_text(json.dumps(result, indent=2))

    mib = lambda b: f"{b / 2**20:,.0f}" if b is not None else "-"
    print(f"video: {video} {info.width}x{info.height} {info.fps:g} fps, {info.n_frames} frames, "
          f"{info.duration_s:.0f} s, {Path(video).stat().st_size / 2**20:.1f} MiB")
    if gen:
        print(f"generated in {gen['encode_s']:.0f} s; writer process peak RSS {mib(gen['writer_peak_rss_bytes'])} MiB")
    hdr = ("pass", "frames", "s", "fps", "decoded MiB", "parent base MiB", "parent peak MiB",
           "parent growth MiB", "child peak MiB")
    rows = [(p["pass"], p["frames"], f"{p['seconds']:.0f}", f"{p['frames'] / p['seconds']:.0f}",
             mib(p["decoded_bytes"]), mib(p["parent_rss_baseline_bytes"]),
             mib(p["parent_peak_rss_bytes"]), mib(p["parent_rss_growth_bytes"]),
             mib(p["child_peak_rss_bytes"])) for p in passes]
    widths = [max(len(str(r[i])) for r in rows + [hdr]) for i in range(len(hdr))]
    for r in [hdr] + rows:
        print("  ".join(str(v).rjust(w) for v, w in zip(r, widths)))
    print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
