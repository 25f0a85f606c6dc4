"""``smc``: an asymptotically exact particle sampler for linear inverse problems.

Each of the ``n`` samples is the output of its own sequential Monte Carlo run with
``particles = K`` particles, moved by the model's reverse kernel (the Gaussian posterior
``q(x_s | x_t, x0_hat)`` on the solver's time grid), weighted, and resampled
(systematic, when the effective sample size falls under ``ess * K``); the sample is one
particle drawn from the final weights. As ``K`` grows its law tends to the posterior of
the model's own path measure, ``p_theta(x_0) p(y | x_0)``: the bias is ``O(1 / K)``.
Two targets, by the observation's noise:

* ``noise_std = 0`` (masks, noiseless projections): the observed part ``P x = A^+ A x``
  of the forward process depends on ``x_0`` only through ``A^+ y``, so one path of it,
  drawn backwards by the forward bridge from ``A^+ y``, is pinned into every particle,
  and a particle is weighted by its reverse kernel's density of the pinned step
  (SMCDiff, Trippe et al. 2022; the noiseless case of MCGdiff, Cardoso et al., ICLR
  2024). Given the whole observed path ``x_0``'s unobserved part is independent of it,
  so the target is exact.
* ``noise_std > 0``: the twisted diffusion sampler (Wu, Trippe, Naesseth, Blei &
  Cunningham, NeurIPS 2023). Twisting functions ``h_t(x_t) = N(y; A x0_hat(x_t),
  noise_std^2 I + r_t^2 A A^T)`` (``r_t`` as in ``pigdm``) tilt each proposal by ``scale
  std^2 grad log h_t`` and enter the weights as ``h_s(x_s) / h_t(x_t)`` times the
  kernel's density ratio; at ``eps`` the last twist is replaced by the likelihood
  ``N(y; A x0_hat, noise_std^2 I)``. One score evaluation with a vector-Jacobian
  product per step.

Score evaluations per particle: ``steps + 1`` (the last one denoises). The solver (``ddim``
or ``pc``) lends its time grid (``steps``, ``schedule``, ``eps``, ``denoise``).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from diffuse_engine import Guided, hookimpl
from diffuse_engine.components.guidance import GuidanceConfig
from diffuse_engine.components.observation import observation
from diffuse_plugins.inverse import (
    InverseGuidance,
    bcast,
    marginal,
    pin,
    posterior_kernel,
    times,
)


class SMCConfig(GuidanceConfig):
    particles: int = Field(16, ge=1, description="particles per sample (K)")
    ess: float = Field(0.5, gt=0, le=1, description="resample when ESS < ess * particles")
    prior_var: float = Field(1.0, gt=0, description="c of the twisting variance r_t^2")


def systematic(logw: torch.Tensor, generator) -> torch.Tensor:
    """Systematic resampling (Kitagawa 1996) per row of ``logw`` ``(n, K)``: indices."""
    n, K = logw.shape
    w = torch.softmax(logw, 1).cumsum(1)
    w[:, -1] = 1.0
    u = torch.rand(n, 1, generator=generator, device=logw.device, dtype=logw.dtype)
    pos = (u + torch.arange(K, device=logw.device, dtype=logw.dtype)) / K
    return torch.searchsorted(w.contiguous(), pos.contiguous()).clamp_max(K - 1)


def gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` ``(n K, ...)`` picked per group by ``idx`` ``(n, K')``."""
    n, K = idx.shape[0], x.shape[0] // idx.shape[0]
    flat = (idx + K * torch.arange(n, device=idx.device)[:, None]).reshape(-1)
    return x[flat]


def sq(v: torch.Tensor) -> torch.Tensor:
    """Per-row squared norm ``(B,)``."""
    return v.reshape(v.shape[0], -1).pow(2).sum(1)


