"""The resolved configuration of a fresh training run: each component's type and fields,
as the checkpoint records it (implementations by installed name, never by import path)."""

from __future__ import annotations

from typing import Any

from diffuse_engine.components.builder import Builder
from diffuse_engine.components.memory_data import MEMORY_TYPE, MemoryData
from diffuse_engine.components.normalise import fit_normaliser, normalised_std
from diffuse_engine.core.errors import DiffuseError
from diffuse_engine.core.trust import is_import_path
from diffuse_engine.training.settings import TrainSettings, model_kind


def check_task_loss(settings: TrainSettings, loss_cls: type) -> None:
    """A classifier trains with a classifier loss (``for_classifiers``), a score model
    with a score-matching loss."""
    if settings.task == "classifier" and not getattr(loss_cls, "for_classifiers", False):
        raise DiffuseError(
            f"task 'classifier' trains with a classifier loss (cross_entropy), not loss "
            f"{settings.loss!r}; pass --loss cross_entropy"
        )
    if settings.task == "score" and getattr(loss_cls, "for_classifiers", False):
        raise DiffuseError(
            f"loss {settings.loss!r} trains classifiers; use --task classifier, or a "
            "score-matching loss (dsm, ddpm, smld, ism, ssm)"
        )


def lr_horizon(settings: TrainSettings) -> int | None:
    """The recorded end of a cosine decay: ``lr_horizon``, else this first run's
    ``steps`` (so a resumed run, with whatever ``steps``, keeps the schedule it began)."""
    if settings.lr_schedule == "cosine" and settings.lr_horizon is None:
        return settings.steps
    return settings.lr_horizon


def resolve_config(
    builder: Builder,
    settings: TrainSettings,
    overrides: dict[str, Any],
    dataset: MemoryData | None = None,
) -> dict[str, Any]:
    """The full resolved configuration of a fresh run: each component's type and fields,
    and the data normalisation (``normalise``, see :mod:`diffuse_engine.components.normalise`).

    ``dataset``: in-memory data, recorded by what they look like instead of an entry."""
    names = {
        "data": settings.data,
        "sde": settings.sde,
        "score": settings.model,
        "loss": settings.loss,
    }
    if dataset is not None:
        del names["data"]
    # the trained model's kind: a score model, or a classifier (task = "classifier")
    kinds = {**{k: k for k in names}, "score": model_kind(settings)}
    # the classes only: a required field (the file dataset's path) may come from overrides
    chosen = {k: builder.implementation(kinds[k], n) for k, n in names.items()}
    routed = builder.route_overrides(chosen, overrides)
    score_cls = chosen["score"]
    check_task_loss(settings, chosen["loss"])
    if not getattr(score_cls, "needs_training", False):
        trainable = [
            n
            for n in builder.catalogue.names(kinds["score"])
            if builder.catalogue.get(kinds["score"], n).needs_training
        ]
        raise DiffuseError(
            f"score model {settings.model!r} ({score_cls.name}) is not trainable;"
            f" choose one of: {', '.join(trainable) or '(none installed)'}"
        )
    if dataset is None:
        data_cls, data_cfg = builder.resolve("data", names["data"], **routed["data"])
        dataset = data_cls(data_cfg)
    norm = fit_normaliser(
        settings.normalise,
        dataset,
        seed=settings.seed,
        mean=settings.data_mean,
        scale=settings.data_scale,
    )
    fields = score_cls.Config.model_fields
    entry_fields = builder.registry.entry(kinds["score"], names["score"]).fields
    if "sigma_data" in fields and "sigma_data" not in routed["score"]:
        if "sigma_data" not in entry_fields:  # the preconditioner follows the normalised data
            routed["score"]["sigma_data"] = normalised_std(norm, dataset, settings.seed)
    if "shape" in fields and "shape" not in routed["score"]:
        routed["score"]["shape"] = list(dataset.shape)
    if "init_seed" in fields and "init_seed" not in routed["score"]:
        entry = builder.registry.entry(kinds["score"], names["score"])
        if "init_seed" not in entry.fields:
            routed["score"]["init_seed"] = settings.seed
    if kinds["score"] == "classifier" and "num_classes" not in routed["score"]:
        if getattr(dataset, "num_classes", None) is None:
            raise DiffuseError(
                f"task 'classifier' needs labelled data; dataset {settings.data!r} has no "
                "labels (use gmm, digits, an .npz with labels or class sub-folders)"
            )
        routed["score"]["num_classes"] = dataset.num_classes
    config: dict[str, Any] = {"train": settings.model_dump(mode="json")}
    config["train"]["lr_horizon"] = lr_horizon(settings)
    if isinstance(dataset, MemoryData):
        config["train"]["data"] = MEMORY_TYPE
        config["data"] = dataset.record()
    for kind, name in names.items():
        cls, cfg = builder.resolve(kinds[kind], name, **routed[kind])
        typ = builder.registry.entry(kinds[kind], name).type
        if isinstance(typ, str) and is_import_path(typ):  # checkpoints name installed code
            raise DiffuseError(
                f"{kind} {name!r} is imported from {typ!r}; training records "
                "implementations by installed name so its checkpoints load "
                "anywhere: install it as a plugin to train with it"
            )
        config[kind] = {"name": name, "type": cls.name, **cfg.model_dump(mode="json")}
    config["normalise"] = norm.record()
    return config
