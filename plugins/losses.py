"""Built-in training objectives (registry kind ``loss``), one signature for all.

``loss(model, x0, generator, cond=None) -> scalar``: ``model(x, t)`` is a score model
(its output parameterisation is converted to a score by the model itself), ``x0`` a data
batch ``(B, *dims)``, and all randomness (times, noise, projections, label dropout) comes
from ``generator`` so a resumed run reproduces the same losses. For class-conditional
training ``cond = {"label": (B,)}`` and every loss evaluates ``model(x, t, cond)``, after
the model's label dropout (drawn from ``generator`` just before the model call).

* ``dsm``: continuous-time denoising score matching for any SDE with a Gaussian kernel
  (Song et al. 2021, eq. 7), ``t ~ U[eps, T]``, weighting ``std(t)^2`` or, with
  ``likelihood_weighting``, ``g(t)^2`` (Song, Durkan et al. 2021); ``reduce_mean``
  averages instead of sums over data dimensions, as in the reference code
  ``score_sde_pytorch/losses.py`` (``get_sde_loss_fn``).
* ``ddpm``: the DDPM "simple" epsilon loss on the discrete chain (Ho et al. 2020,
  eq. 14): step ``i ~ U{1..N}``, time ``t = i / N``, ``|eps - eps_hat|^2``.
* ``smld``: the NCSN loss (Song & Ermon 2019, eq. 5) with ``sigma_i^2`` weighting on a
  geometric ladder of ``num_scales`` noise levels (the VE SDE's ``sigma(t)`` at
  uniformly spaced ``t``); needs a kernel with mean coefficient 1.
* ``ism``: exact (implicit) score matching (Hyvarinen 2005):
  ``E[tr(grad_x s) + |s|^2 / 2]``, the Jacobian trace by one backward pass per
  dimension, applied to the noisy marginals ``p_t`` (``t ~ U[eps, T]``, weight
  ``std^2``); for small dimension.
* ``ssm``: sliced score matching (Song, Garg, Shi & Ermon 2019):
  ``E[v^T (grad_x s) v + |s|^2 / 2]`` (the variance-reduced SSM-VR form, or
  ``(v^T s)^2 / 2`` without it) with random projections ``v``.

All of them are minimised by the true score of the (perturbed) data distribution; the
tests check that each one's gradient vanishes in expectation at the exact score of a
Gaussian.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from diffuse_engine import ComponentConfig, IncompatibleError, Loss, bcast, hookimpl


def uniform_times(
    n: int, sde, eps: float, generator, like: torch.Tensor, law: str = "uniform"
) -> torch.Tensor:
    """Training times in ``[eps, T]``, shape ``(n,)`` on ``like``'s device and dtype.

    ``uniform`` (the reference implementation's choice); ``log_uniform``: ``t = eps
    (T/eps)^u``, which spends more of the batch at small noise where narrow modes are
    resolved; ``mixed``: each time from either law with probability 1/2. A sampling
    density ``p(t)`` only reweights the objective by ``p(t)``, so every choice has the
    same minimiser (the true score).
    """
    u = torch.rand(n, generator=generator, device=like.device, dtype=like.dtype)
    if law == "uniform":
        return u * (sde.T - eps) + eps
    log_t = eps * torch.exp(u * math.log(sde.T / eps))
    if law == "log_uniform":
        return log_t
    pick = torch.rand(n, generator=generator, device=like.device, dtype=like.dtype) < 0.5
    return torch.where(pick, u * (sde.T - eps) + eps, log_t)


def normal_like(x: torch.Tensor, generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def conditioned(model, cond, generator):
    """``model`` as ``f(x, t)``: itself without ``cond``; else ``model(x, t, cond)`` with
    the model's label dropout applied first (``drop_labels``, from ``generator``)."""
    if cond is None:
        return model
    drop = getattr(model, "drop_labels", None)
    if drop is not None:
        cond = drop(cond, generator)
    return lambda x, t: model(x, t, cond)


def _reduce(v: torch.Tensor, mean: bool) -> torch.Tensor:
    """Per-sample sum (or mean) over data dimensions: ``(B, ...) -> (B,)``."""
    flat = v.reshape(v.shape[0], -1)
    return flat.mean(1) if mean else flat.sum(1)


class TimeLossConfig(ComponentConfig):
    eps: float | None = Field(
        None, gt=0, lt=1, description="smallest training time; default: the SDE's sampling eps"
    )
    reduce_mean: bool = Field(False, description="average (not sum) over data dimensions")


class _TimeLoss(Loss):
    Config = TimeLossConfig

    @property
    def eps(self) -> float:
        return self.config.eps if self.config.eps is not None else self.sde.sampling_eps


# ---- denoising score matching ---------------------------------------------------------
class DSMConfig(TimeLossConfig):
    likelihood_weighting: bool = Field(
        False, description="weight by g(t)^2 (maximum likelihood weighting) instead of std(t)^2"
    )
    time_sampling: Literal["uniform", "log_uniform", "mixed"] = Field(
        "uniform", description="law of the training times t in [eps, T]"
    )


class DenoisingScoreMatching(_TimeLoss):
    """Continuous denoising score matching through the SDE's kernel (Song et al. 2021)."""

    name = "dsm"
    Config = DSMConfig

    def __call__(self, model, x0, generator=None, cond=None):
        t = uniform_times(x0.shape[0], self.sde, self.eps, generator, x0, self.config.time_sampling)
        z = normal_like(x0, generator)
        _, std = self.sde.marginal(t)
        xt = self.sde.perturb(x0, t, z)
        score = conditioned(model, cond, generator)(xt, t)
        if self.config.likelihood_weighting:
            # g^2 |s + z / std|^2, as in score_sde_pytorch's get_sde_loss_fn
            per = _reduce((score + z / bcast(std, x0)) ** 2, self.config.reduce_mean)
            return (per * self.sde.diffusion(t) ** 2).mean()
        # std^2 |s - grad log p_0t|^2 = |std s + z|^2, well scaled at every t
        return _reduce((score * bcast(std, x0) + z) ** 2, self.config.reduce_mean).mean()


# ---- DDPM ------------------------------------------------------------------------------
class DDPMLossConfig(ComponentConfig):
    N: int | None = Field(
        None, ge=2, description="chain length; default: the SDE's N (ddpm) or 1000"
    )
    reduce_mean: bool = Field(True, description="average (not sum) over data dimensions")


class DDPMLoss(Loss):
    """DDPM's simple epsilon loss on the discrete chain, ``t = i / N`` (Ho et al. 2020)."""

    name = "ddpm"
    Config = DDPMLossConfig

    @property
    def N(self) -> int:
        if self.config.N is not None:
            return self.config.N
        return int(getattr(self.sde.config, "N", 1000))

    def __call__(self, model, x0, generator=None, cond=None):
        N = self.N
        i = torch.randint(1, N + 1, (x0.shape[0],), generator=generator, device=x0.device)
        t = i.to(x0.dtype) / N
        z = normal_like(x0, generator)
        _, std = self.sde.marginal(t)
        eps_hat = -conditioned(model, cond, generator)(self.sde.perturb(x0, t, z), t)
        eps_hat = eps_hat * bcast(std, x0)
        return _reduce((eps_hat - z) ** 2, self.config.reduce_mean).mean()


# ---- SMLD / NCSN -------------------------------------------------------------------------
class SMLDConfig(ComponentConfig):
    num_scales: int = Field(1000, ge=2, description="noise levels on the geometric ladder")
    reduce_mean: bool = Field(False, description="average (not sum) over data dimensions")


class SMLDLoss(Loss):
    """NCSN loss with sigma_i^2 weighting on a geometric sigma ladder (Song & Ermon 2019)."""

    name = "smld"
    Config = SMLDConfig

    def __init__(self, config=None, *, sde, **fields):
        super().__init__(config, sde=sde, **fields)
        probe = torch.tensor([0.5, 1.0], dtype=torch.float64)
        a, s = sde.marginal(probe)
        if not torch.allclose(a, torch.ones_like(a)):
            raise IncompatibleError(
                f"loss smld needs a variance-exploding SDE (kernel mean coefficient 1), but "
                f"{sde.name!r} has {a.tolist()} at t = 0.5, 1; use sde ve, or loss dsm/ddpm"
            )
        # the VE SDE's sigma(t) is geometric in t, so uniform t gives the NCSN ladder
        self.times = torch.linspace(
            sde.sampling_eps, sde.T, self.config.num_scales, dtype=torch.float64
        )
        ladder = sde.marginal(self.times)[1]
        ratios = ladder[1:] / ladder[:-1]
        if not torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-6):
            raise IncompatibleError(
                f"loss smld needs a geometric noise schedule; {sde.name!r}"
                " has a non-geometric std(t); use loss dsm"
            )
        self._times = {}

    def __call__(self, model, x0, generator=None, cond=None):
        key = (x0.device, x0.dtype)
        if key not in self._times:
            self._times[key] = self.times.to(x0.device, x0.dtype)
        i = torch.randint(
            0, self.config.num_scales, (x0.shape[0],), generator=generator, device=x0.device
        )
        t = self._times[key][i]
        _, sigma = self.sde.marginal(t)
        z = normal_like(x0, generator)
        score = conditioned(model, cond, generator)(x0 + bcast(sigma, x0) * z, t)
        # sigma^2 |s + z / sigma|^2 = |sigma s + z|^2 (target score -z / sigma)
        return _reduce((score * bcast(sigma, x0) + z) ** 2, self.config.reduce_mean).mean()


