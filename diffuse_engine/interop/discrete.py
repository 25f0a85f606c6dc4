"""The VP SDE of a discrete ``alphas_cumprod`` table, e.g. a diffusers scheduler's.

A DDPM-family model is trained on a chain of ``N`` steps with ``q(x_i | x_0) = N(sqrt(abar_i)
x_0, (1 - abar_i) I)``, ``i = 1..N``, for a table ``abar`` of any shape (linear, scaled
linear, cosine, trained betas, ...; Ho et al. 2020; Nichol & Dhariwal 2021). As for the
built-in ``ddpm`` chain (whose table is fixed to linear betas), step ``i`` is time
``t = i / N`` and ``log abar`` is interpolated linearly in between, which makes the chain a
variance-preserving SDE with piecewise-constant ``beta(t)``: its kernel equals the table
exactly at ``t = i / N`` and every continuous-time solver, the likelihood included, applies.
diffusers' timestep ``k`` (0-based, ``alphas_cumprod[k]``) is step ``i = k + 1``, so
``t = (k + 1) / N``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from diffuse_engine.components.sde import SDEConfig, VPFamilySDE
from diffuse_engine.core.errors import DiffuseError


class DiscreteChainConfig(SDEConfig):
    """An explicit table: ``alphas_cumprod[i - 1]`` is ``abar_i`` at ``t = i / N``."""

    alphas_cumprod: list[float] = Field(
        ..., min_length=2, description="abar_1 > ... > abar_N in (0, 1), one per chain step"
    )


def check_table(abar: torch.Tensor, where: str) -> torch.Tensor:
    """``abar`` as float64, or a one-line error unless ``1 > abar_1 > ... > abar_N > 0``."""
    abar = torch.as_tensor(abar, dtype=torch.float64).flatten()
    if abar.numel() < 2 or not torch.isfinite(abar).all():
        raise DiffuseError(f"{where}: alphas_cumprod needs at least 2 finite values")
    if not (abar < 1).all() or not (abar > 0).all() or not (abar[1:] < abar[:-1]).all():
        raise DiffuseError(
            f"{where}: alphas_cumprod must decrease strictly inside (0, 1) (got "
            f"{float(abar[0]):.6g} .. {float(abar[-1]):.6g}); a zero terminal SNR "
            "(abar_N = 0) has no Gaussian prior"
        )
    return abar


class DiscreteChain(VPFamilySDE):
    """The chain of a table ``abar`` (``(N,)``): ``log_alpha_bars`` ``(N + 1,)``, index 0 data.

    Subclasses supply the table by overriding :meth:`table` (the ``diffusers`` SDE reads
    it from a scheduler) or its per-step ``log(1 - beta_i)`` by overriding
    :meth:`log_keep` (the built-in ``ddpm`` chain, from its linear betas); this class
    reads ``config.alphas_cumprod``.
    """

    name = "discrete"
    Config = DiscreteChainConfig

    def __init__(self, config=None, **fields):
        super().__init__(config, **fields)
        self._log_keep = self.log_keep()
        self.N = self._log_keep.numel()
        self.sampling_eps = 1.0 / self.N
        zero = torch.zeros(1, dtype=torch.float64)
        self.log_alpha_bars = torch.cat([zero, self._log_keep.cumsum(0)])
        self._cache: dict = {}

    def log_keep(self) -> torch.Tensor:
        """``log(1 - beta_i) = log(abar_i / abar_{i-1})``, float64 ``(N,)``."""
        abar = check_table(self.table(), f"SDE {self.name!r}")
        log_abar = torch.cat([torch.zeros(1, dtype=torch.float64), abar.log()])
        return log_abar[1:] - log_abar[:-1]

    def table(self) -> Sequence[float] | torch.Tensor:
        """``abar_1 .. abar_N``."""
        return self.config.alphas_cumprod

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """The table, float64 ``(N,)``."""
        return self.log_alpha_bars[1:].exp()

    def _tables(self, t):
        key = (t.device, t.dtype)
        if key not in self._cache:
            self._cache[key] = (
                self.log_alpha_bars.to(t.device, t.dtype),
                self._log_keep.to(t.device, t.dtype),
            )
        return self._cache[key]

    def _interval(self, t):
        u = t * self.N
        return u, torch.ceil(u).clamp(1, self.N).long()

    def log_mean_coeff(self, t):
        lab, lk = self._tables(t)
        u, i = self._interval(t)
        return 0.5 * (lab[i - 1] + (u - (i - 1)) * lk[i - 1])

    def log_mean_coeff_rate(self, t):
        _, lk = self._tables(t)
        _, i = self._interval(t)
        return 0.5 * self.N * lk[i - 1]
