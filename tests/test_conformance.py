"""Conformance checks: they pass for the built-ins and catch broken plugins."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from diffuse_engine import DiffuseError, Engine, Solver, UnknownComponentError, bcast, module_plugin
from diffuse_engine.cli import build_app
from diffuse_engine.testbed.conformance import (
    auto_mc_steps,
    check_sde,
    check_solver,
    kernel_vs_sde,
    run_checks,
)
from diffuse_plugins.vp import VPSDE

# Small sample sizes keep this file fast; every statistical bound is 5 standard errors
# at the n used, so smaller n only widens the bounds, it never loosens them by hand.
N = 2000


def failed(report) -> set[str]:
    return {r.check.split(":")[0].split(" at ")[0] for r in report.failures}


class StdTooLarge(VPSDE):
    """VP whose kernel std is 15% too large: disagrees with its own f and g."""

    name = "bad_std"

    def marginal(self, t):
        a, s = super().marginal(t)
        return a, 1.15 * s


class CPUTensorDrift(VPSDE):
    """Builds a per-dimension tensor on the CPU: breaks on any other device."""

    name = "cpu_drift"

    def drift(self, x, t):
        scale = torch.ones(x.shape[1:])  # device bug: should be on x.device
        return bcast(self.drift_coeff(t), x) * x * scale


class GlobalRNGSolver(Solver):
    """Draws noise from the global RNG and ignores the generator; one EM-like step."""

    name = "global_rng"

    def sample(self, score, sde, x, *, generator=None, callback=None):
        return x + 0.01 * torch.randn_like(x)


@pytest.fixture(scope="module")
def engine():
    plugin = module_plugin(
        diffuse_register_sdes=lambda: [StdTooLarge, CPUTensorDrift],
        diffuse_register_solvers=lambda: [GlobalRNGSolver],
    )
    return Engine(plugins=[plugin], autoload=False)


def test_builtin_vp_sde_passes_every_check(engine):
    report = check_sde(engine, "vp", solver="ode", steps=60, n=N)
    assert report.passed, report.format()
    names = {r.check for r in report.results}
    assert {"shapes and dtypes", "device handling", "determinism under a seed"} <= names
    assert any(n.startswith("kernel vs SDE") for n in names)
    assert any(n.startswith("sample quality") for n in names)


def test_builtin_ode_solver_passes_every_check(engine):
    report = check_solver(engine, "ode", sde="vp", steps=40, n=N)
    assert report.passed, report.format()
    assert "progress callback" in {r.check for r in report.results}


def test_kernel_that_disagrees_with_its_sde_fails_monte_carlo(engine):
    # a 15% std error is a variance ratio of 1.32, i.e. about 10 standard errors at n=N
    results = kernel_vs_sde(engine.build("sde", "bad_std"), n=N)
    variance = [r for r in results if r.check.endswith("variance")]
    assert variance and not any(r.passed for r in variance), results


def test_cpu_tensor_in_drift_fails_the_device_check(engine):
    report = check_sde(engine, "cpu_drift", solver="ode", steps=20, n=500)
    assert "device handling" in failed(report)
    assert "shapes and dtypes" not in failed(report)


def test_solver_on_global_rng_fails_determinism_and_quality(engine):
    report = check_solver(engine, "global_rng", steps=5, n=N)
    assert {"determinism under a seed", "sample quality (vp/global_rng, 5 steps)"} <= failed(report)
    assert "progress callback" in failed(report)  # it never calls back


def test_euler_maruyama_steps_scale_with_stiffness_and_sample_size(engine):
    vp, cosine = engine.build("sde", "vp"), engine.build("sde", "cosine")
    assert auto_mc_steps(cosine, 0.1, 0.9, 20000) > auto_mc_steps(vp, 0.1, 0.9, 20000)
    assert auto_mc_steps(vp, 0.1, 0.9, 20000) > auto_mc_steps(vp, 0.1, 0.9, 2000)


def test_unknown_name_and_bad_options_are_one_line_errors(engine):
    with pytest.raises(UnknownComponentError, match="no SDE or solver named 'nope'; SDEs: .*vp"):
        run_checks(engine, "nope")
    with pytest.raises(DiffuseError, match="do not apply to solver checks; allowed:"):
        run_checks(engine, "ode", mc_steps=10)
    with pytest.raises(DiffuseError, match="checkable kinds: sde, solver"):
        run_checks(engine, "gmm", kind="score")


def test_cli_check_prints_the_table_and_sets_the_exit_code(tmp_path):
    runner = CliRunner()
    app = build_app(with_plugin_commands=False)
    ok = runner.invoke(app, ["check", "ode", "--steps", "30", "-n", "1000"])
    assert ok.exit_code == 0, ok.output
    assert "PASS" in ok.output and "sample quality" in ok.output
    bad = runner.invoke(app, ["check", "ancestral", "--steps", "2", "-n", "1000"])
    assert bad.exit_code == 1 and "FAIL" in bad.output
    unknown = runner.invoke(app, ["check", "nope"])
    assert unknown.exit_code == 2


def test_pytest_plugin_fixture_in_a_plugin_authors_suite(tmp_path):
    """The pytest11 entry point gives any test suite the ``diffuse_check`` fixture."""
    (tmp_path / "test_author.py").write_text(
        textwrap.dedent("""
        def test_ode_conforms(diffuse_check):
            report = diffuse_check("ode", steps=30, n=1000)
            assert report.passed

        def test_too_few_steps_fails(diffuse_check):
            diffuse_check("ancestral", steps=2, n=1000)
    """)
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:xdist",
            str(tmp_path / "test_author.py"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    out = proc.stdout + proc.stderr
    assert "1 failed, 1 passed" in out, out
    assert "conformance checks failed" in out and "sample quality" in out
