"""Checks of a solver plugin: contract, determinism, callbacks, images and quality."""

from __future__ import annotations

import time
from itertools import pairwise

import torch

from diffuse_engine.components.mixture import GaussianMixture
from diffuse_engine.testbed.conformance.report import (
    CheckResult,
    ConformanceReport,
    _Collector,
    _expect,
)
from diffuse_engine.testbed.conformance.sde_checks import _quality


def check_solver(
    engine,
    name: str,
    *,
    sde: str = "vp",
    score: str = "gmm",
    steps: int | None = None,
    n: int = 20000,
    seed: int = 0,
    device: str = "cpu",
    z: float = 5.0,
) -> ConformanceReport:
    """Run the solver checks on registry entry (or implementation) ``name``."""
    report = ConformanceReport(
        "solver",
        name,
        {"sde": sde, "score": score, "steps": steps, "n": n, "seed": seed, "device": device},
    )
    start = time.perf_counter()
    c = _Collector(report)
    small = 8 if steps is None else min(steps, 8)

    def run(shape, dtype=torch.float32, s=seed, dev="cpu", score_name=score, **kw):
        return engine.sampling(
            score=score_name,
            sde=sde,
            solver=name,
            shape=shape,
            seed=s,
            device=dev,
            dtype=dtype,
            **{"solver.steps": small, **kw},
        )

    def shapes():
        checks = []
        for dtype in (torch.float32, torch.float64):
            out = run(6, dtype).samples
            _expect(
                tuple(out.shape) == (6, 2), f"{dtype}: shape {tuple(out.shape)}, expected (6, 2)"
            )
            _expect(out.dtype == dtype, f"samples have dtype {out.dtype}, expected {dtype}")
            checks.append(str(dtype).removeprefix("torch."))
        img = engine.sampling(
            score=_image_score(engine, sde),
            sde=sde,
            solver=name,
            shape=(3, 1, 2, 2),
            seed=seed,
            **{"solver.steps": small},
        ).samples
        _expect(
            tuple(img.shape) == (3, 1, 2, 2), f"(3, 1, 2, 2) input gave shape {tuple(img.shape)}"
        )
        return CheckResult(
            "shapes and dtypes",
            True,
            "shape and dtype kept",
            detail="(B, 2), (B, 1, 2, 2); " + ", ".join(checks),
        )

    def devices():
        devs = ["cpu"] + ([device] if torch.device(device).type != "cpu" else [])
        for dev in devs:
            out = run(4, dev=dev).samples
            _expect(
                out.device.type == torch.device(dev).type,
                f"samples on {out.device}, expected {dev}",
            )
        return CheckResult("device handling", True, "ok on " + ", ".join(devs))

    def callback():
        seen: list[tuple] = []
        solver_obj = engine.build("solver", name, steps=small)
        sde_obj = engine.build("sde", sde)
        score_obj = engine.build("score", score, sde=sde_obj)
        solver_obj.check(sde_obj)
        x = sde_obj.prior_sample((4, 2), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            solver_obj.sample(
                score_obj,
                sde_obj,
                x,
                generator=torch.Generator().manual_seed(seed),
                callback=lambda *a: seen.append(a),
            )
        _expect(len(seen) > 0, "callback never called")
        types_ok = all(
            isinstance(s, int) and isinstance(tot, int) and isinstance(t, float)
            for s, tot, t in seen
        )
        _expect(
            types_ok,
            f"callback arguments must be (int, int, float), got "
            f"{tuple(type(v).__name__ for v in seen[0])}",
        )
        steps_ok = [s for s, _, _ in seen] == list(range(1, len(seen) + 1))
        ts = [t for _, _, t in seen]
        dec = all(b < a for a, b in pairwise(ts))
        _expect(
            steps_ok and seen[-1][0] == seen[-1][1],
            f"steps must count 1..total, got {[s for s, _, _ in seen][:5]}...",
        )
        _expect(dec, "times passed to the callback must decrease")
        return CheckResult(
            "progress callback",
            True,
            f"{len(seen)} calls",
            detail="(step, total, t) Python numbers, t decreasing",
        )

    def determinism():
        a = run(64).samples
        b = run(64).samples
        d = run(64, s=seed + 1).samples
        same, differ = torch.equal(a, b), not torch.equal(a, d)
        return CheckResult(
            "determinism under a seed",
            same and differ,
            ("identical" if same else "differs")
            + " under one seed; "
            + ("differs" if differ else "identical")
            + " across seeds",
            "identical / differs",
        )

    c.run("shapes and dtypes", shapes)
    c.run("device handling", devices)
    c.run("progress callback", callback)
    c.run("determinism under a seed", determinism)
    c.run("sample quality", lambda: _quality(engine, score, sde, name, steps, n, seed, device, z))
    report.seconds = time.perf_counter() - start
    return report


def _image_score(engine, sde: str):
    """The exact score of a 4-dimensional mixture, for ``(B, 1, 2, 2)`` samples."""
    sde_obj = engine.build("sde", sde)
    mix = GaussianMixture(
        torch.eye(4, dtype=torch.float64) * 2,
        torch.full((4,), 0.3, dtype=torch.float64),
        torch.full((4,), 0.25, dtype=torch.float64),
    )

    def score(x, t):
        a, s = sde_obj.marginal(t)
        return mix.score(x, a, s)

    return score
