"""Never lose a user's work: every value is checked before ``--out`` is touched,
``--overwrite`` swaps the new run in only after its first complete checkpoint, links are
never followed into a delete, leftovers of a killed writer are cleaned on ``--resume``,
and files follow the user's umask."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffuse_engine import DiffuseError, Engine
from diffuse_engine.cli import build_app
from diffuse_engine.components.checkpoint import Checkpoint

runner = CliRunner()
# a tiny model and few steps: the point is what happens to the folder
FAST = [
    "--batch-size", "32", "--threads", "1", "-q",
    *[a for kv in ("hidden=16", "depth=1", "warmup=2", "plot_n=16", "plot_steps=3",
                   "log_every=5", "checkpoint_every=5") for a in ("--set", kv)],
]  # fmt: skip


def train(*args: str):
    return runner.invoke(build_app(), ["train", *FAST, *args])


def one_line(res, needle: str, code: int = 2) -> str:
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output, res.output
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], res.stderr
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 10-step training folder (copied per test by ``done``)."""
    out = tmp_path_factory.mktemp("finished") / "D"
    res = train("--steps", "10", "--out", str(out))
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture
def done(finished, tmp_path) -> Path:
    import shutil

    out = tmp_path / "D"
    shutil.copytree(finished, out)
    return out


# ---- validate everything before touching the disk -------------------------------------
def test_overwrite_with_a_mistake_keeps_the_finished_folder(done):
    """The issue's report: ``--overwrite --set hiden=64`` on a finished run emptied it."""
    before = snapshot(done)
    one_line(train("--steps", "20", "--overwrite", "--set", "hiden=64", "--out", str(done)),
             "did you mean 'hidden'")  # fmt: skip
    assert snapshot(done) == before
    assert sorted(p.name for p in done.parent.iterdir()) == ["D"]  # not even a lock file


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--seed", "-1"], "seed: Input should be greater than or equal to 0"),
        (["--lr", "inf"], "lr: Input should be a finite number"),
        (["--set", "embedding_dim=63"], "embedding_dim: Input should be a multiple of 2"),
        (["--set", "init_seed=-1"], "init_seed: Input should be greater than or equal to 0"),
        (["--set", "init_seed=9223372036854775808"], "init_seed: Input should be less than"),
        (["--set", "plot_solver=pcc"], "did you mean 'pc'"),
        (["--set", "plot_steps=0"], "plot_steps"),
        (["--model", "mpl"], "--model 'mpl': no score entry named 'mpl' (did you mean 'mlp'?)"),
        (["--set", "shape=[3]"], "is built for data of shape [3] but data 'gmm' has shape [2]"),
    ],
)  # fmt: skip
def test_bad_values_are_refused_before_the_folder_exists(tmp_path, args, needle):
    out = tmp_path / "new" / "deeper" / "D"
    one_line(train("--steps", "5", "--out", str(out), *args), needle)
    assert not (tmp_path / "new").exists()  # not even the parent folders


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--solver", "ddim", "--set", "solver.times=[2.0, 0.5]"], "after the end time T = 1.0"),
        (["--solver", "dpm_adaptive_ms", "--set", "solver.sigma_end=1000"], "sigma_end = 1000"),
    ],
)  # fmt: skip
def test_a_solver_that_does_not_fit_the_sde_is_refused_before_the_run_folder(
    tmp_path, args, needle
):
    out = tmp_path / "new" / "R"
    res = runner.invoke(build_app(), ["run", "-n", "16", "-q", "--out", str(out), *args])
    one_line(res, needle)
    assert not (tmp_path / "new").exists()  # no folder, no .partial beside it


def test_a_guidance_that_does_not_fit_the_solver_is_refused_before_the_run_folder(tmp_path):
    from diffuse_engine import IncompatibleError

    engine = Engine()
    plan = engine.plan_run("conditional", guidance="repaint", solver="ode")  # ddim, pc only
    with pytest.raises(IncompatibleError, match="repaint.*ddim, pc, not 'ode'"):
        engine.run(plan, tmp_path / "new" / "R")
    assert not (tmp_path / "new").exists()  # before: new/R.partial and its lock were left


