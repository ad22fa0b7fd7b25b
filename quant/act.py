"""Per-token activation quantization and the INT8 epilogue: the pure-torch references and the one
function that picks the fused Triton kernel (kernels/quant_act.py, kernels/int8_epilogue.py) instead.

The references live here rather than in the kernel files so that the CPU emulation path needs no
triton; the kernel files import them as their reference and are tested bit-exact against them.

For every row x_i of x [M, K] (one token):
    amax_i  = max(max_j |x_ij|, 1e-12)                              the floor keeps zero rows finite
    q_ij    = round(clamp(x_ij * (QMAX / amax_i), -QMAX, QMAX))      QMAX = 448 (e4m3fn) or 127 (int8)
    scale_i = amax_i / QMAX                                          x_ij ~= q_ij * scale_i
with round-half-even onto the e4m3 grid or the integers, and single IEEE divisions (tensor by
tensor, which torch computes correctly rounded; a python scalar divided by a tensor would be a
reciprocal then a multiply, two roundings).
"""
from __future__ import annotations

import importlib.util

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0
AMAX_FLOOR = 1e-12


def per_token_quant_ref(x: torch.Tensor, int8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (any float dtype) -> (q [M, K] int8 or float8_e4m3fn, scale [M, 1] fp32)."""
    qmax = INT8_MAX if int8 else FP8_MAX
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp(min=AMAX_FLOOR)
    limit = torch.full_like(amax, qmax)
    y = (xf * torch.div(limit, amax)).clamp(-qmax, qmax)
    q = torch.round(y).to(torch.int8) if int8 else y.to(FP8)      # both round half to even
    return q, torch.div(amax, limit)


def int8_epilogue_ref(acc: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                      bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """acc [M, N] int32 (or int8), scale_a [M, 1] fp32, scale_b [N] fp32, bias [N] or None -> [M, N]
    out_dtype, computed as (acc * scale_a) * scale_b + bias in fp32 and rounded once."""
    y = (acc.float() * scale_a) * scale_b
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def quantize_activations(x: torch.Tensor, int8: bool, kernel: str = "auto",
                         gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q, scale [M, 1]) of x, or of GELU(tanh)(x) with gelu=True (the FFN's hidden
    activation, in x's dtype). The fused kernel when kernel == "auto" and its guard takes x."""
    if kernel == "auto" and _triton_available():
        from ..kernels import quant_act
        if quant_act.kernel_ok(x) and not (gelu and x.dtype == torch.float16):
            op = torch.ops.wanimate.gelu_per_token_quant if gelu else torch.ops.wanimate.per_token_quant
            return op(x, int8)
    if gelu:
        x = torch.nn.functional.gelu(x, approximate="tanh")
    return per_token_quant_ref(x, int8)


def int8_epilogue(acc: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, bias: torch.Tensor | None,
                  out_dtype: torch.dtype, kernel: str = "auto") -> torch.Tensor:
    if kernel == "auto" and _triton_available():
        from ..kernels import int8_epilogue as epi
        if epi.kernel_ok(acc):
            return torch.ops.wanimate.int8_epilogue(acc, scale_a, scale_b, bias, out_dtype)
    return int8_epilogue_ref(acc, scale_a, scale_b, bias, out_dtype)
