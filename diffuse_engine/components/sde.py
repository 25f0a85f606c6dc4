"""The SDE contract: forward coefficients, perturbation kernel, prior, discretisations.

Conventions (Song et al., "Score-Based Generative Modeling through SDEs", ICLR 2021):

* Forward SDE ``dx = f(x, t) dt + g(t) dw`` on ``t in [0, T]``; ``t = 0`` is data and
  ``t = T`` is the prior. Time always runs forward in these methods; samplers go from
  ``T`` down to ``eps`` by calling them with decreasing ``t``.
* ``x`` has shape ``(B, *dims)``; every time argument ``t`` is a tensor of shape
  ``(B,)`` on the device and with the dtype of ``x``. Per-sample coefficients returned
  by these methods have shape ``(B,)``; use :func:`bcast` to multiply them into ``x``.
* The perturbation kernel is Gaussian: ``x_t | x_0 ~ N(mean_coeff(t) x_0,
  std(t)^2 I)``, returned by :meth:`SDE.marginal` as ``(mean_coeff, std)``.
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar

import torch
from pydantic import Field
from torch import Tensor

from diffuse_engine.core.component import Component, ComponentConfig, ComponentRef


def bcast(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample ``(B,)`` tensor so it broadcasts against ``x`` ``(B, *dims)``."""
    return v.reshape(v.shape + (1,) * (x.dim() - v.dim()))


class SDEConfig(ComponentConfig):
    """Fields every SDE accepts in the registry (subclass it for your own)."""

    kernel: Annotated[str | None, ComponentRef("kernel", allow_none=True)] = Field(
        None, description="perturbation kernel plugin; default: the SDE's closed form"
    )


