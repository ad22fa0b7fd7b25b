"""`wanimate run` as a library function: inputs on disk -> an mp4 and its sidecar JSON.

Everything a user can get wrong is checked before any heavy work: options, paths, the output
location, then the videos' headers (probed in a decoder subprocess: frame counts, sizes). Frames
are then streamed: each source keeps a bounded window of decoded frames (one segment plus one
stride), so host memory does not grow with video length, and decoded output frames go to the
H.264 muxer segment by segment. The mp4 appears under its final name only when complete, and the
sidecar (seed actually used, settings, versions, checkpoint manifest hash) is written after it.
"""
from __future__ import annotations

import collections
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .attention import attention_report
from .errors import MediaError, ValidationError
from .pipeline import GenerateOptions, GenerationResult, Pipeline, to_uint8_frames
from .video import MediaLimits, VideoWriter, load_image, probe_video, iter_frames, sidecar_payload, write_json_atomic

SRC_FILES = {"pose": "src_pose.mp4", "face": "src_face.mp4", "ref": "src_ref.png",
             "bg": "src_bg.mp4", "mask": "src_mask.mp4"}


class VideoSource:
    """A FrameSource over a video file, decoded in a subprocess, holding at most `window` frames.

    The pipeline asks for frames in increasing order except for the ping-pong padding at the end,
    which only reaches back less than one stride: a window of one segment plus one stride serves
    every request."""

    def __init__(self, path: Path, window: int, limits: MediaLimits = MediaLimits()):
        self.path = Path(path)
        self.info = probe_video(self.path, limits)
        if self.info.n_frames < 1:
            raise MediaError(f"{self.path}: the video has no frames")
        self.limits, self.window = limits, window
        self._stream = None
        self._buffer: collections.deque = collections.deque(maxlen=window)
        self._next = 0                              # index of the next frame to decode

    def __len__(self) -> int:
        return self.info.n_frames

    @property
    def size(self) -> tuple[int, int]:
        return self.info.height, self.info.width

    def get(self, indices: Sequence[int]) -> np.ndarray:
        return np.stack([self._frame(i) for i in indices])

    def _frame(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"frame {i} of {len(self)}")
        if self._stream is None:
            self._stream = iter_frames(self.path, self.limits)
        while self._next <= i:
            try:
                self._buffer.append(next(self._stream))
            except StopIteration:
                raise MediaError(f"{self.path}: the header announces {len(self)} frames but only "
                                 f"{self._next} could be decoded (truncated or corrupt file)") from None
            self._next += 1
        oldest = self._next - len(self._buffer)
        if i < oldest:
            raise RuntimeError(f"{self.path}: frame {i} left the {self.window}-frame window")
        return self._buffer[i - oldest]

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self._buffer.clear()


@dataclass
class RunReport:
    output: Path
    sidecar: Path
    seed: int
    frames: int
    size: tuple[int, int]
    segments: int
    embedded: bool
    timings: dict[str, float] = field(default_factory=dict)


