"""kernels/layer_norm.py: LayerNorm [+ affine | + modulation], optionally fused with the residual
add before it, against the reference and against Block.forward's own lines."""
from __future__ import annotations

import pytest
import torch

from kernel_helpers import DEVICE, assert_matches, use_interpreter_without_gpu

use_interpreter_without_gpu()
pytest.importorskip("triton")

from wanimate.engine.errors import ValidationError  # noqa: E402
from wanimate.engine.model import layer_norm as model_layer_norm  # noqa: E402
from wanimate.kernels import layer_norm as K  # noqa: E402

EPS = 1e-6


def _inputs(b, l, c, x_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, l, c, generator=g) * 2 + 0.5).to(x_dtype).to(DEVICE)
    y = torch.randn(b, l, c, generator=g).to(torch.bfloat16).to(DEVICE)
    e0 = torch.randn(b, 6, c, generator=g).to(DEVICE)        # chunks are strided [B, 1, C] views
    shift, scale, gate = e0.chunk(6, dim=1)[:3]
    w = (1 + 0.3 * torch.randn(c, generator=g)).to(DEVICE)
    bias = (0.3 * torch.randn(c, generator=g)).to(DEVICE)
    return x, y, gate, scale, shift, w, bias


# (B, L, C): the real width with few tokens (the interpreter is slow), odd widths, one token.
SHAPES = [(2, 3, 5120), (1, 35, 769), (2, 1, 64)]
STREAMS = [torch.float32, torch.bfloat16]    # fp32 residual stream, or block 0's compute-dtype input


@pytest.mark.parametrize("x_dtype", STREAMS)
@pytest.mark.parametrize("shape", SHAPES)
def test_modulated(shape, x_dtype):
    x, _, _, scale, shift, _, _ = _inputs(*shape, x_dtype, seed=1)
    got = K.layer_norm(x, EPS, torch.bfloat16, scale=scale, shift=shift)
    assert_matches(got, K.layer_norm_ref, x, EPS, torch.bfloat16, scale=scale, shift=shift)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_affine_and_plain(shape, out_dtype):
    x, _, _, _, _, w, bias = _inputs(*shape, torch.float32, seed=2)
    assert_matches(K.layer_norm(x, EPS, out_dtype, weight=w, bias=bias), K.layer_norm_ref, x, EPS, out_dtype, w, bias)
    assert_matches(K.layer_norm(x, EPS, out_dtype), K.layer_norm_ref, x, EPS, out_dtype)


@pytest.mark.parametrize("x_dtype", STREAMS)
@pytest.mark.parametrize("shape", SHAPES)
def test_add_then_norm(shape, x_dtype):
    """The two fused residual+norm steps of a Block: (gate, affine) and (no gate, modulation)."""
    x, y, gate, scale, shift, w, bias = _inputs(*shape, x_dtype, seed=3)
    got = K.add_layer_norm(x, y, gate, EPS, torch.bfloat16, weight=w, bias=bias)
    assert got[0].dtype == torch.float32
    assert_matches(got, K.add_layer_norm_ref, x, y, gate, EPS, torch.bfloat16, w, bias)
    got = K.add_layer_norm(x, y, None, EPS, torch.bfloat16, scale=scale, shift=shift)
    assert_matches(got, K.add_layer_norm_ref, x, y, None, EPS, torch.bfloat16, scale=scale, shift=shift)


def test_strided_rows_and_broadcast_batch():
    x, y, gate, scale, shift, w, bias = _inputs(2, 7, 96, torch.float32, seed=4)
    x_view = torch.cat([x, x], dim=-1)[..., :96]                      # row stride 192
    y_view = y.transpose(0, 1).contiguous().transpose(0, 1)           # batch stride 96
    gate1 = gate[:1]                                                   # [1, 1, C] for both batch rows
    got = K.add_layer_norm(x_view, y_view, gate1, EPS, torch.bfloat16, scale=scale, shift=shift)
    assert_matches(got, K.add_layer_norm_ref, x, y, gate1, EPS, torch.bfloat16, scale=scale, shift=shift)


def test_reference_is_the_block_math():
    """Bit-identical to the lines of Block.forward it replaces."""
    for x_dtype in STREAMS:
        x, y, gate, scale, shift, w, bias = _inputs(2, 5, 64, x_dtype, seed=5)
        block_h = model_layer_norm(x, EPS).type_as(x).float() * (1 + scale) + shift
        assert torch.equal(K.layer_norm_ref(x, EPS, torch.bfloat16, scale=scale, shift=shift),
                           block_h.to(torch.bfloat16))
        x1 = x + y * gate
        block_h3 = model_layer_norm(x1, EPS, w, bias).type_as(x1)
        got = K.add_layer_norm_ref(x, y, gate, EPS, torch.bfloat16, w, bias)
        assert torch.equal(got[0], x1) and torch.equal(got[1], block_h3.to(torch.bfloat16))


