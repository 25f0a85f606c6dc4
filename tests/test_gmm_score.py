"""The exact mixture score against autograd of its log-density, for every SDE."""

from __future__ import annotations

import pytest
import torch

from diffuse_engine import GaussianMixture


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve", "ddpm"])
@pytest.mark.parametrize("t", [1e-3, 0.1, 0.5, 1.0])
def test_gmm_score_is_gradient_of_log_density(engine, sde_name, t):
    """score(x, t) == grad_x log p_t(x) in float64 (round-off level agreement)."""
    sde = engine.build("sde", sde_name)
    model = engine.build("score", "gmm", sde=sde)
    gen = torch.Generator().manual_seed(0)
    _, std = sde.marginal(torch.tensor([t], dtype=torch.float64))
    x = (2.5 + float(std)) * torch.randn(64, 2, generator=gen, dtype=torch.float64)
    x.requires_grad_(True)
    tt = torch.full((64,), t, dtype=torch.float64)
    (grad,) = torch.autograd.grad(model.log_prob(x, tt).sum(), x)
    torch.testing.assert_close(model(x.detach(), tt), grad, rtol=1e-9, atol=1e-9)


def test_gmm_log_prob_normalises_in_1d():
    """The mixture density integrates to one (trapezoid on a fine grid, error < 1e-6)."""
    mix = GaussianMixture(
        torch.tensor([[-1.0], [2.0]], dtype=torch.float64),
        torch.tensor([0.3, 0.7], dtype=torch.float64),
        torch.tensor([0.25, 0.75], dtype=torch.float64),
    )
    x = torch.linspace(-8, 10, 200001, dtype=torch.float64)[:, None]
    p = mix.log_prob(
        x,
        torch.full((x.shape[0],), 0.8, dtype=torch.float64),
        torch.full((x.shape[0],), 0.5, dtype=torch.float64),
    ).exp()
    assert abs(float(torch.trapezoid(p, x[:, 0])) - 1) < 1e-6


def test_gmm_layouts_and_validation(engine):
    from diffuse_engine import RegistryError

    sde = engine.build("sde", "vp")
    m64 = engine.build("score", "gmm64", sde=sde)
    assert m64.mixture.means.shape == (8, 64)
    explicit = engine.build(
        "score",
        "gmm",
        sde=sde,
        layout="explicit",
        means=[[0.0, 0.0], [1.0, 1.0]],
        stds=[0.1, 0.2],
        weights=[1, 3],
    )
    torch.testing.assert_close(
        explicit.mixture.weights, torch.tensor([0.25, 0.75], dtype=torch.float64)
    )
    with pytest.raises(RegistryError, match="stds and weights need one value per mode"):
        engine.build("score", "gmm", sde=sde, layout="explicit", means=[[0.0]], stds=[0.1, 0.2])
