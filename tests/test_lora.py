"""LoRA merging: every published key format maps to the right parameter, the merge is exact in fp32
and rounded once, unknown keys fail loudly, and merging into quantized modules requantizes."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import DATA
from wanimate.engine.config import DiTConfig
from wanimate.engine.errors import CheckpointError
from wanimate.engine.loader import build_dit, recipe_dit
from wanimate.engine.lora import load_lora_file, merge_lora, parse_lora
from wanimate.engine.safetensors_io import save_file
from wanimate.quant import QuantConfig, quantize_

CFG = DiTConfig(dim=64, ffn_dim=96, num_heads=2, num_layers=5, text_dim=32, image_dim=32, motion_size=16,
                motion_width=32, motion_encoder_dim=32, face_hidden=48)
TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k", "cross_attn.v",
           "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2")


def _peft_lora(model, rank=4, prefix="", seed=0, blocks=(0, 3)):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in blocks:
        for t in TARGETS:
            lin = model.get_submodule(f"blocks.{i}.{t}")
            out[f"{prefix}blocks.{i}.{t}.lora_A.weight"] = torch.randn(rank, lin.in_features, generator=g) * 0.1
            out[f"{prefix}blocks.{i}.{t}.lora_B.weight"] = torch.randn(lin.out_features, rank, generator=g) * 0.1
    return out


def _manual(state, lora, key_of, scale):
    """W + scale * B @ A in float64 for each targeted weight (independent of engine/lora.py)."""
    out = dict(state)
    for a_key in [k for k in lora if k.endswith(("lora_A.weight", "lora_down.weight"))]:
        b_key = a_key.replace("lora_A", "lora_B").replace("lora_down", "lora_up")
        name = key_of(a_key)
        out[name] = (state[name].double() + scale * lora[b_key].double() @ lora[a_key].double()).to(state[name].dtype)
    return out


@pytest.mark.parametrize("prefix", ["", "diffusion_model.", "base_model.model.", "model.diffusion_model."])
def test_peft_merge_exact_in_fp32_rounded_once(prefix):
    model = recipe_dit(CFG, 5, dtype=torch.bfloat16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    lora = _peft_lora(model, prefix=prefix)
    merged = merge_lora(state, lora, scale=0.75)
    strip = lambda k: k[len(prefix):].replace(".lora_A.weight", ".weight")
    want = _manual(state, lora, strip, 0.75)
    changed = [k for k in state if not torch.equal(merged[k], state[k])]
    assert sorted(changed) == sorted({strip(k) for k in lora if "lora_A" in k})
    for k in changed:
        assert merged[k].dtype == torch.bfloat16
        # the fp64 sum rounded once to bf16 equals the fp32 sum rounded once, except at ties
        assert float((merged[k].float() - want[k].float()).abs().max()) <= float(want[k].float().abs().max()) * 2 ** -8
    merge_lora(model, lora, scale=0.75)                   # in place on a module: the same tensors
    for k in changed:
        assert torch.equal(model.state_dict()[k], merged[k])


def test_kohya_lightx2v_format_alpha_and_diffs():
    model = recipe_dit(CFG, 6)
    state = dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    lin = model.blocks[2].cross_attn.k_img
    lora = {"diffusion_model.blocks.2.cross_attn.k_img.lora_down.weight": torch.randn(8, lin.in_features, generator=g),
            "diffusion_model.blocks.2.cross_attn.k_img.lora_up.weight": torch.randn(lin.out_features, 8, generator=g),
            "diffusion_model.blocks.2.cross_attn.k_img.alpha": torch.tensor(4.0),
            "diffusion_model.blocks.2.cross_attn.k_img.diff_b": torch.randn(lin.out_features, generator=g),
            "diffusion_model.blocks.1.norm3.diff": torch.randn(CFG.dim, generator=g),
            "diffusion_model.blocks.4.diff_m": torch.randn(1, 6, CFG.dim, generator=g),
            "diffusion_model.head.head.diff_b": torch.randn(model.head.head.out_features, generator=g)}
    merged = merge_lora(state, lora)
    up, down = lora["diffusion_model.blocks.2.cross_attn.k_img.lora_up.weight"], lora["diffusion_model.blocks.2.cross_attn.k_img.lora_down.weight"]
    torch.testing.assert_close(merged["blocks.2.cross_attn.k_img.weight"], state["blocks.2.cross_attn.k_img.weight"] + 0.5 * up @ down)
    torch.testing.assert_close(merged["blocks.2.cross_attn.k_img.bias"], state["blocks.2.cross_attn.k_img.bias"] + lora["diffusion_model.blocks.2.cross_attn.k_img.diff_b"])
    torch.testing.assert_close(merged["blocks.1.norm3.weight"], state["blocks.1.norm3.weight"] + lora["diffusion_model.blocks.1.norm3.diff"])
    torch.testing.assert_close(merged["blocks.4.modulation"], state["blocks.4.modulation"] + lora["diffusion_model.blocks.4.diff_m"])
    torch.testing.assert_close(merged["head.head.bias"], state["head.head.bias"] + lora["diffusion_model.head.head.diff_b"])


def test_diffusers_and_kohya_underscore_names():
    model = recipe_dit(CFG, 7)
    state = dict(model.state_dict())
    g = torch.Generator().manual_seed(2)
    d = CFG.dim
    lora = {"transformer.blocks.1.attn1.to_out.0.lora_A.weight": torch.randn(2, d, generator=g),
            "transformer.blocks.1.attn1.to_out.0.lora_B.weight": torch.randn(d, 2, generator=g),
            "transformer.blocks.1.attn2.add_v_proj.lora_A.weight": torch.randn(2, d, generator=g),
            "transformer.blocks.1.attn2.add_v_proj.lora_B.weight": torch.randn(d, 2, generator=g),
            "transformer.face_adapter.0.to_v.lora_A.weight": torch.randn(2, d, generator=g),
            "transformer.face_adapter.0.to_v.lora_B.weight": torch.randn(d, 2, generator=g),
            "lora_unet_blocks_3_ffn_2.lora_down.weight": torch.randn(2, CFG.ffn_dim, generator=g),
            "lora_unet_blocks_3_ffn_2.lora_up.weight": torch.randn(d, 2, generator=g)}
    merged = merge_lora(state, lora)
    ab = lambda p: lora[p + ".lora_B.weight"] @ lora[p + ".lora_A.weight"]
    torch.testing.assert_close(merged["blocks.1.self_attn.o.weight"], state["blocks.1.self_attn.o.weight"] + ab("transformer.blocks.1.attn1.to_out.0"))
    torch.testing.assert_close(merged["blocks.1.cross_attn.v_img.weight"], state["blocks.1.cross_attn.v_img.weight"] + ab("transformer.blocks.1.attn2.add_v_proj"))
    kv = merged["face_adapter.fuser_blocks.0.linear1_kv.weight"]
    torch.testing.assert_close(kv[:d], state["face_adapter.fuser_blocks.0.linear1_kv.weight"][:d])      # K half untouched
    torch.testing.assert_close(kv[d:], state["face_adapter.fuser_blocks.0.linear1_kv.weight"][d:] + ab("transformer.face_adapter.0.to_v"))
    up, down = lora["lora_unet_blocks_3_ffn_2.lora_up.weight"], lora["lora_unet_blocks_3_ffn_2.lora_down.weight"]
    torch.testing.assert_close(merged["blocks.3.ffn.2.weight"], state["blocks.3.ffn.2.weight"] + up @ down)


def test_unknown_keys_and_broken_pairs_fail_loudly():
    names = build_dit(CFG).state_dict().keys()
    with pytest.raises(CheckpointError, match="match no DiT parameter.*blocks.0.self_attn.qq"):
        parse_lora({"blocks.0.self_attn.qq.lora_A.weight": torch.zeros(2, 64),
                    "blocks.0.self_attn.qq.lora_B.weight": torch.zeros(64, 2)}, names, CFG)
    with pytest.raises(CheckpointError, match="match no DiT parameter"):
        parse_lora({"unet.down_blocks.0.lora_A.weight": torch.zeros(2, 64)}, names, CFG)
    with pytest.raises(CheckpointError, match="only one of"):
        parse_lora({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(2, 64)}, names, CFG)
    with pytest.raises(CheckpointError, match="rank mismatch"):
        parse_lora({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(2, 64),
                    "blocks.0.self_attn.q.lora_B.weight": torch.zeros(64, 3)}, names, CFG)
    with pytest.raises(CheckpointError, match="B @ A"):
        merge_lora(dict(recipe_dit(CFG, 1).state_dict()), {"blocks.0.self_attn.q.lora_A.weight": torch.zeros(2, 65),
                                                          "blocks.0.self_attn.q.lora_B.weight": torch.zeros(64, 2)})


def test_relighting_manifest_keys_parse_against_the_14b_model():
    """All 960 keys of the official relighting LoRA (shapes from the reference manifest) map onto
    the 480 targeted 14B linears, with or without a 'diffusion_model.' prefix."""
    manifest = json.loads((DATA / "manifests" / "relighting_lora.json").read_text())
    names = build_dit(DiTConfig()).state_dict().keys()
    for prefix in ("", "diffusion_model."):
        state = {prefix + k["key"]: torch.empty(k["shape"], device="meta") for k in manifest["keys"]}
        patch = parse_lora(state, names, DiTConfig())
        assert len(patch.low_rank) == manifest["n_target_modules"] == 480
        assert all(len(v) == 1 and v[0].scale == 1.0 and v[0].down.shape[0] == 128 for v in patch.low_rank.values())


def test_merge_into_quantized_model_requantizes(tmp_path):
    """Dequantize-merge-requantize on a quantized module gives the weights of merge-then-quantize
    up to the second rounding (one e4m3 step at most per weight)."""
    base = recipe_dit(CFG, 8, dtype=torch.bfloat16)
    lora = _peft_lora(base, rank=2, seed=3, blocks=(1,))
    a = recipe_dit(CFG, 8, dtype=torch.bfloat16)
    merge_lora(a, lora)
    quantize_(a, QuantConfig("fp8"))
    b = recipe_dit(CFG, 8, dtype=torch.bfloat16)
    quantize_(b, QuantConfig("fp8"))
    before = b.blocks[1].ffn[0].dequantize().clone()
    merge_lora(b, lora)
    wa, wb = a.blocks[1].ffn[0].dequantize(), b.blocks[1].ffn[0].dequantize()
    assert not torch.equal(before, wb)
    assert float((wa - wb).abs().max()) <= float(wa.abs().max()) * 2 ** -3
    assert float((wa - wb).norm() / wa.norm()) < 0.05
    save_file(lora, tmp_path / "l.safetensors")
    assert load_lora_file(tmp_path / "l.safetensors").keys() == lora.keys()
    with pytest.raises(CheckpointError, match="wanimate convert"):
        load_lora_file(tmp_path / "relighting_lora.ckpt")
