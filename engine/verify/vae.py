"""Fixture runner for the Wan2.1 VAE (fixtures/README.md, section `vae`).

Builds WanVAE from the fixture's WanVAE_ constructor arguments and latent statistics, fills every
parameter with the recipe (RMSNorm gammas are [C,1,1,1]/[C,1,1], so they take the >= 2-D rule),
and reproduces each call of the fixture through the engine's public API in fp32.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import recipe
from ..errors import FixtureError
from ..vae import WanVAE, vae_config_from_official
from . import Check, compare, failure

REL_TOL = 1e-4


def build(meta: dict) -> WanVAE:
    call = meta["call"]
    cfg = vae_config_from_official(call["constructor_args"], call.get("normalisation"))
    with torch.device("meta"):
        model = WanVAE(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(recipe.state_dict_for(shapes, int(meta["base_seed"])), strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _input(name: str, meta: dict, stored: dict[str, torch.Tensor]) -> torch.Tensor:
    if name in stored:
        return stored[name].float()
    spec = meta.get("inputs", {}).get(name)
    if spec is None:
        raise FixtureError(f"input {name} is neither stored nor described in the json")
    x = recipe.randn(name, spec["shape"], int(meta["base_seed"])) * float(spec.get("scale", 1.0))
    if "clamp(-1, 1)" in str(spec.get("note", "")):
        x = x.clamp(-1, 1)
    return x


def backend(model: WanVAE, vae_backend: str, cache_dir: Path):
    """The fixture's VAE through another backend (export/runtime.py): 'onnx' exports the fixture
    model's step graphs into cache_dir and runs them with ONNX Runtime; 'tensorrt' also builds
    strict-fp32 engines (so the same tolerance applies)."""
    if vae_backend == "torch":
        return model
    from ...export.runtime import make_vae_backend

    options = {"precision": "fp32"} if vae_backend == "tensorrt" else {}
    return make_vae_backend(model, vae_backend, cache_dir, **options)


def run(path: Path, meta: dict, *, vae_backend: str = "torch", vae_cache_dir: Path | None = None,
        **_options) -> list[Check]:
    """`vae_backend` ('torch' default, 'onnx', 'tensorrt') runs the same calls through an
    exported model; its graphs go to vae_cache_dir (a temporary folder if None)."""
    import tempfile

    if vae_cache_dir is None and vae_backend != "torch":
        with tempfile.TemporaryDirectory(prefix="wanimate-vae-") as tmp:
            return run(path, meta, vae_backend=vae_backend, vae_cache_dir=Path(tmp), **_options)
    from safetensors.torch import load_file

    name = Path(path).stem
    data = Path(path).with_suffix(".safetensors")
    if not data.exists():
        raise FixtureError(f"{data} not found")
    stored = load_file(str(data))
    model = backend(build(meta), vae_backend, vae_cache_dir)
    video = _input("input.video", meta, stored)
    latent = _input("input.latent", meta, stored)

    got: dict[str, torch.Tensor] = {}
    got["output.encoded"] = model.encode(video)
    got["output.encoded_bf16_input"] = model.encode(video.to(torch.bfloat16))
    unclamped = model.decode(latent, clamp=False)
    got["inter.decoded_unclamped"] = unclamped
    got["output.decoded"] = unclamped.clamp(-1.0, 1.0)
    # The pipeline's refert path: re-encode our own decoded (and clamped) frames.
    got["output.roundtrip_encoded"] = model.encode(got["output.decoded"])

    wanted = [k for k in stored if k.startswith(("output.", "inter."))]
    for k in meta.get("outputs", {}):
        if k not in stored:
            wanted.append(k)
    checks = []
    for key in wanted:
        if key not in stored:
            checks.append(failure(name, f"{key} is listed in the json but not stored"))
        elif key not in got:
            checks.append(Check(name, key, float("nan"), float("nan"), "-", False,
                                "the vae runner does not know how to compute this output"))
        else:
            checks.append(compare(name, key, got[key], stored[key], rel_tol=REL_TOL))
    return checks