def test_a_cond_without_the_guidance_keys_is_refused_before_the_run_folder(tmp_path):
    engine = Engine()
    plan = engine.plan_run("conditional", guidance="replacement", solver="dpm_solver_pp")
    with pytest.raises(DiffuseError, match="'replacement' needs cond key.*y; got label"):
        engine.run(plan, tmp_path / "new" / "R")
    assert not (tmp_path / "new").exists()


def test_sampling_a_checkpoint_with_a_solver_that_does_not_fit_makes_no_folder(done, tmp_path):
    out = tmp_path / "new" / "S"
    args = ["sample", "-c", str(done), "-n", "16", "-q", "--out", str(out), "--solver", "ddim"]
    res = runner.invoke(build_app(), [*args, "--set", "solver.times=[2.0, 0.5]"])
    one_line(res, "after the end time T = 1.0")
    assert not (tmp_path / "new").exists()


def test_unet_channel_mult_entries_must_be_positive(tmp_path):
    args = ["train", "--data", "digits", "--model", "unet", "--out", str(tmp_path / "D")]
    res = runner.invoke(build_app(), [*args, "--set", "channel_mult=[1, 0]"])
    one_line(res, "channel_mult.1: Input should be greater than or equal to 1")
    assert not (tmp_path / "D").exists()


def test_registry_check_catches_the_same_values(tmp_path):
    for table, needle in [
        ("[train.x]\nseed = -1\n", "seed: Input should be greater than or equal to 0"),
        ("[train.x]\nlr = inf\n", "lr: Input should be a finite number"),
        ('[score.m]\ntype = "mlp"\nembedding_dim = 7\n', "multiple of 2"),
        ('[score.m]\ntype = "mlp"\ninit_seed = -3\n', "init_seed"),
        ('[score.u]\ntype = "unet"\nchannel_mult = [2, -1]\n', "channel_mult.1"),
    ]:
        f = tmp_path / "r.toml"
        f.write_text(table)
        one_line(runner.invoke(build_app(), ["registry", "check", str(f)]), needle)


def test_a_failed_run_validation_leaves_no_folder(tmp_path):
    out = tmp_path / "new" / "o"
    res = runner.invoke(build_app(), ["run", "-n", "8", "--out", str(out), "--set", "snrr=1"])
    one_line(res, "did you mean 'snr'")
    assert not (tmp_path / "new").exists()


# ---- --overwrite swaps the new run in after its first checkpoint ----------------------
def test_overwrite_replaces_only_after_the_first_checkpoint(done, tmp_path, monkeypatch):
    before = snapshot(done)
    old_step = Checkpoint.load(done).step
    import diffuse_engine.training.folder as folder_mod

    seen = {}
    real = folder_mod.TrainingFolder.committed

    def committed(self, step):  # the old folder is still whole when the first one lands
        seen.setdefault("old", snapshot(self.out))
        seen.setdefault("staged", sorted(p.name for p in self.path.iterdir()))
        return real(self, step)

    monkeypatch.setattr(folder_mod.TrainingFolder, "committed", committed)
    assert train("--steps", "7", "--overwrite", "--out", str(done)).exit_code == 0
    assert seen["old"] == before and "checkpoint.safetensors" in seen["staged"]
    assert Checkpoint.load(done).step == 7 != old_step
    assert sorted(p.name for p in done.parent.iterdir()) == [".D.lock", "D"]


def test_overwrite_that_fails_before_its_first_checkpoint_keeps_the_old_run(done, monkeypatch):
    before = snapshot(done)
    import diffuse_engine.training.folder as folder_mod

    def boom(self, step):
        raise KeyboardInterrupt("killed before the first checkpoint")

    monkeypatch.setattr(folder_mod.TrainingFolder, "committed", boom)
    res = train("--steps", "7", "--overwrite", "--out", str(done))
    assert res.exit_code == 130
    assert snapshot(done) == before
    assert sorted(p.name for p in done.parent.iterdir()) == [".D.lock", "D"]


