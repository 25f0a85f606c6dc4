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

from diffuse_engine.core.errors import DiffuseError, UnknownComponentError
from diffuse_engine.testbed.conformance.numeric import (
    auto_mc_steps,
    kernel_vs_sde,
    quality_checks,
)
from diffuse_engine.testbed.conformance.report import (
    CHECKABLE_KINDS,
    CheckResult,
    ConformanceReport,
)
from diffuse_engine.testbed.conformance.sde_checks import check_sde
from diffuse_engine.testbed.conformance.solver_checks import check_solver


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


__all__ = [
    "CHECKABLE_KINDS",
    "CheckResult",
    "ConformanceReport",
    "auto_mc_steps",
    "check_sde",
    "check_solver",
    "kernel_vs_sde",
    "quality_checks",
    "run_checks",
]
