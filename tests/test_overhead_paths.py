"""The engine's cheap per-step paths keep the checks and values of the slow ones.

The score boundary calls the model's own function once a layout is checked, and
solvers take their ``(B,)`` time tensors from ``time_tensors`` instead of a fill per
step (benchmarks/overhead.py measures what that saves); these tests pin that nothing
else changes: every call is counted, a new layout is checked again, conversions still
happen, the times are ``torch.full``'s bit for bit and in the order each solver uses.
"""

from __future__ import annotations

import pytest
import torch

from diffuse_engine import Engine
from diffuse_engine.components.score import (
    CallableScore,
    ScoreBoundary,
    ScoreModel,
    direct_score,
)
from diffuse_engine.components.solver import TIME_BLOCK_ELEMENTS, time_tensors
from diffuse_engine.core.errors import DiffuseError


class Float64Net(torch.nn.Module):
    """A score with float64 weights, to be sampled in float32 (the converting path)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x, t):
        assert x.dtype == torch.float64 and t.dtype == torch.float64
        return -self.w * x


@pytest.fixture(scope="module")
def engine():
    return Engine()


@pytest.fixture(scope="module")
def vp(engine):
    return engine.build("sde", "vp")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
# several steps per block, and from TIME_BLOCK_ELEMENTS // 2 up one fill per step
@pytest.mark.parametrize("batch", [1, 3, TIME_BLOCK_ELEMENTS // 5 + 1, TIME_BLOCK_ELEMENTS // 2])
def test_time_tensors_are_fills_bit_for_bit(dtype, batch):
    times = [1.0 - i / 997 * (1 - 1e-3) for i in range(150)]  # several blocks
    like = torch.zeros(batch, 2, dtype=dtype)
    rows = list(time_tensors(times, like))
    assert len(rows) == len(times)
    for t, row in zip(times, rows, strict=True):
        assert row.shape == (batch,) and row.dtype == dtype and row.is_contiguous()
        assert torch.equal(row, torch.full((batch,), t, dtype=dtype))
    rows[0].add_(1.0)  # rows are separate memory, as separate fills are
    assert torch.equal(rows[1], torch.full((batch,), times[1], dtype=dtype))


def test_boundary_counts_every_call_and_checks_each_new_layout(vp):
    def score(x, t):  # right for a batch of 4, wrong for any other
        return -x if x.shape[0] == 4 else -x[:, :1]

    b = ScoreBoundary(CallableScore(score, sde=vp), "odd")
    assert b._direct is score  # the wrappers that do nothing are peeled off
    x, t = torch.randn(4, 2), torch.rand(4)
    for _ in range(3):
        assert torch.equal(b(x, t), -x)
    assert b.calls == 3
    with pytest.raises(DiffuseError, match=r"shape \(3, 1\) .*; expected .* shape \(3, 2\)"):
        b(x[:3], t[:3])
    with pytest.raises(DiffuseError, match="dtype torch.float32 on cpu; expected .* torch.float64"):
        ScoreBoundary(CallableScore(lambda x, t: -x.float(), sde=vp), "f")(x.double(), t)
    assert b.calls == 4


def test_the_function_solvers_get_is_the_boundary_itself(vp):
    from diffuse_engine.components.solver import innermost

    def score(x, t):
        return -x if x.shape[0] == 4 else -x[:, :1]

    b = ScoreBoundary(CallableScore(score, sde=vp), "odd")
    x, t = torch.randn(4, 2), torch.rand(4)
    assert torch.equal(b.call(x, t), -x) and torch.equal(b(x, t), -x)
    assert b.calls == 2  # one counter for both
    assert innermost(b.call) is score and b.call.conditional is False
    with pytest.raises(DiffuseError, match=r"shape \(3, 1\)"):  # a new layout is checked
        b.call(x[:3], t[:3])
    with pytest.raises(DiffuseError, match="takes no condition"):
        b.call(x, t, {"label": 1})


def test_a_boundary_is_freed_when_dropped_not_at_the_next_collection(vp):
    import gc
    import weakref

    b = ScoreBoundary(CallableScore(lambda x, t: -x, sde=vp), "f")
    b.call(torch.randn(3, 2), torch.rand(3))
    gone = weakref.ref(b)
    gc.disable()  # only reference counting: a cycle through b.call would keep b alive
    try:
        del b
        assert gone() is None
    finally:
        gc.enable()


def test_small_requests_skip_the_free_memory_read(monkeypatch):
    from diffuse_engine.core import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 0)  # nothing free
    memory.check_fits(memory.SMALL_REQUEST - 1, "cpu", "x", "y")  # not read, passes
    with pytest.raises(memory.ResourceError, match="needs at least 32 MiB"):
        memory.check_fits(memory.SMALL_REQUEST, "cpu", "x", "y")


def test_boundary_peels_only_wrappers_that_do_nothing(vp):
    eps_model = CallableScore(lambda x, t: x, sde=vp, parameterisation="epsilon")
    assert direct_score(eps_model) is eps_model  # the conversion stays

    class OwnCall(ScoreModel):  # a model with its own __call__ (checkpoint scores)
        name = "own"

        def __call__(self, x, t, cond=None):
            return -2 * x

    own = OwnCall(sde=vp)
    b = ScoreBoundary(own, "own")
    x, t = torch.randn(5, 2), torch.rand(5)
    assert direct_score(own) is own
    assert torch.equal(b(x, t), -2 * x) and torch.equal(b(x, t), -2 * x)
    # the fast path gives what the full path gives, through every wrapper
    eps_b = ScoreBoundary(eps_model, "eps")
    first, again = eps_b(x, t), eps_b(x, t)
    assert torch.equal(first, again) and torch.equal(first, eps_model(x, t))


@pytest.mark.parametrize("path", ["call", "call_once_checked"])
def test_boundary_fast_paths_keep_conditions_and_conversions(vp, path):
    seen = []

    def cond_score(x, t, cond):
        seen.append(cond)
        return -x

    def fast(boundary):  # the function a solver gets, at a shard's start
        boundary.rearm()
        return getattr(boundary, path)

    b = fast(ScoreBoundary(CallableScore(cond_score, sde=vp), "c"))
    x, t = torch.randn(3, 2), torch.rand(3)
    b(x, t, {"label": 1})
    b(x, t, {"label": 2})
    b(x, t, None)
    assert seen == [{"label": 1}, {"label": 2}, None]

    plain = fast(ScoreBoundary(CallableScore(lambda x, t: -x, sde=vp), "p"))
    plain(x, t)
    with pytest.raises(DiffuseError, match="takes no condition"):
        plain(x, t, {"label": 1})  # refused on the fast path too

    net = ScoreBoundary(Float64Net(), "net")
    net_fast = fast(net)
    for _ in range(3):  # converted on every call, not only the first
        out = net_fast(x, t)
        assert out.dtype == torch.float32 and torch.equal(out, -x)
    assert net.calls == 3


def test_once_checked_call_checks_each_shard_first_call_and_counts_all(vp):
    def score(x, t):  # right for a batch of 4, wrong for any other
        return -x if x.shape[0] == 4 else -x[:, :1]

    b = ScoreBoundary(CallableScore(score, sde=vp), "odd")
    once = b.call_once_checked
    assert once.fn is b.fn and once.conditional is False
    x, t = torch.randn(4, 2), torch.rand(4)
    b.rearm()
    for _ in range(3):
        assert torch.equal(once(x, t), -x)
    assert b.calls == 3
    b.rearm()  # a new shard, of another size: its first call is checked
    with pytest.raises(DiffuseError, match=r"shape \(3, 1\) .*; expected .* shape \(3, 2\)"):
        once(x[:3], t[:3])
    with pytest.raises(DiffuseError, match="takes no condition"):
        once(x, t, {"label": 1})  # a condition for a plain model: refused on every call
    assert b.calls == 5


def test_each_shard_of_a_run_is_checked_and_counted(engine):
    calls = []

    def score(x, t):  # wrong only for the remainder shard (size 3)
        calls.append(x.shape[0])
        return -x if x.shape[0] == 4 else -x[:, :1]

    out = engine.sampling(
        score=score, sde="vp", solver="ddim", shape=(8, 2), seed=0, steps=5, shard_size=4
    )
    assert out.samples.shape == (8, 2) and calls == [4] * (2 * out.nfe)
    with pytest.raises(DiffuseError, match=r"shape \(3, 1\)"):  # the second shard's first call
        engine.sample(
            score=score, sde="vp", solver="ddim", shape=(7, 2), seed=0, steps=5, shard_size=4
        )


def test_a_solver_that_changes_layout_gets_the_checking_score():
    from diffuse_engine import Solver, module_plugin

    class Doubling(Solver):  # evaluates a doubled batch on its second step
        name = "doubling"
        fixed_layout = False

        def sample(self, score, sde, x, *, generator=None, callback=None):
            t = torch.full((x.shape[0],), 0.5)
            score(x, t)
            score(torch.cat([x, x]), torch.cat([t, t]))
            return x

    def score(x, t):
        return -x if x.shape[0] == 4 else -x[:, :1]

    engine = Engine(plugins=[module_plugin(diffuse_register_solvers=lambda: [Doubling])])
    with pytest.raises(DiffuseError, match=r"shape \(8, 1\)"):
        engine.sample(score=score, sde="vp", solver="doubling", shape=(4, 2), seed=0)


def _times_seen(engine, solver, **overrides):
    seen = []

    def score(x, t):
        seen.append(t[0].item())
        assert torch.equal(t, torch.full_like(t, t[0].item()))
        return -x

    engine.sample(score=score, sde="vp", solver=solver, shape=(6, 2), seed=0, **overrides)
    return seen


@pytest.mark.parametrize(
    "overrides", [{"method": "rk4"}, {"method": "heun"}, {"method": "euler"}, {"nfe": 12}]
)
def test_ode_hands_the_score_its_times_in_order(engine, vp, overrides):
    overrides = overrides if "nfe" in overrides else {"steps": 5, **overrides}
    solver = engine.build("solver", "ode", **overrides)
    grid = solver.time_grid(vp)
    c = solver.config
    methods = [c.lead[i] if i < len(c.lead) else c.method for i in range(c.steps)]
    expected = []
    for i, m in enumerate(methods):
        mid = grid[i] + 0.5 * (grid[i + 1] - grid[i])
        expected += {
            "euler": [grid[i]],
            "heun": [grid[i], grid[i + 1]],
            "rk4": [grid[i], mid, mid, grid[i + 1]],
        }[m]
    expected.append(grid[-1])  # the final denoising step
    seen = _times_seen(engine, "ode", **overrides)
    assert seen == pytest.approx(expected, rel=1e-6, abs=1e-7)  # float32 times


@pytest.mark.parametrize("solver", ["pc", "ddim", "dpm_solver_pp"])
def test_step_solvers_hand_the_score_the_grid(engine, vp, solver):
    grid = engine.build("solver", solver, steps=7).time_grid(vp)
    per_step = 2 if solver == "pc" else 1  # corrector and predictor share t
    expected = [t for t in grid[:-1] for _ in range(per_step)] + [grid[-1]]
    assert _times_seen(engine, solver, steps=7) == pytest.approx(expected, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("clip", [{}, {"x0_clip": 0.5}, {"x0_clip": 1.0, "x0_threshold": 0.9}])
def test_bound_predictor_keeps_the_clipping(engine, clip):
    """The loops' once-bound ``predictor()`` is ``predict``: clipped when configured."""
    solver = engine.build("solver", "ddim", **clip)
    x = 3 * torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    t, bound = torch.full((8,), 0.5), solver.predictor()
    for prediction in ("data", "noise"):
        want = solver.predict(lambda x, t: -x, x, t, 0.8, 0.6, prediction)
        assert torch.equal(bound(lambda x, t: -x, x, t, 0.8, 0.6, prediction), want)
    x0 = bound(lambda x, t: -x, x, t, 0.8, 0.6, "data")
    assert (x0.abs().max() <= 0.5) == ("x0_clip" in clip and clip["x0_clip"] == 0.5)
