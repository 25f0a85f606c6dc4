"""Linear SDEs declared by their coefficients alone, with a numerical perturbation kernel.

A linear SDE ``dx = f(t) x dt + g(t) dw`` has a Gaussian kernel ``x_t | x_0 ~
N(m(t) x_0, v(t) I)`` whose moments solve the ODEs (Särkkä & Solin, "Applied
Stochastic Differential Equations", 2019, eqs. 5.50-5.51; Song et al. 2021, eqs. 5.50
and App. B)::

    m'(t) = f(t) m(t),                 m(0) = 1
    v'(t) = 2 f(t) v(t) + g(t)^2,      v(0) = v0  (0, or sigma_min^2 for VE)

With ``L = log m`` and ``W(t) = int_0^t g^2 exp(-2 L) ds`` they become ``L' = f``,
``W' = g^2 exp(-2 L)`` and ``v = exp(2 L) (v0 + W)``: no cancellation near ``t = 0``
and no overflow for strongly contracting drifts. :class:`NumericKernel` integrates
``(L, W)`` once with error control (``scipy.integrate.solve_ivp``, DOP853) onto a
table of knots, fits a cubic Hermite spline through the values and their *exact*
derivatives (``scipy.interpolate.CubicHermiteSpline``), and evaluates the piecewise
polynomial in torch on ``t``'s device, so sampling never leaves the device. The knots
are ``t = T u^2`` for uniform ``u``: graded towards ``t = 0``, where the variance can
start like ``t^2`` (sub-VP), and the interval of a time is found by arithmetic
(``floor(sqrt(t / T) (N - 1))``) instead of a search.

:class:`LinearSDE` is the base class for SDEs declared only by :meth:`drift_coeff` and
:meth:`diffusion`: it uses the numeric kernel automatically and gets the exact
Gaussian forward transition as its discretisation, so training, every sampler and
likelihoods work without a closed form.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from diffuse_engine.components.kernel import PerturbationKernel
from diffuse_engine.components.sde import SDE, bcast
from diffuse_engine.core.component import ComponentConfig
from diffuse_engine.core.errors import NumericalError


class NumericKernelConfig(ComponentConfig):
    """Accuracy settings of the tabulated kernel."""

    knots: int = Field(
        4097, ge=17, le=1_000_001, description="knots of the Hermite table, t = T u^2 for uniform u"
    )
    rtol: float = Field(1e-11, gt=0, lt=1e-3, description="relative tolerance of the ODE solve")
    atol: float = Field(
        1e-24,
        gt=0,
        lt=1e-3,
        description="absolute tolerance of the ODE "
        "solve (tiny: near t = 0 the variance integral must be relatively exact)",
    )


def _coefficient(fn, t: np.ndarray) -> np.ndarray:
    """Evaluate an SDE coefficient ``fn`` (a torch function of ``(B,)`` times) at numpy ``t``."""
    tt = torch.as_tensor(np.atleast_1d(t), dtype=torch.float64)
    with torch.no_grad():
        out = fn(tt)
    return out.detach().to("cpu", torch.float64).numpy().reshape(tt.shape)


class NumericKernel(PerturbationKernel):
    """Kernel of a linear SDE from its moment ODEs, tabulated once (Hermite spline)."""

    name: ClassVar[str] = "numeric"
    Config: ClassVar[type[ComponentConfig]] = NumericKernelConfig

    def __init__(self, config: NumericKernelConfig | None = None, *, sde, **fields):
        super().__init__(config, sde=sde, **fields)
        from scipy.integrate import solve_ivp
        from scipy.interpolate import CubicHermiteSpline

        c, T = self.config, float(sde.T)
        try:
            sde.drift_coeff(torch.zeros(1, dtype=torch.float64))
        except NotImplementedError:
            raise NumericalError(
                f"kernel 'numeric' needs a linear SDE: {type(sde).__name__} has no drift_coeff(t)"
            ) from None
        v0 = getattr(sde, "initial_variance", None)
        if v0 is None:  # replacing a closed form: start where it starts (VE: sigma_min^2)
            try:
                v0 = float(type(sde).marginal(sde, torch.zeros(1, dtype=torch.float64))[1]) ** 2
            except NotImplementedError:
                v0 = 0.0
        self.v0 = float(v0)

        def rhs(t, y):
            f = _coefficient(sde.drift_coeff, t)[0]
            g = _coefficient(sde.diffusion, t)[0]
            return [f, g * g * math.exp(-2.0 * y[0])]

        knots = T * np.linspace(0.0, 1.0, c.knots) ** 2
        sol = solve_ivp(
            rhs, (0.0, T), [0.0, 0.0], method="DOP853", t_eval=knots, rtol=c.rtol, atol=c.atol
        )
        if not sol.success or not np.all(np.isfinite(sol.y)):
            raise NumericalError(
                f"kernel 'numeric' for SDE {sde.name!r}: moment ODE solve "
                f"failed ({sol.message}); are f(t) and g(t) finite on [0, {T}]?"
            )
        L, W = sol.y
        # the derivatives at the knots are known exactly from the ODE right-hand side
        f = _coefficient(sde.drift_coeff, knots)
        g = _coefficient(sde.diffusion, knots)
        dW = g * g * np.exp(-2.0 * L)
        self.T = T
        self.knots = knots
        splines = [CubicHermiteSpline(knots, L, f), CubicHermiteSpline(knots, W, dW)]
        # piecewise-polynomial coefficients: (intervals, 2 functions, 4 powers, highest first)
        self._coeffs = torch.from_numpy(
            np.ascontiguousarray(np.stack([s.c for s in splines], 0).transpose(2, 0, 1))
        )
        self._breaks = torch.from_numpy(knots)
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def _table(self, t: Tensor) -> tuple[Tensor, Tensor]:
        key = (t.device, t.dtype)
        if key not in self._cache:  # one copy per device and dtype, made once
            self._cache[key] = (
                self._breaks.to(t.device, t.dtype),
                self._coeffs.to(t.device, t.dtype),
            )
        return self._cache[key]

    def log_mean_and_integral(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(L(t), W(t))`` from the table; ``t`` is clamped to ``[0, T]``."""
        breaks, coeffs = self._table(t)
        n = breaks.shape[0] - 1
        tc = t.clamp(0.0, self.T)
        # knot k sits at T (k / n)^2; rounding may pick a neighbour, whose cubic is as good
        i = (tc / self.T).sqrt().mul(n).long().clamp(0, n - 1)
        h = (tc - breaks[i])[..., None]
        c = coeffs[i]  # (*t.shape, 2, 4)
        y = ((c[..., 0] * h + c[..., 1]) * h + c[..., 2]) * h + c[..., 3]
        return y[..., 0], y[..., 1]

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean_coeff, std) = (exp L, exp L sqrt(v0 + W))`` at ``t`` ``(B,)``."""
        L, W = self.log_mean_and_integral(t)
        m = L.exp()
        return m, m * (W.clamp_min(0) + self.v0).sqrt()


class LinearSDE(SDE):
    """An SDE ``dx = f(t) x dt + g(t) dw`` declared by :meth:`drift_coeff` and
    :meth:`diffusion` only; its kernel is computed numerically (:class:`NumericKernel`).

    Set :attr:`initial_variance` when the process starts from smoothed data (VE's
    ``sigma_min^2``). The prior is ``N(0, std(T)^2 I)`` unless :attr:`prior_std` is
    set by the subclass. The forward discretisation is the exact Gaussian transition
    ``x_t = (m_t / m_s) x_s + sqrt(v_t - (m_t / m_s)^2 v_s) z``, which is DDPM's step
    for VP schedules and SMLD's noise ladder for VE.
    """

    #: Kernel variance at ``t = 0``.
    initial_variance: ClassVar[float] = 0.0
    #: Accuracy of the automatic kernel (overridden by ``kernel = "..."`` in the registry).
    kernel_config: ClassVar[dict] = {}

    def __init__(self, config=None, **fields):
        self._kernel = None
        self._prior_std: float | None = None
        super().__init__(config, **fields)

    @property
    def kernel(self) -> PerturbationKernel:
        """The attached kernel, or a :class:`NumericKernel` built on first use."""
        if self._kernel is None:
            self._kernel = NumericKernel(sde=self, **self.kernel_config)
        return self._kernel

    def attach_kernel(self, kernel) -> None:
        self._kernel = kernel
        self._prior_std = None

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return self.kernel.marginal(t)

    @property
    def prior_std(self) -> float:  # type: ignore[override]
        """The kernel's std at ``T`` (computed once), unless a subclass assigns one."""
        if self._prior_std is None:
            one = torch.full((1,), self.T, dtype=torch.float64)
            self._prior_std = float(self.marginal(one)[1])
        return self._prior_std

    @prior_std.setter
    def prior_std(self, value: float) -> None:
        self._prior_std = float(value)

    def discretize(self, x: Tensor, t: Tensor, t_prev: Tensor) -> tuple[Tensor, Tensor]:
        a_t, s_t = self.marginal(t)
        a_s, s_s = self.marginal(t_prev)
        a = a_t / a_s
        return bcast(a - 1, x) * x, (s_t**2 - a**2 * s_s**2).clamp_min(0).sqrt()
