"""``sigma_end`` on every kernel solver: one end noise level for every SDE.

The same ``eps`` is a different noise level on each SDE (``s / a`` at ``t = 1e-3``:
VP 1e-2, sub-VP 1e-4), so an end written as a time does not carry from one SDE to
another; ``sigma_end`` stops where ``s / a`` reaches it instead (k-diffusion's and
EDM's ``sigma_min``)."""

from __future__ import annotations

import math

import pytest
import torch

from diffuse_engine import IncompatibleError, RegistryError
from diffuse_engine.components.schedules import log_snr

SOLVERS = ("ddim", "dpm_solver_pp", "unipc", "ipndm", "edm", "dpm_adaptive_ms")


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("sde_name", ("vp", "subvp", "ve"))
def test_the_grid_ends_where_the_noise_reaches_sigma_end(engine, solver, sde_name):
    sde = engine.build("sde", sde_name)
    s = engine.build("solver", solver, eps=1e-5, sigma_end=0.02)
    grid = s.time_grid(sde)
    (lam_end,) = log_snr(sde, [grid[-1]])
    (lam_eps,) = log_snr(sde, [1e-5])
    assert lam_eps > -math.log(0.02)  # s/a at eps: 1e-3 VP, 1e-6 sub-VP, 0.01 VE
    assert grid[-1] > 1e-5 and math.isclose(lam_end, -math.log(0.02), rel_tol=1e-9)
    assert s.eps(sde) == grid[-1]
    # an eps that is already noisier than sigma_end is the end
    noisy = engine.build("solver", solver, eps=0.5, sigma_end=1e-4)
    assert noisy.eps(sde) == 0.5


def test_sub_vp_and_vp_end_at_the_same_noise_with_the_same_sigma_end(engine):
    ends = {}
    for name in ("vp", "subvp"):
        sde = engine.build("sde", name)
        (ends[name],) = log_snr(
            sde, [engine.build("solver", "ipndm", eps=1e-5, sigma_end=3e-3).eps(sde)]
        )
        # with eps alone (1e-3) their noise levels are a hundred times apart
        (lam_eps,) = log_snr(sde, [1e-3])
        ends[name + "-eps"] = lam_eps
    assert math.isclose(ends["vp"], ends["subvp"], rel_tol=1e-9)
    assert ends["subvp-eps"] - ends["vp-eps"] > math.log(50)


def test_a_run_with_sigma_end_is_the_run_ending_at_that_time(engine):
    """The sample is the same as with ``eps`` set to the time ``sigma_end`` gives."""
    sde = engine.build("sde", "subvp")
    t_end = engine.build("solver", "ipndm", sigma_end=0.01).eps(sde)
    kw = dict(score="gmm", sde="subvp", solver="ipndm", shape=(64, 2), seed=3, steps=8)
    by_sigma = engine.sample(**kw, sigma_end=0.01)
    by_time = engine.sample(**kw, eps=t_end)
    torch.testing.assert_close(by_sigma, by_time, rtol=0, atol=0)
    assert not torch.equal(by_sigma, engine.sample(**kw))  # it did move the end


def test_sigma_end_above_the_noise_at_T_is_refused_in_one_line(engine):
    sde = engine.build("sde", "vp")
    solver = engine.build("solver", "ddim", sigma_end=1e6)
    with pytest.raises(IncompatibleError, match=r"sigma_end = 1e\+06 is at or above .*'vp'"):
        solver.eps(sde)


def test_sigma_end_with_an_explicit_grid_is_refused(engine):
    with pytest.raises(RegistryError, match="times set the end; sigma_end is for a schedule"):
        engine.build("solver", "ddim", times=[1.0, 0.5, 0.01], sigma_end=0.1)
