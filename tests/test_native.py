"""CMakeLists.txt + csrc/vae_ops.cu + export/native.py: the build runs where nvcc and cmake are
present; the kernels run against their torch reference where a GPU is present (not here)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from wanimate.engine.vae import RMSNorm
from wanimate.export.native import ABI_VERSION, LIB_NAME, NativeOps, rms_norm_silu_ref

ROOT = Path(__file__).resolve().parent.parent


def _build(build_dir: Path) -> Path:
    if shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists():
        pytest.skip("no nvcc")
    if shutil.which("cmake") is None:
        pytest.skip("no cmake")
    for cmd in (["cmake", "-S", str(ROOT), "-B", str(build_dir)], ["cmake", "--build", str(build_dir)]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return build_dir / LIB_NAME


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    """A fresh build; or the library named by WANIMATE_NATIVE_LIB (built elsewhere) if set."""
    prebuilt = os.environ.get("WANIMATE_NATIVE_LIB")
    if prebuilt and Path(prebuilt).is_file():
        return Path(prebuilt)
    return _build(tmp_path_factory.mktemp("build"))


@pytest.mark.slow
def test_cmake_builds_the_library(library):
    assert library.is_file() and library.stat().st_size > 0
    ops = NativeOps.load(library)                       # loads without a GPU: static CUDA runtime
    assert ops.lib.wan_vae_ops_abi_version() == ABI_VERSION
    # Argument checks run before any CUDA call: null pointers and a frame range past the buffer.
    assert ops.lib.wan_rms_norm_silu_cf(None, None, None, 0, 1, 4, 1, 4, 1, 0, 2.0, 1e-12, 1, None) == -1
    assert ops.lib.wan_rms_norm_silu_cf(1, 1, 1, 0, 1, 4, 3, 4, 2, 0, 2.0, 1e-12, 1, None) == -1
    assert ops.lib.wan_rms_norm_silu_cl(1, 1, 1, 9, 4, 4, 2.0, 1e-12, 1, None) == -1     # unknown dtype
    assert ops.lib.wan_vae_ops_error_string(-1) == b"invalid arguments"


def test_missing_library_says_how_to_build(tmp_path):
    from wanimate.engine.errors import CheckpointError

    with pytest.raises(CheckpointError, match="cmake"):
        NativeOps.load(tmp_path / LIB_NAME)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_the_vae_rmsnorm_then_silu(dtype):
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(24).to(dtype)
    with torch.no_grad():
        norm.gamma.copy_(torch.randn(24, 1, 1, 1, generator=g))
    x = (torch.randn(2, 24, 3, 5, 7, generator=g) * 3).to(dtype)
    torch.testing.assert_close(rms_norm_silu_ref(x, norm.gamma, silu=False), norm(x), rtol=0, atol=0)
    # The module rounds to bf16 between the norm and SiLU; the fused op rounds once, at the end.
    tol = 0 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(rms_norm_silu_ref(x, norm.gamma), F.silu(norm(x)), rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("layout", ["ncdhw", "ndhwc", "into_buffer"])
def test_kernels_match_the_reference(library, dtype, tol, layout):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    ops = NativeOps.load(library)
    g = torch.Generator(device="cuda").manual_seed(1)
    b, c, t, h, w = 2, 96, 4, 30, 52                     # odd sizes, a Wan VAE width
    x = (torch.randn(b, c, t, h, w, device="cuda", generator=g) * 2).to(dtype)
    gamma = torch.randn(c, 1, 1, 1, device="cuda", generator=g).to(dtype)
    ref = rms_norm_silu_ref(x, gamma)
    if layout == "ncdhw":
        got = ops.rms_norm_silu(x, gamma)
    elif layout == "ndhwc":
        got = ops.rms_norm_silu(x.contiguous(memory_format=torch.channels_last_3d), gamma)
        assert got.is_contiguous(memory_format=torch.channels_last_3d)
    else:
        buf = torch.full((b, c, t + 2, h, w), 7.0, device="cuda", dtype=dtype)  # [cache | new frames]
        ops.rms_norm_silu(x, gamma, out=buf, frame_offset=2)
        assert (buf[:, :, :2] == 7).all()
        got = buf[:, :, 2:]
    torch.cuda.synchronize()
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)
    # Zero vectors stay finite (the eps clamp), as in F.normalize.
    z = torch.zeros(1, c, 1, 2, 2, device="cuda", dtype=dtype)
    assert torch.isfinite(ops.rms_norm_silu(z, gamma)).all()


def test_fused_modules_keep_keys_and_outputs():
    from wanimate.export.native import FusedRMSNormSiLU, fuse_norm_silu
    from wanimate.export.onnx import load_vae_source

    vae = load_vae_source("recipe:tiny")
    fused = load_vae_source("recipe:tiny")
    n = fuse_norm_silu(fused)                           # no library: the torch reference runs
    blocks = sum(1 for name, _ in vae.named_modules() if name.endswith(".residual"))
    assert n == 2 * blocks + 2                          # two per residual branch + both heads
    assert isinstance(fused.decoder.head[0], FusedRMSNormSiLU)
    assert list(fused.state_dict()) == list(vae.state_dict())
    latent = torch.randn(1, 16, 2, 2, 2, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(fused.decode(latent), vae.decode(latent), rtol=1e-6, atol=1e-6)
    assert fuse_norm_silu(fused) == 0                   # idempotent


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_vae_on_gpu_matches_eager(library, channels_last):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from wanimate.engine.vae_fast import FastVAE
    from wanimate.export.native import fuse_norm_silu
    from wanimate.export.onnx import load_vae_source

    vae = load_vae_source("recipe:tiny").cuda()
    fused = load_vae_source("recipe:tiny").cuda()
    assert fuse_norm_silu(fused, NativeOps.load(library)) > 0
    model = FastVAE(fused, channels_last=True) if channels_last else fused
    latent = torch.randn(1, 16, 3, 6, 10, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        ref, got = vae.decode(latent), model.decode(latent)
    assert float((got - ref).norm() / ref.norm()) <= 1e-5
