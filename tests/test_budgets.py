"""Budgets of score evaluations: ``nfe = N`` on every solver (issue 16)."""

from __future__ import annotations

import math

import pytest
import torch

from diffuse_engine import Engine
from diffuse_engine.components.mixture import mode_statistics
from diffuse_engine.components.solver import BEST_NAME, best_at_budget
from diffuse_engine.core.errors import DiffuseError, RegistryError

#: (solver entry, extra fields): every built-in way of stepping
EXACT = [
    ("pc", {}),
    ("pc", {"corrector_steps": 2}),
    ("pc", {"denoise": False}),
    ("ancestral", {}),
    ("ode", {}),
    ("ode", {"method": "heun"}),
    ("ode", {"method": "euler"}),
    ("ddim", {}),
    ("dpm_solver", {}),
    ("dpm_solver", {"order": 2}),
    ("dpm_solver_pp", {}),  # 3M
    ("dpm_solver_pp", {"order": 2}),
    ("dpm_solver_pp_ring", {}),  # 2M, quadratic
    ("dpm_solver_pp_gits", {}),
    ("edm", {}),
    ("edm", {"denoise": False}),
    ("unipc", {}),
]


@pytest.fixture(scope="module")
def engine():
    return Engine()


@pytest.mark.parametrize(("solver", "kw"), EXACT)
@pytest.mark.parametrize("nfe", [1, 2, 3, 4, 7, 10, 11, 20])
def test_every_solver_spends_exactly_its_budget(engine, solver, kw, nfe):
    if solver == "pc" and kw.get("corrector_steps") == 2 and nfe == 2:
        pytest.skip("1 predictor + 2 corrector evaluations cannot make 2 with a denoising step")
    r = engine.sampling(score="gmm", sde="vp", solver=solver, shape=2, seed=0, nfe=nfe, **kw)
    assert r.nfe == nfe


def test_nfe_replaces_the_entrys_steps(engine):
    s = engine.build("solver", "dpm_solver_pp", nfe=10)
    assert (s.config.steps, s.config.denoise) == (9, True)  # the entry says steps = 19


def test_singlestep_budget_follows_the_dpm_solver_fast_recipe(engine):
    # Lu et al. 2022a, Sec. 3.4: K = M // 3 + 1 steps of order 3 ending 2,1 / 1 / 2
    for nfe, orders in [(10, [3, 3, 2, 1]), (11, [3, 3, 3, 1]), (12, [3, 3, 3, 2])]:
        c = engine.build("solver", "dpm_solver", nfe=nfe).config
        assert c.orders == orders and c.steps == len(orders)
        assert sum(orders) + 1 == nfe


def test_pc_skips_the_corrector_at_the_first_times(engine):
    c = engine.build("solver", "pc", nfe=10).config  # 9 = 5 predictor + 4 corrector
    assert (c.steps, c.corrector_skip) == (5, 1)


def test_edm_odd_remainder_takes_one_euler_step(engine):
    c = engine.build("solver", "edm", nfe=10).config  # 9 = 1 Euler + 4 Heun
    assert (c.steps, c.euler_steps) == (5, 1)


def test_torchsde_spends_at_most_its_budget(engine):
    for nfe in (12, 25, 30):  # srk: 10 per step, 2 fixed
        r = engine.sampling(score="gmm", sde="vp", solver="torchsde", shape=2, nfe=nfe)
        assert r.nfe <= nfe
    r = engine.sampling(score="gmm", sde="vp", solver="torchsde", shape=2, nfe=12, method="euler")
    assert r.nfe == 12  # euler: 1 per step + torchsde's contract check + denoising


@pytest.mark.parametrize(
    ("solver", "kw", "needle"),
    [
        ("ode_adaptive", {}, "error control picks the steps"),
        ("torchsde", {"adaptive": True}, "adaptive = true"),
        ("torchsde", {"method": "euler"}, "below one euler step"),
        ("torchsde", {}, r"below one srk step \(12\); srk spends 2 \+ 10 k evaluations"),
        ("dpm_solver_pp", {"times": [1.0, 0.5, 0.001]}, "nfe and times"),
    ],
)
def test_budgets_a_solver_cannot_take_are_refused(engine, solver, kw, needle):
    nfe = 2 if kw.get("method") == "euler" else 10
    with pytest.raises(DiffuseError, match=needle) as info:
        engine.build("solver", solver, nfe=nfe, **kw)
    assert "\n" not in str(info.value).strip() or "nfe" in str(info.value)


