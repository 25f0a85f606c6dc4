"""The ``gits`` schedule: time steps fitted to the score model by dynamic programming.

GITS (Chen et al. 2024, "On the Trajectory Regularity of ODE-based Diffusion Sampling",
ICML, Alg. 1) observes that probability-flow trajectories of one model share their
shape, so a grid chosen on a small pilot batch serves every sample:

1. A pilot batch of ``pilot`` prior samples is carried down a fine grid of ``fine + 1``
   times, uniform in log-SNR ``lambda = log(a / s)``, by an accurate teacher: two
   DPM-Solver++(2S) substeps (Lu et al. 2022b) per fine interval.
2. The cost of a coarse step from fine time ``i`` to ``j`` is the pilot RMS of the
   difference between one first-order exponential-integrator (DDIM) step from the
   teacher's ``x_i`` and the teacher's ``x_j``, divided by ``s_j``: the local error in
   units of the noise still present at ``t_j`` (noise-prediction units), so the errors
   near the data that decide the modes' widths weigh as much as the early ones.
3. The ``steps``-edge path from ``T`` to ``eps`` of least total cost is found by
   dynamic programming over the fine grid.

The fit costs ``4 * fine + 1`` score evaluations on the pilot batch, once per
(score, SDE, ``steps``, ``eps``, data shape): the engine reports them as
``SamplingResult.setup_nfe``, apart from the per-sample ``nfe``. The pilot runs on the
sampling device and dtype with its own seeded generator, so the grid, and the samples,
are reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from diffuse_engine.components.schedules import (
    check_monotone,
    kernel_coefficients,
    log_snr,
    time_from_log_snr,
)
from diffuse_engine.components.score import ScoreFn, kernel_prediction
from diffuse_engine.components.sde import SDE
from diffuse_engine.core.errors import DiffuseError

#: one coarse step per two fine intervals at least: the DP needs room to choose
MIN_FINE_PER_STEP = 2
#: beyond this many steps a fitted grid costs more than it can gain over ``logsnr``
MAX_STEPS = 250


def too_many_steps(steps: int) -> str | None:
    """Why a grid of ``steps`` cannot be fitted (more than :data:`MAX_STEPS`), or ``None``."""
    if steps <= MAX_STEPS:
        return None
    return (
        f"schedule 'gits' fits at most {MAX_STEPS} steps, not {steps}; "
        'for long runs use schedule = "logsnr" or "quadratic"'
    )


def _data_prediction(score: ScoreFn, x: Tensor, t: float, a: float, s: float) -> Tensor:
    """Tweedie's ``x0_hat`` at time ``t``, as the kernel solvers compute it."""
    return kernel_prediction(score, x, t, a, s, "data")


def teacher_trajectory(
    score: ScoreFn, sde: SDE, x: Tensor, times: Sequence[float], substeps: int = 2
) -> tuple[list[Tensor], list[Tensor]]:
    """States ``x_i`` of the pilot at ``times`` and their data predictions ``D_i``.

    Each interval is split into ``substeps`` equal log-SNR pieces stepped by
    DPM-Solver++(2S) with the midpoint in log-SNR (Lu et al. 2022b, Alg. 1).
    """
    eps, T = min(times), sde.T
    a, s, lam = kernel_coefficients(sde, times)
    xs, ds = [x], [_data_prediction(score, x, times[0], a[0], s[0])]
    for i in range(len(times) - 1):
        pieces = [
            lam[i] + (lam[i + 1] - lam[i]) * k / (2 * substeps) for k in range(2 * substeps + 1)
        ]
        tk = time_from_log_snr(sde, pieces, eps, T)
        tk[0], tk[-1] = times[i], times[i + 1]
        ak, sk, lk = kernel_coefficients(sde, tk)
        d0 = ds[-1]
        for k in range(0, 2 * substeps, 2):
            m, e = k + 1, k + 2  # midpoint and end of this substep
            if k > 0:
                d0 = _data_prediction(score, x, tk[k], ak[k], sk[k])
            h = lk[e] - lk[k]
            xm = (sk[m] / sk[k]) * x + (ak[m] * -math.expm1(-h / 2)) * d0
            dm = _data_prediction(score, xm, tk[m], ak[m], sk[m])
            x = (sk[e] / sk[k]) * x + (ak[e] * -math.expm1(-h)) * dm
        xs.append(x)
        ds.append(_data_prediction(score, x, times[i + 1], a[i + 1], s[i + 1]))
    return xs, ds


