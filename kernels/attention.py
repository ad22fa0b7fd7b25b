"""Flash-attention forward kernels for Hopper: a quantized one ("sage") and a plain bf16 one.

Layout everywhere is [B, L, H, D] (the engine's), softmax scale 1/sqrt(D), no mask, non-causal,
any Lq and Lk (the last key tile is masked), head dim a power of two.

The quantized kernel follows SageAttention2 (thu-ml/SageAttention, ENGINES.md §1.9), in Triton:
  * S = Q·Kᵀ in INT8 with an int32 accumulator. Q is quantized per query token (the kernel applies
    the Q scale as a per-row factor, which the softmax step needs anyway, so the finest Q
    granularity is free) or per block of `q_group` tokens; K per block of BLOCK_N keys, after
    subtracting the per-head mean of K over all keys. That mean shifts every score of a query row
    by the same q·mean(K), which the softmax ignores, and removes the large constant channels of
    DiT keys that would otherwise waste the int8 range.
  * Before quantizing, q and k are both multiplied by R = diag(±1)·Hadamard (R Rᵀ = D·I, so
    (qR)(kR)ᵀ = D·qkᵀ; FlashAttention-3's "incoherent processing"). It spreads the few 10-50x
    channels of DiT queries over all D channels, so one int8 scale per token fits them: on such
    activations the error falls 1.5-2x (tests). It is a [tile, D] x [D, D] matmul with ±1 entries
    inside the quantization kernel (exact products, fp32 sums).
  * P·V in FP8 e4m3 with fp32 accumulation per key tile (two-level accumulation: each tile's
    product starts from zero and is added to the fp32 accumulator, so the tensor core's
    reduced-precision fp8 accumulation only ever spans BLOCK_N keys). P is exp2(...) scaled by
    448 so it fills the e4m3 range; V minus its per-channel mean (added back at the end: softmax
    rows sum to one) is quantized per channel over all tokens.
  * log2(e)/sqrt(D) is folded into the Q scale, 448 into the exponent, and the V scale and mean
    are applied once at the end, so the inner loop spends one FFMA and one exp2 per score.
  * The int32 scores become floats without I2F (which issues at the transcendental rate on
    Hopper, as slow as exp2): |s| <= 127*127*D < 2^22, so float_bits(s + 0x4B400000) is exactly
    1.5*2^23 + s: one integer add, and the offset leaves inside the FFMA's per-row bias.
  * Variants (AttnConfig flags, picked by the GPU sweep, none default): `acc1` accumulates P·V
    in one level (the wgmma adds into acc·alpha; it then stays in flight across the loop edge,
    one wgmma wait per key tile, ~35 fewer registers, no ptxas serialization offline), at the
    fp8 tensor core's accumulation precision over the whole key loop. sage_attention_sim's
    pv_acc_bits models that pessimistically (13 mantissa bits, truncated, per 32-key k-step):
    at 75,600 keys (wan_like_qkv, 512 queries) rel L2 0.41% -> 0.61%, where two-level stays at
    0.41%; the GPU sweep's rel_l2 (xacc1 vs without) measures the real thing. `qk8` is e4m3 Q
    and K (same scales, rotation and smoothing; fp32-accumulated Q·K, no int->float trick):
    ~2.5x the int8 error on DiT-like inputs (rel L2 2.4% vs 1.0% at 1k tokens, q_gain 0.5;
    5.8% vs 2.2% at a near one-hot softmax; 0.97% vs 0.41% at 75,600 keys), bought for the
    FA3 order (`fa3`), which Triton only leaves asynchronous for fp32 accumulators and which
    ptxas still serializes (see `_sage_tiles_fa3`). `pipe`, `ws`, `poly`: see AttnConfig.
  * Tiles come in through pointers (cp.async) or, with `tma=True`, through TMA descriptors over
    the quantized buffers: same math, ~70 fewer registers per thread at 128x128 (sm_90 compile).

Quantization is its own small Triton kernel (`quantize_qkv`) plus three token reductions in torch
(K mean, V mean, V min/max): it reads Q, K, V about twice more than the attention does (~1% of
the attention time at 75,600 tokens) and leaves Q/K as per-head contiguous int8 and V transposed
([D, L], keys contiguous), the K-major layout the fp8 wgmma needs for its B operand. RoPE is not
fused into the prologue: the model applies it before calling attention, and fusing it would save
one pass over q and k (~0.5 ms per 720p layer against ~150 ms of attention): it does not pay for
the coupling.

References in this file: `attention_ref` (SDPA in fp32, the quality baseline) and
`sage_attention_sim` (the quantized math in torch, tile by tile, used to test the numerics on CPU
and to pin down what the kernel computes). `use_kernel` is the one place that decides whether the
kernels may run: on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests).

Triton's interpreter (3.9) rounds fp32 -> fp8 wrongly at binade edges (126.5 -> 64), truncates
fp32 -> bf16 and returns garbage from bf16 matmuls, so under the interpreter the kernels round to
the target format themselves and multiply bf16 in fp32 (INTERP constexpr; compiled out on GPU).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Mapping

import torch
import torch.nn.functional as F

from ..engine.errors import ValidationError

try:
    import triton
    import triton.language as tl
except ImportError:      # the references below still work; the kernels raise on use
    triton = None
    tl = None

LOG2E = 1.4426950408889634
FP8_MAX = 448.0                       # largest finite float8_e4m3fn
LOG2_FP8_MAX = math.log2(FP8_MAX)
INT8_MAX = 127.0
_MAGIC_I = 0x4B400000                 # float bits of 1.5 * 2**23
_MAGIC_F = 12582912.0                 # 1.5 * 2**23


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class AttnConfig:
    """Launch parameters of one attention kernel. `block_n` is also the K quantization block.
    The sage kernel's variants (same math, other schedules; none is the default until a GPU
    sweep picks it): `pipe` issues the next tile's Q·K before this tile's softmax (hand-written
    software pipelining), `ws` asks Triton to warp-specialize the key loop, `poly` computes half
    of the exponentials with a polynomial on the FMA pipe. `maxnreg` > 0 caps registers/thread.
    `qk8` quantizes Q and K to FP8 e4m3 instead of INT8 (fp32-accumulated Q·K wgmma); on top of
    it `fa3` issues S_{j+1} = Q·K_{j+1} before tile j's softmax (FlashAttention-3's order, which
    Triton only keeps asynchronous for fp32 accumulators) and `acc1` accumulates P·V straight
    into the rescaled fp32 accumulator (one level, no zero-filled fresh product per tile)."""
    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 3
    tma: bool = False           # sage only: tiles through TMA descriptors instead of pointers
    pipe: bool = False
    ws: bool = False
    poly: bool = False
    qk8: bool = False
    fa3: bool = False
    acc1: bool = False
    maxnreg: int = 0

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValidationError(f"AttnConfig.{name}={v} must be a power of two >= 16")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise ValidationError(f"AttnConfig num_warps={self.num_warps} / num_stages={self.num_stages} invalid")
        if self.pipe and self.ws:
            raise ValidationError("AttnConfig: pipe (hand-pipelined loop) and ws (Triton's) exclude each other")
        if self.fa3 and not self.qk8:
            raise ValidationError("AttnConfig: fa3 (S_{j+1} issued before tile j's softmax) needs qk8: Triton "
                                  "waits right after every int32-accumulated wgmma")
        if (self.qk8 or self.acc1) and (self.pipe or self.ws):
            raise ValidationError("AttnConfig: qk8 / acc1 have their own loops; they exclude pipe and ws")
        if self.maxnreg and not 24 <= self.maxnreg <= 255:
            raise ValidationError(f"AttnConfig.maxnreg={self.maxnreg} must be 0 (none) or in [24, 255]")

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def sage_only(self) -> bool:
        return self.tma or self.pipe or self.ws or self.poly or self.qk8 or self.fa3 or self.acc1

    @property
    def spec(self) -> str:
        flags = [n for n in _FLAGS if getattr(self, n)] + ([f"r{self.maxnreg}"] if self.maxnreg else [])
        return "x".join([f"{self.block_m}x{self.block_n}x{self.num_warps}x{self.num_stages}", *flags])


_FLAGS = ("tma", "pipe", "ws", "poly", "qk8", "fa3", "acc1")      # spec suffixes, in this order; 'r<N>' is maxnreg


# Per (kernel, compute capability major), from the GPU sweeps (bench/attention.py --sections sweep,
# bench/results/attention_variants_h200.log, H200, triton 3.6): sage at 75,600 tokens 64x128x4x3
# with TMA and one-level P·V accumulation (acc1) 804 TFLOP/s-eq = 1.40x SDPA, the same config with
# two-level accumulation 781, 128x128x8x3xtma 654; same error (rel L2 0.62% vs fp32 either way).
# One warpgroup per program lets two or three programs share an SM, so one's softmax overlaps
# another's MMAs, which Triton cannot arrange inside one program (the `pipe`/`fa3` variants).
# triton bf16: 128x64x8x3 (507 TFLOP/s, attention_h200.log). sm_80 rows are offline choices.
DEFAULT_CONFIGS: Mapping[tuple[str, int], AttnConfig] = MappingProxyType({
    ("sage", 9): AttnConfig(block_m=64, block_n=128, num_warps=4, num_stages=3, tma=True, acc1=True),
    ("triton", 9): AttnConfig(block_m=128, block_n=64, num_warps=8, num_stages=3),
    ("sage", 8): AttnConfig(block_m=128, block_n=64, num_warps=8, num_stages=2),
    ("triton", 8): AttnConfig(block_m=128, block_n=64, num_warps=8, num_stages=2),
})
# The interpreter walks every program in Python: small tiles keep CPU tests fast and still
# exercise several key tiles, the masked tail and several query blocks.
INTERPRETER_CONFIG = AttnConfig(block_m=32, block_n=32, num_warps=4, num_stages=1)


def parse_config(spec: str) -> AttnConfig:
    """'128x64x8x3' (BLOCK_M x BLOCK_N x num_warps x num_stages), then optional flags 'xtma',
    'xpipe', 'xws', 'xpoly', 'xqk8', 'xfa3', 'xacc1', 'xr<maxnreg>' -> AttnConfig; e.g.
    '64x128x4x3xtmaxpipe' or '64x128x4x3xtmaxqk8xfa3xacc1'."""
    parts = spec.split("x")
    flags, maxnreg = {}, 0
    for p in parts[4:]:
        if p in _FLAGS and p not in flags:
            flags[p] = True
        elif p[:1] == "r" and p[1:].isdigit() and not maxnreg:
            maxnreg = int(p[1:])
        else:
            parts = []                                                       # -> the error below
    if len(parts) < 4 or not all(p.isdigit() for p in parts[:4]):
        raise ValidationError(f"kernel config {spec!r} must read BLOCK_MxBLOCK_NxWARPSxSTAGES[xtma][xpipe|xws]"
                              "[xpoly][xqk8[xfa3]][xacc1][xr<maxnreg>], e.g. 128x64x8x3 or 64x128x4x3xtmaxpipe")
    return AttnConfig(*(int(p) for p in parts[:4]), **flags, maxnreg=maxnreg)


def default_config(kernel: str, device: torch.device) -> AttnConfig:
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    major = torch.cuda.get_device_capability(device)[0]
    return DEFAULT_CONFIGS.get((kernel, min(major, 9)), DEFAULT_CONFIGS[(kernel, 8)])


# ----------------------------------------------------------------------------------------------
# References


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact attention: SDPA in fp32 on [B, L, H, D] -> fp32 [B, Lq, H, D]."""
    out = F.scaled_dot_product_attention(q.float().transpose(1, 2), k.float().transpose(1, 2),
                                         v.float().transpose(1, 2))
    return out.transpose(1, 2)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    # The kernels convert with truncation after adding +-0.5.
    return torch.trunc(x + torch.where(x >= 0, 0.5, -0.5))


