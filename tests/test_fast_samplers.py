"""Time-step schedules and the kernel-based fast samplers (issue 6).

* schedules: end points, monotonicity, the spacing each promises, on every built-in SDE;
  the default stays uniform in t.
* convergence order on a single Gaussian, whose probability-flow ODE is solved exactly:
  with ``sigma = s / a`` the ODE maps ``x_T`` to ``a(t) [mu + sqrt(s0^2 + sigma_t^2) /
  sqrt(s0^2 + sigma_T^2) (x_T / a_T - mu)]``. The error slope against the step count is
  fitted as in diffrax's order tests.
* recovery of the exact 2-D ring mixture at a modest number of score evaluations, with
  bounds from the sample size (see ``summary_bounds``).
"""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from conftest import assert_recovers
from typer.testing import CliRunner

from diffuse_engine import SDE, IncompatibleError, RegistryError, module_plugin
from diffuse_engine.components.schedules import SCHEDULES, log_snr, time_grid

SDES = ("vp", "ve", "subvp", "ddpm")


# ---------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sde", SDES)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_grid_shape(engine, sde, schedule):
    s = engine.build("sde", sde)
    grid = time_grid(s, 17, s.sampling_eps, schedule)
    assert len(grid) == 18
    assert grid[0] == s.T and grid[-1] == pytest.approx(s.sampling_eps, rel=1e-12)
    assert all(a > b for a, b in pairwise(grid))


@pytest.mark.parametrize("sde", SDES)
def test_logsnr_and_karras_spacing(engine, sde):
    s = engine.build("sde", sde)
    eps = s.sampling_eps
    lam = log_snr(s, time_grid(s, 12, eps, "logsnr"))
    steps = [b - a for a, b in pairwise(lam)]
    # bisection to float64 resolution: spacing uniform to round-off of lambda
    assert max(steps) - min(steps) < 1e-8
    rho = 7.0
    sig = [math.exp(-v / rho) for v in log_snr(s, time_grid(s, 12, eps, "karras", rho))]
    d = [b - a for a, b in pairwise(sig)]
    assert max(d) - min(d) < 1e-8 * abs(sig[0])


SDE_CONFIGS = [
    ("vp", {}),
    ("vp", {"beta_min": 0.5, "beta_max": 12.0}),
    ("subvp", {}),
    ("ve", {}),
    ("ve", {"sigma_min": 0.002, "sigma_max": 80.0}),
]


