"""engine/transforms.py fuse_qkv / unfuse_qkv (one q/k/v GEMM) and the GELU-epilogue FFN, on the tiny
preset on the CPU: the fused model computes what the unfused one does (bf16, fp32 and quantized
linears through their CPU emulation), the transform refuses what it cannot do exactly, and the
module-walking code around it (block swap, LoRA merging, quantize_) works or fails clearly."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from wanimate.engine.config import preset
from wanimate.engine.errors import CheckpointError, ValidationError
from wanimate.engine.loader import recipe_dit
from wanimate.engine.model import SelfAttention
from wanimate.engine.offload import apply_block_swap
from wanimate.engine.transforms import (GeluEpilogueFFN, fuse_qkv, qkv_unfusable, unfuse_qkv,
                                        use_gelu_epilogue)

TINY = preset("tiny").dit


def _inputs(model, seed=0):
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    face = torch.rand(1, 3, 5, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        motion = model.encode_motion(face)
        tokens = model.embed_context([torch.randn(7, cfg.text_dim, generator=g)],
                                     torch.randn(1, 257, cfg.image_dim, generator=g))
    return dict(y=torch.randn(1, 20, 3, 4, 6, generator=g), pose=torch.randn(1, 16, 2, 4, 6, generator=g),
                motion=motion, tokens=tokens, lat=torch.randn(1, 16, 3, 4, 6, generator=g),
                t=torch.tensor([731]))


def _denoise(model, x):
    with torch.no_grad():
        cond = model.prepare(x["y"], x["pose"], motion=x["motion"], context_tokens=x["tokens"])
        return model.denoise(x["lat"], x["t"], cond)


def _rel_l2(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _attns(model):
    return [m for m in model.modules() if isinstance(m, SelfAttention)]


def _quantized(scheme, seed=5):
    from wanimate.quant import QuantConfig, quantize_
    model = recipe_dit(TINY, seed, dtype=torch.bfloat16)
    quantize_(model, QuantConfig(scheme, kernel="reference"))
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_model_matches_unfused(dtype):
    model = recipe_dit(TINY, 11, dtype=dtype)
    x = _inputs(model)
    ref = _denoise(model, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    fused = fuse_qkv(model)
    assert fused == [f"blocks.{i}.self_attn" for i in range(TINY.num_layers)]
    for attn in _attns(model):
        assert isinstance(attn.qkv, nn.Linear) and attn.qkv.weight.shape == (3 * TINY.dim, TINY.dim)
        assert not any(hasattr(attn, n) for n in ("q", "k", "v"))      # the old linears are gone
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == nbytes   # no second copy
    got = _denoise(model, x)
    # Same rows of the same weights; only the GEMM's blocking may differ: fp32 tolerance (bitwise
    # equal on this machine's CPU BLAS).
    assert _rel_l2(got, ref) <= 1e-6
    # q, k, v from the fused GEMM are the three linears' outputs (fp32 tolerance)
    attn, h = _attns(model)[0], torch.randn(1, 9, TINY.dim).to(dtype)
    q, k, v = attn.qkv(h).chunk(3, dim=-1)
    for part, name in zip((q, k, v), "qkv"):
        w, b = before[f"blocks.0.self_attn.{name}.weight"], before[f"blocks.0.self_attn.{name}.bias"]
        torch.testing.assert_close(part.float(), F.linear(h, w, b).float(), rtol=1e-5, atol=1e-5)
    assert unfuse_qkv(model) == fused
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(_denoise(model, x), ref)


@pytest.mark.parametrize("scheme", ["fp8", "int8", "int8_wo"])
def test_fused_quantized_linears_match(scheme):
    """Per-output-channel schemes: concatenated stored tensors are the fused layer; the shared
    input is quantized per token once, the same as for each of the three."""
    model = _quantized(scheme)
    x = _inputs(model, seed=1)
    ref = _denoise(model, x)
    q = model.blocks[0].self_attn.q
    kinds = {type(a.q) for a in _attns(model)}
    assert len(kinds) == 1 and next(iter(kinds)).scheme == scheme
    assert len(fuse_qkv(model)) == TINY.num_layers
    qkv = model.blocks[0].self_attn.qkv
    assert type(qkv) is type(q) and qkv.out_features == 3 * q.out_features and qkv.config == q.config
    assert torch.equal(qkv.weight[: q.out_features], q.weight)
    got = _denoise(model, x)
    assert _rel_l2(got, ref) <= 1e-6, _rel_l2(got, ref)
    h = torch.randn(1, 9, TINY.dim).to(torch.bfloat16)
    torch.testing.assert_close(qkv(h)[..., : q.out_features].float(), q(h).float(), rtol=0, atol=0)
    unfuse_qkv(model)
    assert torch.equal(_denoise(model, x), ref)


def test_fused_model_can_be_quantized_afterwards():
    """quantize_ selects by name patterns: blocks.*.self_attn.* covers the fused qkv (per-channel
    scales of the fused weight are the three layers' scales)."""
    from wanimate.quant import QuantConfig, quantize_
    a, b = recipe_dit(TINY, 6, dtype=torch.bfloat16), recipe_dit(TINY, 6, dtype=torch.bfloat16)
    fuse_qkv(a)
    quantize_(a, QuantConfig("fp8", kernel="reference"))
    quantize_(b, QuantConfig("fp8", kernel="reference"))
    fuse_qkv(b)
    for ma, mb in zip(_attns(a), _attns(b)):
        assert torch.equal(ma.qkv.weight.view(torch.uint8), mb.qkv.weight.view(torch.uint8))
        assert torch.equal(ma.qkv.weight_scale, mb.qkv.weight_scale)


def test_nf4_and_mixed_schemes_are_refused():
    model = _quantized("nf4")
    with pytest.raises(ValidationError, match="nf4 does not store its weight per output channel"):
        fuse_qkv(model)
    assert fuse_qkv(model, strict=False) == [] and all(a.qkv is None for a in _attns(model))

    from wanimate.quant import QuantConfig, quantize_
    mixed = recipe_dit(TINY, 7, dtype=torch.bfloat16)
    quantize_(mixed, QuantConfig("fp8", kernel="reference"), filter_fn=lambda m, n: n == "blocks.1.self_attn.q")
    assert "one scheme" in qkv_unfusable(mixed.blocks[1].self_attn)
    with pytest.raises(ValidationError, match="blocks.1.self_attn"):
        fuse_qkv(mixed)
    assert fuse_qkv(mixed, strict=False) == [f"blocks.{i}.self_attn" for i in (0, 2, 3, 4)]
    assert mixed.blocks[1].self_attn.qkv is None


def test_block_swap_after_fusion_and_refusal_during_it():
    model = recipe_dit(TINY, 8, dtype=torch.bfloat16)
    x = _inputs(model, seed=2)
    fuse_qkv(model)
    ref = _denoise(model, x)
    swap = apply_block_swap(model, 1, "cpu")
    try:
        got = _denoise(model, x)                       # streamed blocks carry their qkv like any linear
        with pytest.raises(ValidationError, match="shared buffer"):
            unfuse_qkv(model)
        resident = [f"blocks.{i}.self_attn" for i, blk in enumerate(model.blocks) if not blk._forward_pre_hooks]
        assert len(resident) == 1 and unfuse_qkv(model, strict=False) == resident   # the streamed stay fused
        fuse_qkv(model)
        assert torch.equal(_denoise(model, x), ref)
    finally:
        swap.remove()
    assert torch.equal(got, ref)
    unfuse_qkv(model)
    swap = apply_block_swap(model, 0, "cpu")
    try:
        with pytest.raises(ValidationError, match="fuse before offloading"):
            fuse_qkv(model)
        assert fuse_qkv(model, strict=False) == []
    finally:
        swap.remove()


def test_lora_merge_after_fusion_fails_clearly():
    """LoRA names address blocks.N.self_attn.q: merge before fusing (the loader does)."""
    from wanimate.engine.lora import merge_lora
    model = recipe_dit(TINY, 9)
    lora = {"blocks.0.self_attn.q.lora_A.weight": torch.randn(2, TINY.dim),
            "blocks.0.self_attn.q.lora_B.weight": torch.randn(TINY.dim, 2)}
    fuse_qkv(model)
    with pytest.raises(CheckpointError, match="blocks.0.self_attn.q"):
        merge_lora(model, lora)
    unfuse_qkv(model)
    merge_lora(model, lora)


def test_fuse_needs_loaded_weights():
    from wanimate.engine.loader import build_dit
    model = build_dit(TINY)                         # meta device
    assert "meta" in qkv_unfusable(model.blocks[0].self_attn)
    with pytest.raises(ValidationError, match="meta"):
        fuse_qkv(model)


# ----------------------------------------------------------------------------------------------
# GELU epilogue


def test_addmm_activation_is_erf_gelu_on_cpu():
    """Why GeluEpilogueFFN keeps the reference on the CPU: there torch._addmm_activation(use_gelu=True)
    computes the exact (erf) GELU, not the tanh approximation the FFN uses (torch 2.13). If this
    starts failing, torch changed it and the CPU could take the epilogue path too."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 128, generator=g) * 2, torch.randn(96, 128, generator=g) * 0.1
    b = torch.randn(96, generator=g)
    got = torch._addmm_activation(b, x, w.t(), use_gelu=True)
    lin = F.linear(x, w, b)
    torch.testing.assert_close(got, F.gelu(lin), rtol=1e-5, atol=1e-6)
    assert (got - F.gelu(lin, approximate="tanh")).abs().max() > 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_epilogue_ffn_on_cpu_is_the_reference(dtype):
    model = recipe_dit(TINY, 10, dtype=dtype)
    x = _inputs(model, seed=3)
    ref = _denoise(model, x)
    keys = list(model.state_dict())
    assert use_gelu_epilogue(model) == TINY.num_layers
    assert all(type(b.ffn) is GeluEpilogueFFN for b in model.blocks)
    assert list(model.state_dict()) == keys             # same children, same names
    assert torch.equal(_denoise(model, x), ref)
    assert use_gelu_epilogue(model, on=False) == TINY.num_layers
    assert all(type(b.ffn) is nn.Sequential for b in model.blocks) and torch.equal(_denoise(model, x), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gelu_epilogue_on_cuda_is_tanh_gelu():
    """On CUDA bf16 the epilogue is GELU(tanh) of the fp32 accumulator, rounded once: within a
    bf16 rounding of the reference, which rounds the GEMM output first."""
    g = torch.Generator(device="cuda").manual_seed(0)
    ffn = GeluEpilogueFFN(nn.Linear(256, 512), nn.GELU(approximate="tanh"), nn.Linear(512, 256)).cuda().bfloat16()
    x = torch.randn(2, 300, 256, device="cuda", generator=g).bfloat16()
    with torch.no_grad():
        got = ffn(x)
        ref = nn.Sequential(*ffn)(x)
        h = F.linear(x.float(), ffn[0].weight.float(), ffn[0].bias.float())
        exact = F.linear(F.gelu(h, approximate="tanh").bfloat16(), ffn[2].weight, ffn[2].bias)
    assert _rel_l2(got, exact) <= _rel_l2(ref, exact) + 1e-3
    assert _rel_l2(got, ref) <= 1e-2
