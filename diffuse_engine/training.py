"""Training score models: settings, the loop, checkpoints and resume.

One training run combines four registry entries: a dataset (``data``), an SDE, a
trainable score model (``score``, any implementation with ``needs_training = True``)
and a loss, under :class:`TrainSettings` (a ``[train.NAME]`` registry table). The loop is
plain PyTorch in the style of ``score_sde_pytorch/run_lib.py``:

* AdamW (Loshchilov & Hutter 2019) with linear learning-rate warm-up, gradient-norm
  clipping, and an exponential moving average of the weights (``torch.optim.swa_utils``;
  Song & Ermon 2020 recommend EMA for sampling). The model returned, and the one a
  checkpoint samples with, uses the EMA weights.
* All randomness comes from two generators seeded by ``seed``: one for data batches
  (CPU), one for the loss's times and noise (on the training device); the weights are
  initialised from the model's ``init_seed`` (default: ``seed``). Their states are
  saved in every checkpoint, so ``resume`` continues with exactly the losses an
  uninterrupted run gets.
* The loss is read back to the host only every ``log_every`` steps (for the progress
  bar and the NaN check) and, when some plugin implements ``diffuse_training_step``,
  every step.

A training folder holds ``checkpoint.safetensors`` (the latest complete checkpoint,
replaced atomically, see :mod:`diffuse_engine.checkpoint`), ``config.json`` (the resolved
configuration), ``losses.csv``, ``samples.png`` (and ``samples-stepN.png`` every
``plot_every`` steps) and ``status.json`` (``complete: true`` only after the last step
and the final checkpoint).

Trainable score models expose ``net`` (the ``torch.nn.Module`` backbone),
``parameters()``, ``to(device)``, ``train()``/``eval()`` and ``with_net(module)``;
see ``diffuse_plugins.networks.NetworkScore``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field

from .checkpoint import (CHECKPOINT_NAME, Checkpoint, CheckpointError, check_same_sde,
                         recorded_config, sde_spec)
from .distributed import ShardedBatches
from .devices import check_device
from .errors import DiffuseError, NumericalError, OutputExistsError
from .interrupts import StopOnSignal
from .outputs import atomic_write_bytes, write_json
from .progress import progress_bar
from .trust import is_import_path

if TYPE_CHECKING:  # the engine imports this module lazily
    from .engine import Engine


class TrainSettings(BaseModel):
    """A ``[train.NAME]`` table: what to train on and how (all fields optional)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: str = Field("gmm", description="dataset entry")
    sde: str = Field("vp", description="SDE entry")
    model: str = Field("mlp", description="trainable score-model entry")
    loss: str = Field("dsm", description="loss entry")
    steps: int = Field(2000, ge=1, description="optimiser steps in total")
    batch_size: int = Field(512, ge=1, description="samples per step")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    warmup: int = Field(100, ge=0, description="linear learning-rate warm-up steps")
    grad_clip: Optional[float] = Field(1.0, gt=0, description="max gradient norm (none: off)")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA decay of the weights")
    seed: int = Field(0, description="seed of data, noise and (by default) initial weights")
    device: str = Field("cpu", description="torch device")
    checkpoint_every: int = Field(1000, ge=0, description="checkpoint period (0: at the end)")
    plot_every: int = Field(0, ge=0, description="sample-plot period (0: at the end only)")
    plot_solver: str = Field("pc", description="solver entry for sample plots")
    plot_steps: int = Field(250, ge=1, description="solver steps for sample plots")
    plot_n: int = Field(2000, ge=1, description="samples in a plot (images: up to 100 shown)")
    log_every: int = Field(50, ge=1, description="steps between loss read-backs / bar updates")
    max_seconds: Optional[float] = Field(None, gt=0, description="stop (and checkpoint) "
                                         "after this much training time")
    threads: Optional[int] = Field(None, ge=1, description="torch CPU threads while training "
                                   "(default: torch's; 1 is fastest on a busy machine)")
    shards: Optional[int] = Field(None, ge=1, description="seeded parts of each global batch "
                                  "(default: the number of processes); a run on N processes "
                                  "equals one process with shards = N")


