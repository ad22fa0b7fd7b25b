"""INT8: W8A8 (per-channel weights, dynamic per-token activations) and weight-only INT8.

int8 (W8A8), for GPUs with INT8 tensor cores but no FP8 (A100/A10/3090; also runs on H100):
    acc = int8(x_i / sx_i) . int8(W_j / sw_j)      exact int32 accumulation (torch._int_mm)
    y   = (acc * sx_i) * sw_j + b_j                 the epilogue, kernels/int8_epilogue.py on CUDA
Integer products and sums are exact, so the CPU path (torch._int_mm on the CPU) is bit-identical
in the accumulator to the GPU; only the epilogue's fp32 rounding order is shared code.
torch._int_mm on CUDA needs M > 16 and K, N multiples of 8; shorter inputs are zero-padded to 17 rows.
Unlike e4m3, int8 has no exponent: a token whose amax is set by a 50x outlier channel keeps only
~2 bits for its other channels (see the measurement in quant/report.py).

int8_wo (weight-only), the smallest change for any GPU: the weight is stored as int8 + per-channel
scale and dequantized (to the activation dtype, rounded once from fp32) right before a normal
matmul, so activations are never quantized. Halves weight memory, keeps bf16 GEMM speed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .act import INT8_MAX, int8_epilogue, per_token_quant_ref, quantize_activations
from .registry import QuantLinear, register_scheme

_INT_MM_MIN_ROWS = 17


def quantize_int8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (int8 [out, in], fp32 scale [out]), symmetric, one scale per output channel."""
    return _quantize_rows_(weight.detach().to(torch.float32, copy=True))


def _quantize_rows_(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_int8_weight on an fp32 tensor the caller owns, scaled and rounded in place: one fp32
    copy of the weight at a time (the 14B FFN weights are 270 MiB each in fp32; `wanimate quantize`
    streams them one by one, so this is what bounds its host memory)."""
    amax = w.abs().amax(dim=1).clamp(min=1e-12)
    limit = torch.full_like(amax, INT8_MAX)
    q = w.mul_(torch.div(limit, amax)[:, None]).clamp_(-INT8_MAX, INT8_MAX).round_().to(torch.int8)
    return q, torch.div(amax, limit)


def int_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """a [M, K] int8 @ b_t [K, N] int8 -> int32 [M, N], exact. CUDA's _int_mm wants M > 16 (padded
    here) and K, N multiples of 8 (otherwise float64, whose 53-bit mantissa holds these sums exactly)."""
    m, k = a.shape
    if a.is_cuda and (k % 8 or b_t.shape[1] % 8):
        return (a.double() @ b_t.double()).to(torch.int32)
    if a.is_cuda and m < _INT_MM_MIN_ROWS:
        a = torch.cat([a, a.new_zeros(_INT_MM_MIN_ROWS - m, k)])
    return torch._int_mm(a, b_t)[:m]


def int8_linear_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                    out_dtype: torch.dtype) -> torch.Tensor:
    """The reference W8A8 path: x [M, K] float, weight [N, K] int8 -> [M, N] out_dtype."""
    from .act import int8_epilogue_ref
    xq, xs = per_token_quant_ref(x, int8=True)
    return int8_epilogue_ref(int_matmul(xq, weight.t()), xs, weight_scale, bias, out_dtype)


class _Int8Storage(QuantLinear):
    @classmethod
    def _layout(cls, in_features, out_features, config):
        return {"weight": ((out_features, in_features), torch.int8), "weight_scale": ((out_features,), torch.float32)}

    @classmethod
    def quantize(cls, weight, config):
        q, s = quantize_int8_weight(weight)
        return {"weight": q, "weight_scale": s}

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale[:, None]


@register_scheme("int8")
class Int8Linear(_Int8Storage):
    """W8A8 with dynamic per-token activation scales."""

    def _settings(self) -> str:
        return f"weight=int8 per-channel, act=int8 per-token, kernel={self.config.kernel}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The int32 accumulator is exact on every device, so only the activation quantization and
        # the epilogue have a kernel-vs-reference choice (quant/act.py).
        x2 = self._flatten(x)
        xq, xs = quantize_activations(x2, int8=True, kernel=self.config.kernel)
        acc = int_matmul(xq, self.weight.t())
        y = int8_epilogue(acc, xs, self.weight_scale, self.bias, x.dtype, kernel=self.config.kernel)
        return y.reshape(*x.shape[:-1], self.out_features)


@register_scheme("int8_wo")
class Int8WeightOnlyLinear(_Int8Storage):
    """int8 weights, activations untouched: the weight is dequantized right before the matmul."""

    def _settings(self) -> str:
        return "weight=int8 per-channel, act=unquantized (weight-only)"

    def _col_scale(self) -> torch.Tensor:
        return torch.ones(self.in_features, dtype=torch.float32, device=self.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        # (q * row) * col in fp32, rounded once to x.dtype: the INT8 epilogue kernel on the GPU
        # (one pass over the int8 weight), the same expression in torch elsewhere.
        w = int8_epilogue(self.weight, self.weight_scale[:, None], self._col_scale(), None, x.dtype,
                          kernel=self.config.kernel)
        return F.linear(x, w, bias)


def quantize_int8_weight_cols(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[out, in] float -> (int8 [out, in], fp32 row scale [out], fp32 column scale [in]) with
    W ~= (q * row[:, None]) * col[None, :]: the columns are first divided by their absmax, then each
    row is quantized as in quantize_int8_weight."""
    w = weight.detach().to(torch.float32, copy=True)
    col = w.abs().amax(dim=0).clamp(min=1e-12)
    q, row = _quantize_rows_(w.div_(col[None, :]))
    return q, row, col


@register_scheme("int8_wo_cs")
class Int8WeightOnlyColLinear(Int8WeightOnlyLinear):
    """int8_wo with a second, per-input-channel (column) scale, data-free.

    Why: per-output-channel int8 gives every weight of a row the same step, set by the row's
    largest entry, so a column much smaller than the rest (the consuming side of an activation
    outlier channel: large inputs times small weights) rounds to a few levels or to zero, and its
    error is multiplied by the large input. Dividing each column by its absmax first gives every
    column the full int8 range; the extra scale is 4 bytes per input channel (20 KB per 5120-wide
    linear) and one more multiply in the dequantization, which runs before a bf16 GEMM anyway."""

    @classmethod
    def _layout(cls, in_features, out_features, config):
        return {**super()._layout(in_features, out_features, config), "col_scale": ((in_features,), torch.float32)}

    @classmethod
    def quantize(cls, weight, config):
        q, row, col = quantize_int8_weight_cols(weight)
        return {"weight": q, "weight_scale": row, "col_scale": col}

    def dequantize(self) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale[:, None]) * self.col_scale[None, :]

    def _col_scale(self) -> torch.Tensor:
        return self.col_scale

    def _settings(self) -> str:
        return "weight=int8 per-channel x per-input-channel, act=unquantized (weight-only)"
