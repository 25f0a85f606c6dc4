"""NaN/Inf during sampling: found where it first appears, blamed on the right component,
without a host-device sync per step.

Faults are injected at known places (a score that turns NaN below a chosen time, a
score so large that the solver's update overflows float32), so the expected step and
time follow from the solver's own time grid.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from diffuse_engine import Engine, NumericalError

T_BAD = 0.5  # the injected score fault starts below this time
SYNCS = {"item", "__bool__", "tolist", "__float__", "__int__", "__index__", "numpy"}


@pytest.fixture(scope="module")
def engine():
    return Engine(autoload=False)


def nan_below(t_bad: float, rows=(3, 7)):
    """The N(0, I) score, but NaN in ``rows`` once ``t < t_bad``."""

    def score(x, t):
        bad = (t < t_bad)[:, None] & torch.isin(torch.arange(len(x)), torch.tensor(rows))[:, None]
        return torch.where(bad, torch.nan, -x)

    return score


def first_step_below(engine, solver, t_bad, steps, **overrides):
    """1-based step whose first score call is at a time below ``t_bad``, and that time."""
    sde = engine.build("sde", "vp")
    grid = engine.build("solver", solver, steps=steps, **overrides).time_grid(sde)
    k = next(i for i, t in enumerate(grid) if t < t_bad)
    return k + 1, grid[k]


@pytest.mark.parametrize(
    "solver,overrides", [("pc", {}), ("ancestral", {}), ("ode", {"method": "euler"})]
)
def test_score_nan_is_located_at_its_step_and_time(engine, solver, overrides):
    steps = 100
    step, t = first_step_below(engine, solver, T_BAD, steps, **overrides)
    with pytest.raises(NumericalError) as info:
        engine.sample(
            score=nan_below(T_BAD), solver=solver, shape=(32, 2), steps=steps, **overrides
        )
    msg = str(info.value)
    assert f"step {step} of {steps} (t = {t:.4g})" in msg, msg
    # two bad rows of two coordinates
    assert "the score model 'callable' returned 4 NaN/Inf values for a finite input" in msg


def test_score_nan_inside_a_runge_kutta_step(engine):
    # rk4 evaluates at t_mid = t - h/2 first; the fault starts at the first t_mid < 0.5
    sde = engine.build("sde", "vp")
    grid = engine.build("solver", "ode", steps=100).time_grid(sde)
    k = next(i for i in range(100) if (grid[i] + grid[i + 1]) / 2 < T_BAD)
    with pytest.raises(
        NumericalError,
        match=rf"step {k + 1} of 100 \(t = "
        rf"{(grid[k] + grid[k + 1]) / 2:.4g}\).*score model",
    ):
        engine.sample(score=nan_below(T_BAD), solver="ode", shape=(8, 2), steps=100)


def test_solver_overflow_is_blamed_on_the_solver(engine):
    # finite score outputs (3e37 < float32 max 3.4e38), but g(1)^2 = 20 times it overflows
    def huge(x, t):
        return torch.full_like(x, 3e37)

    with pytest.raises(NumericalError) as info:
        engine.sample(
            score=huge,
            solver="pc",
            predictor="euler_maruyama",
            corrector="none",
            shape=(8, 2),
            steps=50,
        )
    msg = str(info.value)
    assert "step 1 of 50 (t = 0.98)" in msg and "the solver 'pc'" in msg, msg
    assert "score model's outputs were finite" in msg


def test_overflow_inside_a_runge_kutta_step(engine):
    with pytest.raises(NumericalError, match=r"step 1 of 20 .*intermediate update"):
        engine.sample(
            score=lambda x, t: torch.full_like(x, 3e37), solver="ode", shape=(4, 2), steps=20
        )


class CountSyncs(TorchFunctionMode):
    """Counts tensor -> Python conversions (each one a host-device sync on a GPU)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in SYNCS:
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("solver", ["pc", "ode"])
def test_default_check_adds_no_sync_per_step(engine, solver):
    counts = []
    for steps in (5, 40):
        mode = CountSyncs()
        with mode:
            engine.sample(shape=(16, 2), steps=steps, solver=solver)
        counts.append(mode.n)
    # no per-step sync: 5 and 40 steps convert the same number of tensors to Python (the
    # end-of-run isfinite check, the solver's float64 coefficient table built on the
    # CPU before the loop and the one check of the gmm's data moments for the data
    # prior, CPU tensors too: never a device sync)
    assert counts[0] == counts[1] <= 4, counts


def test_check_every_reads_the_flag_every_k_calls_and_stops_early(engine):
    calls = []

    def score(x, t):
        calls.append(1)
        return nan_below(0.9)(x, t)

    reads = []
    for every in (0, 10):  # a finite run: one read per 10 score calls on top of the rest
        mode = CountSyncs()
        with mode:
            engine.sample(shape=(8, 2), steps=40, solver="ode", method="euler", check_every=every)
        reads.append(mode.n)
    assert reads[1] - reads[0] == 41 // 10, reads  # 40 steps + the final denoising call

    k, _ = first_step_below(engine, "ode", 0.9, 1000, method="euler")  # about step 101
    with pytest.raises(NumericalError, match=f"step {k} of 1000"):
        engine.sample(
            score=score, shape=(8, 2), steps=1000, solver="ode", method="euler", check_every=10
        )
    # fault at call k: the first run stops by the next multiple of 10, the replay at k;
    # both far short of the 1001 calls of a full run
    assert len(calls) <= -(-k // 10) * 10 + k, (len(calls), k)


def test_a_fault_that_does_not_replay_says_so(engine):
    seen = []

    def flaky(x, t):  # NaN on the very first call only: the replay is finite
        seen.append(1)
        return -x if len(seen) > 1 else torch.full_like(x, torch.nan)

    with pytest.raises(NumericalError, match="replay with the same seed was finite"):
        engine.sample(score=flaky, shape=(4, 2), steps=5)


def test_nan_in_the_cli_is_one_line_with_the_step(tmp_path):
    from typer.testing import CliRunner

    from diffuse_engine.cli import build_app

    # a registry entry making the run diverge: an absurd snr blows the corrector up
    res = CliRunner().invoke(
        build_app(),
        [
            "run",
            "-n",
            "64",
            "--steps",
            "20",
            "-q",
            "--out",
            str(tmp_path / "o"),
            "--set",
            "snr=1e30",
        ],
    )
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("error: NaN/Inf first appeared at step "), lines
    assert "Traceback" not in res.output
    assert (tmp_path / "o.partial").is_dir() and not (tmp_path / "o").exists()


def test_a_solver_library_giving_up_on_nan_is_located(engine):
    if not engine.catalogue.has("solver", "ode_adaptive"):
        pytest.skip("no adaptive ODE solver installed")
    # torchdiffeq raises AssertionError('underflow in dt') once the score turns NaN
    with pytest.raises(
        NumericalError, match=r"\(t = 0\.4\d*\).*the score model 'callable'"
    ) as info:
        engine.sample(score=nan_below(T_BAD), solver="ode_adaptive", shape=(8, 2))
    assert isinstance(info.value.__cause__, AssertionError)

    def broken(x, t):  # a plain bug is not dressed up as a numerical fault
        raise ZeroDivisionError("model bug")

    with pytest.raises(ZeroDivisionError, match="model bug"):
        engine.sample(score=broken, solver="ode_adaptive", shape=(8, 2))
