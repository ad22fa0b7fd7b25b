"""LayerNorm over the width with the Block's affine or modulation epilogue, optionally fused with
the residual add that precedes it.

What engine/model.py computes (Block.forward, FaceBlock.forward, layer_norm), per token row:
    x   = x + gate * y          (add_layer_norm only; fp32 math, result in the promoted dtype:
                                 fp32 in the model, since gate is fp32 and x is the fp32 stream)
    n   = F.layer_norm(x.float(), weight, bias, eps)   fp32; weight/bias optional (norm3)
    n   = n.type_as(x)                                 rounds to bf16 only when x is bf16 (block 0)
    h   = n.float() * (1 + scale) + shift              optional modulation, scale/shift [B, 1, C] fp32
    out = h.to(out_dtype)                              the compute dtype the Linear layers take
Uses: norm1 + modulation (layer_norm, scale/shift), the self-attention residual + norm3
(add_layer_norm with gate and affine), the cross-attention residual + norm2 + modulation
(add_layer_norm without gate, with scale/shift), and FaceBlock's plain LayerNorm (layer_norm).

The kernel rounds where the reference rounds (the type_as and the final cast). Inside fp32 it
differs in summation order (a per-lane Welford update over the column chunks, merged across lanes
with Chan's formula: as stable as the reference's two-pass / Welford fp32 math) and in FMA
contraction of `x + gate * y` and `n * (1 + scale) + shift`: one fp32 rounding instead of two, so
the fp32 residual stream can differ in the last bit.

Design (default, variant "chunk"): as kernels/rms_norm_rope.py, one program per token row walks
the row in CHUNK-column chunks (1024 columns over 4 warps: 8 elements per thread, 16-byte vectors,
no masked lanes at width 5120) in two passes. Pass 1 loads x (and y, gate), stores the new stream
and updates the per-lane mean / M2; pass 2 loads the chunk again (an L1/L2 hit: the row was just
read; with a residual it recomputes x + gate * y, bit-identical to the stored value) and
normalises, modulates and stores it. Bytes from HBM per element: layer_norm 4 + 2 (fp32 in, bf16
out); add_layer_norm 4 + 2 in, 4 + 2 out, against 4 + 2 + 4 (residual) + 4 + 2 (norm) as two
kernels. Variant "row" is the first version, the whole row in registers in one pass (an
8192-lane block for 5120 columns, 3/8 of it masked): 60-81% of the copy bandwidth on an H200
(bench/results/kernels_h200*.log), kept for bench/kernels.py's old-vs-new rows.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..engine.errors import ValidationError
from ..engine.model import layer_norm as model_layer_norm
from .rms_norm_rope import chunk_settings, row_settings


# ----------------------------------------------------------------------------------------------
# Reference


def layer_norm_ref(x: torch.Tensor, eps: float, out_dtype: torch.dtype, weight=None, bias=None, scale=None,
                   shift=None) -> torch.Tensor:
    """x [B, L, C] -> LayerNorm [affine] [modulated] in out_dtype, rounded like Block.forward."""
    n = model_layer_norm(x, eps, weight, bias).type_as(x)
    if scale is not None:
        n = n.float() * (1 + scale) + shift
    return n.to(out_dtype)


def add_layer_norm_ref(x, y, gate, eps: float, out_dtype: torch.dtype, weight=None, bias=None, scale=None,
                       shift=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + gate * y, layer_norm_ref of it): a Block residual update and the next norm."""
    x = x + y * gate if gate is not None else x + y
    return x, layer_norm_ref(x, eps, out_dtype, weight, bias, scale, shift)


# ----------------------------------------------------------------------------------------------
# Kernel


@triton.jit
def _stream(X, Y, G, XO, x_row, y_row, g_row, cols, mask, HAS_RESIDUAL: tl.constexpr, HAS_GATE: tl.constexpr,
            EVICT: tl.constexpr):
    """The chunk of the stream that is normalised, as fp32: x, or x + gate * y rounded to the new
    stream's dtype (what is stored). Both passes call this, so pass 2 recomputes the same bits."""
    x = tl.load(X + x_row + cols, mask=mask, other=0.0, eviction_policy=EVICT).to(tl.float32)
    if HAS_RESIDUAL:
        y = tl.load(Y + y_row + cols, mask=mask, other=0.0, eviction_policy=EVICT).to(tl.float32)
        if HAS_GATE:
            y = y * tl.load(G + g_row + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x + y).to(XO.dtype.element_ty).to(tl.float32)
    return x


