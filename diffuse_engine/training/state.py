"""The parts of a training run that are state, not steps: the configuration a resumed
run continues with, the data it trains on, restoring a checkpoint, and the records it
writes beside its checkpoints (losses, the statistics observers get)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import torch

from diffuse_engine.components.builder import Builder
from diffuse_engine.components.checkpoint import Checkpoint, CheckpointError, check_optimizer_state
from diffuse_engine.components.memory_data import is_memory_record
from diffuse_engine.core.errors import DiffuseError
from diffuse_engine.output.files import atomic_write_bytes
from diffuse_engine.training.settings import LEGACY_SETTINGS, RESUMABLE, TrainSettings


def resumed_config(ckpt: Checkpoint, settings: TrainSettings) -> tuple[dict, TrainSettings]:
    """The recorded configuration of ``ckpt`` with the :data:`RESUMABLE` settings the
    call set explicitly; its validated settings."""
    config = json.loads(json.dumps(ckpt.config))
    for k, v in LEGACY_SETTINGS.items():  # a checkpoint from before the setting existed
        config["train"].setdefault(k, v)
    changes = {
        k: v
        for k, v in settings.model_dump().items()
        if k in RESUMABLE and k in settings.model_fields_set
    }
    config["train"].update(changes)
    return config, TrainSettings.model_validate(config["train"])


def training_data(builder: Builder, config: dict, data, *, resumed: bool, out: Path | None):
    """The dataset of a run: the recorded entry, or the in-memory ``data`` the call
    passed (checked against the record when resuming)."""
    if is_memory_record(config["data"]):
        if data is None:
            raise DiffuseError(
                f"the run in {out} was trained on in-memory data; resume it with the same "
                "data (engine.training(data=X, resume=True, out=...))"
            )
        data.check_matches(config["data"], f"the run in {out}")
        return data
    if data is not None and resumed:
        raise DiffuseError(
            f"the run in {out} was trained on data {config['data'].get('name')!r}; "
            "resume it without data="
        )
    return builder.build_recorded("data", config["data"])


def restore(ckpt: Checkpoint, model, ema, opt, batches, params, out) -> tuple[list[float], int]:
    """Load a checkpoint's weights, EMA, optimiser and generator states into a built
    run; ``(losses so far, step)``. Any inconsistency is the file's, in one line."""
    try:  # files are untrusted: any inconsistency is the checkpoint's, in one line
        check_optimizer_state(ckpt.optim, params)
        model.net.load_state_dict(ckpt.model)
        ema.load_state_dict(ckpt.ema)
        opt.load_state_dict(ckpt.optim)
        batches.load_state(ckpt.rng)
        torch.set_rng_state(ckpt.rng["torch_cpu"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointError(
            f"checkpoint {out}: cannot restore its training state "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); it was not "
            "written by this run's code or is damaged; nothing was changed"
        ) from None
    return (ckpt.losses.tolist() if ckpt.losses is not None else []), ckpt.step


def training_stats(values, lr, params, grad_norm, ema_params, net_params) -> dict[str, float]:
    """What ``diffuse_training_stats`` reports (computed only when a plugin listens)."""
    if grad_norm is None:  # no clipping: this step's norm (inf max_norm scales by 1)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
    with torch.no_grad():
        pairs = list(zip(ema_params, net_params, strict=True))
        lag = sum(float((e.double() - w.double()).pow(2).sum()) for e, w in pairs)
        size = sum(float(w.double().pow(2).sum()) for _, w in pairs)
    return {
        "loss": sum(values) / len(values),
        "lr": float(lr),
        "grad_norm": float(grad_norm),
        "ema_lag": math.sqrt(lag / size) if size > 0 else 0.0,
    }


def write_losses(path: Path, losses: list[float]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["step", "loss"])
    w.writerows((i + 1, f"{v:.8g}") for i, v in enumerate(losses))
    atomic_write_bytes(path, buf.getvalue().encode())


# ---- the loop --------------------------------------------------------------------------------
