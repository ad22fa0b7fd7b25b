"""kernels/gated_residual.py: x + gate * y against the reference (Block.forward's last line)."""
from __future__ import annotations

import pytest
import torch

from kernel_helpers import DEVICE, assert_matches, use_interpreter_without_gpu

use_interpreter_without_gpu()
pytest.importorskip("triton")

from wanimate.engine.errors import ValidationError  # noqa: E402
from wanimate.kernels import gated_residual as K  # noqa: E402


def _inputs(b, l, c, x_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, l, c, generator=g) * 3).to(x_dtype).to(DEVICE)
    y = torch.randn(b, l, c, generator=g).to(torch.bfloat16).to(DEVICE)
    gate = torch.randn(b, 6, c, generator=g).to(DEVICE).chunk(6, dim=1)[5]   # strided [B, 1, C]
    return x, y, gate


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 5120), (1, 105, 769), (2, 1, 1), (1, 769, 8)])
def test_matches_reference(shape, x_dtype):
    x, y, gate = _inputs(*shape, x_dtype, seed=sum(shape))
    got = K.gated_residual(x, y, gate)
    assert got.dtype == torch.float32
    assert_matches(got, K.gated_residual_ref, x, y, gate)
    got = K.gated_residual(x, y, None)          # no gate: the promoted dtype (bf16 + bf16 stays bf16)
    assert_matches(got, K.gated_residual_ref, x, y, None)


def test_strided_and_broadcast():
    x, y, gate = _inputs(2, 9, 1030, torch.float32, seed=3)           # 1030: two column blocks, ragged
    x_view = x.transpose(0, 1).contiguous().transpose(0, 1)
    y_view = torch.cat([y, y], dim=-1)[..., 1030:]
    assert_matches(K.gated_residual(x_view, y_view, gate[:1]), K.gated_residual_ref, x, y, gate[:1])


def test_nan_propagates_elementwise():
    x, y, gate = _inputs(1, 4, 64, torch.float32, seed=4)
    y[0, 2, 3] = float("nan")
    out = K.gated_residual(x, y, gate)
    assert torch.isnan(out).sum() == 1 and torch.isnan(out[0, 2, 3])


def test_bad_shapes_raise():
    x, y, gate = _inputs(2, 3, 64, torch.float32, seed=5)
    with pytest.raises(ValidationError, match="gate must be"):
        K.gated_residual(x, y, gate[..., :-1])
    with pytest.raises(ValidationError, match="x and y"):
        K.gated_residual(x, y[:1], gate)


def test_opcheck():
    x, y, gate = _inputs(2, 3, 96, torch.float32, seed=6)
    torch.library.opcheck(torch.ops.wanimate.gated_residual.default, (x, y, gate))
    torch.library.opcheck(torch.ops.wanimate.gated_residual.default, (x, y, None))