def test_nan_stays_in_its_row():
    x, y, gate, scale, shift, _, _ = _inputs(2, 3, 64, torch.float32, seed=6)
    y[0, 1, 5] = float("nan")
    xo, h = K.add_layer_norm(x, y, gate, EPS, torch.bfloat16, scale=scale, shift=shift)
    assert torch.isnan(h[0, 1]).all() and torch.isnan(xo[0, 1]).sum() == 1
    assert torch.isfinite(h[1]).all() and torch.isfinite(h[0, 0]).all()
    assert_matches((xo, h), K.add_layer_norm_ref, x, y, gate, EPS, torch.bfloat16, scale=scale, shift=shift)


def test_bad_arguments_raise():
    x, y, gate, scale, shift, w, bias = _inputs(2, 3, 64, torch.float32, seed=7)
    with pytest.raises(ValidationError, match="scale and shift"):
        K.layer_norm(x, EPS, torch.bfloat16, scale=scale)
    with pytest.raises(ValidationError, match="weight and bias"):
        K.layer_norm(x, EPS, torch.bfloat16, weight=w)
    with pytest.raises(ValidationError, match="scale must be"):
        K.layer_norm(x, EPS, torch.bfloat16, scale=scale[..., :-1], shift=shift)
    with pytest.raises(ValidationError, match="y must be"):
        K.add_layer_norm(x, y[:, :2], gate, EPS, torch.bfloat16)


def test_opcheck():
    x, y, gate, scale, shift, w, bias = _inputs(2, 3, 96, torch.float32, seed=8)
    torch.library.opcheck(torch.ops.wanimate.layer_norm.default, (x, EPS, torch.bfloat16),
                          dict(scale=scale, shift=shift))
    torch.library.opcheck(torch.ops.wanimate.layer_norm.default, (x, EPS, torch.float32), dict(weight=w, bias=bias))
    torch.library.opcheck(torch.ops.wanimate.add_layer_norm.default, (x, y, gate, EPS, torch.bfloat16),
                          dict(weight=w, bias=bias))
    torch.library.opcheck(torch.ops.wanimate.add_layer_norm.default, (x, y, None, EPS, torch.bfloat16),
                          dict(scale=scale, shift=shift))


# The chunked two-pass kernel with chunks smaller than the row: several chunks with a masked tail
# (200 = 6 x 32 + 8 = 3 x 64 + 8), one partly masked chunk (256), an odd number of rows (3 x 7);
# and the old whole-row kernel ("row"), kept for the benchmark. Every flag combination the model uses.
@pytest.mark.parametrize("x_dtype", STREAMS)
@pytest.mark.parametrize("variant,chunk", [("chunk", 32), ("chunk", 64), ("chunk", 256), ("row", None)])
def test_variants_and_chunkings_match_reference(variant, chunk, x_dtype):
    x, y, gate, scale, shift, w, bias = _inputs(3, 7, 200, x_dtype, seed=9 + (chunk or 0))
    run = lambda *a, **kw: K._launch(*a, EPS, torch.bfloat16, variant=variant, chunk=chunk, **kw)
    assert_matches(run(x, None, None, None, None, scale, shift)[1], K.layer_norm_ref, x, EPS, torch.bfloat16,
                   scale=scale, shift=shift)
    assert_matches(run(x, None, None, w, bias, None, None)[1], K.layer_norm_ref, x, EPS, torch.bfloat16, w, bias)
    assert_matches(run(x, y, gate, w, bias, None, None), K.add_layer_norm_ref, x, y, gate, EPS, torch.bfloat16,
                   w, bias)
    assert_matches(run(x, y, None, None, None, scale, shift), K.add_layer_norm_ref, x, y, None, EPS,
                   torch.bfloat16, scale=scale, shift=shift)


@pytest.mark.parametrize("chunk", [64, None])
def test_variance_is_stable_for_a_large_mean(chunk):
    """Rows with mean 300 and std 1: a one-pass E[x^2] - mean^2 in fp32 is off by about 1e-2 in
    the variance; the per-lane Welford merge stays at the fp32 rounding of the input."""
    g = torch.Generator().manual_seed(10)
    x = (300 + torch.randn(1, 5, 1000, generator=g)).to(DEVICE)
    got = K._launch(x, None, None, None, None, None, None, EPS, torch.float32, chunk=chunk)[1]
    want = K.layer_norm_ref(x.double(), EPS, torch.float64).float()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_unknown_variant_raises():
    x = _inputs(1, 2, 64, torch.float32, seed=11)[0]
    with pytest.raises(ValidationError, match="variant"):
        K._launch(x, None, None, None, None, None, None, EPS, torch.bfloat16, variant="nope")
