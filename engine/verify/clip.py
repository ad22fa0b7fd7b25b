"""Fixture runner for kinds `clip_visual` and `clip_preprocess`.

clip_visual: the fixture names `clip_xlm_roberta_vit_h_14(**overrides)` and records the resulting
constructor arguments in call.effective_config; the visual tower is built from those, weights =
recipe(key, shape, base_seed) over the `visual.*` keys (the fixture also drew the text tower's
keys, which do not influence the features). Checks the fp32 features and an fp16 run (the
official precision) and its bf16 cast against bounds scaled from the errors the fixture recorded.

clip_preprocess: letterbox (exact), pixels in [-1,1], and the CLIP input in fp32 and as the
pipeline computes it (fp32 math on bf16-rounded pixels).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from .. import recipe
from ..clip import CLIPVisual, clip_input, letterbox, to_pixels
from ..config import CLIPConfig
from ..errors import FixtureError
from . import Check, compare

FP32_REL = 1e-4
PREPROCESS_REL = 1e-5
# A reduced-precision run may be at most this many times further from the fp32 reference than
# the official one was (and from the official reduced-precision output).
LOW_PRECISION_FACTOR = 1.5

# effective_config entries the engine implements with one value only
_FIXED = {"vision_pool": "token", "activation": "gelu", "vision_pre_norm": True,
          "vision_post_norm": False, "norm_eps": 1e-5}


def config_from_effective(cfg: dict) -> CLIPConfig:
    """CLIPConfig for the vision tower of XLMRobertaCLIP(**effective_config)."""
    for key, value in _FIXED.items():
        if key in cfg and cfg[key] != value:
            raise FixtureError(f"CLIP {key}={cfg[key]!r} is not supported (only {value!r})")
    try:
        return CLIPConfig(image_size=int(cfg.get("image_size", 224)), patch_size=int(cfg.get("patch_size", 14)),
                          dim=int(cfg["vision_dim"]), mlp_ratio=float(cfg.get("vision_mlp_ratio", 4)),
                          num_heads=int(cfg["vision_heads"]), num_layers=int(cfg["vision_layers"]))
    except KeyError as e:
        raise FixtureError(f"call.effective_config lacks {e}") from e


def build(config: CLIPConfig, base_seed: int) -> CLIPVisual:
    model = CLIPVisual(config).eval().requires_grad_(False)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict(recipe.state_dict_for(shapes, base_seed), strict=True)
    return model


def run(path: Path, meta: dict, **options) -> list[Check]:
    data = path.with_suffix(".safetensors")
    if not data.exists():
        raise FixtureError(f"{data} is missing")
    tensors = load_file(str(data))
    call = meta.get("call", {})
    if "factory" in call:
        return _run_visual(path.stem, meta, tensors)
    if "letterbox" in call:
        return _run_preprocess(path.stem, meta, tensors)
    raise FixtureError("CLIP fixture has neither call.factory (clip_visual) nor call.letterbox (clip_preprocess)")


def _run_visual(name: str, meta: dict, tensors: dict) -> list[Check]:
    call = meta["call"]
    if "effective_config" not in call:
        raise FixtureError("clip_visual fixture lacks call.effective_config")
    model = build(config_from_effective(call["effective_config"]), int(meta["base_seed"]))
    pixels = tensors["input.pixels"]
    ref = tensors["output.features"]

    checks = []
    with torch.inference_mode():
        features = model(pixels)
    checks.append(compare(name, "output.features", features, ref, rel_tol=FP32_REL))

    errors = meta.get("error_vs_fp32", {})
    if "output.features_official_fp16" in tensors or "output.features_pipeline_bf16" in tensors:
        model = model.to(torch.float16)
        with torch.inference_mode():
            features16 = model(pixels)
    if "output.features_official_fp16" in tensors:
        recorded = float(errors["rel_l2_fp16_vs_fp32"])
        bound = LOW_PRECISION_FACTOR * recorded
        checks.append(compare(name, "output.features_official_fp16 (fp16 vs fp32)", features16.float(), ref,
                              rel_tol=bound, note=f"official fp16 error {recorded:.3e}"))
        checks.append(compare(name, "output.features_official_fp16", features16.float(),
                              tensors["output.features_official_fp16"], rel_tol=bound,
                              note="fp16 run vs the official fp16 run"))
    if "output.features_pipeline_bf16" in tensors:
        recorded = float(errors["rel_l2_pipeline_bf16_vs_fp32"])
        bound = LOW_PRECISION_FACTOR * recorded
        as_bf16 = features16.to(torch.bfloat16).float()
        checks.append(compare(name, "output.features_pipeline_bf16 (vs fp32)", as_bf16, ref, rel_tol=bound,
                              note=f"fp16 run cast to bf16; official error {recorded:.3e}"))
        checks.append(compare(name, "output.features_pipeline_bf16", as_bf16,
                              tensors["output.features_pipeline_bf16"], rel_tol=bound,
                              note="vs the official fp16 -> bf16 features"))
    return checks


def _letterbox_size(meta: dict) -> tuple[int, int]:
    m = re.search(r"height\s*=\s*(\d+)\s*,\s*width\s*=\s*(\d+)", str(meta["call"]["letterbox"]))
    if m:
        return int(m.group(1)), int(m.group(2))
    shape = meta.get("outputs", {}).get("output.letterboxed_u8")
    if isinstance(shape, list) and len(shape) == 3:
        return int(shape[0]), int(shape[1])
    raise FixtureError("cannot read the letterbox height/width from call.letterbox")


def _run_preprocess(name: str, meta: dict, tensors: dict) -> list[Check]:
    height, width = _letterbox_size(meta)
    image = tensors["input.image_u8"].numpy()
    config = CLIPConfig()
    checks = []

    boxed = letterbox(image, height, width)
    checks.append(compare(name, "output.letterboxed_u8", torch.from_numpy(boxed),
                          tensors["output.letterboxed_u8"]))
    pixels = to_pixels(boxed, torch.float32)
    checks.append(compare(name, "output.ref_pixel", pixels, tensors["output.ref_pixel"], rel_tol=PREPROCESS_REL))
    if "output.clip_input_fp32" in tensors:
        # from the fixture's own pixels, as the fixture did, so that this stage is judged alone
        checks.append(compare(name, "output.clip_input_fp32", clip_input(tensors["output.ref_pixel"], config),
                              tensors["output.clip_input_fp32"], rel_tol=PREPROCESS_REL))
    if "output.clip_input_pipeline" in tensors:
        # the engine's whole chain: uint8 -> float64 -> bf16 pixels (one rounding, as the pipeline
        # casts) -> fp32 resize and normalisation
        pipeline_pixels = to_pixels(boxed, torch.bfloat16)
        checks.append(compare(name, "output.clip_input_pipeline", clip_input(pipeline_pixels, config),
                              tensors["output.clip_input_pipeline"], rel_tol=PREPROCESS_REL,
                              note="fp32 math on bf16-rounded pixels"))
    return checks
