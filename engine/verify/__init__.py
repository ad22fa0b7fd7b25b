"""`wanimate verify DIR`: run every parity fixture found in DIR and print one table.

A fixture is `<name>.json` (the exact official call, constructor arguments, inputs and their
recipe) beside `<name>.safetensors` or `<name>.npz` (stored inputs and the official outputs).
Weights are never stored: each runner rebuilds them with engine/recipe.py from the official key
names, so any fixture of a known kind runs, whatever its seed, shapes, layer count or options.

Each kind has a runner module in this package with `run(path, meta) -> list[Check]`; the kind is
read from the JSON (`detect_kind`). A fixture that cannot be run is a failure, never a skip.
"""
from __future__ import annotations

import importlib
import json
import math
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import FixtureError


@dataclass
class Check:
    fixture: str
    output: str
    max_abs: float
    rel_l2: float
    tolerance: str            # human-readable bound, e.g. "rel_l2<=1e-05"
    passed: bool
    note: str = ""


def rel_l2(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    denom = ref.norm().item()
    err = (got - ref).norm().item()
    return err / denom if denom > 0 else err


def compare(fixture: str, output: str, got, ref, *, rel_tol: float | None = None,
            abs_tol: float | None = None, note: str = "") -> Check:
    """Two-sided comparison; NaN or a shape mismatch always fails."""
    got = torch.as_tensor(got)
    ref = torch.as_tensor(ref)
    if got.shape != ref.shape:
        return Check(fixture, output, math.inf, math.inf, "shape", False,
                     f"shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
    if got.dtype.is_floating_point or ref.dtype.is_floating_point:
        diff = (got.double() - ref.double()).abs()
        max_abs = diff.max().item() if diff.numel() else 0.0
        r = rel_l2(got, ref) if got.numel() else 0.0
    else:
        diff = (got.long() - ref.long()).abs()
        max_abs = float(diff.max().item()) if diff.numel() else 0.0
        r = 0.0 if max_abs == 0 else math.inf
    finite = bool(torch.isfinite(got.double()).all()) if got.numel() else True
    bounds, ok = [], finite
    if rel_tol is not None:
        bounds.append(f"rel_l2<={rel_tol:.1e}")
        ok = ok and r <= rel_tol
    if abs_tol is not None:
        bounds.append(f"max_abs<={abs_tol:.1e}")
        ok = ok and max_abs <= abs_tol
    if rel_tol is None and abs_tol is None:
        bounds.append("exact")
        ok = ok and max_abs == 0
    if not finite:
        note = (note + "; " if note else "") + "non-finite values"
    return Check(fixture, output, max_abs, r, " ".join(bounds), ok, note)


def failure(fixture: str, message: str) -> Check:
    return Check(fixture, "-", math.nan, math.nan, "-", False, message)


def detect_kind(meta: dict) -> str:
    """Which runner handles a fixture, read from its JSON."""
    if "case" in meta and "official" in meta and "generate" in str(meta["official"].get("entry", "")):
        return "e2e"
    if "group" in meta and "function" in meta:
        return "preprocess"
    call = meta.get("call", {})
    cls = str(call.get("class", ""))
    factory = str(call.get("factory", ""))
    if cls.endswith("WanAnimateModel"):
        return "dit"
    if "Wan2_1_VAE" in cls or "WanVAE" in cls:
        return "vae"
    if "umt5" in factory or "t5" in factory.split("(")[0]:
        return "t5"
    if "clip" in factory:
        return "clip_visual"
    if "letterbox" in call:
        return "clip_preprocess"
    if "fm_solvers" in str(call.get("module", "")):
        return "sampler"
    raise FixtureError(f"unknown fixture kind (keys {sorted(meta)[:8]}...)")


# kind -> module in this package that defines run(path: Path, meta: dict) -> list[Check]
RUNNERS: dict[str, str] = {
    "dit": "dit",
    "vae": "vae",
    "t5": "t5",
    "clip_visual": "clip",
    "clip_preprocess": "clip",
    "sampler": "sampler",
    "e2e": "e2e",
    "preprocess": "preprocess",
}


def find_fixtures(directory: Path) -> list[Path]:
    """Every <name>.json with a data file beside it (index.json and READMEs are not fixtures)."""
    directory = Path(directory)
    if directory.is_file():
        return [directory]
    if not directory.is_dir():
        raise FixtureError(f"{directory} is not a directory of fixtures")
    found = []
    for p in sorted(directory.glob("*.json")):
        if p.with_suffix(".safetensors").exists() or p.with_suffix(".npz").exists():
            found.append(p)
    return found


def run_fixture(path: Path, **options) -> list[Check]:
    name = path.stem
    try:
        meta = json.loads(path.read_text())
        kind = detect_kind(meta)
        module = importlib.import_module(f"{__name__}.{RUNNERS[kind]}")
        checks = module.run(path, meta, **options)
        if not checks:
            return [failure(name, f"{kind} runner produced no checks")]
        return checks
    except Exception as e:  # a fixture that cannot run is a failure, reported, not a crash
        tb = traceback.format_exc(limit=3).strip().splitlines()[-1]
        return [failure(name, f"{type(e).__name__}: {e} [{tb}]")]


def verify(directory: Path, progress: Callable[[str], None] | None = None, **options) -> list[Check]:
    paths = find_fixtures(Path(directory))
    if not paths:
        raise FixtureError(f"no fixtures (<name>.json + .safetensors/.npz) found in {directory}")
    checks = []
    for p in paths:
        t0 = time.time()
        got = run_fixture(p, **options)
        if progress:
            status = "ok" if all(c.passed for c in got) else "FAIL"
            progress(f"{p.stem}: {status} ({time.time() - t0:.1f}s)")
        checks.extend(got)
    return checks


def format_table(checks: list[Check]) -> str:
    header = ("fixture", "output", "max abs", "rel L2", "tolerance", "pass")
    rows = [(c.fixture, c.output, f"{c.max_abs:.3e}", f"{c.rel_l2:.3e}", c.tolerance,
             "yes" if c.passed else "NO") for c in checks]
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(v).ljust(w) for v, w in zip(r, widths))
    out = [line(header), line(["-" * w for w in widths])]
    for c, r in zip(checks, rows):
        out.append(line(r) + (f"  {c.note}" if c.note else ""))
    n_fail = sum(not c.passed for c in checks)
    out.append(f"{len(checks) - n_fail}/{len(checks)} checks passed")
    return "\n".join(out)
