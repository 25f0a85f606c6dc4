"""Shared CLI plumbing: one-line errors, engine construction, tables."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from diffuse_engine.core.errors import DiffuseError


@dataclass
class _State:
    debug: bool = False
    allow_imports: bool = False


STATE = _State()
console = Console()
err_console = Console(stderr=True)


def err(message: str) -> None:
    """Print one line to stderr (no markup interpretation)."""
    err_console.print(message, markup=False, highlight=False, soft_wrap=True)


def handle_errors(fn: Callable) -> Callable:
    """Turn user-fixable errors into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DiffuseError as exc:
            if STATE.debug:
                raise
            err(f"error: {exc}")
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:
            err(f"interrupted: {exc}" if str(exc) else "interrupted")
            raise typer.Exit(130) from None

    return wrapper


RegistryOpt = typer.Option(
    None, "--registry", "-r", help="extra registry file(s), merged over the default", exists=False
)
NprocOpt = typer.Option(
    None,
    "--nproc",
    min=1,
    help="processes on this machine: reruns the "
    "command under torchrun (DDP; gloo on CPU, nccl on GPU); for several "
    "nodes run torchrun -m diffuse_engine yourself (README)",
)
SetOpt = typer.Option(
    None,
    "--set",
    "-s",
    help="KEY=VALUE override: FIELD, KIND.FIELD or KIND.NAME.FIELD (repeatable)",
)


def refuse_nproc_here(nproc: int | None) -> None:
    """``--nproc N`` is taken off the command line by ``main()`` (which relaunches under
    torchrun); reaching a command means it bypassed ``main()``, so say so, not ignore it."""
    if nproc is not None and nproc > 1:
        raise DiffuseError(
            "--nproc is handled by the diffuse command itself (diffuse_engine."
            "cli.main); here, run torchrun -m diffuse_engine ... instead"
        )


def make_engine(registry: list[Path] | None = None, sets: list[str] | None = None):
    """An Engine from CLI options (imported lazily so `--help` stays fast)."""
    from diffuse_engine.core.distributed import launched_by_torchrun
    from diffuse_engine.engine import Engine

    return Engine(
        registry=registry or [],
        sets=sets or [],
        allow_imports=STATE.allow_imports,
        distributed=launched_by_torchrun(),
    )  # a torchrun worker: all ranks work


def print_table(title: str, rows: list[tuple[Any, ...]], columns: list[str]) -> None:
    """Print a rich table to stdout."""
    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c)
    for row in rows:
        table.add_row(*(fmt(v) for v in row))
    console.print(table)


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return "" if v is None else str(v)