@pytest.mark.parametrize("sde,kw", SDE_CONFIGS)
def test_closed_form_log_snr_inverse_is_the_bisection(engine, sde, kw):
    """VP, sub-VP and VE invert lambda(t) in closed form (``SDE.time_of_log_snr``); the
    schedules' times equal the bisection's to float64 round-off (the bisection halves
    ``[eps, T]`` 64 times: exact to about 1e-16), targets beyond either end included."""
    from diffuse_engine.components.schedules import bisect_time, time_from_log_snr

    s = engine.build("sde", sde, **kw)
    eps = s.sampling_eps
    lam_T, lam_eps = log_snr(s, [s.T, eps])
    lams = torch.linspace(lam_T - 3, lam_eps + 3, 1001, dtype=torch.float64)
    closed = torch.tensor(time_from_log_snr(s, lams.tolist(), eps, s.T), dtype=torch.float64)
    assert torch.equal(closed, s.time_of_log_snr(lams).clamp(eps, s.T))  # the closed form
    assert (closed - bisect_time(s, lams, eps, s.T)).abs().max() < 1e-14
    inside = (lams > lam_T) & (lams < lam_eps)
    back = s.log_snr(closed[inside])
    assert torch.allclose(back, lams[inside], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sde", ("vp", "subvp"))
def test_closed_form_log_snr_inverse_keeps_its_digits_at_both_ends(engine, sde):
    """``time_of_log_snr(log_snr(t))`` gives ``t`` back to float64 round-off from ``t =
    1e-9`` (a small ``eps``, ``lambda`` near 21 for sub-VP) to ``T``, and stays finite
    for ``lambda`` far beyond either end (``+-800``: ``exp(lambda)`` overflows there).
    Near small ``t``, ``lambda ~ -log t``, so ``lambda``'s round-off (about 1e-16 of
    20) moves ``t`` by about 20 times that, relatively: measured 3.3e-15 on both, and
    1e-13 leaves a margin of 30. Sub-VP's earlier ``u = 2 e^l / (1 + sqrt(1 + 4 e^2l))``
    form cancelled where ``u`` is near 1 (7.7e-7 at ``t = 1e-9``, 1e-8 at ``1e-7``) and
    gave NaN from ``lambda = 356``."""
    s = engine.build("sde", sde)
    t = torch.logspace(-9, 0, 400, dtype=torch.float64)
    back = s.time_of_log_snr(s.log_snr(t))
    assert ((back - t).abs() / t).max() < 1e-13
    far = s.time_of_log_snr(torch.tensor([-800.0, 800.0], dtype=torch.float64))
    assert bool(torch.isfinite(far).all()) and far[0] > s.T and far[1] < 1e-300, far


def test_an_inherited_inverse_that_no_longer_fits_falls_back_to_bisection(engine):
    """A subclass that changes the kernel but keeps its parent's ``time_of_log_snr``
    gets the bisection's times, not the parent's wrong ones."""
    from diffuse_engine.components.schedules import bisect_time, time_from_log_snr
    from diffuse_plugins.vp import VPSDE

    class WiderVP(VPSDE):
        name = "wider_vp"

        def marginal(self, t):
            a, s = super().marginal(t)
            return a, 1.15 * s

    s = WiderVP()
    lams = torch.linspace(-8.0, 5.0, 50, dtype=torch.float64)
    got = torch.tensor(time_from_log_snr(s, lams.tolist(), 1e-3, 1.0), dtype=torch.float64)
    assert torch.equal(got, bisect_time(s, lams, 1e-3, 1.0))
    assert (got - s.time_of_log_snr(lams).clamp(1e-3, 1.0)).abs().max() > 1e-3


def test_a_closed_form_inverse_off_by_more_than_round_off_falls_back_to_bisection():
    """The closed form is taken only where it is as good as the bisection (float64
    round-off of ``lambda``, about 1e-15 on VP, sub-VP and VE: see the tests above): an
    inverse off by 1e-10 of ``t`` (a ``lambda`` error of 6e-11 to 8e-10, which the
    earlier 1e-9 acceptance let through) gets the bisection's times."""
    from diffuse_engine.components.schedules import bisect_time, time_from_log_snr
    from diffuse_plugins.vp import VPSDE

    class RoughVP(VPSDE):
        name = "rough_vp"

        def time_of_log_snr(self, lam):
            return super().time_of_log_snr(lam) * (1 + 1e-10)

    s = RoughVP()
    lams = torch.linspace(-4.0, 4.0, 50, dtype=torch.float64)
    got = torch.tensor(time_from_log_snr(s, lams.tolist(), 1e-3, 1.0), dtype=torch.float64)
    assert torch.equal(got, bisect_time(s, lams, 1e-3, 1.0))


def test_default_schedule_is_uniform_in_t(engine):
    for name in ("pc", "ode"):
        solver = engine.build("solver", name, steps=10)
        s = engine.build("sde", "vp")
        assert solver.time_grid(s) == [1.0 + (1e-3 - 1.0) * i / 10 for i in range(11)]


def test_unknown_schedule_names_the_choices(engine):
    with pytest.raises(RegistryError, match="uniform.*quadratic.*logsnr.*karras"):
        engine.sample(score="gmm", sde="vp", solver="ode", shape=4, schedule="cosine")


def test_schedule_applies_to_pc_and_ode(engine):
    x = engine.sample(score="gmm", sde="ve", solver="ode", shape=64, steps=20, schedule="karras")
    assert torch.isfinite(x).all()


def test_kernel_solvers_refuse_an_sde_without_a_kernel():
    class NoKernel(SDE):
        """Linear drift, no closed-form kernel."""

        name = "nokernel"

        def drift_coeff(self, t):
            return -t

        def diffusion(self, t):
            return torch.ones_like(t)

    from diffuse_engine import Engine

    eng = Engine(plugins=[module_plugin(diffuse_register_sdes=lambda: [NoKernel])], autoload=False)
    with pytest.raises(IncompatibleError, match="nokernel"):
        eng.sample(score=lambda x, t: -x, sde="nokernel", solver="dpm_solver_pp", shape=(4, 2))


# ---------------------------------------------------------------------------------
# convergence order on a Gaussian
# ---------------------------------------------------------------------------------
MU, S0 = 0.7, 0.3


def _gaussian_error(engine, solver, sde, steps, **kw) -> float:
    s = engine.build("sde", sde)

    def score(x, t):
        a, sd = s.marginal(t)
        return -(x - a[:, None] * MU) / (a[:, None] ** 2 * S0**2 + sd[:, None] ** 2)

    x_T = torch.linspace(-3, 3, 33, dtype=torch.float64)[:, None] * s.prior_std
    obj = engine.build("solver", solver, steps=steps, denoise=False, **kw)
    obj.check(s)
    with torch.no_grad():
        out = obj.sample(score, s, x_T.clone())
    ts = torch.tensor([s.T, obj.eps(s)], dtype=torch.float64)
    a, sd = s.marginal(ts)
    sig = sd / a
    exact = a[1] * (
        MU + torch.sqrt(S0**2 + sig[1] ** 2) / torch.sqrt(S0**2 + sig[0] ** 2) * (x_T / a[0] - MU)
    )
    return float((out - exact).abs().max())


def _slope(errors, steps) -> float:
    """Least-squares slope of -log(error) against log(steps)."""
    xs = [math.log(n) for n in steps]
    ys = [-math.log(e) for e in errors]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


# (solver entry, overrides, expected order). UniC raises UniP-p to order p + 1.
ORDER_CASES = [
    ("ddim", {}, 1),
    ("dpm_solver", {"order": 2, "method": "singlestep", "prediction": "noise"}, 2),
    ("dpm_solver", {"order": 3, "method": "singlestep", "prediction": "noise"}, 3),
    ("dpm_solver", {"order": 2, "method": "multistep", "prediction": "data"}, 2),
    # multistep 3 on Karras steps from 80 (noise prediction reads 2.7-2.8 from 40, on
    # its way to 3): on uniform log-SNR steps this Gaussian's h^3 error term nearly
    # cancels and the slope reads 3.3-4; the reference's weight of the second
    # difference reads 2 on both (test_third_order_multistep_step_is_exact...)
    *(
        (
            "dpm_solver",
            {
                "order": 3,
                "method": "multistep",
                "prediction": p,
                "lower_order_final": False,
                "schedule": "karras",
                "step_counts": (80, 160, 320),
            },
            3,
        )
        for p in ("noise", "data")
    ),
    ("dpm_solver", {"order": 3, "method": "singlestep", "prediction": "data"}, 3),
    ("edm", {}, 2),
    ("unipc", {"order": 2, "lower_order_final": False}, 3),
    # UniPC-3 (the VE-20 table entry's solver) on Karras steps: UniC makes it 4
    ("unipc", {"order": 3, "lower_order_final": False, "schedule": "karras"}, 4),
    ("ipndm", {"order": 1}, 1),
    ("ipndm", {"order": 2}, 2),
    # iPNDM's equal-step weights on uneven steps: the ratio of neighbouring steps
    # (1 + O(h) on a log-SNR grid) leaves an O(h^3) local error, so order 4 is second
    # order (measured 1.96-2.09, and 1.9-2.1 for order 3)
    ("ipndm", {"order": 4}, 2),
    # the variable-step weights keep the order (3.4-3.7 from 40 steps, on its way)
    ("ipndm", {"order": 3, "coefficients": "variable", "step_counts": (80, 160, 320)}, 3),
    ("ipndm", {"order": 4, "coefficients": "variable", "step_counts": (80, 160, 320)}, 4),
]


@pytest.mark.parametrize("sde", ("vp", "ve", "subvp", "ddpm"))
@pytest.mark.parametrize(
    "solver,kw,order", ORDER_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(ORDER_CASES)]
)
def test_convergence_order(engine, sde, solver, kw, order):
    kw = {"schedule": "logsnr", **kw}
    steps = kw.pop("step_counts", (40, 80, 160))
    errors = [_gaussian_error(engine, solver, sde, n, **kw) for n in steps]
    slope = _slope(errors, steps)
    # asymptotic regime: the fitted order is within 0.3 of the method's order (a lost
    # order shows as a slope near order - 1; round-off is far below these errors)
    assert abs(slope - order) < 0.3, (errors, slope)


