"""Correctors of the predictor-corrector sampler: Langevin MCMC at a fixed ``t``."""

from __future__ import annotations

import torch

from diffuse_engine import Corrector, bcast, hookimpl, noise_like


class Langevin(Corrector):
    """Langevin corrector with the step size set by a target signal-to-noise ratio
    (Song et al. 2021, Alg. 4 and 5): ``step = 2 (snr ||z|| / ||s||)^2`` with norms
    averaged over the batch, then ``x += step s + sqrt(2 step) z``."""

    name = "langevin"

    def step(self, x, t, score, sde, generator):
        x_mean = x
        snr = self.config.snr
        for _ in range(self.config.steps):
            grad = score(x, t)
            noise = noise_like(x, generator)
            grad_norm = torch.linalg.vector_norm(grad.flatten(1), dim=1).mean()
            noise_norm = torch.linalg.vector_norm(noise.flatten(1), dim=1).mean()
            step = 2 * (snr * noise_norm / grad_norm) ** 2
            x_mean = x + step * grad
            x = x_mean + (2 * step).sqrt() * noise
        return x, x_mean


class AnnealedLangevin(Corrector):
    """Annealed Langevin dynamics of NCSN (Song & Ermon 2019, Alg. 1) in the SDE
    reference code's form: ``step = 2 (snr * std(t))^2`` from the kernel's std."""

    name = "annealed_langevin"

    def step(self, x, t, score, sde, generator):
        x_mean = x
        _, std = sde.marginal(t)
        step = bcast(2 * (self.config.snr * std) ** 2, x)
        for _ in range(self.config.steps):
            grad = score(x, t)
            x_mean = x + step * grad
            x = x_mean + (2 * step).sqrt() * noise_like(x, generator)
        return x, x_mean


class NoCorrector(Corrector):
    """No correction."""

    name = "none"

    def step(self, x, t, score, sde, generator):
        return x, x


@hookimpl
def diffuse_register_correctors():
    return [Langevin, AnnealedLangevin, NoCorrector]
