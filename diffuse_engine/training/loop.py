"""Training score models: settings, the loop, checkpoints and resume.

One training run combines four registry entries: a dataset (``data``), an SDE, a
trainable score model (``score``, any implementation with ``needs_training = True``)
and a loss, under :class:`TrainSettings` (a ``[train.NAME]`` registry table). The loop is
plain PyTorch in the style of ``score_sde_pytorch/run_lib.py``:

* AdamW (Loshchilov & Hutter 2019) with linear learning-rate warm-up, then a constant or
  cosine learning rate (:func:`~diffuse_engine.training.schedules.learning_rate`),
  gradient-norm clipping, and an exponential moving average of the weights
  (``torch.optim.swa_utils``; Song & Ermon 2020 recommend EMA for sampling) whose decay
  warms up as k-diffusion's and diffusers' does
  (:func:`~diffuse_engine.training.schedules.ema_decay_at`).
* The data are normalised (:mod:`diffuse_engine.components.normalise`, recorded as the
  configuration's ``normalise``); the returned model carries the normaliser, so its
  samples and likelihoods are in the user's units. The model returned, and the one a
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
replaced atomically, see :mod:`diffuse_engine.components.checkpoint`), ``config.json`` (the resolved
configuration), ``losses.csv``, ``samples.png`` (and ``samples-stepN.png`` every
``plot_every`` steps) and ``status.json`` (``complete: true`` only after the last step
and the final checkpoint).

Trainable score models expose ``net`` (the ``torch.nn.Module`` backbone),
``parameters()``, ``to(device)``, ``train()``/``eval()`` and ``with_net(module)``;
see ``diffuse_plugins.networks.NetworkScore``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from diffuse_engine.components.builder import Builder, SampleFn
from diffuse_engine.components.checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    check_recorded_model,
)
from diffuse_engine.components.memory_data import MemoryData
from diffuse_engine.components.normalise import NormalisedData, Normaliser
from diffuse_engine.core.devices import check_device
from diffuse_engine.core.distributed import ShardedBatches
from diffuse_engine.core.errors import DiffuseError, NumericalError
from diffuse_engine.output.files import OutputError, write_json
from diffuse_engine.output.interrupts import StopOnSignal
from diffuse_engine.output.progress import progress_bar
from diffuse_engine.training.folder import TrainingFolder
from diffuse_engine.training.plots import plot_losses_of, plot_model
from diffuse_engine.training.preflight import check_before_work
from diffuse_engine.training.resolve import resolve_config
from diffuse_engine.training.schedules import ema_update, learning_rate
from diffuse_engine.training.settings import (
    TrainResult,
    TrainSettings,
    model_kind,
)
from diffuse_engine.training.state import (
    restore,
    resumed_config,
    training_data,
    training_stats,
    write_losses,
)


def run_training(
    builder: Builder,
    settings: TrainSettings,
    overrides: dict[str, Any] | None = None,
    *,
    sample: SampleFn,
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    data: MemoryData | None = None,
) -> TrainResult:
    """Train per ``settings`` (+ component ``overrides``); write to ``out`` if given.

    With ``resume`` the configuration comes from ``out``'s checkpoint; only the
    :data:`RESUMABLE` settings set explicitly in ``settings`` apply. ``data``: in-memory
    data (:class:`~diffuse_engine.components.memory_data.MemoryData`) instead of
    ``settings.data``; resuming such a run needs the same data again.
    """
    if resume and out is None:
        raise DiffuseError("resume needs the training folder (--out) to continue")
    ctx = builder.dist  # rank 0 prepares the folder and writes; see diffuse_engine.core.distributed
    folder = None
    if out is not None:  # every rank checks the path; rank 0 alone locks and writes it
        folder = TrainingFolder(out, resume, overwrite)
    threads = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        return _run_training(
            builder, settings, overrides, sample=sample, folder=folder, progress=progress, data=data
        )
    except BaseException as exc:
        if folder is not None and ctx.is_main:
            folder.fail(exc)
            if isinstance(exc, OutputError):
                raise OutputError(f"{exc}; {folder.what_is_safe()}") from None
            if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
                raise DiffuseError(
                    f"out of memory while training ({str(exc).splitlines()[0][:120]}); "
                    f"lower --batch-size or the model's size; {folder.what_is_safe()}"
                ) from None
        raise
    finally:
        torch.set_num_threads(threads)
        if folder is not None:
            folder.release()


def _run_training(builder, settings, overrides, *, sample, folder, progress, data=None):
    from torch.optim.swa_utils import AveragedModel

    out = folder.out if folder is not None else None
    resume = folder is not None and folder.resume
    ctx = builder.dist
    ckpt = None
    if folder is not None:  # nothing is written before the whole configuration is built
        ckpt = ctx.run_on_main(folder.load_resume if resume else folder.check)
    if resume and not ctx.is_main:
        ckpt = Checkpoint.load(out / CHECKPOINT_NAME)
    if ckpt is not None:
        config, settings = resumed_config(ckpt, settings)
    else:
        config = resolve_config(builder, settings, dict(overrides or {}), data)
        config["train"]["shards"] = settings.shards or ctx.world_size
        settings = settings.model_copy(update={"lr_horizon": config["train"]["lr_horizon"]})
    s = settings
    device = ctx.device(check_device(s.device))

    dataset = training_data(builder, config, data, resumed=ckpt is not None, out=out)
    norm = Normaliser.from_record(config.get("normalise"), dataset.shape)
    train_data = dataset if norm.identity else NormalisedData(dataset, norm)
    sde = builder.build_recorded("sde", config["sde"])
    if ckpt is not None:  # the recorded model must fit the file's tensors: check, then build
        check_recorded_model(
            builder.catalogue, ckpt, sde, f"checkpoint {out}", kind=model_kind(config["train"])
        )
    # config["score"] records the trained model: a classifier for task = "classifier"
    model = builder.build_recorded(model_kind(config["train"]), config["score"], sde=sde)
    model = model.to(device)
    if not norm.identity:  # sampling maps the model's samples back to the user's units
        model.normaliser = norm
    loss_fn = builder.build_recorded("loss", config["loss"], sde=sde)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    ema = AveragedModel(model.net, multi_avg_fn=ema_update(s), use_buffers=True)
    batches = ShardedBatches(s.seed, config["train"].get("shards") or 1, s.batch_size, ctx, device)
    losses: list[float] = []
    start = 0
    if ckpt is not None:
        losses, start = restore(ckpt, model, ema, opt, batches, params, out)
    ddp, train_model = None, model
    if ctx.enabled:  # broadcasts rank 0's weights; averages gradients over ranks
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(
            model.net, device_ids=[device.index] if device.type == "cuda" else None
        )
        train_model = model.with_net(ddp)
    check_before_work(builder, s, config, model, dataset, device)
    if folder is not None:  # everything is valid: lock, create (or stage) the folder
        ctx.run_on_main(folder.open)
    if out is not None and ctx.is_main:
        write_json(folder.path / "config.json", {"config": config, "resumed_from": start or None})
        write_json(
            folder.path / "status.json", {"complete": False, "step": start, "steps": s.steps}
        )
    run = {"command": "train", "out": str(folder.path) if folder else None, "config": config}
    if ctx.is_main:  # observers: the metrics and tensorboard loggers
        builder.hook.diffuse_run_start(run=run)

    def save(step: int) -> Path:
        # one sync per checkpoint: never replace the last good checkpoint with bad weights
        if not all(bool(torch.isfinite(p).all()) for p in params):
            raise NumericalError(
                f"model weights became NaN/Inf by step {step} (loss "
                f"{config['loss']['type']!r}); lower lr ({s.lr}) or keep "
                "grad_clip on; the last good checkpoint is kept"
            )
        rng = {**batches.state(ctx), "torch_cpu": torch.get_rng_state()}
        if not ctx.is_main:
            return out / CHECKPOINT_NAME
        work = folder.path  # a new --overwrite run's hidden sibling until this commits
        path = Checkpoint(
            step=step,
            config=config,
            model=model.net.state_dict(),
            ema=ema.state_dict(),
            optim=opt.state_dict(),
            rng=rng,
            losses=torch.tensor(losses, dtype=torch.float64),
        ).save(work / CHECKPOINT_NAME)
        write_losses(work / "losses.csv", losses)
        write_json(work / "status.json", {"complete": False, "step": step, "steps": s.steps})
        folder.committed(step)  # the first complete checkpoint swaps an --overwrite in
        path = out / CHECKPOINT_NAME
        if builder.has_observers("diffuse_checkpoint_saved"):
            builder.hook.diffuse_checkpoint_saved(path=str(path), step=step)
        return path

    observe = builder.has_observers("diffuse_training_step")
    pending: list[torch.Tensor] = []
    checkpoints: list[Path] = []
    stopped_early = False
    model.train()
    t0 = time.perf_counter()
    done = start
    interrupted = False
    with (
        progress_bar(
            s.steps,
            f"training {config['score']['type']} on {config['data']['name']}",
            enabled=progress and ctx.is_main,
        ) as bar,
        StopOnSignal() as stop,
    ):
        if bar is not None and start:
            bar(start)
        for step in range(start, s.steps):
            lr = learning_rate(s, step)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss = batches.step(train_model, loss_fn, train_data, device, ddp)
            grad_norm = None
            if s.grad_clip is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
            opt.step()
            ema.update_parameters(model.net)
            pending.append(loss.detach())
            done = step + 1
            if observe:
                mean = float(ctx.all_reduce_mean(loss))
                if ctx.is_main:
                    builder.hook.diffuse_training_step(step=done, loss=mean)
            last = done == s.steps
            elapsed = time.perf_counter() - t0
            over_time = s.max_seconds is not None and elapsed > s.max_seconds
            stop_now = stop.requested
            if ctx.enabled:  # every rank stops at the same step
                flags = ctx.all_reduce_mean(torch.tensor([float(over_time), float(stop_now)]))
                over_time, stop_now = bool(flags[0] > 0), bool(flags[1] > 0)
            if (
                done % s.log_every == 0
                or last
                or over_time
                or stop_now
                or (out is not None and s.checkpoint_every and done % s.checkpoint_every == 0)
            ):
                values = ctx.all_reduce_mean(torch.stack(pending)).double().cpu().tolist()
                pending.clear()
                losses.extend(values)
                if not all(map(math.isfinite, values)):
                    first = (
                        done
                        - len(values)
                        + 1
                        + next(i for i, v in enumerate(values) if not math.isfinite(v))
                    )
                    raise NumericalError(
                        f"training loss became NaN/Inf at step {first} (loss "
                        f"{config['loss']['type']!r} of model {config['score']['type']!r}); "
                        f"lower lr ({s.lr}) or keep grad_clip on; the last good checkpoint "
                        "is kept" + (f" in {out}" if out is not None else "")
                    )
                if ctx.is_main and builder.has_observers("diffuse_training_stats"):
                    stats = training_stats(
                        values, lr, params, grad_norm, ema.module.parameters(), params
                    )
                    builder.hook.diffuse_training_stats(step=done, stats=stats)
                if bar is not None:
                    bar(
                        done,
                        loss=sum(values) / len(values),
                        steps_per_s=(done - start) / max(elapsed, 1e-9),
                    )
            if (
                out is not None
                and not last
                and s.checkpoint_every
                and done % s.checkpoint_every == 0
            ):
                checkpoints.append(save(done))
            if (
                out is not None
                and not last
                and s.plot_every
                and s.plot_n
                and done % s.plot_every == 0
            ):
                plot_model(
                    sample,
                    ctx,
                    model.with_net(ema.module),
                    config,
                    dataset,
                    folder.path / f"samples-step{done:07d}.png",
                    s,
                    done,
                )
                model.train()
                if ctx.is_main:
                    builder.hook.diffuse_plot_saved(
                        path=str(folder.path / f"samples-step{done:07d}.png"), step=done
                    )
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
        if ctx.is_main:
            plot_losses_of(losses, config, out / "loss.png")
        if not interrupted and s.plot_n:  # a Ctrl-C should not wait for a sample plot
            plot_model(sample, ctx, ema_model, config, dataset, out / "samples.png", s, done)
            if ctx.is_main:
                builder.hook.diffuse_plot_saved(path=str(out / "samples.png"), step=done)
    if out is not None and ctx.is_main:
        write_json(
            out / "status.json",
            {
                "complete": not stopped_early,
                "step": done,
                "steps": s.steps,
                "stopped_early": stopped_early,
                "interrupted": interrupted,
                "seconds": round(seconds, 2),
            },
        )
    if interrupted:
        raise KeyboardInterrupt(
            f"{stop.name} at step {done}: "
            + (
                f"checkpoint saved in {out}; continue with diffuse train --resume --out {out}"
                if out is not None
                else "nothing saved (no output folder)"
            )
        )
    if ctx.is_main:
        tail = losses[-100:]
        builder.hook.diffuse_run_end(
            run=run,
            metrics={
                "step": done,
                "seconds": round(seconds, 2),
                "loss": sum(tail) / max(len(tail), 1),
                "stopped_early": stopped_early,
            },
        )
    return TrainResult(
        model=ema_model,
        raw=raw,
        losses=losses,
        step=done,
        seconds=seconds,
        config=config,
        dataset=dataset,
        out=out,
        stopped_early=stopped_early,
        steps_per_second=(done - start) / max(seconds, 1e-9),
        checkpoints=checkpoints,
    )


def train_for_run(builder: Builder, plan, out: Path, *, sample: SampleFn, progress: bool = False):
    """Train the score model of a ``diffuse run`` plan (``[train.NAME]`` of ``plan.train``,
    default ``default``, with the plan's score, SDE, seed, device and data); the EMA model."""
    choices = {"model": plan.score, "sde": plan.sde, "seed": plan.seed, "device": plan.device}
    if plan.data is not None:
        choices["data"] = plan.data
    settings = builder.registry.train_settings(plan.train or "default", choices)
    return run_training(builder, settings, {}, sample=sample, out=out, progress=progress).model