# the prediction's coefficients in lambda: c0 + c1 lambda + c2 lambda^2, per coordinate
QUAD = torch.tensor([[0.3, -0.2], [0.05, 0.1], [0.01, -0.004]], dtype=torch.float64)


@pytest.mark.parametrize("schedule", ("logsnr", "karras"))
@pytest.mark.parametrize("third_order", ("taylor", "reference"))
@pytest.mark.parametrize("sde", ("vp", "ve", "subvp"))
@pytest.mark.parametrize("prediction", ("data", "noise"))
def test_third_order_multistep_step_is_exact_for_a_quadratic_prediction(
    engine, sde, prediction, third_order, schedule
):
    """DPM-Solver(++) 3M interpolates the last three predictions by a quadratic in
    lambda, so when the prediction *is* a quadratic in lambda (and independent of x) each
    order-3 step solves the ODE exactly, on uniform log-SNR steps and on Karras steps,
    whose log-SNR steps differ (``r0, r1 != 1``: the variable-step differences). Data
    prediction: ``x_t = (s_t/s_s) x_s + s_t [e^l (c0 + c1 (l - 1) + c2 (l^2 - 2l +
    2))]_s^t``; noise prediction: ``x_t = (a_t/a_s) x_s + a_t [e^-l (c0 + c1 (l + 1) +
    c2 (l^2 + 2l + 2))]_s^t``. The reference's weight of the second difference (half the
    Taylor term, ``third_order = "reference"``) errs here by ``O(h^3) c2``, measured 6e-5
    to 5e-2 of the step's change; round-off is about 1e-13 (3e-11 at worst, VE noise
    prediction on quadratic steps), so 1e-9 tells the two apart."""
    s = engine.build("sde", sde)
    c0, c1, c2 = QUAD

    def lam_of(t):
        a, sd = s.marginal(torch.as_tensor(t, dtype=torch.float64).reshape(1))
        return float(torch.log(a / sd)), float(a), float(sd)

    def score(x, t):
        a, sd = s.marginal(t)
        lam = torch.log(a / sd)[:, None]
        pred = c0 + c1 * lam + c2 * lam**2
        if prediction == "data":
            return (a[:, None] * pred - x) / sd[:, None] ** 2
        return -pred / sd[:, None]

    def antiderivative(lam):
        if prediction == "data":
            return math.exp(lam) * (c0 + c1 * (lam - 1) + c2 * (lam**2 - 2 * lam + 2))
        return -math.exp(-lam) * (c0 + c1 * (lam + 1) + c2 * (lam**2 + 2 * lam + 2))

    states = []

    def record(x, i, t):
        states.append((t, x.clone()))
        return x

    obj = engine.build(
        "solver",
        "dpm_solver",
        steps=12,
        order=3,
        method="multistep",
        prediction=prediction,
        schedule=schedule,
        denoise=False,
        lower_order_final=False,
        third_order=third_order,
    )
    x_T = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        obj.sample(score, s, x_T * s.prior_std, transform=record)
    states.insert(0, (s.T, x_T * s.prior_std))
    h = [lam_of(t)[0] - lam_of(t_prev)[0] for (t_prev, _), (t, _) in pairwise(states)]
    if schedule == "karras":  # the steps in lambda really vary (measured 3.0x to 5.8x)
        assert max(h) > 1.5 * min(h), h
    worst = 0.0
    for (t_s, x_s), (t_t, x_t) in list(pairwise(states))[2:]:  # steps 3.. are order 3
        (l_s, a_s, s_s), (l_t, a_t, s_t) = lam_of(t_s), lam_of(t_t)
        if prediction == "data":
            exact = (s_t / s_s) * x_s + s_t * (antiderivative(l_t) - antiderivative(l_s))
        else:
            exact = (a_t / a_s) * x_s - a_t * (antiderivative(l_t) - antiderivative(l_s))
        change = float((exact - x_s).abs().max())
        worst = max(worst, float((x_t - exact).abs().max()) / change)
    if third_order == "taylor":
        assert worst < 1e-9, worst
    else:
        assert worst > 1e-5, worst


