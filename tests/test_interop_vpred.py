"""v-prediction (Salimans & Ho 2022), x0 clipping / dynamic thresholding (Saharia et al.
2022) and explicit time grids in the kernel-based solvers.

v is defined here from its own formula, ``v = (a eps - s x_0) / sqrt(a^2 + s^2)`` with the
exact ``eps`` and ``x_0`` posterior means of a Gaussian mixture, and must convert back to
the exact score for every SDE (VP, sub-VP with ``a^2 + s^2 != 1``, VE, the DDPM chain);
the denoising loss must be unbiased at the exact v model and see a wrong one; the mlp and
U-Net must train and sample with it.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_recovers

from diffuse_engine import (
    Engine,
    GaussianMixture,
    IncompatibleError,
    RegistryError,
    ScoreConfig,
    ScoreModel,
    bcast,
)

F64 = torch.float64


@pytest.fixture(scope="module")
def engine():
    return Engine(autoload=False)


class ExactV(ScoreModel):
    """Outputs the exact v of ``N(mu, sigma^2 I)`` under the kernel: the model is
    parameterised by v, so calling it converts v back to a score (``to_score``)."""

    name = "exact-v-test"

    def __init__(self, mu, sigma, *, sde):
        super().__init__(ScoreConfig(parameterisation="v"), sde=sde)
        self.mu = mu.clone().requires_grad_(True)
        self.log_sigma = torch.tensor(float(sigma), dtype=F64).log().requires_grad_(True)

    def forward(self, x, t):
        a, s = self.sde.marginal(t)
        one = torch.ones(1, dtype=F64)
        score = GaussianMixture(self.mu[None], self.log_sigma.exp()[None], one).score(x, a, s)
        a_, s_ = bcast(a, x), bcast(s, x)
        eps = -s_ * score  # E[z | x_t]
        x0 = (x + s_**2 * score) / a_  # E[x_0 | x_t], Tweedie
        return (a_ * eps - s_ * x0) / (a_**2 + s_**2).sqrt()


MU = torch.tensor([0.5, -1.0], dtype=F64)
SIGMA = 0.7


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve", "ddpm"])
def test_v_converts_back_to_the_exact_score(engine, sde_name):
    sde = engine.build("sde", sde_name)
    model = ExactV(MU, SIGMA, sde=sde)
    x = 3 * torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    t = torch.rand(256, generator=torch.Generator().manual_seed(1), dtype=F64) * 0.99 + 0.01
    a, s = sde.marginal(t)
    exact = GaussianMixture(MU[None], torch.tensor([SIGMA], dtype=F64), torch.ones(1, dtype=F64))
    with torch.no_grad():
        assert torch.allclose(model(x, t), exact.score(x, a, s), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_dsm_with_v_is_unbiased_at_the_exact_v(engine, sde_name):
    """The mean gradient of dsm over 20 chunks of 1000 samples, against its standard error
    (t-statistics with 19 degrees of freedom: |t| > 4.5 has probability < 1e-3 each)."""
    sde = engine.build("sde", sde_name)
    loss = engine.build("loss", "dsm", sde=sde)

    def z(mu):
        model, g, grads = ExactV(mu, SIGMA, sde=sde), torch.Generator().manual_seed(0), []
        for _ in range(20):
            x0 = MU + SIGMA * torch.randn(1000, 2, generator=g, dtype=F64)
            gm, gs = torch.autograd.grad(loss(model, x0, g), [model.mu, model.log_sigma])
            grads.append(torch.cat([gm, gs[None]]))
        G = torch.stack(grads)
        return G.mean(0) / (G.std(0) / math.sqrt(20))

    assert z(MU).abs().max() < 4.5
    assert z(MU + torch.tensor([SIGMA, 0.0], dtype=F64))[0] > 6  # a wrong mean is seen


@pytest.mark.parametrize(
    "model,fields,data",
    [
        ("mlp", {"hidden": 64, "depth": 2}, "gmm"),
        ("unet", {"channels": 8, "attention": []}, "digits"),
    ],
)
def test_networks_train_with_v(engine, model, fields, data):
    """As the epsilon test in test_training_losses: on a fixed batch (same t and noise),
    Adam must cut the loss of a v-parameterised network clearly."""
    sde = engine.build("sde", "vp")
    x0 = engine.build("data", data).sample(64, torch.Generator().manual_seed(0))
    net = engine.build(
        "score", model, sde=sde, shape=list(x0.shape[1:]), parameterisation="v", **fields
    )
    loss = engine.build("loss", "dsm", sde=sde)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def value():
        return loss(net, x0, torch.Generator().manual_seed(1))

    with torch.no_grad():
        before = float(value())
    for _ in range(60):
        opt.zero_grad()
        value().backward()
        opt.step()
    with torch.no_grad():
        after = float(value())
    assert after < 0.7 * before, (before, after)


def test_v_unet_trains_checkpoints_and_samples_clipped(engine, tmp_path):
    """engine.train with parameterisation v, through its checkpoint, sampled by ddim with
    x0 clipping: finite samples in the data range [-1, 1]."""
    result = engine.training(
        data="digits",
        model="unet",
        parameterisation="v",
        channels=8,
        attention=[],
        steps=20,
        batch_size=16,
        warmup=5,
        plot_n=0,
        out=tmp_path / "v",
    )
    assert result.config["score"]["parameterisation"] == "v"
    from diffuse_engine.components.checkpoint import load_trained

    model, _ = load_trained(engine, tmp_path / "v")
    x = engine.sample(score=model, sde="vp", solver="ddim", shape=8, steps=5, x0_clip=1.0)
    assert torch.isfinite(x).all() and x.abs().max() <= 1.0


# ---- x0 clipping -------------------------------------------------------------------------
def test_clipping_is_off_by_default(engine):
    for name in ("ddim", "dpm_solver_pp", "edm", "unipc"):
        c = engine.build("solver", name).config
        assert (c.x0_clip, c.x0_threshold, c.times) == (None, None, None)


def test_static_clipping_bounds_every_prediction(engine):
    """The ring has radius 2: clipping x0_hat at 1 keeps every sample in [-1, 1]^2."""
    x = engine.sample(score="gmm", sde="vp", solver="ddim", shape=(2000, 2), seed=0, x0_clip=1.0)
    assert x.abs().max() <= 1.0
    free = engine.sample(score="gmm", sde="vp", solver="ddim", shape=(2000, 2), seed=0)
    assert free.abs().max() > 2.0


def test_clipping_outside_the_data_range_keeps_the_law(engine):
    """At x0_clip = 3 (the ring lies within |x| < 2.8) DPM-Solver++ still recovers it."""
    r = engine.sampling(
        score="gmm", sde="vp", solver="dpm_solver_pp", shape=(8000, 2), seed=0, x0_clip=3.0
    )
    assert_recovers(r.samples, r.score.mixture)


def test_dynamic_thresholding_is_saharia_et_al(engine):
    """Per sample: s = clamp(p-quantile of |x0|, c, max); x0 -> clip(x0, -s, s) * c / s."""
    solver = engine.build("solver", "ddim", x0_threshold=0.9, x0_threshold_max=2.5)
    x0 = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    x0 = x0 * torch.tensor([0.5, 1.5, 2.0, 4.0, 10.0], dtype=F64)[:, None, None, None]
    got = solver.clip_x0(x0)
    for b in range(5):
        q = float(torch.quantile(x0[b].abs().flatten(), 0.9))
        s = min(max(q, 1.0), 2.5)
        want = x0[b].clamp(-s, s) / s
        assert torch.allclose(got[b], want, rtol=1e-12, atol=0)
    assert got.abs().max() <= 1.0


def test_clipping_settings_are_validated(engine):
    with pytest.raises(RegistryError, match="x0_threshold_max needs x0_threshold"):
        engine.build("solver", "ddim", x0_threshold_max=2.0)
    with pytest.raises(RegistryError, match="must be >= x0_clip"):
        engine.build("solver", "ddim", x0_clip=2.0, x0_threshold=0.9, x0_threshold_max=1.5)


# ---- explicit times ----------------------------------------------------------------------
def test_explicit_times_reproduce_the_schedule(engine):
    """A grid given as times is sampled exactly as the schedule that made it."""
    sde = engine.build("sde", "vp")
    grid = engine.build("solver", "dpm_solver_pp").time_grid(sde)
    a = engine.sample(score="gmm", sde="vp", solver="dpm_solver_pp", shape=(500, 2), seed=3)
    b = engine.sample(
        score="gmm", sde="vp", solver="dpm_solver_pp", shape=(500, 2), seed=3, times=grid
    )
    assert torch.equal(a, b)
    solver = engine.build("solver", "dpm_solver_pp", times=grid)
    assert solver.config.steps == len(grid) - 1 and solver.eps(sde) == grid[-1]


def test_bad_times_are_refused(engine):
    with pytest.raises(RegistryError, match="strictly decreasing"):
        engine.build("solver", "ddim", times=[0.5, 0.7, 0.1])
    with pytest.raises(IncompatibleError, match="after the end time"):
        engine.sample(score="gmm", sde="vp", solver="ddim", shape=(4, 2), times=[1.5, 0.5])
