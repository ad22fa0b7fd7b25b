"""Flow-matching multistep solvers with the official schedules and float32 arithmetic.

Flow matching (reference NOTES §7): x_sigma = (1 - sigma) x0 + sigma noise, the model predicts
v = noise - x0, so the data prediction is m = x - sigma v. Both solvers integrate in
lambda = log((1 - sigma) / sigma) on the data prediction:

* FlowUniPC - UniPC with the B(h) = expm1(-h) variant ("bh2"), order 2, predictor-corrector:
  before each predictor step (except the first) the previous step is redone with the new model
  output (UniC). The official CLI default.
* FlowDPMPP - DPM-Solver++ (2M, midpoint): first order at the first and last step, second order
  in between. The default of WanAnimate.generate itself.

Usage, one fresh solver per segment (it carries the multistep history):

    schedule = make_schedule("unipc", steps=20, shift=5.0)
    solver = make_solver(schedule)
    for t in schedule.timesteps:              # int64, what the model sees
        x = solver.step(model(x, t), x)

Parity: the schedules are computed exactly as the official code does (linspace and shift warp
in float64, model timesteps = float64 sigma * 1000 truncated to int64, sigmas rounded to float32
with a final 0) and every step coefficient is a 0-d float32 CPU tensor combined in the same
order, so the trajectories are bitwise identical to the official schedulers on CPU. The 2x2
UniC system is solved with torch.linalg.solve on the CPU (officially it runs on the latents'
device; on a GPU its last bit may differ). `bf16_history=True` reproduces the pipeline's
numerics: WanAnimate.generate calls step() under CUDA bf16 autocast, which runs UniPC's
`einsum(rhos, D1s)` (the previous-step term of the predictor and the corrector) in bf16.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .errors import ValidationError

__all__ = ["SOLVERS", "Schedule", "make_schedule", "make_solver", "FlowUniPC", "FlowDPMPP"]

SOLVERS = ("unipc", "dpm++")
NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_SHIFT = 5.0


@dataclass(frozen=True)
class Schedule:
    solver: str
    timesteps: torch.Tensor   # int64 [N]: what the model is given at each step
    sigmas: torch.Tensor      # float32 [N + 1]: what the solver integrates over; last is 0
    shift: float | None       # None for an explicit timestep list (used as given)

    @property
    def steps(self) -> int:
        return int(self.timesteps.numel())


def _warp(s: np.ndarray, shift: float) -> np.ndarray:
    """Timestep shift sigma = shift s / (1 + (shift - 1) s), in float64 as officially."""
    return shift * s / (1 + (shift - 1) * s)


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise ValidationError(f"steps must be an int or a list of timesteps, got {steps!r}")
    if not 1 <= int(steps) <= NUM_TRAIN_TIMESTEPS:
        raise ValidationError(f"steps must be in [1, {NUM_TRAIN_TIMESTEPS}], got {steps}")
    return int(steps)


def _check_explicit(timesteps) -> np.ndarray:
    try:
        t = np.asarray([float(v) for v in timesteps], dtype=np.float64)
    except (TypeError, ValueError):
        raise ValidationError(f"timesteps must be a list of numbers, got {timesteps!r}") from None
    if t.size == 0:
        raise ValidationError("the timestep list is empty; give at least one timestep in (0, 1000]")
    if not np.all(np.isfinite(t)) or t.min() <= 0 or t.max() > NUM_TRAIN_TIMESTEPS:
        raise ValidationError(f"timesteps must lie in (0, {NUM_TRAIN_TIMESTEPS}], got {t.tolist()}")
    if t.size > 1 and not np.all(np.diff(t) < 0):
        raise ValidationError(f"timesteps must be strictly decreasing, got {t.tolist()}")
    return t


def make_schedule(solver: str, steps: int | Sequence[float] = 20,
                  shift: float | None = None) -> Schedule:
    """Timesteps and sigmas of the official schedule for `solver`.

    steps: the number of steps (official spacing, warped by `shift`, default 5.0), or an explicit
    list of timesteps in (0, 1000], strictly decreasing, for few-step schedules
    (e.g. [1000, 937.5, 833.3, 625]): sigmas = t / 1000 used as given (no shift), final 0.
    unipc spaces s over [0.999, 0) (its first timestep is 999); dpm++ over [1, 0) (starts at 1000).

    Solvers advance by their own step counter. (The official schedulers find their first step by
    looking the timestep up, and take the second match when it repeats: from 251 unipc steps on,
    the first two timesteps are both 999 and the official code skips a sigma. Not reproduced.)
    """
    if solver not in SOLVERS:
        raise ValidationError(f"solver must be one of {SOLVERS}, got {solver!r}")
    explicit = not isinstance(steps, (int, np.integer))
    if explicit:
        if isinstance(steps, (str, bytes)) or not hasattr(steps, "__iter__"):
            raise ValidationError(f"steps must be an int or a list of timesteps, got {steps!r}")
        if shift is not None:
            raise ValidationError("an explicit timestep list is used as given: leave shift unset")
        sig64 = _check_explicit(steps) / NUM_TRAIN_TIMESTEPS
    else:
        n = _check_steps(steps)
        shift = DEFAULT_SHIFT if shift is None else shift
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) \
                or not math.isfinite(shift) or shift <= 0:
            raise ValidationError(f"shift must be a positive number, got {shift!r}")
        shift = float(shift)
        if solver == "unipc":
            # The official UniPC takes its range from the 1000-step training table, whose
            # largest sigma is float32(1 - 1/1000) = 0.99900001...; hence timestep 999 first.
            alphas = np.linspace(1, 1 / NUM_TRAIN_TIMESTEPS, NUM_TRAIN_TIMESTEPS)[::-1]
            table = (1.0 - alphas).astype(np.float32)
            s = np.linspace(float(table[0]), float(table[-1]), n + 1)[:-1]
        else:
            s = np.linspace(1, 0, n + 1)[:n]
        sig64 = _warp(s, shift)
    timesteps = torch.from_numpy(sig64 * NUM_TRAIN_TIMESTEPS).to(torch.int64)  # truncation
    sigmas = torch.from_numpy(np.concatenate([sig64, [0.0]]).astype(np.float32))
    return Schedule(solver, timesteps, sigmas, None if explicit else shift)


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    # On 0-d tensors, as officially: a vectorised log over the whole sigma table may differ
    # from the scalar one in the last bit.
    return torch.log(1 - sigma) - torch.log(sigma)


class _FlowSolver:
    """Shared state: the schedule, the step counter and the data-prediction history."""

    def __init__(self, schedule: Schedule, order: int, bf16_history: bool):
        if not isinstance(schedule, Schedule):
            raise ValidationError(f"expected a Schedule from make_schedule, got {type(schedule).__name__}")
        if order not in (1, 2):
            raise ValidationError(f"solver order must be 1 or 2, got {order!r}")
        self.schedule = schedule
        self.sigmas = schedule.sigmas.detach().to("cpu", torch.float32)
        self.timesteps = schedule.timesteps
        self.order = order
        self.bf16_history = bool(bf16_history)
        self.step_index = 0
        self._history: list[torch.Tensor] = []   # data predictions m of the last `order` steps
        self._warm = 0                           # steps taken so far, capped at order

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())

    @property
    def done(self) -> bool:
        return self.step_index >= self.num_steps

    @property
    def timestep(self) -> torch.Tensor:
        """The int64 timestep the model should see at the current step."""
        self._check_not_done()
        return self.timesteps[self.step_index]

    def _check_not_done(self):
        if self.done:
            raise ValidationError(f"all {self.num_steps} steps are done; make a fresh solver per "
                                  "segment (make_solver(schedule))")

    def _check_inputs(self, model_output: torch.Tensor, sample: torch.Tensor):
        self._check_not_done()
        if not isinstance(model_output, torch.Tensor) or not isinstance(sample, torch.Tensor):
            raise ValidationError("model_output and sample must be tensors")
        if model_output.shape != sample.shape:
            raise ValidationError(f"model_output {tuple(model_output.shape)} and sample "
                                  f"{tuple(sample.shape)} must have the same shape")

    def _push(self, m: torch.Tensor):
        self._history = (self._history + [m])[-self.order:]

    def _sigma(self, i: int) -> torch.Tensor:
        return self.sigmas[i]


class FlowUniPC(_FlowSolver):
    """UniPC (bh2, data prediction) for flow matching, with the official step-order rules.

    order: 2 (official) or 1. lower_order_final: the last step is first order (official).
    corrector: UniC after every step but the first. disable_corrector: step indices i whose
    following corrector is skipped (the official list's meaning). bf16_history: round the
    previous-step term to bf16 as the pipeline's CUDA autocast does.
    """

    def __init__(self, schedule: Schedule, *, order: int = 2, lower_order_final: bool = True,
                 corrector: bool = True, disable_corrector: Sequence[int] = (),
                 bf16_history: bool = False):
        super().__init__(schedule, order, bf16_history)
        self.lower_order_final = bool(lower_order_final)
        self.corrector = bool(corrector)
        self.disable_corrector = frozenset(int(i) for i in disable_corrector)
        self._last_sample: torch.Tensor | None = None   # input of the previous predictor step
        self._last_order = 0

    def _history_term(self, rho: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """rho * D, the einsum term of the official code (bf16 under the pipeline's autocast)."""
        # rho stays a 0-d CPU tensor: it multiplies device tensors as a scalar, without a copy.
        if self.bf16_history:
            return rho.to(torch.bfloat16) * d.to(torch.bfloat16)
        return rho * d

    def step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """Advance one step: sample at sigmas[i] and the model's v there -> sample at sigmas[i+1]."""
        self._check_inputs(model_output, sample)
        i = self.step_index
        # The data prediction uses the sample as given, before the corrector refines it.
        m = sample - self._sigma(i) * model_output
        if (self.corrector and i > 0 and (i - 1) not in self.disable_corrector
                and self._last_sample is not None):
            sample = self._correct(m, sample.dtype)
        self._push(m)
        order = min(self.order, self.num_steps - i) if self.lower_order_final else self.order
        order = min(order, self._warm + 1)
        self._last_sample = sample
        self._last_order = order
        out = self._predict(sample, order)
        self._warm = min(self._warm + 1, self.order)
        self.step_index += 1
        return out

    def _predict(self, x: torch.Tensor, order: int) -> torch.Tensor:
        i = self.step_index
        m0 = self._history[-1]
        sigma_t, sigma_s0 = self._sigma(i + 1), self._sigma(i)
        alpha_t = 1 - sigma_t
        lambda_s0 = _lambda(sigma_s0)
        h = _lambda(sigma_t) - lambda_s0
        hh = -h
        phi = torch.expm1(hh)       # h * phi_1(h)
        b_h = torch.expm1(hh)       # bh2
        x_t = sigma_t / sigma_s0 * x - alpha_t * phi * m0
        if order == 2:
            r = (_lambda(self._sigma(i - 1)) - lambda_s0) / h
            d1 = (self._history[-2] - m0) / r
            # The official predictor uses the fixed rho = 1/2 for order 2 (no linear solve).
            rho = torch.tensor([0.5], dtype=x.dtype)
            x_t = x_t - alpha_t * b_h * self._history_term(rho[0], d1)
        return x_t.to(x.dtype)

    def _correct(self, model_t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Redo the previous step with the model output at its end (UniC of order p)."""
        i = self.step_index
        p = self._last_order
        m0 = self._history[-1]
        x = self._last_sample
        sigma_t, sigma_s0 = self._sigma(i), self._sigma(i - 1)
        alpha_t = 1 - sigma_t
        lambda_s0 = _lambda(sigma_s0)
        h = _lambda(sigma_t) - lambda_s0
        hh = -h
        phi = torch.expm1(hh)
        b_h = torch.expm1(hh)
        if p == 1:
            rhos = torch.tensor([0.5], dtype=x.dtype)
            d1 = None
        else:
            r = (_lambda(self._sigma(i - 2)) - lambda_s0) / h
            d1 = (self._history[-2] - m0) / r
            # rho solves [[1, 1], [r, 1]] rho = [g1, g2] with g_k from the phi_k(h) recursion.
            phi_k = phi / hh - 1
            g1 = phi_k * 1 / b_h
            phi_k = phi_k / hh - 1 / 2
            g2 = phi_k * 2 / b_h
            rk = torch.tensor([r, 1.0])
            lhs = torch.stack([torch.pow(rk, 0), torch.pow(rk, 1)])
            rhos = torch.linalg.solve(lhs, torch.tensor([g1, g2])).to(x.dtype)
        x_t = sigma_t / sigma_s0 * x - alpha_t * phi * m0
        d1_t = model_t - m0
        last = rhos[-1] * d1_t
        if d1 is not None:
            last = self._history_term(rhos[0], d1) + last
        x_t = x_t - alpha_t * b_h * last
        return x_t.to(dtype)


class FlowDPMPP(_FlowSolver):
    """DPM-Solver++ 2M (midpoint) for flow matching, final sigma 0.

    The first step and the last one are first order (the last always, since the final sigma is
    0; lower_order_final). bf16_history is accepted for a uniform interface and changes nothing:
    this solver has no einsum, so the pipeline's autocast leaves it in float32.
    """

    def __init__(self, schedule: Schedule, *, order: int = 2, lower_order_final: bool = True,
                 bf16_history: bool = False):
        super().__init__(schedule, order, bf16_history)
        self.lower_order_final = bool(lower_order_final)

    def step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        self._check_inputs(model_output, sample)
        i = self.step_index
        n = self.num_steps
        m = sample - self._sigma(i) * model_output
        self._push(m)
        sample = sample.to(torch.float32)
        # A zero final sigma always makes the last step first order; lower_order_final only
        # matters (officially) below 15 steps and for order 3, which is not offered here.
        first = self.order == 1 or self._warm < 1 or i == n - 1
        out = self._first_order(sample) if first else self._second_order(sample)
        self._warm = min(self._warm + 1, self.order)
        self.step_index += 1
        return out.to(m.dtype)

    def _first_order(self, x: torch.Tensor) -> torch.Tensor:
        i = self.step_index
        sigma_t, sigma_s = self._sigma(i + 1), self._sigma(i)
        alpha_t = 1 - sigma_t
        h = _lambda(sigma_t) - _lambda(sigma_s)
        return (sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * self._history[-1]

    def _second_order(self, x: torch.Tensor) -> torch.Tensor:
        i = self.step_index
        sigma_t, sigma_s0, sigma_s1 = self._sigma(i + 1), self._sigma(i), self._sigma(i - 1)
        alpha_t = 1 - sigma_t
        lambda_s0 = _lambda(sigma_s0)
        h = _lambda(sigma_t) - lambda_s0
        h_0 = lambda_s0 - _lambda(sigma_s1)
        r0 = h_0 / h
        m0, m1 = self._history[-1], self._history[-2]
        d1 = (1.0 / r0) * (m0 - m1)   # 0 after a sigma = 1 step (r0 = inf), as officially
        c = alpha_t * (torch.exp(-h) - 1.0)
        return (sigma_t / sigma_s0) * x - c * m0 - 0.5 * c * d1


def make_solver(schedule: Schedule, *, bf16_history: bool = False, **options) -> FlowUniPC | FlowDPMPP:
    """A fresh solver for one segment, of the kind the schedule was made for."""
    if not isinstance(schedule, Schedule):
        raise ValidationError(f"expected a Schedule from make_schedule, got {type(schedule).__name__}")
    cls = FlowUniPC if schedule.solver == "unipc" else FlowDPMPP
    return cls(schedule, bf16_history=bf16_history, **options)
