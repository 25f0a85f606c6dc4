"""``diffuse run``: sample with a preset, score the samples, write a run folder.

A run folder holds ``samples.pt`` (or ``.npz``), ``samples.png`` (samples beside the
data), ``metrics.json`` (per-mode weight, std and centre errors against the exact
mixture when one is known, score evaluations, seconds), ``config.json`` (the fully
resolved configuration) and ``status.json``.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffuse_engine.components.builder import Builder, SampleFn
from diffuse_engine.components.mixture import GaussianMixture, mode_statistics
from diffuse_engine.core.distributed import on_main
from diffuse_engine.core.errors import DiffuseError
from diffuse_engine.output.files import RunFolder, save_tensor, write_json
from diffuse_engine.output.plotting import plot_samples
from diffuse_engine.runs.fitted import write_fitted

#: ``train(plan, out, progress=...) -> score model``: trains a plan's model into ``out``
TrainFn = Callable[..., Any]

SAMPLE_FORMATS = ("pt", "npz")


@dataclass
class RunPlan:
    """A resolved run: the preset's choices with command-line and Python overrides."""

    preset: str
    sde: str
    solver: str
    score: str
    data: str | None
    n: int
    seed: int
    device: str
    overrides: dict[str, Any]
    train: str | None = None  # [train.NAME] used when the score model needs training
    label: int | None = None  # class-conditional run: every sample asks for this class
    guidance: str | None = None
    classifier: str | None = None
    prior: str = "auto"  # where sampling starts (Engine.sampling's prior=)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def plan_run(builder: Builder, preset: str = "default", **choices: Any) -> RunPlan:
    """Combine ``[run.PRESET]`` with ``choices`` (sde, solver, score, data, n, seed,
    device; ``None`` keeps the preset's value); other keys are field overrides."""
    run_fields = {
        k: choices.pop(k)
        for k in list(choices)
        if k
        in (
            "sde",
            "solver",
            "score",
            "data",
            "n",
            "seed",
            "device",
            "train",
            "label",
            "guidance",
            "classifier",
            "prior",
        )
    }
    p = builder.registry.preset(preset, {k: v for k, v in run_fields.items() if v is not None})
    overrides = {k: v for k, v in choices.items() if v is not None}
    # validate the overrides now, so a mistake never leaves a half-made run folder behind
    chosen = {k: builder.resolve(k, getattr(p, k))[0] for k in ("sde", "solver", "score")}
    for kind, fields in builder.route_overrides(chosen, overrides).items():
        builder.resolve(kind, getattr(p, kind), **fields)
    if p.prior == "data":  # refused now, before training or a run folder
        if p.label is not None or p.guidance is not None:
            raise DiffuseError(
                "prior 'data' is the unconditional data's moments; a conditional run "
                "(label, guidance) starts from the SDE's prior: use prior 'sde' or 'auto'"
            )
        if builder.needs_training(p.score):
            raise DiffuseError(
                f"prior 'data' needs a score model that knows its data's mean and variance; "
                f"score {p.score!r} is trained first, and trained networks record none "
                f"(training normalises their data): use prior 'sde' or 'auto'"
            )
        if _plan_score(builder, p, overrides).data_moments() is None:
            raise DiffuseError(
                f"prior 'data' needs a score model that knows its data's mean and variance; "
                f"score {p.score!r} does not: use prior 'sde' or 'auto'"
            )
    return RunPlan(
        preset,
        p.sde,
        p.solver,
        p.score,
        p.data,
        p.n,
        p.seed,
        p.device,
        overrides,
        p.train,
        p.label,
        p.guidance,
        p.classifier,
        p.prior,
    )


def _plan_score(builder: Builder, plan_or_preset, overrides: dict[str, Any]):
    """The score model a plan samples with (its entry with the plan's routed overrides
    and the engine-wide sets, as sampling builds it)."""
    p = plan_or_preset
    chosen = {k: builder.resolve(k, getattr(p, k))[0] for k in ("sde", "solver", "score")}
    routed = builder.route_overrides(chosen, overrides)
    sde = builder.build("sde", p.sde, **routed["sde"])
    return builder.build("score", p.score, sde=sde, **routed["score"])


def data_dims(builder: Builder, plan: RunPlan) -> int | None:
    """Numbers per sample the plan draws (the product of the data shape): the training
    data's shape when the plan trains its model first (``plan.data``, else its
    ``[train.NAME]`` table's), else the score model's ``data_shape`` (with the plan's
    overrides); ``None`` when neither says. ``diffuse run --nfe`` picks the
    best-at-budget entry for data of this size
    (:func:`~diffuse_engine.components.solver.best_at_budget`)."""
    if builder.needs_training(plan.score):
        data = plan.data or builder.registry.train_settings(plan.train or "default").data
        shape = None if data is None else getattr(builder.build("data", data), "shape", None)
    else:
        shape = getattr(_plan_score(builder, plan, plan.overrides), "data_shape", None)
    return None if shape is None else math.prod(shape)


def reference_mixture(builder: Builder, plan: RunPlan, score_model) -> GaussianMixture | None:
    """The exact law the samples should follow, if known (the score's or the data's)."""
    mix = getattr(score_model, "mixture", None)
    if mix is None and plan.data is not None:
        mix = getattr(builder.build("data", plan.data), "mixture", None)
    return mix