# ---- score matching without a denoising target -------------------------------------------
class ISMConfig(TimeLossConfig):
    max_dim: int = Field(
        64,
        ge=1,
        description="refuse data with more dimensions (cost is one backward pass per dimension)",
    )
    weighting: Literal["std2", "none"] = Field("std2", description="per-time weight")


def _noisy(loss: _TimeLoss, x0, generator):
    """``(x_t, t, std)`` with ``x_t`` requiring grad, for the Jacobian terms."""
    t = uniform_times(x0.shape[0], loss.sde, loss.eps, generator, x0)
    z = normal_like(x0, generator)
    _, std = loss.sde.marginal(t)
    xt = loss.sde.perturb(x0, t, z).detach().requires_grad_(True)
    return xt, t, std


class ImplicitScoreMatching(_TimeLoss):
    """Exact score matching ``tr(grad s) + |s|^2/2`` on ``p_t`` (Hyvarinen 2005)."""

    name = "ism"
    Config = ISMConfig

    def __call__(self, model, x0, generator=None, cond=None):
        d = x0[0].numel()
        if d > self.config.max_dim:
            raise IncompatibleError(
                f"loss ism computes the full Jacobian trace; data has "
                f"{d} dimensions > max_dim {self.config.max_dim}; use loss "
                "ssm (sliced) or raise max_dim"
            )
        xt, t, std = _noisy(self, x0, generator)
        s = conditioned(model, cond, generator)(xt, t)
        flat = s.reshape(s.shape[0], -1)
        trace = torch.zeros(s.shape[0], device=s.device, dtype=s.dtype)
        for j in range(d):
            g = torch.autograd.grad(flat[:, j].sum(), xt, create_graph=True)[0]
            trace = trace + g.reshape(g.shape[0], -1)[:, j]
        per = 0.5 * flat.pow(2).sum(1) + trace
        if self.config.reduce_mean:
            per = per / d
        if self.config.weighting == "std2":
            per = per * std**2
        return per.mean()


