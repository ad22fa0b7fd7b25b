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
from .model import Block, Conditions, FaceBlock, SelfAttention, WanAnimateDiT


def use_kernels(model: nn.Module, on: bool = True, *, fuse_projections: bool | None = None,
                gelu_epilogue: bool | None = None) -> bool:
    """The engine's fast path for a built, loaded DiT, or back to the reference (on=False).

    1. Route the norms, RoPE and residual adds of every module with a `kernels` flag (Block,
       SelfAttention, CrossAttention, FaceBlock) through the fused Triton kernels. Same rounding
       points as the reference (kernels/*.py say where fp32 order differs). Each call still runs
       the reference unless kernels.supported() accepts its tensors, so this is safe on a CPU.
    2. fuse_projections (default: follows `on`): the self-attention q, k, v become one linear
       (fuse_qkv; with on=False, unfuse_qkv restores the three bit for bit). It rides on this switch
       because it is part of the same fast path (one [L, C] x [C, 3C] GEMM instead of three, and
       with FP8 linears one activation quantization instead of three), its outputs are exactly the
       three linears' (up to the GEMM's own accumulation order), and every caller that turns the
       kernels on (runner, bench, pipeline) does so after loading, LoRA merging and quantization
       and before offloading, which is the order fuse_qkv needs. Blocks it cannot fuse exactly
       (nf4, mixed schemes) keep their three linears. Pass False to leave the projections alone
       (the "kernels, separate q/k/v" ablation).
    3. gelu_epilogue (default: follows `on`): the FFN's first linear and its GELU(tanh) in one
       cuBLASLt GEMM (GeluEpilogueFFN; CUDA bf16 only, the reference elsewhere). Measured on an H200
       at 480p: DiT forward 2.876 -> 2.862 s, output rel L2 vs the reference path 4.32e-3 -> 4.33e-3
       (bench/results/kernels_h200_qkv.log), so it belongs to the fast path.

    Returns True when the kernels are usable (triton importable) or when switching off; False means
    `on` was asked but every norm/RoPE call will run the reference."""
    available = kernels.load() if on else True
    for module in model.modules():
        if hasattr(module, "kernels"):
            module.kernels = on
    fuse = on if fuse_projections is None else fuse_projections
    if fuse:
        fuse_qkv(model, strict=False)
    elif fuse_projections is None:
        unfuse_qkv(model, strict=False)
    use_gelu_epilogue(model, on if gelu_epilogue is None else gelu_epilogue)
    return available


# ----------------------------------------------------------------------------------------------
# Fused q/k/v projection


def _linear_kind(m: nn.Module):
    """(class, quantization config) of a linear, the identity that must match to concatenate."""
    return type(m), getattr(m, "config", None)


def _shares_storage(t: torch.Tensor) -> bool:
    """A view into a larger buffer: block swap and component offload bind weights to flat arenas and
    rebind them later, which would miss a new module. (The loaders give every tensor its own
    storage: safetensors_io's frombuffer per tensor, .to(device) copies.)"""
    return t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size()


def _row_tensors(m: nn.Module) -> dict[str, torch.Tensor] | None:
    """The tensors that define linear `m`, each with the output channels along dim 0, or None when
    some tensor is not laid out per output row (then concatenating along dim 0 is not the fused
    linear: nf4's flat blocks, per-tensor scales)."""
    from ..quant.registry import QuantLinear
    if type(m) is nn.Linear:
        return {"weight": m.weight}
    if not isinstance(m, QuantLinear):
        return None
    out, layout = {}, type(m)._layout(m.in_features, m.out_features, m.config)
    wide = type(m)._layout(m.in_features, 3 * m.out_features, m.config)
    for name, (shape, _) in layout.items():
        if not shape or shape[0] != m.out_features or tuple(wide[name][0]) != (3 * shape[0], *shape[1:]):
            return None
        out[name] = m._buffers[name]
    return out


