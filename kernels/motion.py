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

Design: blur, separable: one program per (plane, strip of BW columns, ROWS output rows) walks down
its rows, filters each input row along the columns (4 shifted, masked loads: the zero padding is
the mask) and keeps the last three filtered rows in registers, so an input element is loaded 4
times, mostly from L1, instead of 16 (variant "taps", the first version: a 2-D tile reading all 16
taps; L1-bound at 0.15 of the copy bandwidth on an H200; the row walker 0.30, 6.2x the reference).
bias_act: an elementwise kernel over (plane, column block) with the plane's bias, 0.93 of copy.
Both take PLANES planes per program: 1 on a GPU, many in Triton's interpreter (_planes_per_program).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..engine.errors import ValidationError
from ..engine.model import bias_leaky_relu, blur as model_blur, blur_kernel, merge_skip


# ----------------------------------------------------------------------------------------------
# References: engine/model.py's own functions, as Blur, BiasLeakyReLU and MotionResBlock run them


def blur_ref(x: torch.Tensor, pad0: int, pad1: int) -> torch.Tensor:
    return model_blur(x, blur_kernel().to(x.device), (pad0, pad1))


def bias_act_ref(x: torch.Tensor, bias: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    out = bias_leaky_relu(x, bias.view(1, -1, 1, 1))
    return out if residual is None else merge_skip(out, residual)


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
def _blur_rows_kernel(X, OUT, NC, H, W, HO, WO, PAD: tl.constexpr, ROWS: tl.constexpr, BW: tl.constexpr,
                      PLANES: tl.constexpr):
    """Separable: a program walks ROWS output rows of a BW-column strip of PLANES planes (1 on a GPU;
    the interpreter, which runs programs one after another, takes many at once). Each step filters
    one input row along the columns (x[c-P] + 3x[c-P+1] + 3x[c-P+2] + x[c-P+3]) and keeps the last
    four filtered rows in registers, so each input element is loaded 4 times (the column shifts,
    mostly L1 hits) instead of 16. The first three steps only fill the window (their stores are
    masked)."""
    lane = tl.arange(0, PLANES * BW)                # flat lanes: one layout, no conversion
    planes = tl.program_id(0).to(tl.int64) * PLANES + lane // BW
    cols = tl.program_id(2) * BW + lane % BW
    y0 = tl.program_id(1) * ROWS
    src = X + planes * H * W
    dst = OUT + planes * HO * WO
    zero = tl.zeros([PLANES * BW], dtype=tl.int32)  # scalars as vectors: the interpreter cannot AND a
    live = planes < NC                              # scalar mask into a vector one
    a = tl.zeros([PLANES * BW], dtype=tl.float32)
    b = tl.zeros([PLANES * BW], dtype=tl.float32)
    c = tl.zeros([PLANES * BW], dtype=tl.float32)
    for i in range(ROWS + 3):
        r = zero + (y0 - PAD + i)                   # input row of this step
        row_ok = live & (r >= 0) & (r < H)
        d = tl.zeros([PLANES * BW], dtype=tl.float32)
        for j in tl.static_range(4):
            wj = 1.0 if (j == 0 or j == 3) else 3.0
            cj = cols + (j - PAD)
            d += tl.load(src + r * W + cj, mask=row_ok & (cj >= 0) & (cj < W), other=0.0).to(tl.float32) * wj
        y = r + PAD - 3                             # output row completed by input row r
        out = (a + 3.0 * b + 3.0 * c + d) * (1.0 / 64.0)
        tl.store(dst + y * WO + cols, out.to(OUT.dtype.element_ty),
                 mask=live & (cols < WO) & (y >= y0) & (y < HO))
        a, b, c = b, c, d


@triton.jit
def _bias_act_kernel(X, BIAS, R, OUT, NC, C, HW, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
                     PLANES: tl.constexpr):
    lane = tl.arange(0, PLANES * BLOCK)
    planes = tl.program_id(0).to(tl.int64) * PLANES + lane // BLOCK
    offs = tl.program_id(1) * BLOCK + lane % BLOCK
    mask = (planes < NC) & (offs < HW)
    at = planes * HW + offs
    bias = tl.load(BIAS + planes % C, mask=planes < NC, other=0.0).to(tl.float32)
    v = tl.load(X + at, mask=mask, other=0.0).to(tl.float32) + bias
    v = tl.where(v >= 0, v, v * 0.2) * 1.4142135623730951   # sqrt(2)
    if HAS_RESIDUAL:
        v = (v + tl.load(R + at, mask=mask, other=0.0).to(tl.float32)) * 0.7071067811865476   # / sqrt(2)
    tl.store(OUT + at, v.to(OUT.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers


def _planes_per_program(x: torch.Tensor, planes: int) -> int:
    """One plane per program on a GPU. Triton's interpreter (CPU tensors, the tests) runs programs
    one after another at milliseconds each, so there one program takes up to 64 planes."""
    return 1 if x.is_cuda else min(64, triton.next_power_of_2(planes))


def _check_nchw(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() != 4:
        raise ValidationError(f"{name} must be [N, C, H, W], got {tuple(x.shape)}")
    return x.contiguous()


def _blur_launch(x: torch.Tensor, pad0: int, pad1: int, *, variant: str = "rows", bh: int = 32, bw: int = 256,
                 num_warps: int = 4):
    """variant "rows" (_blur_rows_kernel: bh output rows per program) or "taps" (_blur_kernel: a
    bh x bw tile, 16 shifted loads per output). Default from the H200 sweep on 32 crops of
    32 x 512 x 512 (bench/results/kernels_h200_motion_sweep.log): rows 32 x 256 over 4 warps 0.79 ms
    (0.32 of copy; 0.30 after the flat-lane change, kernels_h200_full_r4.log), 32 x 128 1.07 ms, the 2-D tap kernel
    1.7 ms, F.pad + grouped conv2d 5.3 ms."""
    x = _check_nchw(x, "x")
    if not (0 <= pad0 <= 3 and 0 <= pad1 <= 3):
        raise ValidationError(f"blur pads must be in 0..3, got ({pad0}, {pad1})")
    n, c, h, w = x.shape
    ho, wo = h + pad0 + pad1 - 3, w + pad0 + pad1 - 3
    if ho <= 0 or wo <= 0:
        raise ValidationError(f"blur input {h}x{w} is too small for a 4x4 filter with pads ({pad0}, {pad1})")
    out = torch.empty((n, c, ho, wo), dtype=x.dtype, device=x.device)
    if not out.numel():
        return out
    # Small planes (the encoder's later blocks, 33 x 33 down to 5 x 5): no wider strip or longer walk
    # than the plane needs.
    bw = min(bw, triton.next_power_of_2(wo))
    bh = min(bh, ho) if variant == "rows" else min(bh, triton.next_power_of_2(ho))
    if variant == "rows":
        p = _planes_per_program(x, n * c)
        _blur_rows_kernel[(triton.cdiv(n * c, p), triton.cdiv(ho, bh), triton.cdiv(wo, bw))](
            x, out, n * c, h, w, ho, wo, PAD=pad0, ROWS=bh, BW=bw, PLANES=p, num_warps=num_warps)
    elif variant == "taps":
        _blur_kernel[(n * c, triton.cdiv(ho, bh), triton.cdiv(wo, bw))](
            x, out, h, w, ho, wo, PAD=pad0, BH=bh, BW=bw, num_warps=num_warps)
    else:
        raise ValidationError(f"blur variant must be 'rows' or 'taps', got {variant!r}")
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
        p = _planes_per_program(x, n * c)
        block = min(block, max(16, triton.next_power_of_2(h * w)))
        _bias_act_kernel[(triton.cdiv(n * c, p), triton.cdiv(h * w, block))](
            x, bias.contiguous().view(-1), residual if residual is not None else x, out, n * c, c, h * w,
            HAS_RESIDUAL=residual is not None, BLOCK=block, PLANES=p, num_warps=num_warps)
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
