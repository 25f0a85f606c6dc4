"""Conformance checks for SDE and solver plugins, on the exact Gaussian-mixture test bed.

Used by ``diffuse check NAME`` and by the pytest plugin
(:mod:`diffuse_engine.pytest_plugin`, fixture ``diffuse_check``) that plugin authors
enable in their own test suites. Each check returns a :class:`CheckResult` with the
measured figure next to its bound, so a failure says by how much.

SDE checks
    ``shapes``: every method of the SDE contract on ``(B, d)`` and ``(B, 1, 3, 3)``
    inputs in float32 and float64 returns the documented shape and keeps the dtype;
    ``device``: the coefficients run on the ``meta`` device (any tensor created on the
    CPU by mistake raises there) and on ``--device``;
    ``kernel``: mean coefficient and std are finite and positive on ``(0, T]``;
    ``determinism``: the prior sample repeats under a seed;
    ``kernel vs SDE``: the forward SDE is simulated with Euler-Maruyama
    (``torchsde.sdeint``) from a fixed ``x_0`` and the Monte-Carlo mean and variance at
    several times are compared with the kernel, in standard errors of the estimate;
    ``sample quality``: the exact mixture score sampled with a reference solver.

Solver checks
    ``shapes``/``dtype``/``device``: samples keep the shape (also ``(B, 1, 2, 2)``),
    dtype and device of ``x_T``; ``callback``: called once per step with Python
    numbers, times decreasing; ``determinism``: equal under a seed, different across
    seeds; ``sample quality`` at the given number of steps.

Statistical bounds are ``z`` standard errors of the estimator at the sample size used
(``z = 5`` by default: with about 30 comparisons per report a correct plugin fails
with probability below 1e-5). Sample quality is judged per mode of the mixture
(Song et al. 2021 use the same synthetic check; per-mode statistics are far sharper
than a two-sample distance): the weight error in units of ``sqrt(w (1 - w) / n)``,
the relative std error in units of ``1 / sqrt(2 n_k)`` and the centre offset in
units of ``sigma_k / sqrt(n_k)``. A solver whose discretisation bias exceeds the
sampling noise at ``n`` fails: raise ``steps`` or lower ``n`` to see where it passes.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor

from diffuse_engine.components.mixture import GaussianMixture, mode_statistics
from diffuse_engine.components.sde import SDE, bcast
from diffuse_engine.core.errors import DiffuseError, UnknownComponentError

CHECKABLE_KINDS = ("sde", "solver")


@dataclass
class CheckResult:
    """One check: did it pass, what was measured, against which bound."""

    check: str
    passed: bool
    measured: str
    bound: str = ""
    detail: str = ""


@dataclass
class ConformanceReport:
    """All checks of one component."""

    kind: str
    name: str
    settings: dict[str, Any]
    results: list[CheckResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if not r.passed]

    def rows(self) -> list[tuple[str, str, str, str, str]]:
        return [
            (r.check, "PASS" if r.passed else "FAIL", r.measured, r.bound, r.detail)
            for r in self.results
        ]

    def format(self) -> str:
        """A plain-text table (for assertion messages and logs)."""
        head = ("check", "result", "measured", "bound", "detail")
        rows = [head] + self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = [
            f"{self.kind} {self.name!r}: "
            f"{'PASS' if self.passed else 'FAIL'} "
            f"({len(self.results) - len(self.failures)}/{len(self.results)} checks, "
            f"{self.seconds:.1f}s; {_settings(self.settings)})"
        ]
        lines += [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
        ]
        return "\n".join(lines)


def _settings(s: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in s.items() if v is not None)


class _Collector:
    """Runs checks, turning an unexpected exception into a failed check."""

    def __init__(self, report: ConformanceReport):
        self.report = report

    def run(self, check: str, fn: Callable[[], list[CheckResult] | CheckResult]) -> None:
        try:
            out = fn()
        except DiffuseError as exc:
            out = CheckResult(check, False, "error", detail=str(exc).splitlines()[0][:200])
        except Exception as exc:  # a contract violation is a failed check, not a crash
            msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            out = CheckResult(check, False, "exception", detail=msg)
        self.report.results.extend(out if isinstance(out, list) else [out])


# ------------------------------------------------------------------------------------
# statistics shared with the test suite
# ------------------------------------------------------------------------------------
def quality_checks(
    samples: Tensor, mixture: GaussianMixture, z: float = 5.0, label: str = "sample quality"
) -> list[CheckResult]:
    """Per-mode weight, std and centre of ``samples`` against ``mixture``, each as the
    worst mode's deviation in standard errors at this sample size (bound ``z``)."""
    stats = mode_statistics(samples, mixture)
    n = stats["n"]
    m = stats["modes"]
    w_true = torch.tensor(m["weight_true"], dtype=torch.float64)
    w_hat = torch.tensor(m["weight"], dtype=torch.float64)
    n_k = (w_hat * n).clamp_min(1)
    w_se = (w_true * (1 - w_true) / n).sqrt().clamp_min(1e-12)
    w_z = float(((w_hat - w_true).abs() / w_se).max())
    std_z = float((torch.tensor(m["std_error"], dtype=torch.float64) * (2 * n_k).sqrt()).max())
    centre_z = float((torch.tensor(m["centre_error"], dtype=torch.float64) * n_k.sqrt()).max())
    nf = stats["non_finite"]
    detail = (
        f"n={n}, TV={stats['weight_tv']:.3g}, std err={stats['std_error']:.3g}, "
        f"centre err={stats['centre_error']:.3g}"
    )
    out = [
        CheckResult(
            f"{label}: mode weights",
            w_z <= z and nf == 0,
            f"{w_z:.2f} SE",
            f"<= {z:g} SE",
            detail + (f", {nf} non-finite" if nf else ""),
        ),
        CheckResult(f"{label}: mode stds", std_z <= z, f"{std_z:.2f} SE", f"<= {z:g} SE"),
        CheckResult(f"{label}: mode centres", centre_z <= z, f"{centre_z:.2f} SE", f"<= {z:g} SE"),
    ]
    return out