def qkv_unfusable(attn: SelfAttention) -> str | None:
    """Why this SelfAttention's q, k, v cannot be fused exactly, or None when they can."""
    if attn.qkv is not None:
        return "already fused"
    q, k, v = attn.q, attn.k, attn.v
    if not (_linear_kind(q) == _linear_kind(k) == _linear_kind(v)):
        return (f"q, k, v are {type(q).__name__}/{type(k).__name__}/{type(v).__name__} with different "
                "settings: one GEMM needs one scheme")
    if (q.bias is None) != (k.bias is None) or (q.bias is None) != (v.bias is None):
        return "only some of q, k, v have a bias"
    parts = [_row_tensors(m) for m in (q, k, v)]
    if parts[0] is None:
        scheme = getattr(q, "scheme", type(q).__name__)
        return (f"{scheme} does not store its weight per output channel, so concatenating is not exact; "
                "the three linears are kept")
    tensors = [t for p in parts for t in p.values()] + [m.bias for m in (q, k, v) if m.bias is not None]
    if any(t.is_meta for t in tensors):
        return "weights are on the meta device: load them first"
    if any(_shares_storage(t) for t in tensors):
        return "weights are views of a shared buffer (block swap / offload): fuse before offloading"
    if any(m._forward_hooks or m._forward_pre_hooks for m in (q, k, v)):
        return "q, k or v has forward hooks, which a fused GEMM would bypass"
    if any(len({p[key].dtype for p in parts}) != 1 for key in parts[0]):
        return "q, k, v weights have different dtypes"
    if len({t.device for t in tensors}) != 1:
        return "q, k, v are on different devices"
    return None


def fuse_qkv(model: nn.Module, *, strict: bool = True) -> list[str]:
    """Replace each self-attention's q, k, v linears by one `qkv` linear [3C, C] (concatenated along
    the output dim; SelfAttention.forward splits its output into views). Exact: every output row of
    a linear depends only on its own weight row, bias entry and (quant/) per-channel scale, and an
    activation-quantizing scheme (fp8, int8) quantizes the shared input per token, the same for the
    three. Works for nn.Linear and for quant/ schemes whose stored tensors are all per output channel
    (fp8, int8, int8_wo); nf4 (flat blocks) is refused.

    Apply after loading, LoRA merging and quantize_ (they address `...self_attn.q` by name: merge_lora
    on a fused model fails with "LoRA keys that match no DiT parameter") and before block swap /
    offload, CUDA-graph capture and compile_blocks. The old weights are freed block by block (peak:
    one block's q/k/v twice). unfuse_qkv is the inverse.

    strict: raise ValidationError (before changing anything) when a block cannot be fused; otherwise
    fuse the others and leave that one's three linears.
    Returns the names of the fused modules."""
    todo = [(name, attn) for name, attn in model.named_modules()
            if isinstance(attn, SelfAttention) and attn.qkv is None]
    reasons = {name: qkv_unfusable(attn) for name, attn in todo}
    if strict and any(reasons.values()):
        name, why = next((n, r) for n, r in reasons.items() if r)
        raise ValidationError(f"fuse_qkv: {name}: {why} (nothing was fused)")
    fused = []
    with torch.no_grad():
        for name, attn in todo:
            if reasons[name] is None:
                attn.qkv = _concat_linears(attn.q, attn.k, attn.v)
                del attn.q, attn.k, attn.v           # frees them: one block's q/k/v twice at most
                fused.append(name)
    _release_cached(model)
    return fused


def unfuse_qkv(model: nn.Module, *, strict: bool = True) -> list[str]:
    """The inverse of fuse_qkv: split each `qkv` back into q, k, v (bit-identical to the originals).
    A block whose qkv is bound to an offload buffer is refused (strict: ValidationError before
    changing anything) or left fused (it still computes the same q, k, v)."""
    todo = [(name, attn) for name, attn in model.named_modules()
            if isinstance(attn, SelfAttention) and attn.qkv is not None]
    bound = {name for name, attn in todo
             if any(_shares_storage(t) for t in [*attn.qkv.parameters(), *attn.qkv.buffers()])}
    if strict and bound:
        raise ValidationError(f"unfuse_qkv: {min(bound)}: weights are views of a shared buffer "
                              "(block swap / offload): remove it first (nothing was unfused)")
    done = []
    with torch.no_grad():
        for name, attn in todo:
            if name not in bound:
                attn.q, attn.k, attn.v = _split_linear(attn.qkv, 3)
                attn.qkv = None
                done.append(name)
    _release_cached(model)
    return done


