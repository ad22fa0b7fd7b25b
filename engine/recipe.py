"""Deterministic weights and inputs from (name, shape, seed): the parity fixtures' recipe.

A fixture never stores weights. The official code and this engine both rebuild every tensor from
its name, its shape and a base seed (shared/reference/recipe.py describes the rule):

    seed(name) = (crc32(name) ^ base_seed) & 0x7FFFFFFF
    x          = randn(shape, Generator().manual_seed(seed(name)))      float32, CPU
    >= 2-D     : x / sqrt(prod(shape[1:]))                               fan-in scaled
    1-D norm   : 1 + 0.1 x     (name contains "norm"/"gamma" and ends in "weight"/"gamma")
    1-D modulation / scale_shift_table : 0.1 x
    other 1-D  : 0.05 x
    0-D        : x

The same recipe builds the embedded default model, so `wanimate run` works with no checkpoint
(its output then comes from random weights, and the CLI says so).
"""
from __future__ import annotations

import math
import zlib
from typing import Iterable, Mapping

import torch


def seed_of(name: str, base_seed: int) -> int:
    return (zlib.crc32(name.encode()) ^ base_seed) & 0x7FFFFFFF


def randn(name: str, shape: Iterable[int], base_seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed_of(name, base_seed))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def param(name: str, shape: Iterable[int], base_seed: int) -> torch.Tensor:
    shape = tuple(shape)
    x = randn(name, shape, base_seed)
    if len(shape) >= 2:
        return x / math.sqrt(math.prod(shape[1:]))
    if len(shape) == 1:
        if any(s in name for s in ("norm", "gamma")) and name.endswith(("weight", "gamma")):
            return 1.0 + 0.1 * x
        if "modulation" in name or "scale_shift_table" in name:
            return 0.1 * x
        return 0.05 * x
    return x


def state_dict_for(shapes: Mapping[str, Iterable[int]], base_seed: int,
                   unscaled: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """{name: shape} -> {name: float32 tensor}. Names in `unscaled` get plain randn (no fan-in
    division): the fixtures' override for the motion encoder's equalized-LR layers, which
    divide by sqrt(fan_in) themselves at run time."""
    unscaled = set(unscaled)
    return {k: (randn(k, s, base_seed) if k in unscaled else param(k, s, base_seed))
            for k, s in shapes.items()}


def equal_lr_keys(keys: Iterable[str]) -> list[str]:
    """The DiT motion encoder's EqualConv2d/EqualLinear weights (28 keys at any size): the keys the
    face-path fixtures draw without fan-in scaling so that the face signal stays alive."""
    return [k for k in keys if k.startswith("motion_encoder.enc.") and k.endswith(".weight")]