class _ForwardSDE(torch.nn.Module):
    """``sde`` as a torchsde Ito SDE with diagonal noise on flattened states."""

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, sde: SDE, shape: tuple[int, ...]):
        super().__init__()
        self.sde, self.shape = sde, shape

    def _t(self, t: Tensor, y: Tensor) -> Tensor:
        return t.to(y.dtype).expand(y.shape[0])

    def f(self, t, y):
        return self.sde.drift(y.view(self.shape), self._t(t, y)).reshape(y.shape)

    def g(self, t, y):
        return bcast(self.sde.diffusion(self._t(t, y)), y).expand_as(y)


def auto_mc_steps(sde: SDE, t_first: float, t_end: float, n: int) -> int:
    """Euler-Maruyama steps on ``[0, t_end]`` that keep its bias under about one
    standard error of the Monte-Carlo variance estimate at the compared times.

    Over a step ``dt`` EM's variance is off by about ``r dt / 2`` relative, with ``r =
    2 |f| + |d log g^2 / dt|`` (the stationary variance of EM on an OU process is
    ``v / (1 - |f| dt / 2)``; a left Riemann sum of ``g^2`` errs by half the log-rate),
    plus ``dt / t_first`` for a variance that starts like a power of ``t`` (sub-VP).
    With the largest ``r`` on ``[t_first / 2, t_end]`` and ``SE = sqrt(2 / n)``:
    ``dt = SE / (r + 1 / t_first)``.
    """
    t = torch.linspace(t_first / 2, t_end, 1001, dtype=torch.float64)
    f = sde.drift_coeff(t).abs()
    lg = torch.log(sde.diffusion(t).double() ** 2)
    dlg = (lg[1:] - lg[:-1]).abs() / (t[1] - t[0])
    rate = float((2 * f[1:] + dlg).max()) + 1 / t_first
    steps = math.ceil(t_end * rate / math.sqrt(2 / n))
    return int(min(max(steps, 200), 50_000))