class SMC(InverseGuidance):
    """Asymptotically exact SMC for ``y = A x + noise_std z`` (module docstring)."""

    name = "smc"
    Config = SMCConfig
    solvers = ("ddim", "pc")

    def bind(self, score, sde, cond, *, classifier=None, generator=None):
        obs, c = observation(cond), self.config
        uncond = lambda x, t: score(x, t, None)  # noqa: E731
        K, s2 = c.particles, obs.noise_std**2

        def randn(x):
            return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

        def twist(x, t: float, final: bool = False):
            """``(score, x0_hat, log h_t(x), grad log h_t(x))`` at particles ``x``."""
            a, s = marginal(sde, t)
            v = (s / a) ** 2
            r2 = 0.0 if final else c.prior_var * v / (c.prior_var + v)
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                sc = uncond(xg, times(t, x))
                x0 = sde.denoise(xg, sc, times(t, x))
                r = obs.residual(x0)
                log_h = -0.5 * (r * obs.gram_solve(r, r2, s2)).reshape(r.shape[0], -1).sum(1)
                # the normaliser of h_t is the same for all particles at one time
                (grad,) = torch.autograd.grad(log_h.sum(), xg)
            return sc.detach(), x0.detach(), log_h.detach(), grad

        def run(solver, sde, x_T, *, generator=generator, callback=None):
            grid = solver.time_grid(sde, uncond, x_T)
            steps, n = len(grid) - 1, x_T.shape[0]
            dims = x_T.shape[1:]
            extra = sde.prior_sample(
                (n * (K - 1), *dims), generator=generator, device=x_T.device, dtype=x_T.dtype
            )
            x = torch.cat([x_T[:, None], extra.reshape(n, K - 1, *dims)], 1).reshape(n * K, *dims)
            logw = torch.zeros(n, K, device=x.device, dtype=torch.float64)
            noiseless = s2 == 0
            if noiseless:  # the pinned observed path, drawn backwards from A^+ y
                target = obs.pinv_y(x)
                a, s = marginal(sde, grid[0])
                u = a * target + s * obs.project(randn(x_T).repeat_interleave(K, 0))
                x = x - obs.project(x) + u
            else:
                sc, x0, log_h, grad = twist(x, grid[0])
                logw = logw + log_h.reshape(n, K).double()  # gamma_T = p_T h_T
            for i in range(steps):
                t, t_next = grid[i], grid[i + 1]
                if noiseless:
                    sc = uncond(x, times(t, x))
                mean, std = posterior_kernel(sde, x, sc, t, t_next)
                std = bcast(std, x)
                if noiseless:
                    x = mean + std * randn(x)
                    u = bridge(sde, u, target, t, t_next, obs, generator, K)
                    x = x - obs.project(x) + u
                    inc = -0.5 * sq(u - obs.project(mean)) / std.reshape(-1) ** 2
                else:
                    prop = mean + c.scale * std**2 * grad
                    x = prop + std * randn(x)
                    log_pq = 0.5 * (sq(x - prop) - sq(x - mean)) / std.reshape(-1) ** 2
                    final = i + 1 == steps
                    sc, x0, log_h_next, grad = twist(x, t_next, final=final)
                    inc = log_pq + log_h_next - log_h
                    log_h = log_h_next
                logw = logw + inc.reshape(n, K).double()
                ess = 1 / torch.softmax(logw, 1).pow(2).sum(1)
                redo = ess < c.ess * K
                if bool(redo.any()) and i + 1 < steps:
                    idx = systematic(logw, generator)
                    keep = torch.arange(K, device=x.device).expand(n, K)
                    idx = torch.where(redo[:, None], idx, keep)
                    x = gather(x, idx)  # the pinned path u is the same within a group
                    if not noiseless:
                        sc, x0, log_h, grad = (gather(v, idx) for v in (sc, x0, log_h, grad))
                    logw = torch.where(redo[:, None], torch.zeros_like(logw), logw)
                if callback is not None:
                    callback(i + 1, steps, t_next)
            pick = torch.multinomial(torch.softmax(logw, 1).float(), 1, generator=generator)
            x = gather(x, pick)
            if noiseless:
                return pin(obs, solver.finish(uncond, sde, x, grid[-1]))
            x0 = gather(x0, pick)
            return x0 if solver.config.denoise else x

        return Guided(score=uncond, run=run)


def bridge(sde, u, target, t: float, t_next: float, obs, generator, K: int):
    """One backward step of the forward bridge from ``x_0 = target`` in the observed
    subspace: ``q(u_s | u_t, x_0)``, the same noise for all ``K`` particles of a sample."""
    (a_t, s_t), (a_s, s_s) = marginal(sde, t), marginal(sde, t_next)
    ratio = a_t / a_s
    var_ts = max(s_t * s_t - ratio * ratio * s_s * s_s, 0.0)
    mean = (ratio * s_s**2 / s_t**2) * u + (a_s * var_ts / s_t**2) * target
    std = math.sqrt(var_ts * s_s**2 / s_t**2)
    n = u.shape[0] // K
    z = torch.randn((n, *u.shape[1:]), generator=generator, device=u.device, dtype=u.dtype)
    return mean + std * obs.project(z.repeat_interleave(K, 0))


@hookimpl
def diffuse_register_guidance():
    return [SMC]
