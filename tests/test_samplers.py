"""Every SDE x predictor/corrector, and the probability-flow ODE, recover the mixture.

The exact score of the default 8-mode ring is sampled at 1000 steps (1000 score
evaluations for the ODE) and compared mode by mode with bounds derived from n
(``conftest.assert_recovers``).
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_recovers

N = 10000
SDES = ["vp", "subvp", "ve", "ddpm"]
PC = [
    ("euler_maruyama", "none"),
    ("reverse_diffusion", "none"),
    ("ancestral", "none"),
    ("reverse_diffusion", "langevin"),
    ("ancestral", "annealed_langevin"),
]
ODE = [("euler", 1000), ("heun", 500), ("rk4", 250)]


def mixture_of(engine, sde):
    return engine.build("score", "gmm", sde=engine.build("sde", sde)).mixture


@pytest.mark.parametrize("sde", SDES)
@pytest.mark.parametrize("predictor,corrector", PC)
def test_pc_recovers_mixture(engine, sde, predictor, corrector):
    x = engine.sample(
        score="gmm",
        sde=sde,
        solver="pc",
        shape=N,
        seed=0,
        steps=1000,
        predictor=predictor,
        corrector=corrector,
    )
    assert x.shape == (N, 2)
    assert_recovers(x, mixture_of(engine, sde))


@pytest.mark.parametrize("sde", SDES)
@pytest.mark.parametrize("method,steps", ODE)
def test_ode_recovers_mixture(engine, sde, method, steps):
    r = engine.sampling(
        score="gmm", sde=sde, solver="ode", shape=N, seed=0, steps=steps, method=method
    )
    assert r.nfe == 1000 + 1  # plus the final denoising step
    assert_recovers(r.samples, mixture_of(engine, sde))


def test_langevin_corrector_alone_samples_the_mixture_at_small_t(engine):
    """Langevin MCMC at fixed t = 1e-3 from N(0, I) reaches p_t of an overlapping 2-mode
    mixture (overlapping so the chain mixes between modes in a few thousand steps).

    Checked by the Kolmogorov-Smirnov distance of the first coordinate to the exact
    marginal CDF: at n = 4000 its 0.1% critical value is 1.95 / sqrt(n) = 0.031; the
    step-size bias of Langevin at snr = 0.16 (step ~ 0.05 var) is O(step / 4) ~ 1% in
    variance, well inside it. Plus the second coordinate's variance within 5 standard
    errors (sqrt(2 / n) relative).
    """
    sde = engine.build("sde", "vp")
    model = engine.build(
        "score",
        "gmm",
        sde=sde,
        layout="explicit",
        means=[[-0.6, 0.0], [0.6, 0.0]],
        stds=[0.4, 0.5],
        weights=[0.3, 0.7],
    )
    corrector = engine.catalogue.get("corrector", "langevin")(snr=0.16, steps=3000)
    n = 4000
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    t = torch.full((n,), 1e-3, dtype=torch.float64)
    x, _ = corrector.step(x, t, model, sde, gen)
    a, s = sde.marginal(t[:1])
    mix = model.mixture
    var = a**2 * mix.stds**2 + s**2
    xs = x[:, 0].sort().values
    cdf = (
        mix.weights * 0.5 * (1 + torch.erf((xs[:, None] - a * mix.means[:, 0]) / (2 * var).sqrt()))
    ).sum(1)
    ecdf = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = float(torch.maximum((ecdf - cdf).abs(), (ecdf - 1 / n - cdf).abs()).max())
    assert ks <= 1.95 / n**0.5, ks
    y_var = float((mix.weights * var).sum())
    assert abs(float(x[:, 1].var()) / y_var - 1) <= 5 * (2 / n) ** 0.5


def test_sampling_is_reproducible_and_seed_dependent(engine):
    a = engine.sample(score="gmm", sde="vp", solver="pc", shape=64, seed=7, steps=20)
    b = engine.sample(score="gmm", sde="vp", solver="pc", shape=64, seed=7, steps=20)
    c = engine.sample(score="gmm", sde="vp", solver="pc", shape=64, seed=8, steps=20)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_nfe_counts_predictor_corrector_and_denoise(engine):
    r = engine.sampling(
        score="gmm", sde="ve", solver="pc", shape=8, seed=0, steps=10, corrector_steps=2
    )
    assert r.nfe == 10 * (1 + 2) + 1
    r = engine.sampling(
        score="gmm",
        sde="ve",
        solver="pc",
        shape=8,
        seed=0,
        steps=10,
        corrector="none",
        denoise=False,
    )
    assert r.nfe == 10


def test_callable_score_with_epsilon_parameterisation(engine):
    """A callable predicting the noise of N(0, I) data: eps_hat = std * x / (a^2 + s^2)."""
    sde = engine.build("sde", "vp")

    def eps_net(x, t):
        a, s = sde.marginal(t)
        return (s / (a**2 + s**2))[:, None] * x

    x = engine.sample(
        score=eps_net,
        sde="vp",
        solver="ode",
        shape=(20000, 2),
        seed=0,
        steps=100,
        parameterisation="epsilon",
    )
    # the data law is N(0, I): sample variance within 5 standard errors sqrt(2/n)
    assert float((x.var(0) - 1).abs().max()) <= 5 * (2 / 20000) ** 0.5


# ---- the grown test beds (issue 16): elongated, image-shaped, unequal mixtures ----------
def test_elongated_mixture_score_is_the_gradient_of_its_log_density(engine):
    sde = engine.build("sde", "vp")
    score = engine.build("score", "gmm", sde=sde, elongation=4.0, std=0.2)
    assert tuple(score.mixture.stds.shape) == (8, 2)  # per-dimension stds
    x = torch.randn(64, 2, dtype=torch.float64, requires_grad=True)
    t = torch.full((64,), 0.05, dtype=torch.float64)
    (grad,) = torch.autograd.grad(score.log_prob(x, t).sum(), x)
    torch.testing.assert_close(score(x.detach(), t), grad, rtol=1e-9, atol=1e-9)


def test_elongated_mixture_samples_have_their_per_dimension_stds(engine):
    from diffuse_engine.components.mixture import mode_statistics

    score = engine.build("score", "gmm", sde=engine.build("sde", "vp"), elongation=4.0)
    n = 40000
    x = score.mixture.sample(n, generator=torch.Generator().manual_seed(0))
    st = mode_statistics(x, score.mixture)
    # ~5000 per mode: relative std noise 1/sqrt(2 n_k) = 0.01; 3x that
    assert st["std_error"] < 0.03 and st["weight_tv"] < 0.02


def test_image_shaped_mixture_and_unequal_weights(engine):
    sde = engine.build("sde", "vp")
    score = engine.build(
        "score", "gmm", sde=sde, layout="random", dim=48, shape=[3, 4, 4], weight_ratio=50.0
    )
    assert score.data_shape == (3, 4, 4)
    w = score.mixture.weights
    assert float(w.max() / w.min()) == pytest.approx(50.0)
    x = engine.sample(score=score, sde="vp", solver="unipc", shape=16, seed=0, nfe=5)
    assert x.shape == (16, 3, 4, 4)
    with pytest.raises(Exception, match="product equal to dim"):
        engine.build("score", "gmm", sde=sde, layout="random", dim=40, shape=[3, 4, 4])


def test_shards_have_a_byte_budget():
    from diffuse_engine.core.distributed import DEFAULT_SHARD_SIZE, shard_size_for

    assert shard_size_for(DEFAULT_SHARD_SIZE, (2,), 4) == DEFAULT_SHARD_SIZE
    assert shard_size_for(DEFAULT_SHARD_SIZE, (64,), 4) == DEFAULT_SHARD_SIZE
    # (3, 32, 32) float32 is 12 KiB a sample: 16 MiB holds 1365 of them
    assert shard_size_for(DEFAULT_SHARD_SIZE, (3, 32, 32), 4) == 16 * 2**20 // 12288
    assert shard_size_for(5, (3, 1024, 1024), 8) == 1