# Token counts vary per video: no recompilation for each one's divisibility.
@triton.jit
def _epilogue(n, X, XO, W, BIAS, SCALE, SHIFT, b, stride_sb, stride_tb, cols, mask,
              HAS_RESIDUAL: tl.constexpr, AFFINE: tl.constexpr, MODULATE: tl.constexpr):
    """Both kernels' normalised values n (fp32) -> [affine] -> rounded to the stream's dtype ->
    [modulation], as the reference: type_as(x) rounds to the stream's dtype (bf16 only for block 0's
    input; a no-op for fp32) between the affine and the modulation."""
    if AFFINE:
        n = n * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) \
            + tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        n = n.to(XO.dtype.element_ty).to(tl.float32)
    else:
        n = n.to(X.dtype.element_ty).to(tl.float32)
    if MODULATE:
        scale = tl.load(SCALE + b * stride_sb + cols, mask=mask, other=0.0).to(tl.float32)
        shift = tl.load(SHIFT + b * stride_tb + cols, mask=mask, other=0.0).to(tl.float32)
        n = n * (1.0 + scale) + shift
    return n


@triton.jit(do_not_specialize=["L"])
def _layer_norm_kernel(
    X, Y, G,                  # x [B, L, C]; with HAS_RESIDUAL y [B, L, C] and (HAS_GATE) gate [B, 1, C]
    W, BIAS,                  # affine weight / bias [C] (AFFINE)
    SCALE, SHIFT,             # modulation [B, 1, C] fp32 (MODULATE)
    XO, HO,                   # new residual [B, L, C] (HAS_RESIDUAL), normalised output [B, L, C]
    L, C,
    stride_xb, stride_xl, stride_yb, stride_yl, stride_gb, stride_sb, stride_tb,
    eps,
    HAS_RESIDUAL: tl.constexpr, HAS_GATE: tl.constexpr, AFFINE: tl.constexpr, MODULATE: tl.constexpr,
    CHUNK: tl.constexpr,      # power of two (>= 2): columns per step
    NCHUNK: tl.constexpr,     # cdiv(C, CHUNK)
):
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    l = row % L
    x_row = b * stride_xb + l * stride_xl
    y_row = b * stride_yb + l * stride_yl
    g_row = b * stride_gb
    offs = tl.arange(0, CHUNK)
    # Pass 1: per-lane Welford over the chunks (lane j sees columns j, CHUNK + j, ...). Every
    # chunk but a masked last one holds a value in every lane, so a lane's count after chunk i is
    # i + 1 (i in the last chunk where the lane is masked; 0 when C < CHUNK leaves it empty).
    mean = tl.zeros([CHUNK], dtype=tl.float32)
    m2 = tl.zeros([CHUNK], dtype=tl.float32)
    count = tl.zeros([CHUNK], dtype=tl.float32)
    for i in tl.static_range(NCHUNK):
        cols = i * CHUNK + offs
        mask = cols < C
        # evict_last: keep the row in L2 for pass 2.
        x = _stream(X, Y, G, XO, x_row, y_row, g_row, cols, mask, HAS_RESIDUAL, HAS_GATE, "evict_last")
        if HAS_RESIDUAL:
            tl.store(XO + row * C + cols, x.to(XO.dtype.element_ty), mask=mask)
        delta = x - mean
        new_mean = mean + delta * (1.0 / (i + 1))
        new_m2 = m2 + delta * (x - new_mean)
        if i == NCHUNK - 1:           # only the last chunk can have masked lanes
            mean = tl.where(mask, new_mean, mean)
            m2 = tl.where(mask, new_m2, m2)
            count = tl.where(mask, i + 1.0, count)
        else:
            mean, m2, count = new_mean, new_m2, count + 1.0
    # Chan's merge of the lanes: the row mean, then M2 = sum(M2_j + n_j (mean_j - mean)^2).
    row_mean = tl.sum(count * mean, axis=0) / C
    d = mean - row_mean
    rstd = tl.rsqrt(tl.sum(m2 + count * d * d, axis=0) / C + eps)
    # Pass 2: normalise [affine] [modulate], store.
    for i in tl.static_range(NCHUNK):
        cols = i * CHUNK + offs
        mask = cols < C
        x = _stream(X, Y, G, XO, x_row, y_row, g_row, cols, mask, HAS_RESIDUAL, HAS_GATE, "evict_first")
        n = _epilogue((x - row_mean) * rstd, X, XO, W, BIAS, SCALE, SHIFT, b, stride_sb, stride_tb, cols, mask,
                      HAS_RESIDUAL, AFFINE, MODULATE)
        tl.store(HO + row * C + cols, n.to(HO.dtype.element_ty), mask=mask)