# ---------------------------------------------------------------------------------
# recovery of the exact mixture
# ---------------------------------------------------------------------------------
def summary_bounds(mixture, n: int, allowance: dict[str, float]) -> dict[str, float]:
    """Bounds on the mode-averaged errors of ``mode_statistics`` at sample size ``n``:
    twice the sampling noise of each summary plus a stated systematic ``allowance``.

    With ``n_k = w_k n`` samples in mode ``k``: a weight has standard error
    ``sqrt(w (1 - w) / n)``, so E[TV] <= 0.5 sum_k of it; a relative std error has RMS
    ``1 / sqrt(2 n_k)`` and a centre error (RMS per coordinate, in stds)
    ``1 / sqrt(n_k)``; their means over modes are bounded by the mean of those RMS.
    Twice the expectation bounds the average over 8 modes with ample margin.
    """
    w = mixture.weights.tolist()
    K = len(w)
    return {
        "weight_tv": 2 * 0.5 * sum(math.sqrt(v * (1 - v) / n) for v in w) + allowance["w"],
        "std_error": 2 * sum(1 / math.sqrt(2 * v * n) for v in w) / K + allowance["std"],
        "centre_error": 2 * sum(1 / math.sqrt(v * n) for v in w) / K + allowance["c"],
    }


# (entry, overrides): each at 50 score evaluations or fewer on the VP ring
RECOVERY_CASES = [
    ("ddim", {"steps": 49}),
    ("dpm_solver", {"steps": 16}),  # singlestep 3: 49 NFE
    ("dpm_solver_pp_ring", {"steps": 49}),  # 2M, quadratic, eps 3e-3
    ("dpm_solver_pp", {"steps": 49}),  # 3M, logsnr, eps 1e-3
    ("edm", {"steps": 24}),
    ("unipc", {"steps": 49, "order": 2}),
    ("ipndm", {"steps": 49, "order": 3}),
]