def _concat_linears(*parts: nn.Module) -> nn.Module:
    first = parts[0]
    out_features = sum(m.out_features for m in parts)
    tensors = {key: torch.cat([_row_tensors(m)[key] for m in parts]) for key in _row_tensors(first)}
    bias = torch.cat([m.bias for m in parts]) if first.bias is not None else None
    if type(first) is nn.Linear:
        fused = nn.Linear(first.in_features, out_features, bias=bias is not None, device="meta")
        fused.weight = nn.Parameter(tensors["weight"], requires_grad=first.weight.requires_grad)
    else:
        fused = type(first)(first.in_features, out_features, bias is not None, first.config, device="meta")
        fused.load_quantized(tensors)
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=first.bias.requires_grad)
    return fused


def _split_linear(fused: nn.Module, n: int) -> list[nn.Module]:
    out_features = fused.out_features // n
    tensors = _row_tensors(fused)
    parts = []
    for i in range(n):
        rows = slice(i * out_features, (i + 1) * out_features)
        if type(fused) is nn.Linear:
            m = nn.Linear(fused.in_features, out_features, bias=fused.bias is not None, device="meta")
            m.weight = nn.Parameter(fused.weight[rows].clone(), requires_grad=fused.weight.requires_grad)
        else:
            m = type(fused)(fused.in_features, out_features, fused.bias is not None, fused.config, device="meta")
            m.load_quantized({k: t[rows].clone() for k, t in tensors.items()})
        if fused.bias is not None:
            m.bias = nn.Parameter(fused.bias[rows].clone(), requires_grad=fused.bias.requires_grad)
        parts.append(m)
    return parts


def _release_cached(model: nn.Module) -> None:
    """The freed q/k/v blocks cannot hold the 3x larger fused ones; give them back to the driver so
    the fusion does not leave 6 GB (14B) reserved but unused."""
    if torch.cuda.is_available() and any(p.is_cuda for p in model.parameters()):
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# FFN: Linear -> GELU(tanh) -> Linear with cuBLASLt's GELU epilogue


class GeluEpilogueFFN(nn.Sequential):
    """The Block's FFN (Linear, GELU(tanh), Linear) with the first Linear and the GELU in one
    cuBLASLt GEMM: `torch._addmm_activation(bias, x, W^T, use_gelu=True)` on CUDA runs the
    GELU_BIAS epilogue, which is the tanh approximation. Saves one pass over the [L, ffn_dim]
    hidden (4 bytes per element in bf16) and one [L, ffn_dim] buffer.

    Which GELU `_addmm_activation` computes depends on the path: on the CPU (torch 2.13) it is the
    exact erf GELU (tests/test_transforms.py pins this), so the CPU always runs the reference here;
    on CUDA the cuBLASLt epilogue is tanh, but aten's non-Lt fallback (e.g. DISABLE_ADDMM_CUDA_LT=1)
    may not be. bench/kernels.py checks which one the GPU computes at the Wan shape with exactly
    representable inputs ("gelu_kind").

    Numerics: the epilogue applies GELU to the fp32 accumulator and rounds once, where the reference
    rounds the GEMM output to bf16 first: one bf16 rounding fewer, not bit-identical (rel L2 ~3e-3 on
    the hidden). So only CUDA bf16 inputs with a plain nn.Linear take it; everything else (CPU, fp32,
    quantized linears) runs the reference Sequential. Same child modules and names (0, 1, 2), so
    state dicts, quantization patterns and offload are unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, act, down = self[0], self[1], self[2]
        if (x.is_cuda and x.dtype == torch.bfloat16 and type(up) is nn.Linear and up.bias is not None
                and up.weight.dtype == torch.bfloat16 and up.bias.dtype == torch.bfloat16
                and getattr(act, "approximate", None) == "tanh"):
            h = torch._addmm_activation(up.bias, x.reshape(-1, x.shape[-1]), up.weight.t(), use_gelu=True)
            return down(h.view(*x.shape[:-1], -1))
        return super().forward(x)


def use_gelu_epilogue(model: nn.Module, on: bool = True) -> int:
    """Swap each Block's FFN container for GeluEpilogueFFN (on) or back to nn.Sequential (off); the
    linears are the same objects. Returns the number of blocks changed. use_kernels turns it on
    with the kernels; its gain is measured as its own row (bench/kernels.py)."""
    changed = 0
    for block in model.modules():
        if isinstance(block, Block):
            want = GeluEpilogueFFN if on else nn.Sequential
            if type(block.ffn) is not want:
                block.ffn = want(*block.ffn)
                changed += 1
    return changed


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
        flags = tuple((m.kernels, getattr(m, "qkv", None) is not None) for m in self.model.modules()
                      if hasattr(m, "kernels"))
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
