"""The Wan2.1 video VAE: a causal 3-D convolutional autoencoder (z_dim 16, stride 4x8x8).

Semantics follow the official `wan/modules/vae2_1.py` (WanVAE_ inside Wan2_1_VAE); parameter
names are its state-dict keys, so the official checkpoint loads with a strict identity map.

Causality and the cache
    Every 3-D convolution looks only backwards in time: a kernel of 3 frames sees the current frame
    and the two before it. The video therefore goes through the network in time chunks, and each
    causal convolution keeps the last 2 frames of its input for the next chunk (zeros before the
    first chunk, which is exactly the zero padding a causal conv over the whole clip would use).
    Temporal resampling keeps its own past: the encoder's stride-2 time conv keeps 1 frame, the
    decoder's frame-doubling time conv 2 frames. This state is a `CausalCache`, an immutable tuple
    of tensors in a fixed layer order. The step functions are pure:

        latent_chunk, cache = vae.encode_step(frames, cache)   # 1 frame, then 4 per step
        pixels, cache       = vae.decode_step(z_frame, cache)  # 1 latent frame per step

    `cache=None` starts a stream. The first step is special in the official model: the encoder's
    temporal downsamplers and the decoder's temporal upsamplers pass the first chunk through
    without their time conv, so the first latent frame is 1 video frame and every later one is 4.
    From the second step on, every cache tensor has a fixed shape (`CausalCache.nbytes` does not
    depend on how many steps ran), so one steady-state step can be exported (ONNX) with the cache
    tensors as explicit inputs and outputs; `decode_stream` yields pixel chunks so that a caller
    can hand frames to a muxer while holding only the cache and one chunk.

    Official quirk kept on purpose: the first decoder step leaves the temporal upsamplers a zero
    history (the official 'Rep' marker), not the first frame, so the second latent frame's time
    conv sees zeros where a plain causal conv would see frame 0.

Numerics
    The official VAE runs in fp32 (NOTES §10). The model computes in the dtype of its parameters
    (`WanVAE(cfg, dtype=torch.bfloat16)` or `.to(torch.bfloat16)` for speed); the normalisation
    and the returned tensors are fp32. Global backend flags are left alone: on a GPU, torch's
    default lets cuDNN run these fp32 convolutions in TF32, as the official run does.

Tiling
    `Tiling(size, overlap)` (latent units) bounds the activation memory of large frames. Only the
    full-resolution stages are tiled: the encoder's convs down to latent resolution and the
    decoder's upsampling stages run per overlapping tile (each tile its own causal stream), and
    their outputs are blended with linear ramps over the overlap; the latent-resolution stages,
    whose attention spans the whole frame, always see the whole frame. So tiling changes only
    what the convs see near tile edges (zero padding instead of the neighbours). Measured with
    recipe weights on smooth input (tests/test_vae.py): default 32/8 tiles on a 384x384 frame,
    decode rel L2 0.018 (error confined to the blend bands), encode 0.007; 8/4 tiles on 96x96
    (12x12 latent), decode 0.08, encode 0.03. Tiling everything, attention included (what
    diffusers' tiled decode does), gave 0.33 on the 384x384 case. Random weights amplify edge
    effects far more than trained ones, so these numbers are pessimistic. Tiling bounds the
    per-step activations only: the tiles' caches together still cover the full frame.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config import VAEConfig
from .errors import CheckpointError, ValidationError

CACHE_FRAMES = 2  # past frames a 3-frame causal kernel needs


# --------------------------------------------------------------------------------------------
# Config from the official constructor arguments
# --------------------------------------------------------------------------------------------

def vae_config_from_official(args: Mapping[str, Any],
                             normalisation: Mapping[str, Sequence[float]] | None = None) -> VAEConfig:
    """VAEConfig from WanVAE_ constructor arguments (a fixture's `constructor_args`) and, if given,
    the latent statistics {'mean': [...], 'std': [...]}."""
    attn = list(args.get("attn_scales", []))
    if attn:
        raise ValidationError(f"attn_scales={attn} is not supported: Wan uses [] (attention only in the middle)")
    known = {"dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales", "temperal_downsample", "dropout"}
    unknown = set(args) - known
    if unknown:
        raise ValidationError(f"unknown WanVAE_ arguments: {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    for name in ("dim", "z_dim", "num_res_blocks"):
        if name in args:
            kwargs[name] = int(args[name])
    if "dim_mult" in args:
        kwargs["dim_mult"] = tuple(int(m) for m in args["dim_mult"])
    if "temperal_downsample" in args:
        kwargs["temporal_downsample"] = tuple(bool(t) for t in args["temperal_downsample"])
    if normalisation is not None:
        kwargs["mean"] = tuple(float(v) for v in normalisation["mean"])
        kwargs["std"] = tuple(float(v) for v in normalisation["std"])
    cfg = VAEConfig(**kwargs)
    return dataclasses.replace(cfg, stride=_strides(cfg))


def _strides(cfg: VAEConfig) -> tuple[int, int, int]:
    return (2 ** sum(cfg.temporal_downsample), 2 ** (len(cfg.dim_mult) - 1), 2 ** (len(cfg.dim_mult) - 1))


def _check_config(cfg: VAEConfig) -> None:
    if len(cfg.temporal_downsample) != len(cfg.dim_mult) - 1:
        raise ValidationError(f"temporal_downsample needs {len(cfg.dim_mult) - 1} entries (one per "
                              f"downsampling level), got {len(cfg.temporal_downsample)}")
    if len(cfg.dim_mult) > 4:
        # The official decoder halves the input width only at levels 1-3 (hard-coded).
        raise ValidationError(f"dim_mult has {len(cfg.dim_mult)} levels; the Wan VAE supports at most 4")
    if len(cfg.mean) != cfg.z_dim or len(cfg.std) != cfg.z_dim:
        raise ValidationError(f"mean/std need z_dim={cfg.z_dim} entries, got {len(cfg.mean)}/{len(cfg.std)}")
    if any(s <= 0 for s in cfg.std):
        raise ValidationError("latent std values must be positive")
    if tuple(cfg.stride) != _strides(cfg):
        raise ValidationError(f"VAEConfig.stride {tuple(cfg.stride)} does not match the architecture "
                              f"({_strides(cfg)} from dim_mult and temporal_downsample)")


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CausalCache:
    """The past frames every causal layer keeps between steps, in a fixed layer order.
    Immutable: a step returns a new cache and leaves the old one untouched."""
    tensors: tuple[Tensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


class _StepState:
    """One step's view of the cache: each causal layer reads its past in call order and leaves
    the frames the next step needs. Lives only for the duration of one step."""

    def __init__(self, cache: CausalCache | None):
        self.past = None if cache is None else cache.tensors
        self.first = cache is None
        self.cursor = 0
        self.new: list[Tensor] = []

    def read(self, like: Tensor, frames: int) -> Tensor | None:
        """The next layer's past: `frames` frames shaped like `like` (None on the first step)."""
        if self.past is None:
            return None
        if self.cursor >= len(self.past):
            raise ValidationError(f"cache has {len(self.past)} tensors, this step needs more: pass the "
                                  "cache returned by the previous step of the same stream")
        t = self.past[self.cursor]
        b, c, _, h, w = like.shape
        if tuple(t.shape) != (b, c, frames, h, w) or t.dtype != like.dtype:
            raise ValidationError(
                f"cache tensor {self.cursor} is {tuple(t.shape)} {t.dtype}, this step needs "
                f"{(b, c, frames, h, w)} {like.dtype}: a cache only continues the stream (same model, "
                "batch and frame size) that made it")
        self.cursor += 1
        return t

    def write(self, t: Tensor) -> None:
        # A copy, so the cache does not keep the (much larger) tensor it was sliced from alive.
        self.new.append(t.clone(memory_format=torch.contiguous_format))

    def finish(self) -> CausalCache:
        if self.past is not None and self.cursor != len(self.past):
            raise ValidationError(f"cache has {len(self.past)} tensors, this model used {self.cursor}")
        return CausalCache(tuple(self.new))


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------

class CausalConv3d(nn.Conv3d):
    """Conv3d that is causal in time: a kernel of kt frames is fed kt-1 past frames from the cache
    (zeros at the start of a stream) and no future ones. Space is zero-padded symmetrically."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int | tuple[int, int, int]):
        kt, kh, kw = (kernel,) * 3 if isinstance(kernel, int) else kernel
        super().__init__(in_dim, out_dim, (kt, kh, kw), padding=(0, kh // 2, kw // 2))
        self.past_frames = kt - 1

    def forward(self, x: Tensor, state: _StepState | None = None) -> Tensor:
        if self.past_frames:
            if state is None:
                raise RuntimeError("a causal conv with a time kernel needs the step state")
            past = state.read(x, self.past_frames)
            if past is None:
                b, c, _, h, w = x.shape
                past = x.new_zeros(b, c, self.past_frames, h, w)
            x = torch.cat([past, x], dim=2)                     # [B, C, past + T, H, W]
            state.write(x[:, :, -self.past_frames:])
        return super().forward(x)


class RMSNorm(nn.Module):
    """x / ||x||_channels * sqrt(C) * gamma. gamma is [C,1,1,1] for video, [C,1,1] for images (the
    official shapes, hence the recipe's >= 2-D rule for it)."""

    def __init__(self, dim: int, video: bool = True):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1, 1) if video else (1, 1))))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            # The norm of 384 low-precision squares loses bits; reduce in fp32 (as diffusers does).
            return (F.normalize(x.float(), dim=1) * self.scale * self.gamma.float()).to(x.dtype)
        return F.normalize(x, dim=1) * self.scale * self.gamma


