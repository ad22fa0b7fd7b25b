"""NF4 weight-only (QLoRA's 4-bit NormalFloat), the smallest-memory option: 0.5625 bytes per weight.

Storage is bitsandbytes' layout, so its CUDA dequantization kernel runs on our tensors:
    the [out, in] weight flattened row-major, cut into blocks of `blocksize` (64) elements;
    absmax_b = max |w| over block b (fp32); code = nearest of the 16 NF4 levels to w / absmax_b;
    two codes per byte, the even element in the high nibble.
Quantizing needs no bitsandbytes (pure torch here). The forward dequantizes to the activation dtype
and runs a normal matmul: with bitsandbytes importable on CUDA its `dequantize_4bit` kernel, else the
torch gather below (same numbers: code * absmax in fp32, rounded once). bitsandbytes is optional:
its wheel (0.50) imports on a CPU box and its CPU op agrees with `nf4_dequantize_ref` (tested).
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from .registry import QuantLinear, register_scheme

# The 16 NF4 levels (Dettmers et al. 2023, QLoRA, Appendix E; the table bitsandbytes ships):
# quantiles of N(0, 1) normalised to [-1, 1], with an exact zero.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def _levels(device) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def nf4_quantize(weight: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (packed uint8 [out*in/2], absmax fp32 [out*in/blocksize]).
    Needs out*in divisible by blocksize (every Wan linear: in is a multiple of 64)."""
    w = weight.detach().float().reshape(-1, blocksize)                       # [blocks, blocksize]
    absmax = w.abs().amax(dim=1).clamp(min=1e-38)
    scaled = (w / absmax[:, None]).clamp(-1, 1).reshape(-1)
    levels = _levels(w.device)
    midpoints = (levels[:-1] + levels[1:]) / 2                              # a value on a midpoint goes down
    codes = torch.bucketize(scaled, midpoints).to(torch.uint8)
    return (codes[0::2] << 4) | codes[1::2], absmax


def nf4_dequantize_ref(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, shape: tuple[int, int],
                       dtype: torch.dtype) -> torch.Tensor:
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1).long()  # [out*in], even first
    values = _levels(packed.device)[codes].view(-1, blocksize) * absmax[:, None]
    return values.reshape(shape).to(dtype)


def _bnb_usable(t: torch.Tensor) -> bool:
    return t.is_cuda and importlib.util.find_spec("bitsandbytes") is not None


def nf4_dequantize(packed, absmax, blocksize, shape, dtype, kernel: str = "auto") -> torch.Tensor:
    """The kernel-vs-reference choice: bitsandbytes' CUDA kernel when importable, else the torch path."""
    if kernel != "reference" and _bnb_usable(packed):
        import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)
        return torch.ops.bitsandbytes.dequantize_4bit.default(packed, absmax, blocksize, "nf4", list(shape), dtype)
    return nf4_dequantize_ref(packed, absmax, blocksize, shape, dtype)


@register_scheme("nf4")
class Nf4Linear(QuantLinear):

    @classmethod
    def _layout(cls, in_features, out_features, config):
        n = in_features * out_features
        return {"weight": ((n // 2,), torch.uint8), "weight_absmax": ((n // config.nf4_blocksize,), torch.float32)}

    @classmethod
    def quantize(cls, weight, config):
        if weight.numel() % config.nf4_blocksize:
            from ..engine.errors import ValidationError
            raise ValidationError(f"nf4: a {list(weight.shape)} weight does not split into blocks of "
                                  f"{config.nf4_blocksize}; keep this layer in bf16 or change nf4_blocksize")
        packed, absmax = nf4_quantize(weight, config.nf4_blocksize)
        return {"weight": packed, "weight_absmax": absmax}

    def dequantize(self) -> torch.Tensor:
        return nf4_dequantize_ref(self.weight, self.weight_absmax, self.config.nf4_blocksize,
                                  (self.out_features, self.in_features), torch.float32)

    def _settings(self) -> str:
        return f"weight=nf4 blocksize={self.config.nf4_blocksize}, act=unquantized (weight-only)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = nf4_dequantize(self.weight, self.weight_absmax, self.config.nf4_blocksize,
                           (self.out_features, self.in_features), x.dtype, self.config.kernel)
        return F.linear(x, w, self.bias.to(x.dtype) if self.bias is not None else None)
