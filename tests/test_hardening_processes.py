"""Output folders are locked while written (a second writer is refused naming the
holder's PID, and a killed holder blocks nobody), and SIGTERM ends ``diffuse sample``
like Ctrl-C. Real processes: the lock is an OS lock, signals are real signals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import running
from typer.testing import CliRunner

from diffuse_engine import Engine
from diffuse_engine.cli import build_app
from diffuse_engine.components.checkpoint import Checkpoint

runner = CliRunner()
SMALL = dict(batch_size=16, hidden=8, depth=1, warmup=1, plot_n=0, threads=1)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            out, err = proc.communicate()
            raise AssertionError(f"{path} never appeared: rc={proc.returncode} {err}")
        time.sleep(0.05)


def refused(res, pid: int) -> None:
    assert res.exit_code == 2, res.output
    (line,) = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert f"is being written by another process (pid {pid} on " in line, line
    assert "Traceback" not in res.output


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    out = tmp_path / "trained"
    Engine(autoload=False).training(out=out, steps=4, checkpoint_every=2, **SMALL)
    return out


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, checkpoint):
    """Another process holds the locks of three output folders; training, running and
    sampling into them are refused with its PID; once it is killed (SIGKILL: it cannot
    clean up) the same commands work, because the kernel dropped its locks."""
    fresh, run_out, resumed = tmp_path / "fresh", tmp_path / "run", checkpoint
    script = textwrap.dedent(
        f"""
        import sys, time
        from diffuse_engine.output.files import FolderLock
        locks = [FolderLock(p).acquire() for p in {[str(fresh), str(run_out), str(resumed)]!r}]
        print("locked", flush=True)
        time.sleep(120)
        """
    )
    with running([sys.executable, "-c", script]) as holder:
        assert holder.stdout.readline().strip() == "locked"
        app = build_app()
        refused(runner.invoke(app, ["train", "--steps", "2", "-q", "--out", str(fresh)]),
                holder.pid)  # fmt: skip
        assert not fresh.exists()  # refused before anything was made
        refused(runner.invoke(app, ["run", "-n", "8", "--steps", "2", "-q", "--out",
                                    str(run_out)]), holder.pid)  # fmt: skip
        refused(runner.invoke(app, ["train", "--resume", "--steps", "6", "-q", "--out",
                                    str(resumed)]), holder.pid)  # fmt: skip
        refused(runner.invoke(app, ["train", "--overwrite", "--steps", "2", "-q", "--out",
                                    str(resumed)]), holder.pid)  # fmt: skip
        assert Checkpoint.load(resumed).step == 4
        holder.kill()
        holder.wait()
    res = runner.invoke(build_app(), ["train", "--resume", "--steps", "6", "-q", "--out",
                                      str(resumed)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert Checkpoint.load(resumed).step == 6
    res = runner.invoke(build_app(), ["run", "-n", "8", "--steps", "2", "-q", "--out",
                                      str(run_out)])  # fmt: skip
    assert res.exit_code == 0, res.output


@pytest.mark.slow  # ~7 s: two training processes; the lock itself is tested just above
def test_two_real_trainings_into_one_folder(tmp_path):
    """A real ``diffuse train`` is writing D; a second real one with ``--resume`` is
    refused naming the first one's PID, and the first finishes undisturbed."""
    out = tmp_path / "D"
    args = [sys.executable, "-m", "diffuse_engine", "train", "-q", "--threads", "1",
            "--batch-size", "16", "--set", "hidden=8", "--set", "depth=1",
            "--set", "plot_n=0", "--set", "checkpoint_every=20", "--out", str(out)]  # fmt: skip
    with running([*args, "--steps", "1000000"]) as first:
        wait_for(out / "checkpoint.safetensors", first)
        resume = [sys.executable, "-m", "diffuse_engine", "train", "--resume", "-q",
                  "--steps", "10", "--out", str(out)]  # fmt: skip
        second = subprocess.run(resume, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"(pid {first.pid} on " in second.stderr.strip().splitlines()[-1]
        assert first.poll() is None  # the first one is untouched and still training
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=60)
    assert first.returncode == 130, err
    assert "checkpoint saved" in err


def test_sigterm_during_sample_is_like_ctrl_c(tmp_path, checkpoint):
    out = tmp_path / "S"
    args = [sys.executable, "-m", "diffuse_engine", "sample", "-c", str(checkpoint),
            "-n", "2000", "--steps", "1000000", "-q", "--out", str(out)]  # fmt: skip
    with running(args) as proc:
        wait_for(tmp_path / "S.partial" / "status.json", proc)
        time.sleep(0.5)  # into the sampling loop
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == [
        f"sampling stopped: incomplete output left in {out}.partial",
        "interrupted: SIGTERM",
    ], err
    status = json.loads((tmp_path / "S.partial" / "status.json").read_text())
    assert status["complete"] is False and status["error"] == "interrupted"
    assert not out.exists()
