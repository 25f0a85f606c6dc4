"""Sampling from p_T's moments (``prior="data"``): the start for data far from unit scale."""

from __future__ import annotations

import math

import pytest
import torch

from diffuse_engine import Engine
from diffuse_engine.components.mixture import GaussianMixture
from diffuse_engine.core.errors import DiffuseError

#: a ring of data std about 20 with the ring layout's unequal weights (as the suite's
#: ``scale-large`` bed): VP's N(0, I) is not p_T there (a(T) * radius = 0.19)
LARGE = {"layout": "ring", "modes": 8, "radius": 20 / math.sqrt(0.5), "std": 1.0}


@pytest.fixture(scope="module")
def engine():
    return Engine()


def test_mixture_moments_are_the_closed_form():
    means = torch.tensor([[-1.0, 2.0], [3.0, 0.0]], dtype=torch.float64)
    stds = torch.tensor([[0.5, 1.0], [2.0, 0.1]], dtype=torch.float64)
    w = torch.tensor([0.25, 0.75], dtype=torch.float64)
    mean, var = GaussianMixture(means, stds, w).moments()
    # E x = sum w mu; Var x = sum w (sigma^2 + mu^2) - (E x)^2, per coordinate
    assert torch.allclose(mean, torch.tensor([2.0, 0.5], dtype=torch.float64))
    second = torch.tensor([0.25 * 1.25 + 0.75 * 13.0, 0.25 * 5.0 + 0.75 * 0.01])
    assert torch.allclose(var, second.double() - mean**2)


