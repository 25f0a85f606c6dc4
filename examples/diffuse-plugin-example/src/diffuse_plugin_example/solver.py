"""DDIM sampling for any SDE with a Gaussian kernel.

Song, Meng & Ermon, "Denoising Diffusion Implicit Models" (ICLR 2021, eq. 12), written
with the kernel ``x_t = a_t x_0 + s_t z`` so it needs nothing but ``sde.marginal``:
from ``t`` to ``s < t``, with the Tweedie estimate ``x0 = (x + s_t^2 score) / a_t`` and
``eps = -s_t score``::

    c   = eta * (s_s / s_t) * sqrt(s_t^2 - (a_t / a_s)^2 s_s^2)
    x_s = a_s x0 + sqrt(s_s^2 - c^2) eps + c z

``eta = 0`` is the deterministic DDIM (the probability-flow ODE's exponential
integrator); ``eta = 1`` is the ancestral (DDPM posterior) step. Times are spaced
uniformly in log-SNR ``log(a_t / s_t)`` by default (as DPM-Solver, Lu et al. 2022), which
suits any noise schedule: an OU process's std grows like ``sqrt(t)`` near 0, where a
uniform grid in ``t`` takes one huge step.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from diffuse_engine import Solver, SolverConfig, bcast, noise_like


class DDIMConfig(SolverConfig):
    steps: int = Field(100, ge=1, description="number of time steps from T to eps")
    eta: float = Field(0.0, ge=0, le=1, description="0: deterministic DDIM, 1: ancestral")
    spacing: Literal["logsnr", "uniform"] = Field("logsnr", description="time-step spacing")


class DDIMSampler(Solver):
    """DDIM (eta-family) for any SDE with a Gaussian perturbation kernel."""

    name = "example_ddim"
    Config = DDIMConfig

    def logsnr_grid(self, sde) -> list[float]:
        """``steps + 1`` times from ``T`` to ``eps``, uniform in ``log(a / s)``."""
        t = torch.linspace(self.eps(sde), sde.T, 4097, dtype=torch.float64)
        a, s = sde.marginal(t)
        lam = (a.log() - s.log()).numpy()  # decreasing in t
        targets = np.linspace(lam[-1], lam[0], self.config.steps + 1)
        grid = np.interp(targets, lam[::-1], t.numpy()[::-1])
        grid[0], grid[-1] = sde.T, self.eps(sde)
        return grid.tolist()

    def sample(self, score, sde, x, *, generator=None, callback=None):
        grid = self.logsnr_grid(sde) if self.config.spacing == "logsnr" else self.time_grid(sde)
        steps = len(grid) - 1
        eta = self.config.eta
        full = lambda v: torch.full((x.shape[0],), v, device=x.device, dtype=x.dtype)  # noqa: E731
        for i in range(steps):
            t, s = full(grid[i]), full(grid[i + 1])
            a_t, s_t = sde.marginal(t)
            a_s, s_s = sde.marginal(s)
            sc = score(x, t)
            x0 = (x + bcast(s_t**2, x) * sc) / bcast(a_t, x)
            eps = -bcast(s_t, x) * sc
            c = eta * s_s / s_t * (s_t**2 - (a_t / a_s) ** 2 * s_s**2).clamp_min(0).sqrt()
            x = bcast(a_s, x) * x0 + bcast((s_s**2 - c**2).clamp_min(0).sqrt(), x) * eps
            if eta > 0:
                x = x + bcast(c, x) * noise_like(x, generator)
            if callback is not None:
                callback(i + 1, steps, grid[i + 1])
        return self.finish(score, sde, x, grid[-1])
