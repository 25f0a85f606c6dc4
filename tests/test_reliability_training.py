"""Training faults: NaN keeps the last good checkpoint; SIGKILL in the middle of writing a
checkpoint and Ctrl-C (SIGINT) both leave a checkpoint that resumes to exactly the losses
of an uninterrupted run. Crashes are real ``diffuse train`` subprocesses.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import running
from pydantic import Field
from typer.testing import CliRunner

from diffuse_engine import ComponentConfig, Dataset, Engine, NumericalError, module_plugin
from diffuse_engine.cli import build_app
from diffuse_engine.components.checkpoint import Checkpoint

# a tiny model and short steps: the point is the fault handling, not the fit
SETTINGS = dict(
    batch_size=64,
    checkpoint_every=10,
    log_every=10,
    warmup=5,
    plot_n=64,
    plot_steps=10,
    hidden=32,
    depth=1,
    threads=1,
    # interrupted runs of 1e6 steps resume to a few: a constant lr has no horizon to match
    lr_schedule="constant",
)
CLI_SETTINGS = [
    "--batch-size",
    "64",
    "--threads",
    "1",
    "-q",
    *[
        a
        for k in (
            "checkpoint_every",
            "log_every",
            "warmup",
            "plot_n",
            "plot_steps",
            "hidden",
            "depth",
            "lr_schedule",
        )
        for a in ("--set", f"{k}={SETTINGS[k]}")
    ],
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def reference_losses(tmp_path: Path, steps: int) -> list[str]:
    """losses.csv rows of an uninterrupted in-process run of ``steps`` steps."""
    out = tmp_path / f"reference-{steps}"
    Engine(autoload=False).training(out=out, steps=steps, **SETTINGS)
    return (out / "losses.csv").read_text().splitlines()


def status(out: Path) -> dict:
    return json.loads((out / "status.json").read_text())


def resume(out: Path, steps: int) -> None:
    res = CliRunner().invoke(
        build_app(), ["train", "--resume", "--out", str(out), "--steps", str(steps), "-q"]
    )
    assert res.exit_code == 0, res.output
    assert status(out)["complete"] is True and status(out)["step"] == steps


# ---- NaN ------------------------------------------------------------------------------
class NaNAfterConfig(ComponentConfig):
    after: int = Field(27, ge=0)


class NaNAfter(Dataset):
    """Standard normal data whose batches turn NaN after ``after`` batches."""

    name = "nan_after"
    Config = NaNAfterConfig
    shape = (2,)

    def __init__(self, config=None, **fields):
        super().__init__(config, **fields)
        self.batches = 0

    def sample(self, n, generator=None):
        self.batches += 1
        x = torch.randn(n, 2, generator=generator)
        return x * torch.nan if self.batches > self.config.after else x


def test_nan_in_training_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    engine = Engine(
        autoload=False, plugins=[module_plugin(diffuse_register_datasets=lambda: [NaNAfter])]
    )
    out = tmp_path / "run"
    with pytest.raises(NumericalError) as info:
        engine.training(data="nan_after", out=out, steps=100, **SETTINGS)
    msg = str(info.value)
    assert "training loss became NaN/Inf at step 28" in msg, msg  # batch 28 is the first NaN
    assert f"last good checkpoint is kept in {out}" in msg
    ckpt = Checkpoint.load(out)
    assert ckpt.step == 20  # the checkpoint due at step 30 was refused
    assert all(torch.isfinite(v).all() for v in [*ckpt.model.values(), *ckpt.ema.values()])
    assert status(out)["complete"] is False and status(out)["step"] == 20


# ---- SIGKILL in the middle of writing a checkpoint ----------------------------------------
HANG_ON_REPLACE = """
    # Runs `diffuse ARGS...`, but the N-th time a checkpoint is about to be renamed into
    # place (its data fully in the temporary file) it writes MARKER and hangs, so the
    # test can SIGKILL it at exactly that point.
    import os, sys, time, pathlib
    marker, n_target = pathlib.Path(sys.argv[1]), int(sys.argv[2])
    real_replace, seen = os.replace, [0]

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith("checkpoint.safetensors"):
            seen[0] += 1
            if seen[0] == n_target:
                marker.write_text(str(src))
                time.sleep(600)
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace
    from diffuse_engine.cli import main
    main(sys.argv[3:])
"""


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            proc.kill()
            _, err = proc.communicate()
            raise AssertionError(f"{path} never appeared (rc={proc.returncode}): {err}")
        time.sleep(0.02)


def test_sigkill_mid_checkpoint_resumes_from_the_last_complete_one(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(textwrap.dedent(HANG_ON_REPLACE))
    out, marker = tmp_path / "run", tmp_path / "writing"
    with running(
        [
            sys.executable,
            str(script),
            str(marker),
            "3",
            "train",
            "--steps",
            "40",
            "--out",
            str(out),
            *CLI_SETTINGS,
        ]
    ) as proc:
        _wait_for(marker, proc)
        tmp_file = Path(marker.read_text())
        assert tmp_file.stat().st_size > 0  # the third checkpoint: written, not renamed
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    ckpt = Checkpoint.load(out)  # the previous checkpoint: complete and loadable
    assert ckpt.step == 20
    resume(out, 40)
    assert (out / "losses.csv").read_text().splitlines() == reference_losses(tmp_path, 40)


# ---- Ctrl-C ------------------------------------------------------------------------------
def test_sigint_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    with running(
        [
            sys.executable,
            "-m",
            "diffuse_engine",
            "train",
            "--steps",
            "1000000",
            "--out",
            str(out),
            *CLI_SETTINGS,
        ]
    ) as proc:
        _wait_for(out / "checkpoint.safetensors", proc)  # training is under way
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    st = status(out)
    step = st["step"]
    assert st["complete"] is False and st["interrupted"] is True and step >= 10
    assert err.strip() == (
        f"interrupted: SIGINT at step {step}: checkpoint saved in {out}; "
        f"continue with diffuse train --resume --out {out}"
    ), err
    assert "Traceback" not in err
    assert Checkpoint.load(out).step == step  # saved at the interrupt, not the last period
    resume(out, step + 5)
    assert (out / "losses.csv").read_text().splitlines() == reference_losses(tmp_path, step + 5)


def test_first_signal_is_a_request_second_interrupts():
    """StopOnSignal's logic with SIGUSR1 (SIGINT is ignored inside pytest-xdist workers)."""
    from diffuse_engine.output.interrupts import StopOnSignal

    before = signal.getsignal(signal.SIGUSR1)
    with StopOnSignal(signals=(signal.SIGUSR1,)) as stop:
        signal.raise_signal(signal.SIGUSR1)
        assert stop.requested and stop.name == "SIGUSR1"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGUSR1)
    assert signal.getsignal(signal.SIGUSR1) is before  # restored
