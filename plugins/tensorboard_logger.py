"""TensorBoard logger: training curves, sample plots and run metrics as event files.

Off by default (CSV ``losses.csv`` and ``metrics.json`` are always written). Enable it with
``diffuse train --log tensorboard`` (also ``diffuse run`` and ``diffuse sample``), the
environment variable ``DIFFUSE_LOG=tensorboard`` (what the option sets), or in Python
``Engine(plugins=[TensorBoardLogger()])``. It is an observer on the engine's events, with
``torch.utils.tensorboard.SummaryWriter`` writing into ``OUT/tensorboard/`` of each run
folder (``tensorboard --logdir runs`` shows them all):

* ``train``: at every loss read-back (``log_every`` steps) the scalars ``train/loss``
  (mean since the last read-back), ``train/lr``, ``train/grad_norm`` and
  ``train/ema_lag`` (:func:`~diffuse_engine.core.hookspecs.diffuse_training_stats`), each
  sample plot (``plot_every`` steps and the last) as the image ``samples``, the final
  figures (``seconds``, the mean ``loss`` of the last 100 steps) as ``train/final/NAME``
  and the resolved configuration as text;
* ``run`` and ``sample``: their metrics (``metrics.json``: score evaluations, seconds,
  the per-mode errors against the exact mixture, ...) as ``run/NAME`` / ``sample/NAME``
  at step 0, the samples plot as the image ``samples`` and the configuration as text,
  written once the run folder is complete.

tensorboard is an optional extra (``pip install "diffuse-engine[tensorboard]"``); asking for
the logger without it is a one-line error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from diffuse_engine import DiffuseError, hookimpl

ENV_VAR = "DIFFUSE_LOG"
#: the sub-folder of a run folder that holds the event files
SUBDIR = "tensorboard"
INSTALL_HINT = 'tensorboard is not installed; pip install "diffuse-engine[tensorboard]"'


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise DiffuseError(INSTALL_HINT) from None
    return SummaryWriter


def scalars(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """The numbers in ``metrics`` (nested dicts flattened to ``a/b``), booleans and
    lists left out."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(scalars(value, f"{prefix}/{key}"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}/{key}"] = float(value)
    return out


class TensorBoardLogger:
    """Observer writing each run's events into ``OUT/tensorboard`` (see module doc).

    Runs nest (``diffuse run`` training its model first), so open runs are a stack and
    training events go to the innermost ``train`` run.
    """

    def __init__(self):
        self.SummaryWriter = _summary_writer()
        self.runs: list[dict[str, Any]] = []  # {"run": ..., "writer": SummaryWriter | None}

    def _writer(self, entry: dict[str, Any]):
        if entry["writer"] is None:
            out = Path(entry["run"]["out"])
            entry["writer"] = self.SummaryWriter(log_dir=str(out / SUBDIR))
            config = entry["run"].get("config")
            if config is not None:
                text = json.dumps(config, indent=2, default=str)
                entry["writer"].add_text("config", f"```\n{text}\n```", 0)
        return entry["writer"]

    def _training(self) -> dict[str, Any] | None:
        for entry in reversed(self.runs):
            if entry["run"].get("command") == "train" and entry["run"].get("out"):
                return entry
        return None

    @hookimpl
    def diffuse_run_start(self, run):
        entry = {"run": run, "writer": None}
        self.runs.append(entry)
        if run.get("command") == "train" and run.get("out"):
            self._writer(entry)  # a training folder exists from the start

    @hookimpl
    def diffuse_training_stats(self, step, stats):
        entry = self._training()
        if entry is None:
            return
        w = self._writer(entry)
        for name, value in scalars(stats, "train").items():
            w.add_scalar(name, value, step)
        # once per log_every: an interrupted or failed run (no run_end) keeps its curves
        w.flush()

    @hookimpl
    def diffuse_plot_saved(self, path, step):
        entry = self._training()
        if entry is not None:
            w = self._writer(entry)
            self._add_image(w, Path(path), step)
            w.flush()

    @hookimpl
    def diffuse_run_end(self, run, metrics):
        key = (run.get("command"), run.get("out"))
        entry = next(
            (
                e
                for e in reversed(self.runs)
                if (e["run"].get("command"), e["run"].get("out")) == key
            ),
            None,
        )
        if entry is None:  # a run that began before the logger did
            entry = {"run": run, "writer": None}
        else:
            self.runs.remove(entry)
        if not run.get("out"):
            return
        command = run.get("command") or "run"
        w = self._writer(entry)
        step = int(metrics.get("step", 0)) if isinstance(metrics.get("step"), int) else 0
        prefix = "train/final" if command == "train" else command  # apart from the curves
        for name, value in scalars(
            {k: v for k, v in metrics.items() if k != "step"}, prefix
        ).items():
            w.add_scalar(name, value, step)
        plot = Path(run["out"]) / "samples.png"
        if command != "train" and plot.is_file():
            self._add_image(w, plot, step)
        w.close()

    @staticmethod
    def _add_image(writer, path: Path, step: int) -> None:
        from matplotlib.image import imread

        img = imread(path)  # (H, W, 3 or 4) floats in [0, 1] for a PNG
        writer.add_image("samples", img[..., :3], step, dataformats="HWC")


def enabled() -> bool:
    """Whether ``DIFFUSE_LOG`` (comma-separated logger names) asks for tensorboard."""
    names = os.environ.get(ENV_VAR, "")
    return "tensorboard" in {n.strip().lower() for n in names.split(",")}


@hookimpl
def diffuse_configure(engine):
    if enabled():
        engine.pm.register(TensorBoardLogger())
