"""diffusers models in the engine: step-for-step equivalence with diffusers' own loops.

A tiny randomly initialised ``UNet2DModel`` (1x8x8, 42k parameters) is saved as
safetensors with a scheduler config in a temporary folder and loaded back through the
``diffusers`` score plugin, offline. From the same ``x_T`` the engine's ``ddim`` (eta 0)
and ``dpm_solver`` (DPM-Solver++ 2M) on :func:`like_diffusers`'s grids must agree with
diffusers' ``DDIMScheduler`` / ``DPMSolverMultistepScheduler`` loops to 1e-4 relative per
sample. Both run in float32 and do the same arithmetic on the same model outputs; the
only differences are the engine's float64 kernel coefficients against diffusers' float32
ones (relative 1e-7 per step), far below 1e-4 after 10-20 steps, while one timestep off
(diffusers' timestep k is engine time (k + 1) / N) or one wrong coefficient moves the
samples by 1e-3 or more (checked below by shifting the grid).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    UNet2DModel,
)

from diffuse_engine import DiffuseError, Engine, IncompatibleError  # noqa: E402
from diffuse_engine.interop import engine_time, like_diffusers, timestep_of  # noqa: E402

RTOL = 1e-4  # the target, per sample (see the module docstring)
N_SAMPLES = 6


def tiny_unet(seed: int = 0, zero_out: bool = False) -> UNet2DModel:
    torch.manual_seed(seed)
    net = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    with torch.no_grad():  # a strong dependence on the timestep, so a wrong one shows
        net.time_embedding.linear_1.weight.mul_(20.0)
        if zero_out:
            net.conv_out.weight.zero_()
            net.conv_out.bias.zero_()
    return net.eval()


def save_model(folder, scheduler, net=None):
    """A diffusers model folder: config.json + safetensors weights + scheduler config."""
    folder.mkdir(parents=True, exist_ok=True)
    (net or tiny_unet()).save_pretrained(folder, safe_serialization=True)
    scheduler.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def engine():
    return Engine(autoload=False)


@pytest.fixture(scope="module")
def ddim_folder(tmp_path_factory):
    sched = DDIMScheduler(clip_sample=False, timestep_spacing="leading")
    return save_model(tmp_path_factory.mktemp("ddim"), sched)


@pytest.fixture(scope="module")
def dpm_folder(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("dpm"), DPMSolverMultistepScheduler())


def x_T(seed: int = 1) -> torch.Tensor:
    return torch.randn(N_SAMPLES, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def diffusers_loop(net, scheduler, x, steps: int, **step_kwargs) -> torch.Tensor:
    """diffusers' own sampling loop, as its DDIM and DPM-Solver pipelines run it."""
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = net(x, t).sample
            x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x


def engine_solve(engine, folder, settings, x):
    """The engine's solver on the model through engine.build (no engine.sample)."""
    fields = dict(settings)
    name = fields.pop("solver")
    sde = engine.build("sde", "diffusers", scheduler=str(folder))
    score = engine.bind_score("diffusers", sde, path=str(folder))
    solver = engine.build("solver", name, **fields)
    solver.check(sde)
    with torch.no_grad():
        return solver.sample(score, sde, x.clone(), generator=torch.Generator())


def rel_error(a, b) -> torch.Tensor:
    """Per-sample relative L2 distance."""
    return (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)


def load_net(folder):
    return UNet2DModel.from_pretrained(
        folder, local_files_only=True, use_safetensors=True, low_cpu_mem_usage=False
    ).eval()


# ---- the time map ------------------------------------------------------------------------
def test_timestep_map_is_diffusers_convention():
    """Timestep k is engine time (k + 1) / N; float32 grid times snap to the integer."""
    N = 1000
    ks = torch.tensor([0, 1, 99, 500, 999])
    t32 = torch.tensor([engine_time(k, N) for k in ks.tolist()], dtype=torch.float32)
    assert torch.equal(timestep_of(t32, N), ks.double())
    mid = torch.tensor([0.5005], dtype=torch.float64)  # between 499 and 500
    assert float(timestep_of(mid, N)) == pytest.approx(499.5, abs=1e-9)


def test_model_sees_diffusers_timesteps(engine, ddim_folder):
    """The engine's DDIM grid calls the network at exactly diffusers' integer timesteps."""
    net = load_net(ddim_folder)
    seen_d, seen_e = [], []
    sched = DDIMScheduler.from_pretrained(ddim_folder)
    sched.set_timesteps(10)
    for t in sched.timesteps:
        seen_d.append(int(t))
    sde = engine.build("sde", "diffusers", scheduler=str(ddim_folder))
    score = engine.bind_score("diffusers", sde, path=str(ddim_folder))
    inner = score.net.forward
    score.net.forward = lambda x, t, *a, **k: (seen_e.append(t.tolist()), inner(x, t, *a, **k))[1]
    settings = like_diffusers(ddim_folder, 10)
    settings.pop("solver")
    solver = engine.build("solver", "ddim", **settings)
    with torch.no_grad():
        solver.sample(score, sde, x_T(), generator=torch.Generator())
    assert [row[0] for row in seen_e] == seen_d  # 9 steps + the final x0 at timestep 0
    assert all(len(set(row)) == 1 for row in seen_e)
    del net


