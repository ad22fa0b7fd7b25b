"""One entry point for every attention in the engine: `attention(q, k, v, backend)`.

Layout is [B, L, H, D] in and out (the flash-attention layout the official code uses), softmax
scale 1/sqrt(D), no mask: the official DiT never masks (single-GPU sequences are unpadded and the
cross-attention context is attended in full, padded text rows included).

Backends register here by name, so the model never knows which kernel runs:
  sdpa     torch scaled_dot_product_attention; the reference and the default
  flash    FlashAttention-3 (`flash_attn_interface`, Hopper) if installed, else flash-attn 2
  xformers xformers.ops.memory_efficient_attention
  triton   our bf16 Triton flash attention (kernels/attention.py)
  sage     our INT8 Q·Kᵀ / FP8 P·V Triton kernel (kernels/attention.py, SageAttention2's scheme)
A backend that is not installed raises a ValidationError naming what to install.

Each attention module (SelfAttention, CrossAttention, FaceBlock in engine/model.py) carries a
`backend` attribute; `set_attention_backend` is the transform that sets it on a built model and
`attention_report` reads it back for a run's sidecar. `attention_schedule` says which backend each
denoising step uses when the first and last steps run exact (SageAttention3's advice for video).
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Callable, Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ValidationError

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # [B, L, H, D] -> [B, H, L, D] for SDPA, and back.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _needs_cuda_half(name: str, q: torch.Tensor) -> None:
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValidationError(f"attention backend {name!r} runs on CUDA bf16/fp16 tensors; got "
                              f"{q.dtype} on {q.device}. Use 'sdpa' for this model's dtype/device.")


# Loaders import lazily, so a missing optional package only matters when chosen. They run on every
# call (no cache: no module state); an import of a loaded module is a dict lookup, and the one
# failing import ('flash' without FA3) costs tens of microseconds against milliseconds of attention.

def _load_sdpa() -> AttentionFn:
    return sdpa


def _load_flash() -> AttentionFn:
    try:
        from flash_attn_interface import flash_attn_func as fa3      # FlashAttention-3 (hopper/)
    except ImportError:
        fa3 = None
    if fa3 is not None:
        def flash3(q, k, v):
            _needs_cuda_half("flash", q)
            out = fa3(q, k, v)
            return out[0] if isinstance(out, tuple) else out          # some FA3 builds return (out, lse)
        return flash3
    try:
        from flash_attn import flash_attn_func as fa2
    except ImportError:
        raise ValidationError(
            "attention backend 'flash' needs FlashAttention: `pip install flash-attn` (FA2), or build "
            "FA3's `flash_attn_interface` from flash-attention/hopper (`python setup.py install`)") from None

    def flash2(q, k, v):
        _needs_cuda_half("flash", q)
        return fa2(q, k, v)
    return flash2


def _load_xformers() -> AttentionFn:
    try:
        from xformers.ops import memory_efficient_attention
    except ImportError:
        raise ValidationError("attention backend 'xformers' needs xformers: `pip install xformers` "
                              "(matching your torch build)") from None

    def xformers_attention(q, k, v):
        if not q.is_cuda:
            raise ValidationError("attention backend 'xformers' runs on CUDA tensors; use 'sdpa' on CPU")
        return memory_efficient_attention(q, k, v)                    # takes [B, L, H, D] as is
    return xformers_attention


def _triton_kernels():
    try:
        import triton  # noqa: F401  (only to fail early with an install hint)
    except ImportError:
        raise ValidationError("the 'triton' and 'sage' attention backends need Triton: "
                              "`pip install triton` (bundled with CUDA builds of torch)") from None
    from ..kernels import attention as kernels
    return kernels


def _config(kernels, kernel: str, spec: str, device: torch.device):
    return kernels.parse_config(spec) if spec else kernels.default_config(kernel, device)


def _load_triton(spec: str = "") -> AttentionFn:
    kernels = _triton_kernels()
    if spec:
        kernels.parse_config(spec)                                    # fail at selection time

    def triton_attention(q, k, v):
        cfg = _config(kernels, "triton", spec, q.device)
        return kernels.triton_attention_op(q, k, v, cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages)
    return triton_attention


def _load_sage(spec: str = "") -> AttentionFn:
    kernels = _triton_kernels()
    if spec:
        kernels.parse_config(spec)

    def sage_attention(q, k, v):
        cfg = _config(kernels, "sage", spec, q.device)
        # spec carries the schedule variant flags (xpipe, xpoly, ...) the ints do not.
        return kernels.sage_attention_op(q, k, v, cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, 1,
                                         cfg.tma, spec=cfg.spec)
    return sage_attention


BACKENDS: Mapping[str, Callable[..., AttentionFn]] = MappingProxyType({
    "sdpa": _load_sdpa,
    "flash": _load_flash,
    "xformers": _load_xformers,
    "triton": _load_triton,
    "sage": _load_sage,
})

# Backends that compute exact softmax attention in the input precision (bf16 P·V at worst).
EXACT_BACKENDS = frozenset({"sdpa", "flash", "xformers", "triton"})


# Names may carry a kernel config for the Triton backends: "sage:128x64x8x3" is BLOCK_M x BLOCK_N
# x num_warps x num_stages (what bench/attention.py's sweep prints); a plain name uses the
# per-GPU default table in kernels/attention.py.
CONFIGURABLE = frozenset({"triton", "sage"})


def available_backends() -> list[str]:
    """Every registered name (installed or not; `get_backend` says what is missing)."""
    return sorted(BACKENDS)


def _split(name: str) -> tuple[str, str]:
    base, _, spec = name.partition(":")
    if base not in BACKENDS:
        raise ValidationError(f"unknown attention backend {name!r}; choose one of {available_backends()}")
    if spec and base not in CONFIGURABLE:
        raise ValidationError(f"attention backend {base!r} takes no kernel config (got {name!r}); only "
                              f"{sorted(CONFIGURABLE)} do, as 'sage:128x64x8x3'")
    return base, spec


def get_backend(name: str) -> AttentionFn:
    base, spec = _split(name)
    return BACKENDS[base](spec) if spec else BACKENDS[base]()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Softmax attention on [B, L, H, D] tensors of one dtype; returns [B, Lq, H, D]."""
    return get_backend(backend)(q, k, v)


