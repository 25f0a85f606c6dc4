"""Variance-preserving SDE with the cosine schedule, declared by ``f`` and ``g`` only.

The cosine schedule of Nichol & Dhariwal ("Improved Denoising Diffusion Probabilistic
Models", ICML 2021, eq. 17) as a continuous-time VP SDE: ``phi(t) = (end t + s) /
(1 + s) pi / 2``, ``f(t) = d/dt log cos(phi) = -phi' tan(phi)`` and ``g(t)^2 = -2 f(t)``.
Only the coefficients are written here: the kernel comes from
:class:`diffuse_engine.LinearSDE`'s numerical moment ODEs, which is what this built-in
demonstrates (the closed form ``mean_coeff = cos(phi(t)) / cos(phi(0))`` is used by the
tests to check it). ``end < 1`` keeps ``f`` finite at ``T``, like the paper's clipping.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from diffuse_engine import LinearSDE, SDEConfig, hookimpl


class CosineConfig(SDEConfig):
    s: float = Field(0.008, ge=0, le=1, description="offset that keeps beta(0) above zero")
    end: float = Field(
        0.995, gt=0, lt=1, description="fraction of the quarter turn reached at T (clipping)"
    )


class CosineVPSDE(LinearSDE):
    """VP SDE with the cosine schedule (numerical kernel)."""

    name = "cosine"
    Config = CosineConfig

    def phi(self, t):
        c = self.config
        return (c.end * t + c.s) / (1 + c.s) * (math.pi / 2)

    def drift_coeff(self, t):
        c = self.config
        return -(c.end / (1 + c.s) * (math.pi / 2)) * torch.tan(self.phi(t))

    def diffusion(self, t):
        return (-2 * self.drift_coeff(t)).sqrt()


@hookimpl
def diffuse_register_sdes():
    return [CosineVPSDE]
