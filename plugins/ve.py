"""Variance-exploding SDE (SMLD / NCSN as an SDE; Song et al. 2021, eq. 9).

``dx = sqrt(d[sigma^2(t)]/dt) dw`` with ``sigma(t) = sigma_min (sigma_max /
sigma_min)^t``. Following the paper and its reference code, the kernel is
``x_t | x_0 ~ N(x_0, sigma(t)^2 I)``: the process starts at ``t = 0`` from the data
smoothed by the smallest noise level ``sigma_min``.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator

from diffuse_engine import SDE, SDEConfig, hookimpl


class VEConfig(SDEConfig):
    sigma_min: float = Field(0.01, gt=0, description="smallest noise level")
    sigma_max: float = Field(50.0, gt=0, description="largest noise level (prior std)")

    @model_validator(mode="after")
    def _ordered(self):
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min}) must be < sigma_max ({self.sigma_max})")
        return self


class VESDE(SDE):
    """Variance-exploding SDE with a geometric noise schedule."""

    name = "ve"
    Config = VEConfig
    sampling_eps = 1e-5

    def __init__(self, config=None, **fields):
        super().__init__(config, **fields)
        self.log_ratio = math.log(self.config.sigma_max / self.config.sigma_min)
        self.prior_std = self.config.sigma_max

    def sigma(self, t):
        return self.config.sigma_min * torch.exp(t * self.log_ratio)

    def drift_coeff(self, t):
        return torch.zeros_like(t)

    def drift(self, x, t):
        return torch.zeros_like(x)

    def diffusion(self, t):
        return self.sigma(t) * math.sqrt(2 * self.log_ratio)

    def marginal(self, t):
        return torch.ones_like(t), self.sigma(t)

    def time_of_log_snr(self, lam):
        """``lambda = -log sigma(t)``: ``t = (-lambda - log sigma_min) / log(max / min)``."""
        return (-lam - math.log(self.config.sigma_min)) / self.log_ratio

    def discretize(self, x, t, t_prev):
        # SMLD's noise ladder: G^2 = sigma(t)^2 - sigma(t_prev)^2 (Song et al. 2021, eq. 46)
        g2 = self.sigma(t) ** 2 - self.sigma(t_prev) ** 2
        return torch.zeros_like(x), g2.sqrt()


@hookimpl
def diffuse_register_sdes():
    return [VESDE]