def _quant_sim(x: torch.Tensor, fp8: bool) -> torch.Tensor:
    """x already scaled to the format's range -> int8 (half away from zero) or e4m3 (nearest
    even, as cvt.rn.satfinite) values, as fp32."""
    if fp8:
        return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return _round_half_away(x)


def _truncate_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 -> fp32 keeping `bits` mantissa bits, truncated toward zero."""
    drop = 23 - bits
    return (x.view(torch.int32) & -(1 << drop)).view(torch.float32)


def rotation_matrix(d: int, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """diag(signs) @ Hadamard(d), entries +-1 (exact in every float format): R Rᵀ = d·I, so
    (qR)(kR)ᵀ = d·qkᵀ. Rotating q and k spreads a few huge channels over all d channels (the
    "incoherent processing" of FlashAttention-3's fp8 path), so one int8 scale per token fits
    them. Built with integer ops on `device` (no host copy, so no sync inside a forward); the
    signs come from a fixed hash, so every call, device and the simulation use one matrix."""
    i = torch.arange(d, device=device, dtype=torch.int64)
    parity = torch.zeros(d, d, device=device, dtype=torch.int64)
    both = i[:, None] & i[None, :]
    for bit in range(max(d - 1, 1).bit_length()):           # Sylvester: (-1)^popcount(i & j)
        parity ^= (both >> bit) & 1
    h = (i * 0x9E3779B1) & 0xFFFFFFFF                         # a fixed pseudo-random +-1 per row
    h = ((h ^ (h >> 15)) * 0x85EBCA77) & 0xFFFFFFFF
    signs = ((h ^ (h >> 13)) >> 7) & 1
    return (1 - 2 * (parity ^ signs[:, None])).to(dtype)


def sage_attention_sim(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_n: int = 128,
                       q_group: int = 1, rotate: bool = True, smooth_k: bool = True,
                       smooth_v: bool = True, qk_fp8: bool = False, pv_acc_bits: int = 0,
                       pv_one_level: bool = False) -> torch.Tensor:
    """The quantized kernel's math in torch (fp32 with exact int8 / fp8 rounding), key tile by key
    tile with the same online softmax, so its P quantization sees the same running maxima.
    [B, L, H, D] in -> [B, Lq, H, D] in q's dtype.

    qk_fp8: Q (per token) and K (per tile) rounded to e4m3 (scaled to 448) instead of int8: the
    `qk8` kernel variant. pv_acc_bits > 0 models the fp8 tensor core's reduced-precision
    accumulator (fp32 in name; reportedly ~13 mantissa bits, truncated, on Hopper): the running
    sum is truncated to that many mantissa bits after every 32-key wgmma k-step. Two-level
    (default) truncates only within one tile's fresh product; pv_one_level (the `acc1` variant)
    chains the whole key loop through that accumulator. With pv_acc_bits=0 the two orders are
    the same fp32 math (the kernel test's reference for both)."""
    _check_qkv(q, k, v)
    b, lq, h, d = q.shape
    lk = k.shape[1]
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))             # [B, H, L, D]
    sm_scale = LOG2E / math.sqrt(d)
    if rotate:
        r = rotation_matrix(d)
        qf, kf, sm_scale = qf @ r, kf @ r, sm_scale / d

    # Q: one scale per group of q_group tokens, softmax scale and log2(e) folded in.
    lq_pad = -(-lq // q_group) * q_group
    qa = F.pad(qf.abs(), (0, 0, 0, lq_pad - lq)).reshape(b, h, lq_pad // q_group, q_group * d)
    q_amax = qa.amax(-1).repeat_interleave(q_group, -1)[..., :lq, None]       # [B, H, Lq, 1]
    q_amax = q_amax.clamp_min(1e-30)
    qmax = FP8_MAX if qk_fp8 else INT8_MAX
    q8 = _quant_sim(qf * (1.0 / q_amax * qmax), qk_fp8)
    q_scale = q_amax / qmax * sm_scale

    # K: smoothed, one scale per tile of block_n keys; padded keys are zero.
    if smooth_k:
        kf = kf - kf.mean(2, keepdim=True)
    n_tiles = -(-lk // block_n)
    kp = F.pad(kf, (0, 0, 0, n_tiles * block_n - lk)).reshape(b, h, n_tiles, block_n, d)
    k_amax = kp.abs().amax((-1, -2), keepdim=True).clamp_min(1e-30)          # [B, H, T, 1, 1]
    k8 = _quant_sim(kp * (1.0 / k_amax * qmax), qk_fp8)
    k_scale = (k_amax / qmax).reshape(b, h, n_tiles)

    # V: smoothed, per channel over all tokens, to e4m3.
    v_mean = vf.mean(2, keepdim=True) if smooth_v else torch.zeros_like(vf[:, :, :1])
    vf = vf - v_mean
    v_amax = vf.abs().amax(2, keepdim=True).clamp_min(1e-30)                 # [B, H, 1, D]
    v_scale = v_amax / FP8_MAX
    vp = F.pad(vf, (0, 0, 0, n_tiles * block_n - lk))
    v8 = (vp * (1.0 / v_scale)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()

    m = torch.full((b, h, lq), -math.inf)
    l = torch.zeros(b, h, lq)
    acc = torch.zeros(b, h, lq, d)
    for j in range(n_tiles):
        s = q8 @ k8[:, :, j].transpose(-1, -2)           # int8: exact (integers below 2^24)
        invalid = torch.arange(j * block_n, (j + 1) * block_n) >= lk
        tail = bool(invalid.any())                        # only the last tile is masked
        f = q_scale[..., 0] * k_scale[:, :, j, None]     # [B, H, Lq]
        s_max = (s.masked_fill(invalid, -math.inf) if tail else s).amax(-1)
        m_new = torch.maximum(m, s_max * f)
        t = torch.addcmul((LOG2_FP8_MAX - m_new)[..., None], s, f[..., None])
        p = torch.exp2(t.masked_fill(invalid, -math.inf) if tail else t)   # 448 * exp2(s*f - m_new)
        alpha = torch.exp2(m - m_new)
        l = l * alpha + p.sum(-1)
        p8 = p.clamp_(max=FP8_MAX).to(torch.float8_e4m3fn).float()
        v8j = v8[:, :, j * block_n:(j + 1) * block_n]
        if not pv_acc_bits:
            acc = acc * alpha[..., None] + p8 @ v8j
        else:
            run = acc * alpha[..., None] if pv_one_level else torch.zeros_like(acc)
            for c in range(0, block_n, 32):
                run = _truncate_mantissa(run + p8[..., c:c + 32] @ v8j[..., c:c + 32, :], pv_acc_bits)
            acc = run if pv_one_level else acc * alpha[..., None] + run
        m = m_new
    out = acc / l[..., None] * v_scale + v_mean
    return out.transpose(1, 2).to(q.dtype)


# ----------------------------------------------------------------------------------------------
# Validation and the kernel/reference choice


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, min_d: int = 16) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValidationError(f"attention takes [B, L, H, D] tensors; got {tuple(q.shape)}, "
                              f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, _, h, d = q.shape
    if k.shape[0] != b or k.shape[2:] != q.shape[2:] or v.shape != k.shape:
        raise ValidationError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: batch, heads "
                              "and head dim must match and k, v must have one shape")
    if d & (d - 1) or not min_d <= d <= 256:
        raise ValidationError(f"head dim {d} must be a power of two in [{min_d}, 256] for the Triton kernels")
    if q.shape[1] == 0 or k.shape[1] == 0:
        raise ValidationError("attention needs at least one query and one key token")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValidationError(f"q, k, v must share one float dtype; got {q.dtype}, {k.dtype}, {v.dtype}")


def kernels_interpreted() -> bool:
    """True when the kernels below were built by TRITON_INTERPRET=1 (decided at import)."""
    return triton is not None and not isinstance(_sage_fwd, triton.runtime.JITFunction)


def use_kernel(t: torch.Tensor) -> bool:
    """The one kernel-vs-nothing decision: Triton kernels need a CUDA tensor, or the interpreter
    (tests) with a CPU tensor. There is deliberately no silent fallback to a slow reference."""
    if triton is None:
        raise ValidationError("the Triton attention backends need triton: pip install triton")
    interp = kernels_interpreted()
    if t.is_cuda and not interp:
        return True
    if interp and t.device.type == "cpu":
        return True
    raise ValidationError(
        f"the Triton attention kernels run on CUDA tensors (got {t.device}); on a CPU they run only "
        "under TRITON_INTERPRET=1 (tests). Use the 'sdpa' backend here.")


# ----------------------------------------------------------------------------------------------
# Triton kernels

if triton is not None:
    # Kernels may only read globals that are constexpr.
    _K_LOG2_FP8_MAX = tl.constexpr(LOG2_FP8_MAX)

    @triton.jit
    def _round_mantissa(x, DROP: tl.constexpr):
        """Round fp32 to nearest-even keeping 23 - DROP mantissa bits (interpreter only)."""
        bits = x.to(tl.int32, bitcast=True)
        bits = bits + ((1 << (DROP - 1)) - 1) + ((bits >> DROP) & 1)
        bits = bits & (-(1 << DROP))
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _to_fp8(x, INTERP: tl.constexpr):
        """fp32 -> e4m3. On the GPU this is one cvt.rn.satfinite.e4m3x2.f32 per pair (rounds to
        nearest-even and saturates at 448), so P needs no clamp in the inner loop."""
        if INTERP:
            x = tl.minimum(tl.maximum(x, -448.0), 448.0)
            # Normal range: keep 3 mantissa bits. Subnormals (< 2^-6) are multiples of 2^-9.
            sub = (x + 24576.0) - 24576.0
            x = tl.where(tl.abs(x) < 0.015625, sub, _round_mantissa(x, 20))
        return x.to(tl.float8e4nv)

    @triton.jit
    def _to_half(x, dtype: tl.constexpr, INTERP: tl.constexpr):
        if INTERP:
            if dtype == tl.bfloat16:
                x = _round_mantissa(x, 16)
        return x.to(dtype)

    @triton.jit
    def _dot_f32acc(a, b, acc, INTERP: tl.constexpr):
        """a @ b + acc with an fp32 accumulator. The 3.9 interpreter's bf16 matmul returns garbage,
        so under the interpreter the operands go up to fp32 first (same products, same sums)."""
        if INTERP:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        return tl.dot(a, b, acc)

    @triton.jit
    def _load_head_tile(X, sxb, sxl, sxh, H, L, D: tl.constexpr, BLOCK: tl.constexpr):
        """The quantization kernels' prologue: program (pid_l, pid_bh) loads rows pid_l*BLOCK.. of
        head pid_bh of X [B, L, H, D] (zeros past L). Returns (pid_l, pid_bh, rows, cols, valid, x)."""
        pid_l = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        rows = pid_l * BLOCK + tl.arange(0, BLOCK)
        cols = tl.arange(0, D)
        valid = rows < L
        src = X + b.to(tl.int64) * sxb + h * sxh + rows[:, None].to(tl.int64) * sxl + cols[None, :]
        return pid_l, pid_bh, rows, cols, valid, tl.load(src, mask=valid[:, None], other=0.0)

    @triton.jit
    def _quant_int8_kernel(X, R, XQ, XS, MEAN,
                           sxb, sxl, sxh,
                           H, L, LP, scale_mult,
                           D: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr,
                           ROT: tl.constexpr, SMOOTH: tl.constexpr, ROW_SCALES: tl.constexpr,
                           FP8: tl.constexpr, QMAX: tl.constexpr, INTERP: tl.constexpr):
        """[B, L, H, D] float -> (x R - MEAN) as int8 (or e4m3 with FP8) [B, H, LP, D] (zero rows
        past L) and fp32 scales times `scale_mult`, one per group of GROUP tokens, stored per
        token [B, H, LP] (ROW_SCALES, for Q) or per tile [B, H, LP/BLOCK] (GROUP == BLOCK, for K).
        QMAX: the format's largest value the scale maps amax to (127 or 448)."""
        pid_l, pid_bh, rows, cols, valid, x = _load_head_tile(X, sxb, sxl, sxh, H, L, D, BLOCK)
        if ROT:
            # R is +-1: products are exact and the sum is fp32, whatever x's float format.
            r = tl.load(R + cols[:, None] * D + cols[None, :])
            x = _dot_f32acc(x, r, tl.zeros([BLOCK, D], tl.float32), INTERP)
        else:
            x = x.to(tl.float32)
        if SMOOTH:
            mean = tl.load(MEAN + pid_bh * D + cols)
            x = tl.where(valid[:, None], x - mean[None, :], 0.0)
        a = tl.abs(x)
        if GROUP == BLOCK:
            amax = tl.maximum(tl.max(tl.max(a, 1), 0), 1e-30)
            xq = x * (1.0 / amax * QMAX)
        else:
            if GROUP == 1:
                amax = tl.max(a, 1)                                   # [BLOCK]
            else:
                g = tl.max(tl.reshape(a, (BLOCK // GROUP, GROUP * D)), 1)
                amax = tl.reshape(tl.broadcast_to(g[:, None], (BLOCK // GROUP, GROUP)), (BLOCK,))
            amax = tl.maximum(amax, 1e-30)
            xq = x * (1.0 / amax * QMAX)[:, None]
        if FP8:
            xq = _to_fp8(xq, INTERP)
        else:
            xq = tl.where(xq >= 0, xq + 0.5, xq - 0.5).to(tl.int8)   # round half away from zero
        base = pid_bh.to(tl.int64) * LP
        tl.store(XQ + (base + rows[:, None]) * D + cols[None, :], xq)
        if ROW_SCALES:
            tl.store(XS + base + rows, tl.zeros([BLOCK], tl.float32) + amax / QMAX * scale_mult)
        else:
            tl.store(XS + pid_bh * (LP // BLOCK) + pid_l, amax / QMAX * scale_mult)

    @triton.jit
    def _quant_fp8_t_kernel(X, XQ, XS, MEAN, sxb, sxl, sxh, H, L, LP,
                            D: tl.constexpr, BLOCK: tl.constexpr, INTERP: tl.constexpr):
        """V [B, L, H, D] -> (V - MEAN) / XS as e4m3 [B, H, D, LP] (keys contiguous: the K-major B
        operand of the fp8 wgmma); MEAN and the per-channel scale XS are [B, H, D]; zero past L."""
        pid_l, pid_bh, rows, cols, valid, x = _load_head_tile(X, sxb, sxl, sxh, H, L, D, BLOCK)
        x = tl.where(valid[:, None], x.to(tl.float32) - tl.load(MEAN + pid_bh * D + cols)[None, :], 0.0)
        inv = 1.0 / tl.load(XS + pid_bh * D + cols)
        xq = _to_fp8(x * inv[None, :], INTERP)
        base = pid_bh.to(tl.int64) * D * LP
        tl.store(XQ + base + cols[None, :] * LP + rows[:, None], xq)

    @triton.jit
    def _sage_qk(q, K8, k_row0, start_n, offs_n, offs_d, D: tl.constexpr, TMA: tl.constexpr):
        """Scores of the query tile against key tile [start_n, start_n + BLOCK_N): int32 from int8
        operands, fp32 from e4m3 ones (qk8)."""
        if TMA:
            k = K8.load([k_row0 + start_n, 0])                                       # [BN, D] int8
        else:
            k = tl.load(K8 + (start_n + offs_n[:, None]) * D + offs_d[None, :])
        return tl.dot(q, tl.trans(k))                                              # [BM, BN] int32

    @triton.jit
    def _sage_load_vt(VT8, v_row0, start_n, LKP, offs_n, offs_d, TMA: tl.constexpr):
        if TMA:
            vt = VT8.load([v_row0, start_n])                                         # [D, BN] e4m3
        else:
            vt = tl.load(VT8 + offs_d[:, None] * LKP + (start_n + offs_n[None, :]))
        return vt

    @triton.jit
    def _exp2_poly(t):
        """2^t on the FMA/ALU pipes (FlashAttention-4's idea: part of the exponentials leave the
        MUFU unit, which on Hopper is about as busy per tile as the tensor cores). t = n + x with
        n = round(t) taken from the bits of t + 1.5*2^23 (no F2I: it issues on the slow pipe),
        x in [-1/2, 1/2]; 2^x by a cubic fitted for relative error (max 7.5e-5, far under e4m3's
        2^-4 step), then n is added to the exponent field. t is clamped at -120: there 2^t is
        below anything e4m3 keeps (2^-9) and adds < 2^-113 to a row sum; -inf gives 2^-120."""
        t = tl.maximum(t, -120.0)
        tm = t + 12582912.0                                   # 1.5*2^23 + round(t), exactly
        x = t - (tm - 12582912.0)
        p = tl.fma(tl.fma(tl.fma(0.055171434, x, 0.24261081), x, 0.69326097), x, 0.99992812)
        # (bits(tm) << 23) == round(t) << 23 mod 2^32: 0x4B400000's low 9 bits are zero.
        bits = p.to(tl.int32, bitcast=True) + (tm.to(tl.int32, bitcast=True) << 23)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _sage_softmax(m_i, s, f, valid, MASK: tl.constexpr, POLY: tl.constexpr, QK8: tl.constexpr = False):
        """One key tile's online-softmax step: s int32 scores (fp32 with QK8), f [BM] the combined
        Q·K scale (log2 e / sqrt(D) folded in), valid [BN] key mask (MASK). -> (p, m_new, alpha)."""
        if QK8:
            if MASK:
                s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * f)
            t = tl.fma(s, f[:, None], (-m_new + _K_LOG2_FP8_MAX)[:, None])   # masked: -inf
        else:
            if MASK:
                s = tl.where(valid[None, :], s, -(1 << 22))
            m_new = tl.maximum(m_i, tl.max(s, 1).to(tl.float32) * f)
            # sb = 1.5*2^23 + s exactly (no I2F); the offset is taken out inside the FFMA's bias.
            # Rounding that bias costs ~1 unit of s, against the hundreds int8 rounding costs.
            sb = (s + 0x4B400000).to(tl.float32, bitcast=True)
            bias = (-m_new + _K_LOG2_FP8_MAX) - f * 12582912.0     # constexpr on the right: see _K_*
            t = tl.fma(sb, f[:, None], bias[:, None])
        if MASK and not QK8:
            t = tl.where(valid[None, :], t, float("-inf"))
        if POLY:
            # Odd key columns on the FMA pipe, even ones on MUFU: the two units share the tile's
            # exponentials (per SM and tile the MUFU work alone is about as long as the MMAs).
            # Each thread holds column pairs in the MMA layout: the split and join stay in registers.
            ta, tb = tl.split(tl.reshape(t, (t.shape[0], t.shape[1] // 2, 2)))
            p = tl.reshape(tl.join(tl.math.exp2(ta), _exp2_poly(tb)), (t.shape[0], t.shape[1]))
        else:
            p = tl.math.exp2(t)                                 # 448 * exp2(s*f - m_new) <= 448
        return p, m_new, tl.math.exp2(m_i - m_new)

    @triton.jit
    def _sage_softmax_pv(acc, l_i, m_i, s, f, vt, valid, MASK: tl.constexpr, POLY: tl.constexpr,
                         INTERP: tl.constexpr, QK8: tl.constexpr = False, ACC1: tl.constexpr = False):
        """Softmax step and P·V of one key tile (vt: the [D, BN] e4m3 V tile)."""
        p, m_new, alpha = _sage_softmax(m_i, s, f, valid, MASK, POLY, QK8)
        l_i = l_i * alpha + tl.sum(p, 1)
        return _sage_pv(acc, alpha, _to_fp8(p, INTERP), vt, ACC1), l_i, m_new

    @triton.jit
    def _sage_pv(acc, alpha, p8, vt, ACC1: tl.constexpr):
        """acc * alpha + P·V for one key tile (p8 e4m3 [BM, BN], vt e4m3 [D, BN])."""
        if ACC1:
            # One level: the wgmma adds straight into the rescaled accumulator (no zero-filled
            # registers, the suspected cause of ptxas C7515), at the fp8 MMA's accumulation precision.
            return tl.dot(p8, tl.trans(vt), acc * alpha[:, None])
        # A fresh fp32 product per tile, added in fp32: the two-level accumulation.
        return tl.fma(acc, alpha[:, None], tl.dot(p8, tl.trans(vt)))

    @triton.jit
    def _sage_tiles(acc, l_i, m_i, q, qs, K8, KS, VT8, k_row0, v_row0, j_lo, j_hi, Lk, LKP,
                    offs_n, offs_d, D: tl.constexpr, BLOCK_N: tl.constexpr,
                    MASK: tl.constexpr, TMA: tl.constexpr, POLY: tl.constexpr, WS: tl.constexpr,
                    INTERP: tl.constexpr, QK8: tl.constexpr = False, ACC1: tl.constexpr = False):
        for j in tl.range(j_lo, j_hi, warp_specialize=WS):
            start_n = j * BLOCK_N
            s = _sage_qk(q, K8, k_row0, start_n, offs_n, offs_d, D, TMA)
            vt = _sage_load_vt(VT8, v_row0, start_n, LKP, offs_n, offs_d, TMA)
            acc, l_i, m_i = _sage_softmax_pv(acc, l_i, m_i, s, qs * tl.load(KS + j), vt,
                                             (start_n + offs_n) < Lk, MASK, POLY, INTERP, QK8, ACC1)
        return acc, l_i, m_i

    @triton.jit
    def _sage_tiles_fa3(acc, l_i, m_i, q, qs, K8, KS, VT8, k_row0, v_row0, Lk, LKP,
                        offs_n, offs_d, D: tl.constexpr, BLOCK_N: tl.constexpr,
                        TMA: tl.constexpr, POLY: tl.constexpr, ACC1: tl.constexpr, INTERP: tl.constexpr):
        """All key tiles with e4m3 Q·K (qk8) in FlashAttention-3's order: tile j's softmax runs
        while the tensor cores compute S_{j+1} = Q·K_{j+1}. Iteration j: (1) P_{j-1}·V_{j-1}, a
        synchronous wgmma (its wait also retires S_j); (2) issue S_{j+1}, carried to the next
        iteration; (3) tile j's softmax. Triton (WGMMAPipeline.cpp, dotCanBeProperlyAsync) leaves
        a wgmma in flight only if its accumulator is fp32 (hence qk8: int32 Q·K is always waited
        for at once) and its carried result is read only after the loop's first `wait 0`, which
        is why the P·V of the previous tile comes first. The first iteration's P·V multiplies a
        zero P (one wasted MMA per query tile). The last tile is peeled (masked: a no-op when Lk
        is a multiple of BLOCK_N). Same math as `_sage_tiles`, tile for tile.

        Offline sm_90 compile (triton 3.9): the PTX is as intended (S_{j+1} committed, its wait
        only at the next iteration's P·V), but ptxas (12.9/13) reports C7514 ("wgmma.mma_async
        instructions are serialized due to non wgmma instructions reading accumulator registers
        of a wgmma between start and end of the pipeline stage") and waits after every k-step:
        S_j and S_{j+1} are live together, so the loop-carried `s = s_next` becomes 32-64 movs
        of the in-flight registers at the back edge. Avoiding that copy needs the loop unrolled
        by two with the S registers alternating, and Triton makes a wgmma consumed in the same
        iteration synchronous: not expressible in Triton 3.6-3.9 (Gluon or CUDA could). At
        64x128 and 128x128 it also spills (255 registers). Kept for measurement."""
        n_tiles = tl.cdiv(Lk, BLOCK_N)
        s = _sage_qk(q, K8, k_row0, 0, offs_n, offs_d, D, TMA)
        p8 = tl.zeros_like(s).to(tl.float8e4nv)
        alpha = tl.full(l_i.shape, 1.0, tl.float32)
        for j in range(0, n_tiles - 1):
            acc = _sage_pv(acc, alpha, p8, _sage_load_vt(VT8, v_row0, tl.maximum(j - 1, 0) * BLOCK_N, LKP,
                                                         offs_n, offs_d, TMA), ACC1)
            s_next = _sage_qk(q, K8, k_row0, (j + 1) * BLOCK_N, offs_n, offs_d, D, TMA)
            p, m_i, alpha = _sage_softmax(m_i, s, qs * tl.load(KS + j), offs_n < BLOCK_N, False, POLY, True)
            l_i = l_i * alpha + tl.sum(p, 1)
            p8 = _to_fp8(p, INTERP)
            s = s_next
        start_n = (n_tiles - 1) * BLOCK_N
        acc = _sage_pv(acc, alpha, p8, _sage_load_vt(VT8, v_row0, tl.maximum(start_n - BLOCK_N, 0), LKP,
                                                     offs_n, offs_d, TMA), ACC1)
        vt = _sage_load_vt(VT8, v_row0, start_n, LKP, offs_n, offs_d, TMA)
        acc, l_i, m_i = _sage_softmax_pv(acc, l_i, m_i, s, qs * tl.load(KS + n_tiles - 1), vt,
                                         (start_n + offs_n) < Lk, True, POLY, INTERP, True, ACC1)
        return acc, l_i, m_i

    @triton.jit
    def _sage_tiles_pipe(acc, l_i, m_i, q, qs, K8, KS, VT8, k_row0, v_row0, Lk, LKP,
                         offs_n, offs_d, D: tl.constexpr, BLOCK_N: tl.constexpr,
                         TMA: tl.constexpr, POLY: tl.constexpr, INTERP: tl.constexpr):
        """All key tiles with P_j·V_j left in flight: its product is added to the accumulator
        only in the next iteration, after S_{j+1} = Q·K_{j+1} is waited for, so the tensor cores
        run P_j·V_j while the warps finish tile j (row sums) and start tile j+1.

        Why not FlashAttention-3's order (issue S_{j+1} before tile j's softmax)? Triton (3.6 -
        3.9, WGMMAPipeline.cpp) waits right after every wgmma whose accumulator is not fp32, so
        the int32 Q·K is always synchronous; an fp32 wgmma whose result is only carried to the
        next iteration and read after that iteration's first full wait may stay in flight
        ("properly async"). The two-level accumulation is unchanged: the same fma(acc, alpha,
        P·V) per tile, in the same order. The last tile is peeled (always masked: a no-op when
        Lk is a multiple of BLOCK_N).

        Known problem (offline sm_90 compile, triton 3.9, ptxas 12.9/13): Triton's PTX leaves the
        P·V wgmma in flight, but ptxas then reports C7515 ("wgmma.mma_async instructions are
        serialized due to non wgmma instructions defining accumulator registers"; likely the
        zero-fill of the fresh product's registers) and waits after every wgmma k-step, QK
        included. Measure before use; the fix needs the zero-fill gone (e.g. a Gluon kernel)."""
        n_tiles = tl.cdiv(Lk, BLOCK_N)
        pv = tl.zeros_like(acc)
        alpha = tl.full(l_i.shape, 1.0, tl.float32)
        for j in range(0, n_tiles - 1):
            start_n = j * BLOCK_N
            s = _sage_qk(q, K8, k_row0, start_n, offs_n, offs_d, D, TMA)
            acc = tl.fma(acc, alpha[:, None], pv)                # tile j-1's product, now complete
            p, m_i, alpha = _sage_softmax(m_i, s, qs * tl.load(KS + j), offs_n < BLOCK_N, False, POLY)
            vt = _sage_load_vt(VT8, v_row0, start_n, LKP, offs_n, offs_d, TMA)
            pv = tl.dot(_to_fp8(p, INTERP), tl.trans(vt))
            l_i = l_i * alpha + tl.sum(p, 1)                    # overlaps the P·V above
        start_n = (n_tiles - 1) * BLOCK_N
        s = _sage_qk(q, K8, k_row0, start_n, offs_n, offs_d, D, TMA)
        acc = tl.fma(acc, alpha[:, None], pv)
        p, m_i, alpha = _sage_softmax(m_i, s, qs * tl.load(KS + n_tiles - 1), (start_n + offs_n) < Lk, True, POLY)
        vt = _sage_load_vt(VT8, v_row0, start_n, LKP, offs_n, offs_d, TMA)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.fma(acc, alpha[:, None], tl.dot(_to_fp8(p, INTERP), tl.trans(vt)))
        return acc, l_i, m_i

    @triton.jit
    def _sage_fwd(Q8, QS, K8, KS, VT8, VS, VM, O,
                  sob, sol, soh,
                  H, Lq, Lk, LQP, LKP,
                  D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  TMA: tl.constexpr, PIPE: tl.constexpr, WS: tl.constexpr, POLY: tl.constexpr,
                  INTERP: tl.constexpr, QK8: tl.constexpr = False, FA3: tl.constexpr = False,
                  ACC1: tl.constexpr = False):
        """Q8, K8, VT8 are pointers, or with TMA tensor descriptors over their 2-D views
        [B*H*LQP, D], [B*H*LKP, D], [B*H*D, LKP] (block [BLOCK_M, D], [BLOCK_N, D], [D, BLOCK_N]):
        the copy engine then moves the tiles, which saves the address registers and instructions."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        q_base = pid_bh.to(tl.int64) * LQP
        if TMA:
            q = Q8.load([pid_bh * LQP + pid_m * BLOCK_M, 0])
        else:
            q = tl.load(Q8 + (q_base + offs_m[:, None]) * D + offs_d[None, :])   # padded: no mask
            K8 = K8 + pid_bh.to(tl.int64) * LKP * D
            VT8 = VT8 + pid_bh.to(tl.int64) * D * LKP
        qs = tl.load(QS + q_base + offs_m)
        KS = KS + pid_bh * (LKP // BLOCK_N)
        k_row0 = pid_bh * LKP
        v_row0 = pid_bh * D

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        if PIPE:
            acc, l_i, m_i = _sage_tiles_pipe(acc, l_i, m_i, q, qs, K8, KS, VT8, k_row0, v_row0, Lk, LKP,
                                             offs_n, offs_d, D, BLOCK_N, TMA, POLY, INTERP)
        elif FA3:
            acc, l_i, m_i = _sage_tiles_fa3(acc, l_i, m_i, q, qs, K8, KS, VT8, k_row0, v_row0, Lk, LKP,
                                            offs_n, offs_d, D, BLOCK_N, TMA, POLY, ACC1, INTERP)
        else:
            n_full = Lk // BLOCK_N
            acc, l_i, m_i = _sage_tiles(acc, l_i, m_i, q, qs, K8, KS, VT8, k_row0, v_row0, 0, n_full, Lk, LKP,
                                        offs_n, offs_d, D, BLOCK_N, False, TMA, POLY, WS, INTERP, QK8, ACC1)
            if n_full * BLOCK_N < Lk:
                acc, l_i, m_i = _sage_tiles(acc, l_i, m_i, q, qs, K8, KS, VT8, k_row0, v_row0, n_full,
                                            n_full + 1, Lk, LKP, offs_n, offs_d, D, BLOCK_N, True, TMA, POLY,
                                            False, INTERP, QK8, ACC1)
        vs = tl.load(VS + pid_bh * D + offs_d)
        vm = tl.load(VM + pid_bh * D + offs_d)
        out = acc * (1.0 / l_i)[:, None] * vs[None, :] + vm[None, :]
        dst = O + b.to(tl.int64) * sob + h * soh + offs_m[:, None].to(tl.int64) * sol + offs_d[None, :]
        tl.store(dst, _to_half(out, O.dtype.element_ty, INTERP), mask=(offs_m < Lq)[:, None])

    @triton.jit
    def _attn_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, skl, svl, qk_scale, j_lo, j_hi, Lk,
                    offs_n, BLOCK_N: tl.constexpr, MASK: tl.constexpr, INTERP: tl.constexpr):
        for j in range(j_lo, j_hi):
            start_n = j * BLOCK_N
            if MASK:
                valid = (start_n + offs_n) < Lk
                k = tl.load(k_ptrs + start_n * skl, mask=valid[:, None], other=0.0)
            else:
                k = tl.load(k_ptrs + start_n * skl)
            s = _dot_f32acc(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], tl.float32), INTERP)
            if MASK:
                s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            p = tl.math.exp2(s * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            if MASK:
                v = tl.load(v_ptrs + start_n * svl, mask=valid[:, None], other=0.0)
            else:
                v = tl.load(v_ptrs + start_n * svl)
            acc = acc * alpha[:, None]
            acc = _dot_f32acc(_to_half(p, v.dtype, INTERP), v, acc, INTERP)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _attn_fwd(Q, K, V, O,
                  sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh,
                  H, Lq, Lk, qk_scale,
                  D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  INTERP: tl.constexpr):
        """Plain flash attention straight from [B, L, H, D] in bf16/fp16 (fp32 runs as tf32)."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        row_ok = offs_m < Lq
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sql + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        k_ptrs = K + b * skb + h * skh + offs_n[:, None].to(tl.int64) * skl + offs_d[None, :]
        v_ptrs = V + b * svb + h * svh + offs_n[:, None].to(tl.int64) * svl + offs_d[None, :]

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        n_full = Lk // BLOCK_N
        acc, l_i, m_i = _attn_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, skl, svl, qk_scale, 0, n_full, Lk,
                                    offs_n, BLOCK_N, False, INTERP)
        if n_full * BLOCK_N < Lk:
            acc, l_i, m_i = _attn_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, skl, svl, qk_scale, n_full,
                                        n_full + 1, Lk, offs_n, BLOCK_N, True, INTERP)
        out = acc * (1.0 / l_i)[:, None]
        dst = O + b * sob + h * soh + offs_m[:, None].to(tl.int64) * sol + offs_d[None, :]
        tl.store(dst, _to_half(out, O.dtype.element_ty, INTERP), mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------------
# Launchers


@dataclass
class QuantizedQKV:
    """What `quantize_qkv` produces; shapes for B batches, H heads, padded lengths LQP / LKP."""
    q8: torch.Tensor          # int8 (e4m3 with qk8) [B, H, LQP, D]: (q R) per token, R = rotation_matrix(D)
    q_scale: torch.Tensor     # fp32 [B, H, LQP]: log2(e)/sqrt(D)/D folded in
    k8: torch.Tensor          # int8 (e4m3 with qk8) [B, H, LKP, D]: k R minus its per-head mean
    k_scale: torch.Tensor     # fp32 [B, H, LKP / block_n]
    vt8: torch.Tensor         # e4m3 [B, H, D, LKP]: (v - v_mean) / v_scale, transposed
    v_scale: torch.Tensor     # fp32 [B, H, D]
    v_mean: torch.Tensor      # fp32 [B, H, D]
    block_n: int


def _pad_to(n: int, m: int) -> int:
    return -(-n // m) * m


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_m: int, block_n: int,
                 q_group: int = 1, rotate: bool = True, qk8: bool = False) -> QuantizedQKV:
    """Q per token (or per q_group tokens), K smoothed per block_n keys (both rotated; int8, or
    e4m3 with qk8), V smoothed per channel to e4m3. Mirrors `sage_attention_sim`."""
    _check_qkv(q, k, v, min_d=32)
    if q_group < 1 or q_group & (q_group - 1) or q_group > block_m:
        raise ValidationError(f"q_group={q_group} must be a power of two <= block_m={block_m}")
    use_kernel(q)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    b, lq, h, d = q.shape
    lk = k.shape[1]
    lqp, lkp = _pad_to(lq, block_m), _pad_to(lk, block_n)
    dev = q.device
    interp = kernels_interpreted()
    rot = rotation_matrix(d, dtype=q.dtype, device=dev)
    sm_scale = LOG2E / math.sqrt(d) / (d if rotate else 1)

    qk_dtype, qmax = (torch.float8_e4m3fn, FP8_MAX) if qk8 else (torch.int8, INT8_MAX)
    q8 = torch.empty(b, h, lqp, d, dtype=qk_dtype, device=dev)
    q_scale = torch.empty(b, h, lqp, dtype=torch.float32, device=dev)
    _quant_int8_kernel[(lqp // block_m, b * h)](
        q, rot, q8, q_scale, q_scale, q.stride(0), q.stride(1), q.stride(2), h, lq, lqp, sm_scale,
        D=d, BLOCK=block_m, GROUP=q_group, ROT=rotate, SMOOTH=False, ROW_SCALES=True, FP8=qk8, QMAX=qmax, INTERP=interp,
        num_warps=4)

    # Token reductions in torch (bf16 in, fp32 accumulation; no upcast copy on CUDA). The mean of
    # k R is mean(k) R, rotated here in fp32.
    k_mean = torch.sum(k, dim=1, dtype=torch.float32) / lk                          # [B, H, D]
    if rotate:
        k_mean = k_mean @ rot.float()
    k8 = torch.empty(b, h, lkp, d, dtype=qk_dtype, device=dev)
    k_scale = torch.empty(b, h, lkp // block_n, dtype=torch.float32, device=dev)
    _quant_int8_kernel[(lkp // block_n, b * h)](
        k, rot, k8, k_scale, k_mean.contiguous(), k.stride(0), k.stride(1), k.stride(2), h, lk, lkp, 1.0,
        D=d, BLOCK=block_n, GROUP=block_n, ROT=rotate, SMOOTH=True, ROW_SCALES=False, FP8=qk8, QMAX=qmax, INTERP=interp,
        num_warps=4)

    v_mean = torch.sum(v, dim=1, dtype=torch.float32) / lk
    v_min, v_max = torch.aminmax(v, dim=1)
    v_amax = torch.maximum(v_max.float() - v_mean, v_mean - v_min.float())
    v_scale = (v_amax.clamp_min(1e-30) / FP8_MAX).contiguous()
    vt8 = torch.empty(b, h, d, lkp, dtype=torch.float8_e4m3fn, device=dev)
    _quant_fp8_t_kernel[(lkp // block_n, b * h)](
        v, vt8, v_scale, v_mean.contiguous(), v.stride(0), v.stride(1), v.stride(2), h, lk, lkp,
        D=d, BLOCK=block_n, INTERP=interp, num_warps=4)
    return QuantizedQKV(q8, q_scale, k8, k_scale, vt8, v_scale, v_mean.contiguous(), block_n)


def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, config: AttnConfig | None = None,
                   q_group: int = 1, rotate: bool = True) -> torch.Tensor:
    """INT8 (FP8 with config.qk8) Q·Kᵀ / FP8 P·V flash attention on [B, L, H, D] -> [B, Lq, H, D]
    in q's dtype."""
    _check_qkv(q, k, v, min_d=32)
    use_kernel(q)
    cfg = config or default_config("sage", q.device)
    qq = quantize_qkv(q, k, v, block_m=cfg.block_m, block_n=cfg.block_n, q_group=q_group, rotate=rotate,
                      qk8=cfg.qk8)
    return sage_attention_quantized(qq, q.shape, k.shape[1], q.dtype, cfg)


def sage_attention_quantized(qq: QuantizedQKV, q_shape, lk: int, dtype: torch.dtype,
                             cfg: AttnConfig) -> torch.Tensor:
    """The attention kernel alone on already quantized operands (benchmarks time it separately)."""
    b, lq, h, d = q_shape
    if qq.block_n != cfg.block_n or qq.q8.shape[2] % cfg.block_m or (qq.q8.dtype != torch.int8) != cfg.qk8:
        raise ValidationError(f"operands quantized for block_n={qq.block_n} do not fit config {cfg}")
    out = torch.empty(b, lq, h, d, dtype=dtype, device=qq.q8.device)
    q8, k8, vt8 = qq.q8, qq.k8, qq.vt8
    if cfg.tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        q8 = TensorDescriptor.from_tensor(q8.view(-1, d), [cfg.block_m, d])
        k8 = TensorDescriptor.from_tensor(k8.view(-1, d), [cfg.block_n, d])
        vt8 = TensorDescriptor.from_tensor(vt8.view(-1, vt8.shape[-1]), [d, cfg.block_n])
    _sage_fwd[(triton.cdiv(lq, cfg.block_m), b * h)](
        q8, qq.q_scale, k8, qq.k_scale, vt8, qq.v_scale, qq.v_mean, out,
        out.stride(0), out.stride(1), out.stride(2),
        h, lq, lk, qq.q8.shape[2], qq.k8.shape[2],
        D=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, TMA=cfg.tma, PIPE=cfg.pipe, WS=cfg.ws, POLY=cfg.poly,
        QK8=cfg.qk8, FA3=cfg.fa3, ACC1=cfg.acc1, INTERP=kernels_interpreted(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}))
    return out


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     config: AttnConfig | None = None) -> torch.Tensor:
    """Plain (bf16/fp16) Triton flash attention on [B, L, H, D] -> [B, Lq, H, D]."""
    _check_qkv(q, k, v)
    use_kernel(q)
    cfg = config or default_config("triton", q.device)
    if cfg.sage_only:
        raise ValidationError(f"the tma/pipe/ws/poly/qk8/fa3/acc1 options apply to the sage kernel only "
                              f"(got {cfg.spec})")
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    b, lq, h, d = q.shape
    out = torch.empty(b, lq, h, d, dtype=q.dtype, device=q.device)
    _attn_fwd[(triton.cdiv(lq, cfg.block_m), b * h)](
        q, k, v, out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        h, lq, k.shape[1], LOG2E / math.sqrt(d),
        D=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, INTERP=kernels_interpreted(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}))
    return out


# ----------------------------------------------------------------------------------------------
# torch.library ops: compile / export see one opaque op each. The config travels as ints.


@torch.library.custom_op("wanimate::sage_attention", mutates_args=())
def sage_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int, block_n: int,
                      num_warps: int, num_stages: int, q_group: int, tma: bool = False,
                      spec: str = "") -> torch.Tensor:
    """`spec` (AttnConfig.spec), when given, is the whole config (it carries the variant flags)."""
    cfg = parse_config(spec) if spec else AttnConfig(block_m, block_n, num_warps, num_stages, tma)
    return sage_attention(q, k, v, config=cfg, q_group=q_group)


@sage_attention_op.register_fake
def _(q, k, v, block_m, block_n, num_warps, num_stages, q_group, tma=False, spec=""):
    return q.new_empty(q.shape)


@torch.library.custom_op("wanimate::triton_attention", mutates_args=())
def triton_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int, block_n: int,
                        num_warps: int, num_stages: int) -> torch.Tensor:
    return triton_attention(q, k, v, config=AttnConfig(block_m, block_n, num_warps, num_stages))


@triton_attention_op.register_fake
def _(q, k, v, block_m, block_n, num_warps, num_stages):
    return q.new_empty(q.shape)


# ----------------------------------------------------------------------------------------------
# Test and benchmark inputs


def wan_like_qkv(b: int, l: int, h: int, d: int, *, seed: int = 0, lk: int | None = None,
                 n_outliers: int = 4, outlier_range: tuple[float, float] = (10.0, 50.0),
                 q_gain: float = 0.5, v_mean: float = 1.0,
                 dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
    """q, k, v [B, L, H, D] shaped like a DiT's after RMSNorm + RoPE: unit-scale values with
    `n_outliers` channels per head 10-50x larger. In q those channels vary per token; in k they
    sit on a large per-channel offset shared by all tokens (the bias K smoothing removes). q is
    scaled by `q_gain` (0.5: logits with a std of about 2.6, a softmax over ~75 effective keys at
    1k tokens; 1.0: std 5, ~10 keys, near one-hot). v has a per-channel mean of scale `v_mean`
    shared by all tokens, as a linear projection of the residual stream has; v_mean=0 is the
    adversarial i.i.d. case where fp8 V alone costs about 2.6% rel L2."""
    g = torch.Generator(device=device).manual_seed(seed)   # generated where used: 75k tokens x 40 heads
    lk = l if lk is None else lk
    q = torch.randn(b, l, h, d, generator=g, device=device)
    k = torch.randn(b, lk, h, d, generator=g, device=device)
    v = torch.randn(b, lk, h, d, generator=g, device=device)
    v += v_mean * torch.randn(h, d, generator=g, device=device)
    lo, hi = outlier_range
    for t, varies in ((q, True), (k, False)):
        ch = torch.stack([torch.randperm(d, generator=g, device=device)[:n_outliers] for _ in range(h)])
        mag = lo + (hi - lo) * torch.rand(h, n_outliers, generator=g, device=device)
        idx = ch[None, None].expand(b, t.shape[1], h, n_outliers)
        if varies:
            t.scatter_(3, idx, t.gather(3, idx) * mag)
        else:
            sign = torch.where(torch.rand(h, n_outliers, generator=g, device=device) < 0.5, -1.0, 1.0)
            t.scatter_(3, idx, t.gather(3, idx) + mag * sign)
    return tuple(x.to(device=device, dtype=dtype) for x in (q * q_gain, k, v))
