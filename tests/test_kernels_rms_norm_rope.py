"""kernels/rms_norm_rope.py: width RMSNorm + interleaved RoPE (self-attention q/k) and the plain
width RMSNorm (cross-attention q), against their references and engine/model.py."""
from __future__ import annotations

import pytest
import torch

from kernel_helpers import DEVICE, assert_matches, use_interpreter_without_gpu

use_interpreter_without_gpu()
pytest.importorskip("triton")

from wanimate.engine.errors import ValidationError  # noqa: E402
from wanimate.engine.model import apply_rope, rms_norm, rope_angles, rope_cos_sin  # noqa: E402
from wanimate.kernels import rms_norm_rope as K  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]


def _split(head_dim):
    return (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6))


def _case(b, grid, heads, head_dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    c = heads * head_dim
    l = grid[0] * grid[1] * grid[2]
    cos, sin = rope_cos_sin(grid, rope_angles(_split(head_dim), 1024, 10000.0), DEVICE)
    q = (torch.randn(b, l, c, generator=g) * 3).to(dtype).to(DEVICE)
    k = torch.randn(b, l, c, generator=g).to(dtype).to(DEVICE)
    wq = (1 + 0.5 * torch.randn(c, generator=g)).to(dtype).to(DEVICE)
    wk = (1 + 0.5 * torch.randn(c, generator=g)).to(dtype).to(DEVICE)
    return q, k, wq, wk, cos, sin


# (batch, (t, h, w) grid, heads, head_dim): the real width (40 x 128) with few tokens, since the
# interpreter is slow there; the 3x5x7 grid; 769 tokens; a head_dim whose half is odd (21).
# 769 tokens take seconds in the interpreter: bf16 only.
CASES = [(2, (1, 1, 1), 40, 128, dt) for dt in DTYPES] + [(1, (1, 1, 3), 40, 128, dt) for dt in DTYPES] \
    + [(2, (3, 5, 7), 2, 128, dt) for dt in DTYPES] + [(2, (2, 1, 3), 3, 42, dt) for dt in DTYPES] \
    + [(1, (1, 1, 769), 1, 64, torch.bfloat16)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}-{'x'.join(map(str, c[1]))}-h{c[2]}x{c[3]}-{c[4]}")
def test_rms_norm_rope_matches_reference(case):
    b, grid, heads, head_dim, dtype = case
    args = _case(b, grid, heads, head_dim, dtype, seed=sum(grid) + heads)
    got = K.rms_norm_rope(*args, 1e-6)
    assert all(t.is_contiguous() for t in got)
    assert_matches(got, K.rms_norm_rope_ref, *args, 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs(dtype):
    """q as a slice of a fused [B, L, 3C] projection, k from an [L, B, C] buffer, odd tokens."""
    b, grid, heads, head_dim = 2, (1, 3, 5), 2, 128
    q, k, wq, wk, cos, sin = _case(b, grid, heads, head_dim, dtype, seed=5)
    qkv = torch.cat([q, torch.randn_like(q.float()).to(dtype), k], dim=-1)
    q_view = qkv[..., : q.shape[-1]]
    k_view = k.transpose(0, 1).contiguous().transpose(0, 1)
    assert not q_view.is_contiguous() and not k_view.is_contiguous()
    got = K.rms_norm_rope(q_view, k_view, wq, wk, cos, sin, 1e-6)
    assert_matches(got, K.rms_norm_rope_ref, q, k, wq, wk, cos, sin, 1e-6)
    # a non-unit stride along C is copied, not misread
    q_cols = torch.stack([q, q], dim=-1).flatten(-2)[..., ::2]
    assert q_cols.stride(-1) == 2
    assert_matches(K.rms_norm(q_cols, wq, 1e-6), K.rms_norm_ref, q, wq, 1e-6)


@pytest.mark.parametrize("shape,dtype", [((2, 3, 5120), torch.float32), ((2, 3, 5120), torch.bfloat16),
                                         ((3, 5, 769), torch.float32), ((3, 5, 769), torch.bfloat16),
                                         ((1, 769, 96), torch.bfloat16), ((1, 1, 1), torch.float32)])
def test_rms_norm_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g) * 4).to(dtype).to(DEVICE)
    w = torch.randn(shape[-1], generator=g).to(dtype).to(DEVICE)
    assert_matches(K.rms_norm(x, w, 1e-6), K.rms_norm_ref, x, w, 1e-6)


def test_fp32_weight_with_bf16_activations():
    """w.to(x.dtype): an fp32 weight is rounded to bf16 before the multiply, as in the reference."""
    q, k, _, _, cos, sin = _case(2, (1, 2, 3), 2, 128, torch.bfloat16, seed=3)
    w = (1 + 0.5 * torch.randn(q.shape[-1], generator=torch.Generator().manual_seed(4))).to(DEVICE)
    assert_matches(K.rms_norm_rope(q, k, w, w, cos, sin, 1e-6), K.rms_norm_rope_ref, q, k, w, w, cos, sin, 1e-6)


