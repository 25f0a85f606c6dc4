"""DPM-Solver and DPM-Solver++: exponential integrators of the probability-flow ODE.

In the log-SNR ``lambda = log(a / s)`` the probability-flow ODE is semi-linear; its
linear part is integrated exactly and the prediction is expanded in ``lambda``
(Lu et al. 2022a, "DPM-Solver", NeurIPS; Lu et al. 2022b, "DPM-Solver++").

* ``prediction = "noise"``: DPM-Solver, ``x_t = (a_t/a_s) x_s - s_t (e^h - 1) eps_s + ...``
* ``prediction = "data"``: DPM-Solver++, ``x_t = (s_t/s_s) x_s + a_t (1 - e^-h) x0_s + ...``

with ``h = lambda_t - lambda_s``. ``stochastic = true`` (data prediction, multistep, order
1 or 2) integrates the reverse-time SDE instead, SDE-DPM-Solver++(1/2M) (Lu et al. 2022b,
App. B; the "sde-dpmsolver++" of diffusers, k-diffusion's ``sample_dpmpp_2m_sde`` with
the midpoint rule): ``x_t = (s_t/s_s) e^-h x_s + a_t (1 - e^-2h) (x0_s + D/2) + s_t
sqrt(1 - e^-2h) z``. Its fresh noise corrects errors of a learned score that the ODE
carries to the end (Karras et al. 2022, Sec. 4): a few samples of the ODE land far out
where the score was learned from little data (docs/training.md).

Orders 1 to 3; ``singlestep`` (intermediate points at ``r = 1/2`` or ``1/3, 2/3`` of
each step in ``lambda``, Alg. 1-2 of Lu et al. 2022a)
or ``multistep`` (the previous steps' predictions, Lu et al. 2022b, Alg. 2 and App. B).
Order 1 is DDIM. The update formulas follow the authors' reference implementation
(``dpm_solver_pytorch.py``, solver type "dpmsolver"), except multistep order 3: the
reference (and diffusers, and k-diffusion) weights its second backward difference by
half the Taylor coefficient, a second-order method (:meth:`DPMSolver._multistep_plan`).
``third_order = "taylor"`` (the default) is the third-order update; ``"reference"`` is
the reference's, kept because it reproduces those libraries' samples (the diffusers
bridge uses it) and because, damped, it is the better of the two at 10-20 steps on the
sampling suite (docs/sampling.md). Written through the kernel, so the updates apply to
every SDE with a Gaussian kernel (see :mod:`diffuse_engine.components.kernel_solver`).

With ``lower_order_final`` (the default) a run of fewer than 15 steps uses order ``k`` at
its ``k``-th last step, as the reference implementation's multistep solver does (its
first releases below 15 steps, later ones below 10) and as its singlestep order
schedule ends, ``[3, ..., 3, 2, 1]``: measured on the ring, this lowers the std error of
singlestep runs at 10-20 evaluations up to five-fold. For multistep a final denoising
step counts as one of the run's steps, and as its last (it is first order), as in
diffusers (``final_sigmas_type = "zero"``, below 15 steps with the step to sigma 0)
and k-diffusion's ``sample_dpmpp_2m``; the reference does not count it. Lowering the
solver's own last step as well cost 1.5x in 64 dimensions at 5 evaluations
(docs/sampling.md).

Score evaluations: ``steps`` for multistep; for singlestep the sum of the steps' orders
(``order * steps`` without ``lower_order_final`` or from 15 steps up); plus one for the
final denoising step when ``denoise`` is on. ``nfe = N`` spends exactly ``N``: multistep
takes ``N - 1`` steps, singlestep the order recipe of Lu et al. (2022a, Sec. 3.4) in
``orders`` (:meth:`DPMSolverConfig.budget`).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Literal, NamedTuple

from pydantic import Field, model_validator

from diffuse_engine import hookimpl, noise_like
from diffuse_engine.components.kernel_solver import KernelSolver, KernelSolverConfig
from diffuse_engine.components.schedules import time_from_log_snr
from diffuse_engine.components.solver import time_tensors


class DPMSolverConfig(KernelSolverConfig):
    order: int = Field(2, ge=1, le=3, description="solver order (1 = DDIM)")
    method: Literal["singlestep", "multistep"] = Field(
        "multistep", description="singlestep (intermediate points) or multistep"
    )
    prediction: Literal["data", "noise"] = Field(
        "data", description="data: DPM-Solver++, noise: DPM-Solver"
    )
    lower_order_final: bool = Field(
        True,
        description="fewer than 15 steps (a denoising step counted, multistep): order k at "
        "the k-th last step (stabilises few-step runs)",
    )
    orders: list[int] | None = Field(
        None,
        min_length=1,
        description="singlestep: the order of each step (replaces steps and lower_order_final)",
    )
    third_order: Literal["taylor", "reference"] = Field(
        "taylor",
        description="multistep order 3: taylor (third order) or reference (the reference "
        "code's, diffusers' and k-diffusion's update: second order, damped); no effect "
        "on other orders and methods",
    )
    stochastic: bool = Field(
        False,
        description="integrate the reverse SDE (SDE-DPM-Solver++; data prediction, "
        "multistep, order 1-2) instead of the probability-flow ODE",
    )

    def budget(self, nfe: int) -> dict:
        """Multistep: one evaluation per step. Singlestep: the order recipe of Lu et al.
        (2022a, Sec. 3.4, "DPM-Solver-fast") for the ``M`` evaluations left after the
        final denoising step: ``K = M // 3 + 1`` steps of order 3 ending ``[..., 2, 1]``,
        ``[..., 1]`` or ``[..., 2]`` as ``M % 3`` is 0, 1 or 2 (order 2: ``[2, ..., 2]``
        and a final 1 when ``M`` is odd)."""
        out = super().budget(nfe)
        if self.method == "multistep":
            return out
        M = nfe - int(out["denoise"])
        if self.order == 1:
            orders = [1] * M
        elif self.order == 2:
            orders = [2] * (M // 2) + [1] * (M % 2)
        else:
            K = M // 3 + 1
            orders = [3] * (K - 2) + [2, 1] if M % 3 == 0 else [3] * (K - 1) + [M % 3]
        return {**out, "steps": len(orders), "orders": orders}

    @model_validator(mode="after")
    def _check_orders(self):
        if self.stochastic and (
            self.prediction != "data" or self.method != "multistep" or self.order > 2
        ):
            raise ValueError(
                "stochastic = true is SDE-DPM-Solver++: prediction 'data', method "
                f"'multistep', order 1 or 2 (got {self.prediction!r}, {self.method!r}, "
                f"order {self.order})"
            )
        if self.orders is not None:
            if self.method != "singlestep":
                raise ValueError("orders applies to method = 'singlestep'")
            if any(o not in (1, 2, 3) for o in self.orders):
                raise ValueError(f"orders must be 1, 2 or 3, not {self.orders}")
            self.__dict__["steps"] = len(self.orders)  # the frozen config's one write
        return self


class _MultistepStep(NamedTuple):
    """One multistep step of :meth:`DPMSolver._multistep`: its order and the update's
    coefficients, ``x = ratio x - K phi_1 m0 - ...`` (``None`` where the order has no use)."""

    order: int
    ratio: float
    kp1: float  # K (e^hh - 1)
    half_kp1: float  # 2nd order: K (e^hh - 1) / 2
    r0: float | None  # h_{i-1} / h_i
    r1: float | None  # 3rd order: h_{i-2} / h_i
    w: float | None  # r0 / (r0 + r1)
    r01: float | None  # r0 + r1
    kp2: float  # 3rd order: K phi_2
    kp3: float  # 3rd order: 2 K phi_3 (``third_order = "reference"``: K phi_3)
    a_next: float  # the kernel at the step's end, for the prediction made there
    s_next: float


#: lower final orders only matter for short runs (diffusers' and the reference's first
#: releases' threshold; the reference later used 10)
LOWER_ORDER_FINAL_BELOW = 15


def _phis(hh: float) -> tuple[float, float, float]:
    """``(e^hh - 1, (e^hh - 1)/hh - 1, that/hh - 1/2)``: ``hh * phi_k(hh)`` for k = 1..3."""
    p1 = math.expm1(hh)
    p2 = p1 / hh - 1.0
    return p1, p2, p2 / hh - 0.5


class DPMSolver(KernelSolver):
    """DPM-Solver (noise prediction) and DPM-Solver++ (data prediction), orders 1-3."""

    name = "dpm_solver"
    supports_transform = True
    Config = DPMSolverConfig

    @property
    def deterministic(self) -> bool:
        return not self.config.stochastic

    # x_t = ratio * x_s - K_t * [...]: the linear part for each prediction
    def _lin(self, g, i: int, j: int) -> tuple[float, float, float]:
        """``(ratio, K_j, hh)`` of a step from grid index ``i`` to ``j``."""
        h = g.lam[j] - g.lam[i]
        if self.config.prediction == "data":
            return g.s[j] / g.s[i], g.a[j], -h
        return g.a[j] / g.a[i], g.s[j], h

    def sample(self, score, sde, x, *, generator=None, callback=None, transform=None):
        if self.config.stochastic:
            return self._multistep_sde(score, sde, x, generator, callback, transform)
        if self.config.method == "multistep":
            return self._multistep(score, sde, x, callback, transform)
        return self._singlestep(score, sde, x, callback, transform)

    def _multistep_orders(self, steps: int) -> list[int]:
        """The order of each multistep step: warming up from 1 (only so many earlier
        predictions exist) and, with ``lower_order_final`` on short runs, stepping down
        to 1 at the run's last step. A final denoising step is that last step (it is
        first order: ``x0_hat`` itself), so the solver's own steps then end at order 2,
        as diffusers' multistep schedulers end at sigma 0 (``final_sigmas_type =
        "zero"``) and k-diffusion's ``sample_dpmpp_2m`` ends."""
        c = self.config
        final = steps + int(c.denoise)  # the run's steps, a denoising step included
        orders = [min(c.order, i + 1) for i in range(steps)]
        if c.lower_order_final and final < LOWER_ORDER_FINAL_BELOW:
            orders = [min(o, final - i) for i, o in enumerate(orders)]
        return orders

    def _multistep_plan(self, g) -> list[_MultistepStep]:
        """Each multistep step's order and coefficients as Python floats, computed once
        before the loop (Lu et al. 2022b, Alg. 2, and its variable-step 3rd order).

        The 3rd order expands the prediction to second order in ``lambda``; its term is
        ``K h^2 phi_3 D''`` and the backward difference ``d2 = (d1_0 - d1_1) / (r0 + r1)``
        is ``h^2 D'' / 2``, so ``d2`` is weighted by ``2 K phi_3``. The reference code
        (and diffusers') weights it by ``K phi_3``, which leaves an ``O(h^3)`` local
        error: a second-order method (``tests/test_fast_samplers.py`` tests the step is
        exact when the prediction is quadratic in ``lambda``); ``third_order =
        "reference"`` keeps that weight."""
        steps = len(g) - 1
        d2_weight = 2.0 if self.config.third_order == "taylor" else 1.0
        plan = []
        for i, order in enumerate(self._multistep_orders(steps)):
            ratio, K, hh = self._lin(g, i, i + 1)
            p1, p2, p3 = _phis(hh)
            h = g.lam[i + 1] - g.lam[i]
            r0 = r1 = w = r01 = None
            if order >= 2:
                r0 = (g.lam[i] - g.lam[i - 1]) / h
            if order == 3:
                r1 = (g.lam[i - 1] - g.lam[i - 2]) / h
                w, r01 = r0 / (r0 + r1), r0 + r1
            plan.append(
                _MultistepStep(
                    order,
                    ratio,
                    K * p1,
                    0.5 * K * p1,
                    r0,
                    r1,
                    w,
                    r01,
                    K * p2,
                    d2_weight * K * p3,
                    g.a[i + 1],
                    g.s[i + 1],
                )
            )
        return plan

    def _multistep(self, score, sde, x, callback, transform):
        c = self.config
        g = self.grid(sde, score, x)
        steps = len(g) - 1
        pred = c.prediction
        predict = self.predictor()
        ts = time_tensors(g.t[:-1], x)  # the (B,) time of each prediction (blocks or fills)
        # the last `order` predictions, newest last
        ms = deque([predict(score, x, next(ts), g.a[0], g.s[0], pred)], maxlen=c.order)
        for i, (order, ratio, kp1, half_kp1, r0, r1, w, r01, kp2, kp3, a_n, s_n) in enumerate(
            self._multistep_plan(g)
        ):
            m0 = ms[-1]
            x = x * ratio - kp1 * m0
            # differences are temporaries: none is kept alive through the next step
            if order == 2:
                x = x - half_kp1 * ((m0 - ms[-2]) / r0)
            elif order == 3:
                d1_0 = (m0 - ms[-2]) / r0
                d1_1 = (ms[-2] - ms[-3]) / r1
                d1 = d1_0 + w * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / r01
                x = x - kp2 * d1 - kp3 * d2
                del d1_0, d1_1, d1, d2
            if transform is not None:  # a guidance projection (guidance.py)
                x = transform(x, i + 1, g.t[i + 1])
            if i + 1 < steps:
                ms.append(predict(score, x, next(ts), a_n, s_n, pred))
            if callback is not None:
                callback(i + 1, steps, g.t[i + 1])
        return self.finish(score, sde, x, g.t[-1])

    def _multistep_sde(self, score, sde, x, generator, callback, transform):
        """SDE-DPM-Solver++(1M / 2M), midpoint rule (module docstring)."""
        c = self.config
        g = self.grid(sde, score, x)
        steps = len(g) - 1
        ts = time_tensors(g.t[:-1], x)
        ms = [self.predict(score, x, next(ts), g.a[0], g.s[0], "data")]
        for i, order in enumerate(self._multistep_orders(steps)):
            h = g.lam[i + 1] - g.lam[i]
            decay = math.exp(-h)
            gain = g.a[i + 1] * -math.expm1(-2.0 * h)  # a_t (1 - e^-2h)
            m = ms[-1]
            if order == 2:
                r = (g.lam[i] - g.lam[i - 1]) / h
                m = m + (0.5 / r) * (ms[-1] - ms[-2])
            x = (g.s[i + 1] / g.s[i] * decay) * x + gain * m
            x = x + (g.s[i + 1] * math.sqrt(-math.expm1(-2.0 * h))) * noise_like(x, generator)
            if transform is not None:  # a guidance projection (guidance.py)
                x = transform(x, i + 1, g.t[i + 1])
            if i + 1 < steps:
                ms.append(self.predict(score, x, next(ts), g.a[i + 1], g.s[i + 1], "data"))
                del ms[: -c.order]
            if callback is not None:
                callback(i + 1, steps, g.t[i + 1])
        return self.finish(score, sde, x, g.t[-1])

    def _singlestep(self, score, sde, x, callback, transform):
        c = self.config
        g = self.grid(sde, score, x)
        steps = len(g) - 1
        pred = c.prediction
        orders = [c.order] * steps
        if c.orders is not None:
            orders = list(c.orders)
        elif c.lower_order_final and steps < LOWER_ORDER_FINAL_BELOW:
            orders = [min(c.order, steps - i) for i in range(steps)]
        rs = [{1: (), 2: (0.5,), 3: (1 / 3, 2 / 3)}[o] for o in orders]
        # intermediate times at lambda_s + r h, found once before the loop
        lams = [g.lam[i] + rk * (g.lam[i + 1] - g.lam[i]) for i in range(steps) for rk in rs[i]]
        mids = time_from_log_snr(sde, lams, g.t[-1], g.t[0]) if lams else []
        inner = type(g).on(sde, mids) if mids else None
        first = 0  # index of step i's first intermediate point in `inner`
        for i in range(steps):
            order, r = orders[i], rs[i]
            h = g.lam[i + 1] - g.lam[i]
            ratio, K, hh = self._lin(g, i, i + 1)
            p1, p2, _ = _phis(hh)
            m_s = self.predict(score, x, g.t[i], g.a[i], g.s[i], pred)
            sub = [self._inner_lin(g, inner, i, first + j) for j in range(len(r))]
            first += len(r)
            if order == 1:
                x = x * ratio - (K * p1) * m_s
            elif order == 2:
                (ra1, K1, q1, t1, a1, s1) = sub[0]
                u = x * ra1 - (K1 * q1) * m_s
                m1 = self.predict(score, u, t1, a1, s1, pred)
                x = x * ratio - (K * p1) * m_s - (0.5 / r[0] * K * p1) * (m1 - m_s)
            else:
                r1, r2 = r
                (ra1, K1, q1, t1, a1, s1), (ra2, K2, q2, t2, a2, s2) = sub
                hh2 = -r2 * h if pred == "data" else r2 * h
                psi22 = q2 / hh2 - 1.0
                u1 = x * ra1 - (K1 * q1) * m_s
                m1 = self.predict(score, u1, t1, a1, s1, pred)
                u2 = x * ra2 - (K2 * q2) * m_s - (r2 / r1 * K2 * psi22) * (m1 - m_s)
                m2 = self.predict(score, u2, t2, a2, s2, pred)
                x = x * ratio - (K * p1) * m_s - (K * p2 / r2) * (m2 - m_s)
            if transform is not None:  # a guidance projection (guidance.py)
                x = transform(x, i + 1, g.t[i + 1])
            if callback is not None:
                callback(i + 1, steps, g.t[i + 1])
        return self.finish(score, sde, x, g.t[-1])

    def _inner_lin(self, g, inner, i: int, j: int):
        """Linear coefficients from grid point ``i`` to intermediate point ``j``:
        ``(ratio, K, e^hh - 1, t, a, s)``."""
        h = inner.lam[j] - g.lam[i]
        if self.config.prediction == "data":
            ratio, K, hh = inner.s[j] / g.s[i], inner.a[j], -h
        else:
            ratio, K, hh = inner.a[j] / g.a[i], inner.s[j], h
        return ratio, K, math.expm1(hh), inner.t[j], inner.a[j], inner.s[j]


@hookimpl
def diffuse_register_solvers():
    return [DPMSolver]