def _run(layers: nn.Sequential, x: Tensor, state: _StepState) -> Tensor:
    for layer in layers:
        x = layer(x, state) if isinstance(layer, CausalConv3d) else layer(x)
    return x


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # Indices are the checkpoint's: 0 norm, 2 conv, 3 norm, 6 conv (5 was a p=0 dropout).
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3),
            RMSNorm(out_dim), nn.SiLU(), nn.Identity(), CausalConv3d(out_dim, out_dim, 3))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, state: _StepState) -> Tensor:
        return _run(self.residual, x, state) + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame separately (no time mixing)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, video=False)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        y = x.transpose(1, 2).reshape(b * t, c, h, w)                       # [BT, C, H, W]
        qkv = self.to_qkv(self.norm(y)).reshape(b * t, 1, 3 * c, h * w)     # [BT, 1, 3C, HW]
        # Made contiguous as the official does: the attention kernel's summation order depends
        # on the layout, and this one reproduces the official output bit for bit on the CPU.
        qkv = qkv.transpose(2, 3).contiguous()                              # [BT, 1, HW, 3C]
        q, k, v = qkv.chunk(3, dim=-1)                                      # 3 x [BT, 1, HW, C]
        y = F.scaled_dot_product_attention(q, k, v)                         # [BT, 1, HW, C]
        y = self.proj(y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))
        return x + y.reshape(b, t, c, h, w).transpose(1, 2)                 # [B, C, T, H, W]


