"""The torchsde reverse-SDE solver and the adaptive probability-flow ODE recover the
exact mixture like ``pc`` and ``ode`` do (bounds from n in ``conftest.assert_recovers``),
are reproducible per seed, and reject bad settings with one clear line."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_recovers

from diffuse_engine import RegistryError

N = 4000


def mixture_of(engine, sde):
    return engine.build("score", "gmm", sde=engine.build("sde", sde)).mixture


@pytest.mark.parametrize(
    "sde,method,steps,adaptive",
    [
        ("vp", "euler", 500, False),
        ("ve", "euler", 500, False),
        ("subvp", "srk", 50, False),
        ("ve", "heun", 250, False),
        ("vp", "srk", 20, True),
    ],
)
def test_torchsde_recovers_mixture(engine, sde, method, steps, adaptive):
    r = engine.sampling(
        score="gmm",
        sde=sde,
        solver="torchsde",
        shape=N,
        seed=0,
        method=method,
        steps=steps,
        adaptive=adaptive,
    )
    assert r.samples.shape == (N, 2)
    assert_recovers(r.samples, mixture_of(engine, sde))
    if not adaptive and method == "euler":
        # one score per step, one in torchsde's contract check, one final denoising
        assert r.nfe == steps + 2


@pytest.mark.parametrize("sde", ["vp", "subvp", "ve"])
def test_adaptive_ode_recovers_mixture_and_counts_evaluations(engine, sde):
    r = engine.sampling(score="gmm", sde=sde, solver="ode_adaptive", shape=N, seed=0)
    assert_recovers(r.samples, mixture_of(engine, sde))
    # dopri5: 6 evaluations per step (FSAL) + 2 for the initial step + 1 denoising;
    # error control needs far fewer than the 1000 of the fixed-step tests
    assert 20 < r.nfe < 1000
    loose = engine.sampling(
        score="gmm", sde=sde, solver="ode_adaptive", shape=N, seed=0, rtol=1e-3, atol=1e-3
    )
    assert loose.nfe < r.nfe  # looser tolerances take fewer steps


def test_torchsde_is_reproducible_per_seed(engine):
    kw = dict(score="gmm", sde="vp", solver="torchsde", shape=(64, 2), method="euler", steps=20)
    a = engine.sample(seed=1, **kw)
    b = engine.sample(seed=1, **kw)
    c = engine.sample(seed=2, **kw)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_torchsde_flattens_image_shaped_states(engine):
    """An (B, 1, 2, 2) state with the exact score of N(0, I) (the VP prior, stationary
    under the reverse SDE) keeps its shape and its law: 512 x 4 values with variance
    1 have standard error of the variance sqrt(2 / 2048) = 0.031; 5 of them bound it."""
    x = engine.sample(
        score=lambda x, t: -x,
        sde="vp",
        solver="torchsde",
        shape=(512, 1, 2, 2),
        seed=0,
        method="euler",
        steps=50,
        denoise=False,
    )
    assert x.shape == (512, 1, 2, 2)
    assert abs(float(x.var()) - 1) < 5 * (2 / x.numel()) ** 0.5


def test_bad_method_is_one_line_error(engine):
    with pytest.raises(RegistryError, match="method.*euler"):
        engine.sample(score="gmm", sde="vp", solver="torchsde", shape=(4, 2), method="rk45")


def test_cli_solver_torchsde_set_method(tmp_path):
    from typer.testing import CliRunner

    from diffuse_engine.cli import build_app

    out = tmp_path / "run"
    res = CliRunner().invoke(
        build_app(),
        [
            "run",
            "--solver",
            "torchsde",
            "--set",
            "method=euler",
            "--steps",
            "50",
            "--n",
            "200",
            "--out",
            str(out),
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    import json

    config = json.loads((out / "config.json").read_text())
    assert "euler" in json.dumps(config)


@pytest.mark.parametrize("method", ["euler", "srk", "reversible_heun"])
def test_progress_callback_reports_every_step_without_changing_samples(engine, method):
    """With a callback the solve runs in pieces on the step grid (same Brownian path,
    solver state carried over): every step is reported once, times decrease, and the
    samples equal the one-piece solve up to float32 round-off."""
    from diffuse_engine.components.differentiable import reverse_sde_solve

    sde = engine.build("sde", "vp")
    score = engine.build("score", "gmm", sde=sde)
    x = sde.prior_sample((256, 2), generator=torch.Generator().manual_seed(0))
    seen = []
    a = reverse_sde_solve(score, sde, x, method=method, steps=30, entropy=5)
    b = reverse_sde_solve(
        score,
        sde,
        x,
        method=method,
        steps=30,
        entropy=5,
        chunks=7,
        callback=lambda *v: seen.append(v),
    )
    assert [s for s, _, _ in seen] == list(range(1, 31)) and seen[-1][1] == 30
    ts = [t for _, _, t in seen]
    assert all(u < v for u, v in zip(ts[1:], ts[:-1], strict=True)) and ts[-1] == pytest.approx(
        1e-3
    )
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
