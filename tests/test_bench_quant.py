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


def test_policy_presets_and_expansion():
    from wanimate.engine.errors import ValidationError
    from wanimate.quant import QuantConfig
    from wanimate.quant.config import policy_config
    assert policy_config("P6") == QuantConfig("fp8")              # P6 is the default
    assert policy_config("P0").scheme_for("blocks.3.ffn.2") == "fp8"
    p4 = policy_config("P4", kernel="reference")
    assert p4.kernel == "reference"
    assert [p4.scheme_for(f"blocks.3.{n}") for n in ("ffn.0", "ffn.2", "self_attn.o", "self_attn.q", "cross_attn.q")] == \
        ["int8_wo_cs", "int8_wo_cs", "int8_wo_cs", "fp8", "int8_wo_cs"]
    assert {policy_config("P3").scheme_for(f"blocks.0.self_attn.{n}") for n in "qkvo"} == {"int8_wo_cs"}
    assert policy_config("P5").keep_edge_blocks == 1
    with pytest.raises(ValidationError):
        policy_config("P9")
    assert bench.expand_policies(["bf16", "fp8+sage", "nf4"], ["P6", "P1"]) == ["bf16", "fp8+sage", "fp8+sage[P1]", "nf4"]
    assert bench._split_policy("fp8/no_triton+sage[P2]") == ("fp8/no_triton+sage", "P2")
    with pytest.raises(SystemExit):
        bench.expand_policies(["fp8"], ["P9"])


@pytest.mark.slow
def test_bench_quant_policy_rows(tmp_path):
    """A policy row quantizes what its preset says, runs the kernels path, and is compared with bf16."""
    res = bench.main(["--smoke", "--out", str(tmp_path / "q.json"), "--sizes", "480p", "--parts", "dit",
                      "--schemes", "bf16,fp8", "--policies", "P0,P3", "--with-kernels"])
    assert not [r for r in res["dit"] if "error" in r]
    built = {r["scheme"]: r for r in res["dit"] if r["what"] == "build + quantize"}
    n = 5                                                          # blocks of the smoke DiT
    assert built["fp8[P3]"]["quantized_linears"] == built["fp8"]["quantized_linears"]
    # the 4 self-attention linears per block moved from fp8 to int8_wo_cs; int8_wo_cs q/k/v stay separate
    assert built["fp8[P3]"]["schemes"]["fp8"] == 2 * n                # only the FFN is left on fp8
    assert built["fp8"]["qkv_fused_blocks"] == f"{n}/{n}" and built["fp8[P3]"]["qkv_fused_blocks"] == f"0/{n}"
    assert "int8_wo_cs" in built["fp8[P3]"]["qkv_not_fused_because"]
    row = res["summary"]["policy_fp8[P3]_480p"]
    assert 0 < row["rel_l2"] < 0.2 and row["weight_gb"] >= 0
    assert "policy_fp8[P0]_480p" in res["summary"]