def test_nfe_must_be_positive(engine):
    with pytest.raises(DiffuseError, match="nfe"):
        engine.build("solver", "unipc", nfe=0)


@pytest.mark.parametrize("field", ["nfe", "steps", "eps"])
def test_a_boolean_is_not_a_number(engine, field):
    # pydantic alone reads True as 1: nfe = true would spend one evaluation
    with pytest.raises(DiffuseError, match=rf"{field}: expected a number, not a boolean"):
        engine.build("solver", "ddim", **{field: True})
    assert engine.build("solver", "ddim", denoise=False).config.denoise is False  # a flag


@pytest.mark.parametrize("solver", ["dpm_adaptive", "dpm_adaptive_ms"])
def test_adaptive_solver_keeps_to_its_cap_and_says_when_it_binds(engine, solver):
    import warnings

    for cap in (6, 9, 15):  # far below what the tolerance asks on the ring
        with pytest.warns(UserWarning, match=rf"nfe = {cap} cap ended the error control"):
            r = engine.sampling(score="gmm", sde="vp", solver=solver, shape=64, nfe=cap)
        assert r.nfe <= cap
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a cap the error control stays under: silent
        r = engine.sampling(score="gmm", sde="vp", solver=solver, shape=64, nfe=200)
    assert r.nfe < 200


@pytest.mark.parametrize("solver,most", [("dpm_adaptive", 60), ("dpm_adaptive_ms", 40)])
def test_adaptive_solver_recovers_the_ring(engine, solver, most):
    n = 4000
    r = engine.sampling(score="gmm", sde="vp", solver=solver, shape=n, seed=3)
    st = mode_statistics(r.samples, r.score.mixture)
    assert r.nfe <= most
    # sampling noise at n = 4000 (500 per mode): weight ~sqrt(w/n) summed ~0.02 TV,
    # std ~1/sqrt(2 n_k) = 0.03, centre ~1/sqrt(n_k) = 0.045; 2x that is a real failure
    assert st["weight_tv"] < 0.04 and st["std_error"] < 0.06 and st["centre_error"] < 0.09


def test_adaptive_solver_holds_on_data_far_below_unit_scale():
    # the suite's scale-small bed (data std 0.05: radius 0.071, mode std 0.0071). The
    # reference's controller (state tolerance rtol * |x|, unbounded growth of h, the
    # SDE's eps = 1e-3) leaps over the modes' scale in 7 evaluations (centre error 1.6
    # mode stds); the defaults keep to it. Noise at n = 4000 (500 per mode): std error
    # ~1/sqrt(2 * 500) = 0.03, centre ~0.04 (exact samples: 0.029 / 0.037); 2x that fails
    engine = Engine()
    score = engine.build("score", "gmm", sde=engine.build("sde", "vp"),
                         radius=0.1 / math.sqrt(2), std=0.01 / math.sqrt(2))  # fmt: skip
    reference = dict(tolerance="state", h_init=0.05, facmax=None, eps=None)
    got = {}
    for name, kw in (("default", {}), ("reference", reference)):
        r = engine.sampling(score=score, sde="vp", solver="dpm_adaptive", shape=4000, seed=3, **kw)
        got[name] = mode_statistics(r.samples, score.mixture)
        got[name]["nfe"] = r.nfe
    assert got["default"]["std_error"] < 0.06 and got["default"]["centre_error"] < 0.08, got
    assert got["default"]["nfe"] <= 40, got
    assert got["reference"]["centre_error"] > 0.08, got  # the check can fail


def test_adaptive_step_growth_is_bounded(engine, monkeypatch):
    # facmax: after an accepted step h grows by at most facmax, after a rejected one
    # not at all (Hairer et al., II.4); the trial steps' h are read off the solver
    from diffuse_plugins.dpm_adaptive import DPMAdaptive

    tried, pair = [], DPMAdaptive._pair
    monkeypatch.setattr(DPMAdaptive, "_pair", lambda self, *a: tried.append(a[5]) or pair(self, *a))
    engine.sampling(score="gmm", sde="vp", solver="dpm_adaptive", shape=256, seed=0)
    config = engine.build("solver", "dpm_adaptive").config
    growth = [b / a for a, b in zip(tried, tried[1:], strict=False)]
    assert tried[0] == config.h_init and len(tried) > 5
    # the last trial lands on eps exactly (it may be shorter); the others keep the bound
    assert max(growth[:-1]) <= config.facmax * (1 + 1e-9), growth


