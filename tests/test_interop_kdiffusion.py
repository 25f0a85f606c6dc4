"""The k-diffusion bridge: ``from_denoiser`` and ``to_denoiser`` on the exact mixture.

The exact denoiser of the ring, ``D(x, sigma) = x + sigma^2 grad log p_sigma(x)`` with
``p_sigma`` the ring convolved with ``N(0, sigma^2 I)``, is known in closed form and is
the same whatever SDE wrote the noise. So: the engine's exact VP score turned into a
denoiser must be that ``D`` (to float64 round-off), ``D`` turned into a score for any
SDE must be that SDE's exact score, and sampling must recover the ring both ways, with
the engine's solvers on ``from_denoiser(D)`` and with a k-diffusion-style Heun sampler
(written here in k-diffusion's calling convention, ``D(x, sigma)`` with ``sigma`` of shape
``(B,)``) on ``to_denoiser(score)``. Sample checks use ``assert_recovers`` (5 standard
errors of each per-mode statistic at the sample size).
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_recovers

from diffuse_engine import DiffuseError, Engine, IncompatibleError
from diffuse_engine.interop import from_denoiser, time_of_sigma, to_denoiser

F64 = torch.float64


@pytest.fixture(scope="module")
def engine():
    return Engine(autoload=False)


@pytest.fixture(scope="module")
def ring(engine):
    return engine.bind_score("gmm", engine.build("sde", "vp")).mixture


def exact_denoiser(mixture):
    """The ring's exact denoiser under the VE kernel ``x = x_0 + sigma z``."""

    def D(x, sigma):
        one = torch.ones_like(sigma)
        return x + (sigma**2)[:, None] * mixture.score(x, one, sigma)

    return D


def points(n=64, seed=0, scale=2.5):
    return scale * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---- k-diffusion's sampling, as its sampling.py writes it (s_churn = 0) ------------------
def get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0):
    """k_diffusion.sampling.get_sigmas_karras: n sigmas, then 0 (Karras et al. 2022, eq. 5)."""
    ramp = torch.linspace(0, 1, n, dtype=F64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=F64)])