#: settings a resumed run may change (everything else comes from the checkpoint)
RESUMABLE = ("steps", "max_seconds", "checkpoint_every", "plot_every", "log_every",
             "plot_solver", "plot_steps", "plot_n", "threads")
COMPONENT_KINDS = ("data", "sde", "score", "loss")


@dataclass
class TrainResult:
    """What a training run produced: ``model`` (EMA weights) and its history."""

    model: Any
    raw: Any
    losses: list[float]
    step: int
    seconds: float
    config: dict[str, Any]
    dataset: Any = None
    out: Optional[Path] = None
    stopped_early: bool = False
    steps_per_second: float = 0.0
    checkpoints: list[Path] = field(default_factory=list)


# ---- resolving ------------------------------------------------------------------------------
def split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(TrainSettings fields, component field overrides)``; ``train.FIELD`` is explicit."""
    settings, rest = {}, {}
    for key, value in overrides.items():
        name = key.removeprefix("train.")
        if name in TrainSettings.model_fields and (key.startswith("train.") or "." not in key):
            settings[name] = value
        else:
            rest[key] = value
    return settings, rest


def resolve_config(engine: "Engine", settings: TrainSettings,
                   overrides: dict[str, Any]) -> dict[str, Any]:
    """The full resolved configuration of a fresh run: each component's type and fields."""
    names = {"data": settings.data, "sde": settings.sde, "score": settings.model,
             "loss": settings.loss}
    chosen = {k: engine.resolve(k, n)[0] for k, n in names.items()}
    routed = engine.route_overrides(chosen, overrides)
    score_cls = chosen["score"]
    if not getattr(score_cls, "needs_training", False):
        trainable = [n for n in engine.catalogue.names("score")
                     if engine.catalogue.get("score", n).needs_training]
        raise DiffuseError(f"score model {settings.model!r} ({score_cls.name}) is not trainable;"
                           f" choose one of: {', '.join(trainable) or '(none installed)'}")
    data_cls, data_cfg = engine.resolve("data", names["data"], **routed["data"])
    dataset = data_cls(data_cfg)
    fields = score_cls.Config.model_fields
    if "shape" in fields and "shape" not in routed["score"]:
        routed["score"]["shape"] = list(dataset.shape)
    if "init_seed" in fields and "init_seed" not in routed["score"]:
        entry = engine.registry.entry("score", names["score"])
        if "init_seed" not in entry.fields:
            routed["score"]["init_seed"] = settings.seed
    config: dict[str, Any] = {"train": settings.model_dump(mode="json")}
    for kind, name in names.items():
        cls, cfg = engine.resolve(kind, name, **routed[kind])
        typ = engine.registry.entry(kind, name).type
        if isinstance(typ, str) and is_import_path(typ):  # checkpoints name installed code
            raise DiffuseError(f"{kind} {name!r} is imported from {typ!r}; training records "
                               "implementations by installed name so its checkpoints load "
                               "anywhere: install it as a plugin to train with it")
        config[kind] = {"name": name, "type": cls.name, **cfg.model_dump(mode="json")}
    return config


def build_component(engine: "Engine", kind: str, spec: dict[str, Any], sde=None):
    """Build ``kind`` from a recorded ``{"type": ..., **fields}`` (no registry lookup)."""
    fields = {k: v for k, v in spec.items() if k not in ("type", "name")}
    cls = engine.catalogue.get(kind, spec["type"])
    cfg = recorded_config(cls, fields, f"recorded {kind} {spec['type']!r}")
    if kind == "sde":
        obj = cls(cfg)
        if getattr(cfg, "kernel", None) is not None:
            obj.attach_kernel(engine.build("kernel", cfg.kernel, sde=obj))
        return obj
    if kind in ("score", "loss"):
        return cls(cfg, sde=sde)
    return cls(cfg)


def needs_training(engine: "Engine", score: Any) -> bool:
    """Whether score-model entry ``score`` (a name) must be trained before sampling."""
    if not isinstance(score, str):
        return False
    cls, _ = engine.resolve("score", score)
    return bool(getattr(cls, "needs_training", False))