@pytest.mark.parametrize(
    "solver,kw", RECOVERY_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(RECOVERY_CASES)]
)
def test_recovers_the_ring(engine, solver, kw):
    n = 20000
    r = engine.sampling(score="gmm", sde="vp", solver=solver, shape=n, seed=1, **kw)
    assert r.nfe <= 50
    st = assert_recovers(r.samples, r.score.mixture)
    # systematic allowance at <= 50 evaluations: what these samplers reach on this
    # problem (docs/benchmarks.md) with a margin; a lost order or wrong kernel is far off
    bounds = summary_bounds(r.score.mixture, n, {"w": 0.01, "std": 0.03, "c": 0.05})
    for key, bound in bounds.items():
        assert st[key] <= bound, (key, st[key], bound)


@pytest.mark.parametrize("sde", ("ve", "subvp", "ddpm"))
def test_recovers_the_ring_on_every_sde(engine, sde):
    n = 10000
    r = engine.sampling(
        score="gmm", sde=sde, solver="dpm_solver_pp", shape=n, seed=2, steps=39, schedule="logsnr"
    )
    assert_recovers(r.samples, r.score.mixture)


def test_ddim_eta_one_is_stochastic_and_recovers(engine):
    n = 10000
    a = engine.sample(score="gmm", sde="vp", solver="ddim", shape=n, seed=3, eta=1.0, steps=99)
    b = engine.sample(score="gmm", sde="vp", solver="ddim", shape=n, seed=3, eta=1.0, steps=99)
    assert torch.equal(a, b)  # seeded
    mix = engine.build("score", "gmm", sde=engine.build("sde", "vp")).mixture
    assert_recovers(a, mix)


