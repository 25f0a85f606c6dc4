"""The exact posterior of the mixture test bed, and the observation operators.

The posterior is checked three ways: against Monte-Carlo rejection sampling of the prior
in 2-D (accept ``x`` with probability ``exp(-|y - A x|^2 / (2 sigma^2))``, which draws the
posterior exactly), through Bayes' rule pointwise (``log p(x | y) = log p(x) + log p(y |
x) - log p(y)`` to round-off), and in the noiseless limit. Statistical bounds: with
``n`` draws a weight's standard error is ``sqrt(w (1 - w) / n)`` and a mode's mean error
``sd / sqrt(n_k)`` per coordinate; tests allow 5 of them (chance failure ~1e-6 each).
"""

from __future__ import annotations

import math

import pytest
import torch

from diffuse_engine import DiffuseError, Engine
from diffuse_engine.components.observation import (
    dense,
    downsample,
    greyscale,
    mask_operator,
    operator,
)
from diffuse_engine.components.posterior import linear_gaussian_posterior, posterior_statistics

A = torch.tensor([[1.0, 0.0]])
Y = torch.tensor([math.sqrt(2)])


@pytest.fixture(scope="module")
def ring():
    engine = Engine(autoload=False)
    return engine.build("score", "gmm", sde=engine.build("sde", "vp")).mixture


def test_posterior_matches_rejection_sampling(ring):
    sigma = 0.3
    post = linear_gaussian_posterior(ring, A, Y, sigma)
    g = torch.Generator().manual_seed(0)
    x = ring.sample(400_000, generator=g, dtype=torch.float64)
    accept = torch.rand(x.shape[0], generator=g, dtype=torch.float64) < torch.exp(
        -((Y.double() - x[:, 0]) ** 2) / (2 * sigma**2)
    )
    xs = x[accept]
    n = xs.shape[0]
    assert n > 20_000  # the acceptance rate is p(y) sqrt(2 pi) sigma, about 0.09 here
    k = post.assign(xs)
    w_hat = torch.bincount(k, minlength=8).double() / n
    w = post.weights
    assert ((w_hat - w).abs() <= 5 * (w * (1 - w) / n).sqrt() + 1e-12).all(), (w_hat, w)
    for j in range(8):
        if w[j] * n < 500:
            continue
        xj = xs[k == j]
        sd = post.covs[j].diagonal().sqrt()
        assert ((xj.mean(0) - post.means[j]).abs() <= 5 * sd / math.sqrt(len(xj))).all()
        # a variance's relative standard error is sqrt(2 / n_k)
        rel = xj.var(0) / post.covs[j].diagonal() - 1
        assert (rel.abs() <= 5 * math.sqrt(2 / len(xj))).all(), rel


def test_log_prob_is_bayes_rule(ring):
    sigma = 0.3
    post = linear_gaussian_posterior(ring, A, Y, sigma)
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loglik = -0.5 * (Y.double() - x[:, 0]) ** 2 / sigma**2 - 0.5 * math.log(2 * math.pi * sigma**2)
    prior = ring.to("cpu", torch.float64).log_prob(x)
    gap = post.log_prob(x) - (prior + loglik - post.log_evidence)
    assert gap.abs().max() < 1e-10


def test_noiseless_posterior_is_the_small_noise_limit(ring):
    exact = linear_gaussian_posterior(ring, A, Y, 0.0)
    near = linear_gaussian_posterior(ring, A, Y, 1e-5)
    assert (exact.weights - near.weights).abs().max() < 1e-4
    assert (exact.means - near.means).abs().max() < 1e-4
    x = exact.sample(100, torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.allclose(x[:, 0], Y.double().expand(100))  # on the support {A x = y}
    assert exact.basis.shape == (2, 1) and torch.isfinite(exact.log_prob(x)).all()


def test_exact_samples_meet_the_statistics_floor(ring):
    """posterior_statistics of exact samples is pure sampling noise."""
    post = linear_gaussian_posterior(ring, A, Y, 0.1)
    n = 20_000
    st = posterior_statistics(post.sample(n, torch.Generator().manual_seed(3)), post, A, Y)
    tv_sd = 0.5 * (post.weights * (1 - post.weights) / n).sqrt().sum()
    assert st["weight_tv"] < 5 * tv_sd
    # two modes carry the mass, each with n_k >= 0.3 n samples: mean error ~ 1 / sqrt(n_k)
    assert st["mean_error"] < 5 / math.sqrt(0.3 * n)
    assert st["cov_error"] < 5 * math.sqrt(2 / (0.3 * n))


def test_noiseless_observation_needs_full_row_rank(ring):
    with pytest.raises(DiffuseError, match="full row rank"):
        linear_gaussian_posterior(ring, torch.ones(2, 2), torch.zeros(2), 0.0)
    with pytest.raises(DiffuseError, match=r"A must be \(m, 2\)"):
        linear_gaussian_posterior(ring, torch.ones(1, 3), torch.zeros(1), 0.1)


@pytest.mark.parametrize(
    "op",
    [
        greyscale((3, 4, 4)),
        downsample((1, 4, 4), 2),
        downsample((2, 4, 6), 2),
        mask_operator(torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0)) > 0.5),
        dense(torch.randn(5, 48, generator=torch.Generator().manual_seed(1)), (3, 4, 4)),
        operator(
            lambda x: x.flip(-1).reshape(x.shape[0], -1),
            lambda r: r.reshape(-1, 3, 4, 4).flip(-1),
            (3, 4, 4),
            48,
        ),
    ],
    ids=["greyscale", "downsample", "downsample-channels", "mask", "dense", "callable"],
)
def test_operators_are_linear_with_their_adjoint_and_matrix(op):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, *op.dims, generator=g, dtype=torch.float64)
    r = torch.randn(3, op.out_dim, generator=g, dtype=torch.float64)
    Ax = op.forward(x)
    assert Ax.shape == (3, op.out_dim)
    # <A x, r> = <x, A^T r>, and the dense matrix agrees with the callables
    assert torch.allclose((Ax * r).sum(1), (x * op.adjoint(r)).sum((1, 2, 3)))
    assert torch.allclose(Ax, x.reshape(3, -1) @ op.matrix().T)


def test_greyscale_is_the_channel_mean():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float64).reshape(2, 3, 2, 2)
    assert torch.equal(greyscale((3, 2, 2)).forward(x), x.mean(1).reshape(2, 4))
    with pytest.raises(DiffuseError, match=r"greyscale needs \(C, H, W\)"):
        greyscale((8, 8))
    with pytest.raises(DiffuseError, match="divisible by 3"):
        downsample((1, 8, 8), 3)
