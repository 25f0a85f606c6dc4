"""Variance-preserving SDE (DDPM as an SDE; Song et al. 2021, eq. 11).

``dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw`` with linear ``beta(t) = beta_min + t
(beta_max - beta_min)``; kernel mean ``exp(-1/2 int beta)`` and variance ``1 - exp(-int
beta)``. Reverse-diffusion and ancestral steps use the DDPM discretisation.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from diffuse_engine import SDEConfig, VPFamilySDE, hookimpl


class BetaConfig(SDEConfig):
    beta_min: float = Field(0.1, gt=0, description="beta(0)")
    beta_max: float = Field(20.0, gt=0, description="beta(1)")

    @model_validator(mode="after")
    def _ordered(self):
        if self.beta_min >= self.beta_max:
            raise ValueError(f"beta_min ({self.beta_min}) must be < beta_max ({self.beta_max})")
        return self


def time_of_beta_integral(config: BetaConfig, b):
    """The ``t >= 0`` with ``b0 t + (b1 - b0) t^2 / 2 = b`` (``b >= 0``), written
    ``2 b / (b0 + sqrt(b0^2 + 2 (b1 - b0) b))`` so that small ``b`` lose no digits."""
    b0, d = config.beta_min, config.beta_max - config.beta_min
    return 2 * b / (b0 + torch.sqrt(b0 * b0 + 2 * d * b))


class VPSDE(VPFamilySDE):
    """Variance-preserving SDE with a linear beta schedule."""

    name = "vp"
    Config = BetaConfig

    def beta(self, t):
        return self.config.beta_min + t * (self.config.beta_max - self.config.beta_min)

    def beta_integral(self, t):
        return self.config.beta_min * t + 0.5 * t**2 * (self.config.beta_max - self.config.beta_min)

    def log_mean_coeff(self, t):
        return -0.5 * self.beta_integral(t)

    def log_mean_coeff_rate(self, t):
        return -0.5 * self.beta(t)

    def time_of_log_snr(self, lam):
        """``a^2 = sigmoid(2 lambda)``, so ``log a = -softplus(-2 lambda) / 2``, and
        ``log a = -(b0 t + (b1 - b0) t^2 / 2) / 2`` is a quadratic in ``t``."""
        return time_of_beta_integral(self.config, torch.nn.functional.softplus(-2 * lam))


@hookimpl
def diffuse_register_sdes():
    return [VPSDE]