def test_overwrite_never_follows_a_link_into_a_delete(done, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("a week of work")
    (done / "link-to-precious").symlink_to(precious)  # a link inside the old run
    assert train("--steps", "5", "--overwrite", "--out", str(done)).exit_code == 0
    assert (precious / "thesis.tex").read_text() == "a week of work"
    link = tmp_path / "L"
    link.symlink_to(precious)  # --out itself a link: refused, whatever the flags
    one_line(train("--steps", "5", "--overwrite", "--out", str(link)), "is a symbolic link")
    assert (precious / "thesis.tex").read_text() == "a week of work"


def test_overwrite_refuses_a_folder_that_is_not_a_training_folder(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    one_line(train("--steps", "5", "--overwrite", "--out", str(mine)), "not a training folder")
    assert (mine / "notes.txt").read_text() == "keep"


# ---- --resume cleans what a killed writer left ------------------------------------------
def test_resume_removes_leftover_temporary_checkpoints(done):
    for name in (".checkpoint.safetensors.deadbeef.tmp", ".losses.csv.0badc0de.tmp"):
        (done / name).write_bytes(b"half a checkpoint")
    res = runner.invoke(
        build_app(), ["train", "--resume", "-q", "--steps", "12", "--out", str(done)]
    )
    assert res.exit_code == 0, res.output
    assert not list(done.glob(".*.tmp"))
    assert Checkpoint.load(done).step == 12


# ---- what training writes -----------------------------------------------------------------
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        assert train("--steps", "5", "--out", str(tmp_path / "D")).exit_code == 0
    finally:
        os.umask(old)
    for f in (tmp_path / "D").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == mode, f


def test_plot_n_zero_turns_plots_off_and_the_loss_curve_is_written(tmp_path):
    out = tmp_path / "D"
    res = train("--steps", "5", "--out", str(out), "--set", "plot_n=0", "--set", "plot_every=2")
    assert res.exit_code == 0, res.output
    names = {p.name for p in out.iterdir()}
    assert "loss.png" in names and not any(n.startswith("samples") for n in names)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_warm_up_longer_than_the_run_is_said_at_start(tmp_path):
    res = train("--steps", "5", "--out", str(tmp_path / "D"), "--set", "warmup=50")
    assert res.exit_code == 0, res.output
    assert "warning: the learning-rate warm-up (50 steps) is longer than the run (5 steps)" in (
        res.stderr
    )


def test_python_training_with_a_required_field_as_keyword(tmp_path):
    """``engine.train(data="file", path=...)`` (and ``--set path=``) satisfy the required
    field; they failed with "Field required" before."""
    import numpy as np

    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(64, 2)).astype("f4"))
    model = Engine(autoload=False).train(
        data="file", path=str(tmp_path / "x.npy"), steps=2, batch_size=8, hidden=8, depth=1
    )
    assert model.data_shape == (2,)
    res = train("--steps", "2", "--data", "file", "--set", f"path={tmp_path / 'x.npy'}",
                "--out", str(tmp_path / "D"))  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "D" / "config.json").read_text())["config"]["data"]["type"] == (
        "file"
    )


def test_huge_requests_are_refused_with_the_estimate(tmp_path):
    for args, needle in [
        (["--batch-size", str(10**12)], "batch_size 1000000000000"),
        (["--set", "hidden=10000000"], "parameters for data [2]) needs at least"),
    ]:
        line = one_line(train("--steps", "2", "--out", str(tmp_path / "D"), *args), needle)
        assert "of memory and cpu has" in line and "available" in line
        assert not (tmp_path / "D").exists()


def test_run_overwrite_refuses_a_folder_that_is_not_a_run_folder(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("keep")
    res = runner.invoke(
        build_app(), ["run", "-q", "--n", "10", "--steps", "5", "--overwrite", "--out", str(mine)]
    )
    one_line(res, "not a run folder")
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.txt"]


def test_a_swap_whose_second_rename_fails_puts_the_old_folder_back(tmp_path, monkeypatch):
    from diffuse_engine.output import files

    final, new = tmp_path / "D", tmp_path / ".D.new-1"
    final.mkdir()
    (final / "old.txt").write_text("old run")
    new.mkdir()
    real = os.replace

    def second_fails(src, dst):
        if os.fspath(src) == os.fspath(new):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", second_fails)
    with pytest.raises(OSError):
        files.swap_in(new, final)
    assert (final / "old.txt").read_text() == "old run" and new.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".D.new-1", "D"]
