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

Two options every kernel-based solver has, both off by default:

* ``times``: an explicit decreasing time grid instead of ``schedule`` and ``steps``, e.g.
  the engine times of another tool's timesteps (:mod:`diffuse_engine.interop` builds the
  grids of diffusers' schedulers), so runs can be compared step for step.
* x0 clipping for data in a known range (images in ``[-1, 1]``): every data prediction
  ``x0_hat`` (and the final denoising step) is clipped to ``[-x0_clip, x0_clip]``
  ("static thresholding"), or, with ``x0_threshold = p``, per sample to ``[-q, q]`` and
  rescaled by ``x0_clip / q``, where ``q`` is the ``p``-quantile of ``|x0_hat|`` but at
  least ``x0_clip`` and at most ``x0_threshold_max`` ("dynamic thresholding", Saharia et
  al. 2022, "Photorealistic text-to-image diffusion models", Sec. 2.3). A noise
  prediction is then re-derived from the clipped ``x0_hat``, ``eps_hat = (x - a x0) / s``,
  as diffusers' DPM-Solver and DDIM (with ``use_clipped_model_output``) do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from diffuse_engine.components.schedules import (
    SCHEDULE_HELP,
    Schedule,
    check_monotone,
    kernel_coefficients,
    log_snr,
    time_from_log_snr,
)
from diffuse_engine.components.score import ScoreFn, kernel_prediction
from diffuse_engine.components.sde import SDE
from diffuse_engine.components.solver import MAX_STEPS, Solver, SolverConfig
from diffuse_engine.core.errors import IncompatibleError


