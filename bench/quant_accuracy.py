"""CPU measurement behind the default policy (quant/config.py DEFAULT_KEEP, DEFAULT_OVERRIDES).

Runs quant/report.py's accuracy_report (per-layer and output errors per scheme, default policy)
and, optionally, measure_exemptions (output error with everything quantized, with one group only,
with the default policy and with the first/last block kept) on
  - tiny:  the tiny preset (recipe weights, bf16);
  - 14bN:  the 14B architecture (dim 5120, FFN 13824, 40 heads, full-size embeddings, motion and face
           encoders) cut to N blocks (a multiple of 5: one face block per 5), random weights in bf16,
with outlier channels injected (none / compensated / uncompensated, quant/report.py::inject_outliers)
at a reduced token count, every scheme in its exact CPU emulation. Prints the tables, writes JSON.

    python bench/quant_accuracy.py --models tiny,14b5 --modes compensated,uncompensated \\
        --exemptions fp8 --out quant_accuracy.json
    python bench/quant_accuracy.py --models 14b5 --modes compensated,uncompensated --policies   # ~4 min each
14b5: about 1.5 min per scheme and 1 min per exemption variant on 2 CPU cores (12 GB of RAM);
14b10 doubles both and needs about 20 GB.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path


def _import_wanimate():
    try:
        import wanimate  # noqa: F401
    except ImportError:
        root = Path(__file__).resolve().parents[1]
        spec = importlib.util.spec_from_file_location("wanimate", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["wanimate"] = module
        spec.loader.exec_module(module)


def make_model(name: str):
    import torch
    from wanimate.engine.config import DiTConfig, preset
    from wanimate.engine.loader import recipe_dit
    from wanimate.quant.report import random_dit
    if name == "tiny":
        return recipe_dit(preset("tiny").dit, 1234, dtype=torch.bfloat16), (8, 8)
    if name.startswith("14b"):
        return random_dit(DiTConfig(num_layers=int(name[3:]))), (16, 16)
    raise SystemExit(f"unknown model {name!r}: tiny or 14bN (N a multiple of 5)")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="quant_accuracy.json")
    ap.add_argument("--models", default="tiny,14b5")
    ap.add_argument("--modes", default="none,compensated,uncompensated")
    ap.add_argument("--schemes", default="fp8,int8,int8_wo,nf4")
    ap.add_argument("--exemptions", default="fp8", help="schemes for measure_exemptions ('' to skip)")
    ap.add_argument("--policies", action="store_true", help="only quant/report.py measure_policies (the override candidates)")
    args = ap.parse_args(argv)
    _import_wanimate()
    import torch
    from wanimate.quant.report import (accuracy_report, dit_inputs, inject_outliers, measure_exemptions,
                                       measure_policies)
    torch.set_num_threads(2)
    results = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    schemes = tuple(s for s in args.schemes.split(",") if s)
    ex_schemes = tuple(s for s in args.exemptions.split(",") if s)
    with torch.no_grad():
        for name in args.models.split(","):
            for mode in args.modes.split(","):
                t0 = time.time()
                model, hw = make_model(name)
                if mode != "none":
                    inject_outliers(model, compensate=(mode == "compensated"))
                x = dit_inputs(model.cfg, hw=hw, outlier_channels=0 if mode == "none" else 8)
                key = f"{name} outliers={mode}"
                if args.policies:
                    pol = measure_policies(model, inputs=x, label=key)
                    print(pol.table, flush=True)
                    results[f"{key} policies"] = {**pol.data, "seconds": round(time.time() - t0)}
                    Path(args.out).write_text(json.dumps(results, indent=1))
                    del model
                    continue
                acc = accuracy_report(model, schemes, inputs=x, label=key)
                print(acc.table, flush=True)
                ex = measure_exemptions(model, ex_schemes, inputs=x, label=key) if ex_schemes else None
                if ex:
                    print(ex.table, flush=True)
                results[key] = {"accuracy": acc.data, "exemptions": ex.data if ex else None,
                                "seconds": round(time.time() - t0)}
                Path(args.out).write_text(json.dumps(results, indent=1))
                del model
    print("wrote", args.out)


if __name__ == "__main__":
    main()
