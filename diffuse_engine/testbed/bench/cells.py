"""Benchmark cells: one solver, schedule and budget on one exact-GMM problem.

Each result has the per-mode statistics of
:func:`~diffuse_engine.components.mixture.mode_statistics` (weight TV, mean std error,
mean centre error in stds) and, for deterministic solvers, the per-sample error against
a tight-tolerance adaptive solve of the probability-flow ODE from the same noise
(torchdiffeq ``dopri5``, ``rtol = atol = 1e-7``, float64).

A cell spends its budget through the solvers' own ``nfe`` field
(:meth:`~diffuse_engine.components.solver.SolverConfig.budget`); :func:`steps_for_budget`
is the older search for the largest ``steps`` that fits, by counting the calls of
one-sample runs. Results append to a JSON-lines file as they come, so a long sweep can
be stopped and resumed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffuse_engine.components.mixture import mode_statistics
from diffuse_engine.components.schedules import ALL_SCHEDULES
from diffuse_engine.core.errors import DiffuseError

#: score-evaluation budgets of the issue
DEFAULT_NFE = (5, 10, 20, 50, 100, 1000)
DEFAULT_SOLVERS = (
    "pc",
    "ancestral",
    "ode",
    "ddim",
    "dpm_solver",
    "dpm_solver_pp",
    "dpm_solver_pp_ring",
    "dpm_solver_pp3",
    "edm",
    "unipc",
    "ipndm",
)
DEFAULT_SCHEDULES = ALL_SCHEDULES
DEFAULT_PROBLEMS = ("gmm", "gmm64")
#: extra solver variants defined here (entry name -> (registry entry, overrides)); each
#: names the fields its name promises (a cell sets the schedule), so a change of the base
#: entry does not change what a variant's committed results mean. The DPM-Solver++
#: variants keep the settings they were measured with: the ring entry's eps = 3e-3.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpm_solver_pp3": (
        "dpm_solver_pp_ring",
        {"order": 3, "third_order": "reference", "eps": 3e-3},
    ),
    "unipc2": ("unipc", {"order": 2}),
    "dpm_solver2s": ("dpm_solver", {"order": 2, "method": "singlestep"}),
    # no final denoising call: at a few evaluations it is better spent on a step
    "dpm_solver_pp_nd": ("dpm_solver_pp_ring", {"order": 2, "eps": 3e-3, "denoise": False}),
}


@dataclass
class Case:
    """One benchmark cell: a problem, an SDE, a solver variant, a schedule, a budget."""

    problem: str
    sde: str
    solver: str
    schedule: str
    nfe_budget: int
    n: int
    seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.problem}/{self.sde}/{self.solver}/{self.schedule}/{self.nfe_budget}/{self.n}"


def resolve_variant(name: str) -> tuple[str, dict[str, Any]]:
    """``(registry solver entry, overrides)`` of a benchmark solver name."""
    return VARIANTS.get(name, (name, {}))


def is_deterministic(engine: Any, entry: str, overrides: dict[str, Any]) -> bool:
    """Whether the solver maps the same noise to the same sample (no fresh noise).

    Solvers say so with a ``deterministic`` attribute; the probability-flow ``ode`` is.
    """
    solver = engine.build("solver", entry, **overrides)
    flag = getattr(solver, "deterministic", None)
    return bool(flag) if flag is not None else type(solver).name == "ode"


def count_nfe(
    engine: Any, problem: str, sde: str, entry: str, steps: int, overrides: dict[str, Any]
) -> int:
    """Score evaluations of one run with ``steps`` (counted on a single sample)."""
    r = engine.sampling(
        score=problem, sde=sde, solver=entry, shape=1, seed=0, steps=steps, **overrides
    )
    return r.nfe


def steps_for_budget(
    engine: Any, problem: str, sde: str, entry: str, budget: int, overrides: dict[str, Any]
) -> int | None:
    """Largest ``steps`` whose NFE is at most ``budget`` (None if even 1 step is over).

    Evaluation counts are affine in ``steps`` for the built-in solvers; the affine
    guess from 1 and 2 steps is checked and corrected by a search if it is off.
    """
    n1 = count_nfe(engine, problem, sde, entry, 1, overrides)
    if n1 > budget:
        return None
    n2 = count_nfe(engine, problem, sde, entry, 2, overrides)
    per = n2 - n1
    if per <= 0:
        return 1
    guess = max(1, 1 + (budget - n1) // per)
    if count_nfe(engine, problem, sde, entry, guess, overrides) <= budget and (
        count_nfe(engine, problem, sde, entry, guess + 1, overrides) > budget
    ):
        return guess
    lo, hi = 1, budget  # NFE(lo) <= budget; search the largest such steps
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_nfe(engine, problem, sde, entry, mid, overrides) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def reference_solution(
    engine: Any,
    problem: str,
    sde: str,
    x_T: torch.Tensor,
    eps: float,
    denoise: bool,
    rtol: float = 1e-7,
) -> torch.Tensor:
    """Probability-flow ODE from ``x_T`` at ``T`` to ``eps`` with torchdiffeq's adaptive
    ``dopri5`` (Dormand & Prince 1980) at ``rtol = atol``, in float64; then the Tweedie
    denoising step when ``denoise``."""
    from torchdiffeq import odeint

    sde_obj = engine.build("sde", sde)
    score = engine.build("score", problem, sde=sde_obj)
    x = x_T.to(torch.float64)

    def f(t, y):
        tt = t.expand(y.shape[0])
        return sde_obj.reverse_drift(y, tt, score(y, tt), probability_flow=True)

    ts = torch.tensor([sde_obj.T, eps], dtype=torch.float64, device=x.device)
    with torch.no_grad():
        # step_t: land exactly on eps, never step past it (the kernel ends at t = 0)
        y = odeint(f, x, ts, method="dopri5", rtol=rtol, atol=rtol, options={"step_t": ts})[-1]
        if denoise:
            tt = torch.full((y.shape[0],), eps, dtype=y.dtype, device=y.device)
            y = sde_obj.denoise(y, score(y, tt), tt)
    return y


def prior_noise(
    engine: Any, problem: str, sde: str, n: int, seed: int, device: str = "cpu"
) -> torch.Tensor:
    """The ``x_T`` that ``Engine.sampling(..., shape=n, seed=seed)`` starts from: the
    data prior when the score model knows its data's moments (``prior="auto"``), else
    the SDE's prior."""
    sde_obj = engine.build("sde", sde)
    score = engine.build("score", problem, sde=sde_obj)
    gen = torch.Generator(device=device).manual_seed(int(seed))
    moments = score.data_moments()
    start = None if moments is None else sde_obj.data_prior(*moments)
    shape = (n, *score.data_shape)
    return sde_obj.start_sample(shape, start, generator=gen, device=device, dtype=torch.float32)


