"""Assembling a Pipeline: every network loaded from a checkpoint folder, or the embedded default.

Official layout (after `wanimate convert`): the DiT shards at the root, and
`models_t5_umt5-xxl-enc-bf16.safetensors`, `models_clip_open-clip-xlm-roberta-large-vit-huge-14.safetensors`,
`Wan2.1_VAE.safetensors` (+ `relighting_lora.safetensors`), each listed in wanimate-manifest.json,
tokenizer files in `google/umt5-xxl/`. -Diffusers layout: `transformer/`, `text_encoder/`,
`tokenizer/`, `image_encoder/`. Every component is built on the meta device and filled by
`assign_weights` (strict keys and shapes, finite values), in its official precision by default:
DiT bf16, T5 bf16, CLIP fp16, VAE fp32 (NOTES §10).

The embedded default (`embedded_pipeline`) is the `tiny` preset with recipe weights and a byte
tokenizer: every stage runs in seconds on a CPU, and its output is noise from random weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn

from .checkpoint import COMPONENTS, converted_path
from .clip import CLIPVisual, clip_key_filter, hf_clip_vision_to_official
from .config import CLIPConfig, ModelConfig, T5Config, VAEConfig, preset
from .errors import CheckpointError
from .loader import KeyReport, assign_weights, expected_entries, load_dit, recipe_dit
from .pipeline import Pipeline
from .safetensors_io import read_header, read_manifest, read_tensors
from .text import ByteTokenizer, HFTokenizer, T5Encoder
from .vae import WanVAE

Rename = Callable[[str], "str | None"]        # checkpoint key -> module key, None = documented unused


def _component(name: str):
    return next(c for c in COMPONENTS if c.name == name)


def load_into(model: nn.Module, files: list[Path], *, rename: Rename = lambda k: k, dtype: torch.dtype,
              device, root: Path, require_manifest: bool, source: str) -> nn.Module:
    """Validate every header, check keys/shapes against the module, then stream tensors in."""
    manifest = read_manifest(root) or {}
    digests = {}
    for f in files:
        rel = str(f.relative_to(root))
        if require_manifest and rel not in manifest:
            raise CheckpointError(f"{f} is not listed in {root}/wanimate-manifest.json: run `wanimate convert {root}` "
                                  "(converted weights are only loaded with a manifest)")
        digests[f] = manifest.get(rel, {}).get("sha256")
    expected = expected_entries(model)
    report, provided = KeyReport(), set()
    headers = [read_header(f) for f in files]
    for h in headers:
        for key, info in h.tensors.items():
            name = rename(key)
            if name is None:
                continue
            if name not in expected:
                report.unexpected.append((key, h.path.name))
            elif tuple(info.shape) != expected[name][0]:
                report.shape.append((name, h.path.name, expected[name][0], info.shape))
            provided.add(name)
    report.missing = sorted(set(expected) - provided)
    report.raise_if_any(source)

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for h in headers:
            for key, t in read_tensors(h, expected_sha256=digests[h.path]):
                name = rename(key)
                if name is not None:
                    yield name, t
    return assign_weights(model, stream(), dtype=dtype, device=device, source=source).eval().requires_grad_(False)


def _meta(factory):
    with torch.device("meta"):
        return factory()


def load_t5(ckpt_dir: Path, *, dtype=torch.bfloat16, device="cpu") -> tuple[T5Encoder, HFTokenizer]:
    ckpt_dir = Path(ckpt_dir)
    model = _meta(lambda: T5Encoder(T5Config()))
    if (ckpt_dir / "text_encoder").is_dir():
        files = sorted((ckpt_dir / "text_encoder").glob("*.safetensors"))
        # transformers ties shared.weight and encoder.embed_tokens.weight; read the table once.
        keys = {k for f in files for k in read_header(f).tensors}
        skip = "encoder.embed_tokens.weight" if "shared.weight" in keys else None
        from .text import hf_umt5_to_official
        rename = lambda k: None if k == skip else next(iter(hf_umt5_to_official({k: None})))
        load_into(model, files, rename=rename, dtype=dtype, device=device, root=ckpt_dir, require_manifest=False,
                  source=f"{ckpt_dir}/text_encoder")
        return model, HFTokenizer(ckpt_dir / "tokenizer")
    path = converted_path(ckpt_dir, _component("t5"))
    _exists_or_convert(path, ckpt_dir, "t5")
    load_into(model, [path], dtype=dtype, device=device, root=ckpt_dir, require_manifest=True, source=str(path))
    return model, HFTokenizer(ckpt_dir / _component("t5_tokenizer").official)


def load_clip(ckpt_dir: Path, *, dtype=torch.float16, device="cpu") -> CLIPVisual:
    ckpt_dir = Path(ckpt_dir)
    cfg = CLIPConfig()
    model = _meta(lambda: CLIPVisual(cfg))
    if (ckpt_dir / "image_encoder").is_dir():
        # transformers stores q/k/v separately; the official tower fuses them, so this small
        # (0.6B) component is converted as a whole dict.
        files = sorted((ckpt_dir / "image_encoder").glob("*.safetensors"))
        state = {k: v for f in files for k, v in read_tensors(read_header(f))}
        state = hf_clip_vision_to_official(state, cfg.num_layers)
        return assign_weights(model, state.items(), dtype=dtype, device=device,
                              source=f"{ckpt_dir}/image_encoder").eval().requires_grad_(False)
    path = converted_path(ckpt_dir, _component("clip"))
    _exists_or_convert(path, ckpt_dir, "clip")
    return load_into(model, [path], rename=lambda k: k if clip_key_filter(k, cfg.num_layers) else None, dtype=dtype,
                     device=device, root=ckpt_dir, require_manifest=True, source=str(path))


def load_vae(ckpt_dir: Path, *, dtype=torch.float32, device="cpu") -> WanVAE:
    ckpt_dir = Path(ckpt_dir)
    model = _meta(lambda: WanVAE(VAEConfig()))
    if (ckpt_dir / "vae").is_dir() and not converted_path(ckpt_dir, _component("vae")).exists():
        raise CheckpointError(f"{ckpt_dir}/vae: the diffusers AutoencoderKLWan layout is not supported yet; put the "
                              "official Wan2.1_VAE.pth in the folder and run `wanimate convert`")
    path = converted_path(ckpt_dir, _component("vae"))
    _exists_or_convert(path, ckpt_dir, "vae")
    return load_into(model, [path], dtype=dtype, device=device, root=ckpt_dir, require_manifest=True, source=str(path))


def _exists_or_convert(path: Path, ckpt_dir: Path, name: str) -> None:
    if path.exists():
        return
    pickle = ckpt_dir / _component(name).official
    hint = f"run `wanimate convert {ckpt_dir}`" if pickle.exists() else f"expected {pickle.name} in the folder"
    raise CheckpointError(f"{ckpt_dir}: no {path.name} ({name}); {hint}")


def load_relighting_lora(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """relighting_lora.safetensors (made by `wanimate convert`, checked against the manifest)."""
    ckpt_dir = Path(ckpt_dir)
    path = converted_path(ckpt_dir, _component("relighting_lora"))
    _exists_or_convert(path, ckpt_dir, "relighting_lora")
    rel = str(path.relative_to(ckpt_dir))
    digest = (read_manifest(ckpt_dir) or {}).get(rel, {}).get("sha256")
    if digest is None:
        raise CheckpointError(f"{path} is not listed in the manifest: run `wanimate convert {ckpt_dir}`")
    return {k: v for k, v in read_tensors(read_header(path), expected_sha256=digest)}


def load_pipeline(ckpt_dir: Path, *, device="cuda", dtype=torch.bfloat16, relighting_lora: bool = False,
                  quant: str | None = None, progress: Callable[[str], None] | None = None,
                  weights_device=None) -> Pipeline:
    """The full model set from a checkpoint folder, in the official precisions. The relighting
    LoRA (replace mode) is merged into the DiT weights once, exactly in fp32 (the official keeps
    it unmerged: extra matmuls at every step). `quant` applies a weight scheme after the merge
    ('fp8', 'int8', 'int8_wo', 'nf4'; see quant/). A folder written by `wanimate quantize` loads
    its quantized weights directly. The pipeline computes on `device`; the weights are loaded onto
    `weights_device` (default: `device`): under a VRAM budget load them on the CPU and let
    engine.offload.apply_budget place them."""
    from ..quant.checkpoint import is_quantized_dir, load_quantized_dit
    say = progress or (lambda s: None)
    where = device if weights_device is None else weights_device
    say("loading the DiT")
    if is_quantized_dir(ckpt_dir):
        if relighting_lora:
            raise CheckpointError(f"{ckpt_dir} is already quantized: merge the relighting LoRA when quantizing "
                                  "(wanimate quantize --relighting-lora)")
        dit = load_quantized_dit(ckpt_dir, device=where, dtype=dtype, progress=progress)
    else:
        patch = None
        if relighting_lora:
            from .loader import build_dit, expected_entries, find_dit
            from .lora import parse_lora
            cfg = find_dit(ckpt_dir).config
            patch = parse_lora(load_relighting_lora(ckpt_dir), expected_entries(build_dit(cfg)), cfg)
            say(f"merging the relighting LoRA into {len(patch.targets())} weights while loading")
        dit = load_dit(ckpt_dir, dtype=dtype, device=where, progress=progress, lora=patch)
        if quant:
            from ..quant import QuantConfig, quantize_
            say(f"quantizing the DiT weights ({quant})")
            quantize_(dit, QuantConfig(quant))
    say("loading umT5")
    t5, tokenizer = load_t5(ckpt_dir, dtype=dtype, device=where)
    say("loading CLIP")
    clip = load_clip(ckpt_dir, dtype=torch.float16 if dtype != torch.float32 else dtype, device=where)
    say("loading the VAE")
    vae = load_vae(ckpt_dir, device=where)
    return Pipeline(dit, vae, clip, text_encoder=t5, tokenizer=tokenizer, device=device)


def recipe_module(model: nn.Module, base_seed: int, dtype=torch.float32, device="cpu") -> nn.Module:
    """Fill a meta-built module with recipe weights over its own keys."""
    from . import recipe
    shapes = {k: s for k, (s, _) in expected_entries(model).items()}
    return assign_weights(model, recipe.state_dict_for(shapes, base_seed).items(), dtype=dtype, device=device,
                          source="recipe").eval().requires_grad_(False)


def embedded_pipeline(config: ModelConfig | None = None, *, device="cpu") -> Pipeline:
    """The `tiny` preset with recipe weights: no checkpoint needed, output from random weights."""
    cfg = config or preset("tiny")
    seed = cfg.recipe_seed if cfg.recipe_seed is not None else 1234
    dit = recipe_dit(cfg.dit, seed, device=device)
    t5 = recipe_module(_meta(lambda: T5Encoder(cfg.t5)), seed, device=device)
    clip = recipe_module(_meta(lambda: CLIPVisual(cfg.clip)), seed, device=device)
    vae = recipe_module(_meta(lambda: WanVAE(cfg.vae)), seed, device=device)
    return Pipeline(dit, vae, clip, text_encoder=t5, tokenizer=ByteTokenizer.for_config(cfg.t5), device=device)
