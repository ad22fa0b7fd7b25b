"""Fused kernels and the 14B DiT forward, all measured in one run on one GPU (issue 5).

    python bench/kernels.py [--out FILE] [--sizes 480p,720p] [--parts kernels,attention,dit,diffusers]
    python bench/kernels.py --smoke          # CPU, toy sizes, Triton interpreter: end-to-end check

Parts (each row is an ablation; every row catches OOM and other errors, records them, frees
memory and goes on; the JSON is rewritten after each row, so a timeout keeps what was measured):
1. kernels: each fused kernel's bandwidth (bytes it must move / median time) against the
   measured copy ceiling (one large device-to-device copy, bytes read + written), at Wan sizes
   (480p: 21 latent frames x 30 x 52 = 32,760 tokens; 720p: 21 x 45 x 80 = 75,600; width 5120);
   the torch reference of each (what the model's reference path runs) for the speedup; a small
   sweep of launch settings (the default is what the op uses); the old whole-row rms_norm_rope
   and layer_norm kernels ('[old row kernel]' rows); the two-kernel residual + norm
   against the fused one; the motion encoder's blur and bias + leaky ReLU + skip (kernels/motion.py,
   reported, not in the issue's bandwidth target); Linear + GELU(tanh) against cuBLASLt's GELU
   epilogue (FFN up-projection).
2. attention: SDPA backends and one bf16 GEMM at the same sizes (napkin math for the DiT rows).
3. dit: one WanAnimate 14B forward, random bf16 weights built on the GPU (meta -> to_empty ->
   normal_(0, 0.02) / ones / zero bias, as shared/baselines/bench_diffusers.py does), inputs as
   that script's (77 frames of 512x512 face crops, 512 text tokens, 257 CLIP tokens): kernels off,
   kernels with the old whole-row norm kernels and separate q/k/v, the new kernels with separate
   q/k/v, + fused qkv, + the GELU epilogue (= use_kernels' fast path), the same without the
   motion-encoder kernels, kernels (denoise only),
   kernels + CUDA graph (denoise only), kernels + compile_blocks.
4. diffusers: WanAnimateTransformer3DModel eager and with compile_repeated_blocks (if importable),
   same inputs and weight scheme; run before part 3, so that a time limit cuts wanimate's compile
   rows rather than the baseline. --budget-s stops starting rows past that much wall time.
One model is built at a time and freed (14B bf16 = 34.5 GB). rel_l2 is against the wanimate
reference row of the same size (same weights and inputs); diffusers has other random weights.

Timing: CUDA events around each call after warm-up, calls enqueued back to back, median of repeats
(perf_counter on the CPU). Kernel rows also give the kernels' own time from torch.profiler
(kernel_us), the time with a synchronize after every call (us_sync_each: includes the host's launch
time, the way the first rounds were timed) and the host's time per call (host_us).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:                       # the script imports wanimate only once it is importable (main)
    from wanimate.bench.timing import RowBench as Bench


def _drop_script_dir_from_path():
    """`python bench/kernels.py` puts bench/ first on sys.path, where this file would shadow the
    PyPI package `kernels` that diffusers probes for; nothing here imports from bench/."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != here]


