"""kernels/head_rms_norm.py: the face adapter's per-head RMSNorm against its reference."""
from __future__ import annotations

import pytest
import torch

from kernel_helpers import DEVICE, assert_matches, use_interpreter_without_gpu

use_interpreter_without_gpu()
pytest.importorskip("triton")

from wanimate.engine.errors import ValidationError  # noqa: E402
from wanimate.engine.model import RMSNorm  # noqa: E402
from wanimate.kernels import head_rms_norm as K  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]


def _x(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * 3).to(dtype).to(DEVICE)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(dtype).to(DEVICE)
    return x, w


# [B, L, H, D]: the real query (40 heads of 128) with few tokens, odd token counts, D = 48.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 40, 128), (1, 105, 2, 128), (2, 7, 3, 48), (1, 1, 1, 128)])
def test_matches_reference(shape, dtype):
    x, w = _x(shape, dtype, seed=sum(shape))
    got = K.head_rms_norm(x, w, 1e-6)
    assert got.is_contiguous()
    assert_matches(got, K.head_rms_norm_ref, x, w, 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_key_view_of_fused_kv(dtype):
    """The face key is a strided view of the fused k/v projection [B, F+1, N, 2, H, D]."""
    kv, w = _x((2, 3, 5, 2 * 4 * 128), dtype, seed=1)
    w = w[:128]
    k, v = kv.unflatten(-1, (2, 4, -1)).unbind(-3)                      # [B, F+1, N, H, D]
    assert not k.is_contiguous()
    assert_matches(K.head_rms_norm(k, w, 1e-6), K.head_rms_norm_ref, k, w, 1e-6)
    assert_matches(K.head_rms_norm(v, w, 1e-6), K.head_rms_norm_ref, v, w, 1e-6)


def test_reference_is_the_model_math():
    x, w = _x((2, 5, 3, 128), torch.bfloat16, seed=2)
    norm = RMSNorm(128, 1e-6).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(w)
    assert torch.equal(K.head_rms_norm_ref(x, norm.weight.to(torch.bfloat16), 1e-6), norm.to(torch.bfloat16)(x))


def test_nan_stays_in_its_head():
    x, w = _x((1, 2, 3, 128), torch.float32, seed=3)
    x[0, 1, 2, 9] = float("nan")
    out = K.head_rms_norm(x, w, 1e-6)
    assert torch.isnan(out[0, 1, 2]).all() and torch.isnan(out).sum() == 128


def test_bad_shapes_raise():
    x, w = _x((1, 2, 3, 128), torch.float32, seed=4)
    with pytest.raises(ValidationError, match="weight"):
        K.head_rms_norm(x, w[:64], 1e-6)


def test_opcheck():
    x, w = _x((2, 3, 4, 128), torch.bfloat16, seed=5)
    torch.library.opcheck(torch.ops.wanimate.head_rms_norm.default, (x, w, 1e-6))