@pytest.mark.parametrize("sde", ["vp", "subvp", "ve"])
def test_the_data_prior_has_p_T_s_mean_and_variance(engine, sde):
    sde_obj = engine.build("sde", sde)
    score = engine.build("score", "gmm", sde=sde_obj, **LARGE)
    loc, scale = sde_obj.data_prior(*score.data_moments())
    # p_T by Monte Carlo: 400 000 perturbed exact samples; the mean's standard error is
    # scale / sqrt(n) (under 0.2 % of scale), the variance's sqrt(2 / n) relative
    g = torch.Generator().manual_seed(0)
    n = 400_000
    x0 = score.mixture.sample(n, generator=g)
    t = torch.full((n,), sde_obj.T, dtype=torch.float64)
    xT = sde_obj.perturb(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    assert ((xT.mean(0) - loc).abs() <= 5 * scale / math.sqrt(n)).all()
    assert ((xT.var(0) / scale**2 - 1).abs() <= 5 * math.sqrt(2 / n)).all()


def test_unit_scale_data_barely_move_the_start(engine):
    # the built-in ring (data std about 1.4): VP's a(T)^2 var is 1e-4 of 1
    sde = engine.build("sde", "vp")
    loc, scale = sde.data_prior(*engine.build("score", "gmm", sde=sde).data_moments())
    assert loc.abs().max() < 0.01 and (scale - 1).abs().max() < 1e-4


def _weight_error(engine, prior, n=200_000):
    r = engine.sampling(
        score="gmm", sde="vp", solver="dpm_solver_pp", steps=30, shape=n, seed=0, prior=prior,
        **LARGE,
    )  # fmt: skip
    mix = r.score.mixture.to("cpu", torch.float64)
    w_hat = torch.bincount(mix.assign(r.samples.double()), minlength=8).double() / n
    tv = 0.5 * float((w_hat - mix.weights).abs().sum())
    # the expected TV of exact samples: 0.5 sum_k E|N(0, w_k (1 - w_k) / n)|
    noise = 0.5 * float((mix.weights * (1 - mix.weights) / n).sqrt().sum()) * math.sqrt(2 / math.pi)
    return tv / noise, r.config["prior"]


def test_data_far_from_unit_scale_get_their_mode_weights_back(engine):
    # VP's N(0, I) start loses the weights' asymmetry, which p_T carries in its mean
    # (a(T) sum_k w_k mu_k); the data prior keeps it. A TV of exact samples is about
    # its mean +- half, so 3x the mean is far out for noise
    sde_ratio, used = _weight_error(engine, "sde")
    assert used == "sde" and sde_ratio > 3.0, sde_ratio  # the bed shows the bias
    data_ratio, used = _weight_error(engine, "auto")
    assert used == "data" and data_ratio < 3.0, data_ratio


def test_prior_choices_and_their_errors(engine):
    kw = dict(sde="vp", solver="ddim", steps=5, shape=(8, 2), seed=0)
    assert engine.sampling(score="gmm", **kw).config["prior"] == "data"  # auto: known
    assert engine.sampling(score="gmm", prior="sde", **kw).config["prior"] == "sde"
    free = engine.sampling(score=lambda x, t: -x, **kw)
    assert free.config["prior"] == "sde"  # auto: a bare function knows no data
    with pytest.raises(DiffuseError, match="prior='data' needs a score model that knows"):
        engine.sampling(score=lambda x, t: -x, prior="data", **kw)
    with pytest.raises(DiffuseError, match="unknown prior 'gauss'; choices: auto, data, sde"):
        engine.sampling(score="gmm", prior="gauss", **kw)
    noise = torch.randn(8, 2)
    with pytest.raises(DiffuseError, match="noise= is the prior sample itself"):
        engine.sampling(score="gmm", prior="data", noise=noise, **kw)
    given = engine.sampling(score="gmm", noise=noise, **kw)
    assert given.config["noise"] == "given" and "prior" not in given.config
    # the SDE's prior is the reference code's start, bit for bit
    ref = engine.build("sde", "vp").prior_sample((8, 2), generator=_shard_gen(0))
    assert torch.equal(engine.sampling(score="gmm", noise=ref, **kw).samples,
                       engine.sampling(score="gmm", prior="sde", **kw).samples)  # fmt: skip


def _shard_gen(seed):
    from diffuse_engine.core.distributed import shard_seed

    return torch.Generator().manual_seed(shard_seed(seed, 0))


def test_run_takes_prior_and_refuses_a_data_prior_it_cannot_make(tmp_path):
    import json

    from typer.testing import CliRunner

    from diffuse_engine.cli import build_app

    app = build_app()
    res = CliRunner().invoke(app, ["run", "--prior", "sde", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["plan"]["prior"] == "sde"
    res = CliRunner().invoke(app, ["run", "--prior", "gauss", "--dry-run"])
    assert res.exit_code != 0 and "prior" in res.output and "'auto', 'data' or 'sde'" in res.output
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["run", "--n", "200", "--steps", "5", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["resolved"]["prior"] == "data"


def test_conditional_calls_start_from_the_sdes_prior(engine):
    # the moments are the whole data's: a label's mode is elsewhere (on the large ring
    # the data prior doubled one mode's std error), so cond / guidance take the SDE's
    kw = dict(sde="vp", solver="ddim", steps=5, shape=(8, 2), seed=0)
    y = torch.full((8,), 3)
    assert engine.sampling(score="gmm", cond={"label": y}, **kw).config["prior"] == "sde"
    with pytest.raises(DiffuseError, match="prior='data' is the unconditional data's"):
        engine.sampling(score="gmm", cond={"label": y}, prior="data", **kw)


def test_a_fitted_grids_pilot_starts_where_the_samples_do(engine):
    # the gits pilot is drawn from the run's start: from p_T's moments the grid differs
    # on the large ring (VP), and prior='sde' gives the SDE-prior fit back
    kw = dict(sde="vp", solver="dpm_solver_pp_gits", shape=(8, 2), seed=0, **LARGE)
    data = engine.sampling(score="gmm", **kw).fitted_times
    sde = engine.sampling(score="gmm", prior="sde", **kw).fitted_times
    assert data != sde
    # and it is the fit from the data prior itself (the GITS fit, drawn at N(loc, scale^2))
    from diffuse_engine.components.gits import gits_time_grid

    sde_obj = engine.build("sde", "vp")
    score = engine.build("score", "gmm", sde=sde_obj, **LARGE)
    solver = engine.build("solver", "dpm_solver_pp_gits")
    start = sde_obj.data_prior(*score.data_moments())
    like = torch.empty(1, 2)
    c = solver.config
    direct = gits_time_grid(
        score, sde_obj, c.steps, solver.eps(sde_obj), like, pilot=c.pilot, fine=c.fine, start=start
    )
    assert data == pytest.approx(direct, rel=1e-12)


def test_the_benchmarks_reference_start_is_the_engines(engine):
    from diffuse_engine.testbed.bench import prior_noise

    x_T = prior_noise(engine, "gmm", "vp", 64, 3)
    kw = dict(score="gmm", sde="vp", solver="ddim", steps=5, shape=64, seed=3)
    assert torch.equal(engine.sample(**kw), engine.sample(noise=x_T, **kw))


def test_prior_data_is_refused_before_anything_is_trained_or_written(engine):
    from diffuse_engine.runs.plan import data_dims

    with pytest.raises(DiffuseError, match="'mlp' is trained first"):
        engine.plan_run(score="mlp", prior="data")
    with pytest.raises(DiffuseError, match="a conditional run"):
        engine.plan_run("conditional", prior="data")
    # the size of a plan that trains is its [train.NAME] table's data (gmm: 2)
    assert data_dims(engine.builder, engine.plan_run(score="mlp")) == 2
    # and a plan's score overrides change it (a 64-D random mixture)
    plan = engine.plan_run(score="gmm", **{"score.dim": 64, "score.layout": "random"})
    assert data_dims(engine.builder, plan) == 64


def test_sample_refuses_a_data_prior_for_a_trained_network_before_any_folder(tmp_path):
    from typer.testing import CliRunner

    from diffuse_engine.cli import build_app

    app, ck = build_app(with_plugin_commands=False), tmp_path / "ck"
    train = ["train", "--data", "gmm", "--steps", "3", "--set", "warmup=0", "--set", "plot_n=0"]
    res = CliRunner().invoke(app, [*train, "--out", str(ck), "-q"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "s"
    args = ["sample", "--checkpoint", str(ck), "--n", "10", "--steps", "3", "-q"]
    res = CliRunner().invoke(app, [*args, "--prior", "data", "--out", str(out)])
    assert res.exit_code == 2 and "--prior data needs a model" in res.output
    assert not out.exists() and not out.with_name("s.partial").exists()
    res = CliRunner().invoke(app, [*args, "--out", str(out)])  # auto: the SDE's prior
    assert res.exit_code == 0, res.output
    import json

    assert json.loads((out / "config.json").read_text())["sampling"]["prior"] == "sde"
