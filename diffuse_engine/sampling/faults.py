"""Numerical faults in sampling: detect NaN/Inf without slowing the loop, then locate them.

Design (no per-step host-device sync by default):

1. **Detect at the end.** The sampler runs untouched; the engine checks the finished
   samples once (``isfinite(x).all()``, the one sync the result needs anyway).
2. **Locate by replay.** Only when that check fails, the engine replays the run from the
   same seed (a fresh generator gives the same prior sample and noise, so the trajectory
   is the same) with :class:`Locator` wrapped around the score model. The locator checks
   every score call's input and output, which tells the two culprits apart:

   * the input ``x`` is finite but the output is not: the **score model** failed;
   * the input is already non-finite: the **solver** update (with the SDE's
     coefficients) produced it since the last score call.

   Step numbers come from the solver's step callback; the replay stops at the first
   fault, so it costs at most one more run, and only on failure.
3. **Optionally abort early.** ``check_every=k`` wraps the score in :class:`FiniteWatch`,
   which keeps a device-side "seen non-finite" flag (one small reduction per score
   call, no sync) and reads it every ``k`` calls (one sync per ``k``), so a long run that
   blew up early stops early; then it is located as above.

A replay that comes out finite means the fault did not reproduce (non-deterministic
kernels on a GPU); the error says so instead of guessing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from diffuse_engine.components.score import ScoreFn
from diffuse_engine.core.errors import NumericalError

#: ``replay(score_fn, callback) -> samples``: the same run again with another score wrapper
Replay = Callable[[ScoreFn, Callable[[int, int, float], None]], Tensor]


class _Stop(Exception):
    """Raised inside a replay to stop it at the first fault (never escapes this module)."""


class NonFiniteSeen(Exception):
    """:class:`FiniteWatch` saw NaN/Inf; the engine catches it and locates the fault."""


class FiniteWatch:
    """Score wrapper keeping a device-side flag of non-finite inputs or outputs.

    No sync per call: the flag is a 0-d tensor on the device, OR-ed with one reduction
    per call and read with ``.item()`` only every ``every`` calls.
    """

    def __init__(self, fn: ScoreFn, every: int):
        self.fn = fn
        self.every = every
        self.calls = 0
        self.flag: Tensor | None = None

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        out = self.fn(x, t)
        bad = ~(torch.isfinite(x).all() & torch.isfinite(out).all())
        self.flag = bad if self.flag is None else self.flag | bad
        self.calls += 1
        if self.calls % self.every == 0 and bool(self.flag):
            raise NonFiniteSeen
        return out


@dataclass
class Fault:
    """Where NaN/Inf first appeared."""

    component: str  # "score model", "solver" or "prior"
    step: int | None  # 1-based solver step, None when the solver reports no steps
    total: int | None
    t: float
    call: int  # 1-based score evaluation
    detail: str


class Locator:
    """Score wrapper for the replay: checks every call, stops at the first fault."""

    def __init__(self, fn: ScoreFn, score_name: str, total: int | None = None):
        self.fn = fn
        self.score_name = score_name
        self.calls = 0
        self.completed = 0  # solver steps finished (from the callback)
        self.total = total
        self.step_t: float | None = None  # time the last finished step reached
        self.calls_in_step = 0
        self.fault: Fault | None = None

    def callback(self, step: int, total: int, t: float) -> None:
        self.completed, self.total, self.step_t = step, total, t
        self.calls_in_step = 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        self.calls_in_step += 1
        tt = float(t.reshape(-1)[0]) if t.numel() else float("nan")
        if not bool(torch.isfinite(x).all()):
            n = int((~torch.isfinite(x)).flatten(1).any(1).sum())
            if self.calls == 1:
                self._stop("prior", None, tt, f"the prior sample is non-finite in {n} rows")
            if self.calls_in_step == 1 and self.completed:  # the last step's final update
                self._stop(
                    "solver",
                    self.completed,
                    self.step_t,
                    f"its update made {n} of {x.shape[0]} samples non-finite",
                )
            self._stop(
                "solver",
                self.completed + 1,
                tt,
                f"an intermediate update made {n} of {x.shape[0]} samples non-finite",
            )
        out = self.fn(x, t)
        if not bool(torch.isfinite(out).all()):
            n = int((~torch.isfinite(out)).sum())
            self._stop(
                "score model",
                self.completed + 1,
                tt,
                f"{self.score_name!r} returned {n} NaN/Inf values for a finite input",
            )
        return out

    def _stop(self, component: str, step: int | None, t: float | None, detail: str):
        self.fault = Fault(
            component, step, self.total, float("nan") if t is None else t, self.calls, detail
        )
        raise _Stop


def locate(
    replay: Replay,
    score: ScoreFn,
    *,
    score_name: str,
    solver_name: str,
    sde_name: str,
    steps: int | None = None,
    crash: Exception | None = None,
) -> NumericalError:
    """Replay the run with a :class:`Locator` and return the error naming the fault
    (``steps``: the solver's step count, if it has one).

    ``crash``: the exception the run died of instead of returning samples (a solver
    library that gives up once NaN appears). If the replay finds NaN/Inf first, that is
    the error (caused by ``crash``); otherwise ``crash`` is raised as it was.
    """
    loc = Locator(score, score_name, steps)
    try:
        out = replay(loc, loc.callback)
    except _Stop:
        err = NumericalError(describe(loc.fault, solver_name, sde_name))
        err.__cause__ = crash
        return err
    except Exception:
        if crash is not None:
            raise crash from None
        raise
    if crash is not None:
        raise crash
    where = f"{solver_name!r} on {sde_name!r}"
    if bool(torch.isfinite(out).all()):
        return NumericalError(
            f"samples of {where} were NaN/Inf, but a replay with the same "
            "seed was finite (non-deterministic kernels?); rerun to check"
        )
    n = int((~torch.isfinite(out)).flatten(1).any(1).sum())
    fault = Fault(
        "solver",
        loc.total,
        loc.total,
        loc.step_t if loc.step_t is not None else float("nan"),
        loc.calls,
        f"its final update (after the last score evaluation) made {n} of "
        f"{out.shape[0]} samples non-finite",
    )
    return NumericalError(describe(fault, solver_name, sde_name))


def describe(fault: Fault, solver_name: str, sde_name: str) -> str:
    """One line: where NaN/Inf first appeared, which component, what to try."""
    when = (
        f"step {fault.step} of {fault.total}"
        if fault.step and fault.total
        else f"score evaluation {fault.call}"
    )
    head = (
        f"NaN/Inf first appeared at {when} (t = {fault.t:.4g}) of {solver_name!r} on {sde_name!r}: "
    )
    if fault.component == "score model":
        return head + f"the score model {fault.detail}; check the model (or its checkpoint)"
    if fault.component == "prior":
        return head + f"{fault.detail} (SDE {sde_name!r}); check the SDE's parameters"
    return head + (
        f"the solver {solver_name!r} (with the SDE's coefficients): {fault.detail} "
        "while the score model's outputs were finite; try more steps, a smaller "
        "snr or another predictor/method"
    )
