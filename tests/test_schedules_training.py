"""Training schedules (issue 18): the EMA warm-up of k-diffusion / diffusers, the learning
rate after warm-up (constant or cosine), both as the loop applies them, and resume."""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from diffuse_engine.training.schedules import ema_decay_at, ema_update, learning_rate
from diffuse_engine.training.settings import TrainSettings


def test_ema_warmup_is_the_k_diffusion_form():
    s = TrainSettings(ema_decay=0.999, ema_power=0.75, ema_inv_gamma=1.0)
    for n in (1, 10, 100):
        assert ema_decay_at(s, n) == pytest.approx(1 - (1 + n) ** -0.75)
    assert ema_decay_at(s, 10**7) == 0.999  # capped by ema_decay
    decays = [ema_decay_at(s, n) for n in range(1, 2000)]
    assert all(a <= b for a, b in zip(decays, decays[1:], strict=False))  # never decreasing
    g = TrainSettings(ema_power=1.0, ema_inv_gamma=10.0)
    assert ema_decay_at(g, 10) == pytest.approx(0.5)  # 1 - (1 + 10/10)^-1
    assert ema_decay_at(TrainSettings(ema_power=None, ema_decay=0.99), 1) == 0.99  # off


def test_the_loop_applies_the_warmup_to_the_averaged_weights():
    """AveragedModel copies the first weights, then ``ema <- d_n ema + (1 - d_n) w`` with
    ``d_n`` of update n: replayed by hand on a scalar parameter, to round-off."""
    s = TrainSettings(ema_decay=0.9, ema_power=0.5)
    w = torch.nn.Linear(1, 1, bias=False)
    ema = AveragedModel(w, multi_avg_fn=ema_update(s), use_buffers=True)
    expect = None
    for step in range(30):
        with torch.no_grad():
            w.weight.fill_(float(step))
        ema.update_parameters(w)
        if expect is None:
            expect = float(step)
        else:
            d = ema_decay_at(s, step)
            expect = d * expect + (1 - d) * step
    assert float(ema.module.weight.detach()) == pytest.approx(expect, rel=1e-6)


