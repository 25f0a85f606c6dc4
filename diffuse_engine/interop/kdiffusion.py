"""k-diffusion's denoiser convention, both ways.

k-diffusion (Crowson) and EDM (Karras et al. 2022) write every model as a denoiser
``D(x, sigma) ~ E[x_0 | x_0 + sigma z = x]`` on the variance-exploding family, with
``sigma`` of shape ``(B,)``; samplers step in ``sigma`` from ``sigma_max`` down to 0.
Any Gaussian kernel ``x_t = a x_0 + s z`` is a scaled VE kernel: ``x_t / a = x_0 +
(s / a) z`` (Karras et al. 2022, Sec. 4), so with ``sigma(t) = s(t) / a(t)``

* :func:`from_denoiser`: ``score(x, t) = (a D(x / a, sigma) - x) / s^2`` (Tweedie's
  formula read backwards) for any engine SDE with a Gaussian kernel;
* :func:`to_denoiser`: ``D(x, sigma) = x + (s^2 / a) score(a x, t)`` at the time ``t``
  with ``s(t) / a(t) = sigma``, found on the SDE's decreasing log-SNR ``-log sigma``
  (:func:`~diffuse_engine.components.schedules.time_from_log_snr`).

The two are exact inverses, and the exact denoiser of a data law is the same for every
SDE, which the tests check on the Gaussian-mixture test bed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar, Literal

import torch
from torch import Tensor

from diffuse_engine.components.checkpoint import check_same_sde, sde_spec
from diffuse_engine.components.schedules import check_monotone, time_from_log_snr
from diffuse_engine.components.score import ScoreConfig, ScoreModel
from diffuse_engine.components.sde import SDE, bcast
from diffuse_engine.core.errors import DiffuseError, IncompatibleError

#: k-diffusion's calling convention: ``D(x, sigma)`` with ``sigma`` ``(B,)``
Denoiser = Callable[[Tensor, Tensor], Tensor]


def kdiffusion_scalings(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(c_skip, c_out, c_in)`` of k-diffusion's ``layers.Denoiser`` (Karras et al.
    2022, Table 1): ``c_skip = sd^2 / (sigma^2 + sd^2)``, ``c_out = sigma sd /
    sqrt(sigma^2 + sd^2)``, ``c_in = 1 / sqrt(sigma^2 + sd^2)``."""
    v = sigma**2 + sigma_data**2
    return sigma_data**2 / v, sigma * sigma_data * v.rsqrt(), v.rsqrt()


class DenoiserConfig(ScoreConfig):
    """A wrapped denoiser predicts clean data; the kernel turns it into a score."""

    parameterisation: Literal["x0"] = "x0"


class DenoiserScore(ScoreModel):
    """An engine score model from a k-diffusion-style ``D(x, sigma)`` (see module doc).

    ``sigma_data``: when given, ``D`` is k-diffusion's *inner* model ``F(c_in x, sigma)``
    and is preconditioned as ``layers.Denoiser(F, sigma_data)`` does,
    ``D = c_skip x + c_out F(c_in x, sigma)``; when ``None``, ``D`` is already a denoiser.
    """

    name: ClassVar[str] = "denoiser"
    Config = DenoiserConfig

    def __init__(self, denoiser: Denoiser, *, sde: SDE, sigma_data: float | None = None):
        super().__init__(sde=sde)
        if not callable(denoiser):
            raise DiffuseError(
                f"from_denoiser needs a callable D(x, sigma), not {type(denoiser).__name__}"
            )
        if sigma_data is not None and not (math.isfinite(sigma_data) and sigma_data > 0):
            raise DiffuseError(f"sigma_data must be a finite number > 0, not {sigma_data!r}")
        self.denoiser = denoiser
        self.sigma_data = sigma_data

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        a, s = self.sde.marginal(t)
        sigma = s / a
        xv = x / bcast(a, x)  # the VE-scaled input x_0 + sigma z
        if self.sigma_data is None:
            return self.denoiser(xv, sigma)
        c_skip, c_out, c_in = kdiffusion_scalings(sigma, self.sigma_data)
        inner = self.denoiser(xv * bcast(c_in, x), sigma)
        return bcast(c_skip, x) * xv + bcast(c_out, x) * inner

    def check_sde(self, sde: SDE) -> None:
        """Refuse to sample with an SDE other than the one the adapter was built for."""
        check_same_sde(sde_spec(self.sde), sde, "from_denoiser's score model")

    def parameters(self):
        """The denoiser's parameters, if it is a ``torch.nn.Module`` (for its dtype)."""
        params = getattr(self.denoiser, "parameters", None)
        return params() if callable(params) else iter(())

    def to(self, device=None, dtype=None) -> DenoiserScore:
        if isinstance(self.denoiser, torch.nn.Module):
            self.denoiser.to(device=device, dtype=dtype)
        return self


