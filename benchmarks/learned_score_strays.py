"""Benchmark: where a learned score's samples go wrong, ODE against SDE samplers.

Trains ``[train.default]`` on the training suite's 1:50 pair (modes at x = -2 and 2, std
0.3, weights 1:50; ``--seed`` picks the training seed), then samples ``--n`` points:

* with DPM-Solver++ 2M (the probability-flow ODE, 50 steps, the ring-tuned entry) and
  SDE-DPM-Solver++ 2M (``dpm_solver_pp_sde``) at 50 and 100 steps, scored with the
  per-mode metrics against the exact mixture, counting the small mode's samples beyond 4
  of its stds;
* with a hybrid score, exact for ``t > tau`` and learned below (DPM-Solver-1 in data
  prediction, 200 log-SNR steps, in the model's normalised coordinates), for a few
  ``tau``: where the strays disappear says at which times the learned score made them.

    flock /tmp/heavy.lock python benchmarks/learned_score_strays.py [--seed 0]

Prints a table; docs/sampling.md and docs/training.md quote its numbers.
"""

from __future__ import annotations

import argparse
import time

import torch

from diffuse_engine import Engine, mode_statistics
from diffuse_engine.components.mixture import GaussianMixture
from diffuse_engine.components.schedules import time_from_log_snr

PAIR = dict(
    layout="explicit", means=[[-2.0, 0.0], [2.0, 0.0]], stds=[0.3, 0.3], weights=[1.0, 50.0]
)
SOLVERS = [
    ("ODE: dpm_solver_pp_ring, 50 steps", "dpm_solver_pp_ring", {"steps": 50}),
    ("SDE: dpm_solver_pp_sde, 50 steps", "dpm_solver_pp_sde", {"steps": 50}),
    ("SDE: dpm_solver_pp_sde, 100 steps", "dpm_solver_pp_sde", {"steps": 99}),
]


def small_mode(x, mix) -> tuple[float, int, int]:
    """``(relative std error of the small mode, its samples beyond 4 stds, its count)``."""
    st = mode_statistics(x, mix)
    xs = x[mix.assign(x.double()) == 0]
    far = ((xs.double() - mix.means[0]) / mix.std_matrix[0]).norm(dim=1) > 4
    return st["modes"]["std_error"][0], int(far.sum()), len(xs)


@torch.no_grad()
def hybrid(model, sde, mix, n: int, tau: float, seed: int, steps: int = 200):
    """Samples with the exact score of the normalised mixture for ``t > tau`` and the
    learned one below; DPM-Solver-1 (DDIM) in data prediction on a log-SNR grid."""
    norm = model.normaliser
    mz = GaussianMixture(
        means=(mix.means - norm.mean.double()) / norm.scale.double(),
        stds=mix.std_matrix / norm.scale.double(),
        weights=mix.weights,
    )
    eps = 1e-3

    def lam(t: float) -> float:
        a, s = sde.marginal(torch.tensor(t, dtype=torch.float64))
        return float(torch.log(a / s))

    lams = torch.linspace(lam(sde.T), lam(eps), steps + 1).tolist()
    ts = time_from_log_snr(sde, lams, eps, sde.T)
    z = torch.randn(n, mix.dim, generator=torch.Generator().manual_seed(seed))

    def x0_hat(z, t):
        tt = torch.full((n,), t)
        a, s = (v[:, None] for v in sde.marginal(tt))
        if t > tau:
            sc = mz.score(z.double(), a[:, 0].double(), s[:, 0].double()).float()
        else:
            sc = model(z, tt)
        return (z + s**2 * sc) / a

    for t0, t1 in zip(ts[:-1], ts[1:], strict=True):
        a1, s1 = (float(v) for v in sde.marginal(torch.tensor(t1)))
        a0, s0 = (float(v) for v in sde.marginal(torch.tensor(t0)))
        x0 = x0_hat(z, t0)
        z = a1 * x0 + s1 * (z - a0 * x0) / s0
    z = x0_hat(z, ts[-1])
    return norm.mean + norm.scale * z


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine()
    t0 = time.perf_counter()
    res = engine.training(
        data="gmm", seed=args.seed, plot_n=0, threads=args.threads,
        **{f"data.{k}": v for k, v in PAIR.items()},
    )  # fmt: skip
    print(f"trained {res.step} steps in {time.perf_counter() - t0:.0f} s (seed {args.seed})")
    mix = res.dataset.mixture
    rows = []
    for label, solver, kw in SOLVERS:
        x = engine.sample(score=res.model, sde="vp", solver=solver, shape=(args.n, 2), seed=0, **kw)
        rows.append((label, *small_mode(x, mix)))
    sde = engine.build("sde", "vp")
    for tau in (2.0, 0.5, 0.2, 0.05, 0.0):
        what = "learned" if tau >= sde.T else ("exact" if tau == 0 else f"exact for t > {tau}")
        x = hybrid(res.model, sde, mix, args.n, tau, seed=0)
        rows.append((f"hybrid ({what}), DDIM 200", *small_mode(x, mix)))
    floor = small_mode(mix.sample(args.n, torch.Generator().manual_seed(1)).float(), mix)
    rows.append(("exact samples (the floor)", *floor))
    print("| sampler | small mode: std error | beyond 4 stds | samples |")
    print("|---|---|---|---|")
    for label, err, far, count in rows:
        print(f"| {label} | {err:.3f} | {far} | {count} |")


if __name__ == "__main__":
    main()