class SDE(Component):
    """Base class of forward SDEs with a Gaussian perturbation kernel.

    Subclasses implement :meth:`drift_coeff` (or :meth:`drift` for a non-linear drift),
    :meth:`diffusion`, :meth:`marginal` and set :attr:`prior_std`. Everything else
    (prior, kernel sampling and score, reverse-time drift, the reverse-diffusion and
    ancestral discretisations) is derived and may be overridden where a closed form
    or the paper's own discretisation differs.
    """

    kind: ClassVar[str] = "sde"
    Config: ClassVar[type[ComponentConfig]] = SDEConfig
    #: End time of the forward process.
    T: ClassVar[float] = 1.0
    #: Default smallest time a sampler integrates down to.
    sampling_eps: ClassVar[float] = 1e-3

    # ---- forward coefficients -------------------------------------------------
    def drift_coeff(self, t: Tensor) -> Tensor:
        """Scalar ``f(t)`` of a linear drift ``f(x, t) = f(t) x``; shape ``(B,)``."""
        raise NotImplementedError(f"{type(self).__name__} has no linear drift coefficient")

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        """Drift ``f(x, t)``, same shape as ``x``."""
        return bcast(self.drift_coeff(t), x) * x

    def diffusion(self, t: Tensor) -> Tensor:
        """Diffusion coefficient ``g(t)``, shape ``(B,)``."""
        raise NotImplementedError

    # ---- perturbation kernel --------------------------------------------------
    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Kernel ``p_0t(x_t | x_0) = N(mean_coeff * x_0, std^2 I)``: ``(mean_coeff, std)``."""
        raise NotImplementedError

    def attach_kernel(self, kernel) -> None:
        """Use ``kernel.marginal`` (a :class:`~diffuse_engine.components.kernel.PerturbationKernel`)
        instead of this class's closed form; everything derived follows it."""
        self.marginal = kernel.marginal  # instance attribute shadows the method

    def perturb(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Sample ``x_t`` given ``x_0`` using standard normal ``noise`` (same shape)."""
        a, s = self.marginal(t)
        return bcast(a, x0) * x0 + bcast(s, x0) * noise

    def kernel_score(self, xt: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        """``grad_{x_t} log p_0t(x_t | x_0)``, the denoising score matching target."""
        a, s = self.marginal(t)
        return -(xt - bcast(a, x0) * x0) / bcast(s, x0) ** 2

    def log_snr(self, t: Tensor) -> Tensor:
        """``lambda(t) = log(mean_coeff / std)``, decreasing in ``t``."""
        a, s = self.marginal(t)
        return torch.log(a) - torch.log(s)

    def time_of_log_snr(self, lam: Tensor) -> Tensor:
        """The inverse of :meth:`log_snr` in closed form, for ``lam`` of any shape
        (float64; values outside ``[lambda(T), lambda(0)]`` may give times outside
        ``[0, T]``, which the caller clamps). Optional: without it the schedules find
        the times by bisection (:func:`~diffuse_engine.components.schedules.time_from_log_snr`),
        the same to float64 round-off, 64 kernel evaluations per grid."""
        raise NotImplementedError

    # ---- prior ----------------------------------------------------------------
    #: Standard deviation of the isotropic Gaussian prior at ``T``.
    prior_std: float = 1.0

    def prior_sample(
        self, shape, *, generator: torch.Generator | None = None, device=None, dtype=None
    ) -> Tensor:
        """Draw ``x_T`` of ``shape`` from the prior ``N(0, prior_std^2 I)``."""
        z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        return z * self.prior_std

    def data_prior(self, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        """``(loc, scale)`` of ``N(a mean, a^2 var + s^2)`` per coordinate, ``(a, s) =
        marginal(T)``: the Gaussian with the first two moments of ``p_T`` for data of
        per-coordinate ``mean`` and ``var`` (tensors of the data's shape, or
        broadcastable to it). Where the data are far from unit scale (VP: ``a(T)^2 var``
        not small next to 1) the prior ``N(0, prior_std^2 I)`` is not ``p_T``, and every
        sampler inherits the difference; a start drawn from this Gaussian has ``p_T``'s
        mean and variance (not its higher moments). Float64, on ``mean``'s device."""
        mean = mean.to(torch.float64)
        t = torch.full((1,), self.T, device=mean.device, dtype=torch.float64)
        a, s = self.marginal(t)
        return a * mean, (a * a * var.to(mean) + s * s).sqrt()

    def start_sample(
        self,
        shape,
        start: tuple[Tensor, Tensor] | None = None,
        *,
        generator: torch.Generator | None = None,
        device=None,
        dtype=None,
    ) -> Tensor:
        """Draw ``x_T`` of ``shape`` where sampling starts: from ``N(loc, scale^2)`` for
        ``start = (loc, scale)`` (:meth:`data_prior`), else from :meth:`prior_sample`.
        Either way one standard normal draw of ``shape`` from ``generator``."""
        if start is None:
            return self.prior_sample(shape, generator=generator, device=device, dtype=dtype)
        z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        loc, scale = (v.to(device=z.device, dtype=z.dtype) for v in start)
        return z * scale + loc

    def prior_log_prob(self, z: Tensor) -> Tensor:
        """Log-density of the prior at ``z`` ``(B, *dims)``, summed over dims: ``(B,)``."""
        d = z[0].numel()
        var = self.prior_std**2
        return -0.5 * d * math.log(2 * math.pi * var) - z.flatten(1).pow(2).sum(1) / (2 * var)

    # ---- reverse time ---------------------------------------------------------
    def _linear_drift(self) -> bool:
        """Whether the drift is ``f(t) x`` (the subclass implements :meth:`drift_coeff`)."""
        try:
            self.drift_coeff(torch.ones(1, dtype=torch.float64))
        except NotImplementedError:
            return False
        return True

    def linear_coefficients(self, times: list[float]) -> tuple[list[float], list[float]] | None:
        """``(f(t), g(t)^2)`` at ``times`` as Python floats (float64 on the CPU), for
        solvers that precompute their step coefficients before the loop; ``None`` when
        the drift is not linear (no :meth:`drift_coeff`) or :meth:`reverse_drift` is
        overridden, so the solver must call :meth:`reverse_drift` itself."""
        if type(self).reverse_drift is not SDE.reverse_drift or not self._linear_drift():
            return None
        t = torch.tensor(list(times), dtype=torch.float64)
        f = torch.as_tensor(self.drift_coeff(t), dtype=torch.float64).expand_as(t)
        g2 = torch.as_tensor(self.diffusion(t), dtype=torch.float64).expand_as(t) ** 2
        return f.tolist(), g2.tolist()

    def linear_discretization(self, grid: list[float]) -> tuple[list[float], list[float]] | None:
        """For a linear drift, :meth:`discretize` of each forward step ``grid[i+1] ->
        grid[i]`` as Python floats ``(A_i, G_i)`` with ``f = A_i x`` (float64 on the
        CPU, once before a sampling loop); ``None`` when the drift is not linear."""
        if not self._linear_drift():
            return None
        t = torch.tensor(grid[:-1], dtype=torch.float64)
        t_prev = torch.tensor(grid[1:], dtype=torch.float64)
        f, G = self.discretize(torch.ones(len(t), 1, dtype=torch.float64), t, t_prev)
        return f[:, 0].tolist(), torch.as_tensor(G, dtype=torch.float64).expand_as(t).tolist()

    def reverse_drift(
        self, x: Tensor, t: Tensor, score: Tensor, probability_flow: bool = False
    ) -> Tensor:
        """Drift of the reverse SDE ``f - g^2 s`` (or the ODE's ``f - g^2 s / 2``)."""
        g2 = bcast(self.diffusion(t) ** 2, x)
        return self.drift(x, t) - g2 * score * (0.5 if probability_flow else 1.0)

    def discretize(self, x: Tensor, t: Tensor, t_prev: Tensor) -> tuple[Tensor, Tensor]:
        """Forward step from ``t_prev`` to ``t > t_prev`` as ``x_t ~ x + f + G z``: ``(f, G)``.

        Used by the reverse-diffusion predictor. The default is Euler-Maruyama; the
        built-in VE and VP families override it with the paper's discretisations.
        """
        dt = t - t_prev
        return self.drift(x, t) * bcast(dt, x), self.diffusion(t) * dt.sqrt()

    def ancestral_step(
        self, x: Tensor, score: Tensor, t: Tensor, t_prev: Tensor
    ) -> tuple[Tensor, Tensor]:
        """One ancestral sampling step ``x_t -> x_{t_prev}``: ``(mean, std)``.

        Default: the Gaussian posterior ``q(x_s | x_t, x0_hat)`` with the Tweedie
        estimate ``x0_hat = (x_t + std_t^2 s) / mean_coeff_t``. For VE this is exactly
        the SMLD ancestral step of Song et al. (2021, eq. 47); the VP family overrides
        it with the DDPM form (Ho et al., 2020).
        """
        a_t, s_t = self.marginal(t)
        a_s, s_s = self.marginal(t_prev)
        a_ts = a_t / a_s
        var_ts = (s_t**2 - a_ts**2 * s_s**2).clamp_min(0)
        x0_hat = (x + bcast(s_t**2, x) * score) / bcast(a_t, x)
        c_x = a_ts * s_s**2 / s_t**2
        c_0 = a_s * var_ts / s_t**2
        mean = bcast(c_x, x) * x + bcast(c_0, x) * x0_hat
        return mean, (var_ts * s_s**2 / s_t**2).sqrt()

    def denoise(self, x: Tensor, score: Tensor, t: Tensor) -> Tensor:
        """Tweedie's formula: ``E[x_0 | x_t] = (x_t + std^2 s) / mean_coeff``."""
        a, s = self.marginal(t)
        return (x + bcast(s**2, x) * score) / bcast(a, x)


class VPFamilySDE(SDE):
    """Variance-preserving SDEs, fixed by ``log mean_coeff(t)`` alone.

    With ``mean_coeff^2 + std^2 = 1`` the drift coefficient is ``d/dt log mean_coeff``
    and ``g(t)^2 = -2 d/dt log mean_coeff``; the reverse-diffusion and ancestral steps
    use the DDPM discretisation with the exact per-step ``beta = 1 - (a_t / a_s)^2``.
    """

    def log_mean_coeff(self, t: Tensor) -> Tensor:
        """``log mean_coeff(t)``, shape ``(B,)``; zero at ``t = 0``."""
        raise NotImplementedError

    def log_mean_coeff_rate(self, t: Tensor) -> Tensor:
        """``d/dt log mean_coeff(t)`` (negative), shape ``(B,)``."""
        raise NotImplementedError

    def drift_coeff(self, t: Tensor) -> Tensor:
        return self.log_mean_coeff_rate(t)

    def diffusion(self, t: Tensor) -> Tensor:
        return (-2 * self.log_mean_coeff_rate(t)).sqrt()

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        lm = self.log_mean_coeff(t)
        return lm.exp(), (-torch.expm1(2 * lm)).sqrt()

    def _step_beta(self, t: Tensor, t_prev: Tensor) -> Tensor:
        return -torch.expm1(2 * (self.log_mean_coeff(t) - self.log_mean_coeff(t_prev)))

    def discretize(self, x, t, t_prev):
        beta = self._step_beta(t, t_prev)
        return bcast((1 - beta).sqrt() - 1, x) * x, beta.sqrt()

    def ancestral_step(self, x, score, t, t_prev):
        beta = self._step_beta(t, t_prev)
        mean = (x + bcast(beta, x) * score) / bcast((1 - beta).sqrt(), x)
        return mean, beta.sqrt()
