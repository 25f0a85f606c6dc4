"""iPNDM: linear multistep (Adams-Bashforth) steps on the predicted noise in ``sigma``.

Divided by ``a``, the probability-flow ODE of any SDE with a Gaussian kernel is the
variance-exploding one: ``y = x / a`` and ``sigma = s / a`` give ``dy/dsigma = eps_hat``,
the predicted noise (Karras et al. 2022, Eq. 4; Zhang & Chen 2023, Sec. 4). PNDM (Liu
et al. 2022, "Pseudo numerical methods for diffusion models on manifolds", ICLR) steps
it with the fourth-order Adams-Bashforth formula on the last four predictions, warming
up with Runge-Kutta steps that cost three extra evaluations each. iPNDM (Zhang & Chen
2023, "Fast sampling of diffusion models with exponential integrator", ICLR, App. D)
warms up with the lower-order Adams-Bashforth formulas instead, so every step costs one
evaluation::

    y_next = y + (sigma_next - sigma) * sum_k c_k eps_{i-k}
    c = [1], [3/2, -1/2], [23/12, -16/12, 5/12], [55/24, -59/24, 37/24, -9/24]

The coefficients are those of equal steps whatever the grid (``coefficients =
"fixed"``, the method as published and as Zhou et al. 2024, "Fast ODE-based sampling
for diffusion models in around 5 steps", CVPR, run it). ``"variable"`` integrates the
polynomial through the last ``k`` predictions in ``sigma`` exactly over the step (the
variable-step Adams-Bashforth method, Hairer, Norsett & Wanner I, III.5; the
``rho``-AB of Zhang & Chen 2023): the two agree on a grid uniform in ``sigma``.
``"fitted"`` fits each step's weights to the score model once per run, by least
squares against an accurate teacher on a pilot batch (the linear-subspace idea of Duan
et al. 2023 and PAS, Wang et al. 2024; :mod:`diffuse_engine.components.step_fit`): the
run's ``setup_nfe``, and ``fitted.toml`` keeps the weights (``step_weights``) with their
``times`` so they are fitted once. Order 1 is DDIM. In ``x``: ``x_next = (a_next / a) x
+ a_next (sigma_next - sigma) sum_k c_k eps_{i-k}``. Score evaluations: ``steps``, plus
one for the final denoising step when ``denoise`` is on (``nfe = N`` spends exactly
``N``).
"""

from __future__ import annotations

import math
from collections import deque
from itertools import islice
from typing import Literal

import torch
from pydantic import Field, model_validator

from diffuse_engine import hookimpl
from diffuse_engine.components.kernel_solver import KernelSolver, KernelSolverConfig
from diffuse_engine.components.solver import innermost, time_tensors
from diffuse_engine.components.step_fit import FittedSteps, fit_multistep_weights

#: Adams-Bashforth coefficients of equal steps, newest prediction first
ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


class IPNDMConfig(KernelSolverConfig):
    order: int = Field(4, ge=1, le=4, description="Adams-Bashforth order (1 = DDIM)")
    coefficients: Literal["fixed", "variable", "fitted"] = Field(
        "fixed",
        description="fixed: the equal-step Adams-Bashforth weights (iPNDM); variable: "
        "the exact integral of the interpolating polynomial in sigma over each step; "
        "fitted: per-step weights fitted to the score model on a pilot batch",
    )
    fit_ridge: float = Field(
        1e-3,
        ge=0,
        description="coefficients = fitted: how hard each step's weights are pulled "
        "toward the variable-step ones, a fraction of the fit's normal matrix's mean "
        "diagonal (docs/sampling.md, Fitted weights)",
    )
    step_weights: list[list[float]] | None = Field(
        None,
        description="coefficients = fitted: the weights of an earlier fit (newest eps "
        "first, one list per step; fitted.toml writes them with their times), used "
        "instead of fitting again",
    )

    @model_validator(mode="after")
    def _check_weights(self):
        """Given step weights belong to one grid and one order: they need ``times`` and
        ``coefficients = "fitted"``, and one list of ``min(order, i + 1)`` per step."""
        w = self.step_weights
        if w is None:
            return self
        if self.coefficients != "fitted":
            raise ValueError('step_weights are fitted coefficients: set coefficients = "fitted"')
        if self.times is None:
            raise ValueError("step_weights belong to the grid they were fitted on: give its times")
        want = [min(self.order, i + 1) for i in range(len(self.times) - 1)]
        if [len(v) for v in w] != want:
            raise ValueError(
                f"step_weights: give {len(want)} lists (one per step) of lengths {want} "
                f"(order {self.order}), not lengths {[len(v) for v in w]}"
            )
        if not all(math.isfinite(x) for v in w for x in v):
            raise ValueError("step_weights must be finite")
        return self


