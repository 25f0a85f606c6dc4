"""Files are data: untrusted registries, checkpoints and tensor files never run code; run
folders are complete or visibly incomplete; outputs are never overwritten by accident.

The malicious files carry a real payload (a pickle whose ``__reduce__`` creates a marker
file; a module whose import does), and each test first shows the payload is live, so a
loader that did execute it would fail the test.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import running
from typer.testing import CliRunner

from diffuse_engine import DiffuseError, Engine, RegistryError
from diffuse_engine.cli import build_app

runner = CliRunner()


class Payload:
    """Unpickling this runs ``touch MARKER`` (the classic pickle exploit)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def live_payload(tmp_path: Path) -> tuple[bytes, Path]:
    """A pickle payload and its marker; proves plain unpickling does run it."""
    marker = tmp_path / "PWNED"
    data = pickle.dumps(Payload(marker))
    pickle.loads(data)  # noqa: S301 - the point: plain pickle executes it
    assert marker.exists()
    marker.unlink()
    return data, marker


# ---- checkpoints and tensor files ------------------------------------------------------
def test_crafted_checkpoint_cannot_run_code(tmp_path):
    from diffuse_engine.components.checkpoint import Checkpoint, CheckpointError

    data, marker = live_payload(tmp_path)
    raw = tmp_path / "raw" / "checkpoint.safetensors"  # bare pickle bytes
    raw.parent.mkdir()
    raw.write_bytes(data)
    zipped = tmp_path / "zip" / "checkpoint.safetensors"  # torch.save's zip format
    zipped.parent.mkdir()
    torch.save({"model": Payload(marker), "w": torch.zeros(2)}, zipped)
    for path in (raw, zipped, raw.parent, zipped.parent):
        with pytest.raises(CheckpointError, match="not a diffuse-engine checkpoint"):
            Checkpoint.load(path)
        res = runner.invoke(
            build_app(),
            ["sample", "--checkpoint", str(path), "-n", "4", "--out", str(tmp_path / "s")],
        )
        assert res.exit_code == 2 and res.stderr.startswith("error: checkpoint"), res.output
        assert "Traceback" not in res.output
    assert not marker.exists()


def test_crafted_tensor_data_file_cannot_run_code(tmp_path):
    engine = Engine(autoload=False)
    if not engine.catalogue.has("data", "file"):
        pytest.skip("the 'file' dataset plugin is not installed")
    _, marker = live_payload(tmp_path)
    torch.save([Payload(marker)], tmp_path / "data.pt")
    with pytest.raises(DiffuseError, match="cannot read as a tensor .pt file"):
        engine.build("data", "file", path=str(tmp_path / "data.pt")).sample(2)
    assert not marker.exists()


# ---- registry files importing code ---------------------------------------------------------
EVIL_MODULE = """
    import pathlib
    pathlib.Path({marker!r}).write_text("imported")
    import torch
    from diffuse_plugins.vp import VPSDE

    class LoudVP(VPSDE):
        name = "loudvp"

    def nan_score_class():
        from diffuse_engine import ScoreModel
        class NaNScore(ScoreModel):
            name = "nan"
            data_shape = (2,)
            def forward(self, x, t):
                return torch.where(t[:, None] < 0.5, torch.nan, -x)
        return NaNScore

    NaNScore = nan_score_class()
"""


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """An importable module whose import leaves a marker, and a registry naming it."""
    marker = tmp_path / "IMPORTED"
    pkg = tmp_path / "site"
    pkg.mkdir()
    name = f"evil_{os.getpid()}_{time.monotonic_ns()}"
    (pkg / f"{name}.py").write_text(textwrap.dedent(EVIL_MODULE.format(marker=str(marker))))
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setenv("PYTHONPATH", str(pkg))
    reg = tmp_path / "reg.toml"
    reg.write_text(
        f'[sde.loud]\ntype = "{name}:LoudVP"\nbeta_max = 10.0\n\n'
        f'[score.nan]\ntype = "{name}:NaNScore"\n'
    )
    yield reg, marker, name
    sys.modules.pop(name, None)


def test_registry_import_path_refused_without_opt_in(evil_module):
    reg, marker, name = evil_module
    with pytest.raises(RegistryError) as info:
        Engine(registry=reg, autoload=False)
    assert f"'{name}:LoudVP' is a Python import path" in str(info.value)
    assert "--allow-imports" in str(info.value)
    res = runner.invoke(build_app(), ["registry", "check", str(reg)])
    assert res.exit_code == 2 and "--allow-imports" in res.stderr, res.output
    assert not marker.exists()  # refused before anything was imported