def _per_frame(module: nn.Module, x: Tensor) -> Tensor:
    """Apply a 2-D module to every frame of [B, C, T, H, W]."""
    b, _, t, _, _ = x.shape
    y = module(x.transpose(1, 2).flatten(0, 1))                             # [BT, C', H', W']
    return y.unflatten(0, (b, t)).transpose(1, 2)                           # [B, C', T, H', W']


class Downsample(nn.Module):
    """Halve H and W (zero pad right/bottom, 3x3 stride-2 conv); if `temporal`, also halve time
    with a stride-2 time conv that takes 1 past frame from the cache. The first chunk (1 frame)
    skips the time conv, so frame 0 stays a frame of its own."""

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: Tensor, state: _StepState) -> Tensor:
        x = _per_frame(self.resample, x)
        if self.time_conv is None:
            return x
        past = state.read(x, 1)
        state.write(x[:, :, -1:])
        if past is None:
            return x
        return self.time_conv(torch.cat([past, x], dim=2))                  # [B, C, T/2, H, W]


class Upsample(nn.Module):
    """Double H and W (nearest, then a 3x3 conv to half the channels); if `temporal`, first double
    time: a causal time conv makes 2C channels, read as two frames per input frame. The first
    chunk skips the time conv (1 latent frame -> 1 video frame) and leaves a zero history."""

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                      nn.Conv2d(dim, dim // 2, 3, padding=1))
        self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1)) if temporal else None

    def forward(self, x: Tensor, state: _StepState) -> Tensor:
        if self.time_conv is not None:
            if state.first:
                b, c, _, h, w = x.shape
                state.write(x.new_zeros(b, c, CACHE_FRAMES, h, w))
            else:
                b, c, t, h, w = x.shape
                x = self.time_conv(x, state)                                # [B, 2C, T, H, W]
                x = x.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5)      # [B, C, T, 2, H, W]
                x = x.reshape(b, c, 2 * t, h, w)                            # [B, C, 2T, H, W]
        return _per_frame(self.resample, x)


