"""engine/vae_fast.py (channels-last and compiled VAE steps) and bench/vae.py's code path."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from wanimate.engine.errors import ValidationError
from wanimate.engine.vae import Tiling
from wanimate.engine.vae_fast import FastVAE, VAEStep
from wanimate.export.onnx import load_vae_source


def rel_l2(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def tiny_vae():
    return load_vae_source("recipe:tiny")


def test_channels_last_matches_eager(tiny_vae):
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(2, 16, 3, 2, 3, generator=g)
    video = (torch.randn(1, 3, 5, 16, 24, generator=g) * 0.5).clamp(-1, 1)
    fast = FastVAE(copy.deepcopy(tiny_vae), channels_last=True)
    conv = fast.vae.decoder.conv1
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    chunks = list(fast.decode_stream(latent))
    assert [c.shape[2] for c in chunks] == [1, 4, 4]
    assert rel_l2(torch.cat(chunks, 2), tiny_vae.decode(latent)) <= 1e-5
    assert rel_l2(fast.decode(latent, clamp=False), tiny_vae.decode(latent, clamp=False)) <= 1e-5
    assert rel_l2(fast.encode(video), tiny_vae.encode(video)) <= 1e-5
    # The cache stays channels-last between steps, so concatenations do not relayout.
    _, cache = fast.decode_step(latent[:1, :, :1], None)
    _, cache = fast.decode_step(latent[:1, :, 1:2], cache)
    assert all(t.is_contiguous(memory_format=torch.channels_last_3d) for t in cache.tensors)
    assert fast.dtype == torch.float32
    with pytest.raises(ValidationError, match="tile"):
        fast.decode(latent, tiling=Tiling(2, 1))


def test_step_module_is_the_vae_step(tiny_vae):
    z = torch.randn(1, 16, 1, 2, 2)
    first = VAEStep(tiny_vae, "decode", True)(z)
    y, cache = tiny_vae.decode_step(z, None, clamp=False)
    assert torch.equal(first[0], y) and all(torch.equal(a, b) for a, b in zip(first[1:], cache.tensors))
    with pytest.raises(ValidationError):
        VAEStep(tiny_vae, "both", True)


@pytest.mark.slow
def test_compiled_steps_match_eager(tiny_vae):
    """torch.compile on the CPU (Inductor C++): minutes on a 2-core machine."""
    latent = torch.randn(1, 16, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    fast = FastVAE(copy.deepcopy(tiny_vae), compile=True, channels_last=True)
    assert rel_l2(fast.decode(latent), tiny_vae.decode(latent)) <= 1e-5


@pytest.mark.slow
def test_bench_smoke_runs_and_writes_json(tmp_path):
    from wanimate.bench import vae as bench

    out = tmp_path / "vae.json"
    result = bench.main(["--smoke", "--paths", "eager,channels_last,diffusers", "--encode-paths", "eager",
                         "--dtypes", "fp32", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows == json.loads(json.dumps(result["rows"]))
    assert [r["path"] for r in rows] == ["eager", "channels_last", "diffusers", "eager"]
    for r in rows:
        if r["path"] == "diffusers" and r["status"].startswith("error: ModuleNotFound"):
            continue
        assert r["status"] == "ok", r
        assert r["median_s"] > 0
    assert rows[1]["rel_l2_vs_eager"] <= 1e-5
