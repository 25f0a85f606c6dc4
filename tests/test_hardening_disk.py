"""The environment fails: a full disk, a read-only folder, ``--out`` a link, a dangling
link or empty, an unwritable ``--log-metrics``. Each is one line, exit 2, naming what
failed and what is safe. A real full disk and a real read-only file system are small
tmpfs mounts (skipped where mounting is not permitted); the full disk is also simulated
by making the write fail with ``ENOSPC``, so it is tested everywhere."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffuse_engine.cli import build_app
from diffuse_engine.components.checkpoint import Checkpoint

runner = CliRunner()
SETS = ["hidden=64", "depth=1", "warmup=1", "plot_n=0", "log_every=5", "checkpoint_every=5"]
FAST = ["--batch-size", "16", "--threads", "1", "-q", *[a for s in SETS for a in ("--set", s)]]


def train(*args: str):
    return runner.invoke(build_app(), ["train", *FAST, *args])


def one_line(res, *needles: str) -> str:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output, res.output
    lines = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *options: str):
    """A tmpfs of ``size`` at ``path`` (skips the test where mounting is not allowed)."""
    path.mkdir(parents=True)
    opts = ",".join([f"size={size}", *options])
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                         capture_output=True, text=True)  # fmt: skip
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def checkpoint_size(tmp_path: Path) -> int:
    ref = tmp_path / "reference"
    assert train("--steps", "10", "--out", str(ref)).exit_code == 0
    return (ref / "checkpoint.safetensors").stat().st_size


def check_disk_full(res, out: Path) -> None:
    line = one_line(res, "checkpoint.safetensors: No space left on device (disk full)")
    assert (
        f"the previous checkpoint at step 5 is intact in {out}; continue with diffuse train "
        in (line)
    )
    assert Checkpoint.load(out).step == 5
    assert not list(out.glob(".*.tmp"))  # the failed write left nothing behind


# ---- a full disk -----------------------------------------------------------------------
def test_disk_full_during_a_checkpoint_keeps_the_previous_one_real_tmpfs(tmp_path):
    size = checkpoint_size(tmp_path)
    with tmpfs(tmp_path / "small", "4m") as disk:
        # room for one checkpoint and the small files, not for a second beside it
        (disk / "filler").write_bytes(b"\0" * (free_bytes(disk) - int(1.5 * size) - 16384))
        out = disk / "D"
        check_disk_full(train("--steps", "10", "--out", str(out)), out)
        (disk / "filler").unlink()
        res = runner.invoke(build_app(), ["train", "--resume", "-q", "--out", str(out)])
        assert res.exit_code == 0, res.output
        assert Checkpoint.load(out).step == 10


def test_disk_full_during_a_checkpoint_simulated(tmp_path, monkeypatch):
    """``fsync`` of the second checkpoint fails with ENOSPC, as on a full disk."""
    real, calls = os.fsync, []

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if ".checkpoint.safetensors." in name:
            calls.append(name)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name a file descriptor")
    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "D"
    check_disk_full(train("--steps", "10", "--out", str(out)), out)


def test_disk_full_while_writing_a_run_keeps_the_old_run(tmp_path):
    with tmpfs(tmp_path / "small", "256k") as disk:
        out = disk / "o"
        base = ["run", "--steps", "2", "-q", "--out", str(out)]
        assert runner.invoke(build_app(), [*base, "-n", "8"]).exit_code == 0
        before = (out / "samples.pt").read_bytes()
        res = runner.invoke(build_app(), [*base, "-n", "50000", "--overwrite"])  # 400 kB
        one_line(res, "No space left on device (disk full)")
        assert f"run stopped: incomplete output left in {out}.partial" in res.stderr
        assert (out / "samples.pt").read_bytes() == before


# ---- read-only output ----------------------------------------------------------------
def test_read_only_output_is_refused_before_any_work(tmp_path):
    with tmpfs(tmp_path / "ro", "64k", "ro") as disk:
        one_line(train("--steps", "2", "--out", str(disk / "D")), "(read-only file system)")
        res = runner.invoke(build_app(), ["run", "-n", "8", "--out", str(disk / "o")])
        one_line(res, f"cannot write in {disk} (read-only file system)")


def test_resume_into_a_folder_that_became_read_only(tmp_path):
    with tmpfs(tmp_path / "disk", "4m") as disk:
        out = disk / "D"
        assert train("--steps", "5", "--out", str(out)).exit_code == 0
        res = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True)
        if res.returncode:
            pytest.skip("cannot remount read-only here")
        res = runner.invoke(build_app(), ["train", "--resume", "--steps", "9", "-q", "--out",
                                          str(out)])  # fmt: skip
        one_line(res, f"cannot write in {out} (read-only file system)")
        assert Checkpoint.load(out).step == 5


def test_unwritable_output_simulated(tmp_path, monkeypatch):
    real = os.access
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode, **k: Path(p) != locked and real(p, mode))
    one_line(train("--steps", "2", "--out", str(locked / "D")), "(permission denied)")


# ---- --out that is a link, dangling, empty ----------------------------------------------
@pytest.mark.parametrize("command", ["train", "run", "sample"])
def test_out_links_and_empty_paths(tmp_path, command):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    extra = {"train": ["--steps", "2"], "run": ["-n", "8"],
             "sample": ["-c", str(tmp_path / "nope")]}[command]  # fmt: skip
    for out, needle in [
        (tmp_path / "link", f"--out {tmp_path / 'link'} is a symbolic link (to {real})"),
        (tmp_path / "dangling", "is a symbolic link (to"),
        ("", "--out is empty"),
        ("  ", "--out is empty"),
    ]:
        res = runner.invoke(build_app(), [command, *extra, "--out", str(out)])
        line = one_line(res, needle)
        if "dangling" in str(out):
            assert "which does not exist" in line
    assert list(real.iterdir()) == [] and not (tmp_path / "nowhere").exists()


# ---- --log-metrics ---------------------------------------------------------------------
def test_unwritable_metrics_log_is_refused_before_the_command(tmp_path):
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    cases = [
        (tmp_path, "is a folder"),
        (fifo, "not a regular file"),
        ("", "empty path"),
        (tmp_path / "a-file" / "log.csv", "is not a folder"),
    ]
    (tmp_path / "a-file").write_text("x")
    for path, needle in cases:
        res = runner.invoke(build_app(), ["--log-metrics", str(path), "run", "-n", "8",
                                          "--out", str(tmp_path / "o")])  # fmt: skip
        one_line(res, f"--log-metrics {str(path)!r}: ", needle)
        assert not (tmp_path / "o").exists()


def test_metrics_log_on_a_read_only_disk(tmp_path):
    with tmpfs(tmp_path / "ro", "64k", "ro") as disk:
        res = runner.invoke(build_app(), ["--log-metrics", str(disk / "m.csv"), "run", "-n", "8",
                                          "--out", str(tmp_path / "o")])  # fmt: skip
        one_line(res, "is not writable (permission denied or read-only)")
