"""The typer CLI through CliRunner, and one real `diffuse run` subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffuse_engine.cli import build_app

runner = CliRunner()


@pytest.fixture(scope="module")
def app():
    return build_app()


def test_run_writes_a_complete_run_folder(app, tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(
        app,
        [
            "run",
            "--sde",
            "vp",
            "--solver",
            "pc",
            "--steps",
            "50",
            "-n",
            "500",
            "--out",
            str(out),
            "--set",
            "corrector=none",
        ],
    )
    assert res.exit_code == 0, res.output
    for f in ("samples.pt", "samples.png", "metrics.json", "config.json", "status.json"):
        assert (out / f).exists(), f
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["nfe"] == 51 and metrics["n"] == 500
    assert {"weight_tv", "std_error", "centre_error", "seconds", "floor"} <= set(metrics)
    assert len(metrics["modes"]["weight"]) == 8
    assert json.loads((out / "status.json").read_text())["complete"] is True
    config = json.loads((out / "config.json").read_text())
    assert config["resolved"]["solver"]["corrector"] == "none"
    assert "score evaluations" in res.output


def test_existing_output_needs_overwrite(app, tmp_path):
    out = tmp_path / "run"
    args = ["run", "--steps", "5", "-n", "50", "--out", str(out), "-q"]
    assert runner.invoke(app, args).exit_code == 0
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "already exists; pass --overwrite" in res.output
    assert runner.invoke(app, args + ["--overwrite"]).exit_code == 0


def test_npz_format_and_dry_run(app, tmp_path):
    out = tmp_path / "r"
    assert (
        runner.invoke(
            app, ["run", "--steps", "5", "-n", "50", "--out", str(out), "-q", "--format", "npz"]
        ).exit_code
        == 0
    )
    assert (out / "samples.npz").exists()
    res = runner.invoke(app, ["run", "--dry-run", "--sde", "ve", "--set", "snr=0.2"])
    assert res.exit_code == 0
    assert '"sigma_max": 50.0' in res.output and '"snr": 0.2' in res.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["run", "--sde", "nope"], "no sde entry named 'nope'"),
        (["run", "--set", "snr=-1"], "snr: Input should be greater than 0"),
        (["run", "--set", "bogus=1"], "override 'bogus': no chosen entry has that field"),
        (["run", "--device", "tpu9"], "device"),
    ],
)
def test_errors_are_one_line_and_exit_2(app, args, message):
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    assert message in res.output
    assert "Traceback" not in res.output


def test_plugins_and_registry_commands(app, tmp_path):
    res = runner.invoke(app, ["plugins", "--verbose"])
    assert res.exit_code == 0
    assert "diffuse-engine" in res.output and "reverse_diffusion" in res.output
    res = runner.invoke(app, ["registry", "show", "--set", "sde.vp.beta_max=12"])
    assert res.exit_code == 0 and "beta_max = 12" in res.output
    good = tmp_path / "good.toml"
    good.write_text('[sde.slow]\ntype = "vp"\nbeta_max = 5.0\n')
    res = runner.invoke(app, ["registry", "check", str(good)])
    assert res.exit_code == 0 and "ok" in res.output
    bad = tmp_path / "bad.toml"
    bad.write_text('[solver.pc]\ncorrector = "langevn"\n')
    res = runner.invoke(app, ["registry", "check", str(bad)])
    assert res.exit_code == 2
    assert (
        "bad.toml: [solver.pc] corrector: unknown corrector 'langevn' (did you mean " in res.output
    )


def test_real_subprocess_from_outside_the_repo(tmp_path):
    """`diffuse run` works from any directory, finding the registry inside the package."""
    exe = Path(sys.executable).with_name("diffuse")
    env = {**os.environ, "COLUMNS": "120"}
    proc = subprocess.run(
        [str(exe), "run", "--steps", "20", "-n", "300", "--out", "out"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "samples.png").exists()
    proc = subprocess.run(
        [sys.executable, "-m", "diffuse_engine", "run", "--sde", "bad"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no sde entry named 'bad'" in proc.stderr
