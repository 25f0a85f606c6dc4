"""UniPC: a unified predictor-corrector framework for fast sampling (Zhao, Bai, Rao,
Zhou & Lu, NeurIPS 2023).

A multistep exponential integrator in the log-SNR ``lambda`` (the predictor UniP-p)
followed by a corrector UniC-p that reuses the score evaluation the next step needs
anyway at the predicted point, raising the order by one at no extra cost. Coefficients
``rho`` solve the small linear systems of the paper's Alg. 1 (variant ``bh1``:
``B(h) = h``; ``bh2``: ``B(h) = e^h - 1``); they depend only on the grid and are
computed before the loop. Data prediction (``x0_hat``) by default, as the authors
recommend for unconditional sampling; the update formulas follow their reference
implementation (``multistep_uni_pc_bh_update``). The last step has no corrector (it
would need an evaluation nobody uses). Written through the kernel, so it applies to
every SDE with a Gaussian kernel (see :mod:`diffuse_engine.components.kernel_solver`).

Score evaluations: ``steps``, plus one for the final denoising step when ``denoise``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from diffuse_engine import hookimpl
from diffuse_engine.components.kernel_solver import KernelSolver, KernelSolverConfig


class UniPCConfig(KernelSolverConfig):
    order: int = Field(3, ge=1, le=4, description="order of the predictor (corrector: +1)")
    variant: Literal["bh1", "bh2"] = Field("bh1", description="B(h) = h (bh1) or e^h - 1 (bh2)")
    prediction: Literal["data", "noise"] = Field("data", description="model prediction used")
    lower_order_final: bool = Field(True, description="lower the order on the last steps")


def _coefficients(lam: list[float], i: int, order: int, data: bool, variant: str):
    """``(hh, e^hh - 1, B(h), rks, rhos_p, rhos_c)`` of the step ``lam[i] -> lam[i+1]``
    using the ``order - 1`` earlier points (UniPC Alg. 1/2)."""
    h = lam[i + 1] - lam[i]
    hh = -h if data else h
    rks = [(lam[i - k] - lam[i]) / h for k in range(1, order)] + [1.0]
    h_phi_1 = math.expm1(hh)
    B_h = hh if variant == "bh1" else h_phi_1
    h_phi_k = h_phi_1 / hh - 1.0
    factorial, R, b = 1, [], []
    for k in range(1, order + 1):
        R.append([r ** (k - 1) for r in rks])
        b.append(h_phi_k * factorial / B_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    R64 = torch.tensor(R, dtype=torch.float64)
    b64 = torch.tensor(b, dtype=torch.float64)
    if order == 1:
        rhos_p, rhos_c = [], [0.5]
    else:
        rhos_p = [0.5] if order == 2 else torch.linalg.solve(R64[:-1, :-1], b64[:-1]).tolist()
        rhos_c = torch.linalg.solve(R64, b64).tolist()
    return hh, h_phi_1, B_h, rks[:-1], rhos_p, rhos_c


class UniPC(KernelSolver):
    """UniPC multistep predictor-corrector (Zhao et al. 2023), orders 1-4."""

    name = "unipc"
    supports_transform = True
    Config = UniPCConfig

    def sample(self, score, sde, x, *, generator=None, callback=None, transform=None):
        c = self.config
        g = self.grid(sde, score, x)
        steps = len(g) - 1
        data = c.prediction == "data"
        pred = c.prediction
        # per-step orders and coefficients, before the loop
        plan = []
        for i in range(steps):
            order = min(c.order, i + 1)
            if c.lower_order_final:
                order = min(order, steps - i)
            plan.append((order, _coefficients(g.lam, i, order, data, c.variant)))
        ms = [self.predict(score, x, g.t[0], g.a[0], g.s[0], pred)]  # newest last
        for i, (order, (_h, h_phi_1, B_h, rks, rhos_p, rhos_c)) in enumerate(plan):
            ratio, K = (
                (g.s[i + 1] / g.s[i], g.a[i + 1]) if data else (g.a[i + 1] / g.a[i], g.s[i + 1])
            )
            m0 = ms[-1]
            d1s = [(ms[-1 - k] - m0) / rks[k - 1] for k in range(1, order)]
            x_lin = x * ratio - (K * h_phi_1) * m0
            x_new = x_lin
            for rho, d in zip(rhos_p, d1s, strict=True):
                x_new = x_new - (K * B_h * rho) * d
            if i + 1 < steps:  # corrector, with the evaluation the next step reuses
                m_t = self.predict(score, x_new, g.t[i + 1], g.a[i + 1], g.s[i + 1], pred)
                corr = (m_t - m0) * (K * B_h * rhos_c[-1])
                for rho, d in zip(rhos_c[:-1], d1s, strict=True):
                    corr = corr + (K * B_h * rho) * d
                x_new = x_lin - corr
                ms.append(m_t)
                del ms[: -c.order]
            x = x_new
            if transform is not None:  # a guidance projection (guidance.py)
                x = transform(x, i + 1, g.t[i + 1])
            if callback is not None:
                callback(i + 1, steps, g.t[i + 1])
        return self.finish(score, sde, x, g.t[-1])


@hookimpl
def diffuse_register_solvers():
    return [UniPC]