# ---- DDIM --------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing,steps", [("leading", 10), ("trailing", 10), ("leading", 20)])
def test_ddim_matches_diffusers(engine, tmp_path, spacing, steps):
    sched = DDIMScheduler(clip_sample=False, timestep_spacing=spacing)
    folder = save_model(tmp_path / "m", sched)
    net = load_net(folder)
    x = x_T()
    ref = diffusers_loop(net, DDIMScheduler.from_pretrained(folder), x.clone(), steps, eta=0.0)
    settings = like_diffusers(folder, steps)
    ours = engine_solve(engine, folder, settings, x)
    err = rel_error(ours, ref)
    assert err.max() < RTOL, err
    # the check can fail: the grid shifted by one timestep (all but its end) misses by far
    times = settings["times"]
    shifted = {**settings, "times": [t - 1e-3 for t in times[:-1]] + times[-1:]}
    assert rel_error(engine_solve(engine, folder, shifted, x), ref).min() > 10 * RTOL


def test_ddim_final_alpha_not_one(engine, tmp_path):
    """set_alpha_to_one = False ends at alphas_cumprod[0] (t = 1/N), not at x0_hat."""
    sched = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    folder = save_model(tmp_path / "m", sched)
    settings = like_diffusers(folder, 10)
    assert settings["denoise"] is False and settings["times"][-1] == pytest.approx(1e-3)
    ref = diffusers_loop(load_net(folder), DDIMScheduler.from_pretrained(folder), x_T(), 10)
    assert rel_error(engine_solve(engine, folder, settings, x_T()), ref).max() < RTOL


@pytest.mark.parametrize(
    "config,step_kwargs",
    [
        ({"clip_sample": True}, {"use_clipped_model_output": True}),
        (
            {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5},
            {"use_clipped_model_output": True},
        ),
    ],
)
def test_ddim_clipping_matches_diffusers(engine, tmp_path, config, step_kwargs):
    """Static clipping and dynamic thresholding (Saharia et al. 2022) are diffusers' own,
    with the noise re-derived from the clipped x0_hat (use_clipped_model_output)."""
    folder = save_model(tmp_path / "m", DDIMScheduler(**config))
    net = load_net(folder)
    x = 3.0 * x_T()  # wide start: x0_hat leaves [-1, 1] early, so clipping is active
    ref = diffusers_loop(net, DDIMScheduler.from_pretrained(folder), x.clone(), 10, **step_kwargs)
    settings = like_diffusers(folder, 10)
    assert settings["x0_clip"] == 1.0
    ours = engine_solve(engine, folder, settings, x)
    assert rel_error(ours, ref).max() < RTOL
    unclipped = {**settings, "x0_clip": None, "x0_threshold": None, "x0_threshold_max": None}
    assert rel_error(engine_solve(engine, folder, unclipped, x), ref).min() > 10 * RTOL


def test_ddim_linspace_spacing_is_refused(tmp_path):
    folder = save_model(tmp_path / "m", DDIMScheduler(timestep_spacing="linspace"))
    with pytest.raises(IncompatibleError, match="not the next timestep"):
        like_diffusers(folder, 10)