def test_registry_import_path_with_opt_in(evil_module, tmp_path):
    reg, marker, name = evil_module
    engine = Engine(registry=reg, autoload=False, allow_imports=True)
    assert marker.exists()
    assert engine.build("sde", "loud").config.beta_max == 10.0
    # the CLI flag, anywhere on the line; the imported score's NaN is located (t < 0.5)
    res = runner.invoke(
        build_app(),
        [
            "--allow-imports",
            "run",
            "--registry",
            str(reg),
            "--score",
            "nan",
            "-n",
            "8",
            "--steps",
            "10",
            "-q",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code == 2, res.output
    assert "NaN/Inf first appeared at step 7 of 10" in res.stderr, res.stderr
    assert "the score model 'nan'" in res.stderr


@pytest.mark.parametrize(
    "type_name,needle",
    [
        ("os:system", "is not a sde implementation"),
        ("no_such_module_xyz:A", "cannot import 'no_such_module_xyz'"),
        ("a b:c", "not an import path"),
        ("json:nothing_here", "has no attribute 'nothing_here'"),
    ],
)
def test_bad_import_paths_are_clean_errors(tmp_path, type_name, needle):
    reg = tmp_path / "reg.toml"
    reg.write_text(f'[sde.x]\ntype = "{type_name}"\n')
    with pytest.raises(RegistryError, match=needle):
        Engine(registry=reg, autoload=False, allow_imports=True)


# ---- run folders ----------------------------------------------------------------------
def test_failed_run_is_marked_incomplete_and_never_renamed(tmp_path):
    res = runner.invoke(
        build_app(),
        [
            "run",
            "-n",
            "64",
            "--steps",
            "20",
            "-q",
            "--out",
            str(tmp_path / "o"),
            "--set",
            "snr=1e30",
        ],
    )
    assert res.exit_code == 2
    assert f"incomplete output left in {tmp_path / 'o.partial'}" in res.stderr
    status = json.loads((tmp_path / "o.partial" / "status.json").read_text())
    assert status["complete"] is False and status["error"].startswith("NumericalError")
    assert not (tmp_path / "o").exists()


def test_failed_rerun_keeps_the_existing_output(tmp_path):
    out = tmp_path / "o"
    ok = ["run", "-n", "32", "--steps", "5", "-q", "--out", str(out)]
    assert runner.invoke(build_app(), ok).exit_code == 0
    before = (out / "samples.pt").read_bytes()
    res = runner.invoke(build_app(), ok + ["--overwrite", "--set", "snr=1e30"])
    assert res.exit_code == 2
    assert (out / "samples.pt").read_bytes() == before  # replaced only after success
    assert json.loads((out / "status.json").read_text())["complete"] is True


def test_live_partial_folder_of_another_run_is_not_deleted(tmp_path):
    out = tmp_path / "o"
    partial = tmp_path / "o.partial"
    partial.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (partial / "status.json").write_text(
            json.dumps({"complete": False, "pid": sleeper.pid, "host": socket.gethostname()})
        )
        res = runner.invoke(
            build_app(), ["run", "-n", "8", "--steps", "2", "-q", "--out", str(out)]
        )
        assert (
            res.exit_code == 2 and f"being written by another run (pid {sleeper.pid})" in res.stderr
        ), res.output
        assert partial.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    # once that process is gone the stale folder is replaced
    assert (
        runner.invoke(
            build_app(), ["run", "-n", "8", "--steps", "2", "-q", "--out", str(out)]
        ).exit_code
        == 0
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            out, err = proc.communicate()
            raise AssertionError(f"{path} never appeared: rc={proc.returncode} {err}")
        time.sleep(0.05)


def test_an_interrupt_landing_in_a_string_eval_still_exits_130(tmp_path):
    # A signal that lands while a lazy import builds a namedtuple (a string eval) made
    # CPython kill `python -m diffuse_engine` with SIGINT at exit (-2), not exit 130.
    # The same path, deterministically: an interrupt raised inside exec("...").
    (tmp_path / "interrupted_cli.py").write_text(
        textwrap.dedent(
            """
            import typer
            from diffuse_engine.cli.common import handle_errors

            app = typer.Typer()

            @app.command()
            @handle_errors
            def go():
                exec("raise KeyboardInterrupt('SIGTERM')", {})

            app()
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    res = subprocess.run(
        [sys.executable, "-m", "interrupted_cli"], env=env, capture_output=True, text=True
    )
    assert (res.returncode, res.stderr.strip()) == (130, "interrupted: SIGTERM"), res.stderr


@pytest.mark.parametrize("where", ["building the app", "parsing the arguments"])
def test_ctrl_c_before_a_command_runs_is_one_line_and_exit_130(monkeypatch, capsys, where):
    import click

    import diffuse_engine.cli as cli

    def interrupted(*a, **k):
        raise KeyboardInterrupt if where == "building the app" else click.exceptions.Abort

    if where == "building the app":
        monkeypatch.setattr(cli, "build_app", interrupted)
    else:  # click turns a KeyboardInterrupt while parsing into Abort
        monkeypatch.setattr(cli, "build_app", lambda: interrupted)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "-n", "8"])
    assert exit_.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"


@pytest.mark.parametrize(
    "sig,said", [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "interrupted: SIGTERM")]
)
def test_ctrl_c_of_a_real_run_says_so_and_keeps_it_partial(tmp_path, sig, said):
    out = tmp_path / "o"
    # long enough (10^6 steps) that only SIGINT ends it
    with running(
        [
            sys.executable,
            "-m",
            "diffuse_engine",
            "run",
            "-n",
            "2000",
            "--steps",
            "1000000",
            "-q",
            "--out",
            str(out),
        ]
    ) as proc:
        _wait_for(out.with_name("o.partial") / "status.json", proc)
        time.sleep(0.5)  # into the sampling loop
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == [
        f"run stopped: incomplete output left in {out}.partial",
        said,
    ], err
    status = json.loads((tmp_path / "o.partial" / "status.json").read_text())
    assert status == {**status, "complete": False, "error": "interrupted"}
    assert not out.exists()


def test_train_reads_allow_imports_but_trains_installed_code_only(evil_module, tmp_path):
    reg, marker, name = evil_module
    args = [
        "train",
        "--registry",
        str(reg),
        "--sde",
        "loud",
        "--steps",
        "2",
        "-q",
        "--batch-size",
        "16",
        "--threads",
        "1",
        "--set",
        "hidden=8",
        "--set",
        "depth=1",
        "--set",
        "plot_n=8",
        "--set",
        "plot_steps=2",
        "--out",
        str(tmp_path / "t"),
    ]
    res = runner.invoke(build_app(), args)
    assert res.exit_code == 2 and "--allow-imports" in res.stderr, res.output
    assert not marker.exists()
    # with the flag the file is read, but checkpoints name installed code only
    res = runner.invoke(build_app(), ["--allow-imports", *args])
    assert res.exit_code == 2 and "install it as a plugin to train with it" in res.stderr, (
        res.output
    )
    assert marker.exists()


# ---- checkpoints with crafted metadata: clean errors, never a KeyError ---------------------
@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    Engine(autoload=False).training(
        out=out, steps=2, batch_size=16, hidden=8, depth=1, plot_n=8, plot_steps=2, threads=1
    )
    return out / "checkpoint.safetensors"


def _drop(d, *keys):
    for k in keys[:-1]:
        d = d[k]
    del d[keys[-1]]


META_MISTAKES = {
    "type is an import path": (
        lambda m: m["config"]["sde"].update(type="os:system"),
        "unknown sde 'os:system'",
    ),
    "type missing": (lambda m: _drop(m, "config", "sde", "type"), "no valid sde recorded"),
    "score missing": (lambda m: _drop(m, "config", "score"), "no valid score recorded"),
    "config not a table": (lambda m: m.update(config=5), "no training settings recorded"),
    "step not a count": (lambda m: m.update(step="abc"), "step 'abc' is not a count"),
    "field of the wrong type": (
        lambda m: m["config"]["sde"].update(beta_max="x"),
        "recorded sde 'vp' beta_max: Input should be a valid number",
    ),
}


@pytest.mark.parametrize("mistake", sorted(META_MISTAKES))
def test_crafted_checkpoint_metadata_is_a_clean_error(good_checkpoint, tmp_path, mistake):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(good_checkpoint, "pt") as f:
        meta = json.loads(f.metadata()["diffuse"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit, needle = META_MISTAKES[mistake]
    edit(meta)
    bad = tmp_path / "checkpoint.safetensors"
    save_file(tensors, bad, metadata={"diffuse": json.dumps(meta)})
    res = runner.invoke(
        build_app(),
        [
            "sample",
            "--checkpoint",
            str(bad),
            "-n",
            "4",
            "--steps",
            "2",
            "-q",
            "--out",
            str(tmp_path / "s"),
        ],
    )
    assert res.exit_code == 2, (res.output, res.exception)
    assert res.stderr.startswith("error: ") and needle in res.stderr, res.stderr
    assert not (tmp_path / "s").exists()
