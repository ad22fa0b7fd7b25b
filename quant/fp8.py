"""FP8 (e4m3fn) W8A8: per-output-channel weight scales, dynamic per-token activation scales.

    y = (round_e4m3(x_i / sx_i) . round_e4m3(W_j / sw_j)) * sx_i * sw_j + b_j

The scheme of LightX2V's fp8-vllm/fp8-sgl and torchao's Float8DynamicActivationFloat8Weight
(per-row). Scales are what keeps the colour: unscaled FP8 casts (kijai's early fp8 path) clip or
flush whole channels, the colour shift users report (shared/reference/ENGINES.md §2.5).

GPU: `torch._scaled_mm(xq [M,K] row-major, wq.t() [K,N] column-major, scale_a [M,1] fp32,
scale_b [1,N] fp32, bias bf16, out_dtype=bf16, use_fast_accum)`: the aten signature is the same on
torch 2.11 and 2.13 (rowwise scaling since 2.5); rowwise needs sm89+ and a bf16 output, and
K and N multiples of 16. The activation quantization is the fused Triton kernel in
kernels/quant_act.py.
CPU (and anything the guard refuses): the exact emulation `fp8_linear_ref`: the same e4m3
rounding of activations per token, products of e4m3 values (exact in fp32), fp32 accumulation,
then the scales and the bias, rounded once to the output dtype.
"""
from __future__ import annotations

import torch

from .act import per_token_quant_ref, quantize_activations
from .registry import QuantLinear, cuda_capability_ok, register_scheme

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_fp8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (e4m3 [out, in], fp32 scale [out]) with one scale per output channel."""
    w = weight.detach().to(torch.float32, copy=True)       # scaled in place: one fp32 copy at a time
    amax = w.abs().amax(dim=1).clamp(min=1e-12)
    limit = torch.full_like(amax, FP8_MAX)
    q = w.mul_(torch.div(limit, amax)[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q, torch.div(amax, limit)


def fp8_linear_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """The emulation: x [M, K] float, weight [N, K] e4m3, weight_scale [N] fp32 -> [M, N] out_dtype."""
    xq, xs = per_token_quant_ref(x, int8=False)
    acc = xq.float() @ weight.float().t()                         # e4m3 x e4m3 products are exact in fp32
    y = (acc * xs) * weight_scale
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


@register_scheme("fp8")
class Fp8Linear(QuantLinear):
    min_capability = (8, 9)
    # True when the preceding GELU(tanh) module was folded into this layer's activation
    # quantization (quant/api.py fuse_ffn_gelu): forward then takes the pre-GELU input.
    gelu_input = False

    @classmethod
    def _layout(cls, in_features, out_features, config):
        return {"weight": ((out_features, in_features), FP8), "weight_scale": ((out_features,), torch.float32)}

    @classmethod
    def quantize(cls, weight, config):
        q, s = quantize_fp8_weight(weight)
        return {"weight": q, "weight_scale": s}

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale[:, None]

    def _settings(self) -> str:
        return (f"weight=e4m3 per-channel, act=e4m3 per-token, fast_accum={self.config.fast_accum}, "
                f"kernel={self.config.kernel}" + (", input=gelu_tanh(x)" if self.gelu_input else ""))

    def gemm_ok(self, x: torch.Tensor) -> bool:
        """The kernel-vs-reference guard: torch._scaled_mm rowwise takes bf16-out problems on sm89+
        with K, N multiples of 16; anything else (CPU, fp32 activations, kernel="reference") runs the
        emulation. The activation quantizer is the Triton kernel only with kernel="auto"."""
        return (self.config.kernel != "reference" and x.dtype == torch.bfloat16 and cuda_capability_ok(x, self.min_capability)
                and self.in_features % 16 == 0 and self.out_features % 16 == 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = self._flatten(x)
        if self.gemm_ok(x2):
            xq, xs = quantize_activations(x2, int8=False, kernel=self.config.kernel, gelu=self.gelu_input)
            bias = self.bias.to(torch.bfloat16) if self.bias is not None else None
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=xs, scale_b=self.weight_scale.view(1, -1), bias=bias,
                                 out_dtype=torch.bfloat16, use_fast_accum=self.config.fast_accum)
        else:
            if self.gelu_input:
                x2 = torch.nn.functional.gelu(x2, approximate="tanh")
            y = fp8_linear_ref(x2, self.weight, self.weight_scale, self.bias, x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


def fp8_linear_torch_scaled_mm(x: torch.Tensor, module: Fp8Linear) -> torch.Tensor:
    """torch._scaled_mm on whatever device has it (torch 2.13's CPU build does): used by the tests to
    check that the emulation means what the kernel means (scale placement, bias, rounding)."""
    xq, xs = per_token_quant_ref(x, int8=False)
    bias = module.bias.to(torch.bfloat16) if module.bias is not None else None
    return torch._scaled_mm(xq, module.weight.t(), scale_a=xs, scale_b=module.weight_scale.view(1, -1).contiguous(),
                            bias=bias, out_dtype=torch.bfloat16)