# ----------------------------------------------------------------------------------------------
# The model transform and its report

ATTENTION_KINDS = ("self", "cross", "face")


def _kind(module: nn.Module) -> str | None:
    from .model import CrossAttention, FaceBlock, SelfAttention
    if isinstance(module, SelfAttention):
        return "self"
    if isinstance(module, CrossAttention):
        return "cross"
    if isinstance(module, FaceBlock):
        return "face"
    return None


def _kinds(which: str | Iterable[str]) -> set[str]:
    kinds = set(ATTENTION_KINDS) if which == "all" else {which} if isinstance(which, str) else set(which)
    bad = kinds - set(ATTENTION_KINDS)
    if bad or not kinds:
        raise ValidationError(f"which={which!r}: choose 'all' or a subset of {ATTENTION_KINDS}")
    return kinds


def set_attention_backend(model: nn.Module, name: str, *, which: str | Iterable[str] = ("self",)) -> nn.Module:
    """Route the chosen attention modules of `model` through backend `name` (in place; returns the
    model; 'sage:128x64x8x3' pins a kernel config). `which`: 'all' or any of 'self' (the 75k-token self-attention, where the time goes),
    'cross' (text/CLIP context) and 'face' (5 motion tokens per frame). The backend is loaded
    here, so a missing package fails before the first step, not inside it."""
    get_backend(name)
    kinds = _kinds(which)
    hit = 0
    for module in model.modules():
        if _kind(module) in kinds:
            module.backend = name
            hit += 1
    if not hit:
        raise ValidationError(f"{type(model).__name__} has no {sorted(kinds)} attention modules to route")
    return model


def attention_report(model: nn.Module) -> dict:
    """{kind: backend name} for the run's sidecar ('mixed:a,b' if modules of one kind differ), plus
    the Triton kernel configs in use when a Triton backend is selected."""
    names: dict[str, set[str]] = {}
    for module in model.modules():
        kind = _kind(module)
        if kind is not None:
            names.setdefault(kind, set()).add(module.backend)
    report: dict = {kind: (next(iter(n)) if len(n) == 1 else "mixed:" + ",".join(sorted(n)))
                    for kind, n in sorted(names.items())}
    used = sorted(n for n in set().union(*names.values()) if _split(n)[0] in CONFIGURABLE) if names else []
    if used:
        kernels = _triton_kernels()
        import triton
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        report["kernels"] = {n: _config(kernels, _split(n)[0], _split(n)[1], device).as_dict() for n in used}
        report["triton_version"] = triton.__version__
    return report


# ----------------------------------------------------------------------------------------------
# Hybrid schedules


def attention_schedule(steps: int, backend: str, exact_first: int = 1, exact_last: int = 1, *,
                       exact: str = "sdpa") -> list[str]:
    """The backend for each of `steps` denoising steps: `exact` for the first `exact_first` and the
    last `exact_last` steps, `backend` in between (the early steps fix the layout, the last ones
    the fine detail; quantization error hurts most there). Pure: the pipeline's step loop calls
    `set_attention_backend(model, schedule[i])` when the name changes."""
    for label, n in (("steps", steps), ("exact_first", exact_first), ("exact_last", exact_last)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValidationError(f"attention_schedule: {label}={n!r} must be a non-negative integer")
    for name in (backend, exact):
        _split(name)
    if _split(exact)[0] not in EXACT_BACKENDS:
        raise ValidationError(f"attention_schedule: exact={exact!r} must be an exact backend, one of "
                              f"{sorted(EXACT_BACKENDS)}")
    return [exact if i < exact_first or i >= steps - exact_last else backend for i in range(steps)]
