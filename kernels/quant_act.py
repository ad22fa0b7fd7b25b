"""Per-token activation quantization for the FP8 and INT8 linears (quant/): one pass over x.

The math is `per_token_quant_ref` (quant/act.py, imported here as this kernel's reference; it lives
there so that the CPU emulation needs no triton): per row, amax -> scale = amax / QMAX, and
x * (QMAX / amax) rounded half-to-even onto the e4m3 grid or the integers. The kernel matches the
reference bit for bit (both divisions are single IEEE divisions: div_rn here).

Why a kernel: the reference in eager PyTorch makes five or six passes over x, two of them in fp32
(about 5 GB of traffic for one [32760, 5120] bf16 input, ~1.5 ms on an H100 by bandwidth), which at
480p costs about as much as the FP8 GEMM saves; this kernel reads x once and writes 1 byte per
element (~0.15 ms). bench/quant.py times both.

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

MAX_K = 32768              # one row per program, held in registers
# Triton decides between compiling and interpreting when a kernel is defined, i.e. at import.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _per_token_quant_kernel(
    X,                      # [M, K] input, row stride stride_xm, unit column stride
    Q,                      # [M, K] output, int8 or float8e4nv, contiguous
    S,                      # [M] fp32 scales
    K,                      # row length
    stride_xm,
    QMAX: tl.constexpr,     # 448.0 or 127.0
    IS_INT8: tl.constexpr,
    BLOCK: tl.constexpr,    # next power of two >= K
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    x = tl.load(X + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12)
    y = x * tl.math.div_rn(QMAX, amax)
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
        q = tl.where(y.to(tl.int32, bitcast=True) < 0, -r, r)
    tl.store(Q + row * K + cols, q.to(Q.dtype.element_ty), mask=mask)
    tl.store(S + row, tl.math.div_rn(amax, QMAX))


def per_token_quant_triton(x: torch.Tensor, int8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8 if int8 else FP8, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    block = triton.next_power_of_2(k)
    num_warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    _per_token_quant_kernel[(m,)](x, q, scale, k, x.stride(0), QMAX=INT8_MAX if int8 else FP8_MAX,
                                  IS_INT8=int8, BLOCK=block, num_warps=num_warps)
    return q, scale


@torch.library.custom_op("wanimate::per_token_quant", mutates_args=())
def per_token_quant(x: torch.Tensor, int8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The op torch.compile and export see: x [M, K] -> (q [M, K], scale [M, 1] fp32)."""
    return per_token_quant_triton(x, int8)


@per_token_quant.register_fake
def _(x, int8):
    m, k = x.shape
    return (x.new_empty((m, k), dtype=torch.int8 if int8 else FP8), x.new_empty((m, 1), dtype=torch.float32))


def kernel_ok(x: torch.Tensor) -> bool:
    """Whether the kernel takes x (else run per_token_quant_ref): a 2-D row-major float tensor
    with K <= MAX_K on a CUDA device, or on the CPU under TRITON_INTERPRET=1 (tests only)."""
    on_device = (x.device.type == "cpu") if INTERPRETED else x.is_cuda
    return (on_device and x.dim() == 2 and x.stride(-1) == 1 and 0 < x.shape[1] <= MAX_K
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32))