def test_learning_rate_warmup_then_cosine_or_constant():
    s = TrainSettings(lr=1e-3, warmup=10, steps=110, lr_schedule="cosine", lr_min_ratio=0.1)
    assert learning_rate(s, 0) == pytest.approx(1e-4)
    assert learning_rate(s, 9) == pytest.approx(1e-3)  # end of warm-up: the peak
    assert learning_rate(s, 10) == pytest.approx(1e-3)
    assert learning_rate(s, 60) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert learning_rate(s, 110) == pytest.approx(1e-4)  # the floor at the last step
    lrs = [learning_rate(s, k) for k in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    c = TrainSettings(lr=1e-3, warmup=10, steps=110, lr_schedule="constant")
    assert {learning_rate(c, k) for k in range(10, 110)} == {1e-3}
    assert learning_rate(TrainSettings(lr=2e-3, warmup=0, lr_schedule="constant"), 0) == 2e-3


def test_optimizer_steps_with_the_schedule(engine, monkeypatch):
    """Every AdamW step of a run uses the schedule's learning rate of that step."""
    seen = []
    step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    res = engine.training(
        steps=20,
        batch_size=32,
        warmup=4,
        hidden=16,
        depth=1,
        plot_n=0,
        threads=1,
        lr_schedule="cosine",
        lr_min_ratio=0.25,
    )
    s = TrainSettings.model_validate(res.config["train"])
    assert seen == [learning_rate(s, k) for k in range(20)]
    assert seen[-1] == pytest.approx(s.lr * (0.25 + 0.75 * 0.5 * (1 + math.cos(math.pi * 15 / 16))))
    assert res.config["train"]["ema_power"] == 0.75
    assert res.config["train"]["lr_schedule"] == "cosine"


def test_resume_continues_both_schedules(engine, tmp_path):
    """A run stopped at step 15 and resumed to 30 ends with the uninterrupted run's losses
    and EMA weights bit for bit: the EMA step count is saved with the EMA and the cosine
    decay (the preset's schedule) ends at the recorded horizon."""
    kw = dict(
        batch_size=32,
        warmup=4,
        hidden=16,
        depth=1,
        plot_n=0,
        threads=1,
        checkpoint_every=0,
        log_every=5,
        lr_horizon=30,
    )
    full = engine.training(steps=30, **kw)
    assert full.config["train"]["lr_schedule"] == "cosine"  # [train.default]
    out = tmp_path / "r"
    engine.training(steps=15, out=out, **kw)
    resumed = engine.training(out=out, resume=True, steps=30, threads=1)
    assert resumed.losses == full.losses
    assert _same_weights(full.model, resumed.model)


def test_an_interrupted_run_resumes_on_its_own_schedule(engine, tmp_path):
    """The default horizon is the first run's ``steps``, recorded: a 24-step run stopped
    early by ``max_seconds`` and resumed equals the uninterrupted 24-step run."""
    kw = dict(batch_size=32, warmup=4, hidden=16, depth=1, plot_n=0, threads=1,
              checkpoint_every=0, log_every=4)  # fmt: skip
    full = engine.training(steps=24, **kw)
    assert full.config["train"]["lr_horizon"] == 24  # resolved from steps and recorded
    out = tmp_path / "i"
    engine.training(steps=24, out=out, max_seconds=1e-9, **kw)  # stops after its first step
    resumed = engine.training(out=out, resume=True, threads=1, max_seconds=None)
    assert resumed.config["train"]["lr_horizon"] == 24 and resumed.step == 24
    assert resumed.losses == full.losses
    assert _same_weights(full.model, resumed.model)


def test_cosine_over_a_fixed_horizon_depends_on_the_step_alone():
    kw = dict(lr=1e-3, warmup=10, lr_schedule="cosine", lr_min_ratio=0.1, lr_horizon=110)
    short, long = TrainSettings(steps=60, **kw), TrainSettings(steps=500, **kw)
    assert [learning_rate(short, k) for k in range(60)] == [
        learning_rate(long, k) for k in range(60)
    ]
    assert learning_rate(long, 110) == pytest.approx(1e-4)  # the floor at the horizon
    assert all(learning_rate(long, k) == pytest.approx(1e-4) for k in range(110, 500, 37))
    # without a horizon the decay follows steps: the same step gets another rate
    free = {k: v for k, v in kw.items() if k != "lr_horizon"}
    assert learning_rate(TrainSettings(steps=60, **free), 40) != learning_rate(
        TrainSettings(steps=500, **free), 40
    )


def test_resume_with_more_steps_follows_a_fixed_cosine_horizon(engine, tmp_path):
    """Cosine over ``lr_horizon``: 15 steps resumed to 30 give the 30-step run's losses
    and weights bit for bit. Without one, the 15-step run records 15: resumed to 30 it
    warns that steps 15..30 train at ``lr * lr_min_ratio``, and so differs; passing
    ``lr_horizon`` on resume stretches the decay from there on instead."""
    kw = dict(batch_size=32, warmup=4, hidden=16, depth=1, plot_n=0, threads=1,
              checkpoint_every=0, log_every=5, lr_schedule="cosine", lr_min_ratio=0.1)  # fmt: skip
    full = engine.training(steps=30, lr_horizon=30, **kw)
    out = tmp_path / "h"
    engine.training(steps=15, out=out, lr_horizon=30, **kw)
    resumed = engine.training(out=out, resume=True, steps=30, threads=1)
    assert resumed.config["train"]["lr_horizon"] == 30 and resumed.losses == full.losses
    assert _same_weights(full.model, resumed.model)
    out2 = tmp_path / "s"
    assert engine.training(steps=15, out=out2, **kw).config["train"]["lr_horizon"] == 15
    with pytest.warns(UserWarning, match=r"cosine decay ends at step 15 .*lr_horizon=30"):
        past = engine.training(out=out2, resume=True, steps=30, threads=1)
    assert past.losses[:15] != full.losses[:15] and past.losses != full.losses
    lrs = [learning_rate(TrainSettings.model_validate(past.config["train"]), k) for k in (15, 29)]
    assert lrs == [pytest.approx(1e-4)] * 2  # lr * lr_min_ratio after the recorded end
    out3 = tmp_path / "t"
    engine.training(steps=15, out=out3, **kw)
    stretched = engine.training(out=out3, resume=True, steps=30, lr_horizon=30, threads=1)
    assert stretched.config["train"]["lr_horizon"] == 30
    assert stretched.losses[:15] == past.losses[:15] and stretched.losses != past.losses


def test_a_checkpoint_from_before_the_schedules_resumes_as_it_was_trained(engine, tmp_path):
    """A checkpoint whose recorded settings lack the new fields (written before issue 18)
    resumes with a constant EMA decay, a constant lr and no normalisation, as it trained."""
    from diffuse_engine.components.checkpoint import Checkpoint

    out = tmp_path / "old"
    kw = dict(batch_size=32, warmup=4, hidden=16, depth=1, plot_n=0, threads=1)
    engine.training(steps=5, out=out, **kw)
    ckpt = Checkpoint.load(out)
    for k in ("ema_power", "ema_inv_gamma", "lr_schedule", "lr_min_ratio", "normalise"):
        ckpt.config["train"].pop(k)
    ckpt.config.pop("normalise")
    ckpt.save(out / "checkpoint.safetensors")
    res = engine.training(out=out, resume=True, steps=8, threads=1)
    t = res.config["train"]
    assert (t["ema_power"], t["lr_schedule"], t["normalise"]) == (None, "constant", "none")
    assert getattr(res.model, "normaliser", None) is None


def _same_weights(a, b) -> bool:
    """Whether two models' networks hold bit-identical weights."""
    pairs = zip(a.net.state_dict().values(), b.net.state_dict().values(), strict=True)
    return all(torch.equal(x, y) for x, y in pairs)
