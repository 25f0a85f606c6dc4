"""Checks made once the configuration is built and before the first step or file: what
would otherwise fail only after the whole training (the final plot's sampling settings),
memory for the model and a batch (:mod:`diffuse_engine.core.memory`), and a learning-rate
warm-up longer than the run or steps past a cosine decay's end (warnings: the run is
legal, just probably not meant)."""

from __future__ import annotations

import math
import warnings

from diffuse_engine.components.builder import Builder
from diffuse_engine.core.errors import DiffuseError
from diffuse_engine.core.memory import check_fits, training_bytes
from diffuse_engine.training.plots import sample_overrides
from diffuse_engine.training.settings import TrainSettings


def check_before_work(builder: Builder, s: TrainSettings, config, model, dataset, device):
    """What would otherwise fail after training: the plots' sampling settings, memory for
    the batch and the model, a warm-up the run never finishes and steps past the end of
    the cosine decay (warnings)."""
    _check_model(model, dataset, config)
    if s.plot_n:  # the final plot samples with these; a mistake must not wait for the end
        chosen = {
            "sde": builder.catalogue.get("sde", config["sde"]["type"]),
            "solver": builder.resolve("solver", s.plot_solver)[0],
            "score": type(model),
        }
        routed = builder.route_overrides(
            chosen, {"steps": s.plot_steps, **sample_overrides(config)}, with_sets=False
        )
        builder.resolve("solver", s.plot_solver, **routed["solver"])
    check_labels_fit(model, dataset, config)
    n_params = sum(p.numel() for p in model.parameters())
    per_sample = math.prod(dataset.shape)
    check_fits(
        training_bytes(n_params, s.batch_size * per_sample),
        device,
        f"training {config['score']['type']} ({n_params:,} parameters) with batch_size "
        f"{s.batch_size} of {list(dataset.shape)} data",
        "lower --batch-size or the model's size",
    )
    if s.warmup > s.steps:
        warnings.warn(
            f"the learning-rate warm-up ({s.warmup} steps) is longer than the run "
            f"({s.steps} steps): lr reaches only {s.lr * s.steps / s.warmup:.3g} of "
            f"{s.lr:.3g}; set warmup below steps (--set warmup=...)",
            UserWarning,
            stacklevel=4,
        )
    if s.lr_schedule == "cosine" and s.lr_horizon is not None and s.steps > s.lr_horizon:
        warnings.warn(
            f"the cosine decay ends at step {s.lr_horizon} (lr_horizon, recorded when the "
            f"run began); steps {s.lr_horizon}..{s.steps} train at lr * lr_min_ratio = "
            f"{s.lr * s.lr_min_ratio:.3g}; pass lr_horizon={s.steps} (--set "
            f"lr_horizon={s.steps}) to stretch the decay instead",
            UserWarning,
            stacklevel=4,
        )


def check_labels_fit(model, dataset, config) -> None:
    """A class-conditional model (or a classifier) needs labelled data with as many
    classes as the model was built for."""
    if not (getattr(model, "conditional", False) or getattr(model, "trains_on_labels", False)):
        return
    want = getattr(model, "num_classes", None)
    have = getattr(dataset, "num_classes", None)
    what = f"{config['data']['name']!r}"
    if have is None:
        raise DiffuseError(
            f"model {type(model).name!r} is class-conditional (num_classes = {want}) but "
            f"dataset {what} has no labels; use a labelled dataset (gmm, digits, an .npz "
            "with labels, an image folder of class sub-folders) or drop num_classes"
        )
    if want != have:
        raise DiffuseError(
            f"model {type(model).name!r} has num_classes = {want} but dataset {what} has "
            f"{have} classes; set num_classes = {have}"
        )


def _check_model(model, dataset, config) -> None:
    """The trainable model keeps the contract training relies on (docs/plugins.md): a
    ``torch.nn.Module`` backbone ``net`` and a ``data_shape`` equal to the data's."""
    import torch

    name = config["score"]["type"]
    if not isinstance(getattr(model, "net", None), torch.nn.Module):
        raise DiffuseError(
            f"score model {name!r} has no torch.nn.Module backbone 'net'; trainable models "
            "must expose one (docs/plugins.md, trainable score models)"
        )
    shape = getattr(model, "data_shape", None)
    if shape is None:
        raise DiffuseError(
            f"score model {name!r} has no data_shape; trainable models must set it from "
            "their 'shape' config field (docs/plugins.md, trainable score models)"
        )
    if tuple(shape) != tuple(dataset.shape):
        raise DiffuseError(
            f"score model {name!r} is built for data of shape {list(shape)} but data "
            f"{config['data']['name']!r} has shape {list(dataset.shape)}; drop the model's "
            "shape setting (training fills it from the data) or use matching data"
        )
