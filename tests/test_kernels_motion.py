"""kernels/motion.py: the motion encoder's padded blur and bias + leaky ReLU [+ residual merge],
against engine/model.py's math (Blur, BiasLeakyReLU, MotionResBlock) and inside the motion encoder."""
from __future__ import annotations

import copy

import pytest
import torch

from kernel_helpers import DEVICE, INTERPRETED, use_interpreter_without_gpu

use_interpreter_without_gpu()
pytest.importorskip("triton")

from wanimate import kernels  # noqa: E402
from wanimate.engine.config import DiTConfig  # noqa: E402
from wanimate.engine.errors import ValidationError  # noqa: E402
from wanimate.engine.model import Blur, MotionEncoder  # noqa: E402
from wanimate.kernels import motion as K  # noqa: E402
from test_kernels_model import _CountOps  # noqa: E402

# One rounding of the exact (fp32) result: half an ulp on a GPU (round to nearest), one ulp in the
# interpreter (it truncates). A bf16 ulp is at most 2^-7 of the value.
ONE_ROUNDING = dict(rtol=2**-7, atol=1e-6)


def _rand(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 2).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,pads", [((2, 3, 16, 16), (2, 2)), ((1, 2, 17, 9), (1, 1)), ((3, 1, 5, 70), (2, 2)),
                                        ((1, 2, 4, 4), (0, 0)), ((1, 1, 33, 65), (1, 2))])
def test_blur_matches_reference(shape, pads, dtype):
    x = _rand(*shape, dtype=dtype, seed=sum(shape))
    got = K.blur(x, *pads)
    want = K.blur_ref(x, *pads)
    assert got.shape == want.shape and got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    else:
        # Against the exact sum of the bf16 inputs: one rounding; and within an ulp of the bf16 convolution.
        torch.testing.assert_close(got.float(), K.blur_ref(x.float(), *pads), **ONE_ROUNDING)
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-6, atol=1e-6)


@pytest.mark.parametrize("planes", [1, 4])
@pytest.mark.parametrize("launch", [dict(variant="taps", bh=8, bw=16), dict(variant="rows", bh=4, bw=8, num_warps=1)])
def test_blur_variants_and_tilings_agree(launch, planes, monkeypatch):
    """The 2-D tap kernel and the row walker with tiles smaller than the image (ragged last tiles,
    several row segments), one plane per program as on a GPU or several (a ragged last group of
    the 6 planes), give the reference blur."""
    monkeypatch.setattr(K, "_planes_per_program", lambda x, n: planes)
    x = _rand(2, 3, 21, 19, dtype=torch.float32, seed=11)
    for pads in ((2, 2), (1, 1), (0, 3)):
        torch.testing.assert_close(K._blur_launch(x, *pads, **launch), K.blur_ref(x, *pads), rtol=1e-5, atol=1e-6)
    y, bias = _rand(2, 3, 5, 7, dtype=torch.float32, seed=12), _rand(3, dtype=torch.float32, seed=13)
    torch.testing.assert_close(K._bias_act_launch(y, bias, y, block=16), K.bias_act_ref(y, bias, y), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValidationError, match="variant"):
        K._blur_launch(x, 2, 2, variant="fft")


def test_blur_module_and_strided_input():
    """The model's Blur (its buffer, F.pad, grouped conv) equals the op, also for a non-contiguous input."""
    x = _rand(2, 4, 12, 10, dtype=torch.float32, seed=7).transpose(2, 3)        # [2, 4, 10, 12] strided
    for pad in ((2, 2), (1, 1)):
        module = Blur(pad).to(DEVICE)
        ref = module(x)
        module.kernels = True
        assert kernels.load()
        torch.testing.assert_close(module(x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (1, 5, 7, 3), (1, 1, 50, 50)])
