"""engine/sampler.py: official schedules, solver arithmetic, fixtures, diffusers comparison."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from wanimate.engine.errors import ValidationError
from wanimate.engine.sampler import (FlowDPMPP, FlowUniPC, Schedule, make_schedule,
                                     make_solver)
from wanimate.engine.verify import sampler as sampler_runner

FIXTURES = Path(__file__).parent / "data" / "fixtures"


def load_meta(path: Path) -> dict:
    return json.loads(Path(path).read_text())


SAMPLER_FIXTURES = ["sampler_unipc", "sampler_dpmpp"]


def _toy(x, t):
    return 0.5 * x + 0.01 * (t.to(torch.float32) / 1000.0)


def _run(schedule: Schedule, x: torch.Tensor, model=_toy, **options) -> list[torch.Tensor]:
    solver = make_solver(schedule, **options)
    out = []
    for t in schedule.timesteps:
        x = solver.step(model(x, t[None]), x)
        out.append(x)
    assert solver.done
    return out


# --------------------------------------------------------------------------------- fixtures

@pytest.mark.parametrize("name", SAMPLER_FIXTURES)
def test_fixture_runner(name):
    path = FIXTURES / f"{name}.json"
    checks = sampler_runner.run(path, load_meta(path))
    failed = [(c.output, c.max_abs, c.rel_l2, c.note) for c in checks if not c.passed]
    assert not failed, failed
    outputs = {c.output.split(".")[0] for c in checks}
    assert {"timesteps", "sigmas", "traj", "final", "traj_autocast", "final_autocast"} <= outputs
    runs = load_meta(path)["runs"]
    assert len([c for c in checks if c.output.startswith("final.")]) == len(runs)


def test_fixture_runner_detects_a_wrong_solver(tmp_path):
    """The runner must fail (not pass vacuously) when the arithmetic is wrong: feed the UniPC
    fixture's data under a DPM++ module name."""
    meta = load_meta(FIXTURES / "sampler_unipc.json")
    meta["call"]["module"] = "wan.utils.fm_solvers"
    (tmp_path / "x.json").write_text(json.dumps(meta))
    os.symlink(FIXTURES / "sampler_unipc.safetensors", tmp_path / "x.safetensors")
    checks = sampler_runner.run(tmp_path / "x.json", meta)
    assert not all(c.passed for c in checks)


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="torch built without MKL")
def test_fixtures_bitwise_on_the_generators_mkl_code_path():
    """torch.log/exp/expm1 go through MKL VML, whose last bit depends on the CPU code path.
    The fixtures were made where MKL ran its SSE4.2 path; forcing that path here makes every
    trajectory bitwise equal (on AVX-512 one coefficient is 1 ulp off: max abs 2.4e-7)."""
    code = ("import json,sys; from pathlib import Path; from wanimate.engine.verify import sampler as s\n"
            "res = {}\n"
            f"for n in {SAMPLER_FIXTURES!r}:\n"
            f"    p = Path({str(FIXTURES)!r}) / (n + '.json')\n"
            "    for c in s.run(p, json.loads(p.read_text())):\n"
            "        res[n + ':' + c.output] = c.max_abs\n"
            "print(json.dumps(res))\n")
    env = dict(os.environ, MKL_ENABLE_INSTRUCTIONS="SSE4_2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(res) >= 40
    assert {k: v for k, v in res.items() if v != 0} == {}


# -------------------------------------------------------------------------------- schedules

def test_official_timesteps():
    # reference NOTES §7 (measured on the official code) and e2e README §5
    assert make_schedule("unipc", 20, 5.0).timesteps.tolist() == [
        999, 989, 978, 965, 952, 937, 920, 902, 882, 859, 833, 803, 768, 728, 681, 624, 555, 468, 356, 208]
    assert make_schedule("dpm++", 20, 5.0).timesteps.tolist() == [
        1000, 989, 978, 965, 952, 937, 921, 902, 882, 859, 833, 803, 769, 729, 681, 625, 555, 468, 357, 208]
    assert make_schedule("unipc", 4).timesteps.tolist() == [999, 937, 833, 624]
    assert make_schedule("dpm++", 4).timesteps.tolist() == [1000, 937, 833, 625]


@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
def test_schedule_formula(solver):
    rng = np.random.default_rng()
    for _ in range(5):
        steps = int(rng.integers(1, 60))
        shift = float(rng.uniform(0.5, 12.0))
        sch = make_schedule(solver, steps, shift)
        top = float(np.float32(0.999)) if solver == "unipc" else 1.0
        s = top * (1 - np.arange(steps) / steps)            # the linspace, float64
        sig = shift * s / (1 + (shift - 1) * s)
        assert sch.timesteps.dtype == torch.int64 and sch.sigmas.dtype == torch.float32
        assert sch.steps == steps and sch.sigmas.shape == (steps + 1,)
        np.testing.assert_allclose(sch.sigmas[:-1].numpy(), sig.astype(np.float32), rtol=0, atol=1e-7)
        assert sch.sigmas[-1].item() == 0.0
        assert torch.all(sch.sigmas[1:] < sch.sigmas[:-1])
        # int(sigma * 1000): the float64 sigma, truncated (off by one at most where the float64
        # linspace and this formula round differently right at an integer)
        assert (sch.timesteps - torch.from_numpy(np.floor(sig * 1000)).long()).abs().max() <= 1


def test_explicit_timesteps():
    sch = make_schedule("dpm++", [1000, 937.5, 833.3, 625])
    assert sch.timesteps.tolist() == [1000, 937, 833, 625]
    assert sch.sigmas.tolist() == np.array([1.0, 0.9375, 0.8333, 0.625, 0.0], np.float32).tolist()
    assert sch.shift is None and sch.steps == 4
    x = torch.randn(2, 16, 3, 4, 4)
    for solver in ("unipc", "dpm++"):
        out = _run(make_schedule(solver, [1000, 937.5, 833.3, 625]), x)[-1]
        assert torch.isfinite(out).all()
        # Starting exactly at sigma = 1 (lambda = -inf) must behave as the limit of starting
        # just below it (diffusers nudges sigma 1 down by 1e-6 for the same reason).
        near = _run(make_schedule(solver, [999.999, 937.5, 833.3, 625]), x)[-1]
        torch.testing.assert_close(out, near, rtol=1e-4, atol=1e-4)
    one = make_schedule("unipc", [500])
    assert one.timesteps.tolist() == [500] and one.sigmas.tolist() == [0.5, 0.0]
    # A single step from sigma 0.5 lands on the data prediction x - sigma * v.
    x = torch.randn(5)
    torch.testing.assert_close(_run(one, x)[-1], x - 0.5 * _toy(x, one.timesteps[:1]), rtol=0, atol=0)


@pytest.mark.parametrize("args,kwargs", [
    (("euler", 20), {}), (("unipc", 0), {}), (("unipc", -3), {}), (("unipc", 1001), {}),
    (("unipc", 2.5), {}), (("unipc", True), {}), (("unipc", "20"), {}),
    (("unipc", 20, 0.0), {}), (("unipc", 20, -1.0), {}), (("unipc", 20, math.nan), {}),
    (("unipc", 20, math.inf), {}),
    (("dpm++", [900, 950]), {}), (("dpm++", [900, 900]), {}), (("dpm++", [1001, 500]), {}),
    (("dpm++", [500, 0]), {}), (("dpm++", [500, -1]), {}), (("dpm++", []), {}),
    (("dpm++", ["a"]), {}), (("dpm++", [900, math.nan]), {}), (("dpm++", [900, 500], 5.0), {}),
])
def test_invalid_schedule(args, kwargs):
    with pytest.raises(ValidationError):
        make_schedule(*args, **kwargs)


def test_invalid_solver_use():
    sch = make_schedule("unipc", 2)
    with pytest.raises(ValidationError):
        FlowUniPC(sch, order=3)
    with pytest.raises(ValidationError):
        make_solver("unipc")
    solver = make_solver(sch)
    with pytest.raises(ValidationError):
        solver.step(torch.zeros(3), torch.zeros(4))
    x = torch.randn(3)
    for _ in range(2):
        x = solver.step(_toy(x, solver.timestep[None]), x)
    with pytest.raises(ValidationError):
        solver.step(x, x)
    with pytest.raises(ValidationError):
        solver.timestep


# ------------------------------------------------------------------------- solver accuracy

def test_exact_on_the_straight_path():
    """For one data point x0 the true velocity is (x - x0) / sigma; every first-order update of
    either solver is then exact, so each state lies on (1 - sigma) x0 + sigma noise."""
    x0, noise = torch.randn(4, 8), torch.randn(4, 8)
    for solver in ("unipc", "dpm++"):
        sch = make_schedule(solver, 12, 3.0)
        sig = sch.sigmas.double()
        x = ((1 - sig[0]) * x0 + sig[0] * noise).float()
        solver_ = make_solver(sch)
        for i in range(sch.steps):
            v = (x - x0) / sch.sigmas[i]
            x = solver_.step(v, x)
            want = (1 - sig[i + 1]) * x0.double() + sig[i + 1] * noise.double()
            torch.testing.assert_close(x.double(), want, rtol=0, atol=2e-5)


def _gaussian_problem(mu: float, s: float):
    """Data x0 ~ N(mu, s^2) elementwise: the exact velocity and the exact ODE map are known."""
    def velocity(x, sigma):
        var = (1 - sigma) ** 2 * s * s + sigma ** 2
        x0_hat = mu + (1 - sigma) * s * s / var * (x - (1 - sigma) * mu)
        return (x - x0_hat) / sigma

    def flow(x, sigma_from, sigma_to):
        z = (x - (1 - sigma_from) * mu) / math.sqrt((1 - sigma_from) ** 2 * s * s + sigma_from ** 2)
        return (1 - sigma_to) * mu + math.sqrt((1 - sigma_to) ** 2 * s * s + sigma_to ** 2) * z

    return velocity, flow


def _solve_error(solver: str, steps: int, order: int) -> float:
    """Max error against the exact ODE map at sigma 0.1, reached by `steps` steps uniform in
    lambda from sigma 0.9 (an explicit timestep list; its extra last step to sigma 0 is not
    taken: that step returns E[x0 | x], which is not the ODE endpoint, for any order)."""
    velocity, flow = _gaussian_problem(0.7, 0.3)
    lam = np.linspace(math.log(0.1 / 0.9), math.log(0.9 / 0.1), steps + 1)
    sch = make_schedule(solver, list(1000 / (1 + np.exp(lam))))
    gen = torch.Generator().manual_seed(steps)
    x = torch.randn(4096, generator=gen, dtype=torch.float64).float()
    want = flow(x.double(), float(sch.sigmas[0]), float(sch.sigmas[-2]))
    s = make_solver(sch, order=order)
    for i in range(steps):
        x = s.step(velocity(x.double(), float(sch.sigmas[i])).float(), x)
    return (x.double() - want).abs().max().item()


@pytest.mark.parametrize("solver,min_rate1,max_rate1,min_rate2", [
    # error(8 steps) / error(64 steps): 8 for first order, 64 for second, 512 for third.
    ("dpm++", 4, 20, 40),          # DDIM, then DPM-Solver++ 2M
    ("unipc", 30, None, 150),      # UniC raises each order by one: UniPC-1 ~ 2nd, UniPC-2 ~ 3rd
])
def test_convergence_order(solver, min_rate1, max_rate1, min_rate2):
    ns = (8, 16, 32, 64)
    e1 = [_solve_error(solver, n, 1) for n in ns]
    e2 = [_solve_error(solver, n, 2) for n in ns]
    assert all(b < a / 3 for a, b in zip(e1, e2)), (e1, e2)
    assert e1[0] / e1[-1] > min_rate1 and (max_rate1 is None or e1[0] / e1[-1] < max_rate1), e1
    assert e2[0] / e2[-1] > min_rate2, e2


def test_corrector_matters():
    velocity, _ = _gaussian_problem(0.7, 0.3)
    sch = make_schedule("unipc", 6, 5.0)
    x = torch.randn(64)
    outs = []
    for kwargs in ({}, {"corrector": False}, {"disable_corrector": [0, 1, 2, 3, 4]}):
        s, y = FlowUniPC(sch, **kwargs), x.clone()
        for i in range(sch.steps):
            y = s.step(velocity(y, sch.sigmas[i]), y)
        outs.append(y)
    assert not torch.equal(outs[0], outs[1])
    assert torch.equal(outs[1], outs[2])


def test_bf16_history():
    x = torch.randn(1, 16, 3, 8, 8)
    for solver in ("unipc", "dpm++"):
        sch = make_schedule(solver, 8, 5.0)
        a, b = _run(sch, x)[-1], _run(sch, x, bf16_history=True)[-1]
        if solver == "unipc":
            assert not torch.equal(a, b)       # the einsum term really is rounded
            assert (a - b).abs().max() < 1e-3  # ... and only that term
        else:
            assert torch.equal(a, b)           # DPM++ has no einsum: autocast changes nothing


def test_solver_is_shape_and_batch_agnostic():
    sch = make_schedule("unipc", 6)
    x = torch.randn(3, 16, 2, 4, 4)
    whole = _run(sch, x)[-1]
    parts = torch.cat([_run(sch, x[i:i + 1])[-1] for i in range(3)])
    assert torch.equal(whole, parts)
    assert isinstance(make_solver(make_schedule("dpm++", 3)), FlowDPMPP)


# ---------------------------------------------------------------------- diffusers comparison

def _diffusers():
    warnings.filterwarnings("ignore")
    return pytest.importorskip("diffusers")


def test_diffusers_unipc_known_schedule_difference():
    """reference NOTES §15.5 item 3: diffusers' flow-sigma UniPC spaces s over [1, 1/1000)
    instead of the official [0.999, 0), so its timesteps and sigmas differ slightly (its steps
    are the same arithmetic: fed the official grid it reproduces our trajectories bitwise)."""
    diffusers = _diffusers()
    u = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction",
        use_flow_sigmas=True, flow_shift=5.0, predict_x0=True, solver_type="bh2",
        lower_order_final=True, final_sigmas_type="zero")
    u.set_timesteps(20)
    ours = make_schedule("unipc", 20, 5.0)
    assert u.timesteps[-6:].tolist() == [682, 625, 556, 470, 359, 211]
    assert ours.timesteps[-6:].tolist() == [681, 624, 555, 468, 356, 208]
    assert abs(u.sigmas[-2].item() - 0.2116) < 1e-4 and abs(ours.sigmas[-2].item() - 0.2082) < 1e-4
    for steps in (4, 8, 20):
        table_top = float(np.float32(1 - 1 / 1000))
        u.set_timesteps(sigmas=np.linspace(table_top, 0.0, steps + 1)[:-1])
        ours = make_schedule("unipc", steps, 5.0)
        assert torch.equal(u.sigmas, ours.sigmas) and torch.equal(u.timesteps, ours.timesteps)
        x = torch.randn(1, 16, 3, 4, 4)
        y = x.clone()
        solver = make_solver(ours)
        for t in ours.timesteps:
            x = u.step(_toy(x, t[None]), t, x).prev_sample
            y = solver.step(_toy(y, t[None]), y)
        assert torch.equal(x, y)


