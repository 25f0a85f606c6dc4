"""Sub-variance-preserving SDE (Song et al. 2021, eq. 12).

``dx = -1/2 beta(t) x dt + sqrt(beta(t) (1 - exp(-2 int_0^t beta))) dw``: the same
mean as VP, with kernel std ``1 - exp(-int beta)``, always below VP's.
"""

from __future__ import annotations

import torch

from diffuse_engine import SDE, hookimpl
from diffuse_plugins.vp import BetaConfig, time_of_beta_integral


class SubVPSDE(SDE):
    """Sub-VP SDE with a linear beta schedule."""

    name = "subvp"
    Config = BetaConfig

    def beta(self, t):
        return self.config.beta_min + t * (self.config.beta_max - self.config.beta_min)

    def beta_integral(self, t):
        return self.config.beta_min * t + 0.5 * t**2 * (self.config.beta_max - self.config.beta_min)

    def drift_coeff(self, t):
        return -0.5 * self.beta(t)

    def diffusion(self, t):
        return (self.beta(t) * -torch.expm1(-2 * self.beta_integral(t))).sqrt()

    def marginal(self, t):
        b = self.beta_integral(t)
        return torch.exp(-0.5 * b), -torch.expm1(-b)

    def time_of_log_snr(self, lam):
        """With ``u = exp(-b / 2)`` (``b`` the beta integral), ``e^lambda = u / (1 - u^2)``,
        so ``1 / u - u = 2 sinh(b / 2) = e^-lambda``: ``b = 2 asinh(e^-lambda / 2)``.

        Written so that nothing overflows or cancels: for ``lambda > 0`` as it stands
        (``asinh`` of a small argument keeps its digits where ``u`` is near 1, at small
        ``t``), for ``lambda <= 0`` as ``-lambda + log((1 + sqrt(1 + 4 e^(2 lambda))) / 2)``."""
        m = lam.abs()
        half_b = torch.where(
            lam > 0,
            torch.asinh(0.5 * torch.exp(-m)),
            m + torch.log(0.5 + 0.5 * torch.sqrt(1 + 4 * torch.exp(-2 * m))),
        )
        return time_of_beta_integral(self.config, 2 * half_b)


@hookimpl
def diffuse_register_sdes():
    return [SubVPSDE]
