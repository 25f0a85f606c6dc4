"""A sampling call is checked whole before any work: sizes the machine cannot hold are
refused at once, and a model runs in its own dtype whatever dtype the samples ask for."""

from __future__ import annotations

import time

import pytest
import torch

from diffuse_engine import DiffuseError, Engine


@pytest.fixture(scope="module")
def engine():
    return Engine(autoload=False)


@pytest.mark.parametrize("n", [10**12, 10**15])
def test_more_samples_than_memory_are_refused_at_once_with_the_estimate(engine, n):
    start = time.perf_counter()
    with pytest.raises(DiffuseError, match=r"needs at least .* of memory and cpu has .* available"):
        engine.sample(shape=(n, 2))
    assert time.perf_counter() - start < 5  # refused before building a grid or a shard


def test_a_float32_model_samples_in_float64_without_touching_it(engine):
    model = engine.train(data="gmm", sde="vp", model="mlp", steps=2, batch_size=16,
                         hidden=16, depth=1, plot_n=0, warmup=0)  # fmt: skip
    weights = {k: v.clone() for k, v in model.net.state_dict().items()}
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kw = dict(score=model, sde="vp", solver="ddim", shape=(8, 2), steps=4)
    x64 = engine.sample(**kw, dtype=torch.float64, noise=x_T)
    x32 = engine.sample(**kw, noise=x_T.float())
    assert x64.dtype == torch.float64 and x32.dtype == torch.float32
    assert next(model.net.parameters()).dtype == torch.float32
    assert all(torch.equal(v, model.net.state_dict()[k]) for k, v in weights.items())
    # the network ran in float32 both times; only the solver's arithmetic differs, by
    # float32 round-off (eps 1.2e-7) accumulated over 4 steps, relative to |x|
    assert torch.allclose(x64, x32.double(), rtol=1e-5, atol=1e-6)