def step_costs(
    xs: list[Tensor],
    ds: list[Tensor],
    a: list[float],
    s: list[float],
    lam: list[float],
    chunk_elements: int = 1 << 24,
) -> Tensor:
    """``C[i, j]``: pilot RMS error of one DDIM step ``i -> j`` against the teacher, over
    ``s_j`` (``inf`` where ``j <= i``), as float64 on the CPU.

    Targets ``j`` are taken in chunks of at most ``chunk_elements`` tensor elements, so
    the temporaries stay small for image-sized data.
    """
    M = len(xs) - 1
    C = torch.full((M + 1, M + 1), math.inf, dtype=torch.float64)
    X = torch.stack([v.flatten(1) for v in xs])  # (M+1, n, d), the pilot's dtype
    per_target = X[0].numel()
    step = max(1, chunk_elements // per_target)
    for i in range(M):
        d_i = ds[i].flatten(1)
        for j0 in range(i + 1, M + 1, step):
            js = range(j0, min(M + 1, j0 + step))
            ratio = torch.tensor([s[j] / s[i] for j in js], dtype=X.dtype, device=X.device)
            coef = torch.tensor(
                [a[j] * -math.expm1(-(lam[j] - lam[i])) for j in js], dtype=X.dtype, device=X.device
            )
            pred = ratio[:, None, None] * X[i] + coef[:, None, None] * d_i
            err2 = (pred - X[js.start : js.stop]).double().pow(2).sum(-1).mean(-1)
            C[i, js.start : js.stop] = err2.sqrt().cpu() / torch.tensor(
                [s[j] for j in js], dtype=torch.float64
            )
    return C


def cheapest_path(C: Tensor, steps: int) -> list[int]:
    """Indices ``0 = p_0 < ... < p_steps = M`` minimising ``sum C[p_k, p_k+1]``."""
    M = C.shape[0] - 1
    best = torch.full((M + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    back = []
    for _ in range(steps):
        total = best[:, None] + C  # (from, to)
        best, arg = total.min(0)
        back.append(arg)
    path = [M]
    for arg in reversed(back):
        path.append(int(arg[path[-1]]))
    return path[::-1]


def gits_time_grid(
    score: ScoreFn,
    sde: SDE,
    steps: int,
    eps: float,
    like: Tensor,
    *,
    pilot: int = 512,
    fine: int = 100,
    seed: int = 0,
    start: tuple[Tensor, Tensor] | None = None,
) -> list[float]:
    """``steps + 1`` decreasing times from ``T`` to ``eps`` fitted to ``score``.

    ``like`` gives the data shape (``like.shape[1:]``), device and dtype of the pilot;
    ``start``: the ``(loc, scale)`` of the Gaussian the run's samples start from (the
    data prior, :meth:`~diffuse_engine.components.sde.SDE.data_prior`), else the SDE's prior.
    See the module docstring for the algorithm (GITS, Chen et al. 2024).
    """
    if (problem := too_many_steps(steps)) is not None:
        raise DiffuseError(problem)
    check_monotone(sde, eps, sde.T)
    fine = max(fine, MIN_FINE_PER_STEP * steps)
    lam_T, lam_eps = log_snr(sde, [sde.T, eps])
    lams = [lam_T + (lam_eps - lam_T) * i / fine for i in range(fine + 1)]
    times = time_from_log_snr(sde, lams, eps, sde.T)
    times[0], times[-1] = sde.T, eps
    gen = torch.Generator(device=like.device).manual_seed(seed)
    x = sde.start_sample(  # the run's own start: fitted to the trajectories it samples
        (pilot, *like.shape[1:]), start, generator=gen, device=like.device, dtype=like.dtype
    )
    with torch.no_grad():
        xs, ds = teacher_trajectory(score, sde, x, times)
        a, s, lam = kernel_coefficients(sde, times)
        C = step_costs(xs, ds, a, s, lam)
    upper = torch.ones_like(C, dtype=torch.bool).triu(1)
    if not torch.isfinite(C[upper]).all():
        raise DiffuseError(
            "schedule 'gits': the pilot run gave NaN/Inf; the score model "
            "is not finite on its own trajectories"
        )
    return [times[i] for i in cheapest_path(C, steps)]
