"""The INT8 GEMM epilogue: int32 accumulators -> scaled, biased output in one pass.

    out_ij = (acc_ij * scale_a_i) * scale_b_j + bias_j        computed in fp32, rounded once to out dtype
(`int8_epilogue_ref` in quant/act.py is the reference; the kernel matches it bit for bit)

torch._int_mm returns int32 [M, N] and has no epilogue. Done in eager PyTorch the scaling takes
three or four passes with fp32 temporaries (about 5x the bytes of the output; at [32760, 13824]
about 10 GB, ~3 ms on an H100, 60% of the GEMM itself); this kernel reads the accumulators once and
writes the output once.

The same kernel dequantizes the int8 weight-only layers (quant/int8.py int8_wo, int8_wo_cs): with
acc = the int8 weight [out, in], scale_a = the per-row scale and scale_b = the per-column scale
(ones for int8_wo) it writes (q * row) * col in the activation dtype in one pass (3 bytes per
weight instead of the ~27 of the eager float() / multiply / multiply / cast chain).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..quant.act import int8_epilogue_ref  # noqa: F401  (the reference, in quant/ so the CPU path needs no triton)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _int8_epilogue_kernel(
    ACC,                    # [M, N] int32 (or an int8 weight), contiguous
    SA,                     # [M] fp32 per-row (token) scales
    SB,                     # [N] fp32 per-column (output channel) scales
    BIAS,                   # [N] bias (any float dtype); unused when HAS_BIAS is False
    OUT,                    # [M, N] output, contiguous
    M, N,
    HAS_BIAS: tl.constexpr,
    OUT_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask, cmask = rows < M, cols < N
    mask = rmask[:, None] & cmask[None, :]
    offs = rows[:, None] * N + cols[None, :]
    acc = tl.load(ACC + offs, mask=mask, other=0).to(tl.float32)
    sa = tl.load(SA + rows, mask=rmask, other=0.0)
    sb = tl.load(SB + cols, mask=cmask, other=0.0)
    y = (acc * sa[:, None]) * sb[None, :]
    if HAS_BIAS:
        y = y + tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if OUT_BF16:
        # Round half to even onto the bf16 grid (7 mantissa bits) here, so that the cast below is
        # exact: the Triton interpreter truncates fp32 -> bf16 instead of rounding.
        bits = y.to(tl.int32, bitcast=True)
        y = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=mask)


def int8_epilogue_triton(acc, scale_a, scale_b, bias, out_dtype):
    m, n = acc.shape
    out = torch.empty((m, n), dtype=out_dtype, device=acc.device)
    if m == 0 or n == 0:
        return out
    block_m, block_n = 32, 128
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int8_epilogue_kernel[grid](acc, scale_a.reshape(-1), scale_b, bias if bias is not None else scale_b, out, m, n,
                                HAS_BIAS=bias is not None, OUT_BF16=out_dtype == torch.bfloat16, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    return out


@torch.library.custom_op("wanimate::int8_epilogue", mutates_args=())
def int8_epilogue(acc: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, bias: torch.Tensor | None,
                  out_dtype: torch.dtype) -> torch.Tensor:
    return int8_epilogue_triton(acc, scale_a, scale_b, bias, out_dtype)


@int8_epilogue.register_fake
def _(acc, scale_a, scale_b, bias, out_dtype):
    return acc.new_empty(acc.shape, dtype=out_dtype)


def kernel_ok(acc: torch.Tensor) -> bool:
    """Whether the kernel takes acc (else int8_epilogue_ref): a contiguous 2-D int32 (or int8) tensor
    on a CUDA device, or on the CPU under TRITON_INTERPRET=1 (tests only)."""
    on_device = (acc.device.type == "cpu") if INTERPRETED else acc.is_cuda
    return on_device and acc.dim() == 2 and acc.is_contiguous() and acc.dtype in (torch.int32, torch.int8)