# --------------------------------------------------------------------------------------------
# Encoder and decoder
# --------------------------------------------------------------------------------------------

class Encoder(nn.Module):
    def __init__(self, dim: int, out_dim: int, dim_mult: Sequence[int], num_res_blocks: int,
                 temporal_downsample: Sequence[bool]):
        super().__init__()
        widths = [dim * m for m in (1, *dim_mult)]
        self.conv1 = CausalConv3d(3, widths[0], 3)
        blocks: list[nn.Module] = []
        for level, (width_in, width) in enumerate(zip(widths[:-1], widths[1:])):
            for _ in range(num_res_blocks):
                blocks.append(ResidualBlock(width_in, width))
                width_in = width
            if level < len(dim_mult) - 1:
                blocks.append(Downsample(width, temporal_downsample[level]))
        self.downsamples = nn.ModuleList(blocks)
        width = widths[-1]
        self.middle = nn.ModuleList([ResidualBlock(width, width), AttentionBlock(width),
                                     ResidualBlock(width, width)])
        self.head = nn.Sequential(RMSNorm(width), nn.SiLU(), CausalConv3d(width, out_dim, 3))

    def body(self, x: Tensor, state: _StepState) -> Tensor:
        """Pixels -> latent-resolution features: the costly, local part (tiling splits this)."""
        x = self.conv1(x, state)
        for block in self.downsamples:
            x = block(x, state)
        return x

    def tail(self, x: Tensor, state: _StepState) -> Tensor:
        """Middle (with attention over the whole frame) and head, at latent resolution."""
        for block in self.middle:
            x = block(x) if isinstance(block, AttentionBlock) else block(x, state)
        return _run(self.head, x, state)

    def forward(self, x: Tensor, state: _StepState) -> Tensor:
        return self.tail(self.body(x, state), state)


class Decoder(nn.Module):
    def __init__(self, dim: int, z_dim: int, dim_mult: Sequence[int], num_res_blocks: int,
                 temporal_upsample: Sequence[bool]):
        super().__init__()
        widths = [dim * m for m in (dim_mult[-1], *reversed(dim_mult))]
        self.conv1 = CausalConv3d(z_dim, widths[0], 3)
        self.middle = nn.ModuleList([ResidualBlock(widths[0], widths[0]), AttentionBlock(widths[0]),
                                     ResidualBlock(widths[0], widths[0])])
        blocks: list[nn.Module] = []
        for level, (width_in, width) in enumerate(zip(widths[:-1], widths[1:])):
            if level > 0:
                width_in //= 2  # the previous level's Upsample conv halved the channels
            for _ in range(num_res_blocks + 1):
                blocks.append(ResidualBlock(width_in, width))
                width_in = width
            if level < len(dim_mult) - 1:
                blocks.append(Upsample(width, temporal_upsample[level]))
        self.upsamples = nn.ModuleList(blocks)
        self.head = nn.Sequential(RMSNorm(widths[-1]), nn.SiLU(), CausalConv3d(widths[-1], 3, 3))

    def trunk(self, x: Tensor, state: _StepState) -> Tensor:
        """conv1 and the middle (with attention over the whole frame), at latent resolution."""
        x = self.conv1(x, state)
        for block in self.middle:
            x = block(x) if isinstance(block, AttentionBlock) else block(x, state)
        return x

    def branch(self, x: Tensor, state: _StepState) -> Tensor:
        """Latent-resolution features -> pixels: the costly, local part (tiling splits this)."""
        for block in self.upsamples:
            x = block(x, state)
        return _run(self.head, x, state)

    def forward(self, x: Tensor, state: _StepState) -> Tensor:
        return self.branch(self.trunk(x, state), state)