def test_edm_takes_its_own_default_s_tmax_when_spelled_out(engine):
    # s_tmax = inf is the default (churn at every sigma); configs refuse inf elsewhere
    assert engine.build("solver", "edm", s_tmax=float("inf")).config.s_tmax == math.inf
    with pytest.raises(RegistryError, match="s_tmax"):
        engine.build("solver", "edm", s_tmax=float("nan"))


def test_edm_churn_recovers(engine):
    n = 10000
    r = engine.sampling(
        score="gmm",
        sde="vp",
        solver="edm",
        shape=n,
        seed=4,
        steps=24,
        churn=10.0,
        s_tmin=0.05,
        s_tmax=50.0,
    )
    assert r.nfe == 2 * 24 + 1
    assert_recovers(r.samples, r.score.mixture)


@pytest.mark.parametrize(
    "solver,kw,nfe",
    [
        ("ddim", {"steps": 7}, 8),
        # singlestep below 15 steps ends with orders 2, 1 (lower_order_final)
        ("dpm_solver", {"steps": 4, "order": 3, "method": "singlestep"}, 3 + 3 + 2 + 1 + 1),
        ("dpm_solver", {"steps": 4, "order": 2, "method": "singlestep", "denoise": False}, 7),
        ("dpm_solver_pp", {"steps": 7}, 8),
        ("edm", {"steps": 5}, 11),
        ("unipc", {"steps": 7, "denoise": False}, 7),
        ("ipndm", {"steps": 7}, 8),
        ("ipndm", {"nfe": 10}, 10),
    ],
)
def test_score_evaluations(engine, solver, kw, nfe):
    assert engine.sampling(score="gmm", sde="vp", solver=solver, shape=2, **kw).nfe == nfe


# ---------------------------------------------------------------------------------
# the benchmark plumbing
# ---------------------------------------------------------------------------------
def test_steps_for_budget(engine):
    from diffuse_engine.testbed.bench import steps_for_budget

    assert steps_for_budget(engine, "gmm", "vp", "dpm_solver_pp", 20, {}) == 19
    assert steps_for_budget(engine, "gmm", "vp", "edm", 20, {}) == 9
    assert steps_for_budget(engine, "gmm", "vp", "dpm_solver", 20, {}) == 7  # 18 + denoise
    assert steps_for_budget(engine, "gmm", "vp", "pc", 2, {}) is None


def test_bench_variants_say_what_their_names_promise(engine):
    """Benchmark variants keep the settings their committed results were made with,
    whatever their base entry says (issue 16 changed ``dpm_solver_pp`` to 3M)."""
    from diffuse_engine.cli.bench_cmd import DEFAULT_SOLVERS
    from diffuse_engine.testbed.bench import DEFAULT_SOLVERS as SOLVERS
    from diffuse_engine.testbed.bench import resolve_variant

    assert DEFAULT_SOLVERS == ",".join(SOLVERS)
    expect = {
        "dpm_solver_pp3": (3, 3e-3, True),
        "dpm_solver_pp_nd": (2, 3e-3, False),
        "dpm_solver_pp_ring": (2, 3e-3, True),
        "dpm_solver_pp": (3, 1e-3, True),
    }
    for name, want in expect.items():
        entry, kw = resolve_variant(name)
        c = engine.build("solver", entry, **kw).config
        assert (c.order, c.eps, c.denoise) == want, name