def execute_run(
    builder: Builder,
    plan: RunPlan,
    out: str | Path,
    *,
    sample: SampleFn,
    train: TrainFn,
    check: Callable[..., None] | None = None,
    overwrite: bool = False,
    progress: bool = False,
    sample_format: str = "pt",
) -> dict[str, Any]:
    """Sample per ``plan`` into run folder ``out``; return the metrics dict. ``sample``
    is ``Engine.sampling``; ``train`` trains the plan's model first when it needs it;
    ``check`` (``sampling.request.sde_and_solver``'s checks) refuses an SDE and solver
    that do not fit before the run folder is made."""
    if sample_format not in SAMPLE_FORMATS:
        raise DiffuseError(
            f"unknown sample format {sample_format!r}; choices: {', '.join(SAMPLE_FORMATS)}"
        )
    if check is not None:
        cond = conditioning(plan)
        check(
            score=plan.score,
            sde=plan.sde,
            solver=plan.solver,
            cond=cond.get("cond"),
            guidance=cond.get("guidance"),
            classifier=cond.get("classifier"),
            overrides=plan.overrides,
        )
    run_folder = RunFolder(out, overwrite)
    # under torchrun every rank trains / samples its part; rank 0 alone writes the folder
    with on_main(builder.dist, run_folder) as folder:
        if folder is not None:
            builder.hook.diffuse_run_start(
                run={"command": "run", "out": str(out), "config": plan.as_dict()}
            )
        score = plan.score
        if builder.needs_training(plan.score):  # train first, into the run folder
            score = train(plan, run_folder.path / "train", progress=progress)
        result = sample(
            score=score,
            sde=plan.sde,
            solver=plan.solver,
            shape=plan.n,
            seed=plan.seed,
            device=plan.device,
            progress=progress,
            prior=plan.prior,
            **conditioning(plan),
            **plan.overrides,
        )
        if folder is None:  # another rank: its shards are in rank 0's samples
            return {"nfe": result.nfe, "seconds": round(result.seconds, 4)}
        x = result.samples.cpu()
        mix = reference_mixture(builder, plan, result.score)
        if mix is not None and plan.label is not None:  # a class of the mixture: its mode
            mix = mode_of(mix, plan.label)
        metrics: dict[str, Any] = {
            "nfe": result.nfe,
            "seconds": round(result.seconds, 4),
            "samples_per_second": round(x.shape[0] / result.seconds, 1),
        }
        if result.setup_nfe:  # a fitted schedule's pilot, spent once for the whole run
            metrics["setup_nfe"] = result.setup_nfe
        reference = None
        if mix is not None:
            stats = mode_statistics(x, mix)
            gen = torch.Generator().manual_seed(plan.seed + 1)
            reference = mix.sample(x.shape[0], gen)
            floor = mode_statistics(reference, mix)
            metrics.update(stats)
            metrics["floor"] = {
                k: floor[k] for k in ("weight_tv", "weight_max", "std_error", "centre_error")
            }
        config = {
            "plan": plan.as_dict(),
            "resolved": result.config,
            "versions": {
                "diffuse_engine": _version(),
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if getattr(result.score, "trained_config", None) is not None:
            config["training"] = result.score.trained_config
        write_json(folder.path / "config.json", config)
        save_tensor(x, folder.path / f"samples.{sample_format}")
        title = f"{plan.sde} / {plan.solver}: {plan.n} samples, {result.nfe} score evaluations"
        plot_samples(x, folder.path / "samples.png", reference=reference, title=title)
        if result.fitted_fields is not None:  # keep the fit, so it is fitted once
            fitted = write_fitted(folder.path, result)  # None: the solver takes no times
            if fitted is not None:
                metrics["fitted_solver"] = fitted
        write_json(folder.path / "metrics.json", metrics)
    builder.hook.diffuse_run_end(
        run={"command": "run", "out": str(out), "config": plan.as_dict()}, metrics=metrics
    )
    return metrics


def conditioning(plan: RunPlan) -> dict[str, Any]:
    """The ``cond`` / ``guidance`` / ``classifier`` keywords of a class-conditional plan."""
    if plan.label is None:
        for key in ("guidance", "classifier"):
            if getattr(plan, key) is not None:
                raise DiffuseError(f"run preset {plan.preset!r}: {key} needs a label")
        return {}
    kw: dict[str, Any] = {"cond": {"label": torch.full((plan.n,), plan.label)}}
    if plan.guidance is not None:
        kw["guidance"] = plan.guidance
    if plan.classifier is not None:
        kw["classifier"] = plan.classifier
    return kw


def mode_of(mix: GaussianMixture, k: int) -> GaussianMixture | None:
    """Mode ``k`` of ``mix`` as a one-mode mixture (the exact law of class ``k``)."""
    if not 0 <= k < mix.weights.shape[0]:
        return None
    one = torch.ones_like(mix.weights[:1])
    return GaussianMixture(mix.means[k : k + 1], mix.stds[k : k + 1], one)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffuse-engine")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def default_out(plan: RunPlan) -> Path:
    """``runs/PRESET-SDE-SOLVER-YYYYmmdd-HHMMSS`` under the working directory."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{plan.preset}-{plan.sde}-{plan.solver}-{stamp}"
