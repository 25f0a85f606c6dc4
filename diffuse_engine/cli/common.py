"""Shared CLI plumbing: one-line errors, engine construction, tables."""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
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
    reported: set[str] = field(default_factory=set)  # plugins whose failure was reported


STATE = _State()


def _width(stream) -> int | None:
    """rich's own width on a terminal (or with ``COLUMNS`` set); otherwise wide enough
    that tables and lines piped into a file or ``grep`` are never wrapped at 80."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return None if tty or os.environ.get("COLUMNS") else 10_000


console = Console(width=_width(sys.stdout))
err_console = Console(stderr=True, width=_width(sys.stderr))

#: OSErrors that are the environment's, not a bug: reported in one line
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EIO,
}


def err(message: str) -> None:
    """Print one line to stderr (no markup interpretation)."""
    err_console.print(message, markup=False, highlight=False, soft_wrap=True)


def _show_warning(message, category, filename, lineno, file=None, line=None, _old=None):
    """Our own warnings as one ``warning: ...`` line; others as Python prints them."""
    if issubclass(category, UserWarning) and any(
        part in str(filename) for part in ("diffuse_engine", "diffuse_plugins", "plugins")
    ):
        err(f"warning: {message}")
    elif _old is not None:
        _old(message, category, filename, lineno, file, line)


def handle_errors(fn: Callable) -> Callable:
    """Turn user-fixable errors into one line on stderr and exit status 2: every
    :class:`DiffuseError`, and, as a last line of defence, the environment's (a full disk,
    a read-only folder) and running out of memory. Warnings print as ``warning: ...``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.showwarning = functools.partial(_show_warning, _old=warnings.showwarning)
            try:
                return fn(*args, **kwargs)
            except DiffuseError as exc:
                if STATE.debug:
                    raise
                err(f"error: {exc}")
                raise typer.Exit(exc.exit_code) from None
            except KeyboardInterrupt as exc:
                from diffuse_engine.output.interrupts import forget_handled_interrupt

                forget_handled_interrupt()  # or `python -m` may die of SIGINT, not exit 130
                err(f"interrupted: {exc}" if str(exc) else "interrupted")
                raise typer.Exit(130) from None
            except OSError as exc:
                if STATE.debug or exc.errno not in ENVIRONMENT_ERRNOS:
                    raise
                from diffuse_engine.output.files import describe_os_error

                where = f"{exc.filename}: " if exc.filename else ""
                err(f"error: {where}{describe_os_error(exc)}")
                raise typer.Exit(2) from None
            except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError too
                if STATE.debug or not (
                    isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
                ):
                    raise
                first = (str(exc).splitlines() or [""])[0][:160]
                err(
                    f"error: out of memory ({first or type(exc).__name__}); ask for less "
                    "(--batch-size, -n, a smaller model) or use a bigger device"
                )
                raise typer.Exit(2) from None

    return wrapper


def out_option(value: str | None, option: str = "--out") -> Path | None:
    """An ``--out`` value checked before any work (not empty, not a symlink, not a file,
    writable), or ``None`` when the option was not given."""
    if value is None:
        return None
    from diffuse_engine.output.files import check_out_path

    return check_out_path(value, option)


def check_names(engine, **options: tuple[str, str | None]) -> None:
    """Check registry names given as options, e.g. ``check_names(engine, model=("score",
    "mpl"))``, so a mistake names the option the user typed (``--model 'mpl': ... did you
    mean 'mlp'?``) rather than the registry table it would have filled."""
    from diffuse_engine.core.errors import RegistryError

    for option, (kind, value) in options.items():
        if value is None:
            continue
        flag = "--" + option.replace("_", "-")
        try:
            engine.registry.entry(kind, value)
        except RegistryError as exc:
            raise RegistryError(f"{flag} {value!r}: {exc}") from None


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
LogOpt = typer.Option(
    None,
    "--log",
    metavar="LOGGER",
    help="also log to: tensorboard (event files in OUT/tensorboard; needs the extra "
    "diffuse-engine[tensorboard]); csv (losses.csv, metrics.json) is always written",
)
LOGGERS = ("csv", "tensorboard")


def use_loggers(names: list[str] | None) -> None:
    """``--log NAME`` (repeatable): set ``DIFFUSE_LOG`` for the logger plugins the engine
    enables when built (the tensorboard observer reads it), as ``--log-metrics`` does."""
    bad = [n for n in names or [] if n not in LOGGERS]
    if bad:
        raise DiffuseError(f"--log {bad[0]!r}: unknown logger; choices: {', '.join(LOGGERS)}")
    extra = sorted({n for n in names or [] if n != "csv"})
    if extra:
        os.environ["DIFFUSE_LOG"] = ",".join(extra)


def check_counts(**options: int | None) -> None:
    """Refuse a count option below 1 (``--nfe 0``, ``--steps -2``) by its own name, before
    a registry entry it would pick or override is looked up."""
    for name, value in options.items():
        if value is not None and value < 1:
            raise DiffuseError(f"--{name} must be >= 1, got {value}")


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

    engine = Engine(
        registry=registry or [],
        sets=sets or [],
        allow_imports=STATE.allow_imports,
        distributed=launched_by_torchrun(),
    )  # a torchrun worker: all ranks work
    report_failed_plugins(engine.plugin_infos)
    return engine


def report_failed_plugins(infos) -> None:
    """One ``warning:`` line per plugin that failed to load (once per process)."""
    for info in infos:
        if not info.ok and info.name not in STATE.reported:
            STATE.reported.add(info.name)
            err(f"warning: {info.describe()} did not load: {info.error}")


def print_table(title: str, rows: list[tuple[Any, ...]], columns: list[str]) -> None:
    """Print a rich table to stdout; cells are text, never rich markup (a formula such as
    ``[f - g^2 s]`` shows as written)."""
    from rich.markup import escape

    table = Table(title=escape(title), title_justify="left")
    for c in columns:
        table.add_column(escape(c))
    for row in rows:
        table.add_row(*(escape(fmt(v)) for v in row))
    wide = _width(console.file)  # where stdout is now (CliRunner replaces it)
    if wide is not None:
        console.width = wide
    console.print(table)


def print_fitted_hint(out: Any, name: str) -> None:
    """After a run whose schedule (or weights) was fitted: where the fit is kept and how
    to reuse it."""
    from diffuse_engine.runs.fitted import FITTED_FILE

    path = Path(out) / FITTED_FILE
    console.print(
        f"fitted solver kept in {path}; sample with it without the pilot: "
        f"--registry {path} --solver {name}",
        markup=False,
        highlight=False,
    )


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return "" if v is None else str(v)
