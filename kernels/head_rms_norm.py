"""Per-head RMSNorm (affine) of the face-adapter query and key.

What engine/model.py computes (FaceBlock.forward: q_norm / k_norm = RMSNorm(head_dim)): for each
head vector x [D] of q [B, L, H, D] and k [B, F+1, N, H, D]
    n   = x.float() * rsqrt(mean(x.float()^2) + eps)
    out = n.to(x.dtype) * w.to(x.dtype)        the product rounded to x.dtype as well
The kernel rounds at the same two points; it differs only in the fp32 order of the sum of squares
and rsqrt's last bits.

Design: rows of D = 128 are short, so each program takes a [ROWS, D] tile (2048 elements, 4 KiB
bf16) and reduces along D. Rows are addressed as (outer, head) pairs with their own strides, which
covers the key: a strided view of the fused k/v projection ([..., 2, H, D] unbound), read in place.
Output is contiguous.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..engine.errors import ValidationError
from ..engine.model import rms_norm

# 2048-element tiles (16 rows of 128) over 4 warps: measured on an H200 at 480p as the best of the
# tile x warps sweep (0.82 of the copy ceiling vs 0.74 with 4096; bench/results/kernels_h200_qkv.log).
_TILE = 2048


head_rms_norm_ref = rms_norm         # engine/model.py's rms_norm over the last axis (head_dim)


# Token counts vary per video: no recompilation for each one's divisibility.
@triton.jit(do_not_specialize=["M", "H"])
def _head_rms_norm_kernel(
    X, W, OUT,                # x rows addressed as (outer, head), unit stride on D; w [D]; out [M, D] contiguous
    M, H, D,                  # rows (outer * H), heads per outer index, head width
    stride_o, stride_h,
    eps,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < M
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    base = (rows // H) * stride_o + (rows % H) * stride_h
    x = tl.load(X + base[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(X.dtype.element_ty).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    n = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    out = (n * w[None, :]).to(OUT.dtype.element_ty)
    tl.store(OUT + rows[:, None] * D + cols[None, :], out, mask=mask)


def _launch(x, weight, eps, *, tile=_TILE, num_warps=4):
    if x.dim() < 2:
        raise ValidationError(f"head_rms_norm expects [..., H, D], got {tuple(x.shape)}")
    d, h = x.shape[-1], x.shape[-2]
    if weight.shape != (d,):
        raise ValidationError(f"norm weight must be [{d}], got {tuple(weight.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    try:
        rows3 = x.view(-1, h, d)              # merges the leading axes without copying when their strides allow
    except RuntimeError:
        rows3 = x.contiguous().view(-1, h, d)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    m = rows3.shape[0] * h
    if m == 0:
        return out
    block_d = triton.next_power_of_2(d)
    rows = max(1, tile // block_d)
    _head_rms_norm_kernel[(triton.cdiv(m, rows),)](
        rows3, weight, out, m, h, d, rows3.stride(0), rows3.stride(1), eps,
        ROWS=rows, BLOCK_D=block_d, num_warps=num_warps)
    return out


@torch.library.custom_op("wanimate::head_rms_norm", mutates_args=())
def head_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H, D] -> RMSNorm over D (affine), same shape, contiguous, in x's dtype."""
    return _launch(x, weight, eps)


@head_rms_norm.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape)
