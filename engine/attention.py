"""One entry point for every attention in the engine: `attention(q, k, v, backend)`.

Layout is [B, L, H, D] in and out (the flash-attention layout the official code uses), softmax
scale 1/sqrt(D), no mask: the official DiT never masks (single-GPU sequences are unpadded and the
cross-attention context is attended in full, padded text rows included).

Backends register here by name, so the model never knows which kernel runs. `sdpa` (torch's
scaled_dot_product_attention) is the reference and the default; faster backends are measured
against it. A backend that is not installed raises a ValidationError naming what to install.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .errors import ValidationError

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # [B, L, H, D] -> [B, H, L, D] for SDPA, and back.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _registry() -> dict[str, Callable[[], AttentionFn]]:
    """name -> loader. Loaders import lazily so a missing optional package only matters when used."""
    return {"sdpa": lambda: sdpa}


def available_backends() -> list[str]:
    return sorted(_registry())


def get_backend(name: str) -> AttentionFn:
    loaders = _registry()
    if name not in loaders:
        raise ValidationError(f"unknown attention backend {name!r}; choose one of {available_backends()}")
    return loaders[name]()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Softmax attention on [B, L, H, D] tensors of one dtype; returns [B, Lq, H, D]."""
    return get_backend(backend)(q, k, v)
