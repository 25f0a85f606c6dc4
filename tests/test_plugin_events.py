"""Observer events: free when nobody listens, complete when the metrics logger does."""

from __future__ import annotations

import csv
import json
from itertools import pairwise

import pytest
from typer.testing import CliRunner

from diffuse_engine import Engine, Solver, module_plugin
from diffuse_engine.cli import build_app


class CallbackSpy(Solver):
    """Records the callback the engine hands the solver, then does a few cheap steps."""

    name = "callback_spy"
    seen: list = []

    def sample(self, score, sde, x, *, generator=None, callback=None):
        CallbackSpy.seen.append(callback)
        for i in range(3):
            if callback is not None:
                callback(i + 1, 3, 1.0 - (i + 1) / 3)
        return x


@pytest.fixture
def no_logger(monkeypatch):
    monkeypatch.setenv("DIFFUSE_LOG_METRICS", "")  # restored (unset) after the test


def spy_engine(*plugins):
    spy = module_plugin(diffuse_register_solvers=lambda: [CallbackSpy])
    return Engine(plugins=[spy, *plugins], autoload=False)


def test_no_observer_means_no_per_step_hook_and_no_callback(no_logger):
    engine = spy_engine()
    calls = []
    undo = engine.pm.add_hookcall_monitoring(
        lambda name, impls, kw: calls.append(name), lambda *a: None
    )
    try:
        assert not engine.has_observers("diffuse_sampling_step")
        CallbackSpy.seen.clear()
        engine.sample(score="gmm", sde="vp", solver="callback_spy", shape=(8, 2), seed=0)
        engine.sample(score="gmm", sde="vp", solver="pc", shape=(8, 2), seed=0, steps=5)
    finally:
        undo()
    assert CallbackSpy.seen == [None]  # the solver's loop has nothing to call
    assert "diffuse_sampling_step" not in calls


def test_a_plugin_observer_receives_every_step(no_logger):
    steps = []
    observer = module_plugin(
        diffuse_sampling_step=lambda step, total, t: steps.append((step, total, t))
    )
    engine = Engine(plugins=[observer], autoload=False)
    engine.sample(score="gmm", sde="vp", solver="ode", shape=(4, 2), seed=0, steps=6)
    assert [s for s, _, _ in steps] == list(range(1, 7))
    assert all(total == 6 and isinstance(t, float) for _, total, t in steps)
    assert all(b[2] < a[2] for a, b in pairwise(steps))  # time runs backwards


def test_metrics_logger_jsonl_from_the_environment(monkeypatch, tmp_path):
    path = tmp_path / "events.jsonl"
    monkeypatch.setenv("DIFFUSE_LOG_METRICS", str(path))
    engine = Engine(autoload=False)
    assert engine.has_observers("diffuse_sampling_step")
    engine.sample(score="gmm", sde="vp", solver="ode", shape=(4, 2), seed=0, steps=7)
    engine.hook.diffuse_training_step(step=1, loss=0.5)
    engine.hook.diffuse_checkpoint_saved(path="ck.safetensors", step=1)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    sampling = [r for r in records if r["event"] == "sampling_step"]
    assert [r["step"] for r in sampling] == list(range(1, 8))
    assert {"training_step", "checkpoint_saved"} <= {r["event"] for r in records}


def test_cli_log_metrics_writes_a_csv_of_the_whole_run(no_logger, tmp_path):
    path = tmp_path / "m.csv"
    out = tmp_path / "run"
    result = CliRunner().invoke(
        build_app(with_plugin_commands=False),
        [
            "--log-metrics",
            str(path),
            "run",
            "--solver",
            "ode",
            "--steps",
            "5",
            "-n",
            "300",
            "--quiet",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(path.open()))
    events = [r["event"] for r in rows]
    assert events[0] == "run_start" and events.count("sampling_step") == 5
    finals = {r["name"]: float(r["value"]) for r in rows if r["event"] == "run_end"}
    saved = json.loads((out / "metrics.json").read_text())
    assert finals["nfe"] == saved["nfe"]
    assert finals["weight_tv"] == pytest.approx(saved["weight_tv"])


def test_log_metrics_option_is_accepted_after_the_command(no_logger, tmp_path):
    from diffuse_engine.cli import main

    path = tmp_path / "m.jsonl"
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "run",
                "--solver",
                "ode",
                "--steps",
                "3",
                "-n",
                "100",
                "--quiet",
                "--out",
                str(tmp_path / "r"),
                "--log-metrics",
                str(path),
            ]
        )
    assert exc.value.code == 0
    assert (
        sum(
            1
            for line in path.read_text().splitlines()
            if json.loads(line)["event"] == "sampling_step"
        )
        == 3
    )
