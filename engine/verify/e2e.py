"""End-to-end fixtures: the official WanAnimate.generate on recipe-built tiny modules.

The runner rebuilds the four tiny official modules from the case's JSON (configs + the weight
exceptions), feeds the stored uint8 inputs and the fixed prompt token ids to the engine's
pipeline in fp32, and compares the output video and every per-segment intermediate the fixture
stores. The noise comes from the same CPU generator and seed, so it must match bit for bit.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from .. import recipe
from ..config import DiTConfig
from ..loader import assign_weights, build_dit, constant_buffers, expected_entries
from ..pipeline import ArraySource, GenerateOptions, Pipeline, TextContext
from ..sampler import make_schedule
from ..text import pipeline_context
from ..vae import WanVAE, vae_config_from_official
from . import Check, compare
from .clip import build as build_clip, config_from_effective
from .t5 import build as build_t5, config_from_overrides

VIDEO_REL_TOL = 1e-5          # the README: a correct fp32 engine lands within ~1e-5 rel L2
STAGE_REL_TOL = 1e-4


def build_models(meta: dict):
    seed, cfgs = meta["base_seed"], meta["configs"]
    dcfg = DiTConfig.from_official(cfgs["dit"])
    dit = build_dit(dcfg)
    shapes = {k: s for k, (s, _) in expected_entries(dit).items() if k not in constant_buffers(dit)}
    unscaled = meta["weights"].get("motion_encoder_equal_lr_rescaled_keys", [])
    assign_weights(dit, recipe.state_dict_for(shapes, seed, unscaled=unscaled).items(), dtype=torch.float32,
                   source="recipe").eval().requires_grad_(False)
    vae = WanVAE(vae_config_from_official(cfgs["vae"])).eval().requires_grad_(False)
    vae.load_state_dict(recipe.state_dict_for({k: v.shape for k, v in vae.state_dict().items()}, seed), strict=True)
    t5 = build_t5(config_from_overrides(cfgs["t5"], meta["resolved"].get("text_len", 512)), seed)
    clip = build_clip(config_from_effective(cfgs["clip"]), seed)
    if cfgs.get("lora"):
        from ..lora import merge_lora
        merge_lora(dit, relighting_lora_recipe(dit, cfgs["lora"], seed))
    return dit, vae, t5, clip


# The relighting LoRA's targets: every Linear of the blocks except the face adapter and modulation
# (the official get_loraconfig rule), i.e. these 12 per block.
LORA_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2")


def relighting_lora_recipe(dit, lora_cfg, seed: int) -> dict[str, torch.Tensor]:
    """PEFT-format relighting LoRA for a recipe-built case (e2e README): lora_A [r, in] and
    lora_B [out, r] for each target of every block, value = recipe x 0.25; scale alpha / r."""
    cfg = lora_cfg if isinstance(lora_cfg, dict) else {}
    rank = int(cfg.get("rank", cfg.get("r", 128)))
    alpha = float(cfg.get("alpha", cfg.get("lora_alpha", rank)))
    value_scale = float(cfg.get("value_scale", cfg.get("scale_of_recipe", 0.25)))
    targets = cfg.get("target_modules") or cfg.get("targets") or LORA_TARGETS
    state = {}
    for i in range(len(dit.blocks)):
        for t in targets:
            t = t.split("blocks.")[-1].split(".", 1)[-1] if t.startswith("blocks.") else t
            lin = dit.get_submodule(f"blocks.{i}.{t}")
            a, b = f"blocks.{i}.{t}.lora_A.weight", f"blocks.{i}.{t}.lora_B.weight"
            state[a] = recipe.param(a, (rank, lin.in_features), seed) * value_scale
            state[b] = recipe.param(b, (lin.out_features, rank), seed) * value_scale * (alpha / rank)
    return state


def encode_ids(t5, ids: list[list[int]], text_len: int) -> list[torch.Tensor]:
    tokens = torch.zeros(len(ids), text_len, dtype=torch.int64)
    mask = torch.zeros(len(ids), text_len, dtype=torch.int64)
    for i, row in enumerate(ids):
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    with torch.no_grad():
        return pipeline_context(t5.encode(tokens, mask), mask, text_len).trimmed


def run(path: Path, meta: dict, *, vae_backend: str = "torch", vae_cache_dir: Path | None = None,
        **options) -> list[Check]:
    """`vae_backend` 'onnx'/'tensorrt' runs the pipeline with an exported VAE (verify/vae.py)."""
    if vae_backend != "torch" and vae_cache_dir is None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="wanimate-vae-") as tmp:
            return run(path, meta, vae_backend=vae_backend, vae_cache_dir=Path(tmp), **options)
    name = path.stem
    data = load_file(str(path.with_suffix(".safetensors")))
    call = meta["call"]
    dit, vae, t5, clip = build_models(meta)
    text_len = meta["resolved"].get("text_len", 512)
    context, context_null = encode_ids(t5, [meta["resolved"]["prompt_ids"], meta["resolved"]["neg_prompt_ids"]], text_len)
    from .vae import backend

    pipe = Pipeline(dit, backend(vae, vae_backend, vae_cache_dir), clip)
    face = np.repeat(np.repeat(data["input.face_lowres"].numpy(), 4, axis=1), 4, axis=2)
    replace = bool(call.get("replace_flag"))
    options = GenerateOptions(mode="replace" if replace else "animate", steps=int(call["sampling_steps"]),
                              solver=call["sample_solver"], shift=float(call["shift"]), seed=int(call["seed"]),
                              clip_len=int(call["clip_len"]), refert_num=int(call["refert_num"]),
                              guide_scale=float(call["guide_scale"]), batch_cfg=False)   # two passes, as officially
    trace: dict[str, list[torch.Tensor]] = {}
    result = pipe.generate(
        data["input.ref"].numpy(), ArraySource(data["input.pose"].numpy()), ArraySource(face), options,
        background=ArraySource(data["input.bg"].numpy()) if replace else None,
        mask=ArraySource(data["input.mask"].numpy()) if replace else None,
        text=TextContext(context, context_null),
        trace=lambda key, value: trace.setdefault(key, []).append(value.detach().float().cpu()))

    checks = [compare(name, "output.video", result.frames, data["output.video"], rel_tol=VIDEO_REL_TOL,
                      abs_tol=1e-4)]
    checks.append(compare(name, "text.context", context, data["text.context"], rel_tol=STAGE_REL_TOL))
    checks.append(compare(name, "text.context_null", context_null, data["text.context_null"], rel_tol=STAGE_REL_TOL))
    for key, ref in sorted(data.items()):
        if key.startswith(("input.", "output.", "text.")) or key.endswith(".timesteps"):
            continue
        got = trace.get(key)
        if got is None:
            checks.append(Check(name, key, float("nan"), float("nan"), "-", False, "not produced by the pipeline"))
            continue
        value = torch.stack(got) if len(got) > 1 else got[0]
        exact = key.endswith(".noise") or key == "ref.letterboxed"
        checks.append(compare(name, key, value.to(ref.dtype) if exact else value, ref,
                              rel_tol=None if exact else STAGE_REL_TOL))
    schedule = make_schedule(options.solver, options.steps, options.shift)
    for key in sorted(k for k in data if k.endswith(".timesteps")):
        checks.append(compare(name, key, schedule.timesteps, data[key]))
    return checks