def test_best_at_budget_picks_the_largest_budget_that_fits():
    names = ["pc", "best-vp-10", "best-vp-20", "best-vp-50", "best-ve-10", "best-x"]
    names += ["best-vp-10-fitted", "best-my-sde-20"]  # a fitted.toml entry; an SDE with '-'
    assert best_at_budget(names, "vp", 10) == "best-vp-10"
    assert best_at_budget(names, "vp", 35) == "best-vp-20"
    assert best_at_budget(names, "vp", 5) == "best-vp-10"
    assert best_at_budget(names, "ve", 100) == "best-ve-10"
    assert best_at_budget(names, "subvp", 10) is None
    assert best_at_budget(names, "my-sde", 20) == "best-my-sde-20"


def test_best_at_budget_takes_the_entries_for_the_datas_size():
    names = ["best-vp-10", "best-vp-20", "best-vp-10-dim16", "best-vp-50-dim16", "best-ve-5-dim4"]
    assert best_at_budget(names, "vp", 20, dims=2) == "best-vp-20"
    assert best_at_budget(names, "vp", 20, dims=None) == "best-vp-20"  # size unknown
    assert best_at_budget(names, "vp", 20, dims=16) == "best-vp-10-dim16"  # its own class
    assert best_at_budget(names, "vp", 60, dims=192) == "best-vp-50-dim16"
    assert best_at_budget(names, "vp", 5, dims=64) == "best-vp-10-dim16"
    assert best_at_budget(names, "ve", 10, dims=2) is None  # only an entry for larger data
    assert best_at_budget(names, "ve", 10, dims=4) == "best-ve-5-dim4"


@pytest.mark.parametrize("sde", ["vp", "subvp", "ve"])
def test_registry_table_entries_spend_their_budget(engine, sde):
    table = {}  # {dims class: {budget: entry}}
    for m in map(BEST_NAME.fullmatch, engine.registry.names("solver")):
        if m and m["sde"] == sde:
            table.setdefault(int(m["dims"] or 1), {})[int(m["nfe"])] = m[0]
    # any size, and data of 16 or more numbers (sub-VP's class since its own ends;
    # registry.toml)
    assert set(table) == {1, 16}
    for budgets in table.values():  # each class covers the same budgets
        assert set(budgets) == {5, 10, 20, 50}
        for nfe, name in budgets.items():
            assert engine.sampling(score="gmm", sde=sde, solver=name, shape=2).nfe == nfe


