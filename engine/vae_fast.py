"""Fast paths for the torch VAE, as transforms over a built WanVAE (engine/vae.py is unchanged).

`VAEStep` turns one encoder/decoder step into a pure function of tensors,
`forward(x, *cache) -> (y, *new_cache)`: the unit that is exported to ONNX (export/onnx.py) and
compiled here. `StreamingVAE` gives anything with `encode_step`/`decode_step` the WanVAE clip
interface (encode, decode_stream, decode). `FastVAE` runs the steps

  - channels_last_3d: activations and 3-D conv weights in NDHWC, the layout cuDNN's tensor-core
    convolutions want (NCDHW makes it transpose around every conv); the causal cache is
    kept in the same layout between steps, so cache + input concatenate without a relayout;
  - compiled: each step (the first, and the steady state) compiled once with static shapes, so
    Inductor fuses RMS_norm + SiLU (+ the fp32 upcast of the bf16 path) into one pass per norm
    and lets the producers of a concatenated cache + input write straight into the concat buffer.

The numbers are the lead's to measure (bench/vae.py); on the CPU the paths agree with the
eager VAE to fp32 rounding (tests/test_vae_fast.py).
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn
from torch import Tensor

from .errors import ValidationError
from .vae import CausalCache, Tiling, WanVAE


class VAEStep(nn.Module):
    """One encoder or decoder step of a WanVAE: forward(x, *cache) -> (y, *new_cache).
    `first=True` is the stream start (no cache inputs). The decoder output is not clamped."""

    def __init__(self, vae: WanVAE, part: str, first: bool):
        super().__init__()
        if part not in ("encode", "decode"):
            raise ValidationError(f"part must be 'encode' or 'decode', got {part!r}")
        self.vae, self.part, self.first = vae, part, first

    def forward(self, x: Tensor, *cache: Tensor) -> tuple[Tensor, ...]:
        past = None if self.first else CausalCache(tuple(cache))
        if self.part == "decode":
            y, new = self.vae.decode_step(x, past, clamp=False)
        else:
            y, new = self.vae.encode_step(x, past)
        return (y, *new.tensors)


class StreamingVAE:
    """encode / decode_stream / decode over `encode_step` and `decode_step` (WanVAE's
    semantics; a batch runs as one stream per item; no tiling). Needs `config`."""

    config = None

    @property
    def time_stride(self) -> int:
        return self.config.stride[0]

    @property
    def space_stride(self) -> int:
        return self.config.stride[1]

    @staticmethod
    def _no_tiling(tiling: Tiling | None) -> None:
        if tiling is not None:
            raise ValidationError("this VAE backend does not tile; use --vae-backend torch for tiling")

    @torch.no_grad()
    def encode(self, video: Tensor, *, tiling: Tiling | None = None) -> Tensor:
        """video [B,3,1+4k,H,W] in [-1,1] -> normalised latent mean [B,z,1+k,H/8,W/8] (fp32)."""
        self._no_tiling(tiling)
        WanVAE._check_video(self, video)     # the checks only read config and the strides
        WanVAE._check_frames(self, video)
        b, _, t, h, w = video.shape
        s, n = self.space_stride, self.time_stride
        out = torch.empty(b, self.config.z_dim, 1 + (t - 1) // n, h // s, w // s, device=video.device)
        for i in range(b):
            item = video[i:i + 1]
            chunks = [item[:, :, :1]] + [item[:, :, j:j + n] for j in range(1, t, n)]
            cache = None
            for k, chunk in enumerate(chunks):
                latent, cache = self.encode_step(chunk, cache)
                out[i:i + 1, :, k:k + 1] = latent
        return out

    @torch.no_grad()
    def decode_stream(self, latent: Tensor, *, tiling: Tiling | None = None,
                      clamp: bool = True) -> Iterator[Tensor]:
        """Pixel chunks [B,3,n,8h,8w] (fp32; n = 1 for the first latent frame, 4 after)."""
        self._no_tiling(tiling)
        WanVAE._check_latent(self, latent)
        b, t = latent.shape[0], latent.shape[2]
        caches: list[CausalCache | None] = [None] * b
        for k in range(t):
            parts = []
            for i in range(b):
                pixels, caches[i] = self.decode_step(latent[i:i + 1, :, k:k + 1], caches[i], clamp=clamp)
                parts.append(pixels.to(latent.device))
            yield parts[0] if b == 1 else torch.cat(parts, dim=0)

    @torch.no_grad()
    def decode(self, latent: Tensor, *, tiling: Tiling | None = None, clamp: bool = True) -> Tensor:
        """Normalised latent [B,z,T,h,w] -> video [B,3,1+4(T-1),8h,8w], fp32."""
        WanVAE._check_latent(self, latent)
        b, _, t, h, w = latent.shape
        s = self.space_stride
        out = torch.empty(b, 3, 1 + self.time_stride * (t - 1), h * s, w * s, device=latent.device)
        start = 0
        for pixels in self.decode_stream(latent, tiling=tiling, clamp=clamp):
            out[:, :, start:start + pixels.shape[2]] = pixels
            start += pixels.shape[2]
        return out


def to_channels_last(vae: WanVAE) -> WanVAE:
    """Put the conv weights of `vae` in channels-last layouts, in place (values unchanged)."""
    for module in vae.modules():
        if isinstance(module, (nn.Conv3d, nn.Conv2d)):
            fmt = torch.channels_last_3d if module.weight.dim() == 5 else torch.channels_last
            module.weight.data = module.weight.data.contiguous(memory_format=fmt)
    return vae


def _channels_last(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last_3d) if t.dim() == 5 else t


class FastVAE(StreamingVAE):
    """The WanVAE interface with channels-last and/or compiled steps (see the module docstring).
    `channels_last` changes the layout of `vae`'s conv weights in place. Compiled: each
    resolution adds 4 graphs (encode/decode x first/steady) under dynamo's recompile limit
    (8 by default), so a process serving more than two resolutions falls back to eager for the
    rest (dynamo warns); raise torch._dynamo.config.recompile_limit where that matters."""

    def __init__(self, vae: WanVAE, *, compile: bool = False, channels_last: bool = False,
                 compile_options: dict | None = None):
        self.vae = vae.eval()
        self.config = vae.config
        self.channels_last = channels_last
        if channels_last:
            to_channels_last(vae)
        self._steps: dict[tuple[str, bool], nn.Module] = {}
        for part in ("encode", "decode"):
            for first in (True, False):
                step = VAEStep(vae, part, first)
                if compile:
                    # Static shapes: one graph per resolution; the first step is its own graph.
                    step = torch.compile(step, dynamic=False, **(compile_options or {}))
                self._steps[(part, first)] = step

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    def _run(self, part: str, x: Tensor, cache: CausalCache | None) -> tuple[Tensor, CausalCache]:
        past = () if cache is None else cache.tensors
        if self.channels_last:
            x = _channels_last(x)
        with torch.no_grad():
            out = self._steps[(part, cache is None)](x, *past)
        new = out[1:]
        if self.channels_last:
            # The step writes its cache contiguous; keep it NDHWC so the next step's
            # cache + input concatenation stays in one layout (2 frames per layer: cheap).
            new = tuple(_channels_last(t) for t in new)
        return out[0], CausalCache(tuple(new))

    def encode_step(self, frames: Tensor, cache: CausalCache | None) -> tuple[Tensor, CausalCache]:
        return self._run("encode", frames, cache)

    def decode_step(self, z_frame: Tensor, cache: CausalCache | None, *,
                    clamp: bool = True) -> tuple[Tensor, CausalCache]:
        y, cache = self._run("decode", z_frame, cache)
        return (y.clamp(-1.0, 1.0) if clamp else y), cache


__all__ = ["VAEStep", "StreamingVAE", "FastVAE", "to_channels_last"]
