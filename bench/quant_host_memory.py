"""Host memory of `wanimate quantize` and of loading its output, at the real 14B size.

    python bench/quant_host_memory.py --dir /tmp/hostmem --out $OUT/quant_host_memory.json
    python bench/quant_host_memory.py --layers 5 --dir /tmp/hm         # the same steps, 5 blocks (~4.5 GB)

1. Writes a random bf16 DiT in the official layout (1 GiB shards): built on the GPU when there is
   one (meta -> to_empty -> normal init, bench/bench.py), copied out one tensor at a time.
   14B: ~34.5 GB of disk.
2. A child process runs quantize_checkpoint(src, "fp8", out) (the default policy) and reports its
   peak RSS (VmHWM) above its RSS at the start.
3. A child loads the result with load_quantized_dit(out, "cpu"): peak RSS above the start against
   the quantized files' size (the issue-7 bound: <= 4 GB above the file size).
4. A child loads it to the GPU, if there is one: the host peak then holds about one shard.
The children import the library first (its one-time ~150 MB is not counted, as in
tests/test_quant_checkpoint.py). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import torch
    from wanimate.engine.config import DiTConfig
    from wanimate.engine.loader import build_dit
    from wanimate.quant.checkpoint import quantize_checkpoint, load_quantized_dit

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    op, src, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    build_dit(DiTConfig(num_layers=5))                 # one-time library initialisation
    if op == "load_cuda":
        torch.zeros(1, device="cuda")                  # the CUDA context is not the checkpoint's
    open("/proc/self/clear_refs", "w").write("5")      # reset the peak (VmHWM) to the current RSS
    before = status("VmRSS")
    t0 = time.perf_counter()
    if op == "quantize":
        quantize_checkpoint(src, "fp8", out)
    else:
        model = load_quantized_dit(src, "cuda" if op == "load_cuda" else "cpu")
    print(json.dumps({"before": before, "peak": status("VmHWM"), "seconds": time.perf_counter() - t0}))
""")


def write_random_source(directory: Path, preset: str, layers: int | None = None, shard_bytes: int = 1 << 30) -> int:
    """A random bf16 DiT checkpoint in the official layout (config.json holds the official
    constructor arguments, so only presets those can express: 14b, any number of layers)."""
    import torch
    sys.path.insert(0, str(ROOT / "bench"))
    from bench import build_random                      # bench/bench.py
    from wanimate.engine.config import preset as get_preset
    from wanimate.engine.loader import build_dit
    from wanimate.engine.safetensors_io import save_file

    import dataclasses
    cfg = get_preset(preset).dit
    if layers:
        cfg = dataclasses.replace(cfg, num_layers=layers)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_random(lambda: build_dit(cfg), device, torch.bfloat16, seed=0)
    directory.mkdir(parents=True, exist_ok=True)
    weight_map, shard, size, files = {}, {}, 0, []

    def flush():
        nonlocal shard, size
        if shard:
            name = f"diffusion_pytorch_model-{len(files) + 1:05d}.safetensors"
            save_file(shard, directory / name)
            weight_map.update({k: name for k in shard})
            files.append(name)
            shard, size = {}, 0

    for key, t in model.state_dict().items():
        shard[key] = t.detach().to("cpu", copy=True)
        size += t.numel() * t.element_size()
        if size >= shard_bytes:
            flush()
    flush()
    del model
    (directory / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    official = {k: getattr(cfg, k) for k in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim",
                                             "text_len", "text_dim", "freq_dim", "eps", "motion_encoder_dim")}
    (directory / "config.json").write_text(json.dumps({**official, "patch_size": list(cfg.patch_size)}))
    return sum((directory / f).stat().st_size for f in files)


def child(op: str, src: Path, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run([sys.executable, "-c", _CHILD, op, str(src), str(out)], capture_output=True, text=True,
                          env=env, timeout=1800)
    if proc.returncode != 0:
        return {"op": op, "error": proc.stderr[-1500:]}
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"op": op, "peak_above_start_gib": round((r["peak"] - r["before"]) / 2**30, 3),
            "seconds": round(r["seconds"], 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="14b")
    ap.add_argument("--layers", type=int, default=None, help="fewer transformer blocks (a quick check)")
    ap.add_argument("--dir", default="/tmp/wanimate_hostmem", help="scratch folder (source + quantized)")
    ap.add_argument("--out", default=None, help="JSON path")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    a = ap.parse_args(argv)
    if not Path("/proc/self/clear_refs").exists():
        raise SystemExit("needs Linux /proc (clear_refs, VmHWM) to measure peak RSS")
    import torch
    scratch = Path(a.dir)
    shutil.rmtree(scratch, ignore_errors=True)
    res = {"preset": a.preset, "layers": a.layers, "python": sys.version.split()[0], "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "rows": []}
    t0 = time.perf_counter()
    src_bytes = write_random_source(scratch / "src", a.preset, a.layers)
    res["source_gb"] = round(src_bytes / 1e9, 2)
    print(f"wrote the random bf16 source: {src_bytes / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s", flush=True)
    ops = ["quantize", "load_cpu"] + (["load_cuda"] if torch.cuda.is_available() else [])
    for op in ops:
        r = child(op, scratch / "src", scratch / "q") if op == "quantize" else child(op, scratch / "q", scratch / "unused")
        if op == "quantize" and "error" not in r:
            q_bytes = sum(f.stat().st_size for f in (scratch / "q").glob("*.safetensors"))
            res["quantized_gb"] = round(q_bytes / 1e9, 2)
            shutil.rmtree(scratch / "src", ignore_errors=True)      # disk: the loads need only q/
        if op.startswith("load") and "quantized_gb" in res and "error" not in r:
            r["above_file_size_gib"] = round(r["peak_above_start_gib"] - res["quantized_gb"] * 1e9 / 2**30, 3)
        res["rows"].append(r)
        print(json.dumps(r), flush=True)
    cpu = next((r for r in res["rows"] if r["op"] == "load_cpu" and "above_file_size_gib" in r), None)
    res["target"] = {"load_host_gib_above_file": cpu and cpu["above_file_size_gib"], "bound_gib": 4.0,
                     "met": bool(cpu and cpu["above_file_size_gib"] <= 4.0)}
    print(f"\n{'op':10} {'peak above start GiB':>21} {'above file GiB':>15} {'s':>7}")
    for r in res["rows"]:
        if "error" in r:
            print(f"{r['op']:10} error: {r['error'][-300:]}")
        else:
            print(f"{r['op']:10} {r['peak_above_start_gib']:21.3f} {str(r.get('above_file_size_gib', '')):>15} {r['seconds']:7.1f}")
    print(f"source {res['source_gb']} GB, quantized {res.get('quantized_gb')} GB; target: {res['target']}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    if not a.keep:
        shutil.rmtree(scratch, ignore_errors=True)
    return res


if __name__ == "__main__":
    main()
