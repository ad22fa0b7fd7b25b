"""Per-token activation quantization for the FP8 and INT8 linears (quant/): one read of x from DRAM.

The math is `per_token_quant_ref` (quant/act.py, imported here as this kernel's reference; it lives
there so that the CPU emulation needs no triton): per row, amax -> scale = amax / QMAX, and
x * (QMAX / amax) rounded half-to-even onto the e4m3 grid or the integers. The kernel matches the
reference bit for bit (both divisions are single IEEE divisions: div_rn here).

Why a kernel: the reference in eager PyTorch makes five or six passes over x, two of them in fp32
(about 5 GB of traffic for one [32760, 5120] bf16 input, ~1.5 ms on an H100 by bandwidth), which at
480p costs about as much as the FP8 GEMM saves; this kernel reads x once and writes 1 byte per
element (~0.12 ms at 4 TB/s). bench/quant.py times both, and the launch settings (its actquant part).
The first version (fp32 row, 16 warps, one row per program) ran at ~1.35 TB/s on an H200: the row
in fp32 plus the rounding temporaries left room for about one program per SM, so loads, the
reduction and the stores did not overlap. Holding the row in its own dtype with 8 warps did not
help (~1.5 TB/s whatever the warps or rows per program, bench/results/quant_h200_policy.log), so
rows of the DiT's widths now go through a two-pass chunked kernel (the design that took
rms_norm_rope from 0.60 to 0.86 of the copy ceiling): few registers, many rows in flight per SM.

`gelu_per_token_quant` is the same pass over GELU(tanh)(x): the FFN's hidden activation goes from
the up-projection's output to the down GEMM's e4m3 input without writing the GELU output.

Why the rounding is done by hand: the Triton interpreter (TRITON_INTERPRET=1, the CPU tests)
rounds fp32 -> fp8 wrongly when the mantissa carries into the exponent (124.5 -> 64), so the kernel
rounds onto the e4m3 grid in fp32 itself and the final cast is exact on every backend.
On the GPU the same code compiles to a few integer ops per element; the kernel stays memory-bound.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..quant.act import AMAX_FLOOR, FP8, FP8_MAX, INT8_MAX, per_token_quant_ref  # noqa: F401  (the reference)

MAX_K = 32768              # whole rows held in registers
# Triton decides between compiling and interpreting when a kernel is defined, i.e. at import.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _round_to_grid(y, QMAX: tl.constexpr, IS_INT8: tl.constexpr):
    """y (fp32, already scaled) -> clamped and rounded half-to-even onto the int8 or e4m3 grid, still fp32
    (so the final cast is exact on every backend)."""
    y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
    if IS_INT8:
        # Adding 1.5 * 2^23 leaves no fraction bits: fp32 addition rounds to the nearest even integer.
        q = (y + 12582912.0) - 12582912.0
    else:
        # Round |y| and put the sign back, so that values rounding to zero keep it (-0 as torch does).
        a = tl.abs(y)
        # Normal e4m3 (|y| >= 2^-6): keep 3 of fp32's 23 mantissa bits, round half to even on the
        # integer view (a carry moves into the exponent, as it should).
        bits = a.to(tl.int32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
        # Subnormal e4m3 (spacing 2^-9): 1.5 * 2^14 puts |y| in a binade whose fp32 spacing is 2^-9.
        sub = (a + 24576.0) - 24576.0
        r = tl.where(a < 0.015625, sub, normal)
        # The sign goes back as a bit: a negation (`-r`) compiles to 0 - r on the GPU, which turns
        # -0 into +0 (seen on an H200: 573 of 168M codes, tiny negatives that round to zero;
        # bench/quant_act_check.py), while the reference and the interpreter keep -0.
        sign = y.to(tl.int32, bitcast=True) & -2147483648
        q = (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return q


@triton.jit
def _gelu_tanh(x):
    """GELU(tanh) of fp32 x: 0.5 x (1 + tanh(z)) = x / (1 + exp(-2z)), z = sqrt(2/pi) (x + 0.044715 x^3).
    The sigmoid form has no cancellation at negative x (torch's 1 + tanh(z) has), and both tails
    are exact (exp overflow -> -0, underflow -> x). Rounded to bf16 it agrees with torch's bf16
    GELU up to one bf16 ulp (closer to the exact value than torch's own, tests/test_quant.py)."""
    z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return x / (1.0 + tl.exp(-2.0 * z))


@triton.jit
def _gelu_rounded(x, dtype: tl.constexpr):
    """gelu_tanh(x) rounded to x's dtype (bf16 or fp32), as the unfused GELU module's output would be.
    The rounding to bf16 is done by hand (half to even on the integer view) because the interpreter
    truncates fp32 -> bf16; the result then converts exactly on every backend."""
    g = _gelu_tanh(x.to(tl.float32))
    if dtype == tl.bfloat16:
        bits = g.to(tl.int32, bitcast=True)
        g = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return g.to(dtype)


@triton.jit
def _per_token_quant_kernel(
    X,                      # [M, K] input, row stride stride_xm, unit column stride
    Q,                      # [M, K] output, int8 or float8e4nv, contiguous
    S,                      # [M] fp32 scales
    M, K,
    stride_xm,
    QMAX: tl.constexpr,     # 448.0 or 127.0
    IS_INT8: tl.constexpr,
    BLOCK: tl.constexpr,    # next power of two >= K
    ROWS: tl.constexpr,     # rows per program (a power of two)
    EARLY_F32: tl.constexpr,  # upcast at the load (the first kernel's way; kept for bench/quant.py's old-vs-new row)
    GELU: tl.constexpr,     # quantize gelu_tanh(x) rounded to x's dtype (the FFN hidden activation)
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    rmask = rows < M
    mask = rmask[:, None] & (cols < K)[None, :]
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    if GELU:
        x = _gelu_rounded(x, X.dtype.element_ty)
    if EARLY_F32:
        x = x.to(tl.float32)
    # The row stays in registers in its own dtype (bf16: half the registers of fp32) across the
    # reduction; |x| and max are exact in any float dtype, so the amax equals the fp32 one. Fewer
    # registers per row = more rows in flight per SM, which is what a memory-bound row kernel needs
    # (the fp32 row plus the rounding temporaries held one 16-warp row per SM: ~1.35 TB/s on an H200).
    amax = tl.maximum(tl.max(tl.abs(x), axis=1).to(tl.float32), 1e-12)
    limit = tl.full([ROWS], QMAX, tl.float32)
    y = x.to(tl.float32) * tl.math.div_rn(limit, amax)[:, None]
    q = _round_to_grid(y, QMAX, IS_INT8)
    tl.store(Q + rows[:, None] * K + cols[None, :], q.to(Q.dtype.element_ty), mask=mask)
    tl.store(S + rows, tl.math.div_rn(amax, limit), mask=rmask)


@triton.jit
def _per_token_quant_chunk_kernel(
    X, Q, S, M, K, stride_xm,
    QMAX: tl.constexpr, IS_INT8: tl.constexpr,
    CHUNK: tl.constexpr,    # columns per step (a power of two)
    NCHUNK: tl.constexpr,   # cdiv(K, CHUNK)
    GELU: tl.constexpr,
):
    """One row in two passes over CHUNK-column chunks (the design of kernels/rms_norm_rope.py):
    pass 1 loads every chunk and keeps a per-lane max of |x|; pass 2 re-reads each chunk (from
    L1/L2: the row was just read) and writes it quantized. Few registers per program, so many rows
    are in flight per SM, which is what the whole-row kernel above lacked (~1.5 TB/s on an H200
    whatever its warps or rows per program). Same values as the whole-row kernel: the max is exact
    in any order and the rest is elementwise."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, CHUNK)
    acc = tl.zeros([CHUNK], dtype=tl.float32)
    for i in tl.static_range(NCHUNK):
        cols = i * CHUNK + offs
        x = tl.load(X + row * stride_xm + cols, mask=cols < K, other=0.0)
        if GELU:
            x = _gelu_rounded(x, X.dtype.element_ty)
        acc = tl.maximum(acc, tl.abs(x).to(tl.float32))
    amax = tl.maximum(tl.max(acc, axis=0), 1e-12)
    limit = QMAX + tl.zeros([1], tl.float32)          # a tensor: div_rn takes no python scalar
    inv = tl.math.div_rn(limit, amax + tl.zeros([1], tl.float32))
    for i in tl.static_range(NCHUNK):
        cols = i * CHUNK + offs
        x = tl.load(X + row * stride_xm + cols, mask=cols < K, other=0.0)
        if GELU:
            x = _gelu_rounded(x, X.dtype.element_ty)
        q = _round_to_grid(x.to(tl.float32) * inv, QMAX, IS_INT8)
        tl.store(Q + row * K + cols, q.to(Q.dtype.element_ty), mask=cols < K)
    tl.store(S + row + tl.arange(0, 1), tl.math.div_rn(amax + tl.zeros([1], tl.float32), limit))


def launch_config(k: int) -> dict:
    """BLOCK, ROWS and num_warps for rows of length k: 8 warps over a whole row (BLOCK >= 4096:
    16-32 bf16 values per thread, two to four 16-byte loads), several rows per program for short
    rows so that a program still moves ~8K elements. bench/quant.py sweeps the alternatives."""
    block = triton.next_power_of_2(k)
    rows = max(1, min(16, 8192 // block))
    num_warps = 4 if block * rows <= 2048 else 8
    return {"BLOCK": block, "ROWS": rows, "num_warps": num_warps}


# The two-pass chunked kernel for rows of at least this many columns (all of the DiT's linears):
# 2048 columns over 4 warps, two 16-byte bf16 vectors per thread per chunk: the best of the H200
# sweep at 480p (2.57 TB/s at K=5120, 3.08 at 13824, vs 1.51 / 1.53 for the whole-row kernel;
# bench/results/quant_h200_policies.log, synchronized timing; timed back to back 3.13 / 3.16 vs
# 2.14 / 2.84, quant_actquant_h200_backtoback.log). Shorter rows use the whole-row kernel, which
# packs several rows into one program.
CHUNK_MIN_K, CHUNK, CHUNK_WARPS = 2048, 2048, 4


def per_token_quant_triton(x: torch.Tensor, int8: bool, *, gelu: bool = False, variant: str | None = None,
                           rows: int | None = None, num_warps: int | None = None, chunk: int | None = None,
                           early_f32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q, scale [M, 1]); gelu: quantize gelu_tanh(x) instead. variant "chunk" (two passes
    over column chunks; the default for K >= CHUNK_MIN_K) or "row" (the whole row in registers);
    rows / num_warps / chunk / early_f32 override the launch settings (benchmark sweeps; every
    setting gives the same bits)."""
    m, k = x.shape
    if gelu and x.dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"the fused GELU takes bf16 or fp32 input, got {x.dtype}")
    variant = variant or ("chunk" if k >= CHUNK_MIN_K else "row")
    if variant not in ("chunk", "row"):
        raise ValueError(f"per_token_quant variant must be 'chunk' or 'row', got {variant!r}")
    q = torch.empty((m, k), dtype=torch.int8 if int8 else FP8, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    qmax = INT8_MAX if int8 else FP8_MAX
    if variant == "chunk":
        c = chunk or min(CHUNK, triton.next_power_of_2(k))
        _per_token_quant_chunk_kernel[(m,)](x, q, scale, m, k, x.stride(0), QMAX=qmax, IS_INT8=int8, CHUNK=c,
                                            NCHUNK=triton.cdiv(k, c), GELU=gelu,
                                            num_warps=num_warps or min(CHUNK_WARPS, max(1, c // 256)))
        return q, scale
    cfg = launch_config(k)
    if rows is not None:
        cfg["ROWS"] = rows
    if num_warps is not None:
        cfg["num_warps"] = num_warps
    grid = (triton.cdiv(m, cfg["ROWS"]),)
    _per_token_quant_kernel[grid](x, q, scale, m, k, x.stride(0), QMAX=qmax,
                                  IS_INT8=int8, EARLY_F32=early_f32, GELU=gelu, **cfg)
    return q, scale


def gelu_tanh_ref(x: torch.Tensor) -> torch.Tensor:
    """The FFN's activation as engine/model.py runs it (nn.GELU(approximate="tanh"), in x's dtype)."""
    return torch.nn.functional.gelu(x, approximate="tanh")


@torch.library.custom_op("wanimate::per_token_quant", mutates_args=())
def per_token_quant(x: torch.Tensor, int8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The op torch.compile and export see: x [M, K] -> (q [M, K], scale [M, 1] fp32)."""
    return per_token_quant_triton(x, int8)


@per_token_quant.register_fake
def _(x, int8):
    m, k = x.shape
    return (x.new_empty((m, k), dtype=torch.int8 if int8 else FP8), x.new_empty((m, 1), dtype=torch.float32))


@torch.library.custom_op("wanimate::gelu_per_token_quant", mutates_args=())
def gelu_per_token_quant(x: torch.Tensor, int8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """per_token_quant(gelu_tanh(x)) in one pass: the FFN up-projection's output -> the down GEMM's input."""
    return per_token_quant_triton(x, int8, gelu=True)


@gelu_per_token_quant.register_fake
def _(x, int8):
    m, k = x.shape
    return (x.new_empty((m, k), dtype=torch.int8 if int8 else FP8), x.new_empty((m, 1), dtype=torch.float32))


def kernel_ok(x: torch.Tensor) -> bool:
    """Whether the kernel takes x (else run per_token_quant_ref): a 2-D row-major float tensor
    with K <= MAX_K on a CUDA device, or on the CPU under TRITON_INTERPRET=1 (tests only)."""
    on_device = (x.device.type == "cpu") if INTERPRETED else x.is_cuda
    return (on_device and x.dim() == 2 and x.stride(-1) == 1 and 0 < x.shape[1] <= MAX_K
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32))