def check_output_path(output: Path) -> Path:
    output = Path(output)
    if output.suffix.lower() != ".mp4":
        raise ValidationError(f"the output must be an .mp4 file, got {output}")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise ValidationError(f"the output folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise ValidationError(f"the output folder {parent} is not writable")
    return output


def src_paths(src: Path, mode: str) -> dict[str, Path]:
    src = Path(src)
    if not src.is_dir():
        raise MediaError(f"--src {src} is not a folder; give the folder the preprocessing wrote "
                         "(src_pose.mp4, src_face.mp4, src_ref.png [, src_bg.mp4, src_mask.mp4])")
    names = ["pose", "face", "ref"] + (["bg", "mask"] if mode == "replace" else [])
    paths = {k: src / SRC_FILES[k] for k in names}
    missing = [p.name for p in paths.values() if not p.is_file()]
    if missing:
        extra = " (replace mode needs src_bg.mp4 and src_mask.mp4: preprocess with --mode replace)" \
            if mode == "replace" else ""
        raise MediaError(f"{src} lacks {', '.join(missing)}{extra}")
    return paths


def run(output: Path, options: GenerateOptions, *, src: Path | None = None, image: Path | None = None,
        video: Path | None = None, pipeline: Pipeline | None = None, ckpt_dir: Path | None = None,
        device: str = "cpu", dtype: torch.dtype = torch.bfloat16, preprocess_options: dict | None = None,
        limits: MediaLimits = MediaLimits(), progress: Callable[[str, int, int], None] | None = None,
        vae_backend: str = "torch", vae_cache: Path | None = None, load_options: dict | None = None,
        vram_budget: str | int | None = None, kernels: bool = False,
        log: Callable[[str], None] = lambda s: None) -> RunReport:
    """Generate `output` from a preprocessed folder (`src`) or from an image and a driving video
    (preprocessed first). `pipeline` may be a loaded Pipeline (servers keep one across requests);
    otherwise one is loaded from `ckpt_dir`, or the embedded default is built."""
    t0 = time.perf_counter()
    options = options.resolved()                 # typed errors and the concrete seed, before any work
    output = check_output_path(output)
    if (src is None) == (image is None or video is None):
        raise ValidationError("give either --src DIR (a preprocessed folder) or both --image and --video")
    if src is None:
        for p, what in ((image, "--image"), (video, "--video")):
            if not Path(p).is_file():
                raise MediaError(f"{what} {p} does not exist")
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="wanimate-") as scratch:
        if src is None:
            from .preprocess import preprocess
            tp = time.perf_counter()
            log("preprocessing the driving video")
            src = Path(scratch) / "src"
            preprocess(image, video, src, mode=options.mode, **(preprocess_options or {}))
            timings["preprocess_s"] = time.perf_counter() - tp
        paths = src_paths(src, options.mode)
        window = 2 * options.clip_len
        sources = {k: VideoSource(p, window, limits) for k, p in paths.items() if k != "ref"}
        try:
            reference = load_image(paths["ref"], limits)
            pose = sources["pose"]
            fps = pose.info.fps or 30.0
            embedded = pipeline is None and ckpt_dir is None
            if pipeline is None:
                tl = time.perf_counter()
                from .components import embedded_pipeline, load_pipeline
                if ckpt_dir is None:
                    log("no --ckpt-dir: running the embedded tiny model with RANDOM weights; the output "
                        "shows the pipeline working, not an animation")
                    pipeline = embedded_pipeline(device=device)
                else:
                    # Under a budget the weights land in host memory and the plan places them.
                    pipeline = load_pipeline(ckpt_dir, device=device, dtype=dtype, progress=log,
                                             weights_device="cpu" if vram_budget else None,
                                             **{k: v for k, v in (load_options or {}).items() if v})
                timings["load_s"] = time.perf_counter() - tl
            if kernels and torch.device(device).type == "cuda":
                from .transforms import use_kernels
                use_kernels(pipeline.dit, True)
            if vae_backend != "torch":
                from ..export.runtime import make_vae_backend
                cache = vae_cache or Path.home() / ".cache" / "wanimate" / "vae"
                pipeline.vae = make_vae_backend(pipeline.vae, vae_backend, cache)
            height, width = pipeline.check_inputs(pose, sources["face"], options, sources.get("bg"), sources.get("mask"))
            if vram_budget:
                from .offload import apply_budget
                apply_budget(pipeline, vram_budget, (height, width), options, log=log)
            log(f"{len(pose)} frames of {width}x{height} at {fps:g} fps, seed {options.seed}")
            with VideoWriter(output, fps=fps, width=width, height=height) as writer:
                result: GenerationResult = pipeline.generate(
                    reference, pose, sources["face"], options, background=sources.get("bg"), mask=sources.get("mask"),
                    sink=lambda frames: writer.write(to_uint8_frames(frames)), progress=progress)
        finally:
            for s in sources.values():
                s.close()
    timings.update(result.timings)
    timings["wall_s"] = time.perf_counter() - t0
    from ..quant.api import quantization_report
    from .safetensors_io import manifest_hash
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(options).items()}
    settings.update(embedded_default=embedded, checkpoint=str(ckpt_dir) if ckpt_dir else None, device=str(device),
                    dtype=str(pipeline.dtype).replace("torch.", ""), fps=fps, frames=result.n_frames,
                    size=[height, width], attention=attention_report(pipeline.dit) | {"self": options.attention},
                    vae_backend=vae_backend, vram_budget=vram_budget,
                    kernels=bool(kernels and torch.device(device).type == "cuda"),
                    quant=quantization_report(pipeline.dit))
    payload = sidecar_payload(options.seed, settings, manifest_hash(ckpt_dir) if ckpt_dir else None, device=device)
    payload["timings"] = timings
    sidecar = write_json_atomic(output.with_suffix(".json"), payload)
    return RunReport(output, Path(sidecar), options.seed, result.n_frames, (height, width), result.segments,
                     embedded, timings)