def test_reference_is_the_model_math():
    """The kernel's reference is bit-identical to what SelfAttention computes from model.py helpers."""
    for dtype in DTYPES:
        q, k, wq, wk, cos, sin = _case(2, (3, 5, 7), 2, 128, dtype, seed=9)
        want = [apply_rope(rms_norm(x, w, 1e-6).unflatten(-1, (2, -1)), cos, sin).to(dtype).flatten(2)
                for x, w in ((q, wq), (k, wk))]
        got = K.rms_norm_rope_ref(q, k, wq, wk, cos, sin, 1e-6)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert torch.equal(K.rms_norm_ref(q, wq, 1e-6), rms_norm(q, wq, 1e-6))


def test_nan_stays_in_its_row():
    q, k, wq, wk, cos, sin = _case(2, (1, 1, 3), 2, 128, torch.float32, seed=1)
    q[1, 2, 7] = float("nan")
    qo, ko = K.rms_norm_rope(q, k, wq, wk, cos, sin, 1e-6)
    assert torch.isnan(qo[1, 2]).all() and not torch.isnan(qo[0]).any() and not torch.isnan(qo[1, :2]).any()
    assert not torch.isnan(ko).any()
    assert_matches((qo, ko), K.rms_norm_rope_ref, q, k, wq, wk, cos, sin, 1e-6)


def test_bad_shapes_raise():
    q, k, wq, wk, cos, sin = _case(1, (1, 1, 2), 2, 128, torch.float32, seed=2)
    with pytest.raises(ValidationError, match="cos/sin"):
        K.rms_norm_rope(q, k, wq, wk, cos[:1], sin[:1], 1e-6)
    with pytest.raises(ValidationError, match="must match"):
        K.rms_norm_rope(q, k[:, :1], wq, wk, cos, sin, 1e-6)
    with pytest.raises(ValidationError, match="weight"):
        K.rms_norm(q, wq[:-1], 1e-6)
    with pytest.raises(ValidationError, match=r"\[B, L, C\]"):
        K.rms_norm(q[0], wq, 1e-6)


def test_opcheck():
    args = _case(2, (1, 1, 3), 2, 128, torch.bfloat16, seed=6)
    torch.library.opcheck(torch.ops.wanimate.rms_norm_rope.default, (*args, 1e-6))
    torch.library.opcheck(torch.ops.wanimate.rms_norm.default, (args[0], args[2], 1e-6))


# The two-pass kernel with chunks smaller than the row: several chunks, a masked tail chunk
# (126 = 3 x 42 is not a multiple of 32 or 64), pairs of one head split across chunks (head_dim 42),
# and the old whole-row kernel (kept for bench/kernels.py) on the same cases.
@pytest.mark.parametrize("variant,chunk", [("chunk", 32), ("chunk", 64), ("chunk", 256), ("row", None)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_variants_and_chunkings_match_reference(variant, chunk, dtype):
    for b, grid, heads, head_dim in ((2, (2, 1, 3), 3, 42), (1, (1, 2, 2), 4, 64)):
        args = _case(b, grid, heads, head_dim, dtype, seed=heads + (chunk or 0))
        got = K._launch(*args, 1e-6, variant=variant, chunk=chunk)
        assert_matches(got, K.rms_norm_rope_ref, *args, 1e-6)
        assert_matches(K._launch(args[0], None, args[2], None, None, None, 1e-6, variant=variant, chunk=chunk)[0],
                       K.rms_norm_ref, args[0], args[2], 1e-6)


def test_chunk_settings():
    """Wan's width takes the measured wide-row settings (five 1024-column chunks on 8 warps, or
    2048-column ones for a lone q) unless a setting is given; narrower rows take CHUNK on 4 warps or
    one smaller chunk."""
    assert K.chunk_settings(5120) == (1024, 5, 8)
    assert K.chunk_settings(5120, wide_chunk=2048) == (2048, 3, 8)
    assert K.chunk_settings(5120, num_warps=4) == (1024, 5, 4)
    assert K.chunk_settings(5120, chunk=512) == (512, 10, 2)
    assert K.chunk_settings(3072) == (1024, 3, 4)
    assert K.chunk_settings(126)[:2] == (128, 1)
    assert K.chunk_settings(769)[:2] == (1024, 1)
    with pytest.raises(ValidationError, match="larger"):
        K.chunk_settings(1024 * 65)
    with pytest.raises(ValidationError, match="variant"):
        K._launch(*_case(1, (1, 1, 1), 2, 128, torch.float32, seed=0), 1e-6, variant="nope")
