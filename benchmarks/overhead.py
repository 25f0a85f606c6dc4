"""Engine overhead with a trivial score: ``Engine.sample`` against hand-written loops.

    python benchmarks/overhead.py              # pc, ode, ddim, dpm_solver_pp_ring; 100, 10 000
    python benchmarks/overhead.py --solvers ddim --batches 100 --repeats 5 --no-doc

The score is ``-x``, the exact score of ``N(0, I)`` data under the VP SDE at every
``t`` (a closed form costing one tensor op), so almost all of a step's time is the
sampler's own work. Each solver runs 1000 steps on the VP SDE from the registry entry
(``pc``: Langevin corrector + reverse-diffusion predictor, uniform times; ``ode``: RK4,
uniform; ``ddim``: eta = 0, quadratic; ``dpm_solver_pp_ring``: DPM-Solver++(2M),
quadratic, ``eps = 3e-3``, which was ``dpm_solver_pp`` before issue 16 made that entry 3M
on log-SNR steps), each with its final Tweedie step.

Each hand-written loop is what a careful user writes for that sampler from the papers:
the VP closed forms as Python floats, one ``t`` tensor per distinct time, and the same
tensor operations, in the same order, as the engine's solver, so the ratio measures the
engine's own Python work (the loop's and the engine's samples are compared, to
round-off, before timing). Runs come in pairs whose order alternates (engine-loop,
loop-engine, ...: the second run of a pair finds the caches the first left) in one
process, one intra-op thread, process CPU time (other jobs on a shared machine do not
inflate it), glibc's page-fault churn off
(:func:`~diffuse_engine.core.allocator.keep_freed_memory`); the ratio is fastest over
fastest, and the paired ratio the median (with quartiles) of each pair's ratio, which a
machine whose speed drifts disturbs less. ``extra us/step`` is (engine - loop) /
steps: what the engine's Python costs per step, including its once-per-call set-up
(resolving and validating the entries, the memory check, the time grid) spread over
the steps.

A control row times two equivalent hand-written DDIM loops against each other (the same
tensor operations, one with its coefficients in a table made before the loop): what the
ratio reads for code whose tensor work is identical, the resolution of this measurement.

Writes the table into docs/benchmarks.md ("Engine overhead") and the summary into
docs/sampling.md ("Overhead"), between markers.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from doc_section import replace_section

from diffuse_engine import Engine
from diffuse_engine.core.allocator import keep_freed_memory
from diffuse_engine.core.distributed import shard_seed

ROOT = Path(__file__).resolve().parents[1]
BENCH_DOC, SAMPLING_DOC = ROOT / "docs" / "benchmarks.md", ROOT / "docs" / "sampling.md"
BEGIN, END = "<!-- overhead-trivial:begin -->", "<!-- overhead-trivial:end -->"
SUMMARY_BEGIN, SUMMARY_END = "<!-- overhead-summary:begin -->", "<!-- overhead-summary:end -->"
SOLVERS = ("pc", "ode", "ddim", "dpm_solver_pp_ring")
#: the row of two equivalent hand-written DDIM loops (:func:`measure_control`)
CONTROL = "control: ddim loop, table"
#: VP SDE of the default registry (beta_min, beta_max), checked against the built SDE
BETA_MIN, BETA_MAX = 0.1, 20.0
#: largest |engine - loop| sample difference accepted as "the same math" (float32
#: round-off over 1000 steps of O(1) values; a different update is off by O(0.1))
SAME_MATH = 1e-4


def trivial_score(x, t):
    """The exact score of N(0, I) data under the VP SDE: ``p_t = N(0, I)`` for all t."""
    return -x


def check_score(x, t):
    """A time-dependent score for checking that loop and engine make the same updates
    (under ``-x`` the probability-flow ODE does not move, so it would not tell)."""
    return x * (t[:, None] - 2.0)


# ---- the VP closed forms a user writes down ------------------------------------------
def log_mean_coeff(t: float) -> float:
    """``log a(t) = -1/4 t^2 (b1 - b0) - 1/2 t b0`` (Song et al. 2021, eq. 33)."""
    return -0.25 * t * t * (BETA_MAX - BETA_MIN) - 0.5 * t * BETA_MIN


def kernel(t: float) -> tuple[float, float]:
    """``(a(t), s(t))`` of the VP kernel ``x_t = a x_0 + s z``, ``s^2 = 1 - a^2``."""
    lm = log_mean_coeff(t)
    return math.exp(lm), math.sqrt(-math.expm1(2 * lm))


def uniform_times(steps: int, eps: float) -> list[float]:
    return [1.0 + (eps - 1.0) * i / steps for i in range(steps + 1)]


def quadratic_times(steps: int, eps: float) -> list[float]:
    ts = [eps + (1.0 - eps) * (1 - i / steps) ** 2 for i in range(steps + 1)]
    ts[0], ts[-1] = 1.0, eps
    return ts


def full(x, t: float):
    return torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)


def tweedie(score, x, t: float):
    """Final denoising step ``(x + s^2 score) / a`` at ``t``."""
    a, s = kernel(t)
    return (x + s * s * score(x, full(x, t))) / a


# ---- the hand-written samplers --------------------------------------------------------
def hand_pc(score, x, steps: int, eps: float, snr: float, gen):
    """PC sampling (Song et al. 2021, Alg. 1): Langevin corrector with the step from the
    target snr (Alg. 4), then reverse diffusion with the DDPM discretisation
    ``beta_i = 1 - (a(t_next) / a(t))^2``: ``x (2 - sqrt(1 - beta)) + beta s + sqrt(beta) z``."""
    ts = uniform_times(steps, eps)
    for i in range(steps):
        tt = full(x, ts[i])
        grad = score(x, tt)
        z = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        gn = torch.linalg.vector_norm(grad.flatten(1), dim=1).mean()
        zn = torch.linalg.vector_norm(z.flatten(1), dim=1).mean()
        step = 2 * (snr * zn / gn) ** 2
        x = x + step * grad
        x = x + (2 * step).sqrt() * z
        beta = -math.expm1(2 * (log_mean_coeff(ts[i]) - log_mean_coeff(ts[i + 1])))
        x = torch.add(x * (2.0 - math.sqrt(1.0 - beta)), score(x, tt), alpha=beta)
        z = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        x = torch.add(x, z, alpha=math.sqrt(beta))
    return tweedie(score, x, ts[-1])


def hand_rk4(score, x, steps: int, eps: float):
    """Classic RK4 on the probability-flow ODE ``dx/dt = -1/2 beta(t) (x + score)``."""
    ts = uniform_times(steps, eps)

    def f(x, tt, t):
        beta = BETA_MIN + t * (BETA_MAX - BETA_MIN)
        return torch.add(x * (-0.5 * beta), score(x, tt), alpha=-0.5 * beta)

    t_now = full(x, ts[0])
    for i in range(steps):
        t, h = ts[i], ts[i + 1] - ts[i]
        mid = t + 0.5 * h
        t_mid, t_next = full(x, mid), full(x, ts[i + 1])
        k1 = f(x, t_now, t)
        k2 = f(torch.add(x, k1, alpha=0.5 * h), t_mid, mid)
        k3 = f(torch.add(x, k2, alpha=0.5 * h), t_mid, mid)
        k4 = f(torch.add(x, k3, alpha=h), t_next, ts[i + 1])
        x = torch.add(x, torch.add(k1, k4).add_(torch.add(k2, k3), alpha=2.0), alpha=h / 6)
        t_now = t_next
    return tweedie(score, x, ts[-1])


def hand_ddim(score, x, steps: int, eps: float):
    """Deterministic DDIM (Song, Meng & Ermon 2021, eq. 12): ``x0`` by Tweedie's formula,
    ``eps_hat = (x - a x0) / s``, ``x_next = a_next x0 + s_next eps_hat``."""
    ts = quadratic_times(steps, eps)
    for i in range(steps):
        (a, s), (a_n, s_n) = kernel(ts[i]), kernel(ts[i + 1])
        x0 = (x + (s * s) * score(x, full(x, ts[i]))) / a
        e = (x - a * x0) / s
        x = a_n * x0 + s_n * e
    return tweedie(score, x, ts[-1])


def hand_ddim_table(score, x, steps: int, eps: float):
    """The control: :func:`hand_ddim`'s tensor operations, in the same order, with the
    step coefficients looked up in a table made before the loop instead of computed in
    it. Its time over :func:`hand_ddim`'s shows how far the measurement moves for code
    whose tensor work is identical (the allocation pattern, where the buffers land)."""
    ts = quadratic_times(steps, eps)
    table = [(*kernel(ts[i]), *kernel(ts[i + 1])) for i in range(steps)]
    for i, (a, s, a_n, s_n) in enumerate(table):
        x0 = (x + (s * s) * score(x, full(x, ts[i]))) / a
        e = (x - a * x0) / s
        x = a_n * x0 + s_n * e
    return tweedie(score, x, ts[-1])


def hand_dpmpp_2m(score, x, steps: int, eps: float):
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2) as the authors' reference code writes
    the second-order multistep update (``dpm_solver_pytorch.py``, "dpmsolver")."""
    ts = quadratic_times(steps, eps)
    coef = [kernel(t) for t in ts]
    lam = [math.log(a / s) for a, s in coef]

    def data(x, i):
        a, s = coef[i]
        return (x + (s * s) * score(x, full(x, ts[i]))) / a

    m0, prev = data(x, 0), None
    for i in range(steps):
        (_, s), (a_n, s_n) = coef[i], coef[i + 1]
        h = lam[i + 1] - lam[i]
        phi1 = math.expm1(-h)
        x = x * (s_n / s) - (a_n * phi1) * m0
        if prev is not None:
            r0 = (lam[i] - lam[i - 1]) / h
            x = x - (0.5 * a_n * phi1) * ((m0 - prev) / r0)
        if i + 1 < steps:
            prev, m0 = m0, data(x, i + 1)
    return tweedie(score, x, ts[-1])


