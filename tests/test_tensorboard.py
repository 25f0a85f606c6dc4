"""``--log tensorboard``: event files in the run folder, read back with TensorBoard's own
``EventAccumulator`` and checked against what the run wrote as CSV and JSON."""

from __future__ import annotations

import csv
import json
import sys

import pytest
from typer.testing import CliRunner

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)

from diffuse_engine.cli import build_app  # noqa: E402
from diffuse_engine.training.schedules import learning_rate  # noqa: E402
from diffuse_engine.training.settings import TrainSettings  # noqa: E402

TRAIN = [
    "train", "--data", "gmm", "--model", "mlp", "--steps", "40", "--batch-size", "64",
    "--set", "hidden=16", "--set", "depth=1", "--set", "log_every=10", "--set", "warmup=20",
    "--set", "plot_every=20", "--set", "plot_n=64", "--set", "plot_steps=5",
    "--set", "plot_solver=ode", "--quiet",
]  # fmt: skip


@pytest.fixture(autouse=True)
def no_loggers(monkeypatch):
    """The CLI sets DIFFUSE_LOG for the engine it builds; never leak it to other tests."""
    monkeypatch.delenv("DIFFUSE_LOG", raising=False)
    monkeypatch.delenv("DIFFUSE_LOG_METRICS", raising=False)


def invoke(args):
    result = CliRunner().invoke(build_app(with_plugin_commands=False), args)
    return result


def events(folder):
    acc = EventAccumulator(str(folder / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.delenv("DIFFUSE_LOG", raising=False)
    out = tmp_path_factory.mktemp("tb") / "train"
    result = invoke([*TRAIN, "--log", "tensorboard", "--out", str(out)])
    mp.undo()
    assert result.exit_code == 0, result.output
    return out


def test_train_writes_curves_plots_and_config(trained):
    acc = events(trained)
    tags = acc.Tags()
    for name in ("train/loss", "train/lr", "train/grad_norm", "train/ema_lag"):
        assert [s.step for s in acc.Scalars(name)] == [10, 20, 30, 40], name
    # the logged loss is the mean of losses.csv over each read-back window of 10 steps
    with (trained / "losses.csv").open() as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    for s in acc.Scalars("train/loss"):
        window = losses[s.step - 10 : s.step]
        assert s.value == pytest.approx(sum(window) / 10, rel=1e-6)
    # the learning rate the optimiser used at each logged step (warm-up, then the schedule)
    config = json.loads((trained / "config.json").read_text())["config"]["train"]
    settings = TrainSettings.model_validate(config)
    for s in acc.Scalars("train/lr"):
        assert s.value == pytest.approx(learning_rate(settings, s.step - 1), rel=1e-6)
    assert acc.Scalars("train/lr")[0].value == pytest.approx(settings.lr * 10 / 20, rel=1e-6)
    assert all(s.value > 0 for s in acc.Scalars("train/grad_norm"))
    assert all(0 <= s.value < 1 for s in acc.Scalars("train/ema_lag"))
    # sample plots at plot_every and at the end, as the PNGs the run wrote
    assert [i.step for i in acc.Images("samples")] == [20, 40]
    assert (trained / "samples-step0000020.png").is_file()
    assert "config/text_summary" in tags["tensors"]
    final = {s.step: s.value for s in acc.Scalars("train/final/loss")}
    assert final[40] == pytest.approx(sum(losses) / len(losses), rel=1e-6)


def test_sample_logs_its_metrics(trained, tmp_path):
    out = tmp_path / "s"
    args = ["sample", "--checkpoint", str(trained), "--solver", "ode", "--steps", "5"]
    result = invoke([*args, "-n", "200", "--quiet", "--out", str(out), "--log", "tensorboard"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "metrics.json").read_text())
    acc = events(out)
    assert acc.Scalars("sample/nfe")[0].value == saved["nfe"]
    assert acc.Scalars("sample/weight_tv")[0].value == pytest.approx(saved["weight_tv"])
    assert len(acc.Images("samples")) == 1


def test_run_logs_its_metrics(tmp_path):
    out = tmp_path / "r"
    args = ["run", "--solver", "ode", "--steps", "5", "-n", "300", "--quiet"]
    result = invoke([*args, "--out", str(out), "--log", "tensorboard"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "metrics.json").read_text())
    acc = events(out)
    assert acc.Scalars("run/nfe")[0].value == saved["nfe"]
    assert acc.Scalars("run/std_error")[0].value == pytest.approx(saved["std_error"])
    assert acc.Scalars("run/floor/std_error")[0].value == pytest.approx(saved["floor"]["std_error"])


def test_csv_stays_the_default(tmp_path):
    out = tmp_path / "r"
    result = invoke(["run", "--solver", "ode", "--steps", "3", "-n", "100", "-q", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "metrics.json").is_file() and not (out / "tensorboard").exists()


def test_unknown_logger_is_one_line(tmp_path):
    result = invoke(["run", "--log", "wandb", "-q", "-o", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "choices: csv, tensorboard" in result.output
    assert not (tmp_path / "r").exists()


def test_without_tensorboard_the_logger_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    result = invoke(["run", "--log", "tensorboard", "-q", "-o", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert 'pip install "diffuse-engine[tensorboard]"' in result.output


def test_an_interrupted_training_keeps_its_curves(tmp_path):
    """No run_end (Ctrl-C, NaN, a full disk): what was logged is on disk all the same."""
    from diffuse_plugins.tensorboard_logger import TensorBoardLogger

    logger = TensorBoardLogger()
    logger.diffuse_run_start(run={"command": "train", "out": str(tmp_path)})
    for step in (50, 100):
        logger.diffuse_training_stats(step=step, stats={"loss": 1.0 / step})
    acc = events(tmp_path)  # read back while the writer is still open
    assert [e.step for e in acc.Scalars("train/loss")] == [50, 100]
