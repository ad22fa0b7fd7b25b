"""CPU measurement behind the default bf16-exemption policy (quant/config.py DEFAULT_KEEP).

Runs quant/report.py's accuracy_report and measure_exemptions on
  - the tiny preset (recipe weights, bf16), and
  - the 14B architecture (dim 5120, FFN 13824, 40 heads, full-size embeddings, motion encoder and
    face encoder) cut to 5 blocks (the minimum: one face block per 5), random weights in bf16,
each with outlier channels injected (compensated and uncompensated, quant/report.py::inject_outliers),
at a reduced token count, every scheme in its exact CPU emulation. Prints the tables and writes JSON.

    python -m wanimate.bench.quant_accuracy --out quant_accuracy.json [--skip-14b] [--tokens-hw 16 16]
About 25 minutes on 2 CPU cores for everything; the tiny part takes about 2 minutes.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from wanimate.engine.config import DiTConfig, preset
from wanimate.engine.loader import recipe_dit
from wanimate.quant.report import accuracy_report, dit_inputs, inject_outliers, measure_exemptions, random_dit


def measure(label, make_model, hw, schemes, exemption_schemes, results, outlier_modes=("none", "compensated", "uncompensated")):
    for mode in outlier_modes:
        t0 = time.time()
        model = make_model()
        if mode != "none":
            inject_outliers(model, compensate=(mode == "compensated"))
        x = dit_inputs(model.cfg, hw=hw, outlier_channels=0 if mode == "none" else 8)
        key = f"{label} outliers={mode}"
        acc = accuracy_report(model, schemes, inputs=x, label=key)
        print(acc.table, flush=True)
        ex = measure_exemptions(model, exemption_schemes, inputs=x, label=key) if exemption_schemes else None
        if ex:
            print(ex.table, flush=True)
        results[key] = {"accuracy": acc.data, "exemptions": ex.data if ex else None, "seconds": time.time() - t0}
        del model


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="quant_accuracy.json")
    ap.add_argument("--skip-14b", action="store_true")
    ap.add_argument("--tokens-hw", type=int, nargs=2, default=(16, 16))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    results = {}
    with torch.no_grad():
        tiny = preset("tiny").dit
        measure("tiny", lambda: recipe_dit(tiny, 1234, dtype=torch.bfloat16), (8, 8),
                ("fp8", "int8", "int8_wo", "nf4"), ("fp8", "int8", "int8_wo", "nf4"), results)
        json.dump(results, open(args.out, "w"), indent=1)
        if not args.skip_14b:
            measure("14b-arch-5-blocks", lambda: random_dit(DiTConfig(num_layers=5)), tuple(args.tokens_hw), ("fp8", "int8", "int8_wo", "nf4"),
                    ("fp8", "int8_wo"), results, outlier_modes=("compensated", "uncompensated"))
            json.dump(results, open(args.out, "w"), indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
