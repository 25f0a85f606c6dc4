"""Shared fixtures and the exact-mixture recovery check used across the suite."""

from __future__ import annotations

import contextlib
import math
import signal
import subprocess

import pytest
import torch

from diffuse_engine import Engine, GaussianMixture, mode_statistics

# Tests run in parallel (pytest -n 2 on 2 cores): one intra-op thread per worker avoids
# oversubscription, which otherwise makes small tensor ops 10x slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded_global_rng():
    """Every test starts from the same global torch RNG state, so a failure reproduces
    exactly with ``pytest -k`` whatever order or worker ran it."""
    torch.manual_seed(20261125)


@pytest.fixture(scope="session")
def engine() -> Engine:
    """An engine with the built-in plugins and the default registry."""
    return Engine(autoload=False)


def assert_recovers(samples, mixture: GaussianMixture, z: float = 5.0) -> dict:
    """Assert per-mode weight, std and centre of ``samples`` match ``mixture``.

    Bounds are ``z`` standard errors of each estimator at this sample size ``n``
    (``n_k = w_k n`` samples in mode ``k``): a weight has standard error
    ``sqrt(w (1 - w) / n)``; a relative std estimate ``1 / sqrt(2 n_k)`` per coordinate
    (the mean over coordinates of their absolute values is below ``z`` of it); a centre
    coordinate in units of the mode's std ``1 / sqrt(n_k)`` (its RMS over coordinates
    too). With ``z = 5`` an exact sampler fails with probability below about 1e-5 per
    check, while a discretisation bias larger than the bound fails.
    """
    st = mode_statistics(samples, mixture)
    n = st["n"]
    assert st["non_finite"] == 0
    modes = st["modes"]
    for k, w in enumerate(modes["weight_true"]):
        n_k = w * n
        se_w = math.sqrt(w * (1 - w) / n)
        assert abs(modes["weight"][k] - w) <= z * se_w, (k, modes["weight"][k], w, z * se_w)
        assert modes["std_error"][k] <= z / math.sqrt(2 * n_k), (k, modes["std_error"][k])
        assert modes["centre_error"][k] <= z / math.sqrt(n_k), (k, modes["centre_error"][k])
    return st


@contextlib.contextmanager
def running(args: list[str]):
    """A child process that takes Ctrl-C like a terminal would (pytest-xdist workers ignore
    SIGINT and children inherit that), killed on the way out whatever happened."""
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