class KernelSolverConfig(SolverConfig):
    """Fields of kernel-based solvers: fewer steps and the log-SNR schedule by default."""

    steps: int = Field(20, ge=1, le=MAX_STEPS, description="number of time steps from T to eps")
    schedule: Schedule = Field("logsnr", description=SCHEDULE_HELP)
    # ---- explicit grid and x0 clipping (module docstring) ----
    times: list[float] | None = Field(
        None,
        min_length=2,
        max_length=MAX_STEPS + 1,
        description="explicit decreasing times (first <= T, last = the smallest time); "
        "replaces schedule, steps and eps",
    )
    sigma_end: float | None = Field(
        None,
        gt=0,
        description="stop where the noise-to-signal ratio s/a reaches sigma_end, when that "
        "comes before eps: one end for every SDE (k-diffusion's and EDM's sigma_min)",
    )
    denoise_rule: Literal["tweedie", "flow"] = Field(
        "tweedie",
        description="final denoising step: tweedie (the posterior mean E[x0 | x_eps]) or "
        "flow (the probability-flow ODE continued to noise 0 by one Euler step in "
        "(s/a)^2: half Tweedie's correction)",
    )
    x0_clip: float | None = Field(
        None, gt=0, description="clip predicted clean data to [-x0_clip, x0_clip] (images: 1)"
    )
    x0_threshold: float | None = Field(
        None, gt=0, lt=1, description="dynamic thresholding quantile p (Saharia et al. 2022)"
    )
    x0_threshold_max: float | None = Field(
        None, gt=0, description="dynamic thresholding: largest per-sample threshold"
    )

    @model_validator(mode="before")
    @classmethod
    def _steps_from_times(cls, data: Any) -> Any:
        """An explicit grid fixes the number of steps; ``steps`` given with it must agree
        (an entry's own ``steps`` give way to an overriding grid in the registry)."""
        if isinstance(data, dict) and isinstance(data.get("times"), (list, tuple)):
            steps = max(len(data["times"]) - 1, 1)
            if data.get("steps") is not None and data["steps"] != steps:
                raise ValueError(
                    f"times ({len(data['times'])} times: {steps} steps) and steps "
                    f"({data['steps']}) both fix the steps; give one of them"
                )
            data = {**data, "steps": steps}
        return data

    def budget(self, nfe: int) -> dict:
        """An explicit ``times`` grid fixes the steps, so it cannot also take a budget."""
        if self.times is not None:
            raise ValueError("nfe and times both fix the steps; give one of them")
        return super().budget(nfe)

    @model_validator(mode="after")
    def _check_times(self):
        if self.times is not None:
            if self.sigma_end is not None:
                raise ValueError("times set the end; sigma_end is for a schedule's grid")
            t = self.times
            if not all(x > 0 for x in t) or any(b >= a for a, b in zip(t[:-1], t[1:], strict=True)):
                raise ValueError("times must be strictly decreasing and > 0 (from T down to eps)")
        if self.x0_threshold_max is not None:
            if self.x0_threshold is None:
                raise ValueError("x0_threshold_max needs x0_threshold (dynamic thresholding)")
            if self.x0_threshold_max < (self.x0_clip or 1.0):
                raise ValueError(
                    f"x0_threshold_max ({self.x0_threshold_max}) must be >= x0_clip "
                    f"({self.x0_clip or 1.0}), the smallest threshold"
                )
        return self


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
        """The kernel must exist and its log-SNR decrease strictly on ``[eps, T]``; an
        explicit ``times`` grid must lie in ``(0, T]``."""
        times = self.config.times
        if times is not None and times[0] > sde.T * (1 + 1e-12):
            raise IncompatibleError(
                f"solver {self.name!r}: times start at {times[0]}, after the end time "
                f"T = {sde.T} of SDE {sde.name!r}; give times in (0, {sde.T}]"
            )
        check_monotone(sde, self.eps(sde), sde.T)

    def eps(self, sde: SDE) -> float:
        """The grid's last time: the explicit ``times``' last, else ``eps`` (or the SDE's
        ``sampling_eps``), or earlier the time where ``s / a = sigma_end``. The same
        ``eps`` is a different noise level on each SDE: at ``t = 1e-3`` VP's ``s / a``
        is ``1e-2``, sub-VP's ``1e-4``, below any mode's width."""
        c = self.config
        if c.times is not None:
            return c.times[-1]
        eps = super().eps(sde)
        if c.sigma_end is None:
            return eps
        lam_end = -math.log(c.sigma_end)
        lam_T, lam_eps = log_snr(sde, [float(sde.T), eps])
        if lam_end <= lam_T:
            raise IncompatibleError(
                f"solver {self.name!r}: sigma_end = {c.sigma_end:g} is at or above SDE "
                f"{sde.name!r}'s noise-to-signal ratio s/a = {math.exp(-lam_T):.3g} at T, "
                "so nothing would be sampled; give a smaller sigma_end"
            )
        if lam_eps <= lam_end:  # eps is already that noisy
            return eps
        return time_from_log_snr(sde, [lam_end], eps, float(sde.T))[0]

    def time_grid(
        self, sde: SDE, score: ScoreFn | None = None, like: Tensor | None = None
    ) -> list[float]:
        """The explicit ``times`` when given, else the schedule's (:meth:`Solver.time_grid`)."""
        if self.config.times is not None:
            return list(self.config.times)
        return super().time_grid(sde, score, like)

    @property
    def fits_grid(self) -> bool:
        return self.config.times is None and super().fits_grid

    def grid(
        self, sde: SDE, score: ScoreFn | None = None, like: Tensor | None = None
    ) -> KernelGrid:
        """The configured schedule's times with the kernel coefficients there (``score``
        and ``like`` as in :meth:`Solver.time_grid`, for the fitted ``gits`` schedule)."""
        return KernelGrid.on(sde, self.time_grid(sde, score, like))

    def predict(
        self, score: ScoreFn, x: Tensor, t: float | Tensor, a: float, s: float, prediction: str
    ) -> Tensor:
        """``x0_hat`` (``"data"``) or ``eps_hat`` (``"noise"``) at ``(x, t)`` from one
        score call (:func:`~diffuse_engine.components.score.kernel_prediction`; ``t`` a
        float or its ``(B,)`` tensor), with the configured x0 clipping (module docstring)."""
        c = self.config
        if c.x0_clip is None and c.x0_threshold is None:
            return kernel_prediction(score, x, t, a, s, prediction)
        x0 = self.clip_x0(kernel_prediction(score, x, t, a, s, "data"))
        return x0 if prediction == "data" else (x - a * x0) / s

    def predictor(self):
        """:meth:`predict` for a solver loop to bind once: :func:`kernel_prediction`
        itself when no x0 clipping is configured (the same values, one Python frame
        less per score call), else :meth:`predict`; same signature either way."""
        c = self.config
        if c.x0_clip is None and c.x0_threshold is None:
            return kernel_prediction
        return self.predict

    def clip_x0(self, x0: Tensor) -> Tensor:
        """Static (``x0_clip``) or dynamic (``x0_threshold``) thresholding of ``x0``."""
        c = self.config
        bound = c.x0_clip if c.x0_clip is not None else 1.0
        if c.x0_threshold is None:
            return x0.clamp(-bound, bound)
        flat = x0.reshape(x0.shape[0], -1)
        mag = flat.abs() if flat.dtype in (torch.float32, torch.float64) else flat.abs().float()
        q = torch.quantile(mag, c.x0_threshold, dim=1).to(x0.dtype)
        q = q.clamp(min=bound, max=c.x0_threshold_max)[:, None]
        return (torch.maximum(torch.minimum(flat, q), -q) * (bound / q)).reshape(x0.shape)

    def finish(self, score: ScoreFn, sde: SDE, x: Tensor, t: float) -> Tensor:
        """The final denoising step (:meth:`Solver.finish`), clipped like every x0_hat.

        ``denoise_rule = "flow"`` continues the probability-flow ODE from ``eps`` to
        noise 0 instead of returning Tweedie's posterior mean. In ``x / a`` and
        ``u = sigma^2 = (s / a)^2`` the flow is ``d(x/a)/du = -(a / 2) score``, smooth in
        ``u`` for smooth data (Karras et al. 2022, Eq. 4 in ``sigma``), so one Euler step
        to ``u = 0`` gives ``x0 = (x + s^2 score / 2) / a``: the same one evaluation,
        half Tweedie's correction. In a Gaussian mode of width ``w`` its std is
        ``w (1 + O(sigma^4 / w^4))``, where the posterior mean's is ``w / sqrt(1 +
        sigma^2 / w^2)``: 5 % narrow at ``sigma = w / 3`` (VE's ``sigma_min = 0.01`` on
        modes of std 0.03). Data with no width at that noise (``sigma >> w``, a few
        points) keep half their noise, where the posterior mean removes it. The rule
        applies when ``denoise`` is on (a one-evaluation budget turns it off); with x0
        clipping the data prediction in it is clipped, and so is the result."""
        c = self.config
        if c.denoise and c.denoise_rule == "flow":
            (a,), (s,), _ = kernel_coefficients(sde, [t])
            # (x/a + x0_hat) / 2, with x0_hat clipped like every data prediction
            out = 0.5 * (x / a + self.predict(score, x, t, a, s, "data"))
        else:
            out = super().finish(score, sde, x, t)
        if not c.denoise or (c.x0_clip is None and c.x0_threshold is None):
            return out
        return self.clip_x0(out)
