"""Time-step schedules: where a sampler spends its score evaluations.

Every solver integrates from ``T`` down to ``eps`` over ``steps + 1`` times chosen by a
schedule, a registry field of every solver entry (``schedule = "logsnr"``):

* ``uniform``: uniform in ``t`` (the default; Song et al. 2021).
* ``quadratic``: uniform in ``sqrt(t - eps)``, dense near the data (Song, Meng & Ermon
  2021, DDIM, App. D.2 "quadratic" skip).
* ``logsnr``: uniform in the log signal-to-noise ratio ``lambda = log(a / s)`` of the
  kernel ``x_t = a x_0 + s z`` (Lu et al. 2022, DPM-Solver, Sec. 3.4).
* ``karras``: uniform in ``sigma^(1 / rho)`` with ``sigma = s / a = exp(-lambda)``
  (Karras et al. 2022, EDM, eq. 5; ``rho = 7``).
* ``gits``: fitted to the score model by dynamic programming over a pilot batch (Chen
  et al. 2024); it needs the score, so it lives in :mod:`diffuse_engine.components.gits` and the
  solver's ``time_grid`` calls it.

The schedules use only the SDE's kernel (``sde.log_snr``), so they work for every SDE
with a Gaussian kernel (VE, VP, sub-VP, the DDPM chain, plugins). VE, VP and sub-VP
invert ``lambda(t)`` in closed form (:meth:`SDE.time_of_log_snr`); for the others the
times are found by bisection on the monotone ``lambda``, in float64 on the CPU, once
per grid: never inside a sampling loop. Grids
are lists of Python floats so loops never read a time back from the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from diffuse_engine.core.errors import IncompatibleError

Schedule = Literal["uniform", "quadratic", "logsnr", "karras", "gits"]
#: the schedules that need only the SDE (``gits`` also needs the score model)
SCHEDULES: tuple[str, ...] = ("uniform", "quadratic", "logsnr", "karras")
#: every schedule a solver accepts
ALL_SCHEDULES: tuple[str, ...] = (*SCHEDULES, "gits")
SCHEDULE_HELP = (
    "time-step spacing: uniform (in t), quadratic, logsnr (uniform in log-SNR), "
    "karras (EDM sigma^(1/rho)), gits (fitted to the score on a pilot batch)"
)

#: bisection iterations: (T - eps) / 2**64 is far below float64 resolution of t
_BISECT_ITERS = 64
#: a closed-form inverse is taken where its times give back the targets to this
#: (relative to ``max(|lambda|, 1)``): float64 round-off of ``lambda`` is about 1e-15 on
#: VP, sub-VP and VE, so only an inverse as good as the bisection passes
_INVERSE_RTOL = 1e-12


def log_snr(sde, times: Sequence[float]) -> list[float]:
    """``lambda(t) = log(a(t) / s(t))`` at ``times`` (float64 on the CPU), as floats."""
    t = torch.tensor(list(times), dtype=torch.float64)
    return sde.log_snr(t).tolist()


def kernel_coefficients(
    sde, times: Sequence[float]
) -> tuple[list[float], list[float], list[float]]:
    """``(a, s, lambda)`` of the kernel ``x_t = a x_0 + s z`` at ``times``, as floats.

    Computed once, in float64 on the CPU, so solver loops multiply by Python numbers.
    """
    t = torch.tensor(list(times), dtype=torch.float64)
    a, s = sde.marginal(t)
    a = torch.as_tensor(a, dtype=torch.float64).expand_as(t)
    s = torch.as_tensor(s, dtype=torch.float64).expand_as(t)
    return a.tolist(), s.tolist(), (torch.log(a) - torch.log(s)).tolist()


def time_from_log_snr(sde, lams: Sequence[float], eps: float, T: float) -> list[float]:
    """Invert the decreasing ``lambda(t)`` on ``[eps, T]`` (float64, CPU).

    Targets outside ``[lambda(T), lambda(eps)]`` clamp to the nearest end. An SDE's
    closed-form inverse (:meth:`SDE.time_of_log_snr`) is used when its times give back
    the targets (to 1e-12, ``_INVERSE_RTOL``: a subclass that changes the kernel but
    inherits the inverse fails this, and so does an inaccurate one), else bisection.
    """
    target = torch.tensor(list(lams), dtype=torch.float64)
    try:
        t = sde.time_of_log_snr(target).clamp(eps, T)
    except NotImplementedError:
        t = None
    if t is not None and _inverts(sde, t, target, eps, T):
        return t.tolist()
    return bisect_time(sde, target, eps, T).tolist()


def _inverts(sde, t: torch.Tensor, target: torch.Tensor, eps: float, T: float) -> bool:
    """Whether ``t`` (clamped to ``[eps, T]``) meets ``target``: exactly where inside,
    and with the target beyond ``lambda`` of the end it was clamped to."""
    if not bool(torch.isfinite(t).all()):
        return False
    lam = sde.log_snr(t)
    inside = (t > eps) & (t < T)
    close = (lam - target).abs() <= _INVERSE_RTOL * target.abs().clamp_min(1.0)
    beyond = torch.where(t <= eps, target >= lam, target <= lam)
    return bool(torch.where(inside, close, beyond | close).all())


def bisect_time(sde, target: torch.Tensor, eps: float, T: float) -> torch.Tensor:
    """The times in ``[eps, T]`` where ``sde.log_snr`` meets ``target`` (float64), by
    bisection on the decreasing ``lambda``: the general path of :func:`time_from_log_snr`."""
    lo = torch.full_like(target, eps)  # lambda(lo) >= target
    hi = torch.full_like(target, T)  # lambda(hi) <= target
    for _ in range(_BISECT_ITERS):
        mid = 0.5 * (lo + hi)
        above = sde.log_snr(mid) >= target
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return 0.5 * (lo + hi)


def check_monotone(sde, eps: float, T: float, probes: int = 257) -> None:
    """Raise :class:`IncompatibleError` unless ``lambda(t)`` is finite and strictly
    decreasing on ``[eps, T]`` (checked on a probe grid), as the schedules need."""
    t = torch.linspace(eps, T, probes, dtype=torch.float64)
    try:
        lam = sde.log_snr(t)
    except NotImplementedError:
        raise IncompatibleError(
            f"SDE {sde.name!r} has no Gaussian kernel (marginal); "
            "kernel-based schedules and solvers need one"
        ) from None
    if not torch.isfinite(lam).all() or not (lam[1:] < lam[:-1]).all():
        raise IncompatibleError(
            f"SDE {sde.name!r}: log-SNR is not finite and strictly "
            f'decreasing on [{eps}, {T}]; use schedule = "uniform"'
        )


def time_grid(
    sde, steps: int, eps: float, schedule: str = "uniform", rho: float = 7.0
) -> list[float]:
    """``steps + 1`` decreasing times from ``sde.T`` to ``eps`` spaced by ``schedule``.

    ``uniform`` and ``quadratic`` need nothing of the SDE beyond ``T``; ``logsnr`` and
    ``karras`` place the times through the kernel's log-SNR (see the module docstring).
    The end points are ``T`` and ``eps`` (to round-off for ``uniform``).
    """
    T, n = sde.T, steps
    if schedule == "uniform":
        # exactly the formula solvers used before schedules existed: results unchanged
        return [T + (eps - T) * i / n for i in range(n + 1)]
    elif schedule == "quadratic":
        grid = [eps + (T - eps) * (1 - i / n) ** 2 for i in range(n + 1)]
    elif schedule in ("logsnr", "karras"):
        check_monotone(sde, eps, T)
        lam_T, lam_eps = log_snr(sde, [T, eps])
        if schedule == "logsnr":
            lams = [lam_T + (lam_eps - lam_T) * i / n for i in range(n + 1)]
        else:
            # sigma = exp(-lambda): the VE-equivalent noise level of Karras et al.
            hi, lo = math.exp(-lam_T / rho), math.exp(-lam_eps / rho)
            lams = [-rho * math.log(hi + (lo - hi) * i / n) for i in range(n + 1)]
        grid = time_from_log_snr(sde, lams, eps, T)
    elif schedule == "gits":
        raise ValueError(
            "schedule 'gits' is fitted to a score model: use "
            "Solver.time_grid(sde, score, like) or diffuse_engine.components.gits"
        )
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choices: {', '.join(SCHEDULES)}")
    grid[0], grid[-1] = T, eps
    return grid
