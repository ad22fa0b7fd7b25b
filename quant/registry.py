"""The scheme registry (name -> handler) and the base of every quantized linear.

A handler has the two verbs of gpt-fast's quantize.py: `create_quantized_state_dict` (offline: a
float state dict -> the quantized one) and `convert_for_runtime` (swap nn.Linear modules for
empty quantized ones, e.g. on the meta device before the quantized tensors are assigned). Both go
through the scheme's `QuantLinear` subclass, which owns the storage layout:

    quantize(weight) -> {tensor name: tensor}     offline, from a float [out, in] weight
    dequantize() -> fp32 [out, in]                 for LoRA merges and error reports
    forward(x)                                     the GPU kernel where `kernel_ok`, else the reference

Out-of-tree schemes register with `@register_scheme("name")` (as vLLM's
register_quantization_config); the built-in ones register when quant/ is imported.
"""
from __future__ import annotations

from typing import Callable, ClassVar

import torch
import torch.nn as nn

from ..engine.errors import ValidationError

_SCHEMES: dict[str, type["QuantLinear"]] = {}


def register_scheme(name: str) -> Callable[[type["QuantLinear"]], type["QuantLinear"]]:
    def wrap(cls):
        if name in _SCHEMES and _SCHEMES[name] is not cls:
            raise ValidationError(f"quantization scheme {name!r} is already registered by {_SCHEMES[name].__name__}")
        cls.scheme = name
        _SCHEMES[name] = cls
        return cls
    return wrap


def available_schemes() -> list[str]:
    return sorted(_SCHEMES)


def get_scheme(name: str) -> type["QuantLinear"]:
    if name not in _SCHEMES:
        raise ValidationError(f"unknown quantization scheme {name!r}; choose one of {available_schemes()}")
    return _SCHEMES[name]


class QuantLinear(nn.Module):
    """Base class: y = x W^T + b with W stored quantized. Subclasses declare their stored tensors
    in `_layout` and implement quantize / dequantize / forward. The bias keeps its float dtype."""

    scheme: ClassVar[str] = ""
    # CUDA compute capability the fast path needs (None: any device runs the fast path).
    min_capability: ClassVar[tuple[int, int] | None] = None

    def __init__(self, in_features: int, out_features: int, bias: bool, config, *, device=None,
                 bias_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.config = config
        for name, (shape, dtype) in self._layout(in_features, out_features, config).items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device),
                                 requires_grad=False) if bias else None

    # -- what a subclass provides ----------------------------------------------------------------

    @classmethod
    def _layout(cls, in_features: int, out_features: int, config) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        raise NotImplementedError

    @classmethod
    def quantize(cls, weight: torch.Tensor, config) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------------

    @classmethod
    def from_linear(cls, linear: nn.Linear, config) -> "QuantLinear":
        """Quantize a float nn.Linear (on its device) into a new module."""
        w = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, config, device="meta",
                     bias_dtype=linear.bias.dtype if linear.bias is not None else torch.bfloat16)
        module.load_quantized(cls.quantize(w, config))
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return module

    def load_quantized(self, tensors: dict[str, torch.Tensor]) -> None:
        """Assign stored tensors (as from `quantize` or a checkpoint) without copying them."""
        layout = self._layout(self.in_features, self.out_features, self.config)
        for name, t in tensors.items():
            if name not in layout:
                raise ValidationError(f"{type(self).__name__} has no stored tensor {name!r} (expected {sorted(layout)})")
            shape, dtype = layout[name]
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValidationError(f"{type(self).__name__}.{name}: expected {list(shape)} {dtype}, "
                                      f"got {list(t.shape)} {t.dtype}")
            self._buffers[name] = t

    def requantize(self, weight: torch.Tensor) -> None:
        """Replace the stored weight by the quantization of a new float weight (LoRA merges)."""
        self.load_quantized({k: v.to(self._buffers[k].device) for k, v in self.quantize(weight, self.config).items()})

    def stored_bytes(self) -> int:
        tensors = list(self._buffers.values()) + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scheme={self.scheme}, {self._settings()}")

    def _settings(self) -> str:
        return ""

    @staticmethod
    def _flatten(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1])


def cuda_capability_ok(x: torch.Tensor, need: tuple[int, int] | None) -> bool:
    if not x.is_cuda:
        return False
    return need is None or torch.cuda.get_device_capability(x.device) >= need
