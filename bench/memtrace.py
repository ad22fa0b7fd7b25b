"""Live-tensor memory traces on the meta device: the defaults of engine.offload.MemoryModel.

    python -m wanimate.bench.memtrace [--out memtrace.json]

Runs the engine's own DiT and VAE code at the real 14B shapes on the meta device (no weights, no
GPU) under a dispatch mode that counts the bytes of every tensor an op creates until it is freed,
and reports the peak. Attention is counted as its output only (flash and memory-efficient SDPA
keep no score matrix; on meta, SDPA would otherwise decompose into the math path). What this does
not see, the GPU measurement in bench/vram_matrix.py does: allocator rounding and fragmentation,
cuBLAS/cuDNN workspaces, kernels' internal buffers.
"""
from __future__ import annotations

import argparse
import json
import time
import weakref

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensors created by ops inside the mode (inputs made outside are not counted)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._schema.is_mutable or any(r.alias_info is not None for r in func._schema.returns):
            return out                                  # in-place ops and views allocate nothing
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                n = t.untyped_storage().nbytes()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, n)
        return out

    def _free(self, n):
        self.live -= n


class FlashLikeSDPA(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            q, _, v = args[:3]
            return q.new_empty(*q.shape[:-1], v.shape[-1])
        return func(*args, **(kwargs or {}))


def trace_dit(cfg, size: tuple[int, int], frames: int, dtype=torch.bfloat16, batch: int = 1) -> dict:
    """Peak bytes of one denoise() beyond its inputs, and per token per model dim per batch element."""
    from wanimate.engine.loader import build_dit
    from wanimate.engine.model import Conditions
    from wanimate.engine.offload import dit_tokens

    model = build_dit(cfg).to(dtype)
    h, w = size[0] // 8, size[1] // 8
    lat_t = (frames - 1) // 4 + 1
    grid = (lat_t + 1, h // 2, w // 2)
    tokens = dit_tokens(cfg, size, frames)
    meta = dict(device="meta", dtype=dtype)
    cond = Conditions(
        y=torch.empty(batch, 20, lat_t + 1, h, w, **meta),
        pose_tokens=torch.empty(batch, cfg.dim, lat_t, h // 2, w // 2, **meta),
        motion=torch.empty(batch, lat_t + 1, cfg.face_heads + 1, cfg.dim, **meta),
        context_kv=[tuple(torch.empty(batch, n, cfg.num_heads, cfg.head_dim, **meta)
                          for n in (cfg.text_len, cfg.text_len, cfg.image_tokens, cfg.image_tokens))] * cfg.num_layers,
        rope=(torch.empty(tokens, cfg.head_dim // 2, device="meta"),) * 2, grid=grid)
    latents = torch.empty(batch, 16, lat_t + 1, h, w, device="meta")
    mode = LiveBytes()
    with torch.no_grad(), FlashLikeSDPA(), mode:
        model.denoise(latents, torch.empty(batch, device="meta"), cond)
    return {"tokens": tokens, "peak_bytes": mode.peak, "per_token_dim": mode.peak / (tokens * cfg.dim * batch)}


def trace_vae(cfg, size: tuple[int, int], frames: int, tiling=None) -> dict:
    """Peak bytes of a streamed decode and of an encode (input video excluded), and per pixel."""
    from wanimate.engine.vae import WanVAE

    with torch.device("meta"):
        vae = WanVAE(cfg)
    h, w = size
    latent = torch.empty(1, cfg.z_dim, (frames - 1) // 4 + 1, h // 8, w // 8, device="meta")
    video = torch.empty(1, 3, frames, h, w, device="meta")
    dec, enc = LiveBytes(), LiveBytes()
    with torch.no_grad(), dec:
        for chunk in vae.decode_stream(latent, tiling=tiling):
            del chunk
    with torch.no_grad(), enc:
        vae.encode(video, tiling=tiling)
    return {"decode_peak_bytes": dec.peak, "decode_per_px": dec.peak / (h * w),
            "encode_peak_bytes": enc.peak, "encode_per_px": enc.peak / (h * w)}


def main(argv=None):
    from wanimate.engine.config import preset
    from wanimate.engine.offload import RESOLUTIONS
    from wanimate.engine.vae import Tiling

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--frames", type=int, default=77)
    args = ap.parse_args(argv)
    cfg = preset("14b")
    res = {}
    for name, size in RESOLUTIONS.items():
        for dtype in (torch.bfloat16, torch.float32):
            t = time.perf_counter()
            r = trace_dit(cfg.dit, size, args.frames, dtype)
            res[f"dit_{name}_{str(dtype)[6:]}"] = r
            print(f"DiT {name} {str(dtype)[6:]:9s} L={r['tokens']:6d} peak {r['peak_bytes'] / 2**30:6.2f} GiB "
                  f"= {r['per_token_dim']:.1f} B/token/dim  ({time.perf_counter() - t:.1f} s)", flush=True)
        for tiled in (False, True):
            r = trace_vae(cfg.vae, size, args.frames, Tiling() if tiled else None)
            res[f"vae_{name}_{'tiled' if tiled else 'untiled'}"] = r
            print(f"VAE {name} {'tiled' if tiled else 'untiled':8s} decode {r['decode_peak_bytes'] / 2**30:6.2f} GiB "
                  f"({r['decode_per_px']:.0f} B/px), encode {r['encode_peak_bytes'] / 2**30:6.2f} GiB "
                  f"({r['encode_per_px']:.0f} B/px)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
