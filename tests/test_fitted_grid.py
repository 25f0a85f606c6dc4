"""A fitted ``gits`` grid is fitted once: ``SamplingResult.fitted_times`` in Python, and
``fitted.toml`` (a registry entry on that grid) in the folder of ``diffuse run`` and
``diffuse sample``; sampling on it again gives the same samples without the pilot."""

from __future__ import annotations

import json
import tomllib

import pytest
import torch
from typer.testing import CliRunner

from diffuse_engine import Engine
from diffuse_engine.cli import build_app
from diffuse_engine.core.errors import RegistryError
from diffuse_engine.runs.fitted import FITTED_FILE, fitted_toml

runner = CliRunner()


@pytest.fixture(scope="module")
def app():
    return build_app(with_plugin_commands=False)


def test_fitted_times_sample_again_without_the_pilot(engine):
    kw = dict(score="gmm", sde="vp", shape=2000, seed=4)
    first = engine.sampling(solver="dpm_solver_pp_gits", **kw)
    assert first.setup_nfe == 401 and len(first.fitted_times) == first.nfe + 1  # no denoise
    again = engine.sampling(solver="dpm_solver_pp_gits", times=first.fitted_times, **kw)
    assert again.setup_nfe == 0 and again.fitted_times is None
    assert torch.equal(first.samples, again.samples)


def test_nothing_fitted_without_a_fitted_schedule(engine):
    assert (
        engine.sampling(score="gmm", sde="vp", solver="dpm_solver_pp", shape=8).fitted_times is None
    )


def test_fitted_entry_keeps_the_solver_and_drops_what_the_grid_replaces(tmp_path):
    solver = {
        "name": "best-vp-10",
        "type": "dpm_solver",
        "schedule": "gits",
        "steps": 9,
        "nfe": 10,
        "eps": 1e-5,
        "pilot": 512,
        "fine": 100,
        "order": 2,
        "denoise": True,
        "x0_clip": None,
    }
    text = fitted_toml(solver, {"times": [1.0, 0.5, 0.01]}, fitted_on="a test")
    entry = tomllib.loads(text)["solver"]["best-vp-10-fitted"]
    assert entry == {"type": "dpm_solver", "order": 2, "denoise": True, "times": [1.0, 0.5, 0.01]}
    path = tmp_path / FITTED_FILE
    path.write_text(text)
    built = Engine(registry=path).build("solver", "best-vp-10-fitted")
    assert built.config.times == [1.0, 0.5, 0.01] and built.config.steps == 2


#: an entry on the fitted schedule (10 steps, no denoising step: 10 evaluations)
GITS = "dpm_solver_pp_gits"


