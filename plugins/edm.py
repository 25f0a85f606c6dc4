"""The EDM sampler: Heun's method in the noise level with optional stochastic churn
(Karras, Aittala, Aila & Laine 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", Alg. 2).

Written through the kernel: with ``sigma = s / a`` and ``x_hat = x / a`` every SDE with
a Gaussian kernel has the probability-flow ODE ``dx_hat / dsigma = (x_hat - D(x_hat,
sigma)) / sigma`` (EDM eq. 4 with the scaling divided out), where ``D`` is the data
prediction ``x0_hat = (x + s^2 score) / a``. Each step is Heun's second-order method
in ``sigma`` (2 score evaluations); the schedule defaults to Karras' ``sigma^(1/rho)``
spacing (``schedule = "karras"``, ``rho = 7``). With ``churn > 0`` each step in
``[s_tmin, s_tmax]`` first raises the noise level by ``gamma = min(churn / steps,
sqrt(2) - 1)`` and adds the matching fresh noise (``s_noise`` times it), Alg. 2 lines
5-7. EDM's final Euler step to ``sigma = 0`` is the final denoising step here
(``denoise``, one more evaluation): it equals Tweedie's formula. Score evaluations:
``2 * steps - euler_steps``, plus one for the denoising step; ``nfe = N`` spends
exactly ``N`` (:meth:`EDMConfig.budget`).
"""

from __future__ import annotations

import math

from pydantic import Field

from diffuse_engine import hookimpl, noise_like
from diffuse_engine.components.kernel_solver import KernelGrid, KernelSolver, KernelSolverConfig
from diffuse_engine.components.schedules import SCHEDULE_HELP, Schedule, time_from_log_snr
from diffuse_engine.components.solver import MAX_STEPS


class EDMConfig(KernelSolverConfig):
    steps: int = Field(10, ge=1, le=MAX_STEPS, description="number of Heun steps from T to eps")
    schedule: Schedule = Field(
        "karras", description="time-step spacing (EDM: karras); " + SCHEDULE_HELP
    )
    churn: float = Field(0.0, ge=0, description="S_churn: stochasticity (0: deterministic)")
    s_tmin: float = Field(0.0, ge=0, description="churn only where sigma >= s_tmin")
    s_tmax: float = Field(
        float("inf"), gt=0, allow_inf_nan=True, description="churn only where sigma <= s_tmax"
    )
    s_noise: float = Field(1.0, gt=0, description="scale of the churn noise")
    euler_steps: int = Field(
        0, ge=0, description="how many of the first steps are Euler (1 evaluation, not 2)"
    )

    def budget(self, nfe: int) -> dict:
        """Heun steps cost 2 evaluations: ``M = nfe - denoise`` gives ``ceil(M / 2)``
        steps, the first one Euler when ``M`` is odd (at the largest noise levels the
        trajectory is nearly straight, so the lost order costs least there)."""
        out = super().budget(nfe)
        M = out["steps"]
        steps = (M + 1) // 2
        return {**out, "steps": steps, "euler_steps": 2 * steps - M}


class EDMHeun(KernelSolver):
    """Heun's second-order sampler in sigma with optional churn (Karras et al. 2022)."""

    name = "edm"
    supports_transform = True
    Config = EDMConfig

    @property
    def deterministic(self) -> bool:
        return self.config.churn == 0

    def sample(self, score, sde, x, *, generator=None, callback=None, transform=None):
        c = self.config
        g = self.grid(sde, score, x)
        steps = len(g) - 1
        sig = [s / a for a, s in zip(g.a, g.s, strict=True)]
        # churned noise levels and their times, once before the loop
        gamma_max = min(c.churn / steps, math.sqrt(2) - 1)
        hat = [
            min(si * (1 + gamma_max), sig[0]) if c.churn > 0 and c.s_tmin <= si <= c.s_tmax else si
            for si in sig[:-1]
        ]
        churned = [i for i in range(steps) if hat[i] > sig[i]]
        hat_t = (
            dict(
                zip(
                    churned,
                    time_from_log_snr(sde, [-math.log(hat[i]) for i in churned], g.t[-1], g.t[0]),
                    strict=True,
                )
            )
            if churned
            else {}
        )
        hg = KernelGrid.on(sde, [hat_t[i] for i in churned]) if churned else None
        hat_k = {i: (hg.t[j], hg.a[j], hg.s[j], hg.s[j] / hg.a[j]) for j, i in enumerate(churned)}
        xh = x / g.a[0]
        for i in range(steps):
            t, a, s, sg = g.t[i], g.a[i], g.s[i], sig[i]
            if i in hat_k:
                t, a, s, sg_hat = hat_k[i]
                xh = xh + c.s_noise * math.sqrt(sg_hat**2 - sg**2) * noise_like(xh, generator)
                sg = sg_hat
            t_n, a_n, s_n, sg_n = g.t[i + 1], g.a[i + 1], g.s[i + 1], sig[i + 1]
            d = (xh - self.predict(score, xh * a, t, a, s, "data")) / sg
            x_e = xh + (sg_n - sg) * d
            if i < c.euler_steps:
                xh = x_e
            else:
                d_n = (x_e - self.predict(score, x_e * a_n, t_n, a_n, s_n, "data")) / sg_n
                xh = xh + (0.5 * (sg_n - sg)) * (d + d_n)
            if transform is not None:  # a guidance projection (guidance.py)
                xh = transform(xh * a_n, i + 1, t_n) / a_n
            if callback is not None:
                callback(i + 1, steps, t_n)
        return self.finish(score, sde, xh * g.a[-1], g.t[-1])


@hookimpl
def diffuse_register_solvers():
    return [EDMHeun]
