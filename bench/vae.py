"""VAE decode (and encode) speed and peak memory: our torch VAE (eager, channels_last_3d,
native = channels-last + the fused RMS_norm+SiLU CUDA kernel of CMakeLists.txt, torch.compile per
step with static shapes, compile + channels-last) against diffusers' AutoencoderKLWan, same run.

    python -m wanimate.bench.vae                          # GPU: 480p + 720p, bf16 + fp32, 77 frames
    python -m wanimate.bench.vae --dtypes bf16            # the target rows only (faster)
    python -m wanimate.bench.vae --smoke                  # CPU, toy sizes: checks the code path

The `native` rows need build/libwanimate_vae_ops.so (cmake -S . -B build && cmake --build build)
or WANIMATE_NATIVE_LIB; without it they are recorded as errors and the run goes on.

Models have random weights at the real size (dim 96, z 16; timing depends only on shapes). Ours
all share one set of weights, so each of our rows also reports its output's rel L2 against our
eager output (a broken fast path shows up here, not only in the tests); diffusers gets its own
random weights (no key map). Decode = latent [1,16,20,h,w] -> 77 frames; encode = 77 frames ->
20 latent frames. Timing: CUDA events around the whole call, after `--warmup` calls (compilation
happens there and is reported as warmup_s), median of `--repeats`. Peak memory: max allocated
during the timed calls, absolute and above what was allocated before (weights + input).
cudnn.benchmark is on for every row (ours and diffusers alike; --no-cudnn-benchmark to compare).
Each row catches OOM and errors and the run goes on; rows that would start after --budget-s are
skipped. Prints a table, writes JSON (after every row) to --out or $OUT/vae.json.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import statistics
import time
import traceback
from pathlib import Path

import torch

RESOLUTIONS = {"480p": (480, 832), "720p": (720, 1280), "smoke": (32, 48)}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PATHS = ("eager", "channels_last", "native", "compile", "compile_cl", "diffusers")
DEFAULT_PATHS = ("eager", "channels_last", "native", "compile_cl", "diffusers")
DIFFUSERS_480P_BF16_S = 1.74     # H200, measured by the lead (issue 9): the targets' baseline
DIFFUSERS_720P_BF16_S = 3.99


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> list[float]:
    from wanimate.bench.timing import time_calls
    return time_calls(fn, device, repeats)


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _our_model(base, path: str, dtype: torch.dtype):
    from wanimate.engine.vae_fast import FastVAE

    model = copy.deepcopy(base).to(dtype)
    if path == "eager":
        return model
    if path == "native":
        # Eager, channels-last, RMS_norm+SiLU through the CMake-built CUDA kernel (export/native.py).
        from wanimate.export.native import NativeOps, fuse_norm_silu

        ops = NativeOps.load() if model.conv2.weight.is_cuda else None
        fuse_norm_silu(model, ops)
        return FastVAE(model, channels_last=True)
    return FastVAE(model, compile=path in ("compile", "compile_cl"),
                   channels_last=path in ("channels_last", "compile_cl"))


def _diffusers_model(dim: int, dtype: torch.dtype, device: torch.device):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=dim, z_dim=16).to(device=device, dtype=dtype).eval().requires_grad_(False)


def run_row(op: str, path: str, res: str, dtype_name: str, args, base, refs: dict) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[dtype_name]
    h, w = RESOLUTIONS[res] if not args.smoke else RESOLUTIONS["smoke"]
    t_latent = (args.frames - 1) // 4 + 1
    row = {"op": op, "path": path, "res": res, "hw": [h, w], "dtype": dtype_name, "frames": args.frames}
    g = torch.Generator(device="cpu").manual_seed(0)
    model = None
    try:
        if op == "decode":
            x = torch.randn(1, 16, t_latent, h // 8, w // 8, generator=g).to(device)
        else:
            x = (torch.randn(1, 3, args.frames, h, w, generator=g) * 0.5).clamp(-1, 1).to(device)
        if path == "diffusers":
            model = _diffusers_model(args.dim, dtype, device)
            x_in = x.to(dtype)
            if op == "decode":
                fn = lambda: model.decode(x_in, return_dict=False)[0]
            else:
                fn = lambda: model.encode(x_in).latent_dist.mode()
        else:
            model = _our_model(base, path, dtype)
            x_in = x.to(dtype) if op == "encode" else x      # ours takes fp32 latents, casts inside
            fn = (lambda: model.decode(x_in)) if op == "decode" else (lambda: model.encode(x_in))
        with torch.no_grad():
            t0 = time.perf_counter()
            out = None
            for _ in range(args.warmup):
                out = fn()
            _sync(device)
            row["warmup_s"] = time.perf_counter() - t0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            times = _timed(fn, device, args.repeats)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device)
                row["peak_gib"] = peak / 2 ** 30
                row["peak_over_inputs_gib"] = (peak - before) / 2 ** 30
            row["median_s"] = statistics.median(times)
            row["times_s"] = times
            if out is None:
                out = fn()
            if path != "diffusers":
                key = (op, res, dtype_name)
                if path == "eager":
                    refs.clear()              # keep one reference on the device at a time
                    refs[key] = out.float()
                elif key in refs:
                    row["rel_l2_vs_eager"] = _rel_l2(out.float(), refs[key])
            row["status"] = "ok"
    except torch.cuda.OutOfMemoryError:
        row["status"] = "OOM"
    except Exception as e:   # a broken row is recorded; the benchmark goes on
        row["status"] = f"error: {type(e).__name__}: {str(e)[:300]}"
        row["traceback"] = traceback.format_exc(limit=4)
    finally:
        model = out = x = x_in = fn = None  # noqa: F841  (drop references before freeing)
        gc.collect()
        if path in ("compile", "compile_cl"):
            torch._dynamo.reset()     # fresh guards per row: every row compiles its own shapes
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _speedups(rows: list[dict]) -> None:
    base = {(r["op"], r["res"], r["dtype"]): r["median_s"] for r in rows
            if r["path"] == "diffusers" and r.get("status") == "ok"}
    for r in rows:
        ref = base.get((r["op"], r["res"], r["dtype"]))
        if ref and r.get("status") == "ok":
            r["speedup_vs_diffusers"] = ref / r["median_s"]


def _table(rows: list[dict]) -> str:
    header = ("op", "res", "dtype", "path", "median s", "x diffusers", "peak GiB", "warmup s", "rel L2 vs eager", "status")
    lines = []
    for r in rows:
        f = lambda k, fmt: (fmt.format(r[k]) if isinstance(r.get(k), (int, float)) and not math.isnan(r[k]) else "-")
        lines.append((r["op"], r["res"], r["dtype"], r["path"], f("median_s", "{:.3f}"), f("speedup_vs_diffusers", "{:.2f}"),
                      f("peak_gib", "{:.2f}"), f("warmup_s", "{:.1f}"), f("rel_l2_vs_eager", "{:.1e}"),
                      r.get("status", "")[:60]))
    widths = [max(len(str(x[i])) for x in lines + [header]) for i in range(len(header))]
    fmt = lambda x: "  ".join(str(v).ljust(wd) for v, wd in zip(x, widths))
    return "\n".join([fmt(header), fmt(["-" * wd for wd in widths])] + [fmt(x) for x in lines])


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "cudnn_benchmark": torch.backends.cudnn.benchmark}
    try:
        import diffusers
        env["diffusers"] = diffusers.__version__
    except ImportError:
        env["diffusers"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, 32x48, 5 frames, dim 16: checks the code path")
    p.add_argument("--res", default="480p,720p")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--paths", default=",".join(DEFAULT_PATHS), help=f"of {','.join(PATHS)}")
    p.add_argument("--encode-paths", default="eager,channels_last,compile_cl,diffusers", help="'' for no encode rows")
    p.add_argument("--encode-dtypes", default="bf16")
    p.add_argument("--frames", type=int, default=77)
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="skip rows that would start after this (a compiled 720p row can take 2 min)")
    p.add_argument("--no-cudnn-benchmark", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.device = args.device or "cpu"
        args.frames, args.dim = min(args.frames, 5), min(args.dim, 16)
        args.repeats, args.res = min(args.repeats, 1), "smoke"
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if (args.frames - 1) % 4:
        p.error("--frames must be 1 + 4k (77, 81, ...)")
    for name in args.paths.split(",") + [x for x in args.encode_paths.split(",") if x]:
        if name not in PATHS:
            p.error(f"unknown path {name!r}: choose from {PATHS}")
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    out_path = Path(args.out) if args.out else Path(os.environ.get("OUT", ".")) / "vae.json"

    from wanimate.engine.config import VAEConfig
    from wanimate.engine.vae import WanVAE

    torch.manual_seed(0)
    base = WanVAE(VAEConfig(dim=args.dim)).to(device).eval().requires_grad_(False)
    plan = []
    for dtype_name in args.dtypes.split(","):
        for res in args.res.split(","):
            plan += [("decode", path, res, dtype_name) for path in args.paths.split(",")]
    for dtype_name in [d for d in args.encode_dtypes.split(",") if d]:
        for res in args.res.split(","):
            plan += [("encode", path, res, dtype_name) for path in args.encode_paths.split(",") if path]
    # eager first within each group: the other rows compare their outputs against it.
    plan.sort(key=lambda r: (r[0] != "decode", r[3] != "bf16", r[2], r[1] != "eager"))

    result = {"bench": "vae", "env": environment(device), "args": vars(args), "rows": [],
              "targets": {"decode_480p_bf16_diffusers_h200_s": DIFFUSERS_480P_BF16_S,
                          "decode_720p_bf16_diffusers_h200_s": DIFFUSERS_720P_BF16_S,
                          "wanted_speedup_vs_diffusers": 1.5}}
    refs: dict = {}
    start = time.perf_counter()
    for op, path, res, dtype_name in plan:
        if time.perf_counter() - start > args.budget_s:
            result["rows"].append({"op": op, "path": path, "res": res, "dtype": dtype_name,
                                   "status": "skipped (budget)"})
            continue
        row = run_row(op, path, res, dtype_name, args, base, refs)
        result["rows"].append(row)
        print(f"[{time.perf_counter() - start:6.1f}s] {op} {res} {dtype_name} {path}: "
              f"{row.get('median_s', float('nan')):.3f}s {row['status']}", flush=True)
        _speedups(result["rows"])
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1))
    print(_table(result["rows"]))
    print(f"wrote {out_path}")
    return result


if __name__ == "__main__":
    main()