def from_denoiser(D: Denoiser, sigma_data: float | None = None, *, sde: SDE) -> DenoiserScore:
    """A k-diffusion-style denoiser ``D(x, sigma)`` as an engine score model for ``sde``.

    ``sde`` is an engine SDE with a Gaussian kernel (``engine.build("sde", "ve",
    sigma_min=0.002, sigma_max=80)`` matches EDM's range; any other works through
    ``sigma = s / a``); sample with the same SDE entry: ``engine.sample(score=...,
    sde="ve", sigma_min=0.002, sigma_max=80, ...)``. ``sigma_data``: ``D`` is then
    k-diffusion's inner model and gets its ``Denoiser`` preconditioning
    (:class:`DenoiserScore`).
    """
    return DenoiserScore(D, sde=sde, sigma_data=sigma_data)


def time_of_sigma(sde: SDE, sigma: Tensor, eps: float | None = None) -> Tensor:
    """The times ``t`` in ``[eps, T]`` with ``s(t) / a(t) = sigma`` (shape of ``sigma``,
    float64 on its device), by bisection on the decreasing log-SNR ``-log sigma``.

    Distinct values are solved once (k-diffusion passes one sigma per batch), on the
    CPU in float64. A sigma outside ``[sigma(eps), sigma(T)]`` is an error.
    """
    eps = sde.sampling_eps if eps is None else eps
    values, inverse = torch.unique(sigma.detach().double().cpu(), return_inverse=True)
    lo, hi = sigma_range(sde, eps)
    if float(values[0]) < lo * (1 - 1e-6) or float(values[-1]) > hi * (1 + 1e-6):
        raise DiffuseError(
            f"sigma {float(values[0]):.6g}..{float(values[-1]):.6g} is outside SDE "
            f"{sde.name!r}'s range [{lo:.6g}, {hi:.6g}] (s/a at t = {eps} and T = {sde.T}); "
            "use sigmas in that range (the denoiser's sigma_min and sigma_max)"
        )
    t = time_from_log_snr(sde, (-values.log()).tolist(), eps, sde.T)
    return torch.tensor(t, dtype=torch.float64)[inverse].to(sigma.device)


def sigma_range(sde: SDE, eps: float) -> tuple[float, float]:
    """``(sigma(eps), sigma(T))`` with ``sigma = s / a`` (float64)."""
    lam = sde.log_snr(torch.tensor([eps, sde.T], dtype=torch.float64))
    return math.exp(-float(lam[0])), math.exp(-float(lam[1]))


class ScoreDenoiser:
    """``D(x, sigma)`` from an engine score model (see :func:`to_denoiser`).

    ``sigma_min`` and ``sigma_max`` are the SDE's range, as on k-diffusion's model
    wrappers (``K.sampling.get_sigmas_karras(n, D.sigma_min, D.sigma_max)``).
    """

    def __init__(self, score: Callable[[Tensor, Tensor], Tensor], sde: SDE, eps: float):
        self.score = score
        self.sde = sde
        self.eps = eps
        self.sigma_min, self.sigma_max = sigma_range(sde, eps)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.dim() == 0:
            sigma = sigma.expand(x.shape[0])
        t = time_of_sigma(self.sde, sigma, self.eps).to(x.dtype)
        a, s = self.sde.marginal(t)
        xt = bcast(a, x) * x
        return x + bcast(s * s / a, x) * self.score(xt, t)


def to_denoiser(score, sde: SDE, eps: float | None = None) -> ScoreDenoiser:
    """Any engine score model ``score(x, t)`` for ``sde`` as a k-diffusion denoiser.

    ``score`` is a callable ``fn(x, t) -> grad_x log p_t(x)`` (a :class:`ScoreModel`,
    e.g. ``engine.bind_score("gmm", sde)``, or any function) for the kernel of ``sde``;
    the result takes k-diffusion's ``D(x, sigma)`` with ``sigma`` ``(B,)`` (or a number)
    in ``[D.sigma_min, D.sigma_max]``, the SDE's range from ``eps`` (default its
    ``sampling_eps``) to ``T``, and returns ``x0_hat`` (see module doc).
    """
    if isinstance(score, ScoreModel) and sde_spec(score.sde) != sde_spec(sde):
        raise IncompatibleError(
            f"to_denoiser: the score model is bound to SDE {sde_spec(score.sde)} but "
            f"the denoiser was asked for {sde_spec(sde)}; pass the model's own SDE"
        )
    eps = sde.sampling_eps if eps is None else eps
    check_monotone(sde, eps, sde.T)
    return ScoreDenoiser(score, sde, eps)
