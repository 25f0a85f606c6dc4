"""pytest plugin for plugin authors: conformance checks in your own test suite.

Installed with diffuse-engine through the ``pytest11`` entry point, so it is active in
any environment where the engine is installed; it only adds a fixture and options and
imports nothing heavy until the fixture is used. In your plugin's tests::

    def test_my_sde_conforms(diffuse_check):
        diffuse_check("my_sde")                        # an SDE: all SDE checks
        diffuse_check("my_solver", sde="vp", steps=200, n=8000)

The fixture builds an :class:`~diffuse_engine.Engine` with the installed plugins (pass
``plugins=[module]`` to register objects directly, ``registry=`` for a registry file),
runs :func:`diffuse_engine.testbed.conformance.run_checks` and fails the test with the full
pass/fail table when any check fails; it returns the report otherwise. Defaults can be
set on the command line: ``--diffuse-n``, ``--diffuse-device``, ``--diffuse-seed``.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("diffuse", "diffuse-engine conformance checks")
    group.addoption(
        "--diffuse-n", type=int, default=None, help="samples per conformance check (default 20000)"
    )
    group.addoption(
        "--diffuse-device", default=None, help="torch device for conformance checks (default cpu)"
    )
    group.addoption(
        "--diffuse-seed", type=int, default=None, help="seed for conformance checks (default 0)"
    )


@pytest.fixture
def diffuse_check(request):
    """``diffuse_check(name, kind=None, *, plugins=(), registry=None, **options)``:
    run the conformance checks on ``name`` and fail with the table if any fails."""
    cli = {k: request.config.getoption(f"--diffuse-{k}") for k in ("n", "device", "seed")}

    def check(name: str, kind: str | None = None, *, plugins=(), registry=None, **options):
        from diffuse_engine import Engine
        from diffuse_engine.testbed.conformance import run_checks

        engine = Engine(registry=registry, plugins=plugins)
        opts = {**{k: v for k, v in cli.items() if v is not None}, **options}
        report = run_checks(engine, name, kind, **opts)
        if not report.passed:
            pytest.fail("conformance checks failed\n" + report.format(), pytrace=False)
        return report

    return check
