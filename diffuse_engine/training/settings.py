"""Training settings: a ``[train.NAME]`` registry table, and what a run returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TrainSettings(BaseModel):
    """A ``[train.NAME]`` table: what to train on and how (all fields optional)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    data: str = Field("gmm", description="dataset entry")
    sde: str = Field("vp", description="SDE entry")
    model: str = Field(
        "mlp", description="trainable score-model entry (a classifier entry for task classifier)"
    )
    task: Literal["score", "classifier"] = Field(
        "score",
        description="what to train: a score model, or a noise-conditional classifier for "
        "classifier guidance (model: a classifier entry, loss: cross_entropy)",
    )
    loss: str = Field("dsm", description="loss entry")
    steps: int = Field(2000, ge=1, description="optimiser steps in total")
    batch_size: int = Field(512, ge=1, description="samples per step")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    warmup: int = Field(100, ge=0, description="linear learning-rate warm-up steps")
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm (none: off)")
    ema_decay: float = Field(
        0.999, ge=0, lt=1, description="EMA decay of the weights (the most, after warm-up)"
    )
    ema_power: float | None = Field(
        0.75,
        gt=0,
        description="EMA warm-up: decay min(ema_decay, 1 - (1 + step / ema_inv_gamma)"
        "^-ema_power) (none: ema_decay from the start)",
    )
    ema_inv_gamma: float = Field(1.0, gt=0, description="EMA warm-up: the step scale gamma")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="learning rate after the warm-up: constant, or a cosine decay that "
        "ends at lr_horizon",
    )
    lr_min_ratio: float = Field(
        0.0, ge=0, le=1, description="cosine: the final learning rate as a fraction of lr"
    )
    lr_horizon: int | None = Field(
        None,
        ge=1,
        description="cosine: the step the decay ends at (then lr * lr_min_ratio); none: "
        "the first run's steps, recorded, so a resumed run keeps its schedule. Set it on "
        "resume to stretch the decay over more steps",
    )
    normalise: Literal["auto", "standard", "global", "images", "none"] = Field(
        "auto",
        description="data normalisation (recorded, undone when sampling): auto, standard "
        "(per dimension), global, images ([0, 255] -> [-1, 1]) or none",
    )
    data_mean: float | list[float] | None = Field(
        None, description="explicit normalisation mean (a number or one per dimension)"
    )
    data_scale: float | list[float] | None = Field(
        None, description="explicit normalisation scale (a number or one per dimension)"
    )
    seed: int = Field(
        0, ge=0, lt=2**63, description="seed of data, noise and (by default) initial weights"
    )
    device: str = Field("cpu", description="torch device")
    checkpoint_every: int = Field(1000, ge=0, description="checkpoint period (0: at the end)")
    plot_every: int = Field(0, ge=0, description="sample-plot period (0: at the end only)")
    plot_solver: str = Field("pc", description="solver entry for sample plots")
    plot_steps: int = Field(250, ge=1, description="solver steps for sample plots")
    plot_n: int = Field(
        2000, ge=0, description="samples in a plot (images: up to 100 shown; 0: no plots)"
    )
    log_every: int = Field(50, ge=1, description="steps between loss read-backs / bar updates")
    max_seconds: float | None = Field(
        None, gt=0, description="stop (and checkpoint) after this much training time"
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="torch CPU threads while training "
        "(default: torch's; 1 is fastest on a busy machine)",
    )
    shards: int | None = Field(
        None,
        ge=1,
        description="seeded parts of each global batch "
        "(default: the number of processes); a run on N processes "
        "equals one process with shards = N",
    )

    @model_validator(mode="before")
    @classmethod
    def _classifier_defaults(cls, data):
        """A classifier makes no sample plots."""
        if isinstance(data, dict) and data.get("task") == "classifier":
            data = {**data, "plot_n": 0}
        return data


#: settings a resumed run may change (everything else comes from the checkpoint)
RESUMABLE = (
    "steps",
    "max_seconds",
    "checkpoint_every",
    "plot_every",
    "log_every",
    "plot_solver",
    "plot_steps",
    "plot_n",
    "threads",
    "lr_horizon",
)
COMPONENT_KINDS = ("data", "sde", "score", "loss")


def model_kind(settings) -> str:
    """The registry kind of the trained model (recorded as the configuration's ``score``):
    ``classifier`` for ``task = "classifier"``, else ``score``. ``settings``: a
    :class:`TrainSettings` or a recorded ``config["train"]`` dict."""
    task = settings.get("task") if isinstance(settings, dict) else settings.task
    return "classifier" if task == "classifier" else "score"


#: what a checkpoint written before a setting existed meant by its absence (resume)
LEGACY_SETTINGS = {"ema_power": None, "lr_schedule": "constant", "normalise": "none"}


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
    out: Path | None = None
    stopped_early: bool = False
    steps_per_second: float = 0.0
    checkpoints: list[Path] = field(default_factory=list)


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