def test_diffusers_dpmpp_known_schedule_difference():
    """diffusers' DPMSolverMultistepScheduler with flow sigmas starts at sigma 0.9998 (timestep
    999, i.e. the official UniPC grid), the official dpm++ at sigma 1 (timestep 1000); given the
    official sigmas its second-order midpoint steps match ours bitwise."""
    diffusers = _diffusers()
    d = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction",
        use_flow_sigmas=True, flow_shift=5.0, algorithm_type="dpmsolver++",
        solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero")
    d.set_timesteps(20)
    assert d.timesteps.tolist() == make_schedule("unipc", 20, 5.0).timesteps.tolist()
    assert d.timesteps[0].item() == 999 and make_schedule("dpm++", 20).timesteps[0].item() == 1000
    for steps in (4, 8, 20):
        ours = make_schedule("dpm++", steps, 5.0)
        d.set_timesteps(steps)
        d.sigmas, d.timesteps = ours.sigmas.clone(), ours.timesteps.clone()  # no `sigmas=` API
        x = torch.randn(1, 16, 3, 4, 4)
        y = x.clone()
        solver = make_solver(ours)
        for t in ours.timesteps:
            x = d.step(_toy(x, t[None]), t, x).prev_sample
            y = solver.step(_toy(y, t[None]), y)
        assert torch.equal(x, y)
