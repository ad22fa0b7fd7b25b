"""Attention backends: the Triton kernels (under TRITON_INTERPRET=1 on a CPU), their torch
simulation, quality against fp32 SDPA on DiT-like activations, the model transform, the hybrid
schedule, and the tiny DiT end to end with each backend.

The interpreter must be switched on before the kernels are decorated, i.e. before
wanimate.kernels.attention is first imported; this module does that at import (pytest imports
test modules before running any test). If something imported the kernels earlier without it,
the interpreter tests re-run themselves in a child process.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from wanimate.engine import attention as E  # noqa: E402
from wanimate.engine.config import DiTConfig  # noqa: E402
from wanimate.engine.errors import ValidationError  # noqa: E402
from wanimate.engine.loader import recipe_dit  # noqa: E402
from wanimate.kernels import attention as A  # noqa: E402

INTERP = A.kernels_interpreted()
DEVICE = "cuda" if torch.cuda.is_available() and not INTERP else "cpu"
# Small tiles under the interpreter (fast, several tiles + a masked tail), the real ones on a GPU.
CFG = A.INTERPRETER_CONFIG if INTERP else None


def stats(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    g, r = got.double().flatten(), ref.double().flatten()
    return float(torch.dot(g, r) / (g.norm() * r.norm())), float((g - r).norm() / r.norm())


def kernel_test(fn):
    """Run `fn` in-process where the kernels can run; otherwise re-run it in a child with the
    interpreter on (the kernels were imported before this module could switch it on)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if INTERP or DEVICE == "cuda":
            return fn(*args, **kwargs)
        node = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
        env = dict(os.environ, TRITON_INTERPRET="1")
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", node],
                           env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return wrapper


# ----------------------------------------------------------------------------------------------
# The quantized math (torch simulation) against fp32 SDPA


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("q_gain", [0.5, 1.0])
def test_sim_quality_on_dit_like_activations(seed, q_gain):
    """Brief's bounds: cos >= 0.999, rel L2 <= 3% on q/k with 4 channels per head 10-50x larger,
    at a moderate (q_gain 0.5) and a near one-hot (1.0) softmax, 1k tokens, odd length."""
    q, k, v = A.wan_like_qkv(1, 1023, 4, 128, seed=seed, q_gain=q_gain)
    ref = A.attention_ref(q, k, v)
    cos, rel = stats(A.sage_attention_sim(q, k, v, block_n=128), ref)
    assert cos >= 0.999 and rel <= 0.03, (cos, rel)
    # bf16 SDPA on the same inputs, for scale: the quantized kernel costs more, but not 30x more.
    _, rel_bf16 = stats(E.sdpa(q, k, v), ref)
    assert rel > rel_bf16 and rel < 30 * max(rel_bf16, 1e-3)


def test_sim_quality_adversarial_iid_v():
    """V with no shared component (i.i.d. N(0,1)): fp8 V alone costs ~2.6% rel L2 whatever the
    scale, so the total is ~3.5% here. Recorded as a looser bound (see the report)."""
    q, k, v = A.wan_like_qkv(1, 1023, 4, 128, seed=2, q_gain=0.5, v_mean=0.0)
    cos, rel = stats(A.sage_attention_sim(q, k, v), A.attention_ref(q, k, v))
    assert cos >= 0.999 and 0.02 < rel <= 0.045, (cos, rel)


def test_sim_smoothing_and_rotation_are_what_make_it_accurate():
    """The outlier data is hard: without K smoothing the error is ~10x; without the rotation the
    Q outliers cost about 1.5x. (A test that cannot fail would pass these too.)"""
    q, k, v = A.wan_like_qkv(1, 767, 2, 128, seed=3, q_gain=1.0)
    ref = A.attention_ref(q, k, v)
    rel = lambda **kw: stats(A.sage_attention_sim(q, k, v, **kw), ref)[1]
    full, no_rot, no_smooth = rel(), rel(rotate=False), rel(rotate=False, smooth_k=False)
    assert full < 0.03 and no_rot > 1.3 * full and no_smooth > 0.1, (full, no_rot, no_smooth)