def variable_coefficients(sig: list[float], i: int, order: int) -> tuple[float, ...]:
    """Weights ``c_k`` of ``eps_{i-k}`` (newest first) for the step ``sig[i] ->
    sig[i + 1]``: the integral over the step of the Lagrange polynomial through the
    last ``order`` points, divided by the step ``sig[i + 1] - sig[i]`` (so equal steps
    give :data:`ADAMS_BASHFORTH`). Exact in float64 for the degrees used here."""
    nodes = torch.tensor([sig[i - k] for k in range(order)], dtype=torch.float64)
    lo, hi = sig[i], sig[i + 1]
    # a Gauss-Legendre rule with `order` points integrates degree 2 order - 1 exactly
    gx, gw = _gauss_legendre(order)
    u = 0.5 * (hi - lo) * gx + 0.5 * (hi + lo)
    out = []
    for k in range(order):
        others = torch.cat([nodes[:k], nodes[k + 1 :]])
        basis = torch.prod((u[:, None] - others) / (nodes[k] - others), dim=1)
        out.append(float(0.5 * (basis * gw).sum()))  # the mean over the step
    return tuple(out)


def _gauss_legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of the ``n``-point Gauss-Legendre rule on ``[-1, 1]`` (Golub-Welsch)."""
    k = torch.arange(1, n, dtype=torch.float64)
    beta = k / torch.sqrt(4 * k * k - 1)
    nodes, vecs = torch.linalg.eigh(torch.diag(beta, 1) + torch.diag(beta, -1))
    return nodes, 2 * vecs[0] ** 2


class IPNDM(KernelSolver):
    """iPNDM: Adams-Bashforth orders 1-4 on the predicted noise in ``sigma`` (Zhang & Chen 2023)."""

    name = "ipndm"
    supports_transform = True
    Config = IPNDMConfig

    def base_weights(self, g) -> list[tuple[float, ...]]:
        """Each step's weights ``c`` (newest first) before any fit: the warm-up takes
        order ``i + 1`` at step ``i``; ``fitted`` starts from the variable-step ones."""
        c = self.config
        sig = [s / a for a, s in zip(g.a, g.s, strict=True)]
        out = []
        for i in range(len(g) - 1):
            order = min(c.order, i + 1)
            if c.coefficients == "fixed":
                out.append(ADAMS_BASHFORTH[order])
            else:
                out.append(variable_coefficients(sig, i, order))
        return out

    @property
    def fits_weights(self) -> bool:
        """Whether :meth:`prepare` fits the weights (``fitted``, none given)."""
        return self.config.coefficients == "fitted" and self.config.step_weights is None

    @property
    def fits_grid(self) -> bool:
        return self.fits_weights or super().fits_grid

    def prepare(self, score, sde, like):
        """Fit the schedule (``gits``) and then, with ``coefficients = "fitted"``, the
        weights on that grid (:mod:`diffuse_engine.components.step_fit`): the grid, or
        the :class:`~diffuse_engine.components.step_fit.FittedSteps`, for :meth:`adopt`."""
        times = super().prepare(score, sde, like)
        if not self.fits_weights:
            return times
        return self._fit(score, sde, like)

    def adopt(self, fitted) -> None:
        """Pin :meth:`prepare`'s result: a fitted grid, or the fitted steps (and their
        grid, when it was fitted too)."""
        if not isinstance(fitted, FittedSteps):
            return super().adopt(fitted)
        if super().fits_grid:
            super().adopt(list(fitted.times))
        self._steps_pinned = fitted

    @property
    def fitted_steps(self) -> FittedSteps | None:
        """The weights :meth:`prepare` fitted (``coefficients = "fitted"``), else ``None``."""
        pinned = getattr(self, "_steps_pinned", None)
        if pinned is not None:
            return pinned
        cached = getattr(self, "_steps_fit", None)
        return None if cached is None else cached[2]

    @property
    def fitted_fields(self) -> dict | None:
        """The fitted grid's ``times`` and the fitted ``step_weights``: the fields that
        sample again without either pilot."""
        fields = super().fitted_fields
        steps = self.fitted_steps
        if steps is None:
            return fields
        return {"times": list(steps.times), "step_weights": [list(w) for w in steps.weights]}

    def _fit(self, score, sde, like) -> FittedSteps:
        """The weights fitted to ``score`` on this run's grid, from the run's start; kept
        for the next call with the same score, SDE, data layout, grid and start."""
        g = self.grid(sde, score, like)
        start = getattr(self, "_pilot_start", None)
        key = (innermost(score), sde, tuple(like.shape[1:]), like.device, like.dtype, tuple(g.t))
        cached = getattr(self, "_steps_fit", None)
        # score, SDE and start (tensors: never ==) compare by identity
        if cached is None or cached[0] != key or cached[1] is not start:
            w = fit_multistep_weights(
                score,
                sde,
                g.t,
                self.base_weights(g),
                like,
                pilot=self.config.pilot,
                ridge=self.config.fit_ridge,
                seed=self.config.pilot_seed,
                start=start,
            )
            fit = FittedSteps(tuple(g.t), tuple(w))
            self._steps_fit = cached = (key, start, fit)
        return cached[2]

    def weights(self, g, score, sde, x) -> list[tuple[float, ...]]:
        """The weights to step ``g`` with: fixed, variable or fitted (those the run
        pinned for this grid, else fitted now to ``score`` on a pilot shaped like ``x``)."""
        c = self.config
        if c.coefficients != "fitted":
            return self.base_weights(g)
        if c.step_weights is not None:
            return [tuple(w) for w in c.step_weights]
        pinned = getattr(self, "_steps_pinned", None)
        if pinned is not None and list(pinned.times) == list(g.t):
            return list(pinned.weights)
        return list(self._fit(score, sde, x).weights)

    def plan(self, g, weights=None) -> list[tuple[float, tuple[float, ...]]]:
        """Each step's ``(a_next / a, a_next * (sigma_next - sigma) * c)`` as Python
        floats, before the loop (``weights``: the ``c``, default :meth:`base_weights`)."""
        sig = [s / a for a, s in zip(g.a, g.s, strict=True)]
        weights = self.base_weights(g) if weights is None else weights
        out = []
        for i, w in enumerate(weights):
            scale = g.a[i + 1] * (sig[i + 1] - sig[i])
            out.append((g.a[i + 1] / g.a[i], tuple(scale * v for v in w)))
        return out

    def sample(self, score, sde, x, *, generator=None, callback=None, transform=None):
        g = self.grid(sde, score, x)
        steps = len(g) - 1
        predict = self.predictor()
        ts = time_tensors(g.t[:-1], x)  # the (B,) time of each step (blocks or fills)
        eps_hist: deque = deque(maxlen=self.config.order)  # newest first
        plan = self.plan(g, self.weights(g, score, sde, x))
        for i, (ratio, weights) in enumerate(plan):
            eps_hist.appendleft(predict(score, x, next(ts), g.a[i], g.s[i], "noise"))
            update = weights[0] * eps_hist[0]
            for w, e in zip(weights[1:], islice(eps_hist, 1, None), strict=True):
                update = update + w * e
            x = ratio * x + update
            del update
            if transform is not None:  # a guidance projection (guidance.py)
                x = transform(x, i + 1, g.t[i + 1])
            if callback is not None:
                callback(i + 1, steps, g.t[i + 1])
        return self.finish(score, sde, x, g.t[-1])


@hookimpl
def diffuse_register_solvers():
    return [IPNDM]
