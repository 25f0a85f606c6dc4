"""Log-likelihoods through the probability-flow ODE against the mixture's closed form.

The reference is the exact log-density of ``p_eps`` (the mixture perturbed by the
SDE's kernel at the likelihood's start time ``eps``, ``GMMScore.log_prob(x, t=eps)``):
that is what the ODE computes (for VE the kernel std never drops below sigma_min, so
``p_0`` itself is out of reach; see ``diffuse_engine.likelihood``). Engine and
reference are evaluated at the same points, so the error has no sampling noise
except the Hutchinson estimator's, whose standard error is measured from the
per-point errors. The full-size check (1000 points, 2-D and 64-D) is
``benchmarks/likelihood.py`` (docs/likelihood.md).
"""

from __future__ import annotations

import math

import pytest
import torch

from diffuse_engine import RegistryError
from diffuse_engine.likelihood import bits_per_dim, dequantize


def points_and_exact(engine, score, sde, n, seed=0):
    sde_obj = engine.build("sde", sde)
    model = engine.build("score", score, sde=sde_obj)
    x = model.mixture.sample(n, generator=torch.Generator().manual_seed(seed))
    t = torch.full((n,), sde_obj.sampling_eps, dtype=torch.float64)
    return x, model.log_prob(x.double(), t=t)


@pytest.mark.parametrize("sde", ["vp", "subvp", "ve"])
def test_exact_divergence_matches_closed_form_2d(engine, sde):
    """2-D, exact divergence: the issue's target is 0.01 nats per dimension on the mean
    log-likelihood; with no probe noise we hold every point's RMS error to it too."""
    n, d = 300, 2
    x, exact = points_and_exact(engine, "gmm", sde, n)
    r = engine.likelihood(x, score="gmm", sde=sde)
    assert r.log_likelihood.shape == (n,)
    err = r.log_likelihood.double() - exact
    assert abs(float(err.mean())) <= 0.01 * d, float(err.mean())
    assert float(err.pow(2).mean().sqrt()) <= 0.01 * d, float(err.pow(2).mean().sqrt())
    assert r.config["divergence"] == "auto" and r.nfe > 0


@pytest.mark.parametrize("sde", ["vp", "subvp", "ve"])
def test_hutchinson_matches_closed_form_64d(engine, sde):
    """64-D, Hutchinson with 4 Rademacher probes: the mean error is within the target
    0.01 * 64 nats. The estimator is unbiased, so the mean error is noise of standard
    error std(err) / sqrt(n); the test is only meaningful if the bound is several
    standard errors wide, which is asserted too (measured std ~1.1 nats at n = 150:
    se ~0.09, bound ~7 se)."""
    n, d = 150, 64
    x, exact = points_and_exact(engine, "gmm64", sde, n)
    r = engine.likelihood(x, score="gmm64", sde=sde, divergence="hutchinson", probes=4)
    err = r.log_likelihood.double() - exact
    se = float(err.std()) / math.sqrt(n)
    assert 4 * se < 0.01 * d, se
    assert abs(float(err.mean())) <= 0.01 * d, (float(err.mean()), se)


def test_hutchinson_agrees_with_exact_divergence_on_average(engine):
    """Same 2-D points, Gaussian probes: unbiased, so the mean difference to the exact
    divergence is within 5 standard errors of the per-point differences."""
    n = 300
    x, _ = points_and_exact(engine, "gmm", "vp", n, seed=1)
    ex = engine.log_likelihood(x, score="gmm", sde="vp", divergence="exact")
    hu = engine.log_likelihood(
        x, score="gmm", sde="vp", divergence="hutchinson", probe="gaussian", probes=2
    )
    diff = (hu - ex).double()
    assert float(diff.abs().max()) > 0  # it is an estimate, not the exact trace
    assert abs(float(diff.mean())) <= 5 * float(diff.std()) / math.sqrt(n)


def test_dequantised_bits_per_dim_closed_form(engine):
    """Data on a 256-level grid in [-1, 1]; the score of N(0, I) under VP is -x at every
    t (the prior is stationary), so the continuous density is exactly N(y; 0, I) at the
    dequantised y and the discrete bound adds D log(2 / 256) per point."""
    n, d = 64, 12
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 1, 3, 4), generator=g).float() / 255 * 2 - 1
    r = engine.likelihood(x, score=lambda y, t: -y, sde="vp", dequantize=True)
    y, log_bin = dequantize(x, 256, (-1.0, 1.0), torch.Generator().manual_seed(0))
    assert torch.all((y - x).abs() <= 2 / 256 + 1e-6)  # inside the value's bin
    expected = (
        -0.5 * d * math.log(2 * math.pi) - 0.5 * y.flatten(1).pow(2).sum(1) + d * math.log(2 / 256)
    )
    assert torch.allclose(r.log_likelihood, expected, atol=1e-4)
    assert torch.allclose(r.bits_per_dim, -expected / (d * math.log(2)), atol=1e-5)
    assert float(bits_per_dim(torch.tensor(-d * math.log(2.0)), d)) == pytest.approx(1.0)


def test_bad_settings_are_one_line_errors(engine):
    x = torch.zeros(4, 2)
    with pytest.raises(RegistryError, match="divergence.*'auto', 'exact' or 'hutchinson'"):
        engine.log_likelihood(x, divergence="trace")
    with pytest.raises(RegistryError, match="rtoll.*likelihood.rtol"):
        engine.log_likelihood(x, rtoll=1e-3)
    with pytest.raises(RegistryError, match="ambiguous.*likelihood.seed.*score.seed"):
        engine.log_likelihood(x, seed=1)


def test_cli_likelihood_prints_mean_stderr_bits(tmp_path):
    from typer.testing import CliRunner

    from diffuse_engine.cli import build_app

    res = CliRunner().invoke(
        build_app(), ["likelihood", "--score", "gmm", "--sde", "vp", "--n", "100", "--quiet"]
    )
    assert res.exit_code == 0, res.output
    for label in ("mean log-likelihood", "standard error", "bits/dim", "exact mean"):
        assert label in res.output
    bad = CliRunner().invoke(build_app(), ["likelihood", "--set", "probes=0"])
    assert bad.exit_code == 2 and "probes" in bad.output


def test_cli_likelihood_of_a_trained_checkpoint_on_a_dataset(engine, tmp_path):
    """--checkpoint and --data: a (barely) trained model evaluated on dataset points;
    the same model under another SDE is refused with one line."""
    from typer.testing import CliRunner

    from diffuse_engine.cli import build_app

    engine.training(
        steps=5,
        batch_size=32,
        out=tmp_path / "tr",
        overwrite=True,
        plot_steps=1,
        plot_n=16,
        threads=1,
    )
    res = CliRunner().invoke(
        build_app(),
        [
            "likelihood",
            "--checkpoint",
            str(tmp_path / "tr"),
            "--sde",
            "vp",
            "--data",
            "gmm",
            "--n",
            "20",
            "--json",
            "--quiet",
            "--set",
            "rtol=1e-3",
            "--set",
            "atol=1e-3",
        ],
    )
    assert res.exit_code == 0, res.output
    assert '"bits_per_dim"' in res.output and '"n": 20' in res.output
    bad = CliRunner().invoke(
        build_app(),
        [
            "likelihood",
            "--checkpoint",
            str(tmp_path / "tr"),
            "--sde",
            "ve",
            "--data",
            "gmm",
            "--n",
            "5",
        ],
    )
    assert bad.exit_code == 2 and "trained with sde" in bad.output
