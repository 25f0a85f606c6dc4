"""The example plugin's own tests, using the engine's pytest plugin (fixture diffuse_check).

Run with ``pytest`` after ``pip install .`` (the engine's ``pytest11`` entry point makes
the fixture available; nothing to configure).
"""

import math

import torch

from diffuse_engine import Engine


def test_ou_sde_conforms(diffuse_check):
    diffuse_check("example_ou", solver="example_ddim", steps=100, n=4000)


def test_ddim_solver_conforms_on_vp(diffuse_check):
    diffuse_check("example_ddim", sde="vp", steps=100, n=4000)


def test_ou_numeric_kernel_matches_the_closed_form():
    sde = Engine().build("sde", "example_ou", theta=3.0, sigma=2.0)
    t = torch.linspace(1e-3, 1, 200, dtype=torch.float64)
    a, s = sde.marginal(t)
    ref_a = torch.exp(-3.0 * t)
    ref_s = 2.0 * (1 - ref_a**2).sqrt()
    assert ((a - ref_a) / ref_a).abs().max() < 1e-6
    assert ((s - ref_s) / ref_s).abs().max() < 1e-6


def test_mlp_score_shapes():
    engine = Engine()
    sde = engine.build("sde", "example_ou")
    model = engine.build("score", "example_mlp", sde=sde)
    x = torch.randn(5, 2)
    out = model(x, torch.rand(5))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert sum(p.numel() for p in model.parameters()) > 0
    assert math.isfinite(float(out.sum()))
