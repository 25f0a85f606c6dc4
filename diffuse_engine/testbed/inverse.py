"""The exact-posterior benchmark of inverse-problem guidance (``diffuse bench --inverse``).

Problems (:func:`problems`), each a mixture from the registry, an observation and its
exact posterior (:mod:`diffuse_engine.components.posterior`):

* ``ring-x0``: the 2-D ring observing its first coordinate, ``x_0 = sqrt(2)`` (mask);
* ``gmm64-half``: the 64-D mixture observing its first 32 coordinates (mask);
* ``gmm64-proj``: the 64-D mixture under a seeded random 8 x 64 projection, noise 0.1;
* ``image-box``: the 64-D mixture as 1 x 8 x 8 images, a 4 x 4 box in the middle unseen.

Observations are made from one seeded exact sample of the prior. :func:`run_cell` samples
one method at one budget and measures it with :func:`posterior_statistics`; the floor is
the same statistics of exact posterior samples of the same size.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from diffuse_engine.components.builder import Builder
from diffuse_engine.components.mixture import GaussianMixture
from diffuse_engine.components.observation import mask_operator
from diffuse_engine.components.posterior import (
    GaussianPosterior,
    linear_gaussian_posterior,
    posterior_statistics,
)

METHODS = ("replacement", "repaint", "dps", "pigdm", "smc")
BUDGETS = (20, 50, 100, 1000)
METRICS = ("weight_tv", "mean_error", "cov_error", "obs_error")
#: below this a metric is zero: float32 samples pin observed coordinates to ~1e-7
ZERO = 1e-6


@dataclass
class Problem:
    """One benchmark problem: the score, the sample shape, the condition and the truth."""

    name: str
    score: Any
    dims: tuple[int, ...]
    cond: dict[str, Any]  # for n = 1 (expanded by :meth:`cond_for`)
    A: torch.Tensor  # dense (m, d)
    y: torch.Tensor  # (m,)
    noise_std: float
    post: GaussianPosterior

    def cond_for(self, n: int) -> dict[str, Any]:
        """The condition for ``n`` samples of the one observation."""
        out = dict(self.cond)
        out["y"] = self.cond["y"].expand(n, *self.cond["y"].shape[1:]).clone()
        return out


def _mixture(builder: Builder, entry: str) -> tuple[Any, GaussianMixture]:
    model = builder.build("score", entry, sde=builder.build("sde", "vp"))
    return entry, model.mixture


def problems(builder: Builder, names: list[str] | None = None, seed: int = 0) -> list[Problem]:
    """The benchmark problems (module docstring), by name."""
    g = torch.Generator().manual_seed(seed)
    out = []
    ring_entry, ring = _mixture(builder, "gmm")
    if not names or "ring-x0" in names:
        mask = torch.tensor([True, False])
        y = torch.tensor([[math.sqrt(2), 0.0]])
        A = mask_operator(mask).matrix()
        post = linear_gaussian_posterior(ring, A, y[0, :1], 0.0)
        out.append(
            Problem("ring-x0", ring_entry, (2,), {"mask": mask, "y": y}, A, y[0, :1], 0.0, post)
        )
    entry, mix = _mixture(builder, "gmm64")
    x_true = mix.sample(1, generator=g, dtype=torch.float64)
    if not names or "gmm64-half" in names:
        mask = torch.arange(64) < 32
        A = mask_operator(mask).matrix()
        post = linear_gaussian_posterior(mix, A, x_true[0, :32], 0.0)
        cond = {"mask": mask, "y": x_true.float()}
        out.append(Problem("gmm64-half", entry, (64,), cond, A, x_true[0, :32], 0.0, post))
    if not names or "gmm64-proj" in names:
        A = torch.randn(8, 64, generator=g, dtype=torch.float64) / math.sqrt(8)
        y = x_true[0] @ A.T + 0.1 * torch.randn(8, generator=g, dtype=torch.float64)
        post = linear_gaussian_posterior(mix, A, y, 0.1)
        cond = {"A": A.float(), "y": y[None].float(), "noise_std": 0.1}
        out.append(Problem("gmm64-proj", entry, (64,), cond, A, y, 0.1, post))
    if not names or "image-box" in names:
        mask = torch.ones(1, 8, 8, dtype=torch.bool)
        mask[:, 2:6, 2:6] = False
        A = mask_operator(mask).matrix()
        post = linear_gaussian_posterior(mix, A, A @ x_true[0], 0.0)
        model = builder.build("score", entry, sde=builder.build("sde", "vp"))

        def image_score(x, t, cond=None, _m=model):
            return _m(x.reshape(x.shape[0], 64), t).reshape(x.shape)

        cond = {"mask": mask, "y": x_true.float().reshape(1, 1, 8, 8)}
        out.append(Problem("image-box", image_score, (1, 8, 8), cond, A, A @ x_true[0], 0.0, post))
    return out


def settings(method: str, nfe: int, particles: int = 16) -> tuple[str, dict[str, Any]]:
    """Solver and fields that spend about ``nfe`` score evaluations per sample (per
    particle for ``smc``): ancestral DDIM (``eta = 1``) on the registry's quadratic grid,
    which refines the steps near ``eps`` (smc's pinned weights degenerate on a uniform
    grid: at 100 uniform steps its error is twice that of one particle); RePaint spends about
    ``steps * resamplings``."""
    kw: dict[str, Any] = {"eta": 1.0}  # and the [solver.ddim] schedule (quadratic)
    if method == "repaint":
        r = 3 if nfe >= 50 else 2
        kw.update(
            steps=max(2, nfe // r), resamplings=r, jump_length=max(1, min(10, nfe // (4 * r)))
        )
    else:
        kw["steps"] = max(1, nfe - 1)
    if method == "smc":
        kw["particles"] = particles
    return "ddim", kw


def run_cell(engine, problem: Problem, method: str, nfe: int, n: int, seed: int, **extra) -> dict:
    """One method at one budget on one problem: statistics, NFE and seconds."""
    solver, kw = settings(method, nfe, extra.pop("particles", 16))
    kw.update(extra)
    start = time.perf_counter()
    res = engine.sampling(
        score=problem.score, sde="vp", solver=solver, shape=(n, *problem.dims), seed=seed,
        cond=problem.cond_for(n), guidance=method, **kw,
    )  # fmt: skip
    st = posterior_statistics(res.samples, problem.post, problem.A, problem.y)
    cell = {k: st[k] for k in METRICS}
    cell.update(problem=problem.name, method=method, budget=nfe, nfe=res.nfe, n=n,
                seconds=time.perf_counter() - start, particles=kw.get("particles"))  # fmt: skip
    return cell


def floor(problem: Problem, n: int, seed: int) -> dict:
    """The statistics of ``n`` exact posterior samples: the noise floor."""
    x = problem.post.sample(n, torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    st = posterior_statistics(x, problem.post, problem.A, problem.y)
    return {k: st[k] for k in METRICS}


def table(cells: list[dict], floors: dict[str, dict], metric: str) -> str:
    """A markdown table: problem x method rows, budgets as columns, floor last."""
    budgets = sorted({c["budget"] for c in cells})
    head = "| problem | method | " + " | ".join(f"NFE {b}" for b in budgets) + " | floor |"
    lines = [head, "|" + "---|" * (len(budgets) + 3)]
    keys = sorted({(c["problem"], c["method"], c["particles"]) for c in cells},
                  key=lambda k: (k[0], METHODS.index(k[1]), k[2] or 0))  # fmt: skip
    for prob, meth, k in keys:
        label = meth if k is None else f"{meth} (K={k})"
        row = {c["budget"]: c[metric] for c in cells
               if (c["problem"], c["method"], c["particles"]) == (prob, meth, k)}  # fmt: skip
        vals = " | ".join(f"{row[b]:.3f}" if b in row else "" for b in budgets)
        lines.append(f"| {prob} | {label} | {vals} | {floors[prob][metric]:.3f} |")
    return "\n".join(lines)


def sweep(
    engine,
    *,
    names: list[str] | None = None,
    methods: tuple[str, ...] = METHODS,
    budgets: tuple[int, ...] = BUDGETS,
    particles: tuple[int, ...] = (1, 4, 16, 32),
    n: int = 1000,
    seed: int = 0,
    results=None,
    log=print,
) -> tuple[list[dict], dict[str, dict]]:
    """Every method at every budget on every problem (the ring with ``2 n`` samples),
    plus ``smc`` with each of ``particles`` at NFE 100; appends each cell to the
    JSON-lines file ``results`` as it finishes. Returns ``(cells, floors)``."""
    import json

    cells, floors = [], {}
    for prob in problems(engine.builder, names, seed=seed):
        size = 2 * n if prob.name == "ring-x0" else n
        floors[prob.name] = floor(prob, size, seed)
        log(f"{prob.name} floor {floors[prob.name]}")
        runs = [(m, b, 16) for m in methods for b in budgets]
        if "smc" in methods:
            runs += [("smc", 100, k) for k in particles if k != 16]
        for method, budget, k in runs:
            extra = {"particles": k} if method == "smc" else {}
            cell = run_cell(engine, prob, method, budget, size, seed, **extra)
            cells.append(cell)
            if results is not None:
                with open(results, "a") as out:
                    out.write(json.dumps(cell) + "\n")
            log(str({k: (round(v, 4) if isinstance(v, float) else v) for k, v in cell.items()}))
    return cells, floors


def particle_check(
    engine,
    *,
    names: list[str] | None = None,
    seeds: dict[str, int] | None = None,
    particles: int = 16,
    nfe: int = 1000,
    n: int = 1000,
    draws: int = 50,
    ratio: float = 1.5,
    log=print,
) -> list[dict]:
    """The particle target, measured as expectations: ``smc`` with ``particles`` at
    ``nfe`` per particle, each metric averaged over ``seeds[problem]`` seeds, against the
    floor averaged over ``draws`` independent sets of exact posterior samples of the same
    size. One draw of either is too noisy to compare (in 1-D the ring's mean error of
    ~1000 samples per mode has a standard deviation about half its mean). A metric
    passes when its mean is within ``ratio`` times the floor's, up to :data:`ZERO` (a zero
    floor needs a zero mean, but for float32 rounding of pinned coordinates). Returns one
    row per problem and metric: means, standard errors, ratio, pass."""
    import statistics as st

    seeds = seeds or {}
    rows = []
    for prob in problems(engine.builder, names):
        size = 2 * n if prob.name == "ring-x0" else n
        fl = [floor(prob, size, 1000 + d) for d in range(draws)]
        cells = [
            run_cell(engine, prob, "smc", nfe, size, s, particles=particles)
            for s in range(seeds.get(prob.name, 3))
        ]
        for metric in METRICS:
            got, ref = [c[metric] for c in cells], [f[metric] for f in fl]
            m, f = st.mean(got), st.mean(ref)
            rows.append(
                dict(problem=prob.name, metric=metric, mean=m, floor=f,
                     mean_se=st.stdev(got) / math.sqrt(len(got)) if len(got) > 1 else 0.0,
                     floor_se=st.stdev(ref) / math.sqrt(len(ref)),
                     ratio=m / f if f > 0 else (1.0 if m <= ZERO else math.inf),
                     passed=m <= ratio * f + ZERO, seeds=len(got), draws=draws, n=size,
                     particles=particles, nfe=cells[0]["nfe"])
            )  # fmt: skip
            log(str({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}))
    return rows


def check_table(rows: list[dict], ratio: float = 1.5) -> str:
    """A markdown table of :func:`particle_check`'s rows."""
    r0 = rows[0]
    lines = [
        f"<!-- written by diffuse_engine.testbed.inverse.particle_check: smc K = "
        f"{r0['particles']}, {r0['nfe']} evaluations per particle -->",
        "| problem | metric | smc mean (se) | floor mean (se) | ratio | within "
        f"{ratio}x | seeds / floor draws | n |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rat = "-" if r["floor"] <= ZERO and r["mean"] <= ZERO else f"{r['ratio']:.2f}"
        mean = f"{r['mean']:.4f}" if r["mean"] == 0 or r["mean"] > ZERO else f"{r['mean']:.0e}"
        lines.append(
            f"| {r['problem']} | {r['metric']} | {mean} ({r['mean_se']:.4f}) | "
            f"{r['floor']:.4f} ({r['floor_se']:.4f}) | {rat} | {'yes' if r['passed'] else '**no**'}"
            f" | {r['seeds']} / {r['draws']} | {r['n']} |"
        )
    return "\n".join(lines) + "\n"


def report(cells: list[dict], floors: dict[str, dict], n: int) -> str:
    """The markdown tables of every metric."""
    parts = [f"<!-- written by diffuse_engine.testbed.inverse, n = {n} (ring: {2 * n}) -->"]
    for metric in METRICS:
        parts += [f"\n#### {metric}\n", table(cells, floors, metric)]
    return "\n".join(parts) + "\n"


def cli_bench(engine, out, n: int, budgets: list[int], seed: int, log) -> None:
    """``diffuse bench --inverse``: :func:`sweep` into ``out`` (``inverse.jsonl`` and
    ``inverse.md``)."""
    from pathlib import Path

    from diffuse_engine.output.files import FolderLock, make_folder

    out = Path(out or f"runs/bench-inverse-{time.strftime('%Y%m%d-%H%M%S')}")
    lock = FolderLock(out).acquire()
    make_folder(out)
    results = out / "inverse.jsonl"
    results.unlink(missing_ok=True)
    cells, floors = sweep(engine, budgets=tuple(budgets), n=n, seed=seed, results=results, log=log)
    (out / "inverse.md").write_text(report(cells, floors, n))
    lock.release()
    log(f"wrote {out / 'inverse.md'}")
