"""Losses (issue 4): unbiased at the exact score, sensitive away from it, trainable.

The exact score of a Gaussian ``N(mu, sigma^2 I)`` perturbed by the SDE's kernel is
the gmm score with one mode; with ``mu`` and ``log sigma`` as parameters, every score
matching objective is minimised at the true values, so its gradient there has mean
zero. We estimate the gradient on ``M`` independent chunks of data and test the mean
against its Monte-Carlo standard error.
"""

from __future__ import annotations

import pytest
import torch

from diffuse_engine import Engine, GaussianMixture, IncompatibleError, ScoreModel

MU = torch.tensor([0.5, -1.0], dtype=torch.float64)
SIGMA = 0.7
CHUNKS, CHUNK = 20, 1000  # n = 20k samples


class GaussianScore(ScoreModel):
    """Exact score of N(mu, sigma^2 I) under the SDE's kernel, with learnable mu, sigma."""

    name = "gaussian-test"

    def __init__(self, mu, sigma, *, sde):
        super().__init__(sde=sde)
        self.mu = mu.clone().requires_grad_(True)
        self.log_sigma = torch.tensor(float(sigma), dtype=torch.float64).log().requires_grad_(True)

    def forward(self, x, t):
        a, s = self.sde.marginal(t)
        mix = GaussianMixture(
            self.mu[None], self.log_sigma.exp()[None], torch.ones(1, dtype=torch.float64)
        )
        return mix.score(x, a, s)


@pytest.fixture(scope="module")
def engine():
    return Engine(autoload=False)


CASES = [
    ("dsm", "vp", {}),
    ("dsm", "subvp", {"reduce_mean": True}),
    ("dsm", "ve", {}),
    ("dsm", "vp", {"likelihood_weighting": True}),
    ("dsm", "vp", {"time_sampling": "mixed"}),
    ("ddpm", "ddpm", {}),
    ("smld", "ve", {"num_scales": 100}),
    ("ism", "vp", {}),
    ("ssm", "vp", {}),
    ("ssm", "ve", {"distribution": "rademacher", "variance_reduction": False, "projections": 2}),
]


def gradient_z(engine, loss_name, sde_name, fields, mu, seed=0):
    """Mean chunk gradient (mu_0, mu_1, log sigma) divided by its standard error."""
    sde = engine.build("sde", sde_name)
    loss = engine.build("loss", loss_name, sde=sde, **fields)
    model = GaussianScore(mu, SIGMA, sde=sde)
    g = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(CHUNKS):
        x0 = MU + SIGMA * torch.randn(CHUNK, 2, generator=g, dtype=torch.float64)
        value = loss(model, x0, g)
        gm, gs = torch.autograd.grad(value, [model.mu, model.log_sigma])
        grads.append(torch.cat([gm, gs[None]]))
    G = torch.stack(grads)
    se = G.std(0) / CHUNKS**0.5
    return G.mean(0) / se


@pytest.mark.parametrize(
    "loss_name,sde_name,fields", CASES, ids=[f"{a}-{b}-{i}" for i, (a, b, _) in enumerate(CASES)]
)
def test_gradient_vanishes_at_exact_score(engine, loss_name, sde_name, fields):
    z = gradient_z(engine, loss_name, sde_name, fields, MU)
    # three t-statistics with 19 degrees of freedom: |t| > 4.5 has probability < 1e-3 each
    assert z.abs().max() < 4.5, f"biased gradient at the true score: z = {z.tolist()}"
    # power: a mean off by one sigma must give a clearly positive d loss / d mu_0
    z_off = gradient_z(
        engine, loss_name, sde_name, fields, MU + torch.tensor([SIGMA, 0.0], dtype=torch.float64)
    )
    assert z_off[0] > 6, f"gradient does not see a wrong mean: z = {z_off.tolist()}"


def test_loss_decreases_on_a_fixed_batch(engine):
    sde = engine.build("sde", "vp")
    model = engine.build("score", "mlp", sde=sde, shape=[2], hidden=64, depth=2)
    loss = engine.build("loss", "dsm", sde=sde)
    x0 = engine.build("data", "gmm").sample(256, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def value():  # the same t and noise every time: a deterministic objective
        return loss(model, x0, torch.Generator().manual_seed(1))

    with torch.no_grad():
        before = float(value())
    for _ in range(150):
        opt.zero_grad()
        value().backward()
        opt.step()
    with torch.no_grad():
        after = float(value())
    # an untrained net sits near the loss of predicting zero (E|z|^2 = 2); learning the
    # ring's structure must cut it clearly
    assert after < 0.7 * before, (before, after)


def test_smld_refuses_vp_and_ism_refuses_large_dim(engine):
    with pytest.raises(IncompatibleError, match="variance-exploding"):
        engine.build("loss", "smld", sde=engine.build("sde", "vp"))
    sde = engine.build("sde", "vp")
    loss = engine.build("loss", "ism", sde=sde, max_dim=4)
    with pytest.raises(IncompatibleError, match="max_dim"):
        loss(lambda x, t: -x, torch.zeros(3, 8))
