"""The ``diffuse`` command line: thin typer commands over :class:`~diffuse_engine.Engine`.

Each sub-module adds its commands with ``register(app)``; installed plugins add theirs
through the ``diffuse_register_commands`` hook. Errors a user can fix print one line
and exit with status 2; ``--debug`` (anywhere on the line) shows the traceback.
"""

from __future__ import annotations

import os
import sys

import click
import typer

from diffuse_engine.cli import (
    bench_cmd,
    check_cmd,
    common,
    inpaint_cmd,
    likelihood_cmd,
    plugins_cmd,
    registry_cmd,
    run_cmd,
    sample_cmd,
    train_cmd,
)
from diffuse_engine.core.plugins import make_plugin_manager

#: modules contributing built-in commands, in help order
COMMAND_MODULES = [
    run_cmd,
    train_cmd,
    sample_cmd,
    likelihood_cmd,
    plugins_cmd,
    registry_cmd,
    check_cmd,
    bench_cmd,
    inpaint_cmd,
]


def build_app(with_plugin_commands: bool = True) -> typer.Typer:
    """The typer application with built-in and (optionally) plugin commands."""
    app = typer.Typer(
        name="diffuse",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        help="Score-based generative modelling with SDEs, built from plugins.",
    )

    @app.callback()
    def _root(
        debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
        allow_imports: bool = typer.Option(
            False,
            "--allow-imports",
            help="let registry files name "
            'type = "package.module:Class" (runs that code: trusted files only)',
        ),
        log_metrics: str | None = typer.Option(
            None,
            "--log-metrics",
            metavar="PATH",
            help="append every run event "
            "(steps, losses, final metrics) to PATH, .csv or JSON lines; sets "
            "DIFFUSE_LOG_METRICS for the engine",
        ),
    ):
        common.STATE.debug = debug
        common.STATE.allow_imports = allow_imports
        if log_metrics is not None:  # the metrics-logger plugin reads it when built
            problem = _unwritable_log(log_metrics)
            if problem:
                common.err(f"error: --log-metrics {log_metrics!r}: {problem}")
                raise typer.Exit(2)
            os.environ["DIFFUSE_LOG_METRICS"] = log_metrics

    for module in COMMAND_MODULES:
        module.register(app)
    if with_plugin_commands:
        _plugin_commands(app)
    return app


def _plugin_commands(app: typer.Typer) -> None:
    """Each plugin's ``diffuse_register_commands``, one at a time: a plugin that fails
    (or was skipped when loading) is reported and the others' commands still come."""
    from diffuse_engine.core.plugins import Catalogue

    try:
        pm, infos = make_plugin_manager()
        Catalogue.from_plugin_manager(pm, infos)  # unregisters plugins that fail to load
    except Exception as exc:  # a broken plugin must not take the CLI down
        common.err(f"warning: plugin commands unavailable: {exc}")
        return
    for impl in pm.hook.diffuse_register_commands.get_hookimpls():
        try:
            impl.function(app=app)
        except Exception as exc:
            common.err(f"warning: plugin {impl.plugin_name!r} could not add its commands: {exc}")


def _unwritable_log(value: str) -> str | None:
    """Why the metrics log ``value`` cannot be appended to, or ``None`` (checked before
    the command does any work; nothing is created here)."""
    from pathlib import Path

    if not value.strip():
        return "empty path; give a .csv or .jsonl file"
    p = Path(value).expanduser()
    if p.is_dir():
        return "is a folder; give a .csv or .jsonl file"
    if p.exists() and not p.is_file():
        return "not a regular file (a FIFO or device would block); give a .csv or .jsonl file"
    if p.exists():
        return None if os.access(p, os.W_OK) else "not writable (permission denied or read-only)"
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create it: {parent} is not writable (permission denied or read-only)"
    return None


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``diffuse`` console script and ``python -m diffuse_engine``."""
    args = list(sys.argv[1:] if argv is None else argv)
    from diffuse_engine.core.allocator import keep_freed_memory

    keep_freed_memory()  # CPU sampling page-faulted ~40 % of its time (allocator.py)
    for flag in ("--allow-imports", "--debug"):  # global options, accepted anywhere
        if flag in args:
            args = [flag] + [a for a in args if a != flag]
    if "--log-metrics" in args[:-1]:  # a global option with a value, also anywhere
        i = args.index("--log-metrics")
        args = args[i : i + 2] + args[:i] + args[i + 2 :]
    args = _distributed(args)
    try:
        status = build_app()(args=args, prog_name="diffuse", standalone_mode=False)
    except (KeyboardInterrupt, click.exceptions.Abort):  # Ctrl-C before a command runs
        from diffuse_engine.output.interrupts import forget_handled_interrupt

        forget_handled_interrupt()
        common.err("interrupted")
        raise SystemExit(130) from None
    except Exception as exc:
        # click's usage errors (a bad option value, a missing argument): one line, exit 2
        message = getattr(exc, "format_message", None)
        if message is None or "--debug" in args:
            raise
        common.err(f"error: {message()} (see --help)")
        raise SystemExit(getattr(exc, "exit_code", 2)) from None
    raise SystemExit(status if isinstance(status, int) else 0)


def _distributed(args: list[str]) -> list[str]:
    """``--nproc N`` (N > 1) reruns the command under torchrun and exits with its status;
    in a torchrun worker other than rank 0, stdout is silenced (rank 0 reports)."""
    from diffuse_engine.cli.launch import launch, split_nproc
    from diffuse_engine.core.distributed import DistributedError, launched_by_torchrun

    try:
        nproc, args = split_nproc(args)
        if nproc is not None and nproc > 1:
            command = next(
                (
                    a
                    for i, a in enumerate(args)
                    if not a.startswith("-") and (i == 0 or args[i - 1] != "--log-metrics")
                ),
                None,
            )
            if command not in ("train", "sample", "run", "inpaint"):
                raise DistributedError(
                    f"--nproc works with diffuse train, sample, run and inpaint, not {command!r}"
                )
            raise SystemExit(launch(nproc, args))
    except DistributedError as exc:
        common.err(f"error: {exc}")
        raise SystemExit(exc.exit_code) from None
    if launched_by_torchrun() and os.environ.get("RANK", "0") != "0":
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)
    return args
