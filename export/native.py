"""The native VAE ops built by CMakeLists.txt (csrc/vae_ops.cu), called through ctypes on torch
CUDA tensors, and their pure-torch references.

    cmake -S . -B build && cmake --build build          # -> build/libwanimate_vae_ops.so
    ops = NativeOps.load()                             # or NativeOps.load("/path/to/lib.so")
    y = ops.rms_norm_silu(x, gamma)                    # x [B, C, T, H, W], NCDHW or NDHWC

`rms_norm_silu` equals `rms_norm_silu_ref` (the VAE's RMSNorm followed by SiLU, fp32 arithmetic)
and can write into a frame range of a larger buffer (`out=`, `frame_offset=`): the causal conv's
[cache | new frames] input. `fuse_norm_silu(vae, ops)` swaps the VAE's RMSNorm+SiLU pairs for the
fused op (eager path; bench/vae.py row `native`). Optional: nothing in the engine needs the
library; it is tested where nvcc (build) and a GPU (run) exist.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..engine.errors import CheckpointError, ValidationError
from ..engine.vae import RMSNorm

ABI_VERSION = 1
LIB_NAME = "libwanimate_vae_ops.so"
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
EPS = 1e-12    # F.normalize's default, as in engine/vae.py


def rms_norm_silu_ref(x: Tensor, gamma: Tensor, silu: bool = True) -> Tensor:
    """engine/vae.py's RMSNorm (over dim 1, fp32 arithmetic) then SiLU, in x's dtype."""
    c = x.shape[1]
    g = gamma.float().reshape(c, *([1] * (x.dim() - 2)))
    y = F.normalize(x.float(), dim=1, eps=EPS) * (c ** 0.5) * g
    return (F.silu(y) if silu else y).to(x.dtype)


def default_library() -> Path:
    env = os.environ.get("WANIMATE_NATIVE_LIB")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "build" / LIB_NAME


class NativeOps:
    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
        lib.wan_vae_ops_abi_version.restype = ctypes.c_int
        lib.wan_rms_norm_silu_cf.argtypes = [ptr, ptr, ptr, ctypes.c_int, i64, i64, i64, i64, i64, i64, f32, f32,
                                             ctypes.c_int, ptr]
        lib.wan_rms_norm_silu_cf.restype = ctypes.c_int
        lib.wan_rms_norm_silu_cl.argtypes = [ptr, ptr, ptr, ctypes.c_int, i64, i64, f32, f32, ctypes.c_int, ptr]
        lib.wan_rms_norm_silu_cl.restype = ctypes.c_int
        lib.wan_vae_ops_error_string.argtypes = [ctypes.c_int]
        lib.wan_vae_ops_error_string.restype = ctypes.c_char_p
        if lib.wan_vae_ops_abi_version() != ABI_VERSION:
            raise CheckpointError(f"{LIB_NAME} has ABI {lib.wan_vae_ops_abi_version()}, this code needs "
                                  f"{ABI_VERSION}: rebuild it (cmake --build build)")

    @classmethod
    def load(cls, path: Path | str | None = None) -> "NativeOps":
        path = Path(path) if path is not None else default_library()
        if not path.is_file():
            raise CheckpointError(f"{path} not found: build it with `cmake -S . -B build && cmake --build build` "
                                  "(needs nvcc), or set WANIMATE_NATIVE_LIB")
        return cls(ctypes.CDLL(str(path)))

    def _check(self, code: int) -> None:
        if code != 0:
            raise ValidationError(f"wanimate_vae_ops: {self.lib.wan_vae_ops_error_string(code).decode()} ({code})")

    def rms_norm_silu(self, x: Tensor, gamma: Tensor, *, silu: bool = True, out: Tensor | None = None,
                      frame_offset: int = 0) -> Tensor:
        """x [B, C, T, H, W] (contiguous NCDHW, or channels_last_3d) -> same shape and dtype. With
        `out` ([B, C, T_out, H, W] NCDHW, T_out >= frame_offset + T) the result goes to
        out[:, :, frame_offset:frame_offset + T] and `out` is returned."""
        if x.dim() != 5 or not x.is_cuda or x.dtype not in _DTYPES:
            raise ValidationError(f"x must be a 5-D CUDA tensor of {sorted(map(str, _DTYPES))}, got "
                                  f"{tuple(x.shape)} {x.dtype} on {x.device}")
        b, c, t, h, w = x.shape
        gamma = gamma.reshape(c).to(x.dtype).contiguous()
        stream = ctypes.c_void_p(torch.cuda.current_stream(x.device).cuda_stream)
        scale = float(c) ** 0.5
        if x.is_contiguous():
            if out is None:
                out, frame_offset = torch.empty_like(x), 0
            if (not out.is_contiguous() or out.dtype != x.dtype or out.device != x.device
                    or (out.shape[0], out.shape[1], out.shape[3], out.shape[4]) != (b, c, h, w)
                    or not 0 <= frame_offset <= out.shape[2] - t):
                raise ValidationError(f"out must be a contiguous {x.dtype} [{b}, {c}, >= {frame_offset + t}, {h}, {w}] "
                                      f"tensor on {x.device}, got {tuple(out.shape)} {out.dtype}")
            self._check(self.lib.wan_rms_norm_silu_cf(x.data_ptr(), gamma.data_ptr(), out.data_ptr(), _DTYPES[x.dtype],
                                                      b, c, t, h * w, out.shape[2], frame_offset, scale, EPS,
                                                      int(silu), stream))
            return out
        if x.is_contiguous(memory_format=torch.channels_last_3d) and out is None:
            out = torch.empty_like(x, memory_format=torch.channels_last_3d)
            self._check(self.lib.wan_rms_norm_silu_cl(x.data_ptr(), gamma.data_ptr(), out.data_ptr(), _DTYPES[x.dtype],
                                                      b * t * h * w, c, scale, EPS, int(silu), stream))
            return out
        raise ValidationError("x must be contiguous NCDHW (out= allowed) or channels_last_3d (no out=)")


class FusedRMSNormSiLU(nn.Module):
    """engine/vae.py's RMSNorm + SiLU as one module: the CUDA kernel when `ops` is given and the
    input suits it, else the torch reference. Holds the norm's own `gamma` Parameter, so the
    state-dict keys are unchanged (`...residual.0.gamma`)."""

    def __init__(self, norm: RMSNorm, ops: NativeOps | None = None):
        super().__init__()
        self.gamma = norm.gamma
        self.ops = ops

    def forward(self, x: Tensor) -> Tensor:
        if (self.ops is not None and x.is_cuda and x.dim() == 5 and x.dtype in _DTYPES
                and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last_3d))):
            return self.ops.rms_norm_silu(x, self.gamma)
        return rms_norm_silu_ref(x, self.gamma)


def fuse_norm_silu(vae: nn.Module, ops: NativeOps | None = None) -> int:
    """Swap every (RMSNorm, SiLU) pair of the VAE's sequential blocks (residual branches, heads)
    for FusedRMSNormSiLU + Identity, in place. Returns how many pairs were fused."""
    fused = 0
    for module in vae.modules():
        if not isinstance(module, nn.Sequential):
            continue
        for i in range(len(module) - 1):
            if isinstance(module[i], RMSNorm) and isinstance(module[i + 1], nn.SiLU) and module[i].gamma.dim() == 4:
                module[i] = FusedRMSNormSiLU(module[i], ops)
                module[i + 1] = nn.Identity()
                fused += 1
    return fused


__all__ = ["NativeOps", "rms_norm_silu_ref", "default_library", "ABI_VERSION", "FusedRMSNormSiLU", "fuse_norm_silu"]
