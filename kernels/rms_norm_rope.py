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

Design: one program per token row (q and k of one token together: they share the cos/sin row),
in two passes over column chunks of 1024 (4 warps: one 16-byte vector per thread per tensor).
Pass 1 loads every chunk of q and k (unrolled, all loads in flight at once) and sums squares;
pass 2 reads each chunk again from L1/L2, normalises, rotates the (even, odd) pairs in registers
with the cos/sin row of the token (gathered per head from L1) and stores. Bytes from DRAM per row:
2 reads + 2 writes of C elements, plus the cos/sin row. Without rope the same kernel is the plain
width RMSNorm of the cross-attention query (`wanimate::rms_norm`).

Why two passes (issue 5): the first version held the whole row in registers, one pass
(`_rms_norm_rope_row_kernel`, kept for the comparison rows of bench/kernels.py). For C = 5120 its
block is 8192 lanes (3/8 masked) and a program needs ~100 registers per thread at 8 warps, so only
2 programs fit on an SM; each has its loads in flight only at its start, and the reduction,
rotation and stores of the other leave the memory system idle: 56-66% of the copy bandwidth on
an H200. The chunked kernel needs few registers (up to 16 programs per SM, bounded by threads),
wastes no lanes at C = 5120, and its second read hits the cache (the row is 10 KiB), not DRAM.

Layout after Liger-Kernel's rms_norm/rope ops and the Triton layer-norm tutorial (row programs,
`calculate_settings`-style warps); written from scratch for this model's rounding.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..engine.errors import ValidationError
from ..engine.model import apply_rope, rms_norm


# ----------------------------------------------------------------------------------------------
# Reference


# The model's own functions are the references: what the kernel replaces, not a copy of it.
rms_norm_ref = rms_norm              # normalise in fp32, round to x.dtype, scale in x.dtype
rope_ref = apply_rope                # interleaved pairs of [B, L, H, D] rotated in fp32, returns fp32


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


@triton.jit
def _scale(x, rstd, w):
    """x * rstd and the weight multiply with the reference's two roundings to the activation dtype
    (w's dtype), returned as fp32."""
    n = (x * rstd).to(w.dtype).to(tl.float32)
    return (n * w.to(tl.float32)).to(w.dtype).to(tl.float32)


