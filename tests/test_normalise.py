"""Data normalisation (issue 18): fitted, recorded, and undone in the user's units.

The round trips are closed-form: the exact score of the *normalised* mixture (a ring at
scale 10 mapped by ``T(x) = (x - mean) / scale``) stands in for a trained model, so the
sampler's output decoded by the model's normaliser must be the scale-10 mixture, and the
ODE likelihood plus ``log |det dT/dx|`` must be the scale-10 density."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_recovers

from diffuse_engine import DiffuseError, GaussianMixture
from diffuse_engine.components.memory_data import MemoryData
from diffuse_engine.components.normalise import (
    NormalisedData,
    Normaliser,
    fit_normaliser,
    normalised_std,
)

RING10 = dict(layout="ring", modes=8, radius=20.0, std=1.0)


def test_standard_and_global_fit_and_round_trip():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 3, generator=g) * torch.tensor([10.0, 0.1, 3.0]) + 5.0
    data = MemoryData(x)
    std = fit_normaliser("standard", data)
    z = std.encode(x)
    # all 20000 rows are used: the fitted moments are the sample's own, up to float32
    assert torch.allclose(z.mean(0), torch.zeros(3), atol=1e-4)
    assert torch.allclose(z.std(0), torch.ones(3), atol=1e-4)
    assert torch.allclose(std.decode(z), x, rtol=1e-5, atol=1e-4)
    glob = fit_normaliser("global", data)
    assert glob.mean.dim() == 0 and glob.scale.dim() == 0
    assert float(glob.encode(x).std()) == pytest.approx(1.0, abs=1e-4)
    assert fit_normaliser("auto", data).kind == "standard"  # vectors
    assert normalised_std(std, data) == pytest.approx(1.0, abs=1e-3)


def test_log_det_is_minus_sum_log_scale():
    norm = Normaliser(
        "explicit", (2,), torch.zeros(2, dtype=torch.float64), torch.tensor([2.0, 5.0]).double()
    )
    x = torch.zeros(4, 2)
    assert torch.allclose(norm.log_det(x), torch.full((4,), -math.log(10.0)))
    img = Normaliser(
        "images", (1, 2, 2), torch.tensor(127.5).double(), torch.tensor(127.5).double()
    )
    assert float(img.log_det(torch.zeros(1, 1, 2, 2))) == pytest.approx(-4 * math.log(127.5))


def test_images_map_raw_pixels_and_leave_scaled_images_alone():
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (50, 1, 4, 4), generator=g, dtype=torch.uint8)
    norm = fit_normaliser("auto", MemoryData(raw))
    assert norm.kind == "images"
    z = norm.encode(raw.float())
    assert float(z.min()) >= -1 and float(z.max()) <= 1
    assert torch.equal(norm.encode(torch.tensor([0.0, 255.0])), torch.tensor([-1.0, 1.0]))
    scaled = raw.float() / 127.5 - 1  # what the file dataset's image folders give
    assert fit_normaliser("auto", MemoryData(scaled)).identity


def test_explicit_values_and_the_off_switch():
    data = MemoryData(torch.randn(100, 2) * 7)
    norm = fit_normaliser("auto", data, mean=[1.0, 2.0], scale=4.0)
    assert norm.kind == "explicit" and norm.record()["scale"] == 4.0
    assert norm.record()["mean"] == [1.0, 2.0]
    assert fit_normaliser("none", data).identity
    # only the mean given: the scale is still fitted
    half = fit_normaliser("standard", data, mean=0.0)
    assert float(half.mean) == 0.0 and half.scale.shape == (2,)


@pytest.mark.parametrize(
    ("kind", "kw", "match"),
    [
        ("none", {"scale": 2.0}, "takes no data_mean"),
        ("standard", {"scale": 0.0}, "data_scale must be finite and > 0"),
        ("standard", {"scale": [1.0, 2.0, 3.0]}, r"data_scale has shape \[3\]; the data are \[2\]"),
        ("standard", {"mean": float("nan")}, "data_mean must be finite"),
        ("standard", {"mean": "big"}, "expected a number or a list"),
        ("zscore", {}, "normalise 'zscore' is unknown; choose one of: auto, standard"),
    ],
)
def test_bad_normalisation_is_a_one_line_error(kind, kw, match):
    with pytest.raises(DiffuseError, match=match) as err:
        fit_normaliser(kind, MemoryData(torch.randn(10, 2)), **kw)
    assert "\n" not in str(err.value)


def test_record_round_trip():
    norm = fit_normaliser("standard", MemoryData(torch.randn(500, 2) * 3 + 1))
    back = Normaliser.from_record(norm.record(), (2,))
    assert torch.equal(back.mean, norm.mean) and torch.equal(back.scale, norm.scale)
    assert Normaliser.from_record(None, (2,)).identity  # checkpoints from before issue 18
    with pytest.raises(DiffuseError, match="malformed"):
        Normaliser.from_record({"mean": 1}, (2,))


def test_normalised_data_wraps_any_dataset(engine):
    data = engine.build("data", "gmm", **RING10)
    norm = fit_normaliser("global", data, seed=3)
    wrapped = NormalisedData(data, norm)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.allclose(wrapped.sample(64, g1), norm.encode(data.sample(64, g2)))
    assert wrapped.shape == data.shape and wrapped.mixture is data.mixture


# ---- round trips against the exact scale-10 mixture ----------------------------------------
@pytest.fixture(scope="module")
def normalised_exact(engine):
    """``(user-units mixture, z-space exact score model carrying the normaliser)``."""
    data = engine.build("data", "gmm", **RING10)
    mix = data.mixture
    norm = fit_normaliser("global", data, seed=0)  # one scale: the ring stays a gmm ring
    m, c = float(norm.mean), float(norm.scale)
    sde = engine.build("sde", "vp")
    model = engine.build(
        "score",
        "gmm",
        sde=sde,
        layout="explicit",
        means=((mix.means - m) / c).tolist(),
        stds=(mix.stds / c).tolist(),
        weights=mix.weights.tolist(),
    )
    model.normaliser = norm
    return mix, model, norm


def test_samples_come_back_in_user_units(engine, normalised_exact):
    """5-standard-error per-mode bounds (conftest.assert_recovers) at n = 6000; samples
    left in z units would sit at radius ~1.4 instead of 20 and fail every mode."""
    mix, model, _ = normalised_exact
    x = engine.sample(score=model, sde="vp", solver="dpm_solver_pp", shape=(6000, 2), steps=50)
    assert float(x.norm(dim=1).mean()) == pytest.approx(20.0, rel=0.05)
    assert_recovers(x, mix)


def test_likelihood_in_user_units_with_the_jacobian(engine, normalised_exact):
    """The ODE gives ``log p_eps(T(x))`` of the z-space mixture to 0.01 nats/dim (the
    likelihood tests' bound); adding ``-2 log scale`` (~ -5.3 nats here, the Jacobian)
    must give the closed form in user units. Against the unperturbed scale-10 density the
    difference is only the kernel at ``eps`` (z-std 0.01 beside mode stds >= 0.07:
    under 0.1 nats per point, far below the Jacobian's 5.3)."""
    mix, model, norm = normalised_exact
    x = mix.sample(200, torch.Generator().manual_seed(4))
    ll = engine.log_likelihood(x, score=model, sde="vp").double()
    sde = model.sde
    t = torch.full((200,), sde.sampling_eps, dtype=torch.float64)
    z = norm.encode(x.double())
    exact = model.log_prob(z, t=t) - 2 * math.log(float(norm.scale))
    err = ll - exact
    assert abs(float(err.mean())) <= 0.02 and float(err.pow(2).mean().sqrt()) <= 0.02
    user = GaussianMixture.log_prob(mix.to("cpu", torch.float64), x.double())
    assert float((ll - user).abs().mean()) <= 0.1
    assert 2 * math.log(float(norm.scale)) > 5.0  # the Jacobian term is what is checked


# ---- the command line: the same for `diffuse train --data file` ----------------------------
@pytest.mark.parametrize(
    ("sets", "kind"), [([], "standard"), (["--set", "normalise=none"], "none")]
)
def test_cli_file_data_is_normalised_and_recorded(tmp_path, sets, kind):
    import json

    import numpy as np
    from typer.testing import CliRunner

    from diffuse_engine.cli import build_app

    path = tmp_path / "x.npy"
    np.save(path, (np.random.default_rng(0).normal(size=(300, 2)) * 10 + 5).astype(np.float32))
    out = tmp_path / "run"
    args = ["train", "--data", "file", "--set", f"path={path}", "--steps", "5", "--out",
            str(out), "--set", "hidden=16", "--set", "depth=1", "--set", "plot_n=0",
            "--threads", "1", "--batch-size", "32", "-q", *sets]  # fmt: skip
    res = CliRunner().invoke(build_app(with_plugin_commands=False), args)
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["normalise"]["kind"] == kind
    if kind == "standard":  # the preconditioner follows the normalised data
        assert cfg["score"]["sigma_data"] == pytest.approx(1.0, abs=0.01)
        assert cfg["normalise"]["scale"][0] == pytest.approx(10.0, rel=0.15)  # se ~4% at n = 300
    bad = CliRunner().invoke(
        build_app(with_plugin_commands=False), [*args[:-len(sets) or None], "--set",
                                                "normalise=zscore", "--overwrite"]
    )  # fmt: skip
    assert bad.exit_code == 2 and "normalise" in bad.output