def hand(name: str, score, solver, x, steps: int, eps: float, gen):
    """The hand-written loop of ``name`` (the engine's ``solver`` gives only its snr)."""
    if name == "pc":
        return hand_pc(score, x, steps, eps, solver.config.snr, gen)
    if name == "ode":
        return hand_rk4(score, x, steps, eps)
    if name == "ddim":
        return hand_ddim(score, x, steps, eps)
    if name == "dpm_solver_pp_ring":
        return hand_dpmpp_2m(score, x, steps, eps)
    raise SystemExit(f"no hand-written loop for {name!r}; choices: {', '.join(SOLVERS)}")


# ---- timing ---------------------------------------------------------------------------
def measure(engine, name: str, batch: int, steps: int, repeats: int, seed: int = 0) -> dict:
    """Fastest engine and loop times of ``repeats`` alternating runs (process CPU time)."""
    sde = engine.build("sde", "vp")
    if (sde.config.beta_min, sde.config.beta_max) != (BETA_MIN, BETA_MAX):
        raise SystemExit(f"the vp entry changed: {sde.config}; update BETA_MIN/BETA_MAX")
    solver = engine.build("solver", name, steps=steps)
    eps = solver.eps(sde)
    kw = dict(score=trivial_score, sde="vp", solver=name, shape=(batch, 2), seed=seed)

    def loop(score=trivial_score):
        gen = torch.Generator().manual_seed(shard_seed(seed, 0))  # the engine's shard 0
        x = sde.prior_sample((batch, 2), generator=gen)
        with torch.no_grad():
            return hand(name, score, solver, x, steps, eps, gen)

    same = {**kw, "score": check_score}
    diff = (engine.sample(**same, steps=steps) - loop(check_score)).abs().max().item()
    if not diff <= SAME_MATH:
        raise SystemExit(f"{name}: the hand loop differs from the engine by {diff:.2e}")
    t_engine, t_loop = alternate(lambda: engine.sample(**kw, steps=steps), loop, repeats)
    return _row(name, steps, batch, diff, t_engine, t_loop)


