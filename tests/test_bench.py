"""bench/bench.py and bench/vram_matrix.py end to end at toy sizes on the CPU (--smoke)."""
from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_bench_smoke_end_to_end(tmp_path):
    from wanimate.bench.bench import run_bench
    try:
        import diffusers  # noqa: F401  (--compare diffusers needs it)
        compare = ("diffusers",)
    except ImportError:
        compare = ()
    lines = []
    res = run_bench(smoke=True, steps=3, reps=1, e2e_steps=1, compare=compare, quant="fp8", out=tmp_path,
                    vram_budget="16GB", log=lines.append)
    data = json.loads((tmp_path / "bench_smoke_bfloat16_fp8_budget16GB.json").read_text())
    assert data["summary"] == res["summary"]
    stages = [r["stage"] for r in data["rows"]]
    for want in ("T5", "CLIP", "VAE encode", "VAE decode", "DiT prepare", "DiT step (bf16)", "segment, 3 steps",
                 "generate(), 1 segment, 1 steps (measured)", "diffusers DiT step", "diffusers VAE decode",
                 "speedup vs diffusers"):
        assert any(s.startswith(want) for s in stages), (want, stages)
    rows = {r["stage"]: r for r in data["rows"]}
    step = next(r for s, r in rows.items() if s.startswith("DiT step (bf16)"))
    enc = next(r for s, r in rows.items() if s.startswith("VAE encode"))
    dec = next(r for s, r in rows.items() if s.startswith("VAE decode"))
    prep = next(r for s, r in rows.items() if s.startswith("DiT prepare"))
    seg = next(r for s, r in rows.items() if s.startswith("segment, 3 steps"))
    assert seg["seconds"] == pytest.approx(2 * enc["seconds"] + prep["seconds"] + 3 * step["seconds"] + dec["seconds"])
    assert step["flops"]["gemm"] > 0 and step["flops"]["attention"] >= 0 and enc["flops"]["conv"] > 0
    assert 0 < step["ceiling_pct"] and data["summary"]["gpu_s_per_video_s"] > 0
    e2e = rows["generate(), 1 segment, 1 steps (measured)"]
    assert e2e["seconds"] > 0 and 0.2 < e2e["seconds"] / e2e["estimate_s"] < 5
    assert data["plan"]["resident_blocks"] == 5 and data["config"]["vram_budget"] == "16GB"
    assert any("not enforced on the CPU" in n for n in data["notes"])
    # quant/ is written on another branch: without it the fp8 rows are skipped with a note.
    from wanimate.engine.offload import quant_available
    assert quant_available() or any("wanimate.quant" in n for n in data["notes"])
    if compare:
        assert data["summary"]["speedup_vs_diffusers"] > 0
    assert (tmp_path / "bench_smoke_bfloat16_fp8_budget16GB.png").stat().st_size > 10_000
    assert any("segment_s" in line for line in lines)


def test_bench_rejects_bad_options(tmp_path):
    from wanimate.bench.bench import run_bench
    from wanimate.engine.errors import ValidationError
    with pytest.raises(ValidationError, match="compare"):
        run_bench(smoke=True, compare=("comfy",), out=tmp_path, log=lambda s: None)
    with pytest.raises(ValidationError, match="dtype"):
        run_bench(smoke=True, dtype="int4", out=tmp_path, log=lambda s: None)


@pytest.mark.slow
def test_vram_matrix_smoke(tmp_path):
    from wanimate.bench.vram_matrix import main
    out = main(["--smoke", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "vram_matrix_smoke.json").read_text())
    rows = data["rows"]
    assert [r["status"] for r in rows if r["status"] != "ok"] == []
    dit = [r for r in rows if r["kind"] == "dit"]
    assert all(r["bitwise_equal"] for r in dit)
    bf16 = [r for r in dit if "fp8" not in r["name"]]            # fp8 rows join when quant/ is present
    assert len(bf16) == 7 and {r["resident_blocks"] for r in bf16} == {5, 3, 1}
    assert any(r["transport"] == "same-stream" for r in dit)
    decodes = [r for r in rows if r["kind"] == "vae" and r["name"].startswith("decode") and not r["tiled"]]
    assert sorted({r["frames_out"] for r in decodes}) == [5, 13]
    pipe = [r for r in rows if r["kind"] == "pipeline"]
    assert len(pipe) in (1, 2) and all(r["generate_s"] > 0 and "offloaded" in r["placement"] for r in pipe)
    assert out["total_s"] > 0 and ("fp8" in data or any(r["name"].startswith("fp8") for r in rows))


def _load_profile_dit():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "bench" / "profile_dit.py"
    spec = importlib.util.spec_from_file_location("wanimate_bench_profile_dit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path


def test_profile_dit_categories_on_real_kernel_names():
    """Kernel names as an H200 profile prints them (bench/results/profile_dit_480p_h200.log)."""
    profile, _ = _load_profile_dit()
    names = {
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_cga1x1x1_kernel0_0": "attention",
        "nvjet_sm90_tst_192x208_64x4_2x1_v_bz_coopB_gelubias_TNT": "gemm",
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64": "conv",
        "void at::native::(anonymous namespace)::conv_depthwise2d_forward_kernel_generic<c10::BFloat16, int>": "conv",
        "_layer_norm_row_kernel": "triton (wanimate)",
        "_blur_rows_kernel": "triton (wanimate)",
        "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)": "copy",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float, false>": "elementwise/reduce",
        "void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16>": "other",
    }
    assert {n: profile.category(n) for n in names} == names


@pytest.mark.slow
def test_profile_dit_smoke(tmp_path):
    import subprocess
    import sys
    _, path = _load_profile_dit()
    out = tmp_path / "p.json"
    run = subprocess.run([sys.executable, str(path), "--smoke", "--rows", "reference,kernels", "--top", "5",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = json.loads(out.read_text())["profiles"]
    assert [r["row"] for r in rows] == ["wanimate reference 480p", "wanimate kernels 480p"]
    for r in rows:
        assert sum(r["categories_ms"].values()) == pytest.approx(r["kernel_ms"], rel=1e-2, abs=0.05)
        assert len(r["top"]) == 5 and [k["ms"] for k in r["top"]] == sorted((k["ms"] for k in r["top"]), reverse=True)
    # the kernels row runs the fused ops (CPU: their op names; the interpreter makes them the slowest)
    assert any(k["kernel"].startswith("wanimate::") for k in rows[1]["top"])
    assert not any(k["kernel"].startswith("wanimate::") for k in rows[0]["top"])