def test_rotation_matrix_is_scaled_orthogonal_and_fixed():
    for d in (32, 64, 128):
        r = A.rotation_matrix(d)
        assert set(r.unique().tolist()) == {-1.0, 1.0}
        torch.testing.assert_close(r @ r.T, d * torch.eye(d))
        assert torch.equal(r, A.rotation_matrix(d))
    r = A.rotation_matrix(128)
    assert not torch.equal(r[:, 0], r[:, 0].abs())     # random signs, not the plain Sylvester matrix


def test_reference_is_fp32_sdpa():
    q, k, v = (torch.randn(2, 33, 3, 16, dtype=torch.bfloat16) for _ in range(3))
    ref = A.attention_ref(q, k, v)
    s = torch.einsum("blhd,bmhd->bhlm", q.double(), k.double()) / 4.0
    exact = torch.einsum("bhlm,bmhd->blhd", s.softmax(-1), v.double())
    assert ref.dtype == torch.float32
    torch.testing.assert_close(ref.double(), exact, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# The Triton kernels


@kernel_test
@pytest.mark.parametrize("shape", [(2, 70, 45, 1, 32), (1, 100, 100, 2, 64), (1, 96, 131, 2, 128)])
def test_sage_kernel_matches_simulation(shape):
    """Same math as the simulation (int8 exact, fp8 round-to-nearest-even, same online softmax):
    only fp32 summation order differs. Odd Lq / Lk exercise the padded query rows and the masked
    last key tile; Lq != Lk is the cross-attention case."""
    b, lq, lk, h, d = shape
    q, k, v = A.wan_like_qkv(b, lq, h, d, lk=lk, seed=sum(shape), device=DEVICE)
    cfg = CFG or A.default_config("sage", q.device)
    got = A.sage_attention(q, k, v, config=cfg)
    assert got.shape == q.shape and got.dtype == q.dtype
    sim = A.sage_attention_sim(q.cpu(), k.cpu(), v.cpu(), block_n=cfg.block_n)
    _, rel_sim = stats(got.cpu(), sim)
    assert rel_sim < 3e-3, rel_sim
    cos, rel = stats(got.cpu(), A.attention_ref(q, k, v).cpu())
    assert cos >= 0.999 and rel <= 0.03, (cos, rel)


@kernel_test
def test_sage_kernel_tma_descriptors_match_pointer_loads():
    """The TMA variant reads the same quantized operands through tensor descriptors."""
    q, k, v = A.wan_like_qkv(2, 70, 2, 64, lk=45, seed=9, device=DEVICE)
    base = CFG or A.default_config("sage", q.device)
    ptr = A.AttnConfig(base.block_m, base.block_n, base.num_warps, base.num_stages, tma=False)
    tma = A.AttnConfig(base.block_m, base.block_n, base.num_warps, base.num_stages, tma=True)
    got, ref = A.sage_attention(q, k, v, config=tma), A.sage_attention(q, k, v, config=ptr)
    assert stats(got.cpu(), ref.cpu())[1] < 1e-3


# The schedule variants (AttnConfig.pipe / ws / poly, on top of pointer or TMA loads): same math.
VARIANTS = [dict(pipe=True), dict(pipe=True, tma=True), dict(poly=True), dict(pipe=True, poly=True, tma=True),
            dict(ws=True, tma=True)]


@kernel_test
@pytest.mark.parametrize("flags", VARIANTS, ids=lambda f: "+".join(f))
@pytest.mark.parametrize("shape", [(2, 70, 45, 1, 32), (1, 40, 96, 2, 64), (1, 33, 20, 1, 128)],
                         ids=["2tiles+tail", "3full_tiles", "1tile+tail"])
def test_sage_variants_match_simulation_and_reference(flags, shape):
    """Each variant against the simulation and fp32 SDPA (the brief's cos >= 0.999, rel L2 <= 3%),
    at several key tiles with a masked tail, an exact multiple of BLOCK_N (the pipelined loop's
    peeled last tile unmasked) and a single tile (its loop body never runs). Without the
    polynomial the pipelined loop does the same fp32 operations in the same order: equal to the
    default kernel under the interpreter."""
    b, lq, lk, h, d = shape
    q, k, v = A.wan_like_qkv(b, lq, h, d, lk=lk, seed=sum(shape) + 1, device=DEVICE)
    base = CFG or A.default_config("sage", q.device)
    cfg = dataclasses.replace(base, **flags)
    got = A.sage_attention(q, k, v, config=cfg)
    assert got.shape == q.shape and got.dtype == q.dtype
    sim = A.sage_attention_sim(q.cpu(), k.cpu(), v.cpu(), block_n=cfg.block_n)
    assert stats(got.cpu(), sim)[1] < 3e-3
    cos, rel = stats(got.cpu(), A.attention_ref(q, k, v).cpu())
    assert cos >= 0.999 and rel <= 0.03, (cos, rel)
    default = A.sage_attention(q, k, v, config=dataclasses.replace(base, tma=cfg.tma))
    rel_default = stats(got.cpu(), default.cpu())[1]
    if INTERP and not cfg.poly:
        assert rel_default == 0.0, rel_default
    else:
        assert rel_default < 2e-3, rel_default


# e4m3 Q·K (qk8), its FA3-ordered loop (fa3) and the one-level P·V accumulation (acc1).
QK8_VARIANTS = [dict(qk8=True), dict(qk8=True, tma=True), dict(qk8=True, fa3=True), dict(qk8=True, fa3=True, tma=True),
                dict(qk8=True, fa3=True, acc1=True, tma=True), dict(qk8=True, acc1=True), dict(acc1=True),
                dict(acc1=True, tma=True, poly=True), dict(qk8=True, fa3=True, poly=True)]


@kernel_test
@pytest.mark.parametrize("flags", QK8_VARIANTS, ids=lambda f: "+".join(f))
@pytest.mark.parametrize("shape", [(2, 70, 45, 1, 32), (1, 40, 96, 2, 64), (1, 33, 20, 1, 128)],
                         ids=["2tiles+tail", "3full_tiles", "1tile+tail"])
def test_sage_qk8_and_acc1_match_simulation(flags, shape):
    """Kernel vs the simulation with e4m3 Q/K rounding (qk_fp8), both ways: close to it, and
    clearly farther from the int8 simulation (so the kernel really quantized Q·K to e4m3, and
    acc1 alone really kept int8). The fa3 loop at several key tiles with a masked tail, an exact
    multiple of BLOCK_N (peeled last tile unmasked) and a single tile (loop body never runs)."""
    b, lq, lk, h, d = shape
    q, k, v = A.wan_like_qkv(b, lq, h, d, lk=lk, seed=sum(shape) + 2, device=DEVICE)
    cfg = dataclasses.replace(CFG or A.default_config("sage", q.device), **flags)
    got = A.sage_attention(q, k, v, config=cfg).cpu()
    assert got.shape == q.shape and got.dtype == q.dtype
    sims = {fp8: A.sage_attention_sim(q.cpu(), k.cpu(), v.cpu(), block_n=cfg.block_n, qk_fp8=fp8)
            for fp8 in (False, True)}
    same, other = stats(got, sims[cfg.qk8])[1], stats(got, sims[not cfg.qk8])[1]
    assert same < 3e-3 and other > 3 * same, (same, other)
    if cfg.qk8 and not cfg.poly:
        # Same fp32 operations as the plain qk8 loop (fa3 only reorders them; acc1 rounds once
        # less): equal under the interpreter up to that rounding.
        plain = A.sage_attention(q, k, v, config=dataclasses.replace(cfg, fa3=False, acc1=False)).cpu()
        assert stats(got, plain)[1] < (1e-3 if cfg.acc1 else 1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_qk8_sim_quality_vs_int8(seed):
    """e4m3 Q·K on DiT-like q/k (4 channels per head 10-50x larger), 1k tokens: within the brief's
    bounds (cos >= 0.999, rel L2 <= 3%) at the moderate softmax (q_gain 0.5), but ~2.5x the
    error of int8 Q·K (e4m3 keeps 3 mantissa bits: relative rounding error up to 1/16 per
    element, against int8's 1/254 of the row maximum); at the near one-hot softmax (q_gain 1.0)
    it leaves the bound (~5.8% vs 2.2%). Recorded so a change in either shows."""
    q, k, v = A.wan_like_qkv(1, 1023, 4, 128, seed=seed, q_gain=0.5)
    ref = A.attention_ref(q, k, v)
    cos8, rel8 = stats(A.sage_attention_sim(q, k, v, qk_fp8=True), ref)
    _, rel_int8 = stats(A.sage_attention_sim(q, k, v), ref)
    assert cos8 >= 0.999 and rel8 <= 0.03, (cos8, rel8)
    assert 1.8 * rel_int8 < rel8 < 3.5 * rel_int8, (rel8, rel_int8)
    q, k, v = A.wan_like_qkv(1, 1023, 4, 128, seed=seed, q_gain=1.0)
    ref = A.attention_ref(q, k, v)
    _, rel8_hot = stats(A.sage_attention_sim(q, k, v, qk_fp8=True), ref)
    _, rel_int8_hot = stats(A.sage_attention_sim(q, k, v), ref)
    assert rel_int8_hot <= 0.03 < rel8_hot < 0.08, (rel8_hot, rel_int8_hot)


def test_sim_accumulator_truncation_model():
    """pv_acc_bits models the fp8 MMA's reduced-precision accumulation: with 23 bits it is fp32
    (equal to the plain sim up to summation order); at 8 bits one-level accumulation over many
    key tiles is clearly worse than two-level, which only truncates within one tile."""
    q, k, v = A.wan_like_qkv(1, 64, 2, 64, lk=2048, seed=4)
    ref = A.attention_ref(q, k, v)
    plain = A.sage_attention_sim(q, k, v, block_n=64)
    full = A.sage_attention_sim(q, k, v, block_n=64, pv_acc_bits=23, pv_one_level=True)
    assert stats(full, plain)[1] < 1e-5
    one = stats(A.sage_attention_sim(q, k, v, block_n=64, pv_acc_bits=8, pv_one_level=True), ref)[1]
    two = stats(A.sage_attention_sim(q, k, v, block_n=64, pv_acc_bits=8), ref)[1]
    assert one > 1.25 * two, (one, two)


@kernel_test
def test_exp2_polynomial():
    """The FMA-pipe 2^t of the poly variant: relative error < 1e-4 on the range the softmax uses
    (t <= log2(448)), including exact integers and the rounding midpoints; below -120 it returns
    ~2^-120 (nothing e4m3 keeps) and -inf gives the same, never NaN or garbage exponents."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(T, P, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(P + offs, A._exp2_poly(tl.load(T + offs)))

    t = torch.cat([torch.linspace(-119.9, 8.81, 4000), torch.arange(-119.0, 9.0), torch.arange(-119.5, 8.5),
                   torch.tensor([-120.5, -300.0, -math.inf, 0.0])])
    t = torch.cat([t, t.new_zeros(8192 - t.numel())]).to(DEVICE)
    p = torch.empty_like(t)
    kernel[(1,)](t, p, N=t.numel())
    t, p = t.cpu().double(), p.cpu().double()
    ok = t >= -120
    rel = (p[ok] / torch.exp2(t[ok]) - 1).abs().max()
    assert rel < 1e-4, float(rel)
    assert torch.all((p[~ok] / 2.0**-120 - 1).abs() < 1e-4)


@kernel_test
def test_sage_kernel_q_groups_and_no_rotation():
    q, k, v = A.wan_like_qkv(1, 64, 2, 64, lk=80, seed=5, device=DEVICE)
    cfg = CFG or A.default_config("sage", q.device)
    for kw in (dict(q_group=4), dict(q_group=cfg.block_m), dict(rotate=False)):
        got = A.sage_attention(q, k, v, config=cfg, **kw)
        sim = A.sage_attention_sim(q.cpu(), k.cpu(), v.cpu(), block_n=cfg.block_n, **kw)
        assert stats(got.cpu(), sim)[1] < 3e-3, kw
    # Coarser Q groups quantize worse, and the kernel sees it.
    fine = stats(A.sage_attention(q, k, v, config=cfg).cpu(), A.attention_ref(q, k, v).cpu())[1]
    coarse = stats(A.sage_attention(q, k, v, config=cfg, q_group=cfg.block_m, rotate=False).cpu(),
                   A.attention_ref(q, k, v).cpu())[1]
    assert coarse > fine


@kernel_test
def test_quantized_operands_layout():
    b, lq, lk, h, d = 2, 40, 37, 3, 32
    q, k, v = A.wan_like_qkv(b, lq, h, d, lk=lk, seed=7, dtype=torch.float32, device=DEVICE)
    qq = A.quantize_qkv(q, k, v, block_m=32, block_n=32)
    assert qq.q8.shape == (b, h, 64, d) and qq.k8.shape == (b, h, 64, d) and qq.vt8.shape == (b, h, d, 64)
    assert qq.k_scale.shape == (b, h, 2) and qq.q_scale.shape == (b, h, 64)
    assert (qq.q8[:, :, lq:] == 0).all() and (qq.k8[:, :, lk:] == 0).all()
    assert (qq.vt8[..., lk:].float() == 0).all()
    r = A.rotation_matrix(d)
    # Dequantized K = k R - mean(k R) to within half a step; Q likewise per token.
    kr = (k.cpu().float() @ r).transpose(1, 2)
    kr = kr - kr.mean(2, keepdim=True)
    k_deq = qq.k8.cpu().float().reshape(b, h, 2, 32, d) * qq.k_scale.cpu()[..., None, None]
    err = (k_deq.reshape(b, h, 64, d)[:, :, :lk] - kr).abs().amax()
    assert err <= 0.5 * qq.k_scale.max() * 1.001
    qr = (q.cpu().float() @ r).transpose(1, 2)
    q_deq = qq.q8.cpu().float()[:, :, :lq] * (qq.q_scale.cpu()[:, :, :lq, None] / (A.LOG2E / math.sqrt(d) / d))
    assert ((q_deq - qr).abs() / qr.abs().amax(-1, keepdim=True)).max() <= 0.5 / 127 * 1.001
    # V: e4m3 keeps 3 mantissa bits (relative error <= 2^-4), subnormals a step of 2^-9 * scale.
    vs = qq.v_scale.cpu()[:, :, None]
    z = v.cpu().float().transpose(1, 2) - qq.v_mean.cpu()[:, :, None]
    torch.testing.assert_close(qq.v_mean.cpu(), v.cpu().float().mean(1), rtol=1e-5, atol=1e-6)
    z_deq = qq.vt8.cpu().float()[..., :lk].transpose(-1, -2) * vs
    assert ((z_deq - z).abs() <= 2.0**-4 * z.abs() + 2.0**-10 * vs * 1.001).all()
    assert (z.abs().amax(2) / qq.v_scale.cpu() - A.FP8_MAX).abs().max() < 1e-3      # full range used


@kernel_test
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 6e-3), (torch.float16, 1e-3), (torch.float32, 1e-5)])
def test_triton_bf16_kernel_matches_reference(dtype, tol):
    if DEVICE == "cuda" and dtype == torch.float32:
        tol = 3e-3                                                      # tf32 on the GPU
    q, k, v = A.wan_like_qkv(2, 77, 2, 64, lk=50, seed=11, dtype=dtype, device=DEVICE)
    got = A.triton_attention(q, k, v, config=CFG)
    assert got.dtype == dtype and got.shape == q.shape
    cos, rel = stats(got.cpu(), A.attention_ref(q, k, v).cpu())
    assert rel <= tol and cos > 0.99999, (cos, rel)


@kernel_test
def test_custom_ops_and_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    q, k, v = A.wan_like_qkv(1, 40, 2, 32, lk=33, seed=3, device=DEVICE)
    cfg = CFG or A.default_config("sage", q.device)
    out = torch.ops.wanimate.sage_attention(q, k, v, cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, 1)
    torch.testing.assert_close(out, A.sage_attention(q, k, v, config=cfg))
    piped = dataclasses.replace(cfg, pipe=True, poly=True)
    out = torch.ops.wanimate.sage_attention(q, k, v, 0, 0, 0, 0, 1, spec=piped.spec)    # the spec wins
    torch.testing.assert_close(out, A.sage_attention(q, k, v, config=piped))
    out = torch.ops.wanimate.triton_attention(q, k, v, cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages)
    torch.testing.assert_close(out, A.triton_attention(q, k, v, config=cfg))
    with FakeTensorMode():
        fq, fk = torch.empty(2, 1000, 4, 128, dtype=torch.bfloat16), torch.empty(2, 77, 4, 128, dtype=torch.bfloat16)
        assert torch.ops.wanimate.sage_attention(fq, fk, fk, 128, 128, 8, 3, 1).shape == fq.shape
        assert torch.ops.wanimate.triton_attention(fq, fk, fk, 128, 64, 8, 3).shape == fq.shape


@pytest.mark.slow
def test_default_configs_compile_for_sm90_without_spills():
    """Offline sm_90 compile with Triton's bundled ptxas (no GPU): the default Hopper configs must
    not spill registers, and the sage loop must issue its two MMAs per key tile on wgmma."""
    pytest.importorskip("triton")
    # A child without the interpreter: compiling needs the real @triton.jit kernels.
    code = ("import json; from wanimate.bench.attention import compile_report; "
            "from wanimate.kernels.attention import DEFAULT_CONFIGS as C; "
            "print(json.dumps({k: compile_report(k, C[(k, 9)]) for k in ('sage', 'triton')}))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    reports = json.loads(r.stdout.strip().splitlines()[-1])
    for kernel, rec in reports.items():
        cfg = A.DEFAULT_CONFIGS[(kernel, 9)]
        if "registers" not in rec:
            pytest.skip(rec.get("note", "no SASS tools"))
        assert rec["stack_bytes"] == 0 and rec["registers"] <= 255, (kernel, rec)
        assert rec["loop_mma"] >= 2 and rec["loop_mufu"] >= cfg.block_m * cfg.block_n // (32 * cfg.num_warps)


def test_kernel_input_validation():
    q = torch.randn(1, 8, 2, 48)
    with pytest.raises(ValidationError, match="power of two"):
        A.sage_attention(q, q, q)
    with pytest.raises(ValidationError, match="must match"):
        A.triton_attention(torch.randn(1, 8, 2, 32), torch.randn(1, 8, 3, 32), torch.randn(1, 8, 3, 32))
    with pytest.raises(ValidationError, match="share one float dtype"):
        x = torch.randn(1, 8, 2, 32)
        A.triton_attention(x, x.half(), x)
    with pytest.raises(ValidationError, match="CUDA"):
        x = torch.randn(1, 8, 2, 32, device="meta")
        A.triton_attention(x, x, x)
    with pytest.raises(ValidationError, match="power of two"):
        A.AttnConfig(block_m=96)
    with pytest.raises(ValidationError, match="sage kernel only"):
        x = torch.randn(1, 8, 2, 32)
        A.triton_attention(x, x, x, config=A.AttnConfig(32, 32, 4, 1, tma=True))
    assert A.parse_config("128x64x8x3xtma") == A.AttnConfig(128, 64, 8, 3, True)
    assert A.parse_config(A.AttnConfig(64, 32, 4, 2).spec) == A.AttnConfig(64, 32, 4, 2)
    full = A.AttnConfig(64, 128, 4, 3, tma=True, pipe=True, poly=True, maxnreg=168)
    assert full.spec == "64x128x4x3xtmaxpipexpolyxr168" and A.parse_config(full.spec) == full
    assert A.parse_config("64x128x4x3xtmaxws") == A.AttnConfig(64, 128, 4, 3, tma=True, ws=True)
    qk8 = A.parse_config("64x128x4x3xtmaxqk8xfa3xacc1")
    assert qk8 == A.AttnConfig(64, 128, 4, 3, tma=True, qk8=True, fa3=True, acc1=True) and qk8.spec == "64x128x4x3xtmaxqk8xfa3xacc1"
    assert A.parse_config("128x128x8x3xtmaxqk8") == A.AttnConfig(128, 128, 8, 3, tma=True, qk8=True)
    # The Hopper default is the sweep's winner: INT8 Q·K (qk8 costs 2-3x the error), one-level P·V.
    assert A.DEFAULT_CONFIGS[("sage", 9)] == A.parse_config("64x128x4x3xtmaxacc1")
    for bad in ("64x128x4x3xpipexws", "64x128x4x3xtmaxtma", "64x128x4x3xfoo", "64x128x4x3xr7", "64x128x4xtma",
                "64x128x4x3xfa3", "64x128x4x3xpipexqk8", "64x128x4x3xwsxacc1", "64x128x4x3xqk8xqk8"):
        with pytest.raises(ValidationError):
            A.parse_config(bad)
    with pytest.raises(ValidationError, match="sage kernel only"):
        x = torch.randn(1, 8, 2, 32)
        A.triton_attention(x, x, x, config=A.AttnConfig(32, 32, 4, 1, pipe=True))
    with pytest.raises(ValidationError, match="q_group"):
        x = torch.randn(1, 8, 2, 32)
        A.quantize_qkv(x, x, x, block_m=32, block_n=32, q_group=3)


# ----------------------------------------------------------------------------------------------
# engine/attention.py: registry, transform, report, schedule


def test_registry_and_missing_packages():
    assert E.available_backends() == ["flash", "sage", "sdpa", "triton", "xformers"]
    with pytest.raises(ValidationError, match="unknown attention backend 'fa9'"):
        E.attention(torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 1, 8), "fa9")
    for name, package in (("flash", "flash_attn"), ("xformers", "xformers")):
        try:
            __import__(package)
        except ImportError:
            with pytest.raises(ValidationError, match="pip install"):
                E.get_backend(name)
    q, k, v = (torch.randn(2, 9, 3, 16) for _ in range(3))
    torch.testing.assert_close(E.attention(q, k, v), A.attention_ref(q, k, v))


def _tiny_cfg() -> DiTConfig:
    return DiTConfig(dim=64, ffn_dim=96, num_heads=2, num_layers=5, text_dim=32, text_len=24, image_dim=32,
                     motion_size=16, motion_width=32, motion_encoder_dim=32, face_hidden=48)


def _tiny_inputs(cfg: DiTConfig, seed: int, frames: int = 2, hw=(16, 16)):
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    return (torch.randn(1, 16, frames + 1, h, w, generator=g), torch.tensor([731]),
            torch.randn(1, 20, frames + 1, h, w, generator=g), torch.randn(1, 16, frames, h, w, generator=g),
            torch.rand(1, 3, 4 * frames - 3, cfg.motion_size, cfg.motion_size, generator=g) * 2 - 1,
            torch.randn(1, 9, cfg.text_dim, generator=g), torch.randn(1, 257, cfg.image_dim, generator=g))


def test_set_backend_and_report():
    model = recipe_dit(_tiny_cfg(), base_seed=5)
    assert E.attention_report(model) == {"cross": "sdpa", "face": "sdpa", "self": "sdpa"}
    assert E.set_attention_backend(model, "triton") is model
    report = E.attention_report(model)
    assert report["self"] == "triton" and report["cross"] == "sdpa" and report["face"] == "sdpa"
    assert set(report["kernels"]["triton"]) == {"block_m", "block_n", "num_warps", "num_stages", "tma", "pipe", "ws",
                                                "poly", "qk8", "fa3", "acc1", "maxnreg"}
    E.set_attention_backend(model, "sage", which="all")
    assert {k: E.attention_report(model)[k] for k in E.ATTENTION_KINDS} == dict.fromkeys(E.ATTENTION_KINDS, "sage")
    model.blocks[0].self_attn.backend = "sdpa"
    assert E.attention_report(model)["self"] == "mixed:sage,sdpa"
    E.set_attention_backend(model, "sdpa", which=["self", "face"])
    assert E.attention_report(model)["face"] == "sdpa" and E.attention_report(model)["cross"] == "sage"
    with pytest.raises(ValidationError, match="which"):
        E.set_attention_backend(model, "sdpa", which=("self", "ffn"))
    with pytest.raises(ValidationError, match="unknown attention backend"):
        E.set_attention_backend(model, "flash3")
    with pytest.raises(ValidationError, match="no"):
        E.set_attention_backend(torch.nn.Linear(2, 2), "sdpa")
    # A pinned kernel config travels in the name and shows in the report.
    E.set_attention_backend(model, "sage:64x32x4x2")
    assert E.attention_report(model)["kernels"]["sage:64x32x4x2"] == dict(block_m=64, block_n=32, num_warps=4,
                                                                         num_stages=2, tma=False, pipe=False,
                                                                         ws=False, poly=False, qk8=False, fa3=False,
                                                                         acc1=False, maxnreg=0)
    for bad in ("sage:64x32x4", "sage:64x48x4x2", "sdpa:64x32x4x2"):
        with pytest.raises(ValidationError):
            E.set_attention_backend(model, bad)


def test_attention_schedule():
    assert E.attention_schedule(5, "sage") == ["sdpa", "sage", "sage", "sage", "sdpa"]
    assert E.attention_schedule(4, "sage", exact_first=2, exact_last=0) == ["sdpa", "sdpa", "sage", "sage"]
    assert E.attention_schedule(3, "sage", 0, 0) == ["sage"] * 3
    assert E.attention_schedule(2, "sage", 2, 2) == ["sdpa", "sdpa"]         # overlap: all exact
    assert E.attention_schedule(0, "sage") == []
    assert E.attention_schedule(3, "sage", exact="triton") == ["triton", "sage", "triton"]
    for bad in (dict(steps=-1), dict(exact_first=-1), dict(exact_last=1.5), dict(steps=True)):
        kw = dict(steps=4, backend="sage") | bad
        with pytest.raises(ValidationError):
            E.attention_schedule(**kw)
    with pytest.raises(ValidationError, match="unknown"):
        E.attention_schedule(4, "sage8")
    with pytest.raises(ValidationError, match="exact backend"):
        E.attention_schedule(4, "triton", exact="sage")
    assert E.attention_schedule(3, "sage:128x64x8x3xtma", exact="triton:128x64x8x3")[1] == "sage:128x64x8x3xtma"


@pytest.mark.slow
@kernel_test
def test_tiny_dit_end_to_end_with_each_backend():
    """The tiny DiT (head dim 32, 192 video tokens, 281 context tokens) with each Triton backend on
    self-attention and on every attention, against sdpa; rel L2 of the prediction printed."""
    cfg = _tiny_cfg()
    model = recipe_dit(cfg, base_seed=21)
    x = _tiny_inputs(cfg, 4)
    with torch.no_grad():
        ref = model(*x)
        results = {}
        for name, which, bound in (("triton", "self", 1e-5), ("triton:16x16x4x1", "all", 1e-5),
                                   ("sage", "self", 0.03), ("sage:32x64x4x1", "all", 0.05)):
            E.set_attention_backend(model, name, which=which)
            got = model(*x)
            E.set_attention_backend(model, "sdpa", which="all")
            results[f"{name}/{which}"] = rel = stats(got, ref)[1]
            assert torch.isfinite(got).all() and rel <= bound, (name, which, rel)
    print("tiny DiT rel L2 vs sdpa:", {k: f"{v:.2e}" for k, v in results.items()})
    assert results["sage/self"] > 1e-4           # the quantized path really ran