def sample_heun(model, x, sigmas):
    """k_diffusion.sampling.sample_heun without churn (Karras et al. 2022, Alg. 1)."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = (x - model(x, sigma * s_in)) / sigma
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt  # Euler to sigma 0: x = D(x, sigma)
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - model(x_2, sigma_next * s_in)) / sigma_next
            x = x + (d + d_2) / 2 * dt
    return x


# ---- closed forms -------------------------------------------------------------------------
@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve", "cosine"])
def test_to_denoiser_of_an_exact_score_is_the_exact_denoiser(engine, ring, sde_name):
    sde = engine.build("sde", sde_name)
    D = to_denoiser(engine.bind_score("gmm", sde), sde)
    x = points()
    for sigma in (0.05, 0.3, 2.0, 20.0):
        s = torch.full((x.shape[0],), sigma, dtype=F64)
        got, want = D(x, s), exact_denoiser(ring)(x, s)
        # float64 throughout; the time of sigma is found by bisection to ~1e-16 in t
        assert torch.allclose(got, want, rtol=1e-8, atol=1e-9), (sigma, (got - want).abs().max())


@pytest.mark.parametrize("sde_name", ["vp", "ve", "ddpm"])
def test_from_denoiser_of_the_exact_denoiser_is_the_exact_score(engine, ring, sde_name):
    sde = engine.build("sde", sde_name)
    score = from_denoiser(exact_denoiser(ring), sde=sde)
    exact = engine.bind_score("gmm", sde)
    x = points()
    for t in (0.01, 0.2, 0.6, 1.0):
        tt = torch.full((x.shape[0],), t, dtype=F64)
        got, want = score(x, tt), exact(x, tt)
        assert torch.allclose(got, want, rtol=1e-8, atol=1e-8), (t, (got - want).abs().max())


def test_the_two_are_inverses(engine, ring):
    """to_denoiser(from_denoiser(D)) is D again, across SDEs (VE in, VP out)."""
    D = exact_denoiser(ring)
    ve = engine.build("sde", "ve")
    D2 = to_denoiser(from_denoiser(D, sde=ve), ve)
    x, s = points(), torch.linspace(0.02, 40, 64, dtype=F64)
    assert torch.allclose(D2(x, s), D(x, s), rtol=1e-8, atol=1e-9)


def test_sigma_data_is_kdiffusions_denoiser_preconditioning(engine, ring):
    """With sigma_data, D is k-diffusion's inner model F; layers.Denoiser's scalings,
    written out here, must give back the exact denoiser."""
    sd = 0.5
    D = exact_denoiser(ring)

    def inner(x_in, sigma):  # F such that c_skip x + c_out F(c_in x, sigma) = D(x, sigma)
        v = (sigma**2 + sd**2)[:, None]
        x = x_in * v.sqrt()
        return (D(x, sigma) - x * sd**2 / v) / (sigma[:, None] * sd / v.sqrt())

    sde = engine.build("sde", "vp")
    a = from_denoiser(inner, sigma_data=sd, sde=sde)
    b = from_denoiser(D, sde=sde)
    x, t = points(), torch.linspace(0.01, 1, 64, dtype=F64)
    assert torch.allclose(a(x, t), b(x, t), rtol=1e-8, atol=1e-9)


def test_time_of_sigma_inverts_the_kernel(engine):
    sde = engine.build("sde", "vp")
    t = torch.linspace(1e-3, 1, 50, dtype=F64)
    a, s = sde.marginal(t)
    assert torch.allclose(time_of_sigma(sde, s / a), t, rtol=1e-10, atol=1e-12)


# ---- sampling both ways -------------------------------------------------------------------
def test_engine_samples_a_kdiffusion_denoiser(engine, ring):
    """The exact denoiser through from_denoiser, sampled by the engine's DPM-Solver++ on the
    VE SDE and by its EDM sampler: both recover the ring (n = 8000)."""
    sde = engine.build("sde", "ve")
    score = from_denoiser(exact_denoiser(ring), sde=sde)
    for solver, fields in (("dpm_solver_pp", {"steps": 30}), ("edm", {"steps": 30})):
        x = engine.sample(score=score, sde="ve", solver=solver, shape=(8000, 2), seed=1, **fields)
        assert_recovers(x, ring)


def test_kdiffusion_sampler_samples_an_engine_score(engine, ring):
    """The engine's exact VP score through to_denoiser, sampled by k-diffusion's Heun
    sampler over Karras sigmas from x_T = sigma_max z: recovers the ring (n = 8000)."""
    sde = engine.build("sde", "vp")
    D = to_denoiser(engine.bind_score("gmm", sde), sde)
    sigma_min, sigma_max = max(0.02, D.sigma_min), min(80.0, D.sigma_max)
    sigmas = get_sigmas_karras(40, sigma_min, sigma_max)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8000, 2, generator=g, dtype=F64) * sigma_max
    with torch.no_grad():
        out = sample_heun(D, x, sigmas)
    assert_recovers(out.float(), ring)


# ---- errors -------------------------------------------------------------------------------
def test_errors_are_one_line(engine, ring):
    vp, ve = engine.build("sde", "vp"), engine.build("sde", "ve")
    with pytest.raises(DiffuseError, match="callable"):
        from_denoiser("not a model", sde=vp)
    with pytest.raises(DiffuseError, match="sigma_data"):
        from_denoiser(exact_denoiser(ring), sigma_data=-1.0, sde=vp)
    D = to_denoiser(engine.bind_score("gmm", vp), vp)
    with pytest.raises(DiffuseError, match="outside") as info:
        D(points(4), torch.full((4,), 1e4, dtype=F64))
    assert "\n" not in str(info.value)
    with pytest.raises(IncompatibleError, match="own SDE"):
        to_denoiser(engine.bind_score("gmm", vp), ve)
    score = from_denoiser(exact_denoiser(ring), sde=ve)
    with pytest.raises(IncompatibleError):  # sampled with another SDE than it was built for
        engine.sample(score=score, sde="vp", solver="ddim", shape=(4, 2), steps=2)
