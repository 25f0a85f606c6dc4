"""Sharded, seeded sampling with built components.

Samples are made in seeded shards (shard ``j`` from its own generator,
:func:`~diffuse_engine.core.distributed.shard_seed`), so a distributed run spreads the
shards over the ranks and every rank returns the same complete samples one process
would. NaN/Inf in a shard is located by replaying it (:mod:`.faults`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from diffuse_engine.components.guidance import Guidance, Guided, shard_cond
from diffuse_engine.components.score import ScoreBoundary
from diffuse_engine.components.sde import SDE
from diffuse_engine.components.solver import Solver
from diffuse_engine.core.distributed import (
    DistContext,
    gather_shards,
    my_shards,
    shard_seed,
    shard_sizes,
)
from diffuse_engine.core.errors import DiffuseError, NumericalError
from diffuse_engine.output.progress import progress_bar
from diffuse_engine.sampling.faults import FiniteWatch, NonFiniteSeen, locate


@dataclass
class SamplingResult:
    """Samples plus what it took to make them."""

    samples: Tensor
    nfe: int
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)
    sde: SDE | None = None
    score: Any = None
    #: score evaluations spent once per run before sampling (a fitted schedule's pilot)
    setup_nfe: int = 0
    #: the time grid fitted for this run (``gits``), ``None`` when nothing was fitted:
    #: ``times=fitted_times`` samples on it again without the pilot
    fitted_times: list[float] | None = None
    #: every field of what was fitted (``times``, and ``step_weights`` for ``ipndm``'s
    #: fitted coefficients): given as overrides, they sample again without any pilot
    fitted_fields: dict[str, Any] | None = None


@dataclass(frozen=True)
class SamplingJob:
    """What to sample: built components, the batch layout and how to run it."""

    sde: SDE
    solver: Solver
    score: Any
    shape: tuple[int, ...]
    seed: int
    device: torch.device
    dtype: torch.dtype
    shard_size: int
    #: names for progress bars and errors (``sde``, ``solver``, ``score``)
    names: dict[str, str]
    check_every: int = 0
    #: the condition (validated, whole: sharded here) and the method that applies it
    cond: dict[str, Any] | None = None
    guidance: Guidance | None = None
    classifier: Any = None
    #: the prior sample to start from, ``shape``d (default: drawn from the SDE's prior)
    noise: Tensor | None = None
    #: ``(loc, scale)`` of the Gaussian with ``p_T``'s moments for the score model's
    #: data (:meth:`SDE.data_prior`) to start from; ``None``: the SDE's own prior
    data_prior: tuple[Tensor, Tensor] | None = None


def run_sampling(
    job: SamplingJob, *, dist: DistContext, step_hook=None, progress: bool = False
) -> tuple[Tensor, int, int, float]:
    """Sample ``job``; ``(samples, nfe, setup_nfe, seconds)``.

    ``nfe`` counts the score evaluations of one shard (the most of any shard, for
    adaptive solvers); ``setup_nfe`` the once-per-run work of :meth:`Solver.prepare`.
    ``step_hook(step, total, t)`` is called after each solver step (rank 0 only).
    """
    sde, solver, shape, device, dtype = job.sde, job.solver, job.shape, job.device, job.dtype
    sizes = shard_sizes(shape[0], job.shard_size)
    mine = my_shards(len(sizes), dist)
    counted = ScoreBoundary(job.score, job.names["score"])
    steps = solver.config.steps
    start = time.perf_counter()
    if job.noise is None and job.data_prior is not None:
        solver.start_from(*job.data_prior)  # a fitted schedule's pilot starts there too
    like = torch.empty((1, *shape[1:]), device=device, dtype=dtype)
    if dist.enabled and solver.fits_grid:  # rank 0 fits the grid, every rank samples on it
        solver.adopt(_fit_on_main(solver, counted.call, sde, like, dist))
    else:
        with torch.no_grad():
            fitted = solver.prepare(counted.call, sde, like)
        if fitted is not None:  # pinned: guided shards must not refit (round-off may
            solver.adopt(dist.all_gather_object(fitted)[0] if dist.enabled else fitted)  # differ)
    setup_nfe = counted.calls

    starts = [sum(sizes[:j]) for j in range(len(sizes))]
    once, fixed = counted.call_once_checked, solver.fixed_layout

    def shard(j: int) -> tuple[Tensor, torch.Generator, Guided]:
        """Shard ``j``'s prior sample, generator and guided score (seeded by ``j``)."""
        gen = torch.Generator(device=device).manual_seed(shard_seed(job.seed, j))
        if job.noise is None:
            size = (sizes[j], *shape[1:])
            x = sde.start_sample(size, job.data_prior, generator=gen, device=device, dtype=dtype)
        else:
            x = job.noise[starts[j] : starts[j] + sizes[j]].to(device=device, dtype=dtype)
        if job.guidance is None:  # one layout per shard: checked on its first call
            return x, gen, Guided(score=once if fixed else counted.call)
        g = job.guidance
        cond = shard_cond(job.cond or {}, starts[j], starts[j] + sizes[j], g.shared, device)
        return x, gen, g.bind(counted.call, sde, cond, classifier=job.classifier, generator=gen)

    def solve(x, gen, guided: Guided, score_fn, callback) -> Tensor:
        if guided.run is not None:  # the method owns the loop (particle methods)
            out = guided.run(solver, sde, x, generator=gen, callback=callback)
        elif guided.transform is not None:
            out = solver.sample(
                score_fn, sde, x, generator=gen, callback=callback, transform=guided.transform
            )
        else:
            out = solver.sample(score_fn, sde, x, generator=gen, callback=callback)
        return out if guided.finish is None else guided.finish(out)

    local: dict[int, Tensor] = {}
    failed, nfe, crash = None, 0, None
    with progress_bar(
        steps * len(mine),
        f"sampling {job.names['sde']}/{job.names['solver']}",
        enabled=progress and dist.is_main,
    ) as bar:
        for i, j in enumerate(mine):
            callback = _step_callback(bar, step_hook if dist.is_main else None, i * steps)
            x, gen, guided = shard(j)
            scored = FiniteWatch(guided.score, job.check_every) if job.check_every else guided.score
            calls = counted.calls
            counted.rearm()
            try:
                with torch.no_grad():
                    out = solve(x, gen, guided, scored, callback)
            except NonFiniteSeen:
                out = None
            except DiffuseError:
                raise
            except Exception as exc:  # a solver library giving up on NaN (torchdiffeq's
                out, crash = None, exc  # "underflow in dt"): located below, else re-raised
            nfe = max(nfe, counted.calls - calls)
            if out is None or not torch.isfinite(out).all():
                failed = j
                break
            local[j] = out
    if dist.enabled:  # agree before gathering, so no rank waits for one that failed
        status = dist.all_gather_object((failed, nfe))
        nfe = max(n for _, n in status)
        elsewhere = [(r, f) for r, (f, _) in enumerate(status) if f is not None]
        if failed is None and elsewhere:
            raise NumericalError(
                f"sampling produced NaN/Inf on rank {elsewhere[0][0]} "
                f"(shard {elsewhere[0][1]}); its error says where"
            )
    if failed is not None:
        x_T, g, guided = shard(failed)

        def replay(score_fn, step_callback):  # the failed shard again, same seed
            counted.rearm()
            with torch.no_grad():
                return solve(x_T, g, guided, score_fn, step_callback)

        raise locate(
            replay,
            guided.score,
            score_name=counted.name,
            solver_name=job.names["solver"],
            sde_name=job.names["sde"],
            steps=getattr(solver.config, "steps", None),
            crash=crash,
        )
    out = local[0] if len(sizes) == 1 and not dist.enabled else gather_shards(local, sizes, dist)
    norm = getattr(job.score, "normaliser", None)  # a model trained on normalised data
    if norm is not None:
        out = norm.decode(out)  # back to the user's units (diffuse_engine.components.normalise)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, nfe, setup_nfe, time.perf_counter() - start


def _fit_on_main(solver, score, sde, like, dist: DistContext) -> Any:
    """Rank 0's fit on every rank (:meth:`Solver.prepare` there alone: a grid, or what
    the solver fits besides, as ``ipndm``'s fitted weights). A failed fit is re-raised
    on rank 0 and reported on the others, so no rank waits for it."""
    fitted, failure = None, None
    if dist.is_main:
        try:
            with torch.no_grad():
                fitted = solver.prepare(score, sde, like)
        except Exception as exc:
            failure = exc
    got = dist.broadcast_object(
        fitted if failure is None else ("failed", f"{type(failure).__name__}: {failure}")
    )
    if failure is not None:
        raise failure
    if isinstance(got, tuple):
        raise DiffuseError(f"fitting the time grid failed on rank 0: {got[1]}")
    return got


def _step_callback(bar, hook, done: int):
    """The solver's per-step callback: progress bar and observers, or ``None``."""
    if bar is None and hook is None:
        return None

    def callback(step: int, total: int, t: float) -> None:
        if bar is not None:
            bar(done + step, t=t)
        if hook is not None:
            hook(step=step, total=total, t=t)

    return callback