def test_bench_cli_small_run(tmp_path):
    from diffuse_engine.cli import build_app

    args = [
        "bench",
        "--solvers",
        "dpm_solver_pp,pc",
        "--schedules",
        "logsnr",
        "--nfe",
        "10",
        "--problems",
        "gmm",
        "--n",
        "300",
        "--n-ref",
        "50",
        "--overhead-steps",
        "3",
        "--overhead-batch",
        "16",
        "--overhead-repeats",
        "1",
        "--results",
        str(tmp_path / "r.jsonl"),
        "--report",
        str(tmp_path / "b.md"),
        "--img-dir",
        str(tmp_path / "img"),
    ]
    res = CliRunner().invoke(build_app(with_plugin_commands=False), args)
    assert res.exit_code == 0, res.output
    text = (tmp_path / "b.md").read_text()
    assert "| dpm_solver_pp | logsnr |" in text and "Engine overhead" in text
    assert (tmp_path / "img" / "sampling-quality-gmm-vp.png").stat().st_size > 0


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--schedules", "cosine"], "unknown cosine; choices: uniform"),
        (["--solvers", "nope"], "nope"),
        (["--nfe", "ten"], "--nfe"),
    ],
)
def test_bench_cli_bad_input(tmp_path, args, needle):
    from diffuse_engine.cli import build_app

    res = CliRunner().invoke(
        build_app(with_plugin_commands=False),
        ["bench", *args, "--results", str(tmp_path / "r.jsonl")],
    )
    assert res.exit_code == 2
    assert needle in res.output
    assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.parametrize("seed", [0, 1])  # ~1 s each: guarded in every CI run
def test_issue_target_at_20_evaluations(engine, seed):
    """Issue 6's target, as docs/benchmarks.md measures it: at 20 score evaluations on
    the 2-D ring (n = 50k) weight error <= 0.01, std error <= 0.02, centre error <= 0.05.

    Pinned to ``dpm_solver_pp_ring`` (2M, quadratic schedule, final Tweedie step from
    t = 3e-3): the settings tuned on this ring alone, which were ``dpm_solver_pp`` until
    issue 16 chose that entry by the sampling suite's worst case (3M, logsnr, eps 1e-3:
    std error about 0.05 here; worst figure over the suite's selection beds 11 against
    the ring entry's 24, see ``test_dpm_solver_pp_holds_off_the_ring``). The ring entry
    reaches about 0.005 / 0.014 / 0.023; the sampling noise of the three summaries at
    this n is about 0.003 / 0.008 / 0.011."""
    r = engine.sampling(score="gmm", sde="vp", solver="dpm_solver_pp_ring", shape=50000, seed=seed)
    assert r.nfe == 20
    from diffuse_engine import mode_statistics

    st = mode_statistics(r.samples, r.score.mixture)
    assert st["weight_tv"] <= 0.01 and st["std_error"] <= 0.02 and st["centre_error"] <= 0.05, st


@pytest.fixture(scope="module")
def bed_engine(tmp_path_factory):
    """An engine whose registry adds two of the sampling suite's beds (score entries
    ``bed-scale-small``, ``bed-ring-wide``)."""
    from diffuse_engine import Engine
    from diffuse_engine.testbed.bench.beds import bed, registry_text

    path = tmp_path_factory.mktemp("beds") / "beds.toml"
    path.write_text(registry_text((bed("scale-small"), bed("ring-wide"))))
    return Engine(registry=path, autoload=False)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    "bed,sde",
    [
        ("scale-small", "subvp"),  # ring of data std 0.05 (radius 0.071, mode std 0.0071)
        ("ring-wide", "ve"),  # radius 4, mode std 0.3
    ],
)
def test_dpm_solver_pp_holds_off_the_ring(bed_engine, bed, sde, seed):
    """The registry's ``dpm_solver_pp`` at its 20 evaluations on two of the sampling
    suite's beds other than the built-in ring, where the ring-tuned settings fail:
    ``dpm_solver_pp_ring`` has centre error 0.44 (scale-small, sub-VP) and std / centre
    error 0.07 / 0.075 (ring-wide, VE) there, from the same noise, so this test fails
    with them (checked when the entry changed)."""
    n = 50000
    r = bed_engine.sampling(score=f"bed-{bed}", sde=sde, solver="dpm_solver_pp", shape=n, seed=seed)
    assert r.nfe == 20
    from diffuse_engine import mode_statistics

    st = mode_statistics(r.samples, r.score.mixture)
    # twice the sampling noise at n = 50k (weight 0.012, std 0.018, centre 0.025) plus
    # the solver's systematic error at 20 evaluations: measured 0.013-0.029 (std) and
    # 0.019-0.039 (centre) on these beds, seeds 0-2, at n = 20k and 50k alike, so the
    # allowances 0.02 / 0.03 leave about 0.01 of margin; the weight is the noise's own
    # mode assignment (both entries alike), 0.005 for the few samples a solve moves
    bounds = summary_bounds(r.score.mixture, n, {"w": 0.005, "std": 0.02, "c": 0.03})
    for key, bound in bounds.items():
        assert st[key] <= bound, (key, st[key], bound)


