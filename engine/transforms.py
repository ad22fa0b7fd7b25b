"""Transforms applied to a built DiT: fused kernels, regional compilation, CUDA graphs.

Each is a function of a built model and can be switched on alone, so every benchmark row is an
ablation (DESIGN.md convention 6). None of them changes a weight or the model's numerics beyond
what its docstring states.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .. import kernels
from .errors import ValidationError
from .model import Block, Conditions, FaceBlock, WanAnimateDiT


def use_kernels(model: nn.Module, on: bool = True) -> bool:
    """Route the norms, RoPE and residual adds of every module with a `kernels` flag (Block,
    SelfAttention, CrossAttention, FaceBlock) through the fused Triton kernels, or back (on=False).

    Same rounding points as the reference (kernels/*.py say where fp32 order differs). Each call
    still runs the reference unless kernels.supported() accepts its tensors, so this is safe on a
    CPU-only machine. Returns True when the kernels are usable (triton importable) or when
    switching off; False means `on` was asked but every call will run the reference."""
    available = kernels.load() if on else True
    for module in model.modules():
        if hasattr(module, "kernels"):
            module.kernels = on
    return available


def compile_blocks(model: WanAnimateDiT, mode: str | None = None, *, fullgraph: bool = True,
                   backend: str = "inductor", dynamic: bool | None = False) -> WanAnimateDiT:
    """Regional compilation: torch.compile each transformer Block and FaceBlock in place.

    All blocks share one code object, and torch.compile treats parameters as inputs, so the 40
    blocks reuse one compiled graph per input signature (block 0 takes the stream in the compute
    dtype, the others in fp32: two graphs; a new token count compiles again unless `dynamic`).
    The fused kernels are custom ops, opaque to the compiler: one node each, so fullgraph holds
    with or without them. `mode` is torch.compile's ("max-autotune-no-cudagraphs", ...)."""
    for module in model.modules():
        if isinstance(module, (Block, FaceBlock)):
            module.compile(mode=mode, fullgraph=fullgraph, backend=backend, dynamic=dynamic)
    return model


class GraphedDenoise:
    """model.denoise captured in one CUDA graph and replayed: one launch instead of a few thousand.

    A graph fixes shapes and memory addresses. Latents and timesteps are copied into static
    buffers; the Conditions are captured by reference (kept alive here), so a graph serves one
    segment. A call with other shapes, another Conditions object or changed `kernels` flags
    captures again, replacing the previous graph (one is held at a time, with its memory pool:
    the activations of one step). Apply compile_blocks / use_kernels before the first call.
    The output is a copy, safe to keep across replays.
    """

    def __init__(self, model: WanAnimateDiT, warmup: int = 2):
        if not torch.cuda.is_available():
            raise ValidationError("CUDA graphs need a CUDA device; call model.denoise directly on the CPU")
        self.model, self.warmup = model, warmup
        self._key = None
        self._cond: Conditions | None = None
        self._graph = self._latents = self._t = self._out = None

    def _signature(self, latents, t, cond):
        flags = tuple(m.kernels for m in self.model.modules() if hasattr(m, "kernels"))
        return (tuple(latents.shape), latents.dtype, latents.device, tuple(t.shape), t.dtype, flags)

    def _capture(self, latents, t, cond):
        self._key = self._graph = self._out = None           # free the previous graph's pool first
        self._latents, self._t, self._cond = latents.clone(), t.clone(), cond
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            # Warm-up off the capture: lazy initialisation, Triton and compile work, cuBLAS workspaces.
            for _ in range(self.warmup):
                self.model.denoise(self._latents, self._t, cond)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            self._out = self.model.denoise(self._latents, self._t, cond)
        self._graph = graph

    def __call__(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditions) -> torch.Tensor:
        """Same contract as model.denoise: latents [B, 16, F+1, h, w], t [B] -> velocity fp32."""
        key = self._signature(latents, t, cond)
        if key != self._key or cond is not self._cond:
            self._capture(latents, t, cond)
            self._key = key
        self._latents.copy_(latents)
        self._t.copy_(t)
        self._graph.replay()
        return self._out.clone()


def cuda_graph_denoise(model: WanAnimateDiT, warmup: int = 2) -> Callable[[torch.Tensor, torch.Tensor, Conditions],
                                                                          torch.Tensor]:
    """A drop-in replacement for model.denoise that replays a CUDA graph (see GraphedDenoise)."""
    return GraphedDenoise(model, warmup)
