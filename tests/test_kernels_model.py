"""The fused-kernel path of engine/model.py and the transforms of engine/transforms.py, on a tiny
DiT: kernels on and off agree, the guard falls back to the reference, regional compilation keeps
one graph per block signature, CUDA graphs replay the eager step."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernel_helpers import DEVICE, INTERPRETED, use_interpreter_without_gpu

use_interpreter_without_gpu()
pytest.importorskip("triton")

from wanimate import kernels  # noqa: E402
from wanimate.engine.config import DiTConfig  # noqa: E402
from wanimate.engine.errors import ValidationError  # noqa: E402
from wanimate.engine.loader import recipe_dit  # noqa: E402
from wanimate.engine.model import Block, CrossAttention, FaceBlock, SelfAttention  # noqa: E402
from wanimate.engine.transforms import GraphedDenoise, compile_blocks, use_kernels  # noqa: E402

# head_dim 64 (RoPE split 24/20/20); 2 latent frames + reference of 2x3 tokens = 12 tokens.
CFG = DiTConfig(dim=128, ffn_dim=192, num_heads=2, num_layers=5, text_dim=32, text_len=24, image_dim=32,
                motion_size=16, motion_width=32, motion_encoder_dim=32, face_hidden=48)


def _model_and_inputs(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    frames, h, w = 1, 4, 6
    model = recipe_dit(CFG, base_seed=seed, dtype=dtype, device=DEVICE)
    rand = lambda *s: torch.randn(*s, generator=g).to(DEVICE)
    with torch.no_grad():
        cond = model.prepare(rand(1, 20, frames + 1, h, w), rand(1, 16, frames, h, w),
                             (torch.rand(1, 3, 4 * frames - 3, 16, 16, generator=g) * 2 - 1).to(DEVICE),
                             rand(1, 9, CFG.text_dim), rand(1, 257, CFG.image_dim))
    return model, rand(1, 16, frames + 1, h, w), torch.tensor([731], device=DEVICE), cond


class _CountOps(TorchDispatchMode):
    """Counts calls of the wanimate::* ops."""

    def __enter__(self):
        self.counts = {}
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "wanimate":
            name = func.__name__.split(".")[0]
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _rel_l2(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype,limit", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_kernels_on_matches_reference_path(dtype, limit):
    model, latents, t, cond = _model_and_inputs(dtype, seed=1)
    with torch.no_grad():
        ref = model.denoise(latents, t, cond)
        assert use_kernels(model)
        assert all(m.kernels for m in model.modules() if isinstance(m, (Block, SelfAttention, CrossAttention,
                                                                         FaceBlock)))
        with _CountOps() as calls:
            got = model.denoise(latents, t, cond)
        use_kernels(model, on=False)
        with _CountOps() as none:
            back = model.denoise(latents, t, cond)
    # per Block: layer_norm, 2 x add_layer_norm, rms_norm_rope, rms_norm, gated_residual; per FaceBlock:
    # layer_norm, 2 x head_rms_norm, gated_residual (its add to the stream)
    n, f = CFG.num_layers, CFG.num_face_blocks
    assert calls.counts == {"layer_norm": n + f, "add_layer_norm": 2 * n, "rms_norm_rope": n, "rms_norm": n,
                            "gated_residual": n + f, "head_rms_norm": 2 * f}
    assert not none.counts and torch.equal(back, ref)
    assert torch.isfinite(got).all() and _rel_l2(got, ref) <= limit


def test_use_kernels_fuses_qkv_and_off_restores():
    """use_kernels fuses the self-attention projections by default (the kernels then read q and k
    as strided views of the qkv output) and unfuses them when switched off; fuse_projections=False
    is the separate-q/k/v ablation."""
    model, latents, t, cond = _model_and_inputs(torch.bfloat16, seed=6)
    attns = [m for m in model.modules() if isinstance(m, SelfAttention)]
    with torch.no_grad():
        ref = model.denoise(latents, t, cond)
        use_kernels(model, fuse_projections=False)
        assert all(a.qkv is None for a in attns)
        separate = model.denoise(latents, t, cond)
        use_kernels(model)
        assert all(a.qkv is not None for a in attns)
        with _CountOps() as calls:
            fused = model.denoise(latents, t, cond)
        use_kernels(model, on=False)
        assert all(a.qkv is None for a in attns)
        back = model.denoise(latents, t, cond)
    assert calls.counts["rms_norm_rope"] == CFG.num_layers
    assert torch.equal(fused, separate) and torch.equal(back, ref)


def test_guard_falls_back_to_reference(monkeypatch):
    """With the kernels unavailable (or an unsupported dtype) the flagged model runs the reference."""
    assert kernels.load()
    x = torch.zeros(2, 3, 8, device=DEVICE)
    assert kernels.supported(x, x[0, 0])
    assert not kernels.supported(x.half())
    assert not kernels.supported(x.to(torch.int32))
    assert not kernels.supported(torch.zeros(2, 3, 8, device="meta"))
    model, latents, t, cond = _model_and_inputs(torch.float32, seed=2)
    with torch.no_grad():
        ref = model.denoise(latents, t, cond)
        use_kernels(model)
        monkeypatch.setattr(kernels, "_built_for", None)
        assert not kernels.supported(x)
        assert torch.equal(model.denoise(latents, t, cond), ref)


@pytest.mark.slow
def test_compile_blocks_fullgraph_with_kernels():
    """Regional compile traces the custom ops through their fake kernels without graph breaks;
    all blocks share compiled graphs (block 0 takes bf16, the rest fp32, the face block its own)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model, latents, t, cond = _model_and_inputs(torch.bfloat16, seed=3)
    with torch.no_grad():
        use_kernels(model)
        eager = model.denoise(latents, t, cond)
        compile_blocks(model, backend="aot_eager" if INTERPRETED else "inductor")
        got = model.denoise(latents, t, cond)
    assert counters["stats"]["unique_graphs"] == 3 and not counters["graph_break"]
    assert _rel_l2(got, eager) <= (0 if INTERPRETED else 1e-2)


def test_graphed_denoise_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the replay test covers it")
    model, *_ = _model_and_inputs(torch.float32, seed=4)
    with pytest.raises(ValidationError, match="CUDA"):
        GraphedDenoise(model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_denoise_replays_eager_step():
    model, latents, t, cond = _model_and_inputs(torch.bfloat16, seed=5)
    use_kernels(model)
    graphed = GraphedDenoise(model)
    with torch.no_grad():
        for step in range(3):
            noisy = latents + step
            torch.testing.assert_close(graphed(noisy, t - step, cond), model.denoise(noisy, t - step, cond))
        first = graphed._graph
        graphed(latents, t, cond)
        assert graphed._graph is first                      # same shapes and conditions: no re-capture
        use_kernels(model, on=False)
        torch.testing.assert_close(graphed(latents, t, cond), model.denoise(latents, t, cond))
        assert graphed._graph is not first                  # flags changed: captured again
