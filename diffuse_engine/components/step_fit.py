"""Multistep weights fitted to the score model on a pilot batch.

A linear multistep sampler in ``y = x / a`` and ``sigma = s / a`` (iPNDM, Adams-Bashforth
on the predicted noise) takes each step as ``y_{i+1} = y_i + h_i sum_k c_ik eps_{i-k}``
with ``h_i = sigma_{i+1} - sigma_i``. Its fixed weights ``c`` are those of a smooth
``eps`` along equal steps; at 5-20 evaluations the steps are long and the weights that
reach the true trajectory's next point are others. Following the linear-subspace view of
Duan et al. (2023, "Optimal linear subspace search: learning to construct fast and
high-quality schedulers for diffusion models", CIKM) and PAS (Wang et al. 2024,
"Diffusion sampling correction via approximately 10 parameters"), the weights are
fitted once per run, on a small pilot batch, against an accurate teacher:

1. ``pilot`` samples start where the run's samples start and are carried down the run's
   own grid by a teacher: DPM-Solver++(2S) with ``substeps`` log-SNR substeps per step
   (:func:`~diffuse_engine.components.gits.teacher_trajectory`).
2. The student takes the same grid with the multistep formula from the same starts.
   Step by step, on the student's *own* states (so later weights correct the errors
   earlier steps left), ``c_i`` is the least-squares fit of
   ``h_i sum_k c_ik eps_{i-k} = y*_{i+1} - y_i`` over the pilot, ``y*`` the teacher's.
   A ridge pulls ``c_i`` toward the base weights by a ``ridge`` fraction of the
   normal matrix's mean diagonal, so nearly collinear histories (consecutive ``eps``
   of a smooth trajectory) cannot give large weights of opposite sign.
3. The fit is robust: iteratively reweighted least squares with Huber weights per
   pilot sample (``robust`` times the median residual norm). Long steps send a few
   samples toward another mode, and no linear weights bring them back; an unweighted
   fit bends every step for them at the cost of the other samples' mode widths.

With a linear score (Gaussian data) one weight per step makes a step exact, and the fit
lands where the teacher does (the fixed weights on five log-SNR steps are 100x further
off); on multimodal data it removes part of the long steps' error (the samples sent to
another mode stay there). ``order`` unknowns per step, fitted on ``pilot * dims``
equations: the fit cannot learn the pilot's own noise. It costs ``(2 substeps + 1) steps
+ 1`` evaluations of the pilot batch (the teacher's ``2 substeps`` per step and one at
the start, the student's one per step), once per run: the engine reports them as
``setup_nfe``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from diffuse_engine.components.gits import teacher_trajectory
from diffuse_engine.components.schedules import kernel_coefficients
from diffuse_engine.components.score import ScoreFn, kernel_prediction
from diffuse_engine.components.sde import SDE
from diffuse_engine.core.errors import DiffuseError


@dataclass(frozen=True)
class FittedSteps:
    """What a weight fit pins for a run: the grid it was fitted on and each step's
    weights (newest ``eps`` first). Plain floats, so a distributed run broadcasts it."""

    times: tuple[float, ...]
    weights: tuple[tuple[float, ...], ...]


#: about this many teacher evaluations in all, whatever the number of coarse steps
TEACHER_EVALUATIONS = 160


def teacher_substeps(steps: int) -> int:
    """Substeps per coarse step so the teacher spends about :data:`TEACHER_EVALUATIONS`
    evaluations whatever the grid (at least 2 per step)."""
    return max(2, -(-TEACHER_EVALUATIONS // (2 * steps)))


def fit_multistep_weights(
    score: ScoreFn,
    sde: SDE,
    times: Sequence[float],
    base: Sequence[Sequence[float]],
    like: Tensor,
    *,
    pilot: int = 512,
    ridge: float = 1e-3,
    robust: float | None = 2.0,
    seed: int = 0,
    start: tuple[Tensor, Tensor] | None = None,
) -> list[tuple[float, ...]]:
    """Per-step weights ``c_i`` (newest ``eps`` first, as many as ``base[i]``) of the
    multistep update in ``sigma`` on the grid ``times``, fitted to ``score`` (module
    docstring). ``base``: the fixed weights each fit is pulled toward; ``like`` gives the
    pilot's data shape, device and dtype; ``start``: the ``(loc, scale)`` the run's
    samples start from (else the SDE's prior)."""
    times = list(times)
    steps = len(times) - 1
    if len(base) != steps:
        raise ValueError(f"{len(base)} weight tuples for {steps} steps")
    gen = torch.Generator(device=like.device).manual_seed(seed)
    x = sde.start_sample(
        (pilot, *like.shape[1:]), start, generator=gen, device=like.device, dtype=like.dtype
    )
    with torch.no_grad():
        xs, _ = teacher_trajectory(score, sde, x, times, substeps=teacher_substeps(steps))
        a, s, _ = kernel_coefficients(sde, times)
        sig = [si / ai for ai, si in zip(a, s, strict=True)]
        y = x.double().flatten(1) / a[0]
        hist: list[Tensor] = []  # the student's eps, newest first
        keep = max(len(w) for w in base)  # the most a step weighs
        fitted = []
        for i in range(steps):
            xi = (y * a[i]).to(like.dtype).reshape(x.shape)
            eps = kernel_prediction(score, xi, times[i], a[i], s[i], "noise")
            hist.insert(0, eps.double().flatten(1))
            del hist[keep:]
            c0 = torch.tensor(base[i], dtype=torch.float64, device=y.device)
            h = sig[i + 1] - sig[i]
            A = torch.stack([h * e.flatten() for e in hist[: len(c0)]], dim=1)  # (rows, k)
            target = xs[i + 1].double().flatten() / a[i + 1] - y.flatten()
            c = _robust_fit(A, target, c0, ridge, pilot, robust)
            if not torch.isfinite(c).all():
                raise DiffuseError(
                    "coefficients 'fitted': the pilot run gave NaN/Inf; the score model "
                    "is not finite on its own trajectories"
                )
            fitted.append(tuple(float(v) for v in c))
            y = y + (A @ c).reshape(y.shape)
    return fitted


def _robust_fit(A, target, c0, ridge, n, robust, iterations: int = 5):
    """:func:`_ridge_fit` with Huber weights per pilot sample (iteratively reweighted):
    samples whose residual is above ``robust`` times the median weigh as that bound."""
    c = _ridge_fit(A, target, c0, ridge)
    if robust is None:
        return c
    for _ in range(iterations):
        r = (A @ c - target).reshape(n, -1).norm(dim=1)
        k = robust * r.median()
        w = (k / r.clamp(min=1e-300)).clamp(max=1.0)
        sw = w.sqrt().repeat_interleave(A.shape[0] // n)
        c = _ridge_fit(A * sw[:, None], target * sw, c0, ridge)
    return c


def _ridge_fit(A: Tensor, target: Tensor, c0: Tensor, ridge: float) -> Tensor:
    """``argmin |A c - target|^2 + mu |c - c0|^2`` with ``mu`` = ``ridge`` times the mean
    diagonal of ``A^T A`` (float64 normal equations: at most four unknowns)."""
    G = A.T @ A
    mu = ridge * torch.diagonal(G).mean()
    rhs = A.T @ (target - A @ c0)
    eye = torch.eye(len(c0), dtype=G.dtype, device=G.device)
    return c0 + torch.linalg.solve(G + mu * eye, rhs)
