"""Accuracy tooling: errors are measured against the float model and the float model is restored;
outlier injection keeps the float function while making per-token INT8 fail, as it should."""
from __future__ import annotations

import torch

from wanimate.engine.config import DiTConfig
from wanimate.engine.loader import recipe_dit
from wanimate.quant import QuantConfig
from wanimate.quant.registry import QuantLinear
from wanimate.quant.report import (accuracy_report, dit_inputs, dit_runner, inject_outliers, measure_exemptions,
                                   quantization_error, random_dit, rel_l2)

CFG = DiTConfig(dim=64, ffn_dim=96, num_heads=2, num_layers=5, text_dim=32, image_dim=32, motion_size=16,
                motion_width=32, motion_encoder_dim=32, face_hidden=48)


def test_quantization_error_restores_the_float_model_and_reports_layers():
    model = recipe_dit(CFG, 1, dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run = dit_runner(dit_inputs(CFG, hw=(4, 4), text_rows=3))
    err = quantization_error(model, QuantConfig("fp8", kernel="reference"), run)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(err.layers) == set(err.names) and len(err.names) == 63      # default policy: embeddings kept
    assert all(0.01 < e < 0.1 for n, e in err.layers.items() if QuantConfig("fp8").scheme_for(n) == "fp8")  # e4m3: ~3.5%
    assert all(0.001 < e < 0.02 for n, e in err.layers.items() if QuantConfig("fp8").scheme_for(n) == "int8_wo_cs")
    assert 0.001 < err.output_rel_l2 < 0.2


def test_outliers_keep_the_float_function_and_break_int8_activations():
    model = random_dit(CFG, seed=3)
    x = dit_inputs(CFG, hw=(4, 4), text_rows=3)
    run = dit_runner(x)
    with torch.no_grad():
        clean = run(model)
        inject_outliers(model, channels=4)
        planted = run(model)
    assert rel_l2(planted, clean) < 0.05                        # compensated: nearly the same function
    lin = model.blocks[0].ffn[0]
    w = lin.weight.float()
    col = w.abs().amax(0)
    assert float(col.max() / col.min()) > 10                    # consuming columns shrank by 20-100x
    cfg = QuantConfig("int8", kernel="reference")
    int8 = quantization_error(model, cfg, run)
    fp8 = quantization_error(model, cfg.replace(scheme="fp8"), run)
    assert int8.layers["blocks.0.ffn.0"] > 3 * fp8.layers["blocks.0.ffn.0"]   # no exponent: the small channels vanish


def test_accuracy_report_and_exemptions_tables():
    model = recipe_dit(CFG, 2, dtype=torch.bfloat16)
    x = dit_inputs(CFG, hw=(4, 4), text_rows=3)
    rep = accuracy_report(model, ("fp8", "int8_wo"), inputs=x, config=QuantConfig("fp8", kernel="reference"), label="t")
    assert "== DiT output" in rep.table and "ffn.0" in rep.table
    for s in ("fp8", "int8_wo"):
        d = rep.data["schemes"][s]
        assert d["output_rel_l2"] > 0 and d["layer_kinds"]["ffn.0"]["n"] == 5
    assert rep.data["schemes"]["fp8"]["output_rel_l2"] > rep.data["schemes"]["int8_wo"]["output_rel_l2"]
    ex = measure_exemptions(model, ("fp8",), inputs=x, label="t")
    res = ex.data["results"]
    assert res["all"]["linear_weight_share"] > res["default policy"]["linear_weight_share"] > 0
    assert res["only ffn"]["fp8"] < res["all"]["fp8"]