def _import_wanimate():
    """Make the repository root importable as `wanimate` when this file is run as a script."""
    try:
        import wanimate  # noqa: F401
    except ImportError:
        root = Path(__file__).resolve().parents[1]
        spec = importlib.util.spec_from_file_location("wanimate", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["wanimate"] = module
        spec.loader.exec_module(module)


# Tokens: latent frames (77 pixel frames -> 20, plus the reference) x (H/16) x (W/16).
SIZES = {"480p": (832, 480), "720p": (1280, 720)}
FRAMES = 77
TARGET_KERNEL_FRACTION = 0.75      # of the copy ceiling
TARGET_SPEEDUP_480P = 1.15         # wanimate kernels vs diffusers eager
TARGET_REL_L2 = 1e-2               # kernels vs reference path, bf16


# ----------------------------------------------------------------------------------------------
# Timing and bookkeeping


def make_bench(args) -> "Bench":
    from wanimate.bench.timing import RowBench
    return RowBench(args, {"env": {}, "copy": None, "kernels": [], "attention": [], "dit": [], "targets": {}},
                 "bench_kernels.json")


def environment(b: Bench) -> dict:
    env = b.environment()
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        import diffusers
        env["diffusers"] = diffusers.__version__
    except ImportError:
        env["diffusers"] = None
    env["interpreter"] = os.environ.get("TRITON_INTERPRET") == "1"
    return env


# ----------------------------------------------------------------------------------------------
# Part 1: kernels


def copy_ceiling(b: Bench) -> dict:
    torch = b.torch
    n = (2**30) if b.cuda else 2**22
    src = torch.empty(n, dtype=torch.uint8, device=b.device).random_()
    dst = torch.empty_like(src)
    t, _ = b.time(lambda: dst.copy_(src), warmup=3, reps=20 if b.cuda else 3)
    return {"bytes": 2 * n, "ms": round(t * 1e3, 4), "gb_s": round(2 * n / t / 1e9, 1)}


def kernel_cases(b: Bench, tokens: int, width: int, heads: int):
    """name -> (fused op call, reference call, bytes the op must move, [(label, launcher call)] sweep,
    note). Inputs as the Block sees them: bf16 activations, fp32 residual stream and modulation."""
    torch = b.torch
    from wanimate.engine.model import rope_angles, rope_cos_sin
    from wanimate.kernels import gated_residual as GR, head_rms_norm as HR, layer_norm as LN, motion as MO
    from wanimate.kernels import rms_norm_rope as RR
    dev, bf16, f32 = b.device, torch.bfloat16, torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    rand = lambda *s, dtype=bf16: torch.randn(*s, device=dev, generator=g).to(dtype)
    head_dim = width // heads
    d6 = head_dim // 6
    # a (t, h, w) grid with this many tokens: 21 frames x rows x cols where it divides, else 1 x 1 x L
    grid = next(((21, r, tokens // (21 * r)) for r in (30, 45) if tokens % (21 * r) == 0), (1, 1, tokens))
    cos, sin = rope_cos_sin(grid, rope_angles((head_dim - 4 * d6, 2 * d6, 2 * d6), max(grid) + 1, 1e4), dev)
    q, k = rand(1, tokens, width), rand(1, tokens, width)
    wq, wk = 1 + 0.1 * rand(width), 1 + 0.1 * rand(width)
    x32, y = rand(1, tokens, width, dtype=f32), rand(1, tokens, width)
    e0 = rand(1, 6, width, dtype=f32)
    shift, scale, gate = e0.chunk(6, dim=1)[:3]
    w3, b3 = 1 + 0.1 * rand(width), 0.1 * rand(width)
    qh = q.view(1, tokens, heads, head_dim)
    eps = 1e-6
    el = tokens * width
    ops = torch.ops.wanimate
    qkv = rand(1, tokens, 3 * width)
    qv, kv = qkv.chunk(3, dim=-1)[:2]       # what SelfAttention passes after fuse_qkv
    chunks = [(1024, 4), (1024, 8), (512, 4), (2048, 8)]      # (chunk, warps); the default first
    # the motion encoder's first res block at the real crop size (one GPU batch of 32 crops)
    crops = rand(32, 32, 512, 512) if b.cuda else rand(2, 3, 16, 16)
    feat = rand(32, 64, 256, 256) if b.cuda else rand(2, 3, 8, 8)
    feat_bias, feat_skip = rand(feat.shape[1]), rand(*feat.shape)
    n_c, (h, w) = crops.shape[0] * crops.shape[1], crops.shape[2:]
    blur_out = n_c * (h + 1) * (w + 1)                        # pads (2, 2): one row and column more
    return {
        "rms_norm_rope (q, k)": (
            lambda: ops.rms_norm_rope(q, k, wq, wk, cos, sin, eps),
            lambda: RR.rms_norm_rope_ref(q, k, wq, wk, cos, sin, eps),
            4 * el * 2 + 2 * width * 2 + 2 * cos.numel() * 4,
            [(f"chunk={c},warps={w}", lambda c=c, w=w: RR._launch(q, k, wq, wk, cos, sin, eps, chunk=c, num_warps=w))
             for c, w in chunks],
            "self-attention q and k: 2 bf16 reads + 2 bf16 writes (two-pass chunk kernel)"),
        "rms_norm_rope (q, k) [old row kernel]": (
            lambda: RR._launch(q, k, wq, wk, cos, sin, eps, variant="row"),
            None,
            4 * el * 2 + 2 * width * 2 + 2 * cos.numel() * 4,
            [],
            "the first version: whole row in registers, one pass, 8 warps (its measured best)"),
        "rms_norm_rope (q, k views of fused qkv)": (
            lambda: ops.rms_norm_rope(qv, kv, wq, wk, cos, sin, eps),
            None,
            4 * el * 2 + 2 * width * 2 + 2 * cos.numel() * 4,
            [],
            "inputs are strided views of the [L, 3C] qkv output (row stride 3C)"),
        "rms_norm (cross q)": (
            lambda: ops.rms_norm(q, wq, eps),
            lambda: RR.rms_norm_ref(q, wq, eps),
            2 * el * 2 + width * 2,
            [(f"chunk={c},warps={w}", lambda c=c, w=w: RR._launch(q, None, wq, None, None, None, eps, chunk=c,
                                                                   num_warps=w)) for c, w in chunks],
            "bf16 in, bf16 out"),
        "rms_norm (cross q) [old row kernel]": (
            lambda: RR._launch(q, None, wq, None, None, None, eps, variant="row"),
            None,
            2 * el * 2 + width * 2,
            [],
            "the first version"),
        "layer_norm + modulation": (
            lambda: ops.layer_norm(x32, eps, bf16, scale=scale, shift=shift),
            lambda: LN.layer_norm_ref(x32, eps, bf16, scale=scale, shift=shift),
            el * (4 + 2) + 2 * width * 4,
            [(f"chunk={c},warps={w}", lambda c=c, w=w: LN._launch(x32, None, None, None, None, scale, shift, eps,
                                                                   bf16, chunk=c, num_warps=w)) for c, w in chunks],
            "norm1/norm2: fp32 stream in, bf16 out (two-pass chunk kernel)"),
        "layer_norm + modulation [old row kernel]": (
            lambda: LN._launch(x32, None, None, None, None, scale, shift, eps, bf16, variant="row"),
            None,
            el * (4 + 2) + 2 * width * 4,
            [],
            "the first version: whole row in registers, one pass, 4 warps (its measured best)"),
        "add (gate) + layer_norm affine": (
            lambda: ops.add_layer_norm(x32, y, gate, eps, bf16, weight=w3, bias=b3),
            lambda: LN.add_layer_norm_ref(x32, y, gate, eps, bf16, w3, b3),
            el * (4 + 2 + 4 + 2) + 3 * width * 4,
            [(f"chunk={c},warps={w}", lambda c=c, w=w: LN._launch(x32, y, gate, w3, b3, None, None, eps, bf16,
                                                                   chunk=c, num_warps=w)) for c, w in chunks],
            "self-attn residual + norm3: fp32+bf16 in, fp32+bf16 out (two-pass chunk kernel)"),
        "add (gate) + layer_norm affine [old row kernel]": (
            lambda: LN._launch(x32, y, gate, w3, b3, None, None, eps, bf16, variant="row"),
            None,
            el * (4 + 2 + 4 + 2) + 3 * width * 4,
            [],
            "the first version: whole row in registers, one pass, 8 warps"),
        "add + layer_norm + modulation": (
            lambda: ops.add_layer_norm(x32, y, None, eps, bf16, scale=scale, shift=shift),
            lambda: LN.add_layer_norm_ref(x32, y, None, eps, bf16, scale=scale, shift=shift),
            el * (4 + 2 + 4 + 2) + 2 * width * 4,
            [(f"chunk={c},warps={w}", lambda c=c, w=w: LN._launch(x32, y, None, None, None, scale, shift, eps, bf16,
                                                                   chunk=c, num_warps=w)) for c, w in chunks],
            "cross-attn residual + norm2 (two-pass chunk kernel)"),
        "add + layer_norm + modulation [old row kernel]": (
            lambda: LN._launch(x32, y, None, None, None, scale, shift, eps, bf16, variant="row"),
            None,
            el * (4 + 2 + 4 + 2) + 2 * width * 4,
            [],
            "the first version: whole row in registers, one pass, 8 warps"),
        "gated_residual": (
            lambda: ops.gated_residual(x32, y, gate),
            lambda: GR.gated_residual_ref(x32, y, gate),
            el * (4 + 2 + 4) + width * 4,
            [(f"block={bl},warps={w}", lambda bl=bl, w=w: GR._launch(x32, y, gate, block=bl, num_warps=w))
             for bl, w in ((1024, 4), (2048, 4), (2048, 8), (4096, 8))],
            "FFN residual: fp32 + bf16 in, fp32 out"),
        "gated_residual + layer_norm, unfused": (
            lambda: ops.layer_norm(ops.gated_residual(x32, y, None), eps, bf16, scale=scale, shift=shift),
            None,
            el * (4 + 2 + 4) + el * (4 + 2),
            [],
            "the two-kernel version of add_layer_norm (same result): what fusing saves"),
        "motion blur [32, 32, 512, 512]": (
            lambda: ops.blur(crops, 2, 2),
            lambda: MO.blur_ref(crops, 2, 2),
            (crops.numel() + blur_out) * 2,
            [(f"{v},bh={bh},bw={bw},warps={w}",
              lambda v=v, bh=bh, bw=bw, w=w: MO._blur_launch(crops, 2, 2, variant=v, bh=bh, bw=bw, num_warps=w))
             for v, bh, bw, w in (("rows", 32, 256, 4), ("rows", 32, 128, 4), ("rows", 64, 256, 4),
                                  ("rows", 16, 256, 4), ("rows", 32, 512, 4), ("rows", 32, 512, 8),
                                  ("taps", 16, 64, 4))],
            "LIA encoder: zero pad + depthwise 4x4 binomial blur (ref: F.pad + grouped conv2d)"),
        "motion bias_act + skip [32, 64, 256, 256]": (
            lambda: ops.bias_act(feat, feat_bias, feat_skip),
            lambda: MO.bias_act_ref(feat, feat_bias, feat_skip),
            feat.numel() * 2 * 3,
            [(f"block={bl},warps={w}", lambda bl=bl, w=w: MO._bias_act_launch(feat, feat_bias, feat_skip, block=bl,
                                                                                num_warps=w))
             for bl, w in ((2048, 4), (4096, 8), (1024, 4))],
            "LIA res block end: leaky_relu(x + b) * sqrt2, merged with the skip, / sqrt2"),
        "head_rms_norm (face q)": (
            lambda: ops.head_rms_norm(qh, wq[:head_dim], eps),
            lambda: HR.head_rms_norm_ref(qh, wq[:head_dim], eps),
            2 * el * 2,
            [(f"tile={t},warps={w}", lambda t=t, w=w: HR._launch(qh, wq[:head_dim], eps, tile=t, num_warps=w))
             for t, w in ((2048, 4), (4096, 4), (4096, 8), (8192, 8))],
            "bf16 in, bf16 out, per head of 128"),
    }


def bench_kernels(b: Bench, sizes):
    from wanimate.bench.timing import host_seconds, kernel_seconds
    width, heads = (5120, 40) if b.cuda else (256, 2)
    reps, warm = (20, 3) if b.cuda else (1, 1)
    copy_gbs = b.results["copy"]["gb_s"]
    for size in sizes:
        tokens = tokens_for(size) if b.cuda else {"480p": 21, "720p": 35}[size]
        for name, (op, ref, nbytes, sweep, note) in kernel_cases(b, tokens, width, heads).items():
            if not wanted(b, name):
                continue
            def measure(op=op, ref=ref, nbytes=nbytes, sweep=sweep):
                t, _ = b.time(op, warmup=warm, reps=reps)
                row = {"us": round(t * 1e6, 1), "mbytes": round(nbytes / 1e6, 1), "gb_s": round(nbytes / t / 1e9, 1),
                       "of_copy": round(nbytes / t / 1e9 / copy_gbs, 3)}
                if b.cuda:
                    # The same op three more ways: the kernels' own time (profiler), the old
                    # sync-after-every-call timing (adds the host's launch time), the host alone.
                    tk = kernel_seconds(op)
                    ts, _ = b.time(op, warmup=1, reps=reps, sync_each=True)
                    row.update(kernel_us=round(tk * 1e6, 1), of_copy_kernel=round(nbytes / tk / 1e9 / copy_gbs, 3),
                               us_sync_each=round(ts * 1e6, 1), host_us=round(host_seconds(op) * 1e6, 1))
                if ref is not None:
                    tr, _ = b.time(ref, warmup=warm, reps=max(2, reps // 4))
                    row.update(ref_us=round(tr * 1e6, 1), speedup_vs_ref=round(tr / t, 2))
                best = None
                for label, fn in sweep:
                    ts, _ = b.time(fn, warmup=warm, reps=reps)
                    if best is None or ts < best[1]:
                        best = (label, ts)
                if best:
                    row.update(best_setting=best[0], best_of_copy=round(nbytes / best[1] / 1e9 / copy_gbs, 3))
                return row
            b.guarded("kernels", {"kernel": name, "size": size, "tokens": tokens, "note": note}, measure)
        if wanted(b, "ffn up + gelu"):
            gelu_epilogue(b, size, tokens, width)
        if wanted(b, "q/k/v projection, sdpa on views of qkv"):
            projection_rows(b, size, tokens, width, heads)


def wanted(b: Bench, name: str) -> bool:
    """--kernel-filter: run only the kernel rows whose name contains one of its substrings."""
    return not b.args.kernel_filter or any(f in name for f in b.args.kernel_filter)


def gelu_epilogue(b: Bench, size, tokens, width):
    """FFN up-projection + GELU(tanh): Linear then GELU (two kernels) vs cuBLASLt's GELU epilogue."""
    torch = b.torch
    import torch.nn.functional as F
    ffn = width * 27 // 10  # 13824 at width 5120
    g = torch.Generator(device=b.device).manual_seed(1)
    x = torch.randn(tokens, width, device=b.device, generator=g).to(torch.bfloat16)
    w = (torch.randn(ffn, width, device=b.device, generator=g) * 0.02).to(torch.bfloat16)
    bias = (torch.randn(ffn, device=b.device, generator=g) * 0.02).to(torch.bfloat16)
    reps = 10 if b.cuda else 2

    def measure():
        t_ref, _ = b.time(lambda: F.gelu(F.linear(x, w, bias), approximate="tanh"), warmup=2, reps=reps)
        t_epi, _ = b.time(lambda: torch._addmm_activation(bias, x, w.t(), use_gelu=True), warmup=2, reps=reps)
        ref = F.gelu(F.linear(x, w, bias), approximate="tanh").float()
        epi = torch._addmm_activation(bias, x, w.t(), use_gelu=True).float()
        flops = 2 * tokens * width * ffn
        return {"linear_gelu_ms": round(t_ref * 1e3, 3), "epilogue_ms": round(t_epi * 1e3, 3),
                "saved_ms_per_forward": round((t_ref - t_epi) * 1e3 * 40, 1),
                "tflops_epilogue": round(flops / t_epi / 1e12, 1),
                "rel_l2": float(f"{((epi - ref).norm() / ref.norm()).item():.2e}"), **gelu_kind(b, x, w, bias)}
    b.guarded("kernels", {"kernel": "ffn up + gelu(tanh): Linear+GELU vs cuBLASLt epilogue", "size": size,
                          "tokens": tokens}, measure)


def gelu_kind(b: Bench, x, w, bias) -> dict:
    """Which GELU torch._addmm_activation computes at this shape: inputs that are small multiples of
    powers of two make the GEMM exact in fp32, so the bf16 output is round(gelu(z)) of a known z; it
    is compared with round(gelu_tanh(z)) and round(gelu_erf(z)) where those two differ (z < -1 mostly).
    On the CPU (torch 2.13) it is erf; cuBLASLt's GELU_BIAS epilogue is tanh."""
    torch = b.torch
    import torch.nn.functional as F
    g = torch.Generator(device=b.device).manual_seed(3)
    xi = torch.randint(-2, 3, x.shape, device=b.device, generator=g).to(torch.bfloat16)
    wi = (torch.randint(-2, 3, w.shape, device=b.device, generator=g) / 64).to(torch.bfloat16)
    bi = (torch.randint(-8, 9, bias.shape, device=b.device, generator=g) / 8).to(torch.bfloat16)
    z = xi[:4096].double() @ wi.double().t() + bi.double()            # exact (|z| <= 328, step 1/64)
    got = torch._addmm_activation(bi, xi, wi.t(), use_gelu=True)[:4096]
    tanh, erf = F.gelu(z, approximate="tanh").to(torch.bfloat16), F.gelu(z).to(torch.bfloat16)
    differ = tanh != erf
    n = int(differ.sum())
    share = lambda want: round(float((got == want)[differ].float().mean()), 4) if n else None
    return {"gelu_kind_elements": n, "gelu_matches_tanh": share(tanh), "gelu_matches_erf": share(erf)}


def projection_rows(b: Bench, size, tokens, width, heads):
    """The fused q/k/v projection against three GEMMs, and attention on v as a strided view of the
    fused output (what SelfAttention does after fuse_qkv) against a contiguous v: SDPA must not
    fall back to a slower backend for the view."""
    torch = b.torch
    import torch.nn.functional as F
    from wanimate.engine.attention import attention
    g = torch.Generator(device=b.device).manual_seed(4)
    x = torch.randn(tokens, width, device=b.device, generator=g).to(torch.bfloat16)
    w = (torch.randn(3 * width, width, device=b.device, generator=g) * 0.02).to(torch.bfloat16)
    bias = torch.zeros(3 * width, device=b.device, dtype=torch.bfloat16)
    ws, bs = w.chunk(3), bias.chunk(3)
    reps = 10 if b.cuda else 2

    def gemms():
        t3, _ = b.time(lambda: [F.linear(x, wi, bi) for wi, bi in zip(ws, bs)], warmup=2, reps=reps)
        t1, _ = b.time(lambda: F.linear(x, w, bias), warmup=2, reps=reps)
        return {"three_gemms_ms": round(t3 * 1e3, 3), "fused_gemm_ms": round(t1 * 1e3, 3),
                "saved_ms_per_forward": round((t3 - t1) * 1e3 * 40, 1),
                "tflops_fused": round(2 * tokens * width * 3 * width / t1 / 1e12, 1)}
    b.guarded("kernels", {"kernel": "q/k/v projection: 3 GEMMs vs fused qkv GEMM", "size": size, "tokens": tokens},
              gemms)

    def views():
        qkv = F.linear(x, w, bias).view(1, tokens, 3, heads, width // heads)
        q, k, v = qkv.unbind(2)
        q, k, vc = q.contiguous(), k.contiguous(), v.contiguous()
        r = 3 if b.cuda else 1
        t_view, _ = b.time(lambda: attention(q, k, v, "sdpa"), warmup=1, reps=r)
        t_cont, _ = b.time(lambda: attention(q, k, vc, "sdpa"), warmup=1, reps=r)
        same = torch.equal(attention(q, k, v, "sdpa"), attention(q, k, vc, "sdpa"))
        return {"v_view_ms": round(t_view * 1e3, 2), "v_contiguous_ms": round(t_cont * 1e3, 2),
                "view_over_contiguous": round(t_view / t_cont, 3), "bitwise_equal": same}
    b.guarded("kernels", {"kernel": "self-attention sdpa: v as view of qkv vs contiguous", "size": size,
                          "tokens": tokens}, views)


def bench_attention(b: Bench, sizes):
    """SDPA backends on self-attention and one q-projection GEMM: what the DiT rows are made of."""
    torch = b.torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    width, heads = (5120, 40) if b.cuda else (256, 2)
    for size in sizes:
        tokens = tokens_for(size) if b.cuda else 21
        g = torch.Generator(device=b.device).manual_seed(2)
        q, k, v = (torch.randn(1, heads, tokens, width // heads, device=b.device, generator=g).to(torch.bfloat16)
                   for _ in range(3))
        flops = 4 * tokens * tokens * width
        for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION") if b.cuda else ("MATH",):
            def measure(backend=backend):
                with sdpa_kernel(getattr(SDPBackend, backend)):
                    t, _ = b.time(lambda: F.scaled_dot_product_attention(q, k, v), warmup=1, reps=3)
                return {"ms": round(t * 1e3, 2), "tflops": round(flops / t / 1e12, 1),
                        "per_forward_s": round(t * 40, 2)}
            b.guarded("attention", {"op": f"sdpa {backend.lower()}", "size": size, "tokens": tokens}, measure)
        x = torch.randn(tokens, width, device=b.device, generator=g).to(torch.bfloat16)
        w = torch.randn(width, width, device=b.device, generator=g).to(torch.bfloat16)

        def gemm():
            t, _ = b.time(lambda: x @ w.t(), warmup=2, reps=10 if b.cuda else 2)
            return {"ms": round(t * 1e3, 3), "tflops": round(2 * tokens * width * width / t / 1e12, 1)}
        b.guarded("attention", {"op": "gemm [L,5120]x[5120,5120]", "size": size, "tokens": tokens}, gemm)
        q = k = v = x = w = None     # free before the next size


# ----------------------------------------------------------------------------------------------
# Parts 3-4: the DiT forward


def tokens_for(size: str) -> int:
    width, height = SIZES[size]
    return ((FRAMES - 1) // 4 + 2) * (height // 16) * (width // 16)


def dit_config(b: Bench):
    from wanimate.engine.config import DiTConfig, preset
    if b.cuda:
        return preset("14b").dit
    # Toy: same structure; head_dim 64; motion crops of 16 pixels.
    return DiTConfig(dim=128, ffn_dim=192, num_heads=2, num_layers=5, text_dim=32, image_dim=32, motion_size=16,
                     motion_width=32, motion_encoder_dim=32, face_hidden=48)


def make_inputs(b: Bench, cfg, size: str) -> dict:
    """The baseline script's inputs, shared by both models (bf16, one generator)."""
    torch = b.torch
    width, height = SIZES[size] if b.cuda else {"480p": (48, 32), "720p": (64, 48)}[size]
    frames = FRAMES if b.cuda else 5
    lt, lh, lw = (frames - 1) // 4 + 1, height // 8, width // 8
    g = torch.Generator(device=b.device).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=b.device, generator=g).to(torch.bfloat16)
    hidden = rnd(1, 16 + 20, lt + 1, lh, lw)
    return dict(hidden=hidden, latents=hidden[:, :16], y=hidden[:, 16:], pose=rnd(1, 16, lt, lh, lw),
                face=rnd(1, 3, frames, cfg.motion_size, cfg.motion_size).clamp_(-1, 1),
                text=rnd(1, cfg.text_len, cfg.text_dim), clip=rnd(1, 257, cfg.image_dim),
                t=torch.tensor([500], device=b.device), tokens=(lt + 1) * (lh // 2) * (lw // 2))


def timed_dit(b: Bench, size: str, fn):
    """(output of the last call, timing fields) for one DiT row."""
    torch = b.torch
    warm, reps = b.args.warmup, (b.args.reps if size == "480p" else b.args.reps_720p)
    last = {}

    def call():
        last["out"] = fn()
    with torch.no_grad():
        t, first = b.time(call, warmup=warm, reps=reps)
    out = last.pop("out")
    return out, {"median_s": round(t, 3), "first_s": round(first, 2), "finite": bool(torch.isfinite(out).all())}


def rel_l2(a, ref) -> float:
    a, ref = a.float(), ref.float()
    return float(f"{((a - ref).norm() / ref.norm()).item():.3e}")


@contextlib.contextmanager
def rms_norm_rope_variant(variant: str):
    """Run the wanimate::rms_norm_rope / rms_norm and layer_norm / add_layer_norm ops with another
    kernel variant ("row": the old whole-row kernels) inside the block: a bench-only switch for the
    old-vs-new DiT rows, restored on exit (the engine has no such setting)."""
    from wanimate.kernels import layer_norm as LN
    from wanimate.kernels import rms_norm_rope as RR
    saved = [(fn, fn.__kwdefaults__["variant"]) for fn in (RR._launch, LN._launch)]
    for fn, _ in saved:
        fn.__kwdefaults__["variant"] = variant
    try:
        yield
    finally:
        for fn, value in saved:
            fn.__kwdefaults__["variant"] = value


def bench_wanimate(b: Bench, sizes):
    torch = b.torch
    from wanimate.engine.transforms import GraphedDenoise, compile_blocks, fuse_qkv, use_gelu_epilogue, use_kernels
    cfg = dit_config(b)
    holder = {}

    def build():
        t0 = time.perf_counter()
        from wanimate.bench.bench import build_random
        from wanimate.engine.loader import build_dit
        holder["model"] = build_random(lambda: build_dit(cfg), b.device, b.torch.bfloat16, seed=0)
        return {"params_b": round(sum(p.numel() for p in holder["model"].parameters()) / 1e9, 3),
                "build_s": round(time.perf_counter() - t0, 1)}
    b.guarded("dit", {"row": "wanimate build"}, build)
    if "model" not in holder:
        return
    model = holder.pop("model")
    refs = {}

    forward = lambda x: wanimate_forward(model, x)

    def row(name, size, x, fn, *, what="forward", ref_key=None, keep_ref=False):
        def measure():
            out, res = timed_dit(b, size, fn)
            if keep_ref:
                refs[size] = out.float().cpu()
            elif ref_key in refs:
                res["rel_l2_vs_reference"] = rel_l2(out.float().cpu(), refs[ref_key])
            return res
        b.guarded("dit", {"row": name, "what": what, "size": size, "tokens": x["tokens"]}, measure)

    conds = {}
    for size in sizes:
        x = make_inputs(b, cfg, size)
        use_kernels(model, on=False)
        row("wanimate reference", size, x, lambda: forward(x), keep_ref=True)
        if not use_kernels(model, fuse_projections=False, gelu_epilogue=False):
            print("  triton not importable: kernel rows would run the reference; skipped", flush=True)
            continue
        if "old" not in b.args.skip_rows:
            # The fast path as it was before issue 5's second round, then with the new kernel alone.
            with rms_norm_rope_variant("row"):
                row("wanimate kernels [old row kernels, q/k/v]", size, x, lambda: forward(x), ref_key=size)
            row("wanimate kernels [q/k/v separate]", size, x, lambda: forward(x), ref_key=size)

        def fuse():
            t0 = time.perf_counter()
            before = torch.cuda.memory_allocated() if b.cuda else 0
            names = fuse_qkv(model, strict=False)        # what use_kernels(model) does on top
            after = torch.cuda.memory_allocated() if b.cuda else 0
            return {"fused": len(names), "fuse_s": round(time.perf_counter() - t0, 2),
                    "allocated_change_gib": round((after - before) / 2**30, 3)}
        b.guarded("dit", {"row": "fuse_qkv (use_kernels default)", "size": size}, fuse)
        if "gelu" not in b.args.skip_rows:
            row("wanimate kernels [no gelu epilogue]", size, x, lambda: forward(x), ref_key=size)
        use_gelu_epilogue(model)                         # now exactly use_kernels(model)'s fast path
        row("wanimate kernels", size, x, lambda: forward(x), ref_key=size)
        if "motion" not in b.args.skip_rows:
            flagged = [m for m in model.motion_encoder.modules() if hasattr(m, "kernels")]
            for m in flagged:
                m.kernels = False
            row("wanimate kernels [no motion-encoder kernels]", size, x, lambda: forward(x), ref_key=size)
            for m in flagged:                           # row() records errors: this always runs
                m.kernels = True
        with torch.no_grad():
            conds[size] = cond = model.prepare(x["y"], x["pose"], x["face"], x["text"], x["clip"])
        if "denoise" not in b.args.skip_rows:
            row("wanimate kernels", size, x, lambda: model.denoise(x["latents"], x["t"], cond), what="denoise",
                ref_key=size)
        if b.cuda and "graph" not in b.args.skip_rows:
            graphed = GraphedDenoise(model, warmup=1)
            row("wanimate kernels + CUDA graph", size, x, lambda: graphed(x["latents"], x["t"], cond),
                what="denoise", ref_key=size)
            graphed = None            # releases the graph and its memory pool
        elif not b.cuda:
            b.guarded("dit", {"row": "wanimate kernels + CUDA graph", "what": "denoise", "size": size,
                              "skipped": "needs CUDA"}, dict)
        conds.pop(size)
        cond = None
        if "sage" in b.args.extra_rows:
            attention_rows(b, model, row, forward, size, x, "wanimate kernels + sage")
        x = None
        b.free()
    if "fp8" in b.args.extra_rows:
        # Irreversible (the bf16 weights are replaced), so after every bf16 row; compile rows are
        # then on the FP8 model and are best skipped (--skip-rows compile).
        def quantize():
            from wanimate.quant import QuantConfig, quantize_, weight_bytes
            quantize_(model, QuantConfig("fp8"))
            b.free()
            return {"dit_weight_gb": round(weight_bytes(model) / 1e9, 2)}
        b.guarded("dit", {"row": "fp8 quantize_ (weights per channel, activations per token)"}, quantize)
        for size in sizes:
            x = make_inputs(b, cfg, size)
            row("wanimate fp8 + kernels", size, x, lambda: forward(x), ref_key=size)
            if "sage" in b.args.extra_rows:
                attention_rows(b, model, row, forward, size, x, "wanimate fp8 + kernels + sage")
            x = None
            b.free()
    if "compile" not in b.args.skip_rows:
        compile_blocks(model, mode=b.args.compile_mode, backend=b.args.compile_backend)
        for size in sizes:
            x = make_inputs(b, cfg, size)
            row("wanimate kernels + compile_blocks", size, x, lambda: forward(x), ref_key=size)
            x = None
    model = None
    torch._dynamo.reset()
    b.free()


def attention_rows(b: Bench, model, row, forward, size, x, name):
    """The same forward with the self-attention on the SageAttention-style kernel (engine/attention.py)."""
    from wanimate.engine.attention import set_attention_backend
    backend = b.args.sage_backend
    set_attention_backend(model, backend, which=("self",))
    try:
        row(f"{name} ({backend})", size, x, lambda: forward(x), ref_key=size)
    finally:
        set_attention_backend(model, "sdpa", which=("self",))


def build_diffusers(b: Bench, cfg):
    """diffusers' WanAnimateTransformer3DModel with this config, random bf16 weights on the device."""
    import diffusers
    from wanimate.bench.bench import fill_diffusers_buffers_, init_random_
    from wanimate.engine.loader import diffusers_config
    with b.torch.device("meta"):
        m = diffusers.WanAnimateTransformer3DModel.from_config(diffusers_config(cfg))
    m = m.to(b.torch.bfloat16).to_empty(device=b.device)   # as the baseline, but cast before allocating
    init_random_(m, seed=0)
    fill_diffusers_buffers_(m)
    return m.eval().requires_grad_(False)


def diffusers_forward(model, x: dict):
    return model(hidden_states=x["hidden"], timestep=x["t"].float(), encoder_hidden_states=x["text"],
                 encoder_hidden_states_image=x["clip"], pose_hidden_states=x["pose"],
                 face_pixel_values=x["face"], return_dict=False)[0]


def wanimate_forward(model, x: dict):
    return model(x["latents"], x["t"], x["y"], x["pose"], x["face"], x["text"], x["clip"])


def bench_diffusers(b: Bench, sizes):
    if importlib.util.find_spec("diffusers") is None:
        print("diffusers not importable: its rows are skipped", flush=True)
        b.results["dit"].append({"row": "diffusers", "skipped": "diffusers not importable"})
        return
    cfg = dit_config(b)
    holder = {}
    b.guarded("dit", {"row": "diffusers build"}, lambda: holder.update(model=build_diffusers(b, cfg)) or {"ok": True})
    if "model" not in holder:
        return
    model = holder.pop("model")
    forward = lambda x: diffusers_forward(model, x)

    def rows(name):
        for size in sizes:
            x = make_inputs(b, cfg, size)
            b.guarded("dit", {"row": name, "what": "forward", "size": size, "tokens": x["tokens"]},
                      lambda: timed_dit(b, size, lambda: forward(x))[1])
            x = None

    rows("diffusers eager")
    if "compile" not in b.args.skip_rows:
        model.compile_repeated_blocks(fullgraph=True, mode=b.args.compile_mode, backend=b.args.compile_backend)
        rows("diffusers compile_repeated_blocks")
    model = None
    b.torch._dynamo.reset()      # compiled graphs may still reference the model
    b.free()
    if b.cuda:
        print(f"after diffusers: {b.torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated", flush=True)


# ----------------------------------------------------------------------------------------------
# Summary


def summarize(b: Bench):
    r = b.results
    print("\n== copy ceiling:", r["copy"])
    print("\n== kernels (GB/s = bytes the op must move / median time; of_copy = fraction of the ceiling)")
    print("   (kernel_us: profiler kernel time; sync_us: synchronized after each call; host_us: launch time)")
    print(f"{'kernel':48s} {'size':5s} {'us':>9s} {'GB/s':>8s} {'of_copy':>8s} {'kernel_us':>9s} {'of_copy_k':>9s} "
          f"{'sync_us':>8s} {'host_us':>8s} {'ref_us':>9s} {'x ref':>6s}  best")
    nan = float("nan")
    for k in r["kernels"]:
        if "error" in k:
            print(f"{k['kernel']:48s} {k['size']:5s} ERROR {k['error']}")
        elif "us" in k:
            print(f"{k['kernel']:48s} {k['size']:5s} {k['us']:9.1f} {k['gb_s']:8.1f} {k['of_copy']:8.3f} "
                  f"{k.get('kernel_us', nan):9.1f} {k.get('of_copy_kernel', nan):9.3f} {k.get('us_sync_each', nan):8.1f} "
                  f"{k.get('host_us', nan):8.1f} {k.get('ref_us', nan):9.1f} {k.get('speedup_vs_ref', nan):6.2f}  "
                  f"{k.get('best_setting', '')} {k.get('best_of_copy', '')}")
        else:
            print(f"{k['kernel']:48s} {k['size']:5s} " + ", ".join(f"{a}={v}" for a, v in k.items()
                                                                  if a not in ("kernel", "size", "tokens")))
    print("\n== attention / GEMM")
    for a in r["attention"]:
        print(f"{a['op']:34s} {a['size']:5s} " + ", ".join(f"{k}={v}" for k, v in a.items()
                                                         if k not in ("op", "size", "tokens", "traceback")))
    print("\n== DiT (median seconds per call; speedup = diffusers eager forward / row, same size)")
    base = {d["size"]: d["median_s"] for d in r["dit"] if d.get("row") == "diffusers eager" and "median_s" in d}
    print(f"{'row':44s} {'what':8s} {'size':5s} {'tokens':>7s} {'median_s':>9s} {'first_s':>8s} {'speedup':>8s} "
          f"{'rel_l2':>10s} {'peak_gib':>8s}")
    for d in r["dit"]:
        if "what" not in d:
            print(f"{d['row']:44s} " + ", ".join(f"{k}={v}" for k, v in d.items() if k not in ("row", "traceback")))
            continue
        if "median_s" not in d:
            print(f"{d['row']:44s} {d['what']:8s} {d['size']:5s} {d.get('error') or d.get('skipped')}")
            continue
        sp = base.get(d["size"], math.nan) / d["median_s"] if d["what"] == "forward" else math.nan
        print(f"{d['row']:44s} {d['what']:8s} {d['size']:5s} {d['tokens']:7d} {d['median_s']:9.3f} "
              f"{d['first_s']:8.2f} {sp:8.3f} {str(d.get('rel_l2_vs_reference', '')):>10s} "
              f"{str(d.get('peak_gib', '')):>8s}")
    # targets
    t = {}
    # The kernels; the motion encoder's (kernels/motion.py) are reported but not in its target.
    fused = [k for k in r["kernels"] if "of_copy" in k and "unfused" not in k["kernel"] and "[old" not in k["kernel"]
             and not k["kernel"].startswith("motion")]
    if fused:
        t["kernels_min_of_copy"] = min(k["of_copy"] for k in fused)
        t["kernels_below_target"] = sorted({k["kernel"] for k in fused if k["of_copy"] < TARGET_KERNEL_FRACTION})
    for name in ("wanimate kernels [old row kernels, q/k/v]", "wanimate kernels [q/k/v separate]",
                 "wanimate kernels [no gelu epilogue]", "wanimate kernels [no motion-encoder kernels]",
                 "wanimate kernels", "wanimate kernels + compile_blocks"):
        row = next((d for d in r["dit"] if d.get("row") == name and d.get("what") == "forward"
                    and d.get("size") == "480p" and "median_s" in d), None)
        if row and "480p" in base:
            t[f"speedup_480p[{name}]"] = round(base["480p"] / row["median_s"], 3)
    rels = [d["rel_l2_vs_reference"] for d in r["dit"] if "rel_l2_vs_reference" in d]
    if rels:
        t["max_rel_l2_vs_reference"] = max(rels)
    r["targets"] = t
    print("\n== targets: kernels >= %.2f of copy; DiT kernels >= %.2fx diffusers eager at 480p; rel L2 <= %.0e"
          % (TARGET_KERNEL_FRACTION, TARGET_SPEEDUP_480P, TARGET_REL_L2))
    for k, v in t.items():
        print(f"  {k}: {v}")
    b.save()
    print(f"\nJSON: {b.out}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, toy sizes, Triton interpreter")
    p.add_argument("--out", help="JSON path (default $OUT/bench_kernels.json, else ./bench_kernels.json)")
    p.add_argument("--sizes", default=None, help="comma list of 480p, 720p (default both; --smoke: 480p)")
    p.add_argument("--parts", default="kernels,attention,dit,diffusers")
    p.add_argument("--skip-rows", default="", help="comma list; 'compile' skips both compile rows, 'graph' the "
                   "CUDA-graph rows, 'denoise' the denoise-only row, 'old' the old-kernel / separate q/k/v rows, "
                   "'gelu' the GELU-epilogue row, 'motion' the row without the motion-encoder kernels")
    p.add_argument("--kernel-filter", default="", help="comma list of substrings: only the kernel rows whose "
                   "name contains one (e.g. rms_norm,gelu,qkv)")
    p.add_argument("--extra-rows", default="", help="comma list of sage, fp8: attention and quantization rows "
                                                     "on the same model and inputs (issues 6 and 7)")
    p.add_argument("--sage-backend", default="sage", help="attention backend name for the sage rows, e.g. sage:128x64x8x3")
    p.add_argument("--warmup", type=int, default=1, help="DiT warm-up calls (the first may compile)")
    p.add_argument("--reps", type=int, default=3, help="timed DiT calls at 480p")
    p.add_argument("--reps-720p", type=int, default=1, help="timed DiT calls at 720p")
    p.add_argument("--budget-s", type=float, default=560, help="stop starting rows after this many seconds")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for both compile rows")
    p.add_argument("--compile-backend", default=None, help="default inductor (aot_eager in --smoke)")
    args = p.parse_args(argv)
    args.skip_rows = set(filter(None, args.skip_rows.split(",")))
    args.extra_rows = set(filter(None, args.extra_rows.split(",")))
    args.kernel_filter = [f for f in args.kernel_filter.split(",") if f]
    args.sizes_given, args.sizes = args.sizes is not None, args.sizes or "480p,720p"
    args.compile_backend = args.compile_backend or ("aot_eager" if args.smoke else "inductor")
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"      # before the kernels are defined (kernels.load)
        args.reps = args.reps_720p = 1
        args.sizes = args.sizes if args.sizes_given else "480p"
    _drop_script_dir_from_path()
    _import_wanimate()
    import torch
    from wanimate import kernels
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke on a CPU")
    torch.backends.cuda.matmul.allow_tf32 = True   # as the diffusers baseline (no effect on bf16 GEMMs)
    b = make_bench(args)
    kernels.load()
    b.results["env"] = environment(b)
    print(json.dumps(b.results["env"]), flush=True)
    sizes = [s for s in args.sizes.split(",") if s]
    if not set(sizes) <= set(SIZES):
        sys.exit(f"--sizes takes {sorted(SIZES)}, got {sizes}")
    parts = set(args.parts.split(","))
    start = time.perf_counter()
    if "kernels" in parts:
        b.results["copy"] = copy_ceiling(b)
        print("copy ceiling", b.results["copy"], flush=True)
        bench_kernels(b, sizes)
    if "attention" in parts:
        bench_attention(b, sizes)
    # diffusers first: its eager rows are the baseline of the targets, and what a time limit cuts
    # is then the last rows (wanimate compile at 720p).
    if "diffusers" in parts:
        bench_diffusers(b, sizes)
    if "dit" in parts:
        bench_wanimate(b, sizes)
    b.results["env"]["wall_s"] = round(time.perf_counter() - start, 1)
    summarize(b)


if __name__ == "__main__":
    main()