# Token counts vary per video: no recompilation for each one's divisibility.
@triton.jit
def _normalize_chunk(src, W, dst, cols, mask, rstd, cos, sin, HAS_ROPE: tl.constexpr, CHUNK: tl.constexpr):
    """Pass 2 of the chunked kernel for one tensor (q or k): re-read a chunk of its row, scale by
    rstd and the weight, rotate, store."""
    x = tl.load(src + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    # Weights are cast to the activation dtype first, as w.to(x.dtype) does.
    w = tl.load(W + cols, mask=mask, other=0.0).to(src.dtype.element_ty)
    x = _scale(x, rstd, w)
    if HAS_ROPE:
        x = _rotate(x, cos, sin, CHUNK)
    tl.store(dst + cols, x.to(dst.dtype.element_ty), mask=mask)


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
    CHUNK: tl.constexpr,      # power of two (>= 2): columns per step
    NCHUNK: tl.constexpr,     # cdiv(C, CHUNK)
):
    """One row of q (and k) in two passes of NCHUNK column chunks. Pass 1 loads every chunk (all
    loads issued before the reduction: the loop is unrolled) and sums squares; pass 2 loads each
    chunk again (an L1/L2 hit: the row was just read), normalises, rotates and stores it."""
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    l = row % L
    q_row = Q + b * stride_qb + l * stride_ql
    k_row = K + b * stride_kb + l * stride_kl
    offs = tl.arange(0, CHUNK)
    acc_q = tl.zeros([CHUNK], dtype=tl.float32)
    acc_k = tl.zeros([CHUNK], dtype=tl.float32)
    for i in tl.static_range(NCHUNK):
        cols = i * CHUNK + offs
        mask = cols < C
        # evict_last: keep the row in L2 for pass 2.
        x = tl.load(q_row + cols, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
        acc_q += x * x
        if HAS_K:
            x = tl.load(k_row + cols, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
            acc_k += x * x
    rstd_q = tl.rsqrt(tl.sum(acc_q, axis=0) / C + eps)
    rstd_k = tl.rsqrt(tl.sum(acc_k, axis=0) / C + eps)
    for i in tl.static_range(NCHUNK):
        cols = i * CHUNK + offs
        mask = cols < C
        cos = 0.0                                                # cos and sin: unused without RoPE
        sin = 0.0
        if HAS_ROPE:
            # Pair p of the row is pair p % HALF_D of its head; every head shares the token's angles.
            p = i * (CHUNK // 2) + tl.arange(0, CHUNK // 2)
            pm = p < C // 2
            cos = tl.load(COS + l * HALF_D + p % HALF_D, mask=pm, other=0.0)
            sin = tl.load(SIN + l * HALF_D + p % HALF_D, mask=pm, other=0.0)
        _normalize_chunk(q_row, WQ, QO + row * C, cols, mask, rstd_q, cos, sin, HAS_ROPE, CHUNK)
        if HAS_K:
            _normalize_chunk(k_row, WK, KO + row * C, cols, mask, rstd_k, cos, sin, HAS_ROPE, CHUNK)


# The first version, kept for the old-vs-new rows of bench/kernels.py: the whole row held in
# registers (BLOCK = next power of two >= C: 8192 lanes for 5120 columns, 3/8 of them masked),
# q and k loaded up front, one pass. It measured 56-66% of the copy bandwidth on an H200.
@triton.jit(do_not_specialize=["L"])
def _rms_norm_rope_row_kernel(
    Q, K, WQ, WK, QO, KO, COS, SIN, L, C, stride_qb, stride_ql, stride_kb, stride_kl, eps,
    HALF_D: tl.constexpr, HAS_K: tl.constexpr, HAS_ROPE: tl.constexpr,
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
    wq = tl.load(WQ + offs, mask=mask, other=0.0).to(Q.dtype.element_ty)
    q = _normalize(q, wq, C, eps)
    if HAS_ROPE:
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
    """(BLOCK, num_warps) for one program holding a whole row of `width` elements in registers
    (Liger's calculate_settings). Used by the other row kernels (layer_norm.py) and by the old
    rms_norm_rope variant."""
    block = max(triton.next_power_of_2(width), 2)
    if block > 65536:
        raise ValidationError(f"row width {width} is larger than the fused row kernels support (65536)")
    # 8 warps for Wan's 5120-wide rows: measured on an H200 (bench/results/kernels_h200.json) as the
    # best setting of rms_norm_rope at 480p and 720p and of the residual + norm kernels, where the
    # earlier 16 warps reached 56-74% of the copy bandwidth.
    warps = 32 if block >= 32768 else 8 if block >= 2048 else 4
    return block, warps


# Chunk of the two-pass kernel for narrow rows: 1024 columns over 4 warps is one 16-byte vector per
# thread per tensor (bf16), and a program needs few registers: many programs in flight per SM,
# where the whole-row kernel's 8192-lane block for 5120 columns holds 2 and leaves 3/8 masked.
CHUNK, CHUNK_WARPS = 1024, 4
# Rows of the DiT's width (5120) take the H200 sweep's winners instead (bench/results/
# kernels_h200_qkv.log, kernels_h200_ln.log; re-timed back to back in kernels_h200_full_r4.log, each
# within 1% of its sweep's best): 8 warps, 1024 columns for q and k together and for layer_norm,
# 2048 for a lone q (the cross-attention rms_norm). 8 warps halve the vector to 8 bytes for bf16
# and still win: twice the warps per program hide more of the second pass's latency.
WIDE_ROW, WIDE_WARPS = 4096, 8


def chunk_settings(width: int, chunk: int | None = None, num_warps: int | None = None, *,
                   wide_chunk: int = 1024) -> tuple[int, int, int]:
    """(CHUNK, NCHUNK, num_warps) of the two-pass kernel for rows of `width` elements: the measured
    wide-row settings (wide_chunk columns over WIDE_WARPS) from WIDE_ROW columns up unless chunk or
    num_warps is given, else CHUNK columns (fewer for narrow rows)."""
    if chunk is None and num_warps is None and width >= WIDE_ROW:
        chunk, num_warps = wide_chunk, WIDE_WARPS
    chunk = chunk or min(CHUNK, max(triton.next_power_of_2(width), 2))
    nchunk = triton.cdiv(width, chunk)
    if nchunk > 64:
        raise ValidationError(f"row width {width} is larger than rms_norm_rope supports ({64 * chunk})")
    return chunk, nchunk, num_warps or (CHUNK_WARPS if chunk >= 1024 else max(1, chunk // 256))


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """A [B, L, C] view with unit stride along C (copying only when C is strided)."""
    if x.dim() != 3:
        raise ValidationError(f"{name} must be [B, L, C], got shape {tuple(x.shape)}")
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(q, k, q_weight, k_weight, cos, sin, eps, *, variant="chunk", chunk=None, num_warps=None):
    """The op's body; variant "row" is the old whole-row kernel, chunk / num_warps override the
    settings (bench/kernels.py sweeps them)."""
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
    args = (q, k if has_k else q, q_weight, k_weight if has_k else q_weight, qo, ko,
            cos if has_rope else q, sin if has_rope else q,
            l, c, q.stride(0), q.stride(1), (k if has_k else q).stride(0), (k if has_k else q).stride(1), eps)
    if variant == "row":
        block, warps = row_settings(c)
        _rms_norm_rope_row_kernel[(b * l,)](*args, HALF_D=half, HAS_K=has_k, HAS_ROPE=has_rope, BLOCK=block,
                                            num_warps=num_warps or warps)
    elif variant == "chunk":
        chunk, nchunk, warps = chunk_settings(c, chunk, num_warps, wide_chunk=1024 if has_k else 2048)
        _rms_norm_rope_kernel[(b * l,)](*args, HALF_D=half, HAS_K=has_k, HAS_ROPE=has_rope, CHUNK=chunk,
                                        NCHUNK=nchunk, num_warps=warps)
    else:
        raise ValidationError(f"rms_norm_rope variant must be 'chunk' or 'row', got {variant!r}")
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
