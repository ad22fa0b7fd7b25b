"""RMSNorm over the full width (affine) fused with interleaved RoPE, for the self-attention q and k.

What engine/model.py computes (SelfAttention.forward with RMSNorm and apply_rope), per token row
x [C] of q = Linear(x) (and the same for k), C = heads * head_dim:
    n   = x.float() * rsqrt(mean(x.float()^2) + eps)      row statistic over all heads (width C)
    n   = n.to(x.dtype) * w.to(x.dtype)                   the product is rounded to x.dtype too
    out = rope(n): pairs (n[2i], n[2i+1]) of each head rotated in fp32 by angle[token, i],
          then .to(x.dtype)
cos/sin are [L, head_dim/2] fp32 tables (engine/model.py rope_cos_sin: t/h/w split 44/42/42 at
head_dim 128, reference frame at t = 0), shared by every head and every batch row.

The kernel keeps the same rounding points: it rounds to x.dtype after normalising and after the
weight multiply (both no-ops in fp32), rotates in fp32 and rounds once at the store. It differs
from the reference only inside fp32: the order of the sum of squares, rsqrt's last bits, and FMA
contraction of the rotation; each can move a bf16 output by one ulp where a value sits on a
rounding boundary. (Under TRITON_INTERPRET=1 the interpreter truncates fp32 -> bf16 instead of
rounding to nearest, so CPU tests see up to a few bf16 ulps.)

Design: one program per token row. The whole row (5120 wide: 10 KiB bf16) of q and of k is loaded
contiguously (16-byte vectors), both before any math so that both are in flight, and split into
(even, odd) pairs in registers; the cos/sin row (head_dim/2 values) is gathered for each head
from L1. Bytes moved per row:
2 reads + 2 writes of C elements, plus the cos/sin row. Without rope the same kernel is the plain
width RMSNorm of the cross-attention query (`wanimate::rms_norm`).

Layout after Liger-Kernel's rms_norm/rope ops and the Triton layer-norm tutorial (row programs,
`calculate_settings`-style warps); written from scratch for this model's rounding.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..engine.errors import ValidationError


# ----------------------------------------------------------------------------------------------
# Reference


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """engine/model.py rms_norm: normalise in fp32, round to x.dtype, scale in x.dtype."""
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight.to(x.dtype)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """engine/model.py apply_rope on x [B, L, H, D]: interleaved pairs rotated in fp32, returns fp32."""
    b, l, h, d = x.shape
    xr = x.float().view(b, l, h, d // 2, 2)
    x0, x1 = xr[..., 0], xr[..., 1]
    c, s = cos.view(1, l, 1, -1), sin.view(1, l, 1, -1)
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).view(b, l, h, d)


def rms_norm_rope_ref(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [B, L, C] -> (q, k) [B, L, C] in their dtype, as SelfAttention computes them."""
    head_dim = 2 * cos.shape[-1]

    def one(x, w):
        normed = rms_norm_ref(x, w, eps).unflatten(-1, (-1, head_dim))  # [B, L, H, D]
        return rope_ref(normed, cos, sin).to(x.dtype).flatten(2)

    return one(q, q_weight), one(k, k_weight)


# ----------------------------------------------------------------------------------------------
# Kernel


@triton.jit
def _normalize(x, w, C, eps):
    """x [BLOCK] fp32, w [BLOCK] in the activation dtype (padding lanes 0) -> RMSNorm with the
    reference's two roundings to the activation dtype, returned as fp32."""
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / C + eps)
    n = (x * rstd).to(w.dtype).to(tl.float32)
    return (n * w.to(tl.float32)).to(w.dtype).to(tl.float32)


