"""``diffuse check NAME``: the conformance checks of an SDE or solver plugin."""

from __future__ import annotations

from pathlib import Path

import typer

from diffuse_engine.cli.common import (
    RegistryOpt,
    SetOpt,
    check_names,
    handle_errors,
    make_engine,
    print_table,
)


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def check(
        name: str = typer.Argument(..., help="SDE or solver entry (or implementation) name"),
        kind: str | None = typer.Option(None, help="sde or solver, if NAME is both"),
        sde: str = typer.Option("vp", help="SDE to run a solver on"),
        solver: str = typer.Option("pc", help="reference solver for an SDE's sample quality"),
        score: str = typer.Option("gmm", help="exact-mixture score entry"),
        steps: int | None = typer.Option(
            None, min=1, help="solver steps for sample quality (default: the solver entry's)"
        ),
        n: int = typer.Option(20000, "--n", "-n", min=100, help="samples per statistical check"),
        seed: int = typer.Option(0, help="random seed"),
        device: str = typer.Option("cpu", help="extra device to check on (cpu, cuda)"),
        mc_steps: int | None = typer.Option(
            None,
            min=10,
            help="Euler-Maruyama steps of "
            "the kernel-vs-SDE simulation (default: "
            "sized to keep its bias below the noise)",
        ),
        z: float = typer.Option(
            5.0, min=1.0, help="bound of statistical checks, in standard errors"
        ),
        registry: list[Path] | None = RegistryOpt,
        set_: list[str] | None = SetOpt,
    ):
        """Run a registered SDE or solver through the exact Gaussian-mixture test bed;
        print a pass/fail table with the measured figures (exit 1 if any check fails)."""
        from diffuse_engine.cli.run_cmd import _check_device
        from diffuse_engine.testbed.conformance import run_checks

        _check_device(device)
        engine = make_engine(registry, set_)
        check_names(engine, sde=("sde", sde), solver=("solver", solver), score=("score", score))
        common = dict(score=score, steps=steps, n=n, seed=seed, device=device, z=z)
        kind_found = kind or _kind(engine, name)
        extra = dict(solver=solver, mc_steps=mc_steps) if kind_found == "sde" else dict(sde=sde)
        report = run_checks(engine, name, kind, **common, **extra)
        title = (
            f"{report.kind} {name!r}: {'PASS' if report.passed else 'FAIL'} "
            f"({len(report.results) - len(report.failures)}/{len(report.results)}, "
            f"{report.seconds:.1f}s)"
        )
        print_table(title, report.rows(), ["check", "result", "measured", "bound", "detail"])
        if not report.passed:
            raise typer.Exit(1)


def _kind(engine, name: str) -> str | None:
    from diffuse_engine.testbed.conformance import CHECKABLE_KINDS, _known

    kinds = [k for k in CHECKABLE_KINDS if _known(engine, k, name)]
    return kinds[0] if len(kinds) == 1 else None
