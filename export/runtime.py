"""VAE backends over the exported step graphs: the WanVAE interface (encode, decode,
decode_stream, encode_step, decode_step, dtype, config) run by ONNX Runtime or TensorRT.

    vae = make_vae_backend(torch_vae, "onnx", cache_dir)       # or "tensorrt", "compiled", "torch"
    pipeline = Pipeline(dit, vae, clip, ...)                    # `wanimate run --vae-backend onnx`

The graphs have static shapes (one resolution, batch 1; export/onnx.py). A backend is built from
export directories (`OnnxVAE([dir_480p, dir_720p])`) or from the torch VAE plus a cache folder, in
which case a resolution seen for the first time is exported (and, for TensorRT, built) into
`cache_dir/<weights sha256[:16]>/<H>x<W>/` and reused afterwards. A batch of B runs as B
streams. Spatial tiling is not supported by these backends (a tile would need its own graph).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..engine.errors import CheckpointError, ValidationError
from ..engine.vae import CausalCache, WanVAE
from ..engine.vae_fast import FastVAE, StreamingVAE
from .onnx import (MANIFEST, config_from_manifest, export_vae_onnx, open_session, read_manifest,
                   weights_sha256)

BACKENDS = ("torch", "compiled", "onnx", "tensorrt")


class StepGraphVAE(StreamingVAE):
    """WanVAE's streaming interface over the four step graphs of each exported resolution.
    Subclasses run one graph: `_run(export_dir, manifest, graph, inputs) -> outputs`."""

    def __init__(self, export_dirs: Path | Sequence[Path] = (), *, source: WanVAE | None = None,
                 cache_dir: Path | None = None):
        dirs = [export_dirs] if isinstance(export_dirs, (str, Path)) else list(export_dirs)
        if not dirs and (source is None or cache_dir is None):
            raise ValidationError("give export directories, or the torch VAE and a cache_dir to export into")
        self._source = source
        self._cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._weights = weights_sha256(source) if source is not None else None
        self._exports: dict[tuple[int, int], tuple[Path, dict]] = {}
        self.config = source.config if source is not None else None
        for d in dirs:
            self._add(Path(d))
        if self.config is None:
            raise ValidationError("no export directory given")

    # ---- exports ----------------------------------------------------------------------------

    def _add(self, d: Path) -> None:
        manifest = read_manifest(d)
        config = config_from_manifest(manifest)
        if self.config is not None and config != self.config:
            raise CheckpointError(f"{d}: exported from another VAE configuration than the other exports")
        if self._weights is not None and manifest["weights_sha256"] != self._weights:
            raise CheckpointError(f"{d}: exported from other weights than this VAE; delete it to re-export")
        weights = {m["weights_sha256"] for _, m in self._exports.values()}
        if weights and manifest["weights_sha256"] not in weights:
            raise CheckpointError(f"{d}: exported from other weights than the other exports")
        self.config = config
        self._exports[tuple(manifest["resolution"])] = (d, manifest)

    def _export(self, height: int, width: int) -> tuple[Path, dict]:
        key = (height, width)
        if key in self._exports:
            return self._exports[key]
        if self._source is None or self._cache_dir is None:
            have = ", ".join(f"{h}x{w}" for h, w in sorted(self._exports)) or "none"
            raise ValidationError(f"no exported graphs for {height}x{width} (HxW; exported: {have}); run "
                                  f"export_vae(..., resolution=({height}, {width})) or give the torch VAE "
                                  "and a cache_dir")
        d = self._cache_dir / self._weights[:16] / f"{height}x{width}"
        if not (d / MANIFEST).is_file():
            export_vae_onnx(self._source, d, (height, width))
        self._add(d)
        return self._exports[key]

    # ---- the WanVAE interface (clip loops from StreamingVAE) --------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32   # the graphs take fp32; engines may compute lower inside

    def _run(self, export_dir: Path, manifest: dict, graph: str, inputs: list[Tensor]) -> list[Tensor]:
        raise NotImplementedError

    def _step(self, part: str, x: Tensor, cache: CausalCache | None, height: int, width: int):
        if x.shape[0] != 1:
            raise ValidationError(f"the exported graphs take batch 1, got {x.shape[0]}")
        d, manifest = self._export(height, width)
        graph = f"{part}_{'first' if cache is None else 'step'}"
        if graph not in manifest["graphs"]:
            raise ValidationError(f"{d} has no {part} graphs; export them with parts=('decode', 'encode')")
        inputs = [x.float()] + ([] if cache is None else list(cache.tensors))
        specs = manifest["graphs"][graph]["inputs"]
        if len(inputs) != len(specs):
            raise ValidationError(f"{graph} takes {len(specs) - 1} cache tensors, got {len(inputs) - 1}")
        for t, spec in zip(inputs, specs):
            if list(t.shape) != spec["shape"]:
                raise ValidationError(f"{graph}: {spec['name']} must be {spec['shape']}, got {list(t.shape)}")
        out = self._run(d, manifest, graph, inputs)
        return out[0], CausalCache(tuple(out[1:]))

    def encode_step(self, frames: Tensor, cache: CausalCache | None) -> tuple[Tensor, CausalCache]:
        WanVAE._check_video(self, frames, "frames")   # the checks only read the strides and config
        want = 1 if cache is None else self.time_stride
        if frames.shape[2] != want:
            raise ValidationError(f"encode_step takes {want} frame(s), got {frames.shape[2]}")
        return self._step("encode", frames, cache, frames.shape[3], frames.shape[4])

    def decode_step(self, z_frame: Tensor, cache: CausalCache | None, *,
                    clamp: bool = True) -> tuple[Tensor, CausalCache]:
        WanVAE._check_latent(self, z_frame)
        if z_frame.shape[2] != 1:
            raise ValidationError(f"decode_step takes one latent frame, got {z_frame.shape[2]}")
        s = self.space_stride
        y, cache = self._step("decode", z_frame, cache, z_frame.shape[3] * s, z_frame.shape[4] * s)
        return (y.clamp(-1.0, 1.0) if clamp else y), cache


class OnnxVAE(StepGraphVAE):
    """The step graphs through ONNX Runtime (CPU by default; pass providers for CUDA)."""

    def __init__(self, export_dirs: Path | Sequence[Path] = (), *, source: WanVAE | None = None,
                 cache_dir: Path | None = None, providers: Sequence | None = None, threads: int | None = None):
        self._providers, self._threads = providers, threads
        self._sessions: dict[tuple[Path, str], object] = {}
        super().__init__(export_dirs, source=source, cache_dir=cache_dir)

    def _run(self, export_dir: Path, manifest: dict, graph: str, inputs: list[Tensor]) -> list[Tensor]:
        key = (export_dir, graph)
        if key not in self._sessions:
            self._sessions[key] = open_session(export_dir / manifest["graphs"][graph]["file"],
                                               self._providers, self._threads)
        session = self._sessions[key]
        names = [spec["name"] for spec in manifest["graphs"][graph]["inputs"]]
        feeds = {n: np.ascontiguousarray(t.detach().cpu().float().numpy()) for n, t in zip(names, inputs)}
        device = inputs[0].device
        return [torch.from_numpy(a).to(device) for a in session.run(None, feeds)]


class TensorRTVAE(StepGraphVAE):
    """The step graphs as TensorRT engines (built on first use, cached and hash-checked by
    export/tensorrt.py), run on torch CUDA tensors on the current stream. Default precision bf16:
    fp16 has too little range for the VAE's unnormalised activations (the official VAE is fp32);
    'fp32' is the parity setting. NOT RUN against real TensorRT (see export/README.md)."""

    def __init__(self, export_dirs: Path | Sequence[Path] = (), *, source: WanVAE | None = None,
                 cache_dir: Path | None = None, precision: str = "bf16", device: torch.device | str | None = None,
                 trt=None, engine_cache_dir: Path | None = None, **build_options):
        from .tensorrt import import_tensorrt

        self._trt = trt if trt is not None else import_tensorrt()
        self._precision = precision
        self._device = torch.device(device) if device is not None else torch.device("cuda")
        self._engine_cache_dir = Path(engine_cache_dir) if engine_cache_dir is not None else None
        self._build_options = build_options
        self._runners: dict[tuple[Path, str], object] = {}
        super().__init__(export_dirs, source=source, cache_dir=cache_dir)

    def _run(self, export_dir: Path, manifest: dict, graph: str, inputs: list[Tensor]) -> list[Tensor]:
        from .tensorrt import EngineCache, EngineRunner, build_or_load

        key = (export_dir, graph)
        if key not in self._runners:
            cache = EngineCache(self._engine_cache_dir or export_dir / "engines")
            entry = build_or_load(cache, export_dir / manifest["graphs"][graph]["file"], name=f"vae_{graph}",
                                  precision=self._precision, trt=self._trt, device=self._device,
                                  **self._build_options)
            self._runners[key] = EngineRunner(entry.engine_bytes, device=self._device, trt=self._trt)
        runner = self._runners[key]
        names = [spec["name"] for spec in manifest["graphs"][graph]["inputs"]]
        outputs = runner({n: t.to(self._device, torch.float32).contiguous() for n, t in zip(names, inputs)})
        order = [spec["name"] for spec in manifest["graphs"][graph]["outputs"]]
        return [outputs[n].float() for n in order]


def make_vae_backend(vae: WanVAE, backend: str = "torch", cache_dir: Path | None = None, **options):
    """The VAE for `Pipeline(dit, vae, clip)`: `vae` itself for 'torch'; 'compiled' = FastVAE
    (channels-last, torch.compile per step; changes vae's weight layout in place); else an
    OnnxVAE or TensorRTVAE that exports (and builds) into cache_dir on first use of each resolution."""
    if backend == "torch":
        return vae
    if backend not in BACKENDS:
        raise ValidationError(f"vae backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "compiled":
        return FastVAE(vae, compile=True, channels_last=True, **options)
    if cache_dir is None:
        raise ValidationError(f"the {backend} VAE backend needs a cache folder for its exported graphs")
    if backend == "onnx":
        return OnnxVAE(source=vae, cache_dir=cache_dir, **options)
    return TensorRTVAE(source=vae, cache_dir=cache_dir, **options)


__all__ = ["BACKENDS", "StepGraphVAE", "OnnxVAE", "TensorRTVAE", "make_vae_backend"]