def test_run_nfe_picks_the_table_entry(tmp_path):
    import json

    from typer.testing import CliRunner

    from diffuse_engine.cli import build_app

    res = CliRunner().invoke(build_app(), ["run", "--nfe", "12", "--sde", "ve", "--dry-run"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output)
    assert plan["plan"]["solver"] == "best-ve-10"
    assert plan["entries"]["solver"]["nfe"] == 12


@pytest.mark.parametrize(
    ("args", "entry"),
    [
        (["--score", "gmm64"], "best-vp-20-dim16"),  # 64 numbers per sample
        (["--score", "gmm"], "best-vp-20"),
        (["--score", "mlp"], "best-vp-20"),  # trained first, on train.default's gmm (2-D)
        (["--set", "score.dim=64", "--set", "score.layout=random"], "best-vp-20-dim16"),
    ],
)
def test_run_nfe_picks_the_table_entry_for_the_datas_size(args, entry):
    import json

    from typer.testing import CliRunner

    from diffuse_engine.cli import build_app

    res = CliRunner().invoke(build_app(), ["run", "--nfe", "20", *args, "--dry-run"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output)
    assert plan["plan"]["solver"] == entry
    assert plan["entries"]["solver"]["nfe"] == 20


def test_budget_quality_never_worse_than_a_smaller_budget_on_the_ring(engine):
    # the table's entries on the built-in ring at n = 4000: the worst of the three
    # errors (in units of their sampling noise at this n) must not grow with the budget
    n, noise = 4000, {"weight_tv": 0.02, "std_error": 0.03, "centre_error": 0.045}
    worst = []
    for nfe in (5, 10, 20, 50):
        r = engine.sampling(score="gmm", sde="vp", solver=f"best-vp-{nfe}", shape=n, seed=5)
        st = mode_statistics(r.samples, r.score.mixture)
        worst.append(max(st[k] / v for k, v in noise.items()))
    # a step up may differ by sampling noise only (one noise unit)
    assert all(b <= a + 1.0 for a, b in zip(worst, worst[1:], strict=False)), worst
    assert math.isfinite(worst[-1])


def test_an_override_of_steps_or_times_replaces_an_entrys_budget(engine):
    """A best-at-budget entry carries ``nfe``: ``steps=`` or ``times=`` given for it
    replace the budget instead of being ignored (steps) or refused (times); an entry's
    ``steps`` give way to ``nfe=`` likewise. Both in one call are refused."""
    assert engine.build("solver", "best-vp-10").config.nfe == 10
    assert engine.build("solver", "best-vp-10", steps=5).config.steps == 5
    c = engine.build("solver", "best-vp-10", times=[1.0, 0.5, 0.01]).config
    assert c.nfe is None and c.steps == 2
    assert engine.build("solver", "dpm_solver_pp", nfe=10).config.steps == 9  # entry: 19
    assert engine.build("solver", "dpm_solver_pp", nfe=None).config.steps == 19  # unset only
    with pytest.raises(RegistryError, match=r"nfe \(10\) and steps \(4\) both fix the steps"):
        engine.build("solver", "ddim", nfe=10, steps=4)


@pytest.mark.parametrize(
    "entry, fields", [e for e in EXACT if e[0] != "edm"] + [("best-vp-10", {})]
)  # edm's default s_tmax = inf does not re-validate at all (allow_inf_nan=False)
def test_a_budgeted_config_validates_again_from_its_own_fields(engine, entry, fields):
    """A config with ``nfe`` holds the ``steps`` its budget spent: its own dump (a run's
    ``config.json``, ``--dry-run``) and ``Component(config, **fields)`` validate again to
    the same config, since those steps agree with the budget; steps that disagree with
    it are refused (the test above)."""
    solver = engine.build("solver", entry, nfe=12, **fields)
    c = solver.config
    assert type(c).model_validate(c.model_dump()) == c
    assert type(solver)(c, catalogue=solver.catalogue, denoise=c.denoise).config == c
    with pytest.raises(ValueError, match=r"nfe \(12\) and steps"):
        type(c).model_validate({**c.model_dump(), "steps": c.steps + 1})


def test_a_calls_budget_beats_an_engine_wide_steps_and_a_grid_must_agree_with_steps():
    """Precedence call > engine-wide sets > entry holds across the fields that fix the
    steps: a call's ``nfe`` replaces a set ``steps`` (and a call's ``steps`` a set
    ``nfe``); ``steps`` given with an explicit ``times`` grid must agree with it."""
    e = Engine(sets=["steps=50"])
    assert e.sampling(solver="ddim", nfe=10, shape=10).nfe == 10
    assert e.sampling(solver="ddim", shape=10).config["solver"]["steps"] == 50  # the set
    assert Engine(sets=["nfe=12"]).sampling(solver="ddim", steps=5, shape=10).nfe == 6
    with pytest.raises(RegistryError, match=r"times \(3 times: 2 steps\) and steps \(5\)"):
        Engine().build("solver", "ddim", steps=5, times=[1.0, 0.5, 0.01])
    assert Engine().build("solver", "ddim", steps=2, times=[1.0, 0.5, 0.01]).config.steps == 2


def test_a_plans_data_size_is_the_score_models_or_the_training_datas(engine):
    from diffuse_engine.runs.plan import data_dims

    assert data_dims(engine.builder, engine.plan_run(score="gmm64")) == 64
    assert data_dims(engine.builder, engine.plan_run(score="gmm")) == 2
    assert data_dims(engine.builder, engine.plan_run(score="mlp", data="gmm")) == 2
    assert data_dims(engine.builder, engine.plan_run(score="mlp")) == 2  # train.default: gmm


@pytest.mark.parametrize("solver", ["dpm_adaptive", "dpm_adaptive_ms"])
def test_an_adaptive_solver_refuses_steps_in_one_line(engine, solver):
    """The error control picks the steps: ``steps`` alone or beside a cap is refused
    (it was silently ignored alone, and a KeyError traceback beside ``nfe``), while the
    config's own dump, which holds the default ``steps``, validates again."""
    for kw in ({"steps": 5}, {"steps": 5, "nfe": 10}):
        with pytest.raises(RegistryError, match=r"steps \(5\) does not apply") as info:
            engine.build("solver", solver, **kw)
        assert "\n" not in str(info.value)
    c = engine.build("solver", solver, nfe=10).config
    assert type(c).model_validate(c.model_dump()) == c


def test_a_gits_grid_beyond_its_steps_is_refused_by_the_config(engine):
    from diffuse_engine.components.gits import MAX_STEPS

    with pytest.raises(RegistryError, match=f"fits at most {MAX_STEPS} steps, not 300"):
        engine.build("solver", "best-vp-50", nfe=300)


def test_run_nfe_beyond_a_fitted_grid_takes_log_snr_steps(tmp_path):
    """``--nfe 300`` takes ``best-vp-50`` (a ``gits`` entry, at most 250 steps): it runs on
    ``logsnr`` steps with a note and spends 300, where it failed after creating the
    output folder; an SDE without a table keeps the preset's solver, with a note."""
    import json

    from typer.testing import CliRunner

    from diffuse_engine.cli import build_app

    res = CliRunner().invoke(build_app(), ["run", "--nfe", "300", "--sde", "vp", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "takes 'logsnr' steps" in res.stderr
    plan = json.loads(res.stdout)
    assert plan["plan"]["solver"] == "best-vp-50"
    assert plan["entries"]["solver"]["schedule"] == "logsnr"
    assert plan["entries"]["solver"]["nfe"] == 300
    args = ["run", "--nfe", "300", "--set", "schedule=quadratic", "--dry-run"]
    res = CliRunner().invoke(build_app(), args)  # a schedule the user set is kept
    assert res.exit_code == 0, res.output
    assert "logsnr" not in res.stderr
    assert json.loads(res.stdout)["entries"]["solver"]["schedule"] == "quadratic"
    res = CliRunner().invoke(build_app(), ["run", "--nfe", "10", "--sde", "ddpm", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "no best-ddpm-N entries" in res.stderr
    assert json.loads(res.stdout)["plan"]["solver"] == "pc"


def test_a_cfg_budget_counts_model_calls(engine):
    """Classifier-free guidance calls the model twice per guided evaluation; ``nfe = N``
    spends at most N calls, the count the run reports (it spent 2N)."""
    labels = torch.arange(8) % 8
    for nfe, calls in [(10, 10), (11, 10), (2, 2)]:
        r = engine.sampling(
            sde="vp", solver="ddim", shape=8, cond={"label": labels}, guidance="cfg", nfe=nfe
        )
        assert r.nfe == calls
        assert r.config["solver"]["nfe"] == nfe // 2
    r = engine.sampling(
        sde="vp", solver="ddim", shape=8, cond={"label": labels}, guidance="cfg", scale=0.0, nfe=10
    )
    assert r.nfe == 10  # one call per evaluation at scale 0
    with pytest.raises(DiffuseError, match="calls the model 2 times per evaluation"):
        engine.sampling(
            sde="vp", solver="ddim", shape=8, cond={"label": labels}, guidance="cfg", nfe=1
        )


def test_a_later_registry_layers_nfe_replaces_an_earlier_layers_steps(tmp_path):
    """A file's ``nfe`` on a built-in entry replaces the built-in ``steps`` (it was refused
    as if both had been given), a later ``--set`` replaces a file's; both in one table
    are still refused."""
    f = tmp_path / "r.toml"
    f.write_text("[solver.ddim]\nnfe = 3\n")
    assert Engine(registry=f).build("solver", "ddim").config.steps == 2
    assert Engine(sets=["solver.ddim.nfe=3"]).build("solver", "ddim").config.steps == 2
    assert (
        Engine(registry=f, sets=["solver.ddim.steps=7"]).build("solver", "ddim").config.nfe is None
    )
    both = tmp_path / "both.toml"
    both.write_text("[solver.ddim]\nnfe = 3\nsteps = 7\n")
    with pytest.raises(RegistryError, match=r"nfe \(3\) and steps \(7\) both fix the steps"):
        Engine(registry=both)
