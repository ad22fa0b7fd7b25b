"""CLIP visual tower and preprocessing (engine/clip.py, engine/verify/clip.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from wanimate.engine import recipe
from wanimate.engine.clip import (CLIP_UNUSED_KEY_PATTERNS, CLIPVisual, clip_input, clip_key_filter,
                                  hf_clip_vision_to_official, letterbox, to_pixels)
from wanimate.engine.config import CLIPConfig, PRESETS
from wanimate.engine.errors import CheckpointError, MediaError, ValidationError
from wanimate.engine.verify import rel_l2, run_fixture
from wanimate.engine.verify import clip as clip_runner

DATA = Path(__file__).parent / "data"
FIXTURES = DATA / "fixtures"
MANIFEST = DATA / "manifests" / "clip.json"     # copy of shared/reference/manifests/clip.json


def load_meta(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def _build(config: CLIPConfig, seed: int) -> CLIPVisual:
    return clip_runner.build(config, seed)


# --- fixture parity ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["clip_visual", "clip_preprocess"])
def test_fixture_parity(name):
    checks = run_fixture(FIXTURES / f"{name}.json")
    failed = [c for c in checks if not c.passed]
    assert checks and not failed, failed
    outputs = {c.output for c in checks}
    if name == "clip_visual":
        assert {"output.features", "output.features_official_fp16", "output.features_pipeline_bf16"} <= outputs
    else:
        assert {"output.letterboxed_u8", "output.ref_pixel", "output.clip_input_fp32",
                "output.clip_input_pipeline"} <= outputs


def test_clip_visual_runner_other_config_and_seed(tmp_path):
    """The runner reads any fixture of the schema: here mlp_ratio 0.5 (non-integer hidden ratio),
    2 heads, 3 layers, another seed; outputs from this engine, then a perturbed copy must fail."""
    meta = load_meta(FIXTURES / "clip_visual.json")
    meta["base_seed"] = 99
    meta["call"]["effective_config"].update(vision_dim=40, vision_mlp_ratio=0.5, vision_heads=2, vision_layers=3)
    config = clip_runner.config_from_effective(meta["call"]["effective_config"])
    assert config.mlp_ratio == 0.5 and config.num_layers == 3
    model = _build(config, 99)
    assert model.visual.transformer[0].mlp[0].out_features == 20 and len(model.visual.transformer) == 2
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(pixels)
        half = model.to(torch.float16)(pixels).float()
    meta["error_vs_fp32"] = {"rel_l2_fp16_vs_fp32": rel_l2(half, ref),
                             "rel_l2_pipeline_bf16_vs_fp32": rel_l2(half.bfloat16().float(), ref)}
    tensors = {"input.pixels": pixels, "output.features": ref, "output.features_official_fp16": half,
               "output.features_pipeline_bf16": half.bfloat16().float()}
    path = tmp_path / "clip_other.json"
    path.write_text(json.dumps(meta))
    save_file(tensors, str(path.with_suffix(".safetensors")))
    checks = run_fixture(path)
    assert checks and all(c.passed for c in checks), checks
    tensors["output.features"] = ref + 1e-3 * ref.std() * torch.randn_like(ref)
    save_file(tensors, str(path.with_suffix(".safetensors")))
    assert not next(c for c in run_fixture(path) if c.output == "output.features").passed


def test_clip_preprocess_runner_other_size(tmp_path):
    """Another image and letterbox size (a wide image this time: bars top and bottom)."""
    meta = load_meta(FIXTURES / "clip_preprocess.json")
    meta["call"]["letterbox"] = meta["call"]["letterbox"].replace("height=96, width=64", "height=40, width=72")
    image = np.random.default_rng(3).integers(0, 256, (30, 80, 3), dtype=np.uint8)
    boxed = letterbox(image, 40, 72)
    pixels = to_pixels(boxed)
    tensors = {"input.image_u8": torch.from_numpy(image), "output.letterboxed_u8": torch.from_numpy(boxed),
               "output.ref_pixel": pixels, "output.clip_input_fp32": clip_input(pixels),
               "output.clip_input_pipeline": clip_input(to_pixels(boxed, torch.bfloat16))}
    path = tmp_path / "pre.json"
    path.write_text(json.dumps(meta))
    save_file(tensors, str(path.with_suffix(".safetensors")))
    checks = run_fixture(path)
    assert checks and all(c.passed for c in checks), checks
    tensors["output.letterboxed_u8"] = tensors["output.letterboxed_u8"].clone()
    tensors["output.letterboxed_u8"][20, 5, 0] ^= 1
    save_file(tensors, str(path.with_suffix(".safetensors")))
    assert not next(c for c in run_fixture(path) if c.output == "output.letterboxed_u8").passed


def test_e2e_clip_stage():
    """The e2e fixture's CLIP (1280 wide, 16 heads, mlp_ratio 0.5, 3 layers) from the uint8 reference:
    letterbox, pixels, CLIP input and features, as the official fp32 run computed them."""
    meta = load_meta(DATA / "enc" / "e2e_text_clip_stages.json")
    t = load_file(str(DATA / "enc" / "e2e_text_clip_stages.safetensors"))
    box = meta["letterbox"]
    boxed = letterbox(t["input.ref"].numpy(), box["height"], box["width"])
    assert np.array_equal(boxed, t["ref.letterboxed"].numpy())
    model = _build(clip_runner.config_from_effective(meta["configs"]["clip"]), meta["base_seed"])
    with torch.no_grad():
        features = model(clip_input(to_pixels(boxed)))
    assert features.shape == (1, 257, 1280)
    assert rel_l2(features[0], t["clip.fea"]) < 1e-5


# --- structure -----------------------------------------------------------------------------------


def _manifest():
    return json.loads(MANIFEST.read_text())


def test_keys_match_official_manifest():
    with torch.device("meta"):
        model = CLIPVisual(CLIPConfig())
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    manifest = _manifest()
    used = {k["key"]: tuple(k["shape"]) for k in manifest["keys"] if k["used_by_animate"]}
    assert got == used
    assert sum(p.numel() for p in model.parameters()) == manifest["n_used_params"]


def test_key_filter_is_the_manifest_split():
    """clip_key_filter keeps exactly the used keys and drops exactly the documented unused ones;
    an unknown key is kept, so a strict load reports it."""
    for entry in _manifest()["keys"]:
        assert clip_key_filter(entry["key"], 32) == entry["used_by_animate"], entry["key"]
    assert clip_key_filter("visual.transformer.3.attn.proj.bias", 4) is False
    assert clip_key_filter("visual.transformer.31.attn.proj.bias", 4) is True
    assert clip_key_filter("visual.something_new") is True
    assert len(CLIP_UNUSED_KEY_PATTERNS) == 4


def test_matches_transformers_clip_vision_hidden_states():
    """transformers' CLIPVisionModel (diffusers' image encoder), its own random weights converted to
    official names: hidden_states[-2] (diffusers' feature) == this tower (pre-norm, no post-norm,
    all blocks but the last)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=32, num_attention_heads=4,
                                        num_hidden_layers=4, image_size=224, patch_size=14, hidden_act="gelu",
                                        layer_norm_eps=1e-5)
    torch.manual_seed(0)
    hf = transformers.CLIPVisionModel(cfg).eval()
    with torch.no_grad():   # non-trivial norms, biases and embeddings
        for name, p in hf.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    ours = CLIPVisual(CLIPConfig(dim=64, mlp_ratio=0.5, num_heads=4, num_layers=4)).eval()
    converted = hf_clip_vision_to_official(hf.state_dict(), num_layers=4)
    ours.load_state_dict(converted, strict=True)
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        theirs = hf(pixel_values=pixels, output_hidden_states=True)
        got = ours(pixels)
    torch.testing.assert_close(got, theirs.hidden_states[-2], rtol=1e-5, atol=1e-5)
    # and that is not the post-normed last layer
    assert rel_l2(got, theirs.last_hidden_state) > 0.1

    # the on-disk key layout (vision_model. prefix) converts the same way; without num_layers the
    # last block and post-norm are kept under their official names
    prefixed = {"vision_model." + k: v for k, v in hf.state_dict().items()}
    everything = hf_clip_vision_to_official(prefixed)
    official = {e["key"] for e in _manifest()["keys"]
                if e["key"].startswith("visual.") and e["key"] != "visual.head"
                and not (e["key"].startswith("visual.transformer.") and int(e["key"].split(".")[2]) >= 4)}
    assert set(everything) == official
    dropped = {k for k in everything if not clip_key_filter(k, 4)}
    assert dropped == {k for k in official if k.startswith(("visual.transformer.3.", "visual.post_norm."))}
    torch.testing.assert_close(everything["visual.transformer.3.attn.to_qkv.weight"],
                               torch.cat([hf.state_dict()[f"encoder.layers.3.self_attn.{n}_proj.weight"]
                                          for n in "qkv"]))