# ---- DPM-Solver++ ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config,steps",
    [
        ({}, 10),  # diffusers' defaults: dpmsolver++ 2M, linspace, final sigma zero
        ({}, 20),
        ({"final_sigmas_type": "sigma_min"}, 10),
        ({"final_sigmas_type": "sigma_min", "solver_order": 3}, 12),
        ({"solver_order": 3, "lower_order_final": False}, 10),
        ({"solver_order": 3}, 10),  # its last two steps step down: to 0 (first order), 2
        ({"timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 10),
        ({"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, 10),
    ],
)
def test_dpm_solver_matches_diffusers(engine, tmp_path, config, steps):
    folder = save_model(tmp_path / "m", DPMSolverMultistepScheduler(**config))
    net = load_net(folder)
    x = x_T()
    ref = diffusers_loop(net, DPMSolverMultistepScheduler.from_pretrained(folder), x.clone(), steps)
    settings = like_diffusers(folder, steps)
    assert settings["solver"] == "dpm_solver"
    err = rel_error(engine_solve(engine, folder, settings, x), ref)
    assert err.max() < RTOL, err


def test_dpm_solver_pp_entry_through_engine_sample(engine, dpm_folder):
    """The registry's dpm_solver_pp entry, through engine.sample(noise=x_T): same samples."""
    x = x_T()
    ref = diffusers_loop(load_net(dpm_folder), DPMSolverMultistepScheduler(), x.clone(), 10)
    settings = like_diffusers(dpm_folder, 10)
    settings.pop("solver")
    ours = engine.sample(
        score="diffusers",
        sde="diffusers",
        solver="dpm_solver_pp",
        path=str(dpm_folder),
        scheduler=str(dpm_folder),
        shape=x.shape,
        noise=x,
        **settings,
    )
    assert rel_error(ours, ref).max() < RTOL


def test_the_model_brings_its_own_sde(engine, dpm_folder):
    """No sde=: the engine samples with the chain of the folder's own scheduler, exactly
    as with sde="diffusers", scheduler=PATH."""
    x = x_T()
    settings = like_diffusers(dpm_folder, 10)
    settings.pop("solver")
    kw = dict(score="diffusers", solver="dpm_solver_pp", path=str(dpm_folder), noise=x,
              shape=x.shape, **settings)  # fmt: skip
    implicit = engine.sampling(**kw)
    explicit = engine.sample(**kw, sde="diffusers", scheduler=str(dpm_folder))
    assert torch.equal(implicit.samples, explicit)
    assert implicit.config["sde"]["type"] == "diffusers"


def test_ddim_through_engine_sample(engine, ddim_folder):
    """engine.sample(score="diffusers", ..., noise=x_T) is the DDIM loop's result."""
    x = x_T()
    ref = diffusers_loop(load_net(ddim_folder), DDIMScheduler.from_pretrained(ddim_folder), x, 10)
    ours = engine.sample(
        score="diffusers",
        sde="diffusers",
        path=str(ddim_folder),
        scheduler=str(ddim_folder),
        shape=x.shape,
        noise=x,
        **like_diffusers(ddim_folder, 10),
    )
    assert rel_error(ours, ref).max() < RTOL


def test_unsupported_scheduler_is_refused():
    with pytest.raises(IncompatibleError, match="step for step"):
        like_diffusers(DDPMScheduler(), 10)


# ---- the model as a score model ----------------------------------------------------------
def test_prediction_types_read_through_the_kernel(engine, tmp_path):
    """epsilon, v_prediction and sample map to the engine's epsilon, v and x0; each gives
    the x0_hat diffusers computes from the same output."""
    net = tiny_unet()
    x = x_T()
    k = 600
    for pred, param in (("epsilon", "epsilon"), ("v_prediction", "v"), ("sample", "x0")):
        sched = DDIMScheduler(prediction_type=pred, clip_sample=False)
        sched.set_timesteps(10)
        folder = save_model(tmp_path / pred, sched, net)
        sde = engine.build("sde", "diffusers", scheduler=str(folder))
        score = engine.bind_score("diffusers", sde, path=str(folder))
        assert score.config.parameterisation == param
        t = torch.full((x.shape[0],), engine_time(k, 1000))
        with torch.no_grad():
            out = net(x, k).sample
            x0_ref = sched.step(out, k, x).pred_original_sample
            a, s = sde.marginal(t)
            x0 = (x + s[:, None, None, None] ** 2 * score(x, t)) / a[:, None, None, None]
        assert rel_error(x0, x0_ref).max() < 1e-5


def test_builtin_ddpm_sde_is_the_same_chain(engine, ddim_folder):
    """diffusers' default linear betas are the built-in ddpm chain (to 4e-7): accepted."""
    sde = engine.build("sde", "ddpm")
    engine.bind_score("diffusers", sde, path=str(ddim_folder))


def test_another_sde_is_refused_in_one_line(engine, ddim_folder):
    with pytest.raises(IncompatibleError, match='sde="diffusers"') as info:
        engine.sample(score="diffusers", path=str(ddim_folder), sde="vp", shape=2, steps=2)
    assert "\n" not in str(info.value)


def test_likelihood_of_a_known_model(engine, tmp_path):
    """A v-prediction model that outputs 0 has score -x at every t (VP, r = 1): the
    probability-flow ODE does not move, so log p(x) is exactly log N(x; 0, I)."""
    net = tiny_unet(zero_out=True)
    folder = save_model(tmp_path / "m", DDIMScheduler(prediction_type="v_prediction"), net)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    ll = engine.log_likelihood(
        x, score="diffusers", sde="diffusers", path=str(folder), scheduler=str(folder)
    )
    exact = -0.5 * x.flatten(1).pow(2).sum(1) - 32 * math.log(2 * math.pi)
    assert ll.shape == (4,)
    # the ODE's error control (rtol 1e-5) on a flow that is exactly zero: round-off only
    assert torch.allclose(ll.double(), exact.double(), rtol=1e-4, atol=1e-3)


def test_likelihood_of_a_random_model_runs(engine, ddim_folder):
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4)).clamp(-1, 1)
    # a fixed grid keeps it fast: 20 RK4 steps, Hutchinson divergence (64 dimensions)
    res = engine.likelihood(
        x,
        score="diffusers",
        sde="diffusers",
        path=str(ddim_folder),
        scheduler=str(ddim_folder),
        method="rk4",
        steps=20,
    )
    assert res.log_likelihood.shape == (2,) and torch.isfinite(res.log_likelihood).all()
    assert res.nfe >= 80  # 4 evaluations per RK4 step


def test_pickle_weights_are_never_loaded(engine, tmp_path):
    folder = tmp_path / "m"
    tiny_unet().save_pretrained(folder, safe_serialization=False)
    DDIMScheduler().save_pretrained(folder)
    sde = engine.build("sde", "diffusers", scheduler=str(folder))
    with pytest.raises(DiffuseError, match="safetensors"):
        engine.bind_score("diffusers", sde, path=str(folder))


def test_bad_folders_are_one_line_errors(engine, tmp_path):
    with pytest.raises(DiffuseError, match="scheduler_config.json"):
        engine.build("sde", "diffusers", scheduler=str(tmp_path))
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"_class_name": "os.system"}))
    with pytest.raises(DiffuseError, match="not a scheduler"):
        engine.build("sde", "diffusers", scheduler=str(tmp_path))


