"""Metrics logger: every lifecycle event of a run appended to a CSV or JSON-lines file.

Off by default. Enable it with ``diffuse --log-metrics PATH COMMAND ...`` or the
environment variable ``DIFFUSE_LOG_METRICS=PATH`` (what the option sets, so commands and
Python programs share one switch); ``.csv`` writes CSV, anything else JSON lines. When
enabled, the plugin registers a :class:`MetricsLogger` observer in
``diffuse_configure``; when it is not, no per-step hook has an implementation and the
samplers and the trainer skip the event entirely (``Engine.has_observers``).

Events (one record each, ``time`` in seconds since the logger started):
``run_start`` (command, out), ``sampling_step`` (step, total, t), ``training_step``
(step, loss), ``checkpoint_saved`` (step, path) and ``run_end`` (one record per scalar
metric: name, value). CSV columns are fixed: :data:`CSV_COLUMNS`.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path
from typing import Any

from diffuse_engine import hookimpl

ENV_VAR = "DIFFUSE_LOG_METRICS"
CSV_COLUMNS = ["time", "event", "command", "step", "total", "t", "loss", "name", "value", "path"]


class MetricsLogger:
    """Observer appending one record per event to ``path`` (CSV or JSON lines)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.csv = self.path.suffix.lower() == ".csv"
        self.start = time.perf_counter()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.csv and (not self.path.exists() or self.path.stat().st_size == 0):
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(CSV_COLUMNS)

    def write(self, event: str, **fields: Any) -> None:
        record = {"time": round(time.perf_counter() - self.start, 6), "event": event, **fields}
        with self.path.open("a", newline="") as f:  # append: a crash loses at most one line
            if self.csv:
                csv.writer(f).writerow([record.get(c, "") for c in CSV_COLUMNS])
            else:
                f.write(json.dumps(record) + "\n")

    @hookimpl
    def diffuse_run_start(self, run):
        self.write("run_start", command=run.get("command"), path=str(run.get("out")))

    @hookimpl
    def diffuse_sampling_step(self, step, total, t):
        self.write("sampling_step", step=step, total=total, t=t)

    @hookimpl
    def diffuse_training_step(self, step, loss):
        self.write("training_step", step=step, loss=loss)

    @hookimpl
    def diffuse_checkpoint_saved(self, path, step):
        self.write("checkpoint_saved", step=step, path=str(path))

    @hookimpl
    def diffuse_run_end(self, run, metrics):
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.write("run_end", command=run.get("command"), name=name, value=value)


@hookimpl
def diffuse_configure(engine):
    path = os.environ.get(ENV_VAR)
    if path:
        engine.pm.register(MetricsLogger(path))