def test_bias_act_matches_reference(shape, residual, dtype):
    x = _rand(*shape, dtype=dtype, seed=sum(shape))
    bias = _rand(shape[1], dtype=dtype, seed=1)
    r = _rand(*shape, dtype=dtype, seed=2) if residual else None
    got = K.bias_act(x, bias, r)
    assert got.dtype == dtype and got.shape == x.shape
    exact = K.bias_act_ref(x.float(), bias.float(), None if r is None else r.float())
    if dtype == torch.float32:
        torch.testing.assert_close(got, K.bias_act_ref(x, bias, r), rtol=1e-6, atol=1e-6)
    else:
        # The reference rounds after each of 3-5 steps, the kernel once: within one rounding of the
        # exact result, and no further from it than the reference is (the interpreter's truncation
        # errs up to a whole ulp where rounding to nearest errs half: a factor 2 there).
        torch.testing.assert_close(got.float(), exact, **ONE_ROUNDING)
        ref_err = (K.bias_act_ref(x, bias, r).float() - exact).abs().max()
        assert (got.float() - exact).abs().max() <= ref_err * (2 if INTERPRETED else 1)
    # the inputs reach both sides of the leaky ReLU, so the comparisons above test the negative slope too
    neg = x.float() + bias.float().view(1, -1, 1, 1) < 0
    assert neg.any() and (~neg).any()


def test_bad_inputs_raise():
    x = _rand(1, 2, 8, 8, dtype=torch.float32, seed=3)
    with pytest.raises(ValidationError, match=r"\[N, C, H, W\]"):
        K.blur(x[0], 2, 2)
    with pytest.raises(ValidationError, match="pads"):
        K.blur(x, 4, 0)
    with pytest.raises(ValidationError, match="too small"):
        K.blur(x[..., :2, :2], 0, 0)
    with pytest.raises(ValidationError, match="one per channel"):
        K.bias_act(x, torch.zeros(3, device=DEVICE))
    with pytest.raises(ValidationError, match="residual"):
        K.bias_act(x, torch.zeros(2, device=DEVICE), x[:, :1])


def test_opcheck():
    x = _rand(2, 3, 9, 11, dtype=torch.float32, seed=4)
    torch.library.opcheck(torch.ops.wanimate.blur.default, (x, 2, 2))
    torch.library.opcheck(torch.ops.wanimate.bias_act.default, (x, x[0, :, 0, 0].clone(), x.clone()))
    torch.library.opcheck(torch.ops.wanimate.bias_act.default, (x, x[0, :, 0, 0].clone(), None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_motion_encoder_kernels_on_matches_reference(dtype):
    """The whole LIA encoder (blurs, activations, residual merges) with the kernels on and off. In
    bf16 both are compared with the fp32 encoder on the same weights: the kernels must not be less
    accurate than the reference path (factor 1.5: the interpreter truncates where a GPU rounds)."""
    from wanimate.engine.loader import recipe_dit
    cfg = DiTConfig(dim=128, ffn_dim=192, num_heads=2, num_layers=5, text_dim=32, text_len=24, image_dim=32,
                    motion_size=32, motion_width=32, motion_encoder_dim=32, face_hidden=48)
    exact_encoder = recipe_dit(cfg, base_seed=3, dtype=torch.float32, device=DEVICE).motion_encoder
    encoder = copy.deepcopy(exact_encoder).to(dtype)
    g = torch.Generator().manual_seed(5)
    faces = (torch.rand(3, 3, 32, 32, generator=g) * 2 - 1).to(dtype).to(DEVICE)
    assert kernels.load()
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
    with torch.no_grad():
        exact = exact_encoder(faces.float())
        ref = encoder(faces)
        flagged = [m for m in encoder.modules() if hasattr(m, "kernels")]
        assert len(flagged) > 6
        for m in flagged:
            m.kernels = True
        with _CountOps() as calls:
            got = encoder(faces)
    # the first 1x1 conv's activation; per res block (3: 32 -> 4) 2 blurs, conv1's activation and
    # conv2's activation merged with the skip
    assert calls.counts == {"blur": 6, "bias_act": 7}
    assert torch.isfinite(got).all()
    if dtype == torch.float32:
        assert rel(got, ref) <= 1e-5
    else:
        assert rel(got, exact) <= 1.5 * rel(ref, exact), (rel(got, exact), rel(ref, exact))
