"""Checks of an SDE plugin: its contract, kernel and sample quality."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from diffuse_engine.components.sde import SDE
from diffuse_engine.testbed.conformance.numeric import kernel_vs_sde, quality_checks
from diffuse_engine.testbed.conformance.report import (
    CheckResult,
    ConformanceReport,
    _Collector,
    _expect,
)


def _sde_contract(sde: SDE, shape: tuple[int, ...], dtype: torch.dtype, device) -> None:
    """Call every method of the SDE contract once and check shapes, dtypes, devices."""
    B = shape[0]
    dev = torch.device(device)
    x = torch.ones(shape, dtype=dtype, device=dev) * 0.5
    t = torch.linspace(0.2, 0.9, B, dtype=dtype, device=dev) * sde.T
    t_prev = t - 0.01 * sde.T

    def ok(v: Tensor, want: tuple, what: str) -> None:
        _expect(isinstance(v, Tensor), f"{what} returned {type(v).__name__}, not a tensor")
        _expect(tuple(v.shape) == want, f"{what}: shape {tuple(v.shape)}, expected {want}")
        _expect(v.dtype == dtype, f"{what}: dtype {v.dtype}, expected {dtype}")
        _expect(v.device.type == dev.type, f"{what}: on {v.device}, expected {dev}")

    ok(sde.drift(x, t), shape, "drift(x, t)")
    ok(sde.diffusion(t), (B,), "diffusion(t)")
    a, s = sde.marginal(t)
    ok(a, (B,), "marginal(t)[0] (mean_coeff)")
    ok(s, (B,), "marginal(t)[1] (std)")
    ok(sde.perturb(x, t, x), shape, "perturb(x0, t, noise)")
    ok(sde.kernel_score(x, x * 0.9, t), shape, "kernel_score(xt, x0, t)")
    ok(sde.reverse_drift(x, t, x), shape, "reverse_drift(x, t, score)")
    ok(sde.reverse_drift(x, t, x, probability_flow=True), shape, "reverse_drift(..., ode)")
    f, G = sde.discretize(x, t, t_prev)
    ok(f, shape, "discretize(x, t, t_prev)[0]")
    ok(G, (B,), "discretize(x, t, t_prev)[1]")
    mean, std = sde.ancestral_step(x, x, t, t_prev)
    ok(mean, shape, "ancestral_step(...)[0]")
    ok(std, (B,), "ancestral_step(...)[1]")
    ok(sde.denoise(x, x, t), shape, "denoise(x, score, t)")
    if dev.type != "meta":
        gen = torch.Generator(device=dev).manual_seed(0)
        z = sde.prior_sample(shape, generator=gen, device=dev, dtype=dtype)
        ok(z, shape, "prior_sample(shape)")
        ok(sde.prior_log_prob(z), (B,), "prior_log_prob(z)")


def check_sde(
    engine,
    name: str,
    *,
    solver: str = "pc",
    score: str = "gmm",
    steps: int | None = None,
    n: int = 20000,
    seed: int = 0,
    device: str = "cpu",
    mc_steps: int | None = None,
    z: float = 5.0,
) -> ConformanceReport:
    """Run the SDE checks on registry entry (or implementation) ``name``."""
    report = ConformanceReport(
        "sde",
        name,
        {
            "solver": solver,
            "score": score,
            "steps": steps,
            "n": n,
            "seed": seed,
            "device": device,
            "mc_steps": mc_steps,
        },
    )
    start = time.perf_counter()
    c = _Collector(report)
    sde = engine.build("sde", name)

    def shapes():
        for dtype in (torch.float32, torch.float64):
            for shape in ((7, 2), (5, 1, 3, 3)):
                _sde_contract(sde, shape, dtype, "cpu")
        return CheckResult(
            "shapes and dtypes",
            True,
            "all methods ok",
            detail="(B, 2) and (B, 1, 3, 3); float32 and float64",
        )

    def devices():
        devs = ["meta"] + ([device] if torch.device(device).type != "cpu" else [])
        for dev in devs:
            _sde_contract(sde, (4, 2), torch.float32, dev)
        return CheckResult(
            "device handling",
            True,
            "ok on " + ", ".join(["cpu"] + devs),
            detail="meta: no tensor is created on the CPU by mistake",
        )

    def kernel_values():
        t = torch.linspace(0, 1, 201, dtype=torch.float64)[1:] * sde.T
        a, s = sde.marginal(t)
        good = bool(
            torch.isfinite(a).all() and torch.isfinite(s).all() and (a > 0).all() and (s > 0).all()
        )
        return CheckResult(
            "kernel finite and positive",
            good,
            f"mean coeff {float(a[-1]):.3g}, std {float(s[-1]):.3g} at T",
            "finite, > 0 on (0, T]",
            detail=f"prior std {sde.prior_std:.4g}",
        )

    def determinism():
        g1 = torch.Generator().manual_seed(seed)
        g2 = torch.Generator().manual_seed(seed)
        same = torch.equal(
            sde.prior_sample((16, 2), generator=g1), sde.prior_sample((16, 2), generator=g2)
        )
        t = torch.rand(16, generator=torch.Generator().manual_seed(seed)) * sde.T
        coeffs = torch.equal(sde.diffusion(t), sde.diffusion(t)) and torch.equal(
            sde.marginal(t)[1], sde.marginal(t)[1]
        )
        return CheckResult(
            "determinism under a seed",
            same and coeffs,
            "identical" if same and coeffs else "differs",
            "bit-identical",
        )

    c.run("shapes and dtypes", shapes)
    c.run("device handling", devices)
    c.run("kernel finite and positive", kernel_values)
    c.run("determinism under a seed", determinism)
    c.run("kernel vs SDE", lambda: kernel_vs_sde(sde, n=n, mc_steps=mc_steps, seed=seed, z=z))
    c.run(
        "sample quality", lambda: _quality(engine, score, name, solver, steps, n, seed, device, z)
    )
    report.seconds = time.perf_counter() - start
    return report


def _quality(
    engine,
    score: str,
    sde: str,
    solver: str,
    steps: int | None,
    n: int,
    seed: int,
    device: str,
    z: float,
) -> list[CheckResult]:
    over = {} if steps is None else {"solver.steps": steps}
    res = engine.sampling(
        score=score, sde=sde, solver=solver, shape=n, seed=seed, device=device, **over
    )
    mix = getattr(res.score, "mixture", None)
    if mix is None:
        return [
            CheckResult(
                "sample quality",
                False,
                "no exact mixture",
                detail=f"score {score!r} has no .mixture to compare with",
            )
        ]
    label = f"sample quality ({sde}/{solver}, {res.config['solver']['steps']} steps)"
    out = quality_checks(res.samples, mix, z, label)
    out[0].detail += f", NFE={res.nfe}, {res.seconds:.1f}s"
    return out
