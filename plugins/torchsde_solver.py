"""Reverse-time SDE sampling through torchsde (Li et al. 2020; Kidger et al. 2021).

Solves ``dx = [f(x, t) - g(t)^2 s(x, t)] dt + g(t) dw_bar`` from ``T`` down to ``eps``
with ``torchsde.sdeint``. torchsde integrates forward in time only, so the solve runs
in the reversed clock ``u = T - t`` from ``u = 0`` (the prior) to ``u = T - eps``; see
:mod:`diffuse_engine.components.differentiable` for the transformed drift. Image-shaped states
``(B, C, H, W)`` are flattened to ``(B, C*H*W)`` for torchsde and restored.

Methods (``method=``), all for diagonal noise:

* Ito: ``euler`` (Euler-Maruyama, strong order 0.5, 1 score evaluation per step),
  ``milstein`` (order 1.0; equals Euler here because ``g`` does not depend on ``x``),
  ``srk`` (stochastic Runge-Kutta of Roessler 2010, strong order 1.5, with
  space-time Levy area; several score evaluations per step).
* Stratonovich: ``reversible_heun`` (Kidger et al. 2021: algebraically reversible,
  exact adjoint gradients), ``heun``, ``midpoint``, ``euler_heun``. The diffusion
  depends on time only, so the Ito and Stratonovich forms of the reverse SDE have the
  same drift and these solve the same equation.

  Caveat for ``reversible_heun``: as every symmetric (reversible) scheme it carries a
  parasitic mode that grows like ``exp(int |lambda| dt)`` on contracting dynamics
  (for ``y' = lambda y`` its step matrix has eigenvalues ``a +- sqrt(1 + a^2)``,
  ``a = lambda h``), and the reverse diffusion contracts strongly onto the data. It
  needs many more steps than ``euler`` to sample well; its use is exact gradients.

``adaptive = true`` uses torchsde's step-doubling error control with ``rtol``,
``atol`` and ``dt_min`` (``steps`` then sets the initial step ``(T - eps) / steps``).
Progress: torchsde has no step hook, so when the engine passes a callback (a progress
bar or a ``diffuse_sampling_step`` observer) the solve runs in up to 20 pieces on the
step grid, same Brownian path, and reports each step as its piece ends; each piece
costs one more drift evaluation (torchsde's contract check). Without a callback it is
one ``sdeint`` call: ``steps + 2`` evaluations for Euler (one for the contract check,
one for the final denoising).

The Brownian path is a ``torchsde.BrownianInterval`` whose entropy is drawn once from
the engine's seeded generator, so a seed fixes the samples. Score evaluations are
counted by the engine like for any solver.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from diffuse_engine import Solver, SolverConfig, hookimpl
from diffuse_engine.components.differentiable import reverse_sde_solve
from diffuse_engine.components.solver import uniform_schedule_only


class TorchSDEConfig(SolverConfig):
    method: Literal[
        "euler", "milstein", "srk", "reversible_heun", "heun", "midpoint", "euler_heun"
    ] = Field("srk", description="torchsde method")
    adaptive: bool = Field(False, description="adaptive step size (step doubling)")
    rtol: float = Field(1e-3, gt=0, description="relative tolerance (adaptive)")
    atol: float = Field(1e-3, gt=0, description="absolute tolerance (adaptive)")
    dt_min: float = Field(1e-5, gt=0, description="smallest step (adaptive)")

    def budget(self, nfe: int) -> dict:
        """The most steps whose evaluations fit ``nfe``: ``COST[method]`` per step plus
        ``FIXED[method]`` (torchsde's contract check, reversible Heun's first drift) and
        the denoising step; exactly ``nfe`` when the remainder divides. Counted on
        torchsde 0.2.6 without a progress callback (each progress piece adds one)."""
        if self.adaptive:
            raise ValueError(
                "nfe does not apply to adaptive = true (the error control "
                "picks the steps); set rtol and atol"
            )
        steps = (nfe - int(self.denoise) - FIXED[self.method]) // COST[self.method]
        if steps < 1:
            fixed = FIXED[self.method] + int(self.denoise)
            raise ValueError(
                f"nfe = {nfe} is below one {self.method} step ({fixed + COST[self.method]}); "
                f"{self.method} spends {fixed} + {COST[self.method]} k evaluations on k "
                "steps, the most k that fits nfe"
            )
        return {"steps": steps}

    @model_validator(mode="after")
    def _no_schedule(self):
        return uniform_schedule_only(
            self, "torchsde steps uniformly in t (dt = (T - eps) / steps) or adaptively"
        )


#: score evaluations per torchsde step, and once per solve (torchsde 0.2.6, diagonal noise)
COST = {
    "euler": 1,
    "milstein": 1,
    "euler_heun": 1,
    "reversible_heun": 1,
    "heun": 2,
    "midpoint": 2,
    "srk": 10,
}
FIXED = {
    "euler": 1,
    "milstein": 1,
    "euler_heun": 1,
    "reversible_heun": 2,
    "heun": 1,
    "midpoint": 1,
    "srk": 1,
}


class TorchSDESolver(Solver):
    """Reverse-time SDE through ``torchsde.sdeint``; optional final Tweedie step."""

    name = "torchsde"
    Config = TorchSDEConfig

    def sample(self, score, sde, x, *, generator=None, callback=None):
        c = self.config
        # one draw before the solve seeds the Brownian path (reproducible per seed)
        device = generator.device if generator is not None else x.device
        entropy = int(torch.randint(0, 2**62, (1,), generator=generator, device=device))
        eps = self.eps(sde)
        with torch.no_grad():
            out = reverse_sde_solve(
                score,
                sde,
                x,
                method=c.method,
                steps=c.steps,
                eps=eps,
                adaptive=c.adaptive,
                rtol=c.rtol,
                atol=c.atol,
                dt_min=c.dt_min,
                entropy=entropy,
                callback=callback,
            )
        return self.finish(score, sde, out, eps)


@hookimpl
def diffuse_register_solvers():
    return [TorchSDESolver]
