"""Adaptive Runge-Kutta solution of the probability-flow ODE through torchdiffeq.

``dx/dt = f(x, t) - 1/2 g(t)^2 s(x, t)`` (Song et al. 2021, eq. 13) from ``T`` down to
``eps`` with an embedded Runge-Kutta pair and error control (``rtol``, ``atol``):
``dopri5`` (Dormand-Prince 5(4), the RK45 of Song et al.'s likelihood and sampling
experiments), ``dopri8``, ``bosh3``, ``fehlberg2`` or ``adaptive_heun``. The number of
steps, hence of score evaluations, is chosen by the error control; the engine counts
the evaluations (``SamplingResult.nfe``, the ``score evaluations`` row of ``diffuse
run``). ``steps`` is not used by the integration: progress is reported on a uniform
grid of ``steps`` times, each grid step once the solver has passed it.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from diffuse_engine import Solver, SolverConfig, hookimpl
from diffuse_engine.components.differentiable import probability_flow_solve
from diffuse_engine.components.solver import MAX_STEPS, uniform_schedule_only


class AdaptiveODEConfig(SolverConfig):
    steps: int = Field(
        100, ge=1, le=MAX_STEPS, description="progress-bar resolution only (adaptive)"
    )
    method: Literal["dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun"] = Field(
        "dopri5", description="torchdiffeq adaptive method"
    )
    rtol: float = Field(1e-5, gt=0, description="relative tolerance")
    atol: float = Field(1e-5, gt=0, description="absolute tolerance")

    def budget(self, nfe: int) -> dict:
        """Refused: the error control picks the evaluations (the ``dpm_adaptive`` solver
        takes ``nfe`` as its cap)."""
        raise ValueError(
            "nfe does not apply: the error control picks the steps; set rtol and atol, "
            "or use solver dpm_adaptive (nfe is its cap)"
        )

    @model_validator(mode="after")
    def _no_schedule(self):
        return uniform_schedule_only(self, "the adaptive solver picks its own steps")


class AdaptiveProbabilityFlowODE(Solver):
    """Probability-flow ODE with an adaptive torchdiffeq solver."""

    name = "ode_adaptive"
    Config = AdaptiveODEConfig

    def sample(self, score, sde, x, *, generator=None, callback=None):
        c = self.config
        T, eps = float(sde.T), self.eps(sde)
        done = [0]

        def tick(upto: int) -> None:  # every grid step 1..upto not yet reported
            for k in range(done[0] + 1, upto + 1):
                callback(k, c.steps, T - (T - eps) * k / c.steps)
            done[0] = max(done[0], upto)

        def report(t: float) -> None:
            tick(min(c.steps, int(c.steps * (T - t) / (T - eps) + 1e-9)))

        # progress only when someone listens (reading t syncs with the device)
        with torch.no_grad():
            out = probability_flow_solve(
                score,
                sde,
                x,
                method=c.method,
                rtol=c.rtol,
                atol=c.atol,
                eps=eps,
                callback=report if callback is not None else None,
            )
        if callback is not None:
            tick(c.steps)
        return self.finish(score, sde, out, eps)


@hookimpl
def diffuse_register_solvers():
    return [AdaptiveProbabilityFlowODE]
