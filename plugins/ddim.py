"""DDIM: denoising diffusion implicit models (Song, Meng & Ermon, ICLR 2021).

From ``t`` to ``t_next < t`` with ``x0_hat`` and ``eps_hat`` predicted at ``(x, t)``::

    x_next = a_next x0_hat + sqrt(s_next^2 - sigma^2) eps_hat + sigma z
    sigma  = eta * sqrt(var(t | t_next) * s_next^2 / s_t^2)

where ``var(t | t_next) = s_t^2 - (a_t / a_next)^2 s_next^2`` is the transition
variance of the forward process, so ``sigma`` is ``eta`` times the posterior std of
``q(x_next | x_t, x_0)`` (eq. 16 of the paper, written through the kernel so it holds
for every SDE with a Gaussian kernel). ``eta = 0`` is the deterministic DDIM sampler
(the first-order DPM-Solver); ``eta = 1`` is ancestral sampling. One score evaluation
per step, plus one for the final denoising step when ``denoise`` is on.
"""

from __future__ import annotations

import math

from pydantic import Field

from diffuse_engine import hookimpl, noise_like
from diffuse_engine.components.kernel_solver import KernelSolver, KernelSolverConfig
from diffuse_engine.components.solver import time_tensors


class DDIMConfig(KernelSolverConfig):
    eta: float = Field(0.0, ge=0, le=1, description="0: deterministic DDIM, 1: ancestral")


class DDIM(KernelSolver):
    """DDIM sampling with stochasticity eta (Song et al. 2021, eq. 12 and 16)."""

    name = "ddim"
    supports_transform = True
    Config = DDIMConfig

    @property
    def deterministic(self) -> bool:
        return self.config.eta == 0

    def coefficients(self, g) -> list[tuple[float, float, float, float, float]]:
        """``(a, s, a_next, c_eps, sigma)`` of every step of the grid ``g`` as Python
        floats, computed once before the loop: ``x_next = a_next x0 + c_eps eps +
        sigma z`` with ``c_eps = sqrt(s_next^2 - sigma^2)`` (module docstring)."""
        eta = self.config.eta
        out = []
        for i in range(len(g) - 1):
            a, s, a_n, s_n = g.a[i], g.s[i], g.a[i + 1], g.s[i + 1]
            var_ts = max(s * s - (a / a_n) ** 2 * s_n * s_n, 0.0)
            sigma = eta * math.sqrt(var_ts * s_n * s_n / (s * s))
            out.append((a, s, a_n, math.sqrt(max(s_n * s_n - sigma * sigma, 0.0)), sigma))
        return out

    def sample(self, score, sde, x, *, generator=None, callback=None, transform=None):
        g = self.grid(sde, score, x)
        steps = len(g) - 1
        predict = self.predictor()
        ts = time_tensors(g.t[:-1], x)  # the (B,) time of each step (blocks or fills)
        plan = zip(ts, self.coefficients(g), strict=True)
        for i, (tt, (a, s, a_n, c_eps, sigma)) in enumerate(plan):
            x0 = predict(score, x, tt, a, s, "data")
            eps = (x - a * x0) / s
            x = a_n * x0 + c_eps * eps
            if sigma > 0:
                x = x + sigma * noise_like(x, generator)
            if transform is not None:  # a guidance projection (guidance.py)
                x = transform(x, i + 1, g.t[i + 1])
            if callback is not None:
                callback(i + 1, steps, g.t[i + 1])
        return self.finish(score, sde, x, g.t[-1])


@hookimpl
def diffuse_register_solvers():
    return [DDIM]
