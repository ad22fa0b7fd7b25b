"""The gated residual update x + gate * y of the Block's last sub-layer (the FFN).

What engine/model.py computes (Block.forward, last line): x + y * gate with x [B, L, C] the
residual stream (fp32 after block 0, the compute dtype going into block 0), y [B, L, C] the FFN
output in the compute dtype and gate [B, 1, C] fp32. torch promotes y to fp32, multiplies, rounds,
adds and rounds: two kernels and an fp32 temporary (about 18 bytes per element). The kernel reads
x and y once and writes the sum once (10 bytes per element for an fp32 stream and bf16 y), in fp32
math with one FMA rounding instead of two. Without a gate it is x + y in the promoted dtype.

The residual adds that feed a LayerNorm are fused into it instead (kernels/layer_norm.py
add_layer_norm); this one ends the block, where the next consumer is another module.

Design: an elementwise kernel over [row, column-block] tiles of 1024 elements (4 KiB fp32), so that
each thread moves 16-byte vectors; the gate row of the batch element is read from L2.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..engine.errors import ValidationError

_BLOCK = 1024
_WARPS = 4


def gated_residual_ref(x: torch.Tensor, y: torch.Tensor, gate: Optional[torch.Tensor]) -> torch.Tensor:
    """Block.forward's `x + y * gate` (or `x + y`), in torch's promoted dtype."""
    return x + y * gate if gate is not None else x + y


# Token counts vary per video: no recompilation for each one's divisibility.
@triton.jit(do_not_specialize=["L"])
def _gated_residual_kernel(
    X, Y, G, OUT,             # x, y [B, L, C] (unit stride on C), gate [B or 1, 1, C], out [B, L, C] contiguous
    L, C,
    stride_xb, stride_xl, stride_yb, stride_yl, stride_gb,
    HAS_GATE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    l = row % L
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < C
    x = tl.load(X + b * stride_xb + l * stride_xl + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + b * stride_yb + l * stride_yl + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        y = y * tl.load(G + b * stride_gb + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * C + offs, (x + y).to(OUT.dtype.element_ty), mask=mask)


def _launch(x, y, gate, *, block=_BLOCK, num_warps=_WARPS):
    if x.dim() != 3 or y.shape != x.shape:
        raise ValidationError(f"x and y must both be [B, L, C], got {tuple(x.shape)} and {tuple(y.shape)}")
    b, l, c = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = y if y.stride(-1) == 1 else y.contiguous()
    out_dtype = torch.promote_types(x.dtype, y.dtype)
    if gate is not None:
        if gate.dim() != 3 or gate.shape[1:] != (1, c) or gate.shape[0] not in (1, b):
            raise ValidationError(f"gate must be [B={b}, 1, C={c}], got {tuple(gate.shape)}")
        gate = gate if gate.stride(-1) == 1 else gate.contiguous()
        out_dtype = torch.promote_types(out_dtype, gate.dtype)
    out = torch.empty((b, l, c), dtype=out_dtype, device=x.device)
    if x.numel() == 0:
        return out
    _gated_residual_kernel[(b * l, triton.cdiv(c, block))](
        x, y, gate if gate is not None else x, out, l, c,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        (0 if gate.shape[0] == 1 else gate.stride(0)) if gate is not None else 0,
        HAS_GATE=gate is not None, BLOCK=block, num_warps=num_warps)
    return out


@torch.library.custom_op("wanimate::gated_residual", mutates_args=())
def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: Optional[torch.Tensor]) -> torch.Tensor:
    """x + gate * y (gate [B, 1, C] or None) -> [B, L, C] contiguous, in the promoted dtype."""
    return _launch(x, y, gate)


@gated_residual.register_fake
def _(x, y, gate):
    dtype = torch.promote_types(x.dtype, y.dtype)
    if gate is not None:
        dtype = torch.promote_types(dtype, gate.dtype)
    return x.new_empty(x.shape, dtype=dtype)
