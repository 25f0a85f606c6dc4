"""The base of samplers written through the Gaussian kernel ``x_t = a(t) x_0 + s(t) z``.

DDIM, DPM-Solver(++), UniPC and the EDM samplers are usually written for one SDE family.
Written through the kernel alone they work for every SDE with a Gaussian kernel and a
linear drift (VE, VP, sub-VP, the DDPM chain, plugins): the probability-flow ODE is then
``dx/dt = (d log a/dt) x - 1/2 g^2 score`` with ``g^2 = d s^2/dt - 2 (d log a/dt) s^2``,
and in the log-SNR ``lambda = log(a / s)`` it becomes the semi-linear ODE that the
exponential integrators of Lu et al. (2022a, b) solve. The two predictions come from
the score through the kernel (Song et al. 2021, App. C; Ho et al. 2020):

* noise: ``eps_hat = -s * score``
* data:  ``x0_hat = (x + s^2 * score) / a`` (Tweedie's formula)

Kernel coefficients on the time grid are Python floats computed once before the loop
(float64 on the CPU), so the loops do plain tensor arithmetic with no device syncs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pydantic import Field
from torch import Tensor

from diffuse_engine.components.schedules import (
    SCHEDULE_HELP,
    Schedule,
    check_monotone,
    kernel_coefficients,
)
from diffuse_engine.components.score import ScoreFn, kernel_prediction
from diffuse_engine.components.sde import SDE
from diffuse_engine.components.solver import MAX_STEPS, Solver, SolverConfig


class KernelSolverConfig(SolverConfig):
    """Fields of kernel-based solvers: fewer steps and the log-SNR schedule by default."""

    steps: int = Field(20, ge=1, le=MAX_STEPS, description="number of time steps from T to eps")
    schedule: Schedule = Field("logsnr", description=SCHEDULE_HELP)


@dataclass(frozen=True)
class KernelGrid:
    """Times ``t`` (decreasing) with the kernel's ``a``, ``s`` and ``lambda`` there."""

    t: list[float]
    a: list[float]
    s: list[float]
    lam: list[float]

    @classmethod
    def on(cls, sde: SDE, times: list[float]) -> KernelGrid:
        a, s, lam = kernel_coefficients(sde, times)
        return cls(list(times), a, s, lam)

    def __len__(self) -> int:
        return len(self.t)


class KernelSolver(Solver):
    """A solver that reads the SDE only through its kernel ``(a(t), s(t))``.

    Subclasses implement :meth:`sample`; :meth:`grid` gives the schedule's times with
    their kernel coefficients and :meth:`predict` turns a score into a noise or data
    prediction.
    """

    Config: ClassVar[type[SolverConfig]] = KernelSolverConfig

    @property
    def deterministic(self) -> bool:
        """Whether the same ``x_T`` always gives the same samples (no fresh noise)."""
        return True

    def check(self, sde: SDE) -> None:
        """The kernel must exist and its log-SNR decrease strictly on ``[eps, T]``."""
        check_monotone(sde, self.eps(sde), sde.T)

    def grid(
        self, sde: SDE, score: ScoreFn | None = None, like: Tensor | None = None
    ) -> KernelGrid:
        """The configured schedule's times with the kernel coefficients there (``score``
        and ``like`` as in :meth:`Solver.time_grid`, for the fitted ``gits`` schedule)."""
        return KernelGrid.on(sde, self.time_grid(sde, score, like))

    #: ``x0_hat`` (data) or ``eps_hat`` (noise) at ``(x, t)`` from one score call
    predict = staticmethod(kernel_prediction)
