"""The LIA motion encoder's memory-bound steps: the zero-padded binomial blur before each stride-2
convolution, and the bias + leaky ReLU (+ the residual block's merge) after the convolutions.

What engine/model.py computes (Blur, BiasLeakyReLU, MotionResBlock), on NCHW face-crop features:
    blur:     F.conv2d(F.pad(x, [p0, p1, p0, p1]), k (x) k / 64, groups=C), k = [1, 3, 3, 1]
              (a depthwise 4x4 low-pass; fp32 accumulation, one rounding to x's dtype)
    bias_act: leaky_relu(x + bias, 0.2) * sqrt(2)                     (bias [1, C, 1, 1])
              and, with a residual r, (that + r) / sqrt(2)            (MotionResBlock's merge)
In torch these are a pad copy plus a generic depthwise-convolution kernel (cuDNN has no fast path
for 4x4 depthwise filters), and three or five elementwise kernels that each round to bf16. On an H200
they took about 75 ms of a 2.8 s 480p forward (77 crops of 512x512; bench/results/profile_dit_480p_h200.log).

The kernels read each input once and write each output once, in fp32 math with one rounding at the
end: the blur sums its 16 taps in another order than the convolution (a last-bit difference in
fp32), bias_act rounds once where the reference rounds after every step (a bf16 difference of up
to about two ulps; bit-identical for fp32).

Design: blur, one program per (plane, tile of BH x BW outputs) reading its 16 taps as shifted,
masked loads (the zero padding is the mask; the overlapping reads hit L1/L2); bias_act, an
elementwise kernel over (plane, column block) with the plane's bias as a scalar.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..engine.errors import ValidationError

_SQRT2 = math.sqrt(2.0)
_TAPS = (1.0, 3.0, 3.0, 1.0)


# ----------------------------------------------------------------------------------------------
# References (engine/model.py's math, as it runs there)


def blur_ref(x: torch.Tensor, pad0: int, pad1: int) -> torch.Tensor:
    c = x.shape[1]
    k = torch.tensor(_TAPS)
    kernel = (torch.outer(k, k) / 64.0).to(device=x.device, dtype=x.dtype)
    return F.conv2d(F.pad(x, [pad0, pad1, pad0, pad1]), kernel.expand(c, 1, 4, 4), groups=c)


def bias_act_ref(x: torch.Tensor, bias: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    out = F.leaky_relu(x + bias.view(1, -1, 1, 1), 0.2) * _SQRT2
    return out if residual is None else (out + residual) / _SQRT2


# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _blur_kernel(X, OUT, H, W, HO, WO, PAD: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BH + tl.arange(0, BH)[:, None]
    cols = tl.program_id(2) * BW + tl.arange(0, BW)[None, :]
    src = X + plane * H * W
    acc = tl.zeros([BH, BW], dtype=tl.float32)
    for i in tl.static_range(4):
        wi = 1.0 if (i == 0 or i == 3) else 3.0
        r = rows + (i - PAD)
        row_ok = (r >= 0) & (r < H)
        for j in tl.static_range(4):
            wj = 1.0 if (j == 0 or j == 3) else 3.0
            c = cols + (j - PAD)
            v = tl.load(src + r * W + c, mask=row_ok & (c >= 0) & (c < W), other=0.0)
            acc += v.to(tl.float32) * (wi * wj / 64.0)
    tl.store(OUT + plane * HO * WO + rows * WO + cols, acc.to(OUT.dtype.element_ty), mask=(rows < HO) & (cols < WO))


@triton.jit
def _bias_act_kernel(X, BIAS, R, OUT, C, HW, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < HW
    base = plane * HW
    bias = tl.load(BIAS + plane % C).to(tl.float32)
    v = tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32) + bias
    v = tl.where(v >= 0, v, v * 0.2) * 1.4142135623730951
    if HAS_RESIDUAL:
        v = (v + tl.load(R + base + offs, mask=mask, other=0.0).to(tl.float32)) * 0.7071067811865476
    tl.store(OUT + base + offs, v.to(OUT.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers


def _check_nchw(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() != 4:
        raise ValidationError(f"{name} must be [N, C, H, W], got {tuple(x.shape)}")
    return x.contiguous()


def _blur_launch(x: torch.Tensor, pad0: int, pad1: int, *, bh: int = 16, bw: int = 64, num_warps: int = 4):
    x = _check_nchw(x, "x")
    if not (0 <= pad0 <= 3 and 0 <= pad1 <= 3):
        raise ValidationError(f"blur pads must be in 0..3, got ({pad0}, {pad1})")
    n, c, h, w = x.shape
    ho, wo = h + pad0 + pad1 - 3, w + pad0 + pad1 - 3
    if ho <= 0 or wo <= 0:
        raise ValidationError(f"blur input {h}x{w} is too small for a 4x4 filter with pads ({pad0}, {pad1})")
    out = torch.empty((n, c, ho, wo), dtype=x.dtype, device=x.device)
    if out.numel():
        _blur_kernel[(n * c, triton.cdiv(ho, bh), triton.cdiv(wo, bw))](
            x, out, h, w, ho, wo, PAD=pad0, BH=bh, BW=bw, num_warps=num_warps)
    return out


def _bias_act_launch(x, bias, residual, *, block: int = 2048, num_warps: int = 4):
    x = _check_nchw(x, "x")
    n, c, h, w = x.shape
    if bias.numel() != c:
        raise ValidationError(f"bias must have {c} values (one per channel), got shape {tuple(bias.shape)}")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValidationError(f"residual must be {tuple(x.shape)}, got {tuple(residual.shape)}")
        residual = residual.contiguous()
    out_dtype = torch.promote_types(x.dtype, bias.dtype)
    if residual is not None:
        out_dtype = torch.promote_types(out_dtype, residual.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if out.numel():
        _bias_act_kernel[(n * c, triton.cdiv(h * w, block))](
            x, bias.contiguous().view(-1), residual if residual is not None else x, out, c, h * w,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps)
    return out


# ----------------------------------------------------------------------------------------------
# Ops


@torch.library.custom_op("wanimate::blur", mutates_args=())
def blur(x: torch.Tensor, pad0: int, pad1: int) -> torch.Tensor:
    """x [N, C, H, W] -> the [1, 3, 3, 1]^2 / 64 depthwise blur of x zero-padded by (pad0, pad1) on
    each spatial axis: [N, C, H + pad0 + pad1 - 3, W + pad0 + pad1 - 3]."""
    return _blur_launch(x, pad0, pad1)


@blur.register_fake
def _(x, pad0, pad1):
    n, c, h, w = x.shape
    return x.new_empty((n, c, h + pad0 + pad1 - 3, w + pad0 + pad1 - 3))


@torch.library.custom_op("wanimate::bias_act", mutates_args=())
def bias_act(x: torch.Tensor, bias: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """leaky_relu(x + bias, 0.2) * sqrt(2) [then (. + residual) / sqrt(2)], x [N, C, H, W], bias [C]."""
    return _bias_act_launch(x, bias, residual)


@bias_act.register_fake
def _(x, bias, residual=None):
    dtype = torch.promote_types(x.dtype, bias.dtype)
    if residual is not None:
        dtype = torch.promote_types(dtype, residual.dtype)
    return x.new_empty(x.shape, dtype=dtype)