def alternate(first, second, repeats: int) -> tuple[list[float], list[float]]:
    """Process CPU times of ``repeats`` runs of each, in pairs whose order alternates
    (first-second, second-first, ...): the run after the other one finds the caches and
    the allocator as that one left them, so a fixed order would bias the ratio."""
    times: tuple[list[float], list[float]] = ([], [])
    for r in range(repeats):
        for k in (0, 1) if r % 2 == 0 else (1, 0):
            start = time.process_time()
            (first, second)[k]()
            times[k].append(time.process_time() - start)
    return times


def measure_control(engine, batch: int, steps: int, repeats: int, seed: int = 0) -> dict:
    """:func:`hand_ddim_table` (in the engine's columns) against :func:`hand_ddim`,
    alternating as :func:`measure` does: the ratio two equivalent loops give."""
    sde = engine.build("sde", "vp")
    eps = engine.build("solver", "ddim", steps=steps).eps(sde)

    def run(loop, score=trivial_score):
        gen = torch.Generator().manual_seed(shard_seed(seed, 0))
        x = sde.prior_sample((batch, 2), generator=gen)
        with torch.no_grad():
            return loop(score, x, steps, eps)

    diff = (run(hand_ddim_table, check_score) - run(hand_ddim, check_score)).abs().max().item()
    t_control, t_loop = alternate(lambda: run(hand_ddim_table), lambda: run(hand_ddim), repeats)
    return _row(CONTROL, steps, batch, diff, t_control, t_loop)