# The whole row in registers (BLOCK = next power of two >= C), one pass, mean and variance as two
# sums over the registers: the default for residual + norm (_launch says why), the old-vs-new rows
# of bench/kernels.py for the plain norm.
@triton.jit(do_not_specialize=["L"])
def _layer_norm_row_kernel(
    X, Y, G,                  # x [B, L, C]; with HAS_RESIDUAL y [B, L, C] and (HAS_GATE) gate [B, 1, C]
    W, BIAS,                  # affine weight / bias [C] (AFFINE)
    SCALE, SHIFT,             # modulation [B, 1, C] fp32 (MODULATE)
    XO, HO,                   # new residual [B, L, C] (HAS_RESIDUAL), normalised output [B, L, C]
    L, C,
    stride_xb, stride_xl, stride_yb, stride_yl, stride_gb, stride_sb, stride_tb,
    eps,
    HAS_RESIDUAL: tl.constexpr, HAS_GATE: tl.constexpr, AFFINE: tl.constexpr, MODULATE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    l = row % L
    offs = tl.arange(0, BLOCK)
    mask = offs < C
    x = tl.load(X + b * stride_xb + l * stride_xl + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        y = tl.load(Y + b * stride_yb + l * stride_yl + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            y = y * tl.load(G + b * stride_gb + offs, mask=mask, other=0.0).to(tl.float32)
        x = x + y
        # Normalise what is stored: the new stream, in its dtype.
        x = x.to(XO.dtype.element_ty)
        tl.store(XO + row * C + offs, x, mask=mask)
        x = x.to(tl.float32)
    mean = tl.sum(x, axis=0) / C
    d = tl.where(mask, x - mean, 0.0)
    n = _epilogue(d * tl.rsqrt(tl.sum(d * d, axis=0) / C + eps), X, XO, W, BIAS, SCALE, SHIFT, b, stride_sb,
                  stride_tb, offs, mask, HAS_RESIDUAL, AFFINE, MODULATE)
    tl.store(HO + row * C + offs, n.to(HO.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launcher


def _check_rows(x: torch.Tensor, name: str, shape=None) -> torch.Tensor:
    if x.dim() != 3 or (shape is not None and x.shape != shape):
        raise ValidationError(f"{name} must be [B, L, C]{'' if shape is None else f' = {tuple(shape)}'}, "
                              f"got {tuple(x.shape)}")
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_per_batch(t: torch.Tensor, name: str, b: int, c: int) -> torch.Tensor:
    """scale / shift / gate: [B, 1, C] or [1, 1, C] (broadcast over the batch), unit stride on C."""
    if t.dim() != 3 or t.shape[1] != 1 or t.shape[2] != c or t.shape[0] not in (1, b):
        raise ValidationError(f"{name} must be [B={b}, 1, C={c}], got {tuple(t.shape)}")
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t


def _batch_stride(t: torch.Tensor) -> int:
    return 0 if t.shape[0] == 1 else t.stride(0)


def _launch(x, y, gate, weight, bias, scale, shift, eps, out_dtype, *, variant=None, chunk=None, num_warps=None):
    """The ops' body; variant "chunk" (two passes over column chunks) or "row" (the whole row in
    registers); chunk / num_warps override the settings (bench/kernels.py sweeps them).

    Default (variant None), from the H200 sweep at 480p (bench/results/kernels_h200_ln.log): the
    plain norm + modulation takes the chunked kernel with chunk_settings' wide-row settings, 1024
    columns over 8 warps (0.90 of the copy ceiling; the row kernel 0.79, the chunked one at 4 warps
    0.56; synchronized timing, see kernels/__init__.py); the residual + norm kernels keep
    the row kernel (0.84 / 0.90 vs the chunked kernel's best 0.82 / 0.86), whose pass over the
    residual, the update and the gate needs no second read."""
    x = _check_rows(x, "x")
    b, l, c = x.shape
    has_residual = y is not None
    if has_residual:
        y = _check_rows(y, "y", x.shape)
        dtypes = [x.dtype, y.dtype] + ([gate.dtype] if gate is not None else [])
        stream_dtype = dtypes[0]
        for dt in dtypes[1:]:
            stream_dtype = torch.promote_types(stream_dtype, dt)
        xo = torch.empty((b, l, c), dtype=stream_dtype, device=x.device)
    else:
        if gate is not None:
            raise ValidationError("a gate needs a residual update y")
        xo = None
    if gate is not None:
        gate = _check_per_batch(gate, "gate", b, c)
    affine = weight is not None
    if affine and (weight.shape != (c,) or bias is None or bias.shape != (c,)):
        raise ValidationError(f"LayerNorm weight and bias must both be [{c}]")
    modulate = scale is not None
    if modulate:
        if shift is None:
            raise ValidationError("modulation needs both scale and shift")
        scale, shift = _check_per_batch(scale, "scale", b, c), _check_per_batch(shift, "shift", b, c)
    h = torch.empty((b, l, c), dtype=out_dtype, device=x.device)
    if x.numel() == 0:
        return xo, h
    dummy = x
    args = (x, y if has_residual else dummy, gate if gate is not None else dummy,
            weight if affine else dummy, bias if affine else dummy,
            scale if modulate else dummy, shift if modulate else dummy,
            xo if has_residual else dummy, h,
            l, c, x.stride(0), x.stride(1),
            y.stride(0) if has_residual else 0, y.stride(1) if has_residual else 0,
            _batch_stride(gate) if gate is not None else 0,
            _batch_stride(scale) if modulate else 0, _batch_stride(shift) if modulate else 0,
            eps)
    flags = dict(HAS_RESIDUAL=has_residual, HAS_GATE=gate is not None, AFFINE=affine, MODULATE=modulate)
    if variant is None:
        variant = "row" if has_residual and chunk is None else "chunk"
    if variant == "chunk":
        chunk, nchunk, warps = chunk_settings(c, chunk, num_warps)
        _layer_norm_kernel[(b * l,)](*args, **flags, CHUNK=chunk, NCHUNK=nchunk, num_warps=warps)
    elif variant == "row":
        block, warps = row_settings(c)
        if not has_residual:
            # The plain norm + modulation moves less per row: 4 warps measured best on an H200 at
            # 480p and 720p (82-91% of copy bandwidth vs 61% at 8 warps; bench/results/kernels_h200*).
            warps = min(warps, 4)
        _layer_norm_row_kernel[(b * l,)](*args, **flags, BLOCK=block, num_warps=num_warps or warps)
    else:
        raise ValidationError(f"layer_norm variant must be 'chunk' or 'row', got {variant!r}")
    return xo, h


# ----------------------------------------------------------------------------------------------
# Ops


@torch.library.custom_op("wanimate::layer_norm", mutates_args=())
def layer_norm(x: torch.Tensor, eps: float, out_dtype: torch.dtype, weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
               shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [B, L, C] -> LayerNorm(x) [* weight + bias] [* (1 + scale) + shift], [B, L, C] in out_dtype."""
    return _launch(x, None, None, weight, bias, scale, shift, eps, out_dtype)[1]


@layer_norm.register_fake
def _(x, eps, out_dtype, weight=None, bias=None, scale=None, shift=None):
    return x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op("wanimate::add_layer_norm", mutates_args=())
def add_layer_norm(x: torch.Tensor, y: torch.Tensor, gate: Optional[torch.Tensor], eps: float,
                   out_dtype: torch.dtype, weight: Optional[torch.Tensor] = None,
                   bias: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
                   shift: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + gate * y, LayerNorm of it [affine] [modulated] in out_dtype); gate [B, 1, C] or None."""
    return _launch(x, y, gate, weight, bias, scale, shift, eps, out_dtype)


@add_layer_norm.register_fake
def _(x, y, gate, eps, out_dtype, weight=None, bias=None, scale=None, shift=None):
    stream = torch.promote_types(x.dtype, y.dtype)
    if gate is not None:
        stream = torch.promote_types(stream, gate.dtype)
    return x.new_empty(x.shape, dtype=stream), x.new_empty(x.shape, dtype=out_dtype)