@triton.jit
def _rotate(x, c, s, BLOCK: tl.constexpr):
    """x [BLOCK] as interleaved pairs, c/s [BLOCK/2] -> rotated, [BLOCK] fp32. The row is loaded
    and stored contiguously (16-byte vectors) and split into pairs in registers."""
    x0, x1 = tl.split(tl.reshape(x, (BLOCK // 2, 2)))
    return tl.reshape(tl.join(x0 * c - x1 * s, x0 * s + x1 * c), (BLOCK,))


# Token counts vary per video: no recompilation for each one's divisibility.
@triton.jit(do_not_specialize=["L"])
def _rms_norm_rope_kernel(
    Q, K,                     # inputs [B, L, C], unit stride along C
    WQ, WK,                   # weights [C]
    QO, KO,                   # outputs [B, L, C], contiguous, dtype of Q / K
    COS, SIN,                 # [L, HALF_D] fp32, contiguous
    L, C,                     # tokens per batch row, width
    stride_qb, stride_ql, stride_kb, stride_kl,
    eps,
    HALF_D: tl.constexpr,     # head_dim // 2
    HAS_K: tl.constexpr,      # also normalise (and rotate) K with WK
    HAS_ROPE: tl.constexpr,
    BLOCK: tl.constexpr,      # power of two >= C (and >= 2)
):
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    l = row % L
    offs = tl.arange(0, BLOCK)
    mask = offs < C
    # Issue every row load before any math.
    q = tl.load(Q + b * stride_qb + l * stride_ql + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_K:
        k = tl.load(K + b * stride_kb + l * stride_kl + offs, mask=mask, other=0.0).to(tl.float32)
    # Weights are cast to the activation dtype first, as w.to(x.dtype) does.
    wq = tl.load(WQ + offs, mask=mask, other=0.0).to(Q.dtype.element_ty)
    q = _normalize(q, wq, C, eps)
    if HAS_ROPE:
        # Pair p of the row is pair p % HALF_D of its head; every head shares the token's angles.
        p = tl.arange(0, BLOCK // 2)
        pm = p < C // 2
        cos = tl.load(COS + l * HALF_D + p % HALF_D, mask=pm, other=0.0)
        sin = tl.load(SIN + l * HALF_D + p % HALF_D, mask=pm, other=0.0)
        q = _rotate(q, cos, sin, BLOCK)
    tl.store(QO + row * C + offs, q.to(QO.dtype.element_ty), mask=mask)
    if HAS_K:
        wk = tl.load(WK + offs, mask=mask, other=0.0).to(K.dtype.element_ty)
        k = _normalize(k, wk, C, eps)
        if HAS_ROPE:
            k = _rotate(k, cos, sin, BLOCK)
        tl.store(KO + row * C + offs, k.to(KO.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launcher


def row_settings(width: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for one program per row of `width` elements (Liger's calculate_settings)."""
    block = max(triton.next_power_of_2(width), 2)
    if block > 65536:
        raise ValidationError(f"row width {width} is larger than the fused row kernels support (65536)")
    # 8 warps for Wan's 5120-wide rows: measured on an H200 (bench/results/kernels_h200.json) as the
    # best setting of rms_norm_rope at 480p and 720p and of the residual + norm kernels, where the
    # earlier 16 warps reached 56-74% of the copy bandwidth.
    warps = 32 if block >= 32768 else 8 if block >= 2048 else 4
    return block, warps


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """A [B, L, C] view with unit stride along C (copying only when C is strided)."""
    if x.dim() != 3:
        raise ValidationError(f"{name} must be [B, L, C], got shape {tuple(x.shape)}")
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(q, k, q_weight, k_weight, cos, sin, eps, *, num_warps=None):
    q = _rows(q, "q")
    b, l, c = q.shape
    if q_weight.shape != (c,):
        raise ValidationError(f"norm weight must be [{c}], got {tuple(q_weight.shape)}")
    has_k = k is not None
    if has_k:
        k = _rows(k, "k")
        if k.shape != q.shape or k_weight.shape != (c,):
            raise ValidationError(f"k {tuple(k.shape)} and its weight must match q {tuple(q.shape)}")
    has_rope = cos is not None
    half = 1
    if has_rope:
        half = cos.shape[-1]
        if cos.shape != (l, half) or sin.shape != (l, half) or c % (2 * half):
            raise ValidationError(f"cos/sin must be [L={l}, head_dim/2] with head_dim dividing {c}; "
                                  f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
    qo = torch.empty((b, l, c), dtype=q.dtype, device=q.device)
    ko = torch.empty((b, l, c), dtype=k.dtype, device=k.device) if has_k else qo
    if q.numel() == 0:
        return qo, ko
    block, warps = row_settings(c)
    _rms_norm_rope_kernel[(b * l,)](
        q, k if has_k else q, q_weight, k_weight if has_k else q_weight, qo, ko,
        cos if has_rope else q, sin if has_rope else q,
        l, c, q.stride(0), q.stride(1), (k if has_k else q).stride(0), (k if has_k else q).stride(1), eps,
        HALF_D=half, HAS_K=has_k, HAS_ROPE=has_rope, BLOCK=block, num_warps=num_warps or warps)
    return qo, ko


# ----------------------------------------------------------------------------------------------
# Ops


@torch.library.custom_op("wanimate::rms_norm_rope", mutates_args=())
def rms_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [B, L, C] -> (RoPE(RMSNorm(q)), RoPE(RMSNorm(k))) [B, L, C], contiguous, in their dtypes."""
    return _launch(q, k, q_weight, k_weight, cos, sin, eps)


@rms_norm_rope.register_fake
def _(q, k, q_weight, k_weight, cos, sin, eps):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("wanimate::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [B, L, C] -> RMSNorm over C (affine), contiguous, in x's dtype."""
    return _launch(x, None, weight, None, None, None, eps)[0]


@rms_norm.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape)
