"""The Wan2.2-Animate DiT (WanAnimateModel), all of it in this one file.

Reads top to bottom: small functions (time embedding, RoPE, norms) -> the LIA motion encoder ->
the face encoder and face-adapter block -> attention modules -> the transformer block -> the model.

Parameter names are the official checkpoint's key names (wan/modules/animate/model_animate.py),
so an official state dict loads with an identity map; engine/loader.py maps the diffusers layout.

Precision. The numerics follow the official code (reference NOTES §10) with explicit casts
instead of autocast, so one code path serves both:
- fp32 weights: everything in fp32 (matches the fp32 parity fixtures);
- bf16 weights ("reference precision"): GEMMs and convolutions in bf16, and fp32 islands where the
  official code has them: time embedding and projection, modulation, LayerNorm/RMSNorm math, RoPE,
  the gated residual adds (so the residual stream is fp32 after block 0), the head, and the motion
  encoder's QR/direction step. The prediction is rounded to bf16 before it is returned as fp32,
  as the official unpatchify einsum under autocast does.
The compute dtype is the dtype of `patch_embedding.weight`; transforms (quantization, offload)
may change other weights but never that one.

Work that does not depend on the denoising step (motion/face features, the text+image context and
its cross-attention keys/values, pose tokens, RoPE tables) is done once by `prepare()` and reused by
every `denoise()` call of a segment; `forward()` does both, like the official forward.

Fused kernels. Modules with a `kernels` attribute (Block, SelfAttention, CrossAttention, FaceBlock,
and the motion encoder's Blur, BiasLeakyReLU, MotionResBlock) have a second path through the Triton
kernels in kernels/ (same math, fewer passes over memory; the DiT's kernels round where the
reference rounds, the motion encoder's once per fused chain). It is off by default;
engine/transforms.py `use_kernels` turns it on, and each call still falls back to the reference
unless `kernels.supported(...)` says the kernels can take its tensors (CUDA, triton installed,
bf16/fp32).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from .attention import attention
from .config import DiTConfig

# The fused kernels' ops (kernels/*.py), registered by kernels.load(); only called when a module's
# `kernels` flag is set and kernels.supported() agrees.
ops = torch.ops.wanimate


# ----------------------------------------------------------------------------------------------
# Small functions


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] timesteps -> [B, dim] fp32: cat(cos, sin) of t * 10000^(-i/half), computed in float64."""
    half = dim // 2
    t = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


def rope_angles(split: tuple[int, int, int], max_len: int, theta: float) -> list[torch.Tensor]:
    """Per axis (t, h, w): [max_len, dim_axis/2] float64 angles pos * theta^(-2i/dim_axis).
    Each axis has its own frequency ladder (denominator 44 or 42 at head_dim 128)."""
    tables = []
    for d in split:
        # Built on the CPU even when the model is constructed on the meta device.
        inv = 1.0 / torch.pow(theta, torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d)
        tables.append(torch.outer(torch.arange(max_len, dtype=torch.float64, device="cpu"), inv))
    return tables


