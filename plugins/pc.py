"""The predictor-corrector sampler (Song et al. 2021, Alg. 1).

At each of ``steps`` times from ``T`` down to ``eps`` it runs the corrector at ``t`` and
then the predictor from ``t`` to the next time, and finishes with an optional Tweedie
denoising step at ``eps``. Score evaluations: ``steps * (p + corrector_steps)`` with
``p = 1`` unless the predictor is ``none``, less ``corrector_steps`` for each of the
first ``corrector_skip`` times, plus one for the final denoising; ``nfe = N`` spends
exactly ``N`` (:meth:`PCConfig.budget`).
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field, model_validator

from diffuse_engine import ComponentRef, Solver, SolverConfig, hookimpl
from diffuse_engine.components.solver import time_tensors


class PCConfig(SolverConfig):
    predictor: Annotated[str, ComponentRef("predictor")] = Field(
        "reverse_diffusion", description="predictor name"
    )
    corrector: Annotated[str, ComponentRef("corrector")] = Field(
        "langevin", description="corrector name"
    )
    snr: float = Field(0.16, gt=0, description="corrector signal-to-noise ratio")
    corrector_steps: int = Field(1, ge=0, description="corrector steps per time step")
    corrector_skip: int = Field(
        0, ge=0, description="no corrector at the first k times (at T the prior is p_T)"
    )

    def budget(self, nfe: int) -> dict:
        """``M = nfe - denoise`` evaluations over ``S`` steps of ``p`` predictor and
        ``c`` corrector evaluations: the fewest steps with ``p S + c (S - k) = M``,
        skipping the corrector at the first ``k`` times, where the state is closest
        to its exact marginal (the prior is ``p_T`` itself)."""
        out = super().budget(nfe)
        M = out["steps"]
        p = 0 if self.predictor == "none" else 1
        c = 0 if self.corrector == "none" else self.corrector_steps
        for S in range(max(1, -(-M // (p + c))), M + 1):
            k, rem = divmod((p + c) * S - M, c) if c else (0, p * S - M)
            if rem == 0 and 0 <= k <= S and p * S + c * (S - k) == M:
                return {**out, "steps": S, "corrector_skip": k}
        raise ValueError(
            f"nfe = {nfe} cannot be spent in steps of {p} predictor and {c} corrector "
            f"evaluations (+{int(out['denoise'])} denoising); choose another nfe"
        )

    @model_validator(mode="after")
    def _something_to_do(self):
        if self.predictor == "none" and (self.corrector == "none" or self.corrector_steps == 0):
            raise ValueError("predictor and corrector cannot both be none")
        return self


class PCSampler(Solver):
    """Predictor-corrector sampling of the reverse-time SDE."""

    name = "pc"
    supports_transform = True
    Config = PCConfig

    def __init__(self, config=None, *, catalogue=None, **fields):
        super().__init__(config, catalogue=catalogue, **fields)
        c = self.config
        self.predictor = catalogue.get("predictor", c.predictor)()
        self.corrector = catalogue.get("corrector", c.corrector)(snr=c.snr, steps=c.corrector_steps)

    def check(self, sde):
        self.predictor.check(sde)

    def sample(self, score, sde, x, *, generator=None, callback=None, transform=None):
        grid = self.time_grid(sde, score, x)
        steps = len(grid) - 1
        B = x.shape[0]
        full = lambda v: torch.full((B,), v, device=x.device, dtype=x.dtype)  # noqa: E731
        plan = self.predictor.plan(sde, grid)  # per-step floats, computed once
        skip = self.config.corrector_skip
        ts = time_tensors(grid[:-1], x)  # the (B,) time of each step, made in blocks
        for i in range(steps):
            t = next(ts)
            if i >= skip:
                x, _ = self.corrector.step(x, t, score, sde, generator)
            if plan is not None:
                x, _ = self.predictor.planned_step(x, t, plan[i], score, generator)
            else:
                x, _ = self.predictor.step(x, t, full(grid[i + 1]), score, sde, generator)
            if transform is not None:  # a guidance projection (guidance.py)
                x = transform(x, i + 1, grid[i + 1])
            if callback is not None:
                callback(i + 1, steps, grid[i + 1])
        return self.finish(score, sde, x, grid[-1])


@hookimpl
def diffuse_register_solvers():
    return [PCSampler]
