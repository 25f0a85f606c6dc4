"""The ``gits`` schedule: time steps fitted to the score by dynamic programming (issue 6).

* the DP finds the cheapest path (checked against brute force over every path);
* the teacher trajectory matches the closed-form probability-flow ODE of a Gaussian;
* grids are reproducible, end at ``T`` and ``eps``, and are fitted once per run (the
  pilot's evaluations are reported apart from the per-sample ``nfe``);
* the issue's 10-evaluation target on the 2-D ring is met by DPM-Solver++(2M) on it.
"""

from __future__ import annotations

import itertools
import math
from itertools import pairwise

import pytest
import torch

from diffuse_engine import DiffuseError, IncompatibleError
from diffuse_engine.components.gits import cheapest_path, teacher_trajectory
from diffuse_engine.components.mixture import mode_statistics
from diffuse_engine.components.schedules import time_grid


def test_cheapest_path_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    M, steps = 9, 4
    C = torch.rand(M + 1, M + 1, generator=g, dtype=torch.float64)
    C[torch.ones_like(C, dtype=torch.bool).tril()] = math.inf
    best = min(
        (sum(float(C[p, q]) for p, q in zip((0, *mid), (*mid, M), strict=True)), (0, *mid, M))
        for mid in itertools.combinations(range(1, M), steps - 1)
    )
    path = cheapest_path(C, steps)
    assert tuple(path) == best[1]
    assert sum(float(C[p, q]) for p, q in pairwise(path)) == pytest.approx(best[0])


@pytest.mark.parametrize("sde", ("vp", "ve", "subvp"))
def test_teacher_follows_the_exact_gaussian_flow(engine, sde):
    """For data N(mu, s0^2) the probability-flow ODE is solved in closed form:
    ``x_t = a_t [mu + sqrt(s0^2 + sigma_t^2) / sqrt(s0^2 + sigma_T^2) (x_T / a_T - mu)]``
    with ``sigma = s / a``."""
    mu, s0 = 0.7, 0.3
    s = engine.build("sde", sde)

    def score(x, t):
        a, sd = s.marginal(t)
        return -(x - a[:, None] * mu) / (a[:, None] ** 2 * s0**2 + sd[:, None] ** 2)

    x_T = torch.linspace(-3, 3, 17, dtype=torch.float64)[:, None] * s.prior_std
    errors = []
    for n in (20, 40, 80):
        times = time_grid(s, n, s.sampling_eps, "logsnr")
        xs, _ = teacher_trajectory(score, s, x_T, times)
        a, sd = s.marginal(torch.tensor(times, dtype=torch.float64))
        sig = sd / a
        exact = a[n] * (
            mu
            + torch.sqrt(s0**2 + sig[n] ** 2) / torch.sqrt(s0**2 + sig[0] ** 2) * (x_T / a[0] - mu)
        )
        errors.append(float((xs[n] - exact).abs().max() / exact.abs().max()))
    # DPM-Solver++(2S) is second order: halving the log-SNR step quarters the error
    # (a wrong coefficient leaves first order, a ratio near 2); at the default fine grid
    # of 100 intervals it is well below the coarse steps' errors it is compared with
    for coarse, finer in pairwise(errors):
        assert 3.5 < coarse / finer < 4.5, errors
    assert errors[-1] < 5e-4, errors


def test_fitted_grid_is_reproducible_and_spans_the_interval(engine):
    sde = engine.build("sde", "vp")
    score = engine.build("score", "gmm", sde=sde)
    like = torch.empty(1, 2)
    grids = [
        engine.build(
            "solver", "dpm_solver_pp", steps=8, schedule="gits", fine=40, pilot=128
        ).time_grid(sde, score, like)
        for _ in range(2)
    ]
    assert grids[0] == grids[1]
    g = grids[0]
    eps = engine.build("solver", "dpm_solver_pp").eps(sde)
    assert len(g) == 9 and g[0] == sde.T and g[-1] == eps
    assert all(a > b for a, b in pairwise(g))


def test_fit_happens_once_per_run_and_is_counted_apart(engine):
    fine = 30
    r = engine.sampling(
        score="gmm",
        sde="vp",
        solver="dpm_solver_pp",
        shape=300,
        seed=0,
        steps=6,
        schedule="gits",
        fine=fine,
        pilot=64,
        shard_size=100,
        denoise=False,
    )
    # three shards share the fit: each shard's count is its 6 steps alone
    assert r.nfe == 6
    assert r.setup_nfe == 4 * fine + 1
    plain = engine.sampling(
        score="gmm", sde="vp", solver="dpm_solver_pp", shape=30, seed=0, steps=6, schedule="logsnr"
    )
    assert plain.setup_nfe == 0