class SSMConfig(TimeLossConfig):
    projections: int = Field(1, ge=1, description="random projections per sample")
    distribution: Literal["gaussian", "rademacher"] = Field(
        "gaussian", description="projection law"
    )
    variance_reduction: bool = Field(True, description="SSM-VR: |s|^2/2 in closed form")
    weighting: Literal["std2", "none"] = Field("std2", description="per-time weight")


class SlicedScoreMatching(_TimeLoss):
    """Sliced score matching ``v^T (grad s) v + |s|^2/2`` (Song et al. 2019)."""

    name = "ssm"
    Config = SSMConfig

    def __call__(self, model, x0, generator=None, cond=None):
        xt, t, std = _noisy(self, x0, generator)
        s = conditioned(model, cond, generator)(xt, t)
        B, d = s.shape[0], s[0].numel()
        per = torch.zeros(B, device=s.device, dtype=s.dtype)
        for _ in range(self.config.projections):
            v = normal_like(s, generator)
            if self.config.distribution == "rademacher":
                v = v.sign()
            sv = (s * v).reshape(B, -1).sum(1)
            g = torch.autograd.grad(sv.sum(), xt, create_graph=True)[0]
            vjv = (g * v).reshape(B, -1).sum(1)
            quad = (
                0.5 * s.reshape(B, -1).pow(2).sum(1)
                if self.config.variance_reduction
                else 0.5 * sv**2
            )
            per = per + vjv + quad
        per = per / self.config.projections
        if self.config.reduce_mean:
            per = per / d
        if self.config.weighting == "std2":
            per = per * std**2
        return per.mean()


@hookimpl
def diffuse_register_losses():
    return [DenoisingScoreMatching, DDPMLoss, SMLDLoss, ImplicitScoreMatching, SlicedScoreMatching]