def run_case(
    engine: Any,
    case: Case,
    *,
    device: str = "cpu",
    n_ref: int = 5000,
    references: dict | None = None,
) -> dict[str, Any]:
    """Sample one case and measure it; returns a JSON-serialisable record."""
    entry, extra = resolve_variant(case.solver)
    overrides = {**extra, **case.overrides, "schedule": case.schedule}
    record: dict[str, Any] = {
        "key": case.key,
        "problem": case.problem,
        "sde": case.sde,
        "solver": case.solver,
        "schedule": case.schedule,
        "nfe_budget": case.nfe_budget,
        "n": case.n,
        "seed": case.seed,
    }
    try:
        steps = steps_for_budget(engine, case.problem, case.sde, entry, case.nfe_budget, overrides)
        if steps is None:
            record["skipped"] = "one step needs more evaluations than the budget"
            return record
        r = engine.sampling(
            score=case.problem,
            sde=case.sde,
            solver=entry,
            shape=case.n,
            seed=case.seed,
            device=device,
            steps=steps,
            **overrides,
        )
    except DiffuseError as exc:  # a combination the solver refuses (gits beyond 250 steps)
        record["skipped"] = str(exc)
        return record
    stats = mode_statistics(r.samples, r.score.mixture)
    record["eps"] = engine.build("solver", entry, steps=steps, **overrides).eps(r.sde)
    record.update(
        {
            "steps": steps,
            "nfe": r.nfe,
            "setup_nfe": r.setup_nfe,
            "seconds": r.seconds,
            "samples_per_second": case.n / r.seconds,
            **{
                k: stats[k]
                for k in ("weight_tv", "weight_max", "std_error", "centre_error", "non_finite")
            },
        }
    )
    if is_deterministic(engine, entry, overrides) and references is not None:
        solver_obj = engine.build("solver", entry, steps=steps, **overrides)
        eps = solver_obj.eps(r.sde)
        key = (case.problem, case.sde, case.seed, eps, bool(solver_obj.config.denoise))
        m = min(n_ref, case.n)
        if key not in references:
            x_T = prior_noise(engine, case.problem, case.sde, case.n, case.seed, device)[:m]
            references[key] = reference_solution(
                engine, case.problem, case.sde, x_T, eps, solver_obj.config.denoise
            )
        ref = references[key]
        diff = r.samples[:m].to(torch.float64) - ref
        d = diff[0].numel()
        # RMS per-coordinate error, in units of the smallest mode std
        rms = diff.flatten(1).pow(2).sum(1).div(d).sqrt()
        smin = float(r.score.mixture.stds.min())
        record["sample_error"] = float(rms.mean()) / smin
    return record


def load_results(path: str | Path, key=None) -> dict[str, dict[str, Any]]:
    """Records of a JSON-lines results file by key (later lines win): a record's
    ``"key"``, or ``key(record)``."""
    p = Path(path)
    out: dict[str, dict[str, Any]] = {}
    if p.exists():
        for line in p.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                out[rec["key"] if key is None else key(rec)] = rec
    return out


def sweep(
    engine: Any,
    cases: Iterable[Case],
    results: str | Path,
    *,
    device: str = "cpu",
    resume: bool = True,
    n_ref: int = 5000,
    log=print,
) -> dict[str, dict[str, Any]]:
    """Run ``cases`` (skipping ones already in ``results`` when ``resume``), appending a
    JSON line per case; return all records."""
    done = load_results(results) if resume else {}
    references: dict = {}
    path = Path(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    for case in cases:
        if case.key in done:
            continue
        start = time.perf_counter()
        rec = run_case(engine, case, device=device, n_ref=n_ref, references=references)
        rec["wall_seconds"] = time.perf_counter() - start
        done[case.key] = rec
        with path.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        log(_describe(rec))
    return done


def _describe(rec: dict[str, Any]) -> str:
    head = (
        f"{rec['problem']}/{rec['sde']} {rec['solver']:>15s} {rec['schedule']:>9s} "
        f"budget {rec['nfe_budget']:>4d}"
    )
    if "skipped" in rec:
        return head + "  skipped"
    pe = rec.get("sample_error")
    return (
        head + f"  nfe {rec['nfe']:>4d}  w {rec['weight_tv']:.4f}  std {rec['std_error']:.4f}"
        f"  centre {rec['centre_error']:.4f}"
        + (f"  ref {pe:.4f}" if pe is not None else "")
        + f"  {rec['seconds']:.1f}s"
    )
