"""Linear SDEs declared by f and g alone: the numeric kernel against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from diffuse_engine import SDE, Engine, LinearSDE, NumericalError, NumericKernel, module_plugin
from diffuse_engine.testbed.conformance import quality_checks
from diffuse_plugins.subvp import SubVPSDE
from diffuse_plugins.ve import VESDE, VEConfig
from diffuse_plugins.vp import VPSDE, BetaConfig


class LinearVP(LinearSDE):
    """VP declared only by its coefficients."""

    name = "linear_vp"
    Config = BetaConfig

    def beta(self, t):
        return self.config.beta_min + t * (self.config.beta_max - self.config.beta_min)

    def drift_coeff(self, t):
        return -0.5 * self.beta(t)

    def diffusion(self, t):
        return self.beta(t).sqrt()


class LinearSubVP(LinearVP):
    name = "linear_subvp"

    def diffusion(self, t):
        b = self.config.beta_min * t + 0.5 * t**2 * (self.config.beta_max - self.config.beta_min)
        return (self.beta(t) * -torch.expm1(-2 * b)).sqrt()


class LinearVE(LinearSDE):
    name = "linear_ve"
    Config = VEConfig

    @property
    def initial_variance(self):  # VE starts from data smoothed by sigma_min (Song et al.)
        return self.config.sigma_min**2

    def drift_coeff(self, t):
        return torch.zeros_like(t)

    def diffusion(self, t):
        c = self.config
        r = math.log(c.sigma_max / c.sigma_min)
        return c.sigma_min * torch.exp(t * r) * math.sqrt(2 * r)


CASES = [(LinearVP, VPSDE), (LinearSubVP, SubVPSDE), (LinearVE, VESDE)]


@pytest.mark.parametrize("linear, closed", CASES, ids=["vp", "subvp", "ve"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_numeric_kernel_matches_closed_form(linear, closed, dtype):
    # times from the smallest sampling eps (1e-5, VE) up to T, dense and log-spaced
    t = torch.cat(
        [
            torch.logspace(-5, 0, 300, dtype=torch.float64),
            torch.linspace(1e-5, 1, 997, dtype=torch.float64),
        ]
    ).to(dtype)
    a, s = linear().marginal(t)
    a_ref, s_ref = closed().marginal(t.double())
    assert a.dtype == dtype and s.dtype == dtype
    # the requirement: 1e-5 relative (float32 rounding alone is ~1e-7)
    assert ((a.double() - a_ref) / a_ref).abs().max() < 1e-5
    assert ((s.double() - s_ref) / s_ref).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_kernel_numeric_registry_option_matches_closed_form(name):
    engine = Engine(autoload=False)
    closed = engine.build("sde", name)
    numeric = engine.build("sde", name, kernel="numeric")
    t = torch.linspace(1e-5, 1, 513, dtype=torch.float64)
    for ref, got in zip(closed.marginal(t), numeric.marginal(t), strict=True):
        assert ((got - ref) / ref).abs().max() < 1e-5
    assert numeric.config.kernel == "numeric"


def test_cosine_numeric_kernel_matches_its_closed_form():
    sde = Engine(autoload=False).build("sde", "cosine")
    c = sde.config
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)[1:]
    phi = (c.end * t + c.s) / (1 + c.s) * math.pi / 2
    phi0 = c.s / (1 + c.s) * math.pi / 2
    a_ref = torch.cos(phi) / math.cos(phi0)
    s_ref = (1 - a_ref**2).sqrt()
    a, s = sde.marginal(t)
    assert ((a - a_ref) / a_ref).abs().max() < 1e-5
    assert ((s - s_ref) / s_ref).abs().max() < 1e-5
    assert abs(sde.prior_std - 1) < 1e-4  # VP: the kernel std at T is ~1


def test_exact_transition_is_ddpm_step_for_vp():
    lin, vp = LinearVP(), VPSDE()
    x = torch.randn(6, 2, dtype=torch.float64)
    t = torch.linspace(0.1, 1, 6, dtype=torch.float64)
    f1, g1 = lin.discretize(x, t, t - 0.01)
    f2, g2 = vp.discretize(x, t, t - 0.01)
    torch.testing.assert_close(f1, f2, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-12)


def test_kernel_follows_input_device_and_dtype():
    sde = LinearVP()
    t = torch.rand(5, device="meta")
    a, s = sde.marginal(t)
    assert a.device.type == "meta" and s.shape == (5,)


def test_numeric_kernel_refuses_a_nonlinear_sde():
    class Nonlinear(SDE):
        name = "nonlinear"

        def drift(self, x, t):
            return -(x**3)

        def diffusion(self, t):
            return torch.ones_like(t)

    with pytest.raises(NumericalError, match="needs a linear SDE"):
        NumericKernel(sde=Nonlinear())


def test_a_plugin_sde_from_f_and_g_registers_and_builds():
    plugin = module_plugin(diffuse_register_sdes=lambda: [LinearVP])
    engine = Engine(plugins=[plugin], autoload=False)
    sde = engine.build("sde", "linear_vp", beta_max=10.0)
    a, s = sde.marginal(torch.tensor([1.0], dtype=torch.float64))
    assert abs(float(a) - math.exp(-0.5 * (0.1 + 0.5 * 9.9))) < 1e-9


@pytest.mark.parametrize(
    "solver, overrides",
    [
        ("pc", {"steps": 400}),
        ("ode", {"steps": 100}),
    ],
)
def test_cosine_schedule_end_to_end_recovers_the_mixture(solver, overrides):
    # 8000 samples: the per-mode bounds are 5 standard errors at this n (see quality_checks)
    engine = Engine(autoload=False)
    res = engine.sampling(score="gmm", sde="cosine", solver=solver, shape=8000, seed=0, **overrides)
    checks = quality_checks(res.samples, res.score.mixture, z=5.0)
    assert all(c.passed for c in checks), [(c.check, c.measured) for c in checks]


def test_cosine_schedule_likelihood_matches_the_mixture_density():
    """Likelihood through the ODE needs only the kernel: with the numeric one it matches
    the exact log-density of p_eps at the same points (no sampling noise; the
    likelihood issue's target of 0.01 nats per dimension)."""
    engine = Engine(autoload=False)
    sde = engine.build("sde", "cosine")
    model = engine.build("score", "gmm", sde=sde)
    x = model.mixture.sample(100, generator=torch.Generator().manual_seed(0))
    t = torch.full((100,), sde.sampling_eps, dtype=torch.float64)
    exact = model.log_prob(x.double(), t=t)
    ll = engine.log_likelihood(x, score="gmm", sde="cosine")
    err = ll.double() - exact
    assert abs(float(err.mean())) <= 0.01 * 2 and float(err.pow(2).mean().sqrt()) <= 0.01 * 2


def test_cosine_schedule_trains_with_denoising_score_matching():
    """The DSM loss draws x_t and its target from the numeric kernel; at the exact score
    it is lower than for a wrong score (the exact score minimises it in expectation)."""
    engine = Engine(autoload=False)
    sde = engine.build("sde", "cosine")
    exact = engine.build("score", "gmm", sde=sde)
    loss = engine.build("loss", "dsm", sde=sde)
    x0 = exact.mixture.sample(4096, generator=torch.Generator().manual_seed(0))
    good = loss(exact, x0, torch.Generator().manual_seed(1))
    wrong = loss(lambda x, t: 0.8 * exact(x, t), x0, torch.Generator().manual_seed(1))
    assert good.dim() == 0 and torch.isfinite(good)
    assert float(good) < float(wrong)
