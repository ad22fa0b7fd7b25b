"""Where one DiT forward spends its GPU time: torch.profiler kernel times of the wanimate DiT (reference
path, kernels on) and of diffusers' WanAnimateTransformer3DModel, same config, inputs and weight scheme
as bench/kernels.py (random bf16 weights at the 14B size, 480p).

    python bench/profile_dit.py [--size 480p] [--rows reference,kernels,diffusers] [--top 25] [--out FILE]
    python bench/profile_dit.py --smoke      # CPU, toy config: CPU op self-times instead of kernels

Each row: one warm-up forward, then one profiled forward. Kernels are summed by name and by category
(GEMM, attention, convolution, our Triton kernels, elementwise/reduction/copy, other), so two engines
can be compared line by line: which attention kernel each one runs, how much time goes to copies.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path



def _load_bench_kernels():
    """bench/kernels.py (its builders, inputs and bootstrap), loaded by path under a name that
    cannot shadow the PyPI package `kernels` that diffusers probes for."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("wanimate_bench_kernels", Path(__file__).with_name("kernels.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


K = _load_bench_kernels()

# First match wins: convolutions before GEMMs (cuDNN names its implicit-GEMM convolutions "...gemm").
CATEGORIES = [
    ("attention", re.compile(r"flash|fmha|attn|attention|sdpa|cudnn_generated|_sage|softmax", re.I)),
    ("conv", re.compile(r"conv|fprop|dgrad|wgrad|implicit|winograd", re.I)),
    ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|sm90_|addmm|matmul", re.I)),
    ("triton (wanimate)", re.compile(r"^_(layer_norm|rms_norm|head_rms|gated_residual|quant|int8|blur|bias_act)", re.I)),
    ("copy", re.compile(r"copy|cat|index|transpose|contiguous", re.I)),
    ("elementwise/reduce", re.compile(r"elementwise|vectorized|reduce|unrolled|norm|gelu|silu|mul|add", re.I)),
]


def category(name: str) -> str:
    return next((cat for cat, rx in CATEGORIES if rx.search(name)), "other")


def kernel_times(prof, cuda: bool) -> dict[str, tuple[int, float]]:
    """name -> (calls, total microseconds): GPU kernels on CUDA, CPU ops' self time otherwise."""
    out: dict[str, list] = defaultdict(lambda: [0, 0.0])
    if cuda:
        from wanimate.bench.timing import cuda_kernels
        for name, us in cuda_kernels(prof):
            out[name][0] += 1
            out[name][1] += us
    else:
        for e in prof.key_averages():
            if e.self_cpu_time_total > 0:
                out[e.key][0] += e.count
                out[e.key][1] += e.self_cpu_time_total
    return {k: (c, t) for k, (c, t) in out.items()}


def profile_row(b, name: str, fn, top: int) -> dict:
    torch = b.torch
    from torch.profiler import ProfilerActivity, profile
    with torch.no_grad():
        fn()
        b.sync()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if b.cuda else [])
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            fn()
            b.sync()
        wall = time.perf_counter() - t0
    times = kernel_times(prof, b.cuda)
    total = sum(t for _, t in times.values())
    cats: dict[str, float] = defaultdict(float)
    for k, (_, t) in times.items():
        cats[category(k)] += t
    rows = sorted(times.items(), key=lambda kv: -kv[1][1])[:top]
    return {"row": name, "wall_s_profiled": round(wall, 3), "kernel_ms": round(total / 1e3, 2),
            "categories_ms": {c: round(t / 1e3, 2) for c, t in sorted(cats.items(), key=lambda kv: -kv[1])},
            "top": [{"kernel": k[:140], "category": category(k), "calls": c, "ms": round(t / 1e3, 3)}
                    for k, (c, t) in rows]}


def print_row(r: dict) -> None:
    print(f"\n== {r['row']}: kernels {r['kernel_ms']:.1f} ms (profiled wall {r['wall_s_profiled']:.2f} s)")
    for c, t in r["categories_ms"].items():
        print(f"   {c:22s} {t:10.2f} ms  {100 * t / max(r['kernel_ms'], 1e-9):5.1f}%")
    print(f"   {'calls':>6s} {'ms':>9s}  category            kernel")
    for k in r["top"]:
        print(f"   {k['calls']:6d} {k['ms']:9.2f}  {k['category']:18s}  {k['kernel'][:110]}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--size", default="480p", choices=sorted(K.SIZES))
    p.add_argument("--rows", default="reference,kernels,diffusers")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    K._drop_script_dir_from_path()
    K._import_wanimate()
    import torch
    from wanimate import kernels
    from wanimate.bench.bench import build_random
    from wanimate.bench.timing import RowBench
    from wanimate.engine.loader import build_dit
    from wanimate.engine.transforms import use_kernels
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke on a CPU")
    kernels.load()
    b = RowBench(args, {"env": {}, "profiles": []}, "profile_dit.json")
    b.results["env"] = b.environment()
    rows = [r for r in args.rows.split(",") if r]
    cfg = K.dit_config(b)
    x = K.make_inputs(b, cfg, args.size)

    def record(r):
        b.results["profiles"].append(r)
        b.save()
        print_row(r)

    if {"reference", "kernels"} & set(rows):
        model = build_random(lambda: build_dit(cfg), b.device, torch.bfloat16, seed=0)
        if "reference" in rows:
            use_kernels(model, on=False)
            record(profile_row(b, f"wanimate reference {args.size}", lambda: K.wanimate_forward(model, x), args.top))
        if "kernels" in rows and use_kernels(model):
            record(profile_row(b, f"wanimate kernels {args.size}", lambda: K.wanimate_forward(model, x), args.top))
        model = None
        b.free()
    if "diffusers" in rows:
        model = K.build_diffusers(b, cfg)
        record(profile_row(b, f"diffusers eager {args.size}", lambda: K.diffusers_forward(model, x), args.top))
    print(f"\nJSON: {b.out}")


if __name__ == "__main__":
    main()
