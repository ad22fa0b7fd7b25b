"""Helpers for the fused-kernel tests (tests/test_kernels_*.py).

Without a GPU the kernels run in Triton's interpreter. Triton decides between compiling and
interpreting when a @triton.jit function is defined, so `use_interpreter_without_gpu()` must run
before any wanimate.kernels.* module is imported (each test module calls it at the top).

The interpreter converts fp32 -> bf16 by truncation, where the GPU rounds to nearest even. So on
the CPU a kernel is compared twice: against its reference run under `truncating_bf16()` (which
makes torch truncate at every point where it rounds to bf16: exact agreement up to fp32 order,
which checks that the kernel rounds where the reference rounds), and against the plain reference
with a tolerance of a few bf16 ulps. On a GPU only the plain reference is used, with 1-2 ulps.
"""
from __future__ import annotations

import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu"


def use_interpreter_without_gpu() -> None:
    if INTERPRETED:
        os.environ["TRITON_INTERPRET"] = "1"


def _truncate(t: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 rounding toward zero (as the interpreter does)."""
    bits = t.float().contiguous().view(torch.int32) & -65536
    return bits.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero


class truncating_bf16(TorchDispatchMode):
    """Within this mode every fp32 -> bf16 rounding of casts and bf16 arithmetic truncates."""

    _ARITH = {torch.ops.aten.mul.Tensor, torch.ops.aten.add.Tensor, torch.ops.aten.sub.Tensor,
              torch.ops.aten.div.Tensor}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor) or out.dtype != torch.bfloat16:
            return out
        if func is torch.ops.aten._to_copy.default and args[0].dtype in (torch.float32, torch.float64):
            return _truncate(args[0].float())
        if func in self._ARITH:
            up = [a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else a for a in args]
            return _truncate(func(*up, **kwargs))
        return out


def reference(fn, *args, **kwargs):
    """fn(*args) as the kernel should reproduce it on this device (see module docstring)."""
    if INTERPRETED:
        with truncating_bf16():
            return fn(*args, **kwargs)
    return fn(*args, **kwargs)


# (rtol, atol) for the comparison against `reference`: fp32 order only in fp32; in bf16 one ulp
# (2^-8 relative) where the fp32 differences move a value across a rounding boundary.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}
# Against the round-to-nearest reference on the CPU (interpreter truncation: up to a few ulps).
TOL_INTERPRETER_VS_RNE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def assert_matches(got, fn, *args, **kwargs):
    """Kernel output(s) against the reference: two-sided, dtype-specific, NaN positions equal."""
    want = reference(fn, *args, **kwargs)
    got_t = got if isinstance(got, tuple) else (got,)
    want_t = want if isinstance(want, tuple) else (want,)
    assert len(got_t) == len(want_t)
    for g, w in zip(got_t, want_t):
        assert g.dtype == w.dtype and g.shape == w.shape, (g.dtype, w.dtype, g.shape, w.shape)
        torch.testing.assert_close(g, w, equal_nan=True, **TOL[w.dtype])
    if INTERPRETED:
        rne = fn(*args, **kwargs)
        for g, w in zip(got_t, rne if isinstance(rne, tuple) else (rne,)):
            torch.testing.assert_close(g, w, equal_nan=True, **TOL_INTERPRETER_VS_RNE[w.dtype])
