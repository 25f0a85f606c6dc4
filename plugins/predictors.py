"""Predictors of the predictor-corrector sampler (Song et al. 2021, Sec. 4.2, App. E, G).

Each moves ``x`` from ``t`` to ``t_next < t`` and returns ``(x, x_mean)`` where ``x_mean``
is the step without its final noise.
"""

from __future__ import annotations

import torch

from diffuse_engine import Predictor, bcast, hookimpl, noise_like


class EulerMaruyama(Predictor):
    """Euler-Maruyama on the reverse SDE ``dx = [f - g^2 s] dt + g dw_bar``."""

    name = "euler_maruyama"

    def step(self, x, t, t_next, score, sde, generator):
        dt = t - t_next
        drift = sde.reverse_drift(x, t, score(x, t))
        x_mean = x - drift * bcast(dt, x)
        g = sde.diffusion(t) * dt.sqrt()
        return x_mean + bcast(g, x) * noise_like(x, generator), x_mean


class ReverseDiffusion(Predictor):
    """Reverse diffusion (Song et al. 2021, eq. 45): ``x - f + G^2 s + G z`` with the
    SDE's own discretisation ``(f, G)`` of the forward step ``t_next -> t``."""

    name = "reverse_diffusion"

    def step(self, x, t, t_next, score, sde, generator):
        f, G = sde.discretize(x, t, t_next)
        x_mean = x - f + bcast(G**2, x) * score(x, t)
        return x_mean + bcast(G, x) * noise_like(x, generator), x_mean

    def plan(self, sde, grid):
        """For a linear drift, ``f = A x``: the step is ``(1 - A) x + G^2 s + G z`` with
        ``(A, G)`` per step from :meth:`SDE.linear_discretization`."""
        lin = sde.linear_discretization(grid)
        return None if lin is None else list(zip(*lin, strict=True))

    def planned_step(self, x, t, coefficients, score, generator):
        A, G = coefficients
        x_mean = torch.add(x * (1.0 - A), score(x, t), alpha=G * G)
        return torch.add(x_mean, noise_like(x, generator), alpha=G), x_mean


class Ancestral(Predictor):
    """Ancestral sampling: DDPM's step for the VP family (Ho et al. 2020, Alg. 2) and
    SMLD's for VE (Song et al. 2021, eq. 47); the Tweedie posterior step otherwise."""

    name = "ancestral"

    def step(self, x, t, t_next, score, sde, generator):
        mean, std = sde.ancestral_step(x, score(x, t), t, t_next)
        return mean + bcast(std, x) * noise_like(x, generator), mean


class NoPredictor(Predictor):
    """Leaves ``x`` unchanged (corrector-only sampling)."""

    name = "none"

    def step(self, x, t, t_next, score, sde, generator):
        return x, x


@hookimpl
def diffuse_register_predictors():
    return [EulerMaruyama, ReverseDiffusion, Ancestral, NoPredictor]
