"""Fixed-step solvers of the probability-flow ODE (Song et al. 2021, eq. 13).

``dx/dt = f(x, t) - 1/2 g(t)^2 s(x, t)``, integrated from ``T`` down to ``eps`` with
explicit Euler (1 score evaluation per step), Heun's second-order method (2) or the
classic fourth-order Runge-Kutta method (4); deterministic given ``x_T``. ``nfe = N``
spends exactly ``N`` (:meth:`ODEConfig.budget`: lower-order first steps take the
remainder of ``N - denoise`` over the method's cost).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from diffuse_engine import Solver, SolverConfig, hookimpl
from diffuse_engine.components.solver import time_tensors

#: score evaluations per step of each method
COST = {"euler": 1, "heun": 2, "rk4": 4}


class ODEConfig(SolverConfig):
    method: Literal["euler", "heun", "rk4"] = Field("rk4", description="Runge-Kutta method")
    lead: list[Literal["euler", "heun"]] = Field(
        [], description="methods of the first steps, before method takes over (budgets)"
    )

    def budget(self, nfe: int) -> dict:
        """``M = nfe - denoise`` evaluations: ``M // cost`` steps of ``method`` after
        lower-order first steps that spend the remainder (a Heun and/or an Euler step,
        where the flow is smoothest, near the prior)."""
        out = super().budget(nfe)
        M = out["steps"]
        full, rem = divmod(M, COST[self.method])
        lead = ["heun"] * (rem // 2) + ["euler"] * (rem % 2)
        return {**out, "steps": full + len(lead), "lead": lead}

    @model_validator(mode="after")
    def _lead_fits(self):
        if len(self.lead) > self.steps:
            raise ValueError(f"lead has {len(self.lead)} methods for {self.steps} steps")
        return self


class ProbabilityFlowODE(Solver):
    """Deterministic sampling through the probability-flow ODE."""

    name = "ode"
    supports_transform = True
    Config = ODEConfig

    def sample(self, score, sde, x, *, generator=None, callback=None, transform=None):
        grid = self.time_grid(sde, score, x)
        steps = len(grid) - 1
        # every time the method evaluates at: t_i, the midpoint (rk4) and t_next
        times = []
        for i in range(steps):
            times += [grid[i], grid[i] + 0.5 * (grid[i + 1] - grid[i]), grid[i + 1]]
        coef = sde.linear_coefficients(times)

        def f(x, tt, k):
            """The probability-flow drift at ``times[k]`` (``tt``, its ``(B,)`` tensor):
            for a linear drift from precomputed floats (two tensor ops), otherwise
            through the SDE."""
            if coef is None:
                return sde.reverse_drift(x, tt, score(x, tt), probability_flow=True)
            return torch.add(x * coef[0][k], score(x, tt), alpha=-0.5 * coef[1][k])

        lead = self.config.lead
        methods = [lead[i] if i < len(lead) else self.config.method for i in range(steps)]
        # one (B,) time tensor per distinct time, in the order the loop uses them: a
        # step's end is the next one's start, and RK4's two midpoint evaluations share one
        order = [grid[0]]
        for i, m in enumerate(methods):
            order += [times[3 * i + 1], grid[i + 1]] if m == "rk4" else [grid[i + 1]]
        ts = time_tensors(order, x)
        t_now = next(ts)
        for i in range(steps):
            h = grid[i + 1] - grid[i]
            method = methods[i]
            if method == "euler":
                k1 = f(x, t_now, 3 * i)
                x = torch.add(x, k1, alpha=h)
                t_now = next(ts)
            elif method == "heun":
                k1 = f(x, t_now, 3 * i)
                t_now = next(ts)
                k2 = f(torch.add(x, k1, alpha=h), t_now, 3 * i + 2)
                x = torch.add(x, torch.add(k1, k2), alpha=0.5 * h)
            else:
                k1 = f(x, t_now, 3 * i)
                t_mid, t_now = next(ts), next(ts)
                k2 = f(torch.add(x, k1, alpha=0.5 * h), t_mid, 3 * i + 1)
                k3 = f(torch.add(x, k2, alpha=0.5 * h), t_mid, 3 * i + 1)
                k4 = f(torch.add(x, k3, alpha=h), t_now, 3 * i + 2)
                x = torch.add(x, torch.add(k1, k4).add_(torch.add(k2, k3), alpha=2.0), alpha=h / 6)
            if transform is not None:  # a guidance projection (guidance.py)
                x = transform(x, i + 1, grid[i + 1])
            if callback is not None:
                callback(i + 1, steps, grid[i + 1])
        return self.finish(score, sde, x, grid[-1])


@hookimpl
def diffuse_register_solvers():
    return [ProbabilityFlowODE]