def test_without_diffusers_the_plugin_says_how_to_install(monkeypatch, tmp_path):
    import sys

    from diffuse_engine.interop import INSTALL_HINT, require_diffusers

    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    with pytest.raises(DiffuseError) as info:
        require_diffusers()
    assert str(info.value) == INSTALL_HINT and "pip install" in INSTALL_HINT
    with pytest.raises(DiffuseError, match="pip install"):
        Engine(autoload=False).build("sde", "diffusers", scheduler=str(tmp_path))


# ---- the command line ----------------------------------------------------------------------
def test_cli_samples_a_diffusers_folder(ddim_folder, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from diffuse_engine.cli import build_app

    monkeypatch.delenv("DIFFUSE_LOG", raising=False)
    app, out = build_app(with_plugin_commands=False), tmp_path / "s"
    args = ["sample", "--diffusers", str(ddim_folder), "--like-diffusers", "--steps", "10"]
    result = CliRunner().invoke(app, [*args, "-n", "3", "-q", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.json").read_text())["nfe"] == 10  # as diffusers' loop
    assert torch.load(out / "samples.pt").shape == (3, 1, 8, 8)
    assert (out / "samples.png").is_file()
    config = json.loads((out / "config.json").read_text())["sampling"]
    assert config["sde"]["type"] == "diffusers" and config["solver"]["type"] == "ddim"
    result = CliRunner().invoke(app, ["sample", "-n", "3", "-q", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--diffusers" in result.output
    # --nfe is a budget for the engine's own solver (it was silently ignored before)
    budget = ["sample", "--diffusers", str(ddim_folder), "--solver", "ddim", "--nfe", "6"]
    result = CliRunner().invoke(app, [*budget, "-n", "3", "-q", "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["nfe"] == 6
    result = CliRunner().invoke(app, [*args, "--nfe", "6", "-q", "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "--nfe does not apply with --like-diffusers" in result.output
    # a diffusers model knows no data moments: --prior data is refused before any folder
    result = CliRunner().invoke(app, [*args, "--prior", "data", "-q", "--out", str(tmp_path / "p")])
    assert result.exit_code == 2 and "a diffusers model does not" in result.output
    assert not (tmp_path / "p").exists() and not (tmp_path / "p.partial").exists()
    assert config["prior"] == "sde"  # the default start of a model without moments


def test_registry_entries_name_a_diffusers_model(ddim_folder, tmp_path):
    """[score.NAME] type = "diffusers" with its [sde.NAME]: sampled by name."""
    reg = tmp_path / "models.toml"
    reg.write_text(
        f'[sde.tiny]\ntype = "diffusers"\nscheduler = "{ddim_folder}"\n\n'
        f'[score.tiny]\ntype = "diffusers"\npath = "{ddim_folder}"\n'
    )
    engine = Engine(registry=reg, autoload=False)
    x = x_T()
    ref = diffusers_loop(load_net(ddim_folder), DDIMScheduler.from_pretrained(ddim_folder), x, 10)
    settings = like_diffusers(ddim_folder, 10)
    ours = engine.sample(score="tiny", sde="tiny", shape=x.shape, noise=x, **settings)
    assert rel_error(ours, ref).max() < RTOL
    with pytest.raises(DiffuseError, match="needs scheduler=PATH"):
        engine.sample(score="tiny", sde="diffusers", shape=2, solver="ddim", steps=2)
