"""Fixed-step solvers of the probability-flow ODE (Song et al. 2021, eq. 13).

``dx/dt = f(x, t) - 1/2 g(t)^2 s(x, t)``, integrated from ``T`` down to ``eps`` with
explicit Euler (1 score evaluation per step), Heun's second-order method (2) or the
classic fourth-order Runge-Kutta method (4); deterministic given ``x_T``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from diffuse_engine import Solver, SolverConfig, hookimpl


class ODEConfig(SolverConfig):
    method: Literal["euler", "heun", "rk4"] = Field("rk4", description="Runge-Kutta method")


class ProbabilityFlowODE(Solver):
    """Deterministic sampling through the probability-flow ODE."""

    name = "ode"
    Config = ODEConfig

    def sample(self, score, sde, x, *, generator=None, callback=None):
        grid = self.time_grid(sde, score, x)
        steps = len(grid) - 1
        B = x.shape[0]
        full = lambda v: torch.full((B,), v, device=x.device, dtype=x.dtype)  # noqa: E731

        def f(x, t):
            return sde.reverse_drift(x, t, score(x, t), probability_flow=True)

        method = self.config.method
        for i in range(steps):
            h = grid[i + 1] - grid[i]
            t, t_next = full(grid[i]), full(grid[i + 1])
            k1 = f(x, t)
            if method == "euler":
                x = x + h * k1
            elif method == "heun":
                k2 = f(x + h * k1, t_next)
                x = x + 0.5 * h * (k1 + k2)
            else:
                t_mid = full(grid[i] + 0.5 * h)
                k2 = f(x + 0.5 * h * k1, t_mid)
                k3 = f(x + 0.5 * h * k2, t_mid)
                k4 = f(x + h * k3, t_next)
                x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            if callback is not None:
                callback(i + 1, steps, grid[i + 1])
        return self.finish(score, sde, x, grid[-1])


@hookimpl
def diffuse_register_solvers():
    return [ProbabilityFlowODE]
