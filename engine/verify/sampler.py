"""Runner for `sampler` fixtures (fixtures/README.md, sampler_unipc / sampler_dpmpp).

For every run tag in meta['runs'] the schedule is rebuilt from (module, steps, shift), the
fixture's toy model (parsed from meta['call']['model']) drives a fresh solver from
input.latents exactly as wan/animate.py's loop does, and timesteps, sigmas, the trajectory and
the final latents are compared, in float32 and with the pipeline's autocast numerics.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import FixtureError
from ..sampler import make_schedule, make_solver
from . import Check, compare

# Trajectories are expected to match bitwise; this bound leaves room only for a last-bit
# difference in log/expm1 between CPU builds.
TRAJ_REL_TOL = 1e-6

_MODEL_RE = re.compile(
    r"v\s*=\s*(?P<a>[0-9.eE+-]+)\s*\*\s*x\s*\+\s*(?P<b>[0-9.eE+-]+)\s*\*\s*"
    r"\(\s*t\.to\(torch\.float32\)\s*/\s*(?P<c>[0-9.eE+-]+)\s*\)")


def toy_model(meta: dict):
    """v = a * x + b * (t.float() / c) in float32, from the fixture's own description."""
    text = str(meta.get("call", {}).get("model", ""))
    found = _MODEL_RE.search(text)
    if not found:
        raise FixtureError(f"unrecognised sampler toy model: {text!r}")
    a, b, c = float(found["a"]), float(found["b"]), float(found["c"])

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return a * x + b * (t.to(torch.float32) / c)

    return model


def solver_name(meta: dict) -> str:
    module = str(meta.get("call", {}).get("module", ""))
    if module.endswith("fm_solvers_unipc"):
        return "unipc"
    if module.endswith("fm_solvers"):
        return "dpm++"
    raise FixtureError(f"unknown solver module {module!r}")


def run_loop(solver_kind: str, steps: int, shift: float, latents: torch.Tensor, model,
             bf16_history: bool = False):
    """The official loop on latents[0]: returns (schedule, trajectory [steps, 1, ...], final)."""
    schedule = make_schedule(solver_kind, steps, shift)
    solver = make_solver(schedule, bf16_history=bf16_history)
    x = latents[0]
    traj = []
    for t in schedule.timesteps:
        v = model(x, torch.stack([t]))
        x = solver.step(v, x)
        traj.append(x.unsqueeze(0))
    return schedule, torch.stack(traj), x.unsqueeze(0)


def run(path: Path, meta: dict, **_options) -> list[Check]:
    name = Path(path).stem
    data_path = Path(path).with_suffix(".safetensors")
    if not data_path.exists():
        raise FixtureError(f"{data_path} is missing")
    data = load_file(str(data_path))
    kind = solver_name(meta)
    model = toy_model(meta)
    latents = data["input.latents"].to(torch.float32)
    runs = meta.get("runs")
    if not runs:
        raise FixtureError("fixture lists no runs")
    checks: list[Check] = []
    for tag, spec in runs.items():
        steps, shift = int(spec["steps"]), float(spec["shift"])
        schedule, traj, final = run_loop(kind, steps, shift, latents, model)
        checks.append(compare(name, f"timesteps.{tag}", schedule.timesteps, data[f"timesteps.{tag}"]))
        if "timesteps" in spec:
            checks.append(compare(name, f"timesteps.{tag} (json)", schedule.timesteps,
                                  torch.tensor(spec["timesteps"], dtype=torch.int64)))
        checks.append(compare(name, f"sigmas.{tag}", schedule.sigmas, data[f"sigmas.{tag}"],
                              abs_tol=0.0))
        for key, got in ((f"traj.{tag}", traj), (f"final.{tag}", final)):
            checks.append(_traj_check(name, key, got, data[key]))
        if f"traj_autocast.{tag}" in data:
            _, traj_ac, final_ac = run_loop(kind, steps, shift, latents, model, bf16_history=True)
            for key, got in ((f"traj_autocast.{tag}", traj_ac), (f"final_autocast.{tag}", final_ac)):
                checks.append(_traj_check(name, key, got, data[key]))
    return checks


def _traj_check(name: str, key: str, got: torch.Tensor, ref: torch.Tensor) -> Check:
    c = compare(name, key, got, ref, rel_tol=TRAJ_REL_TOL)
    if c.passed and c.max_abs == 0:
        c.note = "bitwise"
    return c