def _row(name, steps, batch, diff, t_engine, t_loop) -> dict:
    """Fastest over fastest, and the median with quartiles of each pair's ratio (the
    two runs of a pair are adjacent in time, so a machine's drift cancels in it)."""
    e, h = min(t_engine), min(t_loop)
    paired = statistics.quantiles([a / b for a, b in zip(t_engine, t_loop, strict=True)], n=4)
    return {
        "solver": name,
        "steps": steps,
        "batch": batch,
        "engine_ms": 1e3 * e,
        "loop_ms": 1e3 * h,
        "ratio": e / h,
        "paired_ratio": paired[1],
        "paired_quartiles": [paired[0], paired[2]],
        "extra_us_per_step": 1e6 * (e - h) / steps,
        "max_sample_difference": diff,
        "engine_runs_ms": [1e3 * v for v in t_engine],
        "loop_runs_ms": [1e3 * v for v in t_loop],
    }


def _line(row: dict) -> str:
    return (
        f"{row['solver']:14s} batch {row['batch']:6d}: engine {row['engine_ms']:7.1f} ms, "
        f"loop {row['loop_ms']:7.1f} ms, ratio {row['ratio']:.3f} "
        f"(paired {row['paired_ratio']:.3f}), "
        f"{row['extra_us_per_step']:+.2f} us/step"
    )


def table(rows: list[dict]) -> str:
    lines = [
        "| solver | steps | batch | engine ms | loop ms | ratio | paired ratio [quartiles] "
        "| extra us/step | max sample difference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['solver']} | {r['steps']} | {r['batch']} | {r['engine_ms']:.1f} | "
            f"{r['loop_ms']:.1f} | {r['ratio']:.3f} | {r['paired_ratio']:.3f} "
            f"[{r['paired_quartiles'][0]:.3f}, {r['paired_quartiles'][1]:.3f}] | "
            f"{r['extra_us_per_step']:.2f} | "
            f"{r['max_sample_difference']:.1e} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict], target: float) -> str:
    """The docs/sampling.md bullet: ratios per batch, and whether each meets ``target``."""
    by_batch: dict[int, list[dict]] = {}
    controls = {r["batch"]: r for r in rows if r["solver"] == CONTROL}
    for r in rows:
        if r["solver"] != CONTROL:
            by_batch.setdefault(r["batch"], []).append(r)
    parts = []
    for b, rs in sorted(by_batch.items()):
        worst = max(rs, key=lambda r: r["ratio"])
        met = "met" if worst["ratio"] <= target else "not met"
        ratios = ", ".join(f"`{r['solver']}` {r['ratio']:.3f}" for r in rs)
        control = (
            f"; two equivalent hand loops: {controls[b]['ratio']:.3f}" if b in controls else ""
        )
        parts.append(
            f"batch {b}: {met} ({ratios}; worst {worst['extra_us_per_step']:.2f} us/step{control})"
        )
    return (
        f"- **Overhead, trivial score (target <= {target} at 1000 steps):** "
        + "; ".join(parts)
        + ". Engine over a hand-written loop making the same tensor operations, "
        "score `-x` ([`benchmarks/overhead.py`](../benchmarks/overhead.py); table in "
        "[`benchmarks.md`](benchmarks.md#engine-overhead))."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--solvers", default=",".join(SOLVERS))
    ap.add_argument("--batches", default="100,10000")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--target", type=float, default=1.05)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--no-doc", action="store_true", help="print only")
    ap.add_argument("--no-control", action="store_true", help="skip the two-loop control row")
    a = ap.parse_args()
    if a.repeats < 2:
        ap.error(f"--repeats must be at least 2 (the paired quartiles need two), not {a.repeats}")
    torch.set_num_threads(1)
    kept = keep_freed_memory()
    engine = Engine()
    rows = []
    for batch in (int(b) for b in a.batches.split(",")):
        for name in a.solvers.split(","):
            row = measure(engine, name, batch, a.steps, a.repeats)
            rows.append(row)
            print(_line(row), flush=True)
        if not a.no_control:
            rows.append(measure_control(engine, batch, a.steps, a.repeats))
            print(_line(rows[-1]), flush=True)
    body = table(rows)
    print(body)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    if a.no_doc:
        return
    note = (
        f"Trivial score (`-x`, the exact VP score of N(0, I) data), VP SDE, "
        f"{a.repeats} runs each in pairs of alternating order, fastest of each (ratio) and "
        "the median and quartiles of each pair's ratio (paired), process CPU time, one "
        f"thread, {'freed memory kept' if kept else 'default allocator'}; the loops make "
        "the same tensor operations as the engine's solvers (`benchmarks/overhead.py`, "
        "which writes this table). Target: ratio <= 1.05 at batch 100 and 10 000."
    )
    head = "### Trivial score: the engine's own Python per step"
    replace_section(BENCH_DOC, BEGIN, END, f"\n{head}\n\n{note}\n\n{body}\n")
    replace_section(SAMPLING_DOC, SUMMARY_BEGIN, SUMMARY_END, summary(rows, a.target))


if __name__ == "__main__":
    main()
