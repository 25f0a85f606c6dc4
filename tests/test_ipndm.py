"""iPNDM (``ipndm``): Adams-Bashforth steps on the predicted noise in ``sigma = s / a``.

Its convergence orders on the closed-form Gaussian flow, its evaluation count and the
ring are checked with the other fast samplers (tests/test_fast_samplers.py). Here: the
weights themselves, and that order 1 is DDIM.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffuse_plugins.ipndm import ADAMS_BASHFORTH, variable_coefficients


@pytest.mark.parametrize("order", (1, 2, 3, 4))
def test_variable_weights_on_equal_steps_are_adams_bashforth(order):
    sig = [10.0 - 0.5 * k for k in range(8)]
    got = variable_coefficients(sig, 5, order)
    assert got == pytest.approx(ADAMS_BASHFORTH[order], abs=1e-12)


@pytest.mark.parametrize("order", (2, 3, 4))
def test_variable_weights_integrate_polynomials_of_lower_degree_exactly(order):
    """On a geometric grid (log-SNR spacing), the weights times the step integrate every
    polynomial of degree below ``order`` exactly; one degree higher they do not (a
    wrong weight fails the first, a lower-order rule the second)."""
    sig = [80.0 * 0.6**k for k in range(8)]
    i = 6
    h = sig[i + 1] - sig[i]
    c = variable_coefficients(sig, i, order)

    def rule(p):
        return h * sum(ck * p(sig[i - k]) for k, ck in enumerate(c))

    for degree in range(order + 1):

        def p(u, d=degree):
            return u**d

        exact = (sig[i + 1] ** (degree + 1) - sig[i] ** (degree + 1)) / (degree + 1)
        err = abs(rule(p) - exact) / abs(exact)
        if degree < order:
            assert err < 1e-12, (degree, err)
        else:
            assert err > 1e-3, (degree, err)


@pytest.mark.parametrize("clip", [{}, {"x0_clip": 0.5}])
def test_order_one_is_ddim(engine, clip):
    """With x0 clipping too: both re-derive the noise from the clipped ``x0_hat``."""
    kw = dict(score="gmm", sde="vp", shape=500, seed=3, steps=12, schedule="logsnr", **clip)
    a = engine.sample(solver="ipndm", order=1, **kw)
    b = engine.sample(solver="ddim", **kw)
    # float32 round-off of the same update in another order (measured 2e-5)
    assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())


def test_fixed_and_variable_weights_agree_on_steps_equal_in_sigma(engine):
    """An explicit grid of equal steps in ``sigma`` (VE: ``sigma = s``): the two weight
    rules are the same method there, so the samples agree to round-off."""
    sde = engine.build("sde", "ve")
    c = sde.config
    target = torch.linspace(20.0, 0.05, 16, dtype=torch.float64)
    # VE: s(t) = sigma_min (sigma_max / sigma_min)^t
    times = (torch.log(target / c.sigma_min) / math.log(c.sigma_max / c.sigma_min)).tolist()
    a, s = sde.marginal(torch.tensor(times, dtype=torch.float64))
    assert torch.allclose(s / a, target, rtol=1e-9)  # the grid is what it claims
    kw = dict(score="gmm", sde="ve", shape=300, seed=1, times=times, denoise=False)
    fixed = engine.sample(solver="ipndm", order=4, **kw)
    variable = engine.sample(solver="ipndm", order=4, coefficients="variable", **kw)
    assert torch.allclose(fixed, variable, atol=1e-4), float((fixed - variable).abs().max())
    uneven = engine.sample(solver="ipndm", order=4, **{**kw, "times": times[:8] + times[9:]})
    varied = engine.sample(
        solver="ipndm", order=4, coefficients="variable", **{**kw, "times": times[:8] + times[9:]}
    )
    assert (uneven - varied).abs().max() > 1e-3  # an uneven step tells them apart


@pytest.mark.parametrize("coefficients", ("fixed", "variable"))
def test_projection_and_progress_after_every_step(engine, coefficients):
    """The guidance projection and the progress callback come after each step, with the
    step's index and end time, and the projected state is kept (the last projection
    is the sample, with no denoising step)."""
    sde = engine.build("sde", "vp")
    score = engine.build("score", "gmm", sde=sde)
    solver = engine.build(
        "solver", "ipndm", steps=6, order=4, coefficients=coefficients, denoise=False
    )
    grid = solver.grid(sde, score)
    projected, progress = [], []

    def project(x, i, t):
        projected.append((i, t))
        return x.clamp(-0.25, 0.25) if i == len(grid) - 1 else x

    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = solver.sample(
            score, sde, x_T, transform=project, callback=lambda *v: progress.append(v)
        )
    assert projected == [(i, grid.t[i]) for i in range(1, len(grid))]
    assert progress == [(i, len(grid) - 1, grid.t[i]) for i in range(1, len(grid))]
    assert float(out.abs().max()) <= 0.25
