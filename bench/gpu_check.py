"""Correctness on a CUDA device, before any timing: the engine's paths against its reference.

    python bench/gpu_check.py [--out FILE]

1. the DiT parity fixtures on the GPU: fp32 (TF32 off) against the official fp32 outputs, and the
   reference precision (bf16) against fp32 with the official's recorded error as the bound;
2. fused kernels on vs off on the tiny DiT in bf16 (rel L2);
3. attention backends (triton bf16, sage int8/fp8) against fp32 SDPA on Wan-like q/k/v with outlier
   channels, at 4,096 and 32,760 tokens (cos, rel L2).
Prints a table and writes JSON (default $OUT/gpu_check.json).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _import_wanimate():
    try:
        import wanimate  # noqa: F401
    except ImportError:
        import importlib.util
        spec = importlib.util.spec_from_file_location("wanimate", ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["wanimate"] = module
        spec.loader.exec_module(module)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def cos(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return (a @ b / (a.norm() * b.norm())).item()


def dit_fixtures(rows):
    from wanimate.engine.verify.dit import build_fixture_model, fixture_inputs, run_model
    fx = ROOT / "tests" / "data" / "fixtures"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for name in ("dit_fp32", "dit_fp32_motion"):
        meta = json.loads((fx / f"{name}.json").read_text())
        inputs = {k: v.cuda() for k, v in fixture_inputs(fx / f"{name}.json", meta).items()}
        model = build_fixture_model(meta, torch.float32).cuda()
        with torch.no_grad():
            out = run_model(model, inputs, int(inputs["input.t"][0]))
        rows.append({"check": f"{name} fp32 on cuda", "rel_l2": rel(out.cpu(), inputs["output.t0"].cpu()), "bound": 1e-5})
    meta = json.loads((fx / "dit_bf16_official_precision.json").read_text())
    inputs = {k: v.cuda() for k, v in fixture_inputs(fx / "dit_bf16_official_precision.json", meta).items()}
    spec = meta["precision"]["inputs_as_the_pipeline_passes_them"]
    key_of = {"x (noisy latents)": "x", "y": "y", "pose_latents": "pose_latents",
              "face_pixel_values": "face_pixel_values", "clip_fea": "clip_fea", "context": "context"}
    dt = {key_of[k]: getattr(torch, v) for k, v in spec.items() if k in key_of}
    fp32 = build_fixture_model(meta, torch.float32).cuda()
    bf16 = build_fixture_model(meta, torch.bfloat16).cuda()
    for i, t in enumerate(inputs["input.t"].tolist()):
        with torch.no_grad():
            ref = run_model(fp32, inputs, t)
            out = run_model(bf16, inputs, t, dt)
        official = meta["error_vs_dit_fp32"][f"output.t{i}"]["rel_l2_vs_dit_fp32"]
        rows.append({"check": f"bf16 reference precision t{i} on cuda vs fp32", "rel_l2": rel(out, ref),
                     "bound": 1.5 * official})
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True


def kernels_on_off(rows):
    from wanimate.engine.config import DiTConfig
    from wanimate.engine.loader import recipe_dit
    from wanimate.engine.transforms import use_kernels
    cfg = DiTConfig(dim=5120 // 8, ffn_dim=1728, num_heads=5, num_layers=5, text_dim=64, motion_size=64,
                    motion_width=64, motion_encoder_dim=64, face_hidden=64)
    model = recipe_dit(cfg, 3, dtype=torch.bfloat16, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    f, h, w = 5, 30, 52
    x = torch.randn(1, 16, f + 1, h, w, device="cuda", generator=g)
    y = torch.randn(1, 20, f + 1, h, w, device="cuda", generator=g)
    pose = torch.randn(1, 16, f, h, w, device="cuda", generator=g)
    face = torch.rand(1, 3, 4 * f - 3, 64, 64, device="cuda", generator=g) * 2 - 1
    ctx = torch.randn(1, 20, 64, device="cuda", generator=g)
    clip = torch.randn(1, 257, 1280, device="cuda", generator=g)
    with torch.no_grad():
        cond = model.prepare(y, pose, face, ctx, clip)
        ref = model.denoise(x, torch.tensor([700], device="cuda"), cond)
        use_kernels(model, True)
        out = model.denoise(x, torch.tensor([700], device="cuda"), cond)
        use_kernels(model, False)
        back = model.denoise(x, torch.tensor([700], device="cuda"), cond)
    rows.append({"check": "kernels on vs off, DiT bf16 (dim 640, 9,360 tokens)", "rel_l2": rel(out, ref), "bound": 1e-2})
    rows.append({"check": "kernels off again is bit-identical", "rel_l2": rel(back, ref), "bound": 0.0})


def attention_backends(rows):
    from wanimate.engine.attention import attention
    from wanimate.kernels.attention import wan_like_qkv
    for L in (4096, 32760):
        q, k, v = wan_like_qkv(1, L, 8, 128, device="cuda", seed=1)
        ref = attention(q.float(), k.float(), v.float(), "sdpa")
        for backend in ("sdpa", "triton", "sage"):
            try:
                out = attention(q, k, v, backend).float()
                rows.append({"check": f"attention {backend} L={L}", "rel_l2": rel(out, ref), "cos": cos(out, ref),
                             "bound": 0.03 if backend == "sage" else 1e-2})
            except Exception as e:
                rows.append({"check": f"attention {backend} L={L}", "error": f"{type(e).__name__}: {e}"[:300]})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_check.json"))
    args = ap.parse_args()
    _import_wanimate()
    rows = []
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    for part in (dit_fixtures, kernels_on_off, attention_backends):
        t0 = time.time()
        try:
            part(rows)
        except Exception as e:
            rows.append({"check": part.__name__, "error": f"{type(e).__name__}: {e}"[:400],
                         "trace": traceback.format_exc()[-1500:]})
        print(f"[{part.__name__}: {time.time() - t0:.1f}s]", flush=True)
    for r in rows:
        ok = "error" not in r and r["rel_l2"] <= r["bound"]
        r["pass"] = ok
        print(f"{r['check']:<58} {r.get('rel_l2', float('nan')):.3e}  bound {r.get('bound', float('nan')):.1e}  "
              f"{'ok' if ok else 'FAIL'} {r.get('error', '')}")
    Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    print(json.dumps(env))


if __name__ == "__main__":
    main()