def test_gits_needs_the_score_and_few_steps(engine):
    sde = engine.build("sde", "vp")
    with pytest.raises(IncompatibleError, match="gits"):
        engine.build("solver", "ddim", steps=5, schedule="gits").time_grid(sde)
    with pytest.raises(DiffuseError, match="at most 250 steps.*logsnr"):
        engine.sample(score="gmm", sde="vp", solver="ddim", shape=4, steps=300, schedule="gits")


def test_ten_evaluations_meet_the_issue_target_on_the_ring(engine):
    """Issue 6: at 10 score evaluations some sampler reaches std error <= 0.05 on the
    2-D ring at n = 50k. The statistical floor of the std error at this n is about
    0.01 (1 / sqrt(2 n_k) per coordinate with n_k >= 3k in the lightest mode), so 0.05
    is 4 floors above it; the log-SNR schedule measures about 0.07 here and fails.
    DPM-Solver++ 2M as measured for issue 6: the ring-tuned entry's order (the registry's
    ``dpm_solver_pp`` is 3M since issue 16; 3M on this grid is not what was measured)."""
    r = engine.sampling(
        score="gmm",
        sde="vp",
        solver="dpm_solver_pp_ring",
        shape=50_000,
        seed=0,
        steps=10,
        eps=1e-3,
        denoise=False,
        schedule="gits",
    )
    assert r.nfe == 10
    st = mode_statistics(r.samples, r.score.mixture)
    assert st["std_error"] <= 0.05, st["std_error"]
    # every mode keeps its mass: weight TV within 5x its floor sqrt(K / (2 pi n)) ~ 0.005
    assert st["weight_tv"] <= 0.025, st["weight_tv"]


def test_step_costs_do_not_depend_on_chunking():
    from diffuse_engine.components.gits import step_costs

    g = torch.Generator().manual_seed(2)
    M, n = 6, 5
    xs = [torch.randn(n, 3, generator=g) for _ in range(M + 1)]
    ds = [torch.randn(n, 3, generator=g) for _ in range(M + 1)]
    a = [0.1 + 0.15 * k for k in range(M + 1)]
    s = [1.0 - 0.1 * k for k in range(M + 1)]
    lam = [math.log(p / q) for p, q in zip(a, s, strict=True)]
    whole, one_by_one = step_costs(xs, ds, a, s, lam), step_costs(xs, ds, a, s, lam, 1)
    assert torch.equal(whole.isinf(), one_by_one.isinf())
    finite = whole.isfinite()
    assert torch.allclose(whole[finite], one_by_one[finite], rtol=1e-6)


@pytest.mark.parametrize("sde", ("vp", "ve"))
def test_step_costs_are_the_local_error_of_a_ddim_step(engine, sde):
    """On the exact flow of Gaussian data (closed form, as above) the cost of one step of
    log-SNR length ``h`` is DDIM's local error, ``O(h^2)``: doubling ``h`` multiplies it
    by 4 (a cost that did not compare against the teacher's states would not grow so)."""
    from diffuse_engine.components.gits import step_costs
    from diffuse_engine.components.schedules import kernel_coefficients

    mu, s0 = 0.7, 0.3
    s = engine.build("sde", sde)
    times = time_grid(s, 400, s.sampling_eps, "logsnr")
    a, sd, lam = kernel_coefficients(s, times)
    x_T = torch.linspace(-3, 3, 17, dtype=torch.float64)[:, None] * s.prior_std
    sig = [q / p for p, q in zip(a, sd, strict=True)]
    xs = [
        a[k] * (mu + math.sqrt((s0**2 + sig[k] ** 2) / (s0**2 + sig[0] ** 2)) * (x_T / a[0] - mu))
        for k in range(len(times))
    ]
    # Tweedie's data prediction of the Gaussian: the posterior mean of x0 given x_t
    ds = [mu + s0**2 / (s0**2 + sig[k] ** 2) * (xs[k] / a[k] - mu) for k in range(len(times))]
    C = step_costs(xs, ds, a, sd, lam)
    i = 200  # the middle of the log-SNR range, where the flow bends
    costs = [float(C[i, i + k]) for k in (2, 4, 8)]
    for short, long in pairwise(costs):
        assert 3.4 < long / short < 4.6, costs
