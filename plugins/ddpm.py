"""The DDPM discrete Markov chain (Ho et al. 2020) in continuous time.

``q(x_i | x_{i-1}) = N(sqrt(1 - beta_i) x_{i-1}, beta_i I)`` for ``i = 1..N`` with
linear ``beta_i`` from ``beta_1`` to ``beta_N``, so ``q(x_i | x_0) = N(sqrt(abar_i) x_0,
(1 - abar_i) I)`` with ``abar_i = prod_{j<=i} (1 - beta_j)``. Step ``i`` is time
``t = i / N``. Between grid points ``log abar`` is interpolated linearly, which makes
the chain a variance-preserving SDE with piecewise-constant ``beta(t) = -N log(1 -
beta_i)``: its kernel equals the chain's closed form exactly at ``t = i / N``, and every
continuous-time solver applies. A PC sampler with ``steps = N - 1`` from ``T = 1`` to
``eps = 1 / N`` with the ancestral predictor is exactly DDPM's ancestral sampler.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from diffuse_engine import SDEConfig, hookimpl
from diffuse_engine.interop import DiscreteChain


class DDPMConfig(SDEConfig):
    N: int = Field(1000, ge=2, description="number of chain steps")
    beta_1: float = Field(1e-4, gt=0, lt=1, description="first beta of the linear schedule")
    beta_N: float = Field(0.02, gt=0, lt=1, description="last beta of the linear schedule")

    @model_validator(mode="after")
    def _ordered(self):
        if self.beta_1 > self.beta_N:
            raise ValueError(f"beta_1 ({self.beta_1}) must be <= beta_N ({self.beta_N})")
        return self


class DDPMChain(DiscreteChain):
    """The DDPM chain of linear betas: ``betas`` ``(N,)`` and ``log_alpha_bars`` ``(N + 1,)``
    (index 0 is data); the continuous-time chain itself is :class:`DiscreteChain`'s."""

    name = "ddpm"
    Config = DDPMConfig

    def log_keep(self):
        c = self.config
        self.betas = torch.linspace(c.beta_1, c.beta_N, c.N, dtype=torch.float64)
        return torch.log1p(-self.betas)

    def forward_chain(self, x0, steps: int, generator=None):
        """Run the chain ``steps`` transitions from ``x0`` (for tests): ``x_steps``."""
        x = x0
        for i in range(steps):
            b = float(self.betas[i])
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = (1 - b) ** 0.5 * x + b**0.5 * z
        return x


@hookimpl
def diffuse_register_sdes():
    return [DDPMChain]
