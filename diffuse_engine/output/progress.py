"""Progress bars for long loops: shown on a terminal, silent otherwise."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@contextmanager
def progress_bar(
    total: int, description: str, enabled: bool = True
) -> Iterator[Callable[..., None] | None]:
    """Yield ``update(step, **fields)`` drawing a bar on stderr, or None when quiet.

    The bar is only drawn when ``enabled`` and stderr is a terminal, so logs and CI
    output stay clean.
    """
    if not enabled:  # no console either: a quiet run pays nothing for the bar
        yield None
        return
    console = Console(stderr=True)
    if not console.is_terminal:
        yield None
        return
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    ]
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total, info="")

        def update(step: int, **fields) -> None:
            info = " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items()
            )
            progress.update(task, completed=step, info=info)

        yield update