def kernel_vs_sde(
    sde: SDE,
    *,
    n: int = 20000,
    mc_steps: int | None = None,
    seed: int = 0,
    z: float = 5.0,
    times: tuple[float, ...] = (0.1, 0.5, 0.9),
    device: str | torch.device = "cpu",
) -> list[CheckResult]:
    """Euler-Maruyama simulation of the forward SDE against its kernel.

    From ``x_0 = (1, -0.5)`` (each of ``n`` paths starts from the kernel at ``t = 0``,
    which is ``x_0`` itself unless the SDE starts from smoothed data), simulate with
    ``torchsde.sdeint(method="euler")`` in float64 to the fractions ``times`` of ``T``
    (``mc_steps`` steps up to the last; :func:`auto_mc_steps` when None) and compare per
    coordinate: the mean in units of ``std / sqrt(n)``, the variance ratio in units of
    ``sqrt(2 / (n - 1))``. The last time stays below ``T`` because schedules are often
    clipped to be stiff there (cosine), where EM would need far smaller steps.
    """
    import torchsde

    dev = torch.device(device)
    dt64 = torch.float64
    T = float(sde.T) * max(times)
    if mc_steps is None:
        try:
            mc_steps = auto_mc_steps(sde, min(times) * float(sde.T), T, n)
        except NotImplementedError:  # non-linear drift: no f(t) to size the step by
            mc_steps = 2000
    x0 = torch.tensor([1.0, -0.5], dtype=dt64, device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    zero = torch.zeros(n, dtype=dt64, device=dev)
    a0, s0 = sde.marginal(zero)
    y0 = bcast(a0, x0[None]) * x0 + bcast(s0, x0[None]) * torch.randn(
        n, 2, generator=gen, dtype=dt64, device=dev
    )
    ts = torch.tensor([0.0] + [f * float(sde.T) for f in times], dtype=dt64, device=dev)
    bm = torchsde.BrownianInterval(
        t0=0.0,
        t1=T,
        size=(n, 2),
        dtype=dt64,
        device=dev,
        entropy=seed,
        levy_area_approximation="none",
    )
    with torch.no_grad():
        ys = torchsde.sdeint(
            _ForwardSDE(sde, (n, 2)), y0, ts, method="euler", dt=T / mc_steps, bm=bm
        )
    out = []
    for j, frac in enumerate(times, start=1):
        t = torch.full((1,), float(ts[j]), dtype=dt64, device=dev)
        a, s = (float(v) for v in sde.marginal(t))
        y = ys[j]
        if not torch.isfinite(y).all():
            out.append(CheckResult(f"kernel vs SDE at t={frac:g}T", False, "non-finite paths"))
            continue
        mean_z = float(((y.mean(0) - a * x0).abs() / (s / math.sqrt(n))).max())
        var_ratio = y.var(0) / s**2
        var_z = float(((var_ratio - 1).abs() / math.sqrt(2 / (n - 1))).max())
        detail = (
            f"kernel mean coeff {a:.4g}, std {s:.4g}; MC mean {y.mean(0).tolist()[0]:.4g}"
            f"/{a * float(x0[0]):.4g}, var ratio {float(var_ratio.mean()):.4f}"
        )
        out.append(
            CheckResult(
                f"kernel vs SDE at t={frac:g}T: mean",
                mean_z <= z,
                f"{mean_z:.2f} SE",
                f"<= {z:g} SE",
                detail,
            )
        )
        out.append(
            CheckResult(
                f"kernel vs SDE at t={frac:g}T: variance",
                var_z <= z,
                f"{var_z:.2f} SE",
                f"<= {z:g} SE",
                f"n={n}, EM steps={mc_steps}",
            )
        )
    return out


# ------------------------------------------------------------------------------------
# SDE checks
# ------------------------------------------------------------------------------------
def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)


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


# ------------------------------------------------------------------------------------
# solver checks
# ------------------------------------------------------------------------------------
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


def run_checks(engine, name: str, kind: str | None = None, **options) -> ConformanceReport:
    """Check ``name`` as ``kind`` (``sde`` or ``solver``; found from the registry and
    catalogue when omitted). ``options`` go to :func:`check_sde` / :func:`check_solver`."""
    if kind is None:
        kinds = [k for k in CHECKABLE_KINDS if _known(engine, k, name)]
        if not kinds:
            choices = {
                k: sorted(set(engine.registry.names(k)) | set(engine.catalogue.names(k)))
                for k in CHECKABLE_KINDS
            }
            raise UnknownComponentError(
                f"no SDE or solver named {name!r}; SDEs: {', '.join(choices['sde'])}; "
                f"solvers: {', '.join(choices['solver'])}"
            )
        if len(kinds) > 1:
            raise DiffuseError(
                f"{name!r} names both an SDE and a solver; pass --kind sde or --kind solver"
            )
        kind = kinds[0]
    if kind not in CHECKABLE_KINDS:
        raise DiffuseError(
            f"cannot check kind {kind!r}; checkable kinds: " + ", ".join(CHECKABLE_KINDS)
        )
    if not _known(engine, kind, name):
        engine.registry.entry(kind, name)  # raises the registry's error listing choices
    fn = check_sde if kind == "sde" else check_solver
    allowed = {
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    unknown = set(options) - allowed
    if unknown:
        raise DiffuseError(
            f"option(s) {', '.join(sorted(unknown))} do not apply to {kind} "
            f"checks; allowed: {', '.join(sorted(allowed))}"
        )
    return fn(engine, name, **options)


def _known(engine, kind: str, name: str) -> bool:
    return name in engine.registry.names(kind) or engine.catalogue.has(kind, name)