# ---- the folder ---------------------------------------------------------------------------
def _prepare_out(out: Path, resume: bool, overwrite: bool) -> Optional[Checkpoint]:
    ckpt_path = out / CHECKPOINT_NAME
    if resume:
        if not ckpt_path.is_file():
            raise CheckpointError(f"--resume: no {CHECKPOINT_NAME} in {out}; nothing to resume")
        return Checkpoint.load(ckpt_path)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} is a file; --out names a training folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"output {out} already exists; pass --resume to continue "
                                    "it, --overwrite to replace it, or choose another --out")
        if not (out / "status.json").exists() and not ckpt_path.exists():
            raise OutputExistsError(f"--overwrite: {out} is not a training folder (no "
                                    "status.json); refusing to delete it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return None


def _write_losses(path: Path, losses: list[float]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["step", "loss"])
    w.writerows((i + 1, f"{v:.8g}") for i, v in enumerate(losses))
    atomic_write_bytes(path, buf.getvalue().encode())


# ---- the loop --------------------------------------------------------------------------------
def run_training(engine: "Engine", settings: TrainSettings, overrides: dict[str, Any] | None = None,
                 *, out: str | Path | None = None, resume: bool = False,
                 overwrite: bool = False, progress: bool = False) -> TrainResult:
    """Train per ``settings`` (+ component ``overrides``); write to ``out`` if given.

    With ``resume`` the configuration comes from ``out``'s checkpoint; only the
    :data:`RESUMABLE` settings set explicitly in ``settings`` apply.
    """
    threads = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        return _run_training(engine, settings, overrides, out=out, resume=resume,
                             overwrite=overwrite, progress=progress)
    finally:
        torch.set_num_threads(threads)


def _run_training(engine, settings, overrides, *, out, resume, overwrite, progress):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    out = Path(out) if out is not None else None
    if resume and out is None:
        raise DiffuseError("resume needs the training folder (--out) to continue")
    ctx = engine.dist  # rank 0 prepares the folder and writes; see diffuse_engine.distributed
    ckpt = ctx.run_on_main(_prepare_out, out, resume, overwrite) if out is not None else None
    if resume and not ctx.is_main:
        ckpt = Checkpoint.load(out / CHECKPOINT_NAME)
    if ckpt is not None:
        config = json.loads(json.dumps(ckpt.config))
        changes = {k: v for k, v in settings.model_dump().items()
                   if k in RESUMABLE and k in settings.model_fields_set}
        config["train"].update(changes)
        settings = TrainSettings.model_validate(config["train"])
    else:
        config = resolve_config(engine, settings, dict(overrides or {}))
        config["train"]["shards"] = settings.shards or ctx.world_size
    s = settings
    device = ctx.device(check_device(s.device))

    dataset = build_component(engine, "data", config["data"])
    sde = build_component(engine, "sde", config["sde"])
    model = build_component(engine, "score", config["score"], sde=sde).to(device)
    loss_fn = build_component(engine, "loss", config["loss"], sde=sde)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    ema = AveragedModel(model.net, multi_avg_fn=get_ema_multi_avg_fn(s.ema_decay),
                        use_buffers=True)
    batches = ShardedBatches(s.seed, config["train"].get("shards") or 1, s.batch_size, ctx,
                             device)
    losses: list[float] = []
    start = 0
    if ckpt is not None:
        model.net.load_state_dict(ckpt.model)
        ema.load_state_dict(ckpt.ema)
        opt.load_state_dict(ckpt.optim)
        batches.load_state(ckpt.rng)
        torch.set_rng_state(ckpt.rng["torch_cpu"])
        losses = ckpt.losses.tolist() if ckpt.losses is not None else []
        start = ckpt.step
    ddp, train_model = None, model
    if ctx.enabled:  # broadcasts rank 0's weights; averages gradients over ranks
        from torch.nn.parallel import DistributedDataParallel
        ddp = DistributedDataParallel(model.net, device_ids=[device.index]
                                      if device.type == "cuda" else None)
        train_model = model.with_net(ddp)
    if out is not None and ctx.is_main:
        write_json(out / "config.json", {"config": config, "resumed_from": start or None})
        write_json(out / "status.json", {"complete": False, "step": start, "steps": s.steps})

    def save(step: int) -> Path:
        # one sync per checkpoint: never replace the last good checkpoint with bad weights
        if not all(bool(torch.isfinite(p).all()) for p in params):
            raise NumericalError(f"model weights became NaN/Inf by step {step} (loss "
                                 f"{config['loss']['type']!r}); lower lr ({s.lr}) or keep "
                                 "grad_clip on; the last good checkpoint is kept")
        rng = {**batches.state(ctx), "torch_cpu": torch.get_rng_state()}
        if not ctx.is_main:
            return out / CHECKPOINT_NAME
        path = Checkpoint(step=step, config=config, model=model.net.state_dict(),
                          ema=ema.state_dict(), optim=opt.state_dict(), rng=rng,
                          losses=torch.tensor(losses, dtype=torch.float64)).save(out / CHECKPOINT_NAME)
        _write_losses(out / "losses.csv", losses)
        write_json(out / "status.json", {"complete": False, "step": step, "steps": s.steps})
        if engine.has_observers("diffuse_checkpoint_saved"):
            engine.hook.diffuse_checkpoint_saved(path=str(path), step=step)
        return path

    observe = engine.has_observers("diffuse_training_step")
    pending: list[torch.Tensor] = []
    checkpoints: list[Path] = []
    stopped_early = False
    model.train()
    t0 = time.perf_counter()
    done = start
    interrupted = False
    with progress_bar(s.steps, f"training {config['score']['type']} on {config['data']['name']}",
                      enabled=progress and ctx.is_main) as bar, StopOnSignal() as stop:
        if bar is not None and start:
            bar(start)
        for step in range(start, s.steps):
            lr = s.lr * min(1.0, (step + 1) / s.warmup) if s.warmup else s.lr
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss = batches.step(train_model, loss_fn, dataset, device, ddp)
            if s.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
            opt.step()
            ema.update_parameters(model.net)
            pending.append(loss.detach())
            done = step + 1
            if observe:
                mean = float(ctx.all_reduce_mean(loss))
                if ctx.is_main:
                    engine.hook.diffuse_training_step(step=done, loss=mean)
            last = done == s.steps
            elapsed = time.perf_counter() - t0
            over_time = s.max_seconds is not None and elapsed > s.max_seconds
            stop_now = stop.requested
            if ctx.enabled:  # every rank stops at the same step
                flags = ctx.all_reduce_mean(torch.tensor([float(over_time), float(stop_now)]))
                over_time, stop_now = bool(flags[0] > 0), bool(flags[1] > 0)
            if done % s.log_every == 0 or last or over_time or stop_now or (
                    out is not None and s.checkpoint_every and done % s.checkpoint_every == 0):
                values = ctx.all_reduce_mean(torch.stack(pending)).double().cpu().tolist()
                pending.clear()
                losses.extend(values)
                if not all(map(math.isfinite, values)):
                    first = done - len(values) + 1 + next(
                        i for i, v in enumerate(values) if not math.isfinite(v))
                    raise NumericalError(
                        f"training loss became NaN/Inf at step {first} (loss "
                        f"{config['loss']['type']!r} of model {config['score']['type']!r}); "
                        f"lower lr ({s.lr}) or keep grad_clip on; the last good checkpoint "
                        "is kept" + (f" in {out}" if out is not None else ""))
                if bar is not None:
                    bar(done, loss=sum(values) / len(values),
                        steps_per_s=(done - start) / max(elapsed, 1e-9))
            if out is not None and not last and s.checkpoint_every and done % s.checkpoint_every == 0:
                checkpoints.append(save(done))
            if out is not None and not last and s.plot_every and done % s.plot_every == 0:
                _plot(engine, model.with_net(ema.module), config, dataset,
                      out / f"samples-step{done:07d}.png", s, done)
                model.train()
            if over_time and not last:
                stopped_early = True
                break
            if stop_now and not last:  # Ctrl-C / SIGTERM: checkpoint, then stop
                interrupted = stopped_early = True
                break
    seconds = time.perf_counter() - t0
    ema_model = model.with_net(ema.module).eval()
    raw = model.eval()
    if getattr(dataset, "mixture", None) is not None:
        ema_model.mixture = dataset.mixture
    ema_model.trained_config = config
    if out is not None:
        checkpoints.append(save(done))
        if not interrupted:  # a Ctrl-C should not wait for a sample plot
            _plot(engine, ema_model, config, dataset, out / "samples.png", s, done)
    if out is not None and ctx.is_main:
        write_json(out / "status.json", {"complete": not stopped_early, "step": done,
                                         "steps": s.steps, "stopped_early": stopped_early,
                                         "interrupted": interrupted,
                                         "seconds": round(seconds, 2)})
    if interrupted:
        raise KeyboardInterrupt(
            f"{stop.name} at step {done}: " + (
                f"checkpoint saved in {out}; continue with diffuse train --resume --out {out}"
                if out is not None else "nothing saved (no output folder)"))
    return TrainResult(model=ema_model, raw=raw, losses=losses, step=done, seconds=seconds,
                       config=config, dataset=dataset, out=out, stopped_early=stopped_early,
                       steps_per_second=(done - start) / max(seconds, 1e-9),
                       checkpoints=checkpoints)


def train_for_run(engine: "Engine", plan, out: Path, *, progress: bool = False):
    """Train the score model of a ``diffuse run`` plan (``[train.NAME]`` of ``plan.train``,
    default ``default``, with the plan's score, SDE, seed, device and data); the EMA model."""
    choices = {"model": plan.score, "sde": plan.sde, "seed": plan.seed, "device": plan.device}
    if plan.data is not None:
        choices["data"] = plan.data
    settings = engine.registry.train_settings(plan.train or "default", choices)
    return run_training(engine, settings, {}, out=out, progress=progress).model


def sample_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """``sde.FIELD`` overrides that rebuild the recorded SDE from its type's defaults."""
    return {f"sde.{k}": v for k, v in config["sde"].items() if k not in ("type", "name")}


def _plot(engine: "Engine", model, config, dataset, path: Path, s: TrainSettings, step: int):
    """Sample with the EMA model and save a scatter (vectors) or image grid (images)."""
    result = engine.sampling(score=model, sde=config["sde"]["type"], solver=s.plot_solver,
                             shape=(s.plot_n, *model.data_shape), seed=s.seed, device=s.device,
                             steps=s.plot_steps, **sample_overrides(config))
    if not engine.dist.is_main:  # every rank samples (collectively), rank 0 plots
        return
    plot_result(result.samples, path, dataset=dataset,
                title=f"{config['score']['type']} on {config['data']['name']}, step {step}: "
                      f"{s.plot_solver}, {s.plot_steps} steps")


def plot_result(x: torch.Tensor, path: Path, *, dataset=None, title: str = "") -> Path:
    """Image grid for ``(n, C, H, W)`` samples, else a scatter beside the data."""
    x = x.detach().cpu()
    if x.dim() == 4:
        from .image_grid import plot_image_grid
        if hasattr(dataset, "to_pixels"):
            x = dataset.to_pixels(x).reshape(x.shape)
        return plot_image_grid(x, path, title=title)
    from .plotting import plot_samples
    reference = None
    if dataset is not None:
        reference = dataset.sample(x.shape[0], torch.Generator().manual_seed(12345))
    return plot_samples(x, path, reference=reference, title=title)


# ---- checkpoints as score models --------------------------------------------------------------
def load_trained(engine: "Engine", path: str | Path, *, ema: bool = True, sde=None):
    """``(model, checkpoint)``: the trained model of a checkpoint, bound to its SDE."""
    from .checkpoint import build_model
    ckpt = Checkpoint.load(path)
    sde = sde if sde is not None else build_component(engine, "sde", ckpt.config["sde"])
    model = build_model(engine.catalogue, ckpt, sde, ema=ema, where=f"checkpoint {path}")
    data_spec = ckpt.config.get("data")
    if data_spec is not None and engine.catalogue.has("data", data_spec.get("type", "")):
        mix = getattr(build_component(engine, "data", data_spec), "mixture", None)
        if mix is not None:
            model.mixture = mix
    return model, ckpt


__all__ = ["TrainSettings", "TrainResult", "run_training", "resolve_config", "needs_training",
           "load_trained", "sample_overrides", "plot_result", "check_same_sde", "sde_spec"]