# --------------------------------------------------------------------------------------------
# Tiling
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tiling:
    """Spatial tiles in latent units: `size` x `size` latent pixels (x8 video pixels) overlapping
    by `overlap`. Defaults: 256-pixel tiles with 64 pixels of blend."""
    size: int = 32
    overlap: int = 8

    def __post_init__(self):
        if self.size < 1 or not 0 <= self.overlap < self.size:
            raise ValidationError(f"tiling needs size >= 1 and 0 <= overlap < size, got size={self.size}, "
                                  f"overlap={self.overlap}")

    def spans(self, n: int) -> list[tuple[int, int]]:
        """Tile [start, end) intervals covering 0..n; the last tile is aligned to the end."""
        if n <= self.size:
            return [(0, n)]
        starts = list(range(0, n - self.size, self.size - self.overlap)) + [n - self.size]
        return [(s, s + self.size) for s in starts]


def _ramp(start: int, end: int, n: int, ramp: int, scale: int) -> Tensor:
    """1-D blend weight of one tile [start, end) of an axis of length n (latent units), at
    `scale` samples per latent pixel: linear over `ramp` latent pixels at every edge that has a
    neighbouring tile, so two tiles overlapping by exactly `ramp` sum to 1 there."""
    length = (end - start) * scale
    w = torch.ones(length, dtype=torch.float32)
    r = ramp * scale
    if r:
        up = (torch.arange(r, dtype=torch.float32) + 0.5) / r
        if start > 0:
            w[:r] = torch.minimum(w[:r], up)
        if end < n:
            w[-r:] = torch.minimum(w[-r:], up.flip(0))
    return w


class _TileGrid:
    """Tiles of an (h, w) latent grid and their blend weights at `scale` samples per latent pixel."""

    def __init__(self, tiling: Tiling, h: int, w: int, scale: int, device: torch.device):
        self.scale, self.size = scale, (h * scale, w * scale)
        self.tiles: list[tuple[tuple[int, int, int, int], Tensor]] = []
        total = torch.zeros(self.size, dtype=torch.float32)
        for y0, y1 in tiling.spans(h):
            for x0, x1 in tiling.spans(w):
                weight = torch.outer(_ramp(y0, y1, h, tiling.overlap, scale),
                                     _ramp(x0, x1, w, tiling.overlap, scale))
                total[y0 * scale:y1 * scale, x0 * scale:x1 * scale] += weight
                self.tiles.append(((y0, y1, x0, x1), weight.to(device)))
        self.inv_total = (1.0 / total).to(device)

    def add(self, out: Tensor | None, index: int, part: Tensor) -> Tensor:
        """Accumulate tile `index`'s weighted values into `out` (fp32; made on the first tile)."""
        if out is None:
            out = part.new_zeros(*part.shape[:-2], *self.size, dtype=torch.float32)
        (y0, y1, x0, x1), weight = self.tiles[index]
        s = self.scale
        out[..., y0 * s:y1 * s, x0 * s:x1 * s] += part.float() * weight
        return out

    def normalise(self, out: Tensor) -> Tensor:
        return out * self.inv_total


@dataclass(frozen=True)
class _TiledCache:
    """A tiled stream's state: the whole-frame part's cache and one cache per tile."""
    whole: CausalCache
    tiles: tuple[CausalCache, ...]

    @property
    def nbytes(self) -> int:
        return self.whole.nbytes + sum(c.nbytes for c in self.tiles)


# --------------------------------------------------------------------------------------------
# The VAE
# --------------------------------------------------------------------------------------------