def test_run_keeps_the_grid_and_a_rerun_on_it_needs_no_pilot(app, tmp_path):
    out = tmp_path / "fit"
    res = runner.invoke(
        app, ["run", "--sde", "vp", "--solver", GITS, "--n", "2000", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["setup_nfe"] == 401 and metrics["fitted_solver"] == f"{GITS}-fitted"
    assert f"--registry {out / FITTED_FILE} --solver {GITS}-fitted" in res.output.replace("\n", "")
    again = tmp_path / "again"
    res = runner.invoke(
        app,
        ["run", "--sde", "vp", "--n", "2000", "--out", str(again)]
        + ["--registry", str(out / FITTED_FILE), "--solver", f"{GITS}-fitted"],
    )
    assert res.exit_code == 0, res.output
    metrics = json.loads((again / "metrics.json").read_text())
    assert metrics["nfe"] == 10 and "setup_nfe" not in metrics and "fitted_solver" not in metrics
    assert not (again / FITTED_FILE).exists()
    assert torch.equal(torch.load(out / "samples.pt"), torch.load(again / "samples.pt"))


def test_sample_from_a_checkpoint_keeps_the_grid(app, tmp_path):
    trained = tmp_path / "ring"
    tiny = ["--set", "hidden=32", "--set", "depth=1", "--set", "plot_n=64", "--set"]
    tiny += ["plot_steps=5", "--threads", "1", "--batch-size", "64", "-q"]
    res = runner.invoke(
        app,
        ["train", "--data", "gmm", "--sde", "vp", "--model", "mlp", "--steps", "5"]
        + ["--out", str(trained), *tiny],
    )
    assert res.exit_code == 0, res.output
    out = tmp_path / "s"
    res = runner.invoke(
        app,
        ["sample", "--checkpoint", str(trained), "--solver", "dpm_solver_pp_gits"]
        + ["--n", "300", "--set", "pilot=64", "--out", str(out)],
    )
    assert res.exit_code == 0, res.output
    entry = tomllib.loads((out / FITTED_FILE).read_text())["solver"]["dpm_solver_pp_gits-fitted"]
    assert len(entry["times"]) == 11 and "schedule" not in entry
    assert json.loads((out / "metrics.json").read_text())["fitted_solver"] == (
        "dpm_solver_pp_gits-fitted"
    )


@pytest.mark.parametrize(
    "solver,kw",
    [
        ("ddim", {"steps": 6}),
        ("dpm_solver", {"nfe": 10}),  # singlestep 3: the budget's orders with the grid
        ("dpm_solver_pp", {"steps": 6}),  # 3M, third_order = "reference"
        ("dpm_solver_pp_sde", {"steps": 6}),  # fresh noise: the same seed, the same draws
        ("unipc", {"nfe": 7}),
        ("edm", {"nfe": 9}),  # its s_tmax = inf default, which a registry file refuses
    ],
)
def test_every_kernel_solver_samples_again_on_its_fitted_entry(engine, tmp_path, solver, kw):
    """``fitted.toml`` of each kernel solver on a ``gits`` grid loads back and samples the
    same, bit for bit, without the pilot (``nfe`` budgets included: the fields the budget
    set, ``orders`` or ``euler_steps``, stay in the entry, ``nfe`` goes)."""
    from diffuse_engine.runs.fitted import write_fitted

    args = dict(score="gmm", sde="vp", shape=200, seed=2)
    first = engine.sampling(solver=solver, schedule="gits", pilot=64, **args, **kw)
    name = write_fitted(tmp_path, first)
    again = Engine(autoload=False, registry=tmp_path / FITTED_FILE).sampling(solver=name, **args)
    assert again.setup_nfe == 0 and again.nfe == first.nfe
    assert torch.equal(first.samples, again.samples)


def test_no_fitted_entry_for_a_solver_that_takes_no_explicit_grid(engine, tmp_path):
    """The PC sampler and the ODE solver fit a ``gits`` grid too, but have no ``times``
    field to sample on it again: no ``fitted.toml`` (it would not load), and no name."""
    from diffuse_engine.runs.fitted import write_fitted

    for solver in ("pc", "ode"):
        result = engine.sampling(
            score="gmm", sde="vp", solver=solver, shape=50, steps=5, schedule="gits", pilot=32
        )
        assert result.fitted_times is not None
        assert write_fitted(tmp_path, result) is None
        assert not (tmp_path / FITTED_FILE).exists()


@pytest.mark.parametrize("guidance", ["conditional", "cfg"])
def test_a_fitted_grid_serves_conditional_and_guided_sampling(engine, guidance):
    """The grid is fitted once per run, with the model's unconditional score on the
    pilot batch, and every shard samples on it whatever guidance wraps the score (the
    guided score carries the shard's condition, which the pilot batch does not fit:
    before, the solver fitted again with it and failed on the batch size)."""
    y = torch.arange(1200) % 8
    kw = dict(score="gmm", sde="vp", solver="dpm_solver_pp_gits", shape=1200, seed=5)
    kw.update(cond={"label": y}, guidance=guidance, shard_size=500)
    first = engine.sampling(**kw)
    # cfg evaluates the conditional and the unconditional score at every step
    assert first.setup_nfe == 401 and first.nfe == 10 * (2 if guidance == "cfg" else 1)
    again = engine.sampling(**kw, times=first.fitted_times)
    assert again.setup_nfe == 0 and torch.equal(first.samples, again.samples)


def test_a_pinned_grid_stays_with_its_run(engine):
    """The pin lives on the solver of one call (each ``sampling`` builds its own), so a
    later call with another SDE fits its own grid instead of reusing the first run's."""
    kw = dict(score="gmm", solver="dpm_solver_pp_gits", shape=64, seed=1)
    vp, ve = engine.sampling(sde="vp", **kw), engine.sampling(sde="ve", **kw)
    assert vp.setup_nfe > 0 and ve.setup_nfe > 0
    assert vp.fitted_times != ve.fitted_times
    assert engine.sampling(sde="vp", **kw).fitted_times == vp.fitted_times  # seeded fit


@pytest.mark.parametrize("schedule", ["logsnr", "gits"])
def test_fitted_weights_sample_again_without_any_pilot(engine, tmp_path, schedule):
    """``ipndm``'s fitted weights go into ``fitted.toml`` with their grid (fitted or not),
    and the entry samples the same, bit for bit, with no pilot at all."""
    from diffuse_engine.runs.fitted import write_fitted

    args = dict(score="gmm", sde="vp", shape=200, seed=2)
    first = engine.sampling(
        solver="ipndm",
        coefficients="fitted",
        nfe=8,
        schedule=schedule,
        pilot=64,
        pilot_seed=3,
        fit_ridge=1e-4,
        **args,
    )
    assert first.setup_nfe > 0 and len(first.fitted_fields["step_weights"]) == 7
    assert (first.fitted_times is None) == (schedule != "gits")  # only gits fits the grid
    name = write_fitted(tmp_path, first)
    entry = tomllib.loads((tmp_path / FITTED_FILE).read_text())["solver"][name]
    assert entry["coefficients"] == "fitted" and len(entry["times"]) == 8
    assert not {"pilot", "pilot_seed", "fit_ridge"} & set(entry)  # only the fit reads them
    again = Engine(autoload=False, registry=tmp_path / FITTED_FILE).sampling(solver=name, **args)
    assert again.setup_nfe == 0 and again.nfe == 8 and again.fitted_fields is None
    assert torch.equal(first.samples, again.samples)
    # in Python the fitted fields are overrides (names no score field shadows)
    direct = engine.sampling(
        solver="ipndm", coefficients="fitted", order=4, **first.fitted_fields, **args
    )
    assert direct.setup_nfe == 0 and torch.equal(first.samples, direct.samples)


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"step_weights": [[1.0]]}, 'set coefficients = "fitted"'),
        ({"coefficients": "fitted", "step_weights": [[1.0]]}, "give its times"),
        (
            {"coefficients": "fitted", "step_weights": [[1.0], [1.0]], "times": [1.0, 0.5, 0.1]},
            r"lengths \[1, 2\] \(order 4\), not lengths \[1, 1\]",
        ),
    ],
)
def test_given_weights_must_fit_their_grid_and_order(engine, fields, match):
    with pytest.raises(RegistryError, match=match):
        engine.build("solver", "ipndm", **fields)
