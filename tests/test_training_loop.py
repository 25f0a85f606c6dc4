"""Training loop and checkpoints (issue 4): resume reproduces, checkpoints round-trip,
load without pickle, are written atomically, and work as a registry score model."""

from __future__ import annotations

import json
import os

import pytest
import torch

from diffuse_engine import DiffuseError, Engine, IncompatibleError
from diffuse_engine.components.checkpoint import Checkpoint, CheckpointError

TINY = dict(
    steps=40,
    batch_size=64,
    checkpoint_every=20,
    log_every=10,
    warmup=5,
    plot_n=64,
    plot_steps=10,
    hidden=32,
    depth=1,
    threads=1,
    lr_horizon=40,  # the cosine decay of the 40-step run, also for the 20 + 20 resume
)


@pytest.fixture(scope="module")
def engine():
    return Engine(autoload=False)


@pytest.fixture(scope="module")
def full_run(engine, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "full"
    return engine.training(out=out, **TINY)


def test_training_writes_a_complete_folder(full_run):
    out = full_run.out
    assert json.loads((out / "status.json").read_text())["complete"] is True
    assert {"checkpoint.safetensors", "config.json", "losses.csv", "samples.png"} <= {
        p.name for p in out.iterdir()
    }
    assert len(full_run.losses) == 40 and all(map(lambda v: v == v, full_run.losses))
    assert (out / "losses.csv").read_text().count("\n") == 41
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["score"]["type"] == "mlp" and cfg["score"]["shape"] == [2]
    assert cfg["sde"]["type"] == "vp" and cfg["train"]["steps"] == 40


def test_resume_gives_the_same_losses(engine, full_run, tmp_path):
    out = tmp_path / "part"
    first = engine.training(out=out, **{**TINY, "steps": 20})
    assert first.step == 20
    resumed = engine.training(out=out, resume=True, steps=40, threads=1)
    assert resumed.step == 40
    assert resumed.losses == full_run.losses  # bit-identical on CPU
    for a, b in zip(
        resumed.model.net.state_dict().values(),
        full_run.model.net.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b)


def test_resume_refuses_changes_and_missing_checkpoint(engine, full_run, tmp_path):
    with pytest.raises(DiffuseError, match="cannot change: data"):
        engine.training(out=full_run.out, resume=True, data="moons")
    with pytest.raises(CheckpointError, match="nothing to resume"):
        engine.training(out=tmp_path / "empty", resume=True)
    with pytest.raises(DiffuseError, match="already exists"):
        engine.training(out=full_run.out, **TINY)


def test_checkpoint_round_trip_without_pickle(engine, full_run):
    path = full_run.out / "checkpoint.safetensors"
    # a safetensors file: 8-byte header length, then a JSON header; no pickle opcodes
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert "diffuse" in header["__metadata__"]
    ck = Checkpoint.load(path)
    assert ck.step == 40 and ck.config == full_run.config
    assert torch.equal(ck.losses, torch.tensor(full_run.losses, dtype=torch.float64))
    assert set(ck.rng) == {"data", "noise", "torch_cpu"} and ck.optim["state"]
    from diffuse_engine.training import load_trained

    model, _ = load_trained(engine, full_run.out)
    x, t = torch.randn(16, 2), torch.rand(16) * 0.9 + 0.05
    with torch.no_grad():
        assert torch.equal(model(x, t), full_run.model(x, t))
    assert model.mixture is not None  # trained on gmm: runs can score samples exactly


def test_checkpoint_is_a_registry_score_model(full_run, tmp_path):
    reg = tmp_path / "reg.toml"
    reg.write_text(f'[score.mine]\ntype = "checkpoint"\npath = "{full_run.out}"\n')
    engine = Engine(registry=reg, autoload=False)
    x = engine.sample(score="mine", sde="vp", solver="pc", shape=64, seed=3, steps=20)
    y = engine.sample(score=full_run.model, sde="vp", solver="pc", shape=(64, 2), seed=3, steps=20)
    assert torch.equal(x, y)
    with pytest.raises(IncompatibleError, match="trained with sde"):
        engine.sample(score="mine", sde="ve", solver="pc", shape=8, steps=5)
    with pytest.raises(IncompatibleError, match="trained with sde"):
        engine.sample(score=full_run.model, sde="subvp", solver="pc", shape=(8, 2), steps=5)


def test_failed_write_keeps_the_last_good_checkpoint(full_run, monkeypatch):
    path = full_run.out / "checkpoint.safetensors"
    before = path.read_bytes()
    ck = Checkpoint.load(path)
    ck.step = 999

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    from diffuse_engine.output.files import OutputError

    with pytest.raises(OutputError, match="cannot write .*disk full"):
        ck.save(path)
    assert path.read_bytes() == before
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_bad_checkpoint_is_one_line(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a diffuse-engine checkpoint"):
        Checkpoint.load(bad)


def test_untrainable_model_is_refused(engine):
    with pytest.raises(DiffuseError, match="not trainable"):
        engine.training(model="gmm", steps=1)


def test_engine_sets_reach_training_settings_and_components():
    """``Engine(sets=[...])`` takes training settings (``lr``) as the CLI's ``--set``
    does, routes component fields (``hidden``) to the model, and a sampling call on the
    same engine is not refused for the training setting."""
    eng = Engine(autoload=False, sets=["lr=0.0123", "hidden=32"])
    r = eng.training(steps=2)
    assert r.config["train"]["lr"] == 0.0123
    assert r.model.config.hidden == 32
    assert eng.sample(score="gmm", shape=4, steps=2).shape == (4, 2)
