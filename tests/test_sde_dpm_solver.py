"""SDE-DPM-Solver++ (``dpm_solver`` with ``stochastic = true``): the reverse-time SDE in
log-SNR with data prediction, checked against closed forms."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_recovers

from diffuse_engine import DiffuseError

IMBALANCED = dict(
    layout="explicit", means=[[-2.0, 0.0], [2.0, 0.0]], stds=[0.3, 0.3], weights=[1.0, 50.0]
)


def test_first_order_is_the_ddpm_posterior_step(engine):
    """Order 1 is ``x_t = (s_t/s_s) e^-h x_s + a_t (1 - e^-2h) x0 + s_t sqrt(1 - e^-2h) z``,
    the Gaussian posterior ``q(x_t | x_s, x0_hat)``: DDIM with eta = 1 on the same grid
    and the same noise draws. Equal to float32 round-off (50 steps of O(1) values)."""
    kw = dict(score="gmm", sde="vp", shape=(500, 2), seed=4, steps=50, schedule="logsnr")
    sde = engine.sample(solver="dpm_solver_pp", stochastic=True, order=1, eps=1e-3, **kw)
    ddim = engine.sample(solver="ddim", eta=1.0, eps=1e-3, **kw)
    assert torch.allclose(sde, ddim, atol=1e-4, rtol=0), (sde - ddim).abs().max()


@pytest.mark.parametrize("bed", ({}, IMBALANCED), ids=("ring", "1:50"))
def test_second_order_recovers_the_mixture(engine, bed):
    """The registry entry (2M, 100 evaluations) on the ring and on a 1:50 pair: per-mode
    weight, std and centre within 5 standard errors at n = 20 000 (assert_recovers).
    Dropping the noise term narrows the modes (the ODE's step with a stochastic
    solver's coefficients), doubling it widens them: both fail these bounds."""
    r = engine.sampling(score="gmm", sde="vp", solver="dpm_solver_pp_sde", shape=20000,
                        seed=1, **bed)  # fmt: skip
    assert r.nfe == 100
    assert_recovers(r.samples, r.score.mixture)


def test_is_seeded_and_stochastic(engine):
    kw = dict(score="gmm", sde="vp", solver="dpm_solver_pp_sde", shape=(64, 2), steps=20)
    a, b = engine.sample(seed=2, **kw), engine.sample(seed=2, **kw)
    assert torch.equal(a, b)
    solver = engine.build("solver", "dpm_solver_pp_sde")
    assert solver.deterministic is False and engine.build("solver", "dpm_solver_pp").deterministic
    # the same x_T with other noise draws gives other samples
    sde = engine.build("sde", "vp")
    score = engine.bind_score("gmm", sde)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    outs = [solver.sample(score, sde, x.clone(), generator=torch.Generator().manual_seed(k))
            for k in (1, 2)]  # fmt: skip
    assert not torch.equal(*outs)


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"order": 3}, "order 1 or 2"),
        ({"prediction": "noise"}, "prediction 'data'"),
        ({"method": "singlestep"}, "method 'multistep'"),
    ],
)
def test_what_it_is_not_is_refused_in_one_line(engine, kw, needle):
    with pytest.raises(DiffuseError, match=needle) as info:
        engine.build("solver", "dpm_solver_pp_sde", **kw)
    assert "\n" not in str(info.value).strip()