class WanVAE(nn.Module):
    """encode: video [B,3,1+4k,H,W] in [-1,1] -> normalised latent mean [B,16,1+k,H/8,W/8];
    decode: normalised latent -> video in [-1,1]. See the module docstring for the cache."""

    def __init__(self, config: VAEConfig = VAEConfig(), *, dtype: torch.dtype = torch.float32):
        super().__init__()
        _check_config(config)
        self.config = config
        z = config.z_dim
        self.encoder = Encoder(config.dim, 2 * z, config.dim_mult, config.num_res_blocks,
                               config.temporal_downsample)
        self.conv1 = CausalConv3d(2 * z, 2 * z, 1)   # -> (mean, log variance); only the mean is used
        self.conv2 = CausalConv3d(z, z, 1)
        self.decoder = Decoder(config.dim, z, config.dim_mult, config.num_res_blocks,
                               tuple(reversed(config.temporal_downsample)))
        self.to(dtype)

    # ---- shapes and checks ---------------------------------------------------------------

    @property
    def time_stride(self) -> int:
        return self.config.stride[0]

    @property
    def space_stride(self) -> int:
        return self.config.stride[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    def _stats(self, device: torch.device) -> tuple[Tensor, Tensor]:
        # Kept out of the module's buffers: the statistics stay fp32 whatever dtype the weights take,
        # and a meta-built model needs nothing materialised for them.
        shape = (1, self.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.config.mean, dtype=torch.float32, device=device).view(shape)
        inv_std = 1.0 / torch.tensor(self.config.std, dtype=torch.float32, device=device).view(shape)
        return mean, inv_std

    def _check_video(self, video: Tensor, what: str = "video") -> None:
        if not isinstance(video, Tensor) or video.dim() != 5:
            raise ValidationError(f"{what} must be a [B, 3, T, H, W] tensor, got "
                                  f"{tuple(video.shape) if isinstance(video, Tensor) else type(video).__name__}")
        if not video.is_floating_point():
            raise ValidationError(f"{what} must be floating point in [-1, 1], got {video.dtype}")
        b, c, t, h, w = video.shape
        if c != 3:
            raise ValidationError(f"{what} must have 3 (RGB) channels on dim 1, got {c} (shape {tuple(video.shape)})")
        s = self.space_stride
        if h < s or w < s or h % s or w % s:
            raise ValidationError(f"{what} height and width must be positive multiples of {s}, got {h}x{w}: "
                                  "resize or crop the frames")
        if b < 1:
            raise ValidationError(f"{what} has an empty batch")

    def _check_frames(self, video: Tensor) -> None:
        t = video.shape[2]
        if t < 1 or (t - 1) % self.time_stride:
            n = self.time_stride
            raise ValidationError(f"video has {t} frames; the VAE needs 1 + {n}k frames "
                                  f"(e.g. {1 + n * max(0, (t - 1) // n)} or {1 + n * (max(0, t - 1) // n + 1)})")

    def _check_latent(self, latent: Tensor) -> None:
        if not isinstance(latent, Tensor) or latent.dim() != 5:
            raise ValidationError("latent must be a [B, z_dim, T, h, w] tensor, got "
                                  f"{tuple(latent.shape) if isinstance(latent, Tensor) else type(latent).__name__}")
        if not latent.is_floating_point():
            raise ValidationError(f"latent must be floating point, got {latent.dtype}")
        b, c, t, h, w = latent.shape
        if c != self.config.z_dim:
            raise ValidationError(f"latent must have z_dim={self.config.z_dim} channels on dim 1, got {c}")
        if min(b, t, h, w) < 1:
            raise ValidationError(f"latent has an empty dimension: {tuple(latent.shape)}")

    # ---- steps (the exportable units) ------------------------------------------------------

    def _check_chunk(self, frames: Tensor, first: bool) -> None:
        self._check_video(frames, "frames")
        want = 1 if first else self.time_stride
        if frames.shape[2] != want:
            raise ValidationError(f"encode_step takes {want} frame(s) "
                                  f"({'first chunk' if first else 'after the first chunk'}), "
                                  f"got {frames.shape[2]}")

    def _check_z_frame(self, z_frame: Tensor) -> None:
        self._check_latent(z_frame)
        if z_frame.shape[2] != 1:
            raise ValidationError(f"decode_step takes one latent frame, got {z_frame.shape[2]}")

    def _normalise(self, h: Tensor) -> Tensor:
        """Encoder output [B, 2z, T, h, w] -> normalised mean [B, z, T, h, w] (fp32)."""
        mu = self.conv1(h)[:, :self.config.z_dim].float()
        mean, inv_std = self._stats(mu.device)
        return (mu - mean) * inv_std

    def _denormalise(self, z: Tensor) -> Tensor:
        """Normalised latent -> the decoder's input (after conv2), in the compute dtype."""
        mean, inv_std = self._stats(z.device)
        z = z.float() / inv_std + mean             # the official inverse: divide by 1/std
        return self.conv2(z.to(self.dtype))

    def encode_step(self, frames: Tensor, cache: CausalCache | None) -> tuple[Tensor, CausalCache]:
        """One encoder chunk: frames [B,3,1,H,W] when cache is None (stream start), else
        [B,3,4,H,W] -> (normalised latent mean [B,z,1,H/8,W/8] fp32, new cache)."""
        self._check_chunk(frames, cache is None)
        state = _StepState(cache)
        h = self.encoder(frames.to(self.dtype), state)                      # [B, 2z, 1, h, w]
        return self._normalise(h), state.finish()

    def decode_step(self, z_frame: Tensor, cache: CausalCache | None, *,
                    clamp: bool = True) -> tuple[Tensor, CausalCache]:
        """One decoder step: normalised latent frame [B,z,1,h,w] -> (pixels [B,3,n,8h,8w] fp32,
        new cache), n = 1 when cache is None (stream start), else 4."""
        self._check_z_frame(z_frame)
        state = _StepState(cache)
        x = self.decoder(self._denormalise(z_frame), state).float()
        return (x.clamp(-1.0, 1.0) if clamp else x), state.finish()

    # Tiled steps: the full-resolution stages run tile by tile (each tile its own causal stream),
    # the latent-resolution stages (with the frame-global attention) on the whole frame.

    def _encode_tiled_step(self, frames: Tensor, cache: _TiledCache | None,
                           grid: _TileGrid) -> tuple[Tensor, _TiledCache]:
        self._check_chunk(frames, cache is None)
        s, features, tile_caches = self.space_stride, None, []
        for j, ((y0, y1, x0, x1), _) in enumerate(grid.tiles):
            state = _StepState(None if cache is None else cache.tiles[j])
            tile = frames[..., y0 * s:y1 * s, x0 * s:x1 * s].to(self.dtype)
            features = grid.add(features, j, self.encoder.body(tile, state))  # [B, C, 1, h, w]
            tile_caches.append(state.finish())
        state = _StepState(None if cache is None else cache.whole)
        h = self.encoder.tail(grid.normalise(features).to(self.dtype), state)
        return self._normalise(h), _TiledCache(state.finish(), tuple(tile_caches))

    def _decode_tiled_step(self, z_frame: Tensor, cache: _TiledCache | None, grid: _TileGrid, *,
                           clamp: bool) -> tuple[Tensor, _TiledCache]:
        self._check_z_frame(z_frame)
        state = _StepState(None if cache is None else cache.whole)
        x = self.decoder.trunk(self._denormalise(z_frame), state)          # [B, C, 1, h, w]
        whole = state.finish()
        pixels, tile_caches = None, []
        for j, ((y0, y1, x0, x1), _) in enumerate(grid.tiles):
            state = _StepState(None if cache is None else cache.tiles[j])
            pixels = grid.add(pixels, j, self.decoder.branch(x[..., y0:y1, x0:x1], state))
            tile_caches.append(state.finish())
        pixels = grid.normalise(pixels)
        return (pixels.clamp(-1.0, 1.0) if clamp else pixels), _TiledCache(whole, tuple(tile_caches))

    # ---- whole clips ------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, video: Tensor, *, tiling: Tiling | None = None) -> Tensor:
        """video [B,3,1+4k,H,W] in [-1,1] -> normalised latent mean [B,z,1+k,H/8,W/8] (fp32)."""
        self._check_video(video)
        self._check_frames(video)
        b, _, t, h, w = video.shape
        s, n = self.space_stride, self.time_stride
        chunks = [video[:, :, :1]] + [video[:, :, i:i + n] for i in range(1, t, n)]
        out = torch.empty(b, self.config.z_dim, len(chunks), h // s, w // s, device=video.device)
        grid = None
        if tiling is not None and max(h, w) // s > tiling.size:
            grid = _TileGrid(tiling, h // s, w // s, 1, video.device)
        cache = None
        for i, chunk in enumerate(chunks):
            if grid is None:
                out[:, :, i:i + 1], cache = self.encode_step(chunk, cache)
            else:
                out[:, :, i:i + 1], cache = self._encode_tiled_step(chunk, cache, grid)
        return out

    @torch.no_grad()
    def decode_stream(self, latent: Tensor, *, tiling: Tiling | None = None,
                      clamp: bool = True) -> Iterator[Tensor]:
        """Yield pixel chunks [B,3,n,8h,8w] (fp32; n = 1 for the first latent frame, 4 after) while
        holding only the cache: frames can go to a muxer as they come."""
        self._check_latent(latent)
        t, h, w = latent.shape[2:]
        grid = None
        if tiling is not None and max(h, w) > tiling.size:
            grid = _TileGrid(tiling, h, w, self.space_stride, latent.device)
        cache = None
        for i in range(t):
            if grid is None:
                pixels, cache = self.decode_step(latent[:, :, i:i + 1], cache, clamp=clamp)
            else:
                pixels, cache = self._decode_tiled_step(latent[:, :, i:i + 1], cache, grid, clamp=clamp)
            yield pixels

    @torch.no_grad()
    def decode(self, latent: Tensor, *, tiling: Tiling | None = None, clamp: bool = True) -> Tensor:
        """Normalised latent [B,z,T,h,w] -> video [B,3,1+4(T-1),8h,8w], fp32, clamped to [-1,1]
        unless clamp=False (the official decoder's raw output)."""
        self._check_latent(latent)
        b, _, t, h, w = latent.shape
        s = self.space_stride
        out = torch.empty(b, 3, 1 + self.time_stride * (t - 1), h * s, w * s, device=latent.device)
        start = 0
        for pixels in self.decode_stream(latent, tiling=tiling, clamp=clamp):
            out[:, :, start:start + pixels.shape[2]] = pixels
            start += pixels.shape[2]
        return out


# --------------------------------------------------------------------------------------------
# diffusers' AutoencoderKLWan layout
# --------------------------------------------------------------------------------------------

_DIFFUSERS_RESIDUAL = {"residual.0.": "norm1.", "residual.2.": "conv1.", "residual.3.": "norm2.",
                       "residual.6.": "conv2.", "shortcut.": "conv_shortcut."}
_UPSAMPLER_KEY = re.compile(r"^decoder\.upsamples\.(\d+)\.(resample|time_conv)\.")


def _diffusers_vae_key(key: str, num_res_blocks: int) -> str:
    def block(rest: str) -> str:
        for old, new in _DIFFUSERS_RESIDUAL.items():
            if rest.startswith(old):
                return new + rest[len(old):]
        return rest                                   # resample.1.*, time_conv.*

    for old, new in (("conv1.", "quant_conv."), ("conv2.", "post_quant_conv.")):
        if key.startswith(old):
            return new + key[len(old):]
    part, _, rest = key.partition(".")               # encoder | decoder
    if part not in ("encoder", "decoder"):
        raise CheckpointError(f"VAE key {key!r} has no diffusers name")
    for old, new in (("conv1.", "conv_in."), ("head.0.", "norm_out."), ("head.2.", "conv_out.")):
        if rest.startswith(old):
            return f"{part}.{new}{rest[len(old):]}"
    if m := re.fullmatch(r"middle\.(\d)\.(.*)", rest):
        i, tail = int(m[1]), m[2]
        if i == 1:
            return f"{part}.mid_block.attentions.0.{tail}"
        return f"{part}.mid_block.resnets.{i // 2}.{block(tail)}"
    if m := re.fullmatch(r"downsamples\.(\d+)\.(.*)", rest):
        return f"{part}.down_blocks.{m[1]}.{block(m[2])}"  # diffusers keeps the encoder's flat list
    if m := re.fullmatch(r"upsamples\.(\d+)\.(.*)", rest):
        # Per level: num_res_blocks + 1 residual blocks, then one upsampler (not after the last).
        level, j = divmod(int(m[1]), num_res_blocks + 2)
        if j <= num_res_blocks:
            return f"{part}.up_blocks.{level}.resnets.{j}.{block(m[2])}"
        return f"{part}.up_blocks.{level}.upsamplers.0.{m[2]}"
    raise CheckpointError(f"VAE key {key!r} has no diffusers name")


def official_vae_to_diffusers(state: Mapping[str, Tensor], num_res_blocks: int | None = None) -> dict[str, Tensor]:
    """Official WanVAE_ state dict (this module's names) -> diffusers `AutoencoderKLWan` state dict.

    Only names change; tensors are shared, not copied. The decoder's per-level block count comes
    from the first upsampler's index (num_res_blocks + 1) unless `num_res_blocks` is given. The
    latent mean/std are constructor arguments on both sides (`latents_mean`/`latents_std` there).
    """
    if num_res_blocks is None:
        firsts = [int(m[1]) for k in state if (m := _UPSAMPLER_KEY.match(k))]
        if not firsts:
            raise ValidationError("cannot infer num_res_blocks from a VAE state dict without decoder "
                                  "upsamplers: pass num_res_blocks")
        num_res_blocks = min(firsts) - 1
    return {_diffusers_vae_key(k, num_res_blocks): v for k, v in state.items()}
