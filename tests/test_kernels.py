"""Each SDE's closed-form kernel against its coefficients and against simulation."""

from __future__ import annotations

import math

import pytest
import torch

SDES = ["vp", "subvp", "ve", "ddpm"]


@pytest.mark.parametrize("name", SDES)
def test_kernel_moments_solve_the_moment_odes(engine, name):
    """For dx = f(t) x dt + g dw the kernel obeys m' = f m and v' = 2 f v + g^2.

    Checked by central differences in float64 at interior times (away from the DDPM
    chain's grid points, where its piecewise-constant rates jump). Central differences
    with h = 1e-6 have truncation error ~h^2 * m''' ~ 1e-10 and round-off ~1e-16/h ~
    1e-10 relative, so 1e-6 relative is a bound with margin that still catches any
    inconsistent coefficient (errors are O(1) relative).
    """
    sde = engine.build("sde", name)
    t = torch.tensor([0.0505, 0.2345, 0.5005, 0.7775, 0.9495], dtype=torch.float64)
    h = 1e-6
    m, s = sde.marginal(t)
    mp, sp = sde.marginal(t + h)
    mm, sm = sde.marginal(t - h)
    dm = (mp - mm) / (2 * h)
    dv = (sp**2 - sm**2) / (2 * h)
    f = sde.drift_coeff(t)
    g2 = sde.diffusion(t) ** 2
    torch.testing.assert_close(dm, f * m, rtol=1e-6, atol=0)
    torch.testing.assert_close(dv, 2 * f * s**2 + g2, rtol=1e-6, atol=0)


def simulate_forward(sde, x0, checkpoints, dt, gen):
    """Euler-Maruyama simulation of the forward SDE from x0; states at ``checkpoints``."""
    x, out, t = x0.clone(), {}, 0.0
    for t_end in checkpoints:
        while t < t_end - dt / 2:
            tt = torch.full((x.shape[0],), t, dtype=x.dtype)
            noise = torch.randn(x.shape, generator=gen, dtype=x.dtype)
            x = x + sde.drift(x, tt) * dt + sde.diffusion(tt)[:, None] * math.sqrt(dt) * noise
            t += dt
        out[t_end] = x
    return out


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_kernel_matches_monte_carlo_forward_sde(engine, name):
    """Simulate n paths from a fixed x0; compare sample mean and variance with the kernel
    at t = 0.1, 0.5 and 1.

    Standard errors at n paths: mean ``s / sqrt(n)``, variance ``v sqrt(2 / (n - 1))``.
    The Euler-Maruyama weak error with dt = 1e-3 is about beta dt / 4 <= 0.5% relative in
    the variance (the stationary variance of the discretised VP process), below the 5-sigma
    bounds (about 3.5% of s and 5% of v at n = 20000). For VE the process starts from
    x0 + sigma_min z (the paper's convention; see diffuse_plugins.ve).
    """
    sde = engine.build("sde", name)
    n = 20000
    gen = torch.Generator().manual_seed(1)
    x0 = torch.full((n, 1), 1.5, dtype=torch.float64)
    if name == "ve":
        x0 = x0 + sde.config.sigma_min * torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
    states = simulate_forward(sde, x0, (0.1, 0.5, 1.0), 1e-3, gen)
    for t_end, xt in states.items():
        a, s = sde.marginal(torch.tensor([t_end], dtype=torch.float64))
        mean, var = float(a * 1.5), float(s**2)
        assert abs(float(xt.mean()) - mean) <= 5 * math.sqrt(var / n), t_end
        assert abs(float(xt.var()) / var - 1) <= 5 * math.sqrt(2 / (n - 1)), t_end


def test_ddpm_closed_form_matches_running_the_chain(engine):
    """q(x_i | x_0) = N(sqrt(abar_i) x0, 1 - abar_i) against the chain run i steps.

    Bounds are 5 standard errors at n = 20000 (as above); the chain is exact, so there
    is no discretisation allowance.
    """
    sde = engine.build("sde", "ddpm")
    N = sde.config.N
    n = 20000
    gen = torch.Generator().manual_seed(2)
    x = torch.full((n, 1), 1.5, dtype=torch.float64)
    done = 0
    for i in (10, 250, N):
        for j in range(done, i):
            b = float(sde.betas[j])
            x = (1 - b) ** 0.5 * x + b**0.5 * torch.randn(x.shape, generator=gen, dtype=x.dtype)
        done = i
        a, s = sde.marginal(torch.tensor([i / N], dtype=torch.float64))
        abar = math.prod(1 - float(b) for b in sde.betas[:i])
        assert math.isclose(float(a) ** 2, abar, rel_tol=1e-9)
        assert math.isclose(float(s) ** 2, 1 - abar, rel_tol=1e-9)
        assert abs(float(x.mean()) - float(a) * 1.5) <= 5 * float(s) / math.sqrt(n)
        assert abs(float(x.var()) / float(s) ** 2 - 1) <= 5 * math.sqrt(2 / (n - 1))


def test_ddpm_step_beta_is_the_chain_beta(engine):
    """Between t=(i-1)/N and t=i/N the VP discretisation uses exactly beta_i."""
    sde = engine.build("sde", "ddpm")
    N = sde.config.N
    i = torch.tensor([1, 2, 500, N], dtype=torch.float64)
    beta = sde._step_beta(i / N, (i - 1) / N)
    torch.testing.assert_close(beta, sde.betas[(i - 1).long()], rtol=1e-9, atol=0)


@pytest.mark.parametrize("name", SDES)
def test_prior_matches_kernel_at_T(engine, name):
    """The prior is the kernel at T for data near the origin (mean coeff -> 0 or std >> data)."""
    sde = engine.build("sde", name)
    a, s = sde.marginal(torch.tensor([sde.T], dtype=torch.float64))
    assert float(a) < 1e-2 or float(s) > 10
    assert math.isclose(float(s), sde.prior_std, rel_tol=1e-2)
    z = torch.zeros(3, 2, dtype=torch.float64)
    expected = -math.log(2 * math.pi * sde.prior_std**2)
    torch.testing.assert_close(
        sde.prior_log_prob(z), torch.full((3,), expected, dtype=torch.float64)
    )