def rope_cos_sin(grid: tuple[int, int, int], tables: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [L, head_dim/2] fp32 for tokens in (f, h, w) order: token (f, i, j) rotates its
    pairs with [angle_t(f), angle_h(i), angle_w(j)]. The reference frame is f = 0."""
    f, h, w = grid
    at, ah, aw = (t.to(device) for t in tables)
    angles = torch.cat([
        at[:f].view(f, 1, 1, -1).expand(f, h, w, -1),
        ah[:h].view(1, h, 1, -1).expand(f, h, w, -1),
        aw[:w].view(1, 1, w, -1).expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, -1)
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, L, H, D] in fp32; returns fp32."""
    b, l, h, d = x.shape
    xr = x.float().view(b, l, h, d // 2, 2)
    x0, x1 = xr[..., 0], xr[..., 1]
    c, s = cos.view(1, l, 1, -1), sin.view(1, l, 1, -1)
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).view(b, l, h, d)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Official WanRMSNorm: normalise in fp32, cast back to x's dtype, then scale."""
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight.to(x.dtype)


def layer_norm(x: torch.Tensor, eps: float, weight=None, bias=None) -> torch.Tensor:
    """LayerNorm computed in fp32 (optionally affine), returned as fp32."""
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    return F.layer_norm(x.float(), x.shape[-1:], w, b, eps)


def fp32_linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """A Linear inside one of the official fp32 regions: bf16-stored weights are upcast."""
    bias = layer.bias.float() if layer.bias is not None else None
    return F.linear(x.float(), layer.weight.float(), bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


# ----------------------------------------------------------------------------------------------
# LIA motion encoder (motion_encoder.*): one 512x512 face crop -> a 512-d motion vector.
# StyleGAN2-style "equalized learning rate" layers: weights are stored at unit scale and
# multiplied by 1/sqrt(fan_in) at run time, so checkpoint values must not be rescaled.


class EqualConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.scale = 1.0 / math.sqrt(cin * kernel * kernel)
        self.stride, self.padding = stride, padding

    def forward(self, x):
        return F.conv2d(x, self.weight * self.scale, self.bias, stride=self.stride, padding=self.padding)


class EqualLinear(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.scale = 1.0 / math.sqrt(cin)

    def forward(self, x):
        return F.linear(x, self.weight * self.scale, self.bias)


def bias_leaky_relu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """StyleGAN2's fused_leaky_relu: leaky_relu(x + bias, 0.2) * sqrt(2), bias [1, C, 1, 1]."""
    return F.leaky_relu(x + bias, 0.2) * math.sqrt(2.0)


def merge_skip(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """A motion res block's output: (x + skip) / sqrt(2)."""
    return (x + skip) / math.sqrt(2.0)


def blur_kernel() -> torch.Tensor:
    """[1, 3, 3, 1] (x) [1, 3, 3, 1] / 64: the 4x4 binomial low-pass before a stride-2 conv."""
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    return torch.outer(k, k) / 64.0


def blur(x: torch.Tensor, kernel: torch.Tensor, pad: tuple[int, int]) -> torch.Tensor:
    """Depthwise 4x4 `kernel` over x [N, C, H, W] zero-padded by pad = (before, after) on both axes."""
    c = x.shape[1]
    x = F.pad(x, [pad[0], pad[1], pad[0], pad[1]])
    return F.conv2d(x, kernel.to(x.dtype).expand(c, 1, 4, 4), groups=c)


class BiasLeakyReLU(nn.Module):
    """leaky_relu(x + bias, 0.2) * sqrt(2); the bias is stored as [1, C, 1, 1]."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.kernels = False

    def forward(self, x):
        if self.kernels and kernels.supported(x, self.bias):
            return ops.bias_act(x, self.bias.view(-1))                     # one pass, one rounding
        return bias_leaky_relu(x, self.bias)


class Blur(nn.Module):
    """Depthwise [1,3,3,1]x[1,3,3,1]/64 low-pass before a stride-2 conv (anti-aliasing).
    The kernel is a persistent buffer because the official checkpoint stores it."""

    def __init__(self, pad: tuple[int, int]):
        super().__init__()
        self.register_buffer("kernel", blur_kernel())
        self.pad = pad
        self.kernels = False

    def forward(self, x):
        if self.kernels and kernels.supported(x):
            return ops.blur(x, *self.pad)                                  # the padding is the kernel's mask
        return blur(x, self.kernel, self.pad)


class MotionResBlock(nn.Module):
    """3x3 conv, then blur + stride-2 3x3 conv; a blurred stride-2 1x1 skip; (out + skip)/sqrt(2)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Sequential(EqualConv2d(cin, cin, 3, padding=1), BiasLeakyReLU(cin))
        self.conv2 = nn.Sequential(Blur((2, 2)), EqualConv2d(cin, cout, 3, stride=2), BiasLeakyReLU(cout))
        self.skip = nn.Sequential(Blur((1, 1)), EqualConv2d(cin, cout, 1, stride=2))
        self.kernels = False

    def forward(self, x):
        h = self.conv1(x)
        skip = self.skip(x)
        act = self.conv2[2]
        if self.kernels and kernels.supported(h, act.bias):
            # conv2's bias + leaky ReLU and the merge with the skip in one pass.
            return ops.bias_act(self.conv2[1](self.conv2[0](h)), act.bias.view(-1), skip)
        return merge_skip(self.conv2(h), skip)


class MotionAppearanceNet(nn.Module):
    """convs.0: 1x1 conv; convs.1..n: ResBlocks halving the resolution down to 4x4; last: 4x4 conv."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        size = cfg.motion_size
        convs = [nn.Sequential(EqualConv2d(3, cfg.motion_channels(size), 1), BiasLeakyReLU(cfg.motion_channels(size)))]
        res = size
        while res > 4:
            convs.append(MotionResBlock(cfg.motion_channels(res), cfg.motion_channels(res // 2)))
            res //= 2
        convs.append(EqualConv2d(cfg.motion_channels(4), cfg.motion_encoder_dim, 4))
        self.convs = nn.ModuleList(convs)

    def forward(self, x):  # [N, 3, S, S] -> [N, motion_encoder_dim]
        for conv in self.convs:
            x = conv(x)
        return x.flatten(1)


class MotionEncoderTrunk(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.net_app = MotionAppearanceNet(cfg)
        d = cfg.motion_encoder_dim
        # Five EqualLinear layers with no activation between them (as in the official model).
        self.fc = nn.Sequential(*[EqualLinear(d, d) for _ in range(4)], EqualLinear(d, cfg.motion_dim))


class MotionDirection(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.motion_encoder_dim, cfg.motion_dim))


class MotionSynthesis(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.direction = MotionDirection(cfg)


class MotionEncoder(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.enc = MotionEncoderTrunk(cfg)
        self.dec = MotionSynthesis(cfg)

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        """faces [N, 3, S, S] in [-1, 1] -> motion [N, motion_encoder_dim] fp32."""
        alpha = self.enc.fc(self.enc.net_app(faces))                        # [N, motion_dim]
        w = self.dec.direction.weight
        # The motion basis is the Q of a QR decomposition, taken in fp32 even for bf16 weights.
        basis = torch.linalg.qr((w + 1e-8).float()).Q.to(w.dtype)         # [D, motion_dim]
        return alpha.float() @ basis.float().T                             # sum_j alpha_j * Q[:, j]


# ----------------------------------------------------------------------------------------------
# Face encoder (motion vectors over time -> 4 tokens per latent frame) and face-adapter blocks.


class CausalConv1d(nn.Module):
    """Conv1d with replicate padding of kernel-1 frames on the left (causal in time)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        self.pad = kernel - 1
        self.conv = nn.Conv1d(cin, cout, kernel, stride=stride)

    def forward(self, x):  # [B, C, T]
        return self.conv(F.pad(x, (self.pad, 0), mode="replicate"))


class FaceEncoder(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.heads, self.hidden, self.eps = cfg.face_heads, cfg.face_hidden, 1e-6
        self.conv1_local = CausalConv1d(cfg.motion_encoder_dim, cfg.face_hidden * cfg.face_heads, 3, stride=1)
        self.conv2 = CausalConv1d(cfg.face_hidden, cfg.face_hidden, 3, stride=2)
        self.conv3 = CausalConv1d(cfg.face_hidden, cfg.face_hidden, 3, stride=2)
        self.out_proj = nn.Linear(cfg.face_hidden, cfg.dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, cfg.dim))

    def forward(self, motion: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """motion [B, T, D] -> [B, F, heads + 1, dim]; T = 4(F-1)+1 pixel frames -> F latent frames."""
        b = motion.shape[0]
        x = self.conv1_local(motion.transpose(1, 2).to(dtype))               # [B, heads*hidden, T]
        x = x.unflatten(1, (self.heads, self.hidden)).flatten(0, 1)         # [B*heads, hidden, T]
        x = F.silu(layer_norm(x.transpose(1, 2), self.eps))                 # [B*heads, T, hidden] fp32
        for conv in (self.conv2, self.conv3):                               # T -> ceil(T/2), twice
            x = conv(x.transpose(1, 2).to(dtype)).transpose(1, 2)
            x = F.silu(layer_norm(x, self.eps))
        x = self.out_proj(x.to(dtype))                                      # [B*heads, F, dim]
        x = x.unflatten(0, (b, self.heads)).transpose(1, 2)                 # [B, F, heads, dim]
        pad = self.padding_tokens.to(x.dtype).expand(b, x.shape[1], 1, -1)
        return torch.cat([x, pad], dim=2)


class FaceBlock(nn.Module):
    """Each latent frame's tokens attend to that frame's own 5 motion tokens (block-diagonal in
    time); the output is added to the residual stream after every `face_adapter_every`-th block."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.heads, self.eps = cfg.num_heads, 1e-6
        self.linear1_kv = nn.Linear(cfg.dim, 2 * cfg.dim)   # K rows first, then V
        self.linear1_q = nn.Linear(cfg.dim, cfg.dim)
        self.linear2 = nn.Linear(cfg.dim, cfg.dim)
        self.q_norm = RMSNorm(cfg.head_dim, 1e-6)           # per head
        self.k_norm = RMSNorm(cfg.head_dim, 1e-6)
        self.backend = "sdpa"
        self.kernels = False

    def forward(self, x: torch.Tensor, motion: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x [B, L, C] residual stream, motion [B, F+1, N, C] -> residual update [B, L, C]."""
        b, l, c = x.shape
        frames = motion.shape[1]                                            # F+1 latent frames
        fused = self.kernels and kernels.supported(x)
        kv = self.linear1_kv(layer_norm(motion, self.eps).to(dtype))       # [B, F+1, N, 2C]
        k, v = kv.unflatten(-1, (2, self.heads, -1)).unbind(-3)            # [B, F+1, N, H, D] each
        h = ops.layer_norm(x, self.eps, dtype) if fused else layer_norm(x, self.eps).to(dtype)
        q = self.linear1_q(h).unflatten(-1, (self.heads, -1))               # [B, L, H, D]
        if fused:
            q = ops.head_rms_norm(q, self.q_norm.weight, self.q_norm.eps)
            k = ops.head_rms_norm(k, self.k_norm.weight, self.k_norm.eps)
        else:
            q, k = self.q_norm(q), self.k_norm(k)
        # Group tokens by latent frame: [B*(F+1), S, H, D] queries against [B*(F+1), N, H, D].
        q = q.reshape(b * frames, l // frames, self.heads, -1)
        out = attention(q, k.flatten(0, 1), v.flatten(0, 1), self.backend)
        return self.linear2(out.reshape(b, l, c))

    def add_to(self, x: torch.Tensor, motion: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The stream after this face block: x + forward(x) (fp32 + compute dtype -> fp32)."""
        y = self(x, motion, dtype)
        return ops.gated_residual(x, y, None) if self.kernels and kernels.supported(x, y) else x + y


class FaceAdapter(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.fuser_blocks = nn.ModuleList([FaceBlock(cfg) for _ in range(cfg.num_face_blocks)])


# ----------------------------------------------------------------------------------------------
# Attention modules and the transformer block


class SelfAttention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.heads = cfg.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))
        # RMSNorm over the full width (across heads), before the split into heads.
        self.norm_q = RMSNorm(cfg.dim, cfg.eps)
        self.norm_k = RMSNorm(cfg.dim, cfg.eps)
        # engine/transforms.py fuse_qkv replaces q, k, v by this one [3C, C] linear (one GEMM).
        self.qkv: nn.Module | None = None
        self.backend = "sdpa"
        self.kernels = False

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [B, L, C] in the compute dtype -> [B, L, C]."""
        dtype = x.dtype
        if self.qkv is not None:
            # One GEMM; q, k, v are views of its [B, L, 3C] output (rows are independent, so each
            # equals its own linear's output).
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), None          # v later: one [B, L, C] fewer held meanwhile
        if self.kernels and kernels.supported(x, *rope):
            # RMSNorm of q and k and RoPE in one pass, q and k written once (kernels/rms_norm_rope.py).
            q, k = ops.rms_norm_rope(q, k, self.norm_q.weight, self.norm_k.weight, *rope, self.norm_q.eps)
            q, k = q.unflatten(-1, (self.heads, -1)), k.unflatten(-1, (self.heads, -1))   # [B, L, H, D]
        else:
            q = self.norm_q(q).unflatten(-1, (self.heads, -1))     # [B, L, H, D]
            k = self.norm_k(k).unflatten(-1, (self.heads, -1))
            q, k = apply_rope(q, *rope).to(dtype), apply_rope(k, *rope).to(dtype)
        v = (self.v(x) if v is None else v).unflatten(-1, (self.heads, -1))
        return self.o(attention(q, k, v, self.backend).flatten(2))


class CrossAttention(nn.Module):
    """Attends to [257 CLIP tokens ; text tokens] with two separate softmaxes, summed before `o`."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.heads, self.image_tokens = cfg.num_heads, cfg.image_tokens
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))
        self.k_img, self.v_img = nn.Linear(cfg.dim, cfg.dim), nn.Linear(cfg.dim, cfg.dim)
        self.norm_q = RMSNorm(cfg.dim, cfg.eps)
        self.norm_k = RMSNorm(cfg.dim, cfg.eps)
        self.norm_k_img = RMSNorm(cfg.dim, cfg.eps)
        self.backend = "sdpa"
        self.kernels = False

    def project_context(self, context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """context [B, 257 + text_len, C] -> (k, v, k_img, v_img), each [B, Lc, H, D].
        Constant over denoising steps and segments, so prepare() computes it once."""
        img, txt = context[:, : self.image_tokens], context[:, self.image_tokens:]
        split = lambda t: t.unflatten(-1, (self.heads, -1))
        return (split(self.norm_k(self.k(txt))), split(self.v(txt)),
                split(self.norm_k_img(self.k_img(img))), split(self.v_img(img)))

    def forward(self, x: torch.Tensor, context_kv: tuple[torch.Tensor, ...]) -> torch.Tensor:
        k, v, k_img, v_img = context_kv
        if self.kernels and kernels.supported(x):
            q = ops.rms_norm(self.q(x), self.norm_q.weight, self.norm_q.eps).unflatten(-1, (self.heads, -1))
        else:
            q = self.norm_q(self.q(x)).unflatten(-1, (self.heads, -1))
        out = attention(q, k, v, self.backend) + attention(q, k_img, v_img, self.backend)
        return self.o(out.flatten(2))


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.self_attn = SelfAttention(cfg)
        # Official naming: norm3 is the affine LayerNorm before cross-attention; norm1 (self-attn)
        # and norm2 (FFN) have no parameters and are applied functionally.
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(cfg)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.zeros(1, 6, cfg.dim))
        self.kernels = False

    def forward(self, x, e0, rope, context_kv, dtype):
        """x [B, L, C] residual stream (compute dtype into block 0, fp32 after), e0 [B, 6, C] fp32."""
        if self.kernels and kernels.supported(x, e0):
            return self.forward_fused(x, e0, rope, context_kv, dtype)
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + e0).chunk(6, dim=1)
        h = layer_norm(x, self.eps).type_as(x).float() * (1 + scale1) + shift1
        x = x + self.self_attn(h.to(dtype), rope) * gate1                   # fp32 from here on
        h = layer_norm(x, self.eps, self.norm3.weight, self.norm3.bias).type_as(x)
        x = x + self.cross_attn(h.to(dtype), context_kv)
        h = layer_norm(x, self.eps).type_as(x).float() * (1 + scale2) + shift2
        return x + self.ffn(h.to(dtype)) * gate2

    def forward_fused(self, x, e0, rope, context_kv, dtype):
        """forward() through the fused kernels: each residual add is done by the kernel of the norm
        that follows it, which also writes that norm's output in the compute dtype."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + e0).chunk(6, dim=1)
        h = ops.layer_norm(x, self.eps, dtype, scale=scale1, shift=shift1)
        x, h = ops.add_layer_norm(x, self.self_attn(h, rope), gate1, self.eps, dtype,
                                  weight=self.norm3.weight, bias=self.norm3.bias)
        x, h = ops.add_layer_norm(x, self.cross_attn(h, context_kv), None, self.eps, dtype,
                                  scale=scale2, shift=shift2)
        return ops.gated_residual(x, self.ffn(h), gate2)


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.zeros(1, 2, cfg.dim))

    def forward(self, x, e):
        """fp32 throughout; uses e (the time embedding before time_projection), not e0."""
        shift, scale = (self.modulation.float() + e.unsqueeze(1)).chunk(2, dim=1)
        return fp32_linear(layer_norm(x, self.eps) * (1 + scale) + shift, self.head)


class ImageEmbedding(nn.Module):
    """CLIP features [B, 257, 1280] -> [B, 257, dim]: LN -> Linear -> GELU(erf) -> Linear -> LN."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(cfg.image_dim), nn.Linear(cfg.image_dim, cfg.image_dim),
                                  nn.GELU(), nn.Linear(cfg.image_dim, cfg.dim), nn.LayerNorm(cfg.dim))

    def forward(self, clip_fea, dtype):
        ln0, fc1, _, fc2, ln1 = self.proj
        x = layer_norm(clip_fea, ln0.eps, ln0.weight, ln0.bias).to(dtype)
        x = fc2(F.gelu(fc1(x)))
        return layer_norm(x, ln1.eps, ln1.weight, ln1.bias)                # fp32, as under autocast


# ----------------------------------------------------------------------------------------------
# The model


@dataclass
class Conditions:
    """Everything about one segment that does not change across denoising steps."""
    y: torch.Tensor                                  # [B, 20, F+1, h, w] mask + conditioning latents
    pose_tokens: torch.Tensor                        # [B, C, F, h/2, w/2] pose patch embedding
    motion: torch.Tensor                             # [B, F+1, 5, C] face-encoder tokens (frame 0 zero)
    context_kv: list[tuple[torch.Tensor, ...]]       # per block: cross-attention (k, v, k_img, v_img)
    rope: tuple[torch.Tensor, torch.Tensor]          # cos, sin [L, head_dim/2]
    grid: tuple[int, int, int]                       # (F+1, h/2, w/2) token grid


class WanAnimateDiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.pose_patch_embedding = nn.Conv3d(cfg.pose_dim, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)
        self.img_emb = ImageEmbedding(cfg)
        self.motion_encoder = MotionEncoder(cfg)
        self.face_adapter = FaceAdapter(cfg)
        self.face_encoder = FaceEncoder(cfg)
        # Not a buffer: the float64 angle tables must not follow .to(dtype).
        self.rope_tables = rope_angles(cfg.rope_split, cfg.rope_max_len, cfg.rope_theta)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    # -- step-independent work ------------------------------------------------------------------

    def motion_vectors(self, face_pixels: torch.Tensor) -> torch.Tensor:
        """face_pixels [B, 3, T, S, S] in [-1, 1] -> LIA motion vectors [B, T, D] fp32, one per frame."""
        b, _, t, s, _ = face_pixels.shape
        if s != self.cfg.motion_size:   # only the tiny preset uses smaller crops
            face_pixels = F.interpolate(face_pixels.transpose(1, 2).flatten(0, 1).float(),
                                        size=(self.cfg.motion_size,) * 2, mode="area").unflatten(0, (b, t)).transpose(1, 2)
        # NCHW on purpose: the crops and weights in channels_last made the 480p forward 5% slower on
        # an H200 (bench/results/kernels_h200_channels_last.log: 3.035 s vs 2.886 s).
        frames = face_pixels.transpose(1, 2).flatten(0, 1).to(self.dtype)   # [B*T, 3, S, S]
        # The official code runs 8 frames per call; per-frame results do not depend on the batch, and
        # on a GPU 32 frames per call keep the small 512x512 convolutions busy (bounded memory).
        chunk = self.cfg.motion_batch if frames.device.type == "cpu" else max(self.cfg.motion_batch, 32)
        return torch.cat([self.motion_encoder(c) for c in frames.split(chunk)]).unflatten(0, (b, t))

    def motion_tokens(self, motion: torch.Tensor) -> torch.Tensor:
        """motion vectors [B, T, D] -> face-adapter tokens [B, F+1, 5, C] (frame 0 = zeros: the
        reference frame)."""
        tokens = self.face_encoder(motion, self.dtype)                      # [B, F, 5, C]
        return torch.cat([tokens.new_zeros(tokens.shape[0], 1, *tokens.shape[2:]), tokens], dim=1)

    def encode_motion(self, face_pixels: torch.Tensor) -> torch.Tensor:
        """face_pixels [B, 3, T, S, S] in [-1, 1] -> motion tokens [B, F+1, 5, C]."""
        return self.motion_tokens(self.motion_vectors(face_pixels))

    def embed_context(self, context: torch.Tensor | list[torch.Tensor], clip_fea: torch.Tensor) -> torch.Tensor:
        """T5 context (list of [L_i, text_dim] or [B, L, text_dim], zero-padded here to text_len and
        attended unmasked, as the official model does) + CLIP features -> [B, 257 + text_len, C]."""
        dtype, n = self.dtype, self.cfg.text_len
        rows = list(context) if isinstance(context, (list, tuple)) else list(context.unbind(0))
        padded = torch.stack([torch.cat([u, u.new_zeros(n - u.shape[0], u.shape[1])]) for u in rows])
        txt = self.text_embedding(padded.to(dtype))
        img = self.img_emb(clip_fea, dtype)
        return torch.cat([img.to(dtype), txt], dim=1)

    def prepare(self, y, pose_latents, face_pixels=None, context=None, clip_fea=None, *,
                motion=None, context_tokens=None) -> Conditions:
        """y [B, 20, F+1, h, w], pose_latents [B, 16, F, h, w], face_pixels [B, 3, 4F-3, S, S],
        context (T5 output), clip_fea [B, 257, image_dim]. Precomputed `motion` (encode_motion) or
        `context_tokens` (embed_context) may be passed instead of the raw inputs."""
        if motion is None:
            motion = self.encode_motion(face_pixels)
        if context_tokens is None:
            context_tokens = self.embed_context(context, clip_fea)
        pt, ph, pw = self.cfg.patch_size
        grid = (y.shape[2] // pt, y.shape[3] // ph, y.shape[4] // pw)
        return Conditions(
            y=y,
            pose_tokens=self.pose_patch_embedding(pose_latents.to(self.dtype)),
            motion=motion,
            context_kv=[blk.cross_attn.project_context(context_tokens) for blk in self.blocks],
            rope=rope_cos_sin(grid, self.rope_tables, y.device),
            grid=grid,
        )

    # -- one denoising step ----------------------------------------------------------------------

    def denoise(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditions) -> torch.Tensor:
        """latents [B, 16, F+1, h, w], t [B] integer timesteps -> velocity [B, 16, F+1, h, w] fp32."""
        dtype, cfg = self.dtype, self.cfg
        t = t.to(latents.device)
        x = self.patch_embedding(torch.cat([latents, cond.y.to(latents.dtype)], dim=1).to(dtype))
        x = torch.cat([x[:, :, :1], x[:, :, 1:] + cond.pose_tokens], dim=2)   # pose on frames 1..F
        b, c = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)                                       # [B, L, C]

        e = fp32_linear(F.silu(fp32_linear(sinusoidal_embedding(t, cfg.freq_dim), self.time_embedding[0])),
                        self.time_embedding[2])                                # [B, C] fp32
        e0 = fp32_linear(F.silu(e), self.time_projection[1]).unflatten(1, (6, c))  # [B, 6, C]

        for i, block in enumerate(self.blocks):
            x = block(x, e0, cond.rope, cond.context_kv[i], dtype)
            if i % cfg.face_adapter_every == 0:
                x = self.face_adapter.fuser_blocks[i // cfg.face_adapter_every].add_to(x, cond.motion, dtype)

        x = self.head(x, e).to(dtype)        # the official prediction is rounded to the compute dtype
        return self.unpatchify(x, cond.grid).float()

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, L, pt*ph*pw*out] -> [B, out, F*pt, h*ph, w*pw]; the last axis is ordered (pt, ph, pw, c)."""
        (f, h, w), (pt, ph, pw), c = grid, self.cfg.patch_size, self.cfg.out_dim
        x = x.view(x.shape[0], f, h, w, pt, ph, pw, c)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape[0], c, f * pt, h * ph, w * pw)

    def forward(self, latents, t, y, pose_latents, face_pixels, context, clip_fea):
        return self.denoise(latents, t, self.prepare(y, pose_latents, face_pixels, context, clip_fea))
