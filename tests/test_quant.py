"""Quantization schemes: kernels bit-exact against their references, the CPU emulation against
torch's own kernels where the CPU build has them, error bounds against the float layer, the layer
policy, module swaps on real and meta modules."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn as nn

if not torch.cuda.is_available():
    # Triton decides between compiling and interpreting when a kernel is defined (at import).
    os.environ["TRITON_INTERPRET"] = "1"

from wanimate.engine.config import DiTConfig
from wanimate.engine.errors import ValidationError
from wanimate.engine.loader import build_dit, recipe_dit
from wanimate.quant import (DEFAULT_KEEP, QuantConfig, available_schemes, convert_for_runtime,
                            create_quantized_state_dict, get_scheme, quantize_, quantized_modules, select_linears,
                            weight_bytes)
from wanimate.quant.act import int8_epilogue_ref, per_token_quant_ref
from wanimate.quant.fp8 import Fp8Linear, fp8_linear_torch_scaled_mm, quantize_fp8_weight
from wanimate.quant.int8 import int_matmul, quantize_int8_weight
from wanimate.quant.nf4 import NF4_LEVELS, nf4_dequantize_ref, nf4_quantize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CFG = DiTConfig(dim=64, ffn_dim=96, num_heads=2, num_layers=5, text_dim=32, image_dim=32, motion_size=16,
                motion_width=32, motion_encoder_dim=32, face_hidden=48)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---- kernels ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("shape", [(7, 64), (5, 769), (3, 5120)])
def test_per_token_quant_kernel_bit_exact(dtype, int8, shape):
    pytest.importorskip("triton")
    from wanimate.kernels import quant_act
    g = torch.Generator().manual_seed(shape[1])
    x = torch.randn(shape, generator=g) * torch.logspace(-6, 4, shape[0])[:, None]
    x[0, :3] = torch.tensor([124.5, -0.0, 3e-9])          # carry across a binade, -0, e4m3 subnormal
    x[1] = 0                                               # a zero row (padded text) stays finite
    x[-1, 1] = 60 * x[-1].abs().max()                     # an outlier sets the row scale
    x = x.to(dtype).to(DEVICE)
    assert quant_act.kernel_ok(x)
    q, s = torch.ops.wanimate.per_token_quant(x, int8)
    q_ref, s_ref = per_token_quant_ref(x, int8)
    assert torch.equal(_bits(q), _bits(q_ref)) and torch.equal(s, s_ref)
    assert torch.equal(q[1].float(), torch.zeros(shape[1], device=DEVICE))


@pytest.mark.parametrize("rows,num_warps,early_f32", [(None, None, False), (4, 4, False), (2, 8, True)])
def test_per_token_quant_kernel_settings_bit_exact(rows, num_warps, early_f32):
    """Every launch setting the benchmark sweeps gives the reference's bits, including a row count
    that does not divide M (masked rows) and a K that is not a power of two."""
    pytest.importorskip("triton")
    from wanimate.kernels import quant_act
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(7, 320, generator=g) * torch.logspace(-4, 3, 7)[:, None]).to(torch.bfloat16).to(DEVICE)
    for int8 in (False, True):
        q, s = quant_act.per_token_quant_triton(x, int8, rows=rows, num_warps=num_warps, early_f32=early_f32)
        q_ref, s_ref = per_token_quant_ref(x, int8)
        assert torch.equal(_bits(q), _bits(q_ref)) and torch.equal(s, s_ref)


@pytest.mark.parametrize("chunk,num_warps", [(None, None), (256, 2), (128, 4)])
@pytest.mark.parametrize("gelu", [False, True])
def test_per_token_quant_chunk_kernel_matches_row_kernel(chunk, num_warps, gelu):
    """The two-pass chunked kernel against the whole-row kernel (itself pinned to the reference
    above): same bits, with a K that leaves a masked last chunk, several chunks, and the fused GELU."""
    pytest.importorskip("triton")
    from wanimate.kernels import quant_act
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(5, 700, generator=g) * torch.logspace(-3, 3, 5)[:, None]).to(torch.bfloat16).to(DEVICE)
    x[2] = 0
    x[3, 699] = 50 * x[3].abs().max()                     # the outlier sits in the masked last chunk
    for int8 in (False, True):
        q, s = quant_act.per_token_quant_triton(x, int8, gelu=gelu, variant="chunk", chunk=chunk, num_warps=num_warps)
        q_row, s_row = quant_act.per_token_quant_triton(x, int8, gelu=gelu, variant="row")
        assert torch.equal(_bits(q), _bits(q_row)) and torch.equal(s, s_row)
        if not gelu:
            q_ref, s_ref = per_token_quant_ref(x, int8)
            assert torch.equal(_bits(q), _bits(q_ref)) and torch.equal(s, s_ref)
    with pytest.raises(ValueError, match="variant"):
        quant_act.per_token_quant_triton(x, False, variant="tiles")


def test_launch_config_covers_rows_and_short_rows():
    pytest.importorskip("triton")
    from wanimate.kernels import quant_act
    assert quant_act.launch_config(5120) == {"BLOCK": 8192, "ROWS": 1, "num_warps": 8}
    assert quant_act.launch_config(13824)["BLOCK"] == 16384
    small = quant_act.launch_config(64)
    assert small["BLOCK"] * small["ROWS"] == 1024 and small["ROWS"] == 16


@pytest.mark.parametrize("int8", [False, True])
def test_gelu_per_token_quant_matches_unfused(int8):
    """The fused GELU(tanh) + quant against quant(gelu(x)) in bf16: the GELU rounding to bf16 may
    differ by one bf16 ulp on a few values (tanh implementations), so codes agree up to one step
    on those and the dequantized values stay within bf16 + grid precision."""
    pytest.importorskip("triton")
    from wanimate.kernels import quant_act
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(6, 1000, generator=g) * 4).to(torch.bfloat16).to(DEVICE)
    x[0, :4] = torch.tensor([-30.0, 30.0, 0.0, -0.0])    # tails: gelu -> -0/0 and x
    q, s = torch.ops.wanimate.gelu_per_token_quant(x, int8)
    q_ref, s_ref = per_token_quant_ref(quant_act.gelu_tanh_ref(x), int8)
    torch.testing.assert_close(s, s_ref, rtol=1e-2, atol=0)
    same = (_bits(q) == _bits(q_ref)).float().mean().item()
    assert same > 0.99, same
    deq, deq_ref = q.float() * s, q_ref.float() * s_ref
    assert _rel(deq, deq_ref) < 0.01
    gelu_ref = quant_act.gelu_tanh_ref(x).float()
    assert _rel(deq, gelu_ref) < (0.03 if int8 else 0.05)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_epilogue_kernel_bit_exact(out_dtype, with_bias):
    pytest.importorskip("triton")
    from wanimate.kernels import int8_epilogue as epi
    g = torch.Generator().manual_seed(3)
    acc = torch.randint(-2**30, 2**30, (45, 130), generator=g, dtype=torch.int32).to(DEVICE)
    sa, sb = torch.rand(45, 1, generator=g).to(DEVICE) * 1e-3, torch.rand(130, generator=g).to(DEVICE) * 1e-3
    bias = torch.randn(130, generator=g).to(torch.bfloat16).to(DEVICE) if with_bias else None
    assert epi.kernel_ok(acc)
    got = torch.ops.wanimate.int8_epilogue(acc, sa, sb, bias, out_dtype)
    assert torch.equal(got, int8_epilogue_ref(acc, sa, sb, bias, out_dtype))


# ---- references -------------------------------------------------------------------------------


def test_per_token_quant_ref_error_bounds():
    x = torch.randn(32, 256, generator=torch.Generator().manual_seed(0)) * 3
    for int8, bound in ((False, 2 ** -4), (True, 0.5 / 127)):
        q, s = per_token_quant_ref(x, int8)
        err = (q.float() * s - x).abs()
        amax = x.abs().amax(-1, keepdim=True)
        if int8:     # absolute: half a level of amax / 127
            assert bool((err <= bound * amax * (1 + 1e-6)).all())
        else:        # relative for normal e4m3 values: half an ulp of 3 mantissa bits
            normal = (x.abs() / s) >= 2 ** -6
            assert bool((err[normal] <= bound * x.abs()[normal] * (1 + 1e-6)).all())
        assert float(err.max()) > 0


def test_int_matmul_exact():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-127, 128, (5, 5120), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (5120, 24), generator=g, dtype=torch.int8)
    assert torch.equal(int_matmul(a, b), (a.double() @ b.double()).to(torch.int32))


def test_fp8_emulation_matches_torch_scaled_mm():
    """The emulation computes what torch._scaled_mm computes (scale placement, bias, one rounding)."""
    lin = nn.Linear(64, 48).to(torch.bfloat16)
    mod = Fp8Linear.from_linear(lin, QuantConfig("fp8", kernel="reference"))
    x = torch.randn(9, 64, dtype=torch.bfloat16)
    try:
        want = fp8_linear_torch_scaled_mm(x, mod)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"this torch build has no CPU _scaled_mm ({e})")
    got = mod(x)
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-3)   # one bf16 ulp of fp32 order


def test_nf4_levels_and_layout_match_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.backends.utils import _NF4_QUANT_TABLE
    assert torch.equal(torch.tensor(NF4_LEVELS), _NF4_QUANT_TABLE.cpu())
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(4))
    packed, absmax = nf4_quantize(w, 64)
    ours = nf4_dequantize_ref(packed, absmax, 64, (48, 128), torch.float32)
    theirs = torch.ops.bitsandbytes.dequantize_4bit.default(packed, absmax, 64, "nf4", [48, 128], torch.float32)
    assert torch.equal(ours, theirs)
    q_bnb, absmax_bnb = torch.ops.bitsandbytes.quantize_4bit.default(w, 64, "nf4", torch.uint8)
    assert torch.equal(absmax, absmax_bnb)
    assert float((q_bnb.reshape(-1) == packed).float().mean()) > 0.999    # bnb multiplies by 1/absmax
    del bnb


@pytest.mark.parametrize("quant", [quantize_fp8_weight, quantize_int8_weight])
def test_weight_quant_is_per_output_channel(quant):
    w = torch.randn(16, 64) * torch.logspace(-3, 3, 16)[:, None]      # rows 6 decades apart
    q, s = quant(w)
    deq = q.float() * s[:, None]
    rel_rows = (deq - w).norm(dim=1) / w.norm(dim=1)
    assert float(rel_rows.max()) < 0.05 and s.shape == (16,)


# ---- modules ------------------------------------------------------------------------------------

# Per-layer rel L2 of one random Linear (K=256): e4m3 has 3 mantissa bits (~3.5% for weights and
# activations both), int8 per-token ~1%, int8 weight-only ~0.7%, nf4 ~9%.
BOUNDS = {"fp8": (0.01, 0.06), "int8": (0.002, 0.02), "int8_wo": (0.001, 0.015), "int8_wo_cs": (0.001, 0.015),
          "nf4": (0.03, 0.15)}


@pytest.mark.parametrize("scheme", sorted(BOUNDS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_scheme_error_against_float(scheme, dtype):
    torch.manual_seed(0)
    lin = nn.Linear(256, 128).to(dtype)
    x = torch.randn(2, 33, 256, dtype=dtype)
    mod = get_scheme(scheme).from_linear(lin, QuantConfig(scheme))
    with torch.no_grad():
        got, want = mod(x), lin(x)
    assert got.shape == want.shape and got.dtype == dtype
    low, high = BOUNDS[scheme]
    assert low < _rel(got, want) < high
    w = lin.weight.detach().float()
    torch.testing.assert_close(mod.dequantize(), w, rtol=0, atol=float(w.abs().max()) * 0.2)


@pytest.mark.parametrize("scheme", sorted(BOUNDS))
def test_meta_swap_then_assign_equals_from_linear(scheme):
    lin = nn.Linear(128, 64).to(torch.bfloat16)
    cfg = QuantConfig(scheme)
    direct = get_scheme(scheme).from_linear(lin, cfg)
    holder = nn.Sequential(nn.Linear(128, 64, device="meta"))
    convert_for_runtime(holder, cfg, ["0"])
    empty = holder[0]
    assert all(t.is_meta for t in empty.state_dict().values())
    empty.load_quantized({k: v for k, v in direct.state_dict().items() if k != "bias"})
    empty.bias = direct.bias
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    assert torch.equal(empty(x), direct(x))
    with pytest.raises(ValidationError, match="expected"):
        empty.load_quantized({"weight": torch.zeros(3, dtype=torch.uint8)})


def test_int8_wo_cs_keeps_small_columns():
    """A weight column 50x smaller than the rest (the consumer of an activation outlier channel)
    fed 50x larger inputs: per-row int8 rounds it to a few levels, the column scale keeps it."""
    from wanimate.quant.int8 import quantize_int8_weight_cols
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(256, 64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(64, 256, generator=g))
        lin.weight[:, :4] /= 50
    x = torch.randn(32, 256, generator=g)
    x[:, :4] *= 50
    plain = get_scheme("int8_wo").from_linear(lin, QuantConfig("int8_wo"))
    cs = get_scheme("int8_wo_cs").from_linear(lin, QuantConfig("int8_wo_cs"))
    with torch.no_grad():
        want = lin(x)
        e_plain, e_cs = _rel(plain(x), want), _rel(cs(x), want)
    assert e_cs < e_plain / 3, (e_cs, e_plain)
    q, row, col = quantize_int8_weight_cols(lin.weight)
    assert q.dtype == torch.int8 and row.shape == (64,) and col.shape == (256,)
    assert (q.abs().amax(dim=0) >= 60).all()           # every column uses a good part of the int8 range
    assert cs.stored_bytes() == plain.stored_bytes() + 256 * 4


@pytest.mark.parametrize("scheme", ["int8_wo", "int8_wo_cs"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_weight_only_dequant_kernel_bit_exact(scheme, dtype):
    """The weight-only layers dequantize through the INT8 epilogue kernel (int8 input, row and
    column scales): the same bits as the eager dequantize() rounded to the activation dtype."""
    pytest.importorskip("triton")
    from wanimate.kernels import int8_epilogue as epi
    lin = nn.Linear(96, 40).to(dtype)
    mod = get_scheme(scheme).from_linear(lin, QuantConfig(scheme)).to(DEVICE)
    assert epi.kernel_ok(mod.weight)
    x = torch.randn(5, 96, dtype=dtype, device=DEVICE)
    want = torch.nn.functional.linear(x, mod.dequantize().to(dtype), mod.bias.to(dtype))
    with torch.no_grad():
        assert torch.equal(mod(x), want)


def test_extra_repr_shows_settings():
    mod = get_scheme("fp8").from_linear(nn.Linear(32, 16), QuantConfig("fp8", fast_accum=False))
    text = repr(mod)
    assert "scheme=fp8" in text and "fast_accum=False" in text and "per-token" in text and "in_features=32" in text


# ---- policy and quantize_ -----------------------------------------------------------------------


def test_policy_never_touches_fp32_islands_and_follows_keep():
    model = build_dit(CFG)
    every = set(select_linears(model, QuantConfig("fp8", keep=())))
    assert not any(n.startswith(("time_embedding", "time_projection", "head")) for n in every)
    assert "blocks.0.self_attn.q" in every and "face_adapter.fuser_blocks.0.linear2" in every
    default = set(select_linears(model, QuantConfig("fp8")))
    assert default == {n for n in every if not n.startswith(("text_embedding", "img_emb", "face_encoder"))}
    assert DEFAULT_KEEP
    edges = set(select_linears(model, QuantConfig("fp8", keep_edge_blocks=1)))
    assert {n.split(".")[1] for n in edges if n.startswith("blocks.")} == {"1", "2", "3"}
    assert "face_adapter.fuser_blocks.0.linear2" in edges          # face blocks are not transformer blocks
    only_ffn = select_linears(model, QuantConfig("fp8"), filter_fn=lambda m, n: n.endswith("ffn.0"))
    assert only_ffn == [f"blocks.{i}.ffn.0" for i in range(5)]
    # 12 linears per block (4 self, 6 cross, 2 FFN)
    assert len([n for n in default if n.startswith("blocks.0.")]) == 12


def test_config_validation_and_json_roundtrip():
    with pytest.raises(ValidationError, match="unknown quantization scheme"):
        QuantConfig("fp4")
    with pytest.raises(ValidationError, match="kernel"):
        QuantConfig("fp8", kernel="fast")
    cfg = QuantConfig("int8", keep=("a.*",), keep_edge_blocks=2)
    assert QuantConfig.from_json(cfg.to_json()) == cfg
    # overrides: activation-quantizing schemes put the context projections and the face adapter on
    # int8 weight-only; weight-only schemes have none; a scheme change takes the new default
    fp8 = QuantConfig("fp8")
    assert fp8.scheme_for("blocks.7.cross_attn.v_img") == "int8_wo_cs"
    assert fp8.scheme_for("blocks.7.cross_attn.q") == fp8.scheme_for("blocks.7.cross_attn.o") == "int8_wo_cs"
    # the default policy (P6, measured): self-attn o and the FFN down projection on int8_wo_cs too
    assert fp8.scheme_for("blocks.7.self_attn.o") == "int8_wo_cs" and fp8.scheme_for("blocks.7.self_attn.q") == "fp8"
    assert fp8.scheme_for("blocks.7.ffn.0") == "fp8" and fp8.scheme_for("blocks.7.ffn.2") == "int8_wo_cs"
    assert fp8.scheme_for("face_adapter.fuser_blocks.2.linear1_kv") == "int8_wo_cs"
    assert QuantConfig("nf4").overrides == () and fp8.replace(scheme="nf4").overrides == ()
    assert QuantConfig("fp8", overrides=()).scheme_for("blocks.0.cross_attn.k") == "fp8"
    with pytest.raises(ValidationError, match="override scheme"):
        QuantConfig("fp8", overrides=(("blocks.*", "int4"),))
    assert set(available_schemes()) >= {"fp8", "int8", "int8_wo", "nf4"}


@pytest.mark.parametrize("scheme", ["fp8", "int8", "int8_wo", "nf4"])
def test_quantize_model_runs_and_stays_close(scheme):
    # kernel="reference": under TRITON_INTERPRET=1 the kernels would run interpreted (minutes); the
    # kernels are checked bit-exact against these references above.
    from wanimate.quant.report import dit_inputs, dit_runner
    model = recipe_dit(CFG, 11, dtype=torch.bfloat16)
    run = dit_runner(dit_inputs(CFG, hw=(4, 6), text_rows=5))
    with torch.no_grad():
        ref = run(model)
        bytes_before = weight_bytes(model)
        names = quantize_(model, QuantConfig(scheme, kernel="reference"))
        got = run(model)
    assert set(quantized_modules(model)) == set(names) and len(names) == 63
    assert weight_bytes(model) < bytes_before
    assert torch.isfinite(got).all()
    assert 1e-4 < _rel(got, ref) < {"fp8": 0.1, "int8": 0.05, "int8_wo": 0.05, "nf4": 0.2}[scheme]
    assert model.dtype == torch.bfloat16            # the compute dtype (patch_embedding) is untouched


def test_ffn_gelu_folded_into_fp8_down_projection():
    """quantize_ folds the FFN's GELU into the FP8 down-projection: same state dict, same output
    (the reference path computes the same GELU), and the fused quantizer agrees with GELU + quant."""
    from wanimate.quant.act import quantize_activations
    from wanimate.quant.report import dit_inputs, dit_runner
    from wanimate.quant.config import CONTEXT_OVERRIDES
    run = dit_runner(dit_inputs(CFG, hw=(4, 6), text_rows=5))
    fused, plain = recipe_dit(CFG, 11, dtype=torch.bfloat16), recipe_dit(CFG, 11, dtype=torch.bfloat16)
    with torch.no_grad():       # a policy with the down projection on fp8 (the default keeps it int8_wo_cs)
        quantize_(fused, QuantConfig("fp8", kernel="reference", overrides=CONTEXT_OVERRIDES, fuse_gelu=True))
        quantize_(plain, QuantConfig("fp8", kernel="reference", overrides=CONTEXT_OVERRIDES))
        assert torch.equal(run(fused), run(plain))
    assert fused.state_dict().keys() == plain.state_dict().keys()
    for block_f, block_p in zip(fused.blocks, plain.blocks):
        assert isinstance(block_f.ffn[1], nn.Identity) and block_f.ffn[2].gelu_input
        assert isinstance(block_p.ffn[1], nn.GELU) and not block_p.ffn[2].gelu_input
    assert "gelu_tanh" in repr(fused.blocks[0].ffn[2])
    assert not QuantConfig.from_json('{"scheme": "fp8"}').fuse_gelu  # configs saved before the flag
    # int8_wo down-projections are left alone
    wo = recipe_dit(CFG, 11, dtype=torch.bfloat16)
    quantize_(wo, QuantConfig("int8_wo"))
    assert isinstance(wo.blocks[0].ffn[1], nn.GELU)
    if importlib.util.find_spec("triton") is not None:
        x = (torch.randn(9, 96, generator=torch.Generator().manual_seed(2)) * 3).to(torch.bfloat16).to(DEVICE)
        q, s = quantize_activations(x, False, kernel="auto", gelu=True)
        q_ref, s_ref = quantize_activations(x, False, kernel="reference", gelu=True)
        assert (_bits(q) == _bits(q_ref)).float().mean() > 0.99
        torch.testing.assert_close(s, s_ref, rtol=1e-2, atol=0)


def test_quantize_requires_loaded_weights_and_create_state_dict():
    with pytest.raises(ValidationError, match="meta"):
        quantize_(build_dit(CFG), QuantConfig("fp8"))
    model = recipe_dit(CFG, 2, dtype=torch.bfloat16)
    names = select_linears(model, QuantConfig("int8"))
    sd = create_quantized_state_dict(dict(model.state_dict()), QuantConfig("int8"), names)
    assert sd["blocks.0.ffn.0.weight"].dtype == torch.int8 and sd["blocks.0.ffn.0.weight_scale"].shape == (CFG.ffn_dim,)
    assert sd["text_embedding.0.weight"].dtype == torch.bfloat16
    quantize_(model, QuantConfig("int8"))
    assert set(sd) == set(model.state_dict())