@pytest.mark.parametrize("solver", ["torchsde", "ode_adaptive"])
def test_solvers_choosing_their_own_times_refuse_a_schedule(engine, solver):
    with pytest.raises(RegistryError, match=r"schedule 'logsnr' does not apply"):
        engine.sample(score="gmm", sde="vp", solver=solver, shape=4, schedule="logsnr")


@pytest.mark.parametrize(
    "order,steps,denoise,orders",
    [
        (2, 4, False, [1, 2, 2, 1]),  # the solver's last step is the run's last
        (2, 4, True, [1, 2, 2, 2]),  # the (first-order) denoising step is: as diffusers
        (3, 9, True, [1, 2, 3, 3, 3, 3, 3, 3, 2]),
        (3, 9, False, [1, 2, 3, 3, 3, 3, 3, 2, 1]),
        (3, 14, True, [1, 2] + [3] * 12),  # 15 steps with the denoising one: not lowered
        (3, 14, False, [1, 2] + [3] * 10 + [2, 1]),
    ],
)
def test_multistep_final_orders_count_the_denoising_step(engine, order, steps, denoise, orders):
    solver = engine.build("solver", "dpm_solver_pp", order=order, steps=steps, denoise=denoise)
    assert solver._multistep_orders(steps) == orders


@pytest.mark.parametrize(
    "order,steps,lof,nfe",
    [
        (3, 7, True, 3 * 5 + 2 + 1),
        (3, 7, False, 21),
        (2, 5, True, 2 * 4 + 1),
        (3, 2, True, 2 + 1),
        (3, 16, True, 48),
    ],
)  # from 15 steps on every step keeps its order
def test_singlestep_lower_order_final_evaluations(engine, order, steps, lof, nfe):
    r = engine.sampling(
        score="gmm",
        sde="vp",
        solver="dpm_solver",
        shape=8,
        steps=steps,
        order=order,
        method="singlestep",
        lower_order_final=lof,
        denoise=False,
    )
    assert r.nfe == nfe


def test_singlestep_lower_order_final_helps_at_twenty_evaluations(engine):
    """DPM-Solver-2 singlestep, quadratic schedule, 20 evaluations on the ring (n = 50k):
    10 steps ending in order 1 against 9 of order 2 (19 evaluations). Measured std error
    0.016 against 0.069; the sampling noise at this n is about 0.008."""
    from diffuse_engine import mode_statistics

    errs = []
    for steps, lof in ((9, False), (10, True)):
        r = engine.sampling(
            score="gmm",
            sde="vp",
            solver="dpm_solver",
            shape=50_000,
            steps=steps,
            order=2,
            method="singlestep",
            prediction="noise",
            schedule="quadratic",
            lower_order_final=lof,
            denoise=True,
        )
        errs.append(mode_statistics(r.samples, r.score.mixture)["std_error"])
    assert errs[1] < 0.03 < errs[0], errs
