"""Gradients through the samplers: adjoint solves agree with backpropagation through
the same solve (diffuse_engine.components.differentiable).

The score is a learnable Gaussian (mean ``mu``, log-std ``rho``) under the VP kernel;
the loss is a fixed linear functional of the samples. Everything runs in float64 so
the comparison measures the adjoint method, not round-off.

Tolerances: reversible Heun is algebraically reversible and its torchsde adjoint
reconstructs the forward trajectory exactly, so adjoint and backprop gradients agree
to round-off (1e-6 relative, far above float64's 1e-16 times the ~1e2 operations per
step). Euler-Maruyama's adjoint solves the continuous adjoint SDE backwards with its
own discretisation, so it differs from backprop by the discretisation error, O(dt):
at dt = 1/200 we allow 5e-2 relative. The ODE adjoint with dopri5 at rtol = atol =
1e-8 solves both directions to about 1e-7; we allow 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffuse_engine.components.differentiable import probability_flow_solve, reverse_sde_solve


class GaussianScore(nn.Module):
    """Exact score of N(mu, exp(rho)^2 I) data under the SDE's kernel."""

    def __init__(self, sde):
        super().__init__()
        self.sde = sde
        self.mu = nn.Parameter(torch.tensor([0.5, -0.3], dtype=torch.float64))
        self.rho = nn.Parameter(torch.tensor(-0.7, dtype=torch.float64))

    def forward(self, x, t):
        a, s = self.sde.marginal(t)
        var = a**2 * torch.exp(2 * self.rho) + s**2
        return -(x - a[:, None] * self.mu) / var[:, None]


def setup(engine, n=64):
    sde = engine.build("sde", "vp")
    net = GaussianScore(sde)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(n, 2, generator=g, dtype=torch.float64).requires_grad_(True)
    w = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return sde, net, x_T, w


def grads(net, x_T, w, solve):
    net.zero_grad()
    x_T.grad = None
    out = solve()
    (out * w).sum().backward()
    return torch.cat([net.mu.grad, net.rho.grad[None], x_T.grad.flatten()]), out.detach()


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method,steps,tol", [("reversible_heun", 100, 1e-6), ("euler", 200, 5e-2)])
def test_sde_adjoint_matches_backprop(engine, method, steps, tol):
    sde, net, x_T, w = setup(engine)
    kw = dict(method=method, steps=steps, entropy=7)
    g_bp, x_bp = grads(net, x_T, w, lambda: reverse_sde_solve(net, sde, x_T, **kw))
    g_adj, x_adj = grads(net, x_T, w, lambda: reverse_sde_solve(net, sde, x_T, adjoint=True, **kw))
    assert torch.allclose(x_bp, x_adj)  # same Brownian path, same forward solve
    assert rel(g_adj, g_bp) <= tol, rel(g_adj, g_bp)
    assert float(net.rho.grad.abs()) > 0  # the parameters do receive a gradient


def test_ode_adjoint_matches_backprop(engine):
    sde, net, x_T, w = setup(engine)
    kw = dict(method="dopri5", rtol=1e-8, atol=1e-8)
    g_bp, x_bp = grads(net, x_T, w, lambda: probability_flow_solve(net, sde, x_T, **kw))
    g_adj, x_adj = grads(
        net, x_T, w, lambda: probability_flow_solve(net, sde, x_T, adjoint=True, **kw)
    )
    assert torch.allclose(x_bp, x_adj)
    assert rel(g_adj, g_bp) <= 1e-5, rel(g_adj, g_bp)


def test_ode_gradient_matches_closed_form(engine):
    """For Gaussian data the probability-flow map is affine: x_0 = mu + std_0 / std_T
    (x_T - a_T mu) per coordinate with std_t^2 = a_t^2 sigma^2 + s_t^2, so
    d x_0 / d x_T = std_eps / std_T exactly; the adjoint gradient must match it."""
    sde, net, x_T, w = setup(engine, n=8)
    out = probability_flow_solve(net, sde, x_T, method="dopri5", rtol=1e-9, atol=1e-9, adjoint=True)
    (out * w).sum().backward()
    t = torch.tensor([sde.sampling_eps, 1.0], dtype=torch.float64)
    a, s = sde.marginal(t)
    std = (a**2 * torch.exp(2 * net.rho.detach()) + s**2).sqrt()
    assert torch.allclose(x_T.grad, w * std[0] / std[1], rtol=1e-5)
