"""Fused Triton kernels for the DiT's memory-bound work, one file per kernel.

Each file holds the pure-torch reference (`<name>_ref`, the exact math engine/model.py runs, casts
included), the Triton kernel, its launcher and a `torch.library.custom_op` (`wanimate::<name>`)
with a fake implementation, so torch.compile and export see one opaque op:

    rms_norm_rope.py   q/k RMSNorm over the full width + interleaved RoPE   (SelfAttention; CrossAttention q)
    layer_norm.py      [gated residual add +] LayerNorm [+ affine | + (1 + scale) x + shift]   (Block, FaceBlock)
    gated_residual.py  x + gate * y on the fp32 residual stream   (end of Block)
    head_rms_norm.py   per-head RMSNorm, affine   (FaceBlock q and k)
    motion.py          the motion encoder's padded 4x4 blur, and bias + leaky ReLU [+ residual merge]

Measured bandwidth (bench/kernels.py, H200, calls timed back to back; kernels_h200_full_r4.log):
0.89-1.02 of a device copy for every DiT kernel here, 0.93 for bias_act, 0.30 for the blur. The
figures quoted in the files' comments from earlier sweeps were timed with a synchronize after
each call, which adds the host's launch time, and understate the kernels by 5-25%; re-timed,
every default is within 1% of the best setting of its sweep.

This package imports neither triton nor the kernel files until `load()` runs (engine/transforms.py
`use_kernels` calls it): Triton decides between compiling and interpreting (TRITON_INTERPRET=1)
when a kernel is defined, and the model must stay importable without triton.

Not here: GELU(tanh) of the FFN. Fusing it needs a GEMM epilogue; as a separate pass it moves
4 bytes per FFN-hidden element, about 0.25 ms per block at 480p on an H200 (under 1% of the
forward). engine/transforms.py `use_gelu_epilogue` uses cuBLASLt's GELU epilogue
(`torch._addmm_activation`), part of use_kernels' fast path; bench/kernels.py times it as its own
DiT row. Nor the fused
q/k/v projection (engine/transforms.py `fuse_qkv`, a GEMM): rms_norm_rope reads its q and k as
strided views.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch

_MODULES = ("rms_norm_rope", "layer_norm", "gated_residual", "head_rms_norm", "motion")
_DTYPES = (torch.bfloat16, torch.float32)

# Set once by load(): "cuda" when the kernels were compiled for the GPU, "interpreter" when Triton
# defined them under TRITON_INTERPRET=1 (they then run on CPU tensors), None before load().
_built_for: str | None = None


def load() -> bool:
    """Import the kernel files (registering the `wanimate::*` ops). False when triton is missing."""
    global _built_for
    if _built_for is not None:
        return True
    if importlib.util.find_spec("triton") is None:
        return False
    for name in _MODULES:
        importlib.import_module(f"{__name__}.{name}")
    _built_for = "interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    return True


def supported(*tensors: torch.Tensor) -> bool:
    """The one kernel-vs-reference guard. True when the fused kernels can take these tensors
    (activation first, then weights and tables); otherwise the caller runs the reference math.

    Guards, in order:
    1. `load()` ran and found triton (else the ops are not registered);
    2. every tensor is on a CUDA device, or on the CPU when the kernels were defined under
       TRITON_INTERPRET=1 (the CPU tests; the interpreter is far too slow for real use);
    3. the activation is bf16 or fp32 (fp16 would compile but is not tested: reference);
       the other tensors are floating point.
    Known gaps: ROCm devices also report "cuda" and are let through, untested.
    """
    if _built_for is None:
        return False
    device = "cpu" if _built_for == "interpreter" else "cuda"
    if any(t.device.type != device for t in tensors):
        return False
    return tensors[0].dtype in _DTYPES and all(t.is_floating_point() for t in tensors)
