"""bench/quant.py runs end to end on the CPU (--smoke): every part produces rows without errors."""
from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    # The sage and quantizer kernels run under the interpreter here; Triton decides at kernel definition.
    os.environ["TRITON_INTERPRET"] = "1"

from wanimate.bench import quant as bench


@pytest.mark.slow
def test_bench_quant_smoke(tmp_path):
    out = tmp_path / "q.json"
    res = bench.main(["--smoke", "--out", str(out), "--sizes", "480p", "--schemes", "bf16,fp8,int8,int8_wo,nf4,fp8+edge1,fp8/no_triton,fp8+sage"])
    saved = json.loads(out.read_text())
    assert saved["summary"] == res["summary"]
    for part in ("checks", "gemm", "dit"):
        assert res[part] and not [r for r in res[part] if "error" in r], [r for r in res[part] if "error" in r]
    assert all(r["mismatched_values"] == 0 for r in res["checks"] if "mismatched_values" in r)
    denoise = {r["scheme"]: r for r in res["dit"] if r["what"] == "denoise"}
    assert set(denoise) == {"bf16", "fp8", "int8", "int8_wo", "nf4", "fp8+edge1", "fp8/no_triton", "fp8+sage"}
    assert "target_fp8+sage_speedup_480p" in res["summary"] and "fp8+sage_480p_rel_l2" in res["summary"]
    # the activation-quantizer sweep runs where the kernel does (interpreter here) and stays bit-exact
    assert all(r["bit_exact"] in (True, None) for r in res["actquant"])
    assert all(r["finite"] for r in denoise.values())
    assert 0 < denoise["fp8"]["rel_l2_vs_bf16"] < 0.2
    built = {r["scheme"]: r for r in res["dit"] if r["what"] == "build + quantize"}
    assert built["fp8"]["quantized_linears"] > built["fp8+edge1"]["quantized_linears"] > 0 == built["bf16"]["quantized_linears"]
    assert "target_fp8_weight_gb" in res["summary"]
    assert torch.get_num_threads() >= 1
