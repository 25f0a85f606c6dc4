"""The Ornstein-Uhlenbeck process, declared by its coefficients only.

``dx = -theta x dt + sigma sqrt(2 theta) dw`` (Uhlenbeck & Ornstein 1930). Its kernel
``N(exp(-theta t) x_0, sigma^2 (1 - exp(-2 theta t)))`` is *not* written here: deriving
from :class:`diffuse_engine.LinearSDE` makes the engine integrate the moment ODEs, so
every sampler, training and likelihood work from ``f`` and ``g`` alone.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from diffuse_engine import LinearSDE, SDEConfig


class OUConfig(SDEConfig):
    theta: float = Field(5.0, gt=0, description="mean-reversion rate (T = 1: mean coeff e^-theta)")
    sigma: float = Field(1.0, gt=0, description="stationary standard deviation")


class OrnsteinUhlenbeck(LinearSDE):
    """Ornstein-Uhlenbeck SDE (kernel computed numerically by the engine)."""

    name = "example_ou"
    Config = OUConfig
    # the kernel std at eps is about sigma sqrt(2 theta eps): keep it well below the data's
    # own scale, or the final denoising step visibly shrinks the modes
    sampling_eps = 1e-5

    def drift_coeff(self, t):
        return torch.full_like(t, -self.config.theta)

    def diffusion(self, t):
        return torch.full_like(t, self.config.sigma * math.sqrt(2 * self.config.theta))