def test_hf_conversion_errors():
    with pytest.raises(CheckpointError, match="unknown"):
        hf_clip_vision_to_official({"text_model.embeddings.token_embedding.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="incomplete"):
        hf_clip_vision_to_official({"encoder.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)})


def test_validation():
    with pytest.raises(ValidationError, match="divisible"):
        CLIPVisual(CLIPConfig(dim=66, num_heads=4))
    model = CLIPVisual(PRESETS["tiny"].clip)
    with pytest.raises(ValidationError, match="224"):
        model(torch.zeros(1, 3, 112, 112))


def test_fp16_output_dtype_and_error():
    config = PRESETS["tiny"].clip
    model = _build(config, 5)
    pixels = clip_input(to_pixels(np.random.default_rng(0).integers(0, 256, (50, 40, 3), dtype=np.uint8)))
    with torch.no_grad():
        ref = model(pixels)
        half = model.to(torch.float16)(pixels)
    assert ref.shape == (1, 257, config.dim) and half.dtype == torch.float16
    assert 1e-5 < rel_l2(half.float(), ref) < 5e-3


# --- preprocessing -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["padding_resize_tall", "padding_resize_canvas"])
def test_letterbox_matches_preprocess_fixtures(case):
    """The preprocessing fixtures of the same official algorithm (utils.padding_resize, INTER_LINEAR)
    at real sizes: 900x600 into 480x832 (side bars) and a 1280x720 canvas into 720x1280."""
    meta = load_meta(DATA / "preprocess" / f"{case}.json")
    arrays = np.load(DATA / "preprocess" / f"{case}.npz")
    out = letterbox(arrays["in_image"], meta["args"]["height"], meta["args"]["width"])
    assert out.dtype == np.uint8 and np.array_equal(out, arrays["out_image"])


def test_letterbox_geometry():
    image = np.full((10, 10, 3), 200, dtype=np.uint8)
    out = letterbox(image, 30, 20)                      # square into tall: bars top and bottom
    assert out.shape == (30, 20, 3)
    assert (out[:5] == 0).all() and (out[25:] == 0).all() and (out[5:25] == 200).all()
    out = letterbox(image, 20, 50)                      # square into wide: bars left and right
    assert (out[:, :15] == 0).all() and (out[:, 35:] == 0).all() and (out[:, 15:35] == 200).all()
    same = np.random.default_rng(0).integers(0, 256, (24, 36, 3), dtype=np.uint8)
    assert np.array_equal(letterbox(same, 24, 36), same)  # same size: identity


def test_letterbox_errors():
    with pytest.raises(MediaError, match="uint8"):
        letterbox(np.zeros((4, 4, 3), dtype=np.float32), 8, 8)
    with pytest.raises(MediaError, match="uint8"):
        letterbox(np.zeros((4, 4), dtype=np.uint8), 8, 8)
    with pytest.raises(MediaError, match="too flat"):
        letterbox(np.zeros((1, 400, 3), dtype=np.uint8), 64, 64)
    with pytest.raises(ValidationError, match="positive"):
        letterbox(np.zeros((4, 4, 3), dtype=np.uint8), 0, 8)


def test_to_pixels():
    image = np.array([[[0, 127, 255]]], dtype=np.uint8)
    px = to_pixels(image, torch.float64)
    assert px.shape == (1, 3, 1, 1)
    assert px.flatten().tolist() == [-1.0, 127 / 127.5 - 1, 1.0]
    assert to_pixels(image).dtype == torch.float32
    batch = to_pixels(np.zeros((2, 5, 6, 3), dtype=np.uint8), torch.bfloat16)
    assert batch.shape == (2, 3, 5, 6) and batch.dtype == torch.bfloat16


def test_clip_input_stretch_and_normalisation():
    config = CLIPConfig()
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    same = torch.rand(1, 3, 224, 224) * 2 - 1
    torch.testing.assert_close(clip_input(same), ((same * 0.5 + 0.5) - mean) / std)   # 224: no resize
    pixels = torch.rand(2, 3, 60, 100) * 2 - 1
    got = clip_input(pixels.bfloat16())
    assert got.dtype == torch.float32 and got.shape == (2, 3, 224, 224)
    # a stretch without antialias, in fp32 on the bf16-rounded values
    stretched = F.interpolate(pixels.bfloat16().float(), size=(224, 224), mode="bicubic", align_corners=False)
    torch.testing.assert_close(got, ((stretched * 0.5 + 0.5) - mean) / std)
    antialiased = F.interpolate(pixels.bfloat16().float(), size=(224, 224), mode="bicubic", antialias=True)
    assert (got - ((antialiased * 0.5 + 0.5) - mean) / std).abs().max() > 1e-3
    with pytest.raises(ValidationError):
        clip_input(torch.zeros(3, 10, 10))


def test_meta_build_and_assign_load():
    config = PRESETS["tiny"].clip
    with torch.device("meta"):
        model = CLIPVisual(config)
    reference = _build(config, 4)
    model.load_state_dict(reference.state_dict(), strict=True, assign=True)
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model.eval()(pixels), reference(pixels))
