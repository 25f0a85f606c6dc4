"""Precomputed step coefficients (the fast paths of ``pc`` and ``ode``) and the allocator
setting of the command line.

The float paths must make the same updates as the general ones: for every built-in SDE
the samples of both agree to float32 round-off over a whole run.
"""

from __future__ import annotations

import sys

import pytest
import torch

from diffuse_engine import SDE
from diffuse_engine.core.allocator import keep_freed_memory

SDES = ("vp", "ve", "subvp", "ddpm", "cosine")


def _general(sde):
    """The same SDE object with the fast paths switched off, as a plugin SDE with a
    non-linear drift would have them."""
    sde.linear_coefficients = lambda times: None
    sde.linear_discretization = lambda grid: None
    return sde


@pytest.mark.parametrize("sde_name", SDES)
def test_linear_coefficients_match_the_sde(engine, sde_name):
    sde = engine.build("sde", sde_name)
    times = [1.0, 0.5, 0.01]
    f, g2 = sde.linear_coefficients(times)
    t = torch.tensor(times, dtype=torch.float64)
    x = torch.ones(3, 1, dtype=torch.float64)
    assert torch.allclose(torch.tensor(f, dtype=torch.float64)[:, None], sde.drift(x, t))
    assert torch.allclose(torch.tensor(g2, dtype=torch.float64), sde.diffusion(t) ** 2)
    A, G = sde.linear_discretization(times)
    fx, Gt = sde.discretize(2 * x[:2], t[:2], t[1:])
    assert torch.allclose(2 * torch.tensor(A, dtype=torch.float64)[:, None], fx)
    assert torch.allclose(torch.tensor(G, dtype=torch.float64), torch.as_tensor(Gt).expand(2))


@pytest.mark.parametrize("sde_name", SDES)
@pytest.mark.parametrize(
    "solver,kw",
    [
        ("ode", {"method": "rk4"}),
        ("ode", {"method": "heun"}),
        ("ode", {"method": "euler"}),
        ("pc", {}),
    ],
)
def test_fast_path_makes_the_same_updates(engine, sde_name, solver, kw):
    score = engine.build("score", "gmm", sde=engine.build("sde", sde_name))
    out = []
    for general in (False, True):
        sde = engine.build("sde", sde_name)
        if general:
            _general(sde)
        obj = engine.build("solver", solver, steps=50, **kw)
        g = torch.Generator().manual_seed(3)
        x = sde.prior_sample((256, 2), generator=g)
        with torch.no_grad():
            out.append(obj.sample(score, sde, x, generator=g))
    # float64 coefficients against float32 ones: ~1e-7 relative per step, on states as
    # large as the prior's std (50 for VE) early on; measured at most 6e-5 (VP family)
    # and 3e-4 (VE) after 50 steps, where a wrong coefficient moves samples by O(1)
    assert (out[0] - out[1]).abs().max() < 1e-4 + 1e-5 * sde.prior_std


def test_a_nonlinear_drift_has_no_float_coefficients():
    class Cubic(SDE):
        name = "cubic"

        def drift(self, x, t):
            return -(x**3)

        def diffusion(self, t):
            return torch.ones_like(t)

    assert Cubic().linear_coefficients([1.0, 0.5]) is None
    assert Cubic().linear_discretization([1.0, 0.5]) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_sets_glibcs_thresholds(monkeypatch):
    for name in ("DIFFUSE_KEEP_MALLOC", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    assert keep_freed_memory() is True  # mallopt accepted both thresholds


def test_keep_freed_memory_respects_the_users_settings(monkeypatch):
    monkeypatch.setenv("DIFFUSE_KEEP_MALLOC", "1")
    assert keep_freed_memory() is False
    monkeypatch.delenv("DIFFUSE_KEEP_MALLOC")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert keep_freed_memory() is False
