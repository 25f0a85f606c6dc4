"""`diffuse train`, `diffuse sample`, `diffuse run` training first, and the networks."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from diffuse_engine import Engine
from diffuse_engine.cli import build_app

runner = CliRunner()


TINY = [
    "--set",
    "hidden=32",
    "--set",
    "depth=1",
    "--set",
    "plot_n=64",
    "--set",
    "plot_steps=5",
    "--set",
    "log_every=5",
    "--threads",
    "1",
    "--batch-size",
    "64",
    "-q",
]


@pytest.fixture(scope="module")
def app():
    return build_app(with_plugin_commands=False)


@pytest.fixture(scope="module")
def trained(app, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "ring"
    res = runner.invoke(
        app,
        [
            "train",
            "--data",
            "gmm",
            "--sde",
            "vp",
            "--model",
            "mlp",
            "--steps",
            "10",
            "--out",
            str(out),
            *TINY,
        ],
    )
    assert res.exit_code == 0, res.output
    return out


def test_train_then_resume(app, trained):
    assert json.loads((trained / "status.json").read_text())["complete"] is True
    res = runner.invoke(
        app, ["train", "--out", str(trained), "--resume", "--steps", "15", "--threads", "1", "-q"]
    )
    assert res.exit_code == 0, res.output
    assert (trained / "losses.csv").read_text().count("\n") == 16


def test_sample_writes_samples_plot_and_exact_metrics(app, trained, tmp_path):
    out = tmp_path / "s"
    res = runner.invoke(
        app,
        [
            "sample",
            "--checkpoint",
            str(trained),
            "--solver",
            "pc",
            "--n",
            "200",
            "--steps",
            "10",
            "--out",
            str(out),
            "--format",
            "npz",
        ],
    )
    assert res.exit_code == 0, res.output
    assert {"samples.npz", "samples.png", "metrics.json", "config.json"} <= {
        p.name for p in out.iterdir()
    }
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["nfe"] == 21 and len(metrics["modes"]["weight"]) == 8


@pytest.mark.parametrize(
    "args,words",
    [
        (["sample", "--checkpoint", "/nonexistent/ck.safetensors"], "no such file"),
        (["train", "--model", "gmm", "--steps", "1"], "not trainable"),
        (["train", "--loss", "smld", "--steps", "1"], "variance-exploding"),
        (["train", "--set", "lr=-1"], "lr"),
    ],
)
def test_bad_input_is_one_line_exit_2(app, tmp_path, args, words):
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "x")])
    assert res.exit_code == 2, res.output
    assert words in res.output and res.output.strip().count("\n") == 0, res.output


def test_train_refuses_existing_folder(app, trained):
    res = runner.invoke(app, ["train", "--steps", "1", "--out", str(trained)])
    assert res.exit_code == 2 and "already exists" in res.output


def test_run_trains_first_when_the_score_needs_it(app, tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(
        app,
        [
            "run",
            "--score",
            "mlp",
            "--n",
            "300",
            "--steps",
            "10",
            "--out",
            str(out),
            "-q",
            "--set",
            "train.default.steps=5",
            "--set",
            "train.default.threads=1",
            "--set",
            "train.default.plot_n=32",
            "--set",
            "train.default.plot_steps=3",
            "--set",
            "score.mlp.hidden=16",
        ],
    )
    assert res.exit_code == 0, res.output
    assert (out / "train" / "checkpoint.safetensors").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert "weight_tv" in metrics  # scored against the training data's exact mixture
    assert json.loads((out / "config.json").read_text())["training"]["score"]["hidden"] == 16


# ---- networks ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [[1, 8, 8], [3, 16, 16]])
def test_unet_shapes_and_gradients(shape):
    engine = Engine(autoload=False)
    sde = engine.build("sde", "ve")
    m = engine.build("score", "unet", sde=sde, shape=shape, channels=8, attention=[8])
    x, t = torch.randn(3, *shape), torch.rand(3)
    out = m(x, t)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.pow(2).mean().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_x0_preconditioner_with_zero_network_is_the_gaussian_score():
    """With F = 0 the EDM x0 form is the optimal linear denoiser of N(0, sigma_data^2 I),
    so the model's score must equal that Gaussian's exact perturbed score."""
    engine = Engine(autoload=False)
    for sde_name in ("vp", "ve", "subvp"):
        sde = engine.build("sde", sde_name)
        m = engine.build("score", "mlp", sde=sde, shape=[2], parameterisation="x0", sigma_data=0.7)
        for p in m.net.out.parameters():
            torch.nn.init.zeros_(p)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(256, 2, dtype=torch.float64, generator=g)
        t = torch.rand(256, dtype=torch.float64, generator=g)
        m.net.double()
        a, s = sde.marginal(t)
        exact = -x / (a**2 * 0.49 + s**2)[:, None]
        # The score is (a D - x) / s^2: the subtraction cancels to a few ulps of |x| and the
        # division by s^2 (~1e-8 for sub-VP at t ~ 1e-3) magnifies it, so the bound is
        # 16 ulps of |x| / s^2 plus a float64 floor; it is ~1e-13 away from small t.
        tol = 1e-12 + 16 * torch.finfo(torch.float64).eps * x.abs() / (s**2)[:, None]
        assert ((m(x, t) - exact).abs() <= tol).all(), sde_name


def test_network_needs_a_shape():
    from diffuse_engine import DiffuseError

    engine = Engine(autoload=False)
    with pytest.raises(DiffuseError, match="needs its data shape"):
        engine.build("score", "mlp", sde=engine.build("sde", "vp"))
