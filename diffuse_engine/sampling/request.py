"""A sampling call, checked and built: components, condition, guidance and prior noise.

:func:`build_job` is what ``Engine.sampling`` runs before the loop: it resolves the
entries with the call's overrides, builds the SDE, solver, score model, guidance method
and classifier, checks that they fit together, and validates every argument, so a bad
call fails with one line before any sampling starts.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from diffuse_engine.components.builder import Builder
from diffuse_engine.components.guidance import check_cond, is_conditional
from diffuse_engine.components.score import ScoreModel
from diffuse_engine.components.sde import SDE
from diffuse_engine.core.distributed import shard_size_for
from diffuse_engine.core.errors import DiffuseError
from diffuse_engine.core.memory import check_fits
from diffuse_engine.sampling.loop import SamplingJob

#: the SDE of a call that names none and whose score model brings none
DEFAULT_SDE = "vp"
#: tensors of a shard's size a solver holds at once (state, score, noise, history)
WORKING_COPIES = 4


def check_seed(seed) -> int:
    """``seed`` as an int in ``[0, 2**63)``."""
    try:
        seed = operator.index(seed)
    except TypeError:
        raise DiffuseError(f"seed must be an integer, not {seed!r}") from None
    if not 0 <= seed < 2**63:
        raise DiffuseError(f"seed must be in [0, 2**63), not {seed}")
    return seed


#: ``prior=`` choices: where sampling starts (:func:`prior_moments`)
PRIORS = ("auto", "data", "sde")


def prior_moments(
    prior: str,
    score_obj: Any,
    shape: tuple[int, ...],
    noise: Tensor | None,
    conditional: bool = False,
) -> tuple[Tensor, Tensor] | None:
    """The data moments sampling starts from (``SamplingJob.data_prior``), or ``None``
    for the SDE's own prior. ``"data"``: the Gaussian with ``p_T``'s mean and variance
    (:meth:`~diffuse_engine.components.sde.SDE.data_prior`), which needs
    a score model that knows its data's moments (``data_moments()``); ``"sde"``: the
    SDE's prior, as the reference code samples; ``"auto"``: ``"data"`` when the model
    knows the moments and the call is unconditional, else ``"sde"``. ``noise=`` is the
    start itself. The moments are the unconditional data's: a ``cond`` / ``guidance``
    call (``conditional``) starts from the SDE's prior (a label's mode is not centred
    where all the data are: on a ring of std 20 the data prior doubled one mode's std
    error), and particle methods draw their extra particles from the SDE's prior."""
    if prior not in PRIORS:
        raise DiffuseError(f"unknown prior {prior!r}; choices: {', '.join(PRIORS)}")
    if noise is not None:
        if prior == "data":
            raise DiffuseError("noise= is the prior sample itself: leave prior= at 'auto'")
        return None
    if prior == "data" and conditional:
        raise DiffuseError(
            "prior='data' is the unconditional data's moments; a call with cond= or "
            "guidance= starts from the SDE's prior: use prior='sde' or 'auto'"
        )
    if prior == "sde" or conditional:
        return None
    found = getattr(score_obj, "data_moments", None)
    moments = found() if callable(found) else None
    if moments is None:
        if prior == "data":
            raise DiffuseError(
                f"prior='data' needs a score model that knows its data's mean and variance "
                f"(data_moments()); {type(score_obj).__name__} does not: use prior='sde'"
            )
        return None
    mean, var = moments
    for name, v in (("mean", mean), ("variance", var)):
        if not isinstance(v, Tensor) or not _broadcasts(v.shape, shape[1:]):
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise DiffuseError(
                f"the score model's data {name} has shape {got}; it must broadcast to the "
                f"samples' {tuple(shape[1:])}"
            )
    if not bool(torch.isfinite(mean).all() & torch.isfinite(var).all() & (var >= 0).all()):
        raise DiffuseError("the score model's data moments must be finite, with variance >= 0")
    return mean, var


def _broadcasts(shape, to) -> bool:
    try:
        return torch.broadcast_shapes(shape, to) == tuple(to)
    except RuntimeError:
        return False


def check_shape(shape, data_shape, dtype) -> tuple[int, ...]:
    """``shape`` as ``(n, *dims)`` of positive ints matching the score's data shape."""
    try:
        out = tuple(operator.index(s) for s in shape)
    except TypeError:
        raise DiffuseError(f"shape must be (n, *dims) of integers, not {shape!r}") from None
    if len(out) < 2 or min(out) < 1:
        raise DiffuseError(f"shape must be (n, *dims) with n >= 1 and dims >= 1, not {out}")
    if data_shape is not None and tuple(out[1:]) != tuple(data_shape):
        raise DiffuseError(
            f"shape {out}: this score model's data are {tuple(data_shape)}; "
            f"use shape=(n, {', '.join(map(str, data_shape))}) or shape=n"
        )
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise DiffuseError(f"dtype must be a floating-point torch dtype, not {dtype!r}")
    return out


def check_memory(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, shard_size: int
) -> None:
    """Refuse, before any work, samples that cannot fit: the result is one tensor of
    ``shape`` on ``device``, and each shard works on a few tensors of its size."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_sample = math.prod(shape[1:]) * itemsize
    working = WORKING_COPIES * min(shape[0], shard_size) * per_sample
    check_fits(
        shape[0] * per_sample + working,
        device,
        f"{shape[0]} samples of shape {tuple(shape[1:])} ({str(dtype)[6:]})",
        "sample fewer at a time (n), or write them in parts",
    )


def check_noise(noise: Any, shape: tuple[int, ...]) -> Tensor:
    """``noise=``: a finite floating tensor of exactly the samples' shape."""
    if not isinstance(noise, Tensor) or not noise.is_floating_point():
        got = f"{noise.dtype} tensor" if isinstance(noise, Tensor) else type(noise).__name__
        raise DiffuseError(f"noise must be a floating-point tensor of shape {shape}, not {got}")
    if tuple(noise.shape) != shape:
        raise DiffuseError(f"noise has shape {tuple(noise.shape)}; the samples are {shape}")
    if not bool(torch.isfinite(noise).all()):
        raise DiffuseError("noise holds NaN/Inf; pass a finite prior sample x_T")
    return noise


def describe_cond(cond: Mapping[str, Any]) -> dict[str, Any]:
    """What ``config.json`` records of a condition: shapes, and the labels' counts."""
    out: dict[str, Any] = {}
    for key, value in cond.items():
        if isinstance(value, Tensor):
            item: dict[str, Any] = {"shape": list(value.shape), "dtype": str(value.dtype)[6:]}
            if key == "label" and not value.is_floating_point():
                labels, counts = torch.unique(value.cpu(), return_counts=True)
                item["counts"] = dict(zip(labels.tolist(), counts.tolist(), strict=True))
            out[key] = item
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[key] = value
        else:
            out[key] = type(value).__name__
    return out


def _guidance_name(builder: Builder, guidance: str | None, cond) -> str | None:
    if guidance is not None:
        if not isinstance(guidance, str):
            raise DiffuseError(f"guidance must be a registry name, not {type(guidance).__name__}")
        return guidance
    if cond is None:
        return None
    if isinstance(cond, Mapping) and "label" in cond:
        return "conditional"
    keys = ", ".join(map(str, cond)) if isinstance(cond, Mapping) else type(cond).__name__
    names = sorted(
        set(builder.registry.names("guidance")) | set(builder.catalogue.names("guidance"))
    )
    raise DiffuseError(f"cond ({keys}) needs guidance=, one of: {', '.join(names)}")


def _sde_choice(b: Builder, sde: str | None, score: Any, overrides: Mapping[str, Any]):
    """``(sde name, spec)`` of the call. ``sde=None`` takes the score model's own SDE: a
    ready model's (``spec`` is that SDE object), or the ``{"type": ..., **fields}`` an
    entry's class derives from its config (``ScoreModel.own_sde``, e.g. a diffusers model
    and its scheduler); otherwise ``vp``."""
    if sde is not None:
        return sde, None
    if isinstance(score, ScoreModel):
        return type(score.sde).name, score.sde
    if isinstance(score, str):
        cls = b.implementation("score", score)
        fields = {
            k.removeprefix("score."): v
            for k, v in {**b.set_overrides, **overrides}.items()
            if k.removeprefix("score.") in cls.Config.model_fields
            and ("." not in k or k.startswith("score."))
        }
        spec = cls.own_sde(b.resolve("score", score, **fields)[1])
        if spec is not None:
            return spec["type"], dict(spec)
    return DEFAULT_SDE, None


def _budget_in_model_calls(b: Builder, solver: str, routed, solver_obj, guidance_obj):
    """The solver again with ``nfe // k`` guided evaluations when the guidance calls the
    model ``k > 1`` times per evaluation (classifier-free guidance), so ``nfe = N``
    spends at most ``N`` model calls, the count the run reports."""
    k = guidance_obj.calls_per_evaluation()
    nfe = getattr(solver_obj.config, "nfe", None)
    if k == 1 or nfe is None:
        return solver_obj
    if nfe < k:
        raise DiffuseError(
            f"nfe = {nfe} is below one evaluation of guidance {guidance_obj.name!r}, "
            f"which calls the model {k} times per evaluation; give nfe >= {k}"
        )
    return b.build("solver", solver, **{**routed["solver"], "nfe": nfe // k})


def sde_and_solver(
    builder: Builder,
    *,
    score: Any,
    sde: str | None,
    solver: str,
    cond: Mapping[str, Any] | None = None,
    guidance: str | None = None,
    classifier: Any = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[str, dict[str, Any], dict[str, dict[str, Any]], SDE, Any, Any]:
    """The call's SDE and solver, built with the overrides routed to the chosen entries
    and checked against each other (and against the guidance's solvers): ``(sde name,
    chosen classes, routed overrides, SDE, solver, guidance or None)``, the guidance
    built once here and reused by :func:`build_job`. These are :func:`build_job`'s
    checks that need no score model, so a run makes them before it touches disk (a model
    may still have to be trained)."""
    b = builder
    guidance = _guidance_name(b, guidance, cond)
    if guidance is not None and cond is None:
        raise DiffuseError(f"guidance {guidance!r} needs cond= (for example cond={{'label': y}})")
    sde, sde_spec = _sde_choice(b, sde, score, overrides or {})
    chosen = {
        "sde": b.implementation("sde", sde) if sde_spec is None else b.catalogue.get("sde", sde),
        "solver": b.resolve("solver", solver)[0],
        "score": b.score_class(score),
    }
    if guidance is not None:
        chosen["guidance"] = b.implementation("guidance", guidance)
    if isinstance(classifier, str):
        chosen["classifier"] = b.implementation("classifier", classifier)
    routed = b.route_overrides(chosen, overrides or {})
    if isinstance(sde_spec, SDE):  # a ready model's own SDE
        if routed["sde"]:
            raise DiffuseError("sde fields cannot change the SDE a trained model is bound to")
        sde_obj = sde_spec
    elif sde_spec is not None:
        sde_obj = b.build_recorded("sde", {**sde_spec, **routed["sde"]})
    else:
        sde_obj = b.build("sde", sde, **routed["sde"])
    solver_obj = b.build("solver", solver, **routed["solver"])
    guidance_obj = None
    if guidance is not None:
        guidance_obj = b.build("guidance", guidance, **routed["guidance"])
        solver_obj = _budget_in_model_calls(b, solver, routed, solver_obj, guidance_obj)
    solver_obj.check(sde_obj)
    if guidance_obj is not None:  # its solver and cond-key checks; the rest needs the model
        guidance_obj.check_solver(solver_obj)
        if isinstance(cond, Mapping):
            guidance_obj.check_keys(cond)
    return sde, chosen, routed, sde_obj, solver_obj, guidance_obj


def build_job(
    builder: Builder,
    *,
    score: Any,
    sde: str | None,
    solver: str,
    shape: int | Sequence[int],
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
    shard_size: int,
    check_every: int,
    cond: Mapping[str, Any] | None = None,
    guidance: str | None = None,
    classifier: Any = None,
    noise: Tensor | None = None,
    overrides: Mapping[str, Any] | None = None,
    prior: str = "auto",
) -> tuple[SamplingJob, dict[str, Any]]:
    """The checked :class:`SamplingJob` of one call and its resolved config (for
    ``config.json``); ``overrides`` are registry fields of the chosen entries."""
    b = builder
    seed = check_seed(seed)
    guidance = _guidance_name(b, guidance, cond)
    sde, chosen, routed, sde_obj, solver_obj, guidance_obj = sde_and_solver(
        b, score=score, sde=sde, solver=solver, cond=cond, guidance=guidance,
        classifier=classifier, overrides=overrides,
    )  # fmt: skip
    score_obj = b.bind_score(score, sde_obj, **routed["score"])
    data_shape = getattr(score_obj, "data_shape", None)
    if isinstance(shape, int):
        if data_shape is None:
            raise DiffuseError(
                "shape=int needs a score model that knows its data shape; pass shape=(n, *dims)"
            )
        shape = (shape, *data_shape)
    shape = check_shape(shape, data_shape, dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shard_size = shard_size_for(shard_size, shape[1:], itemsize)  # a byte budget per shard
    check_memory(shape, dtype, device, shard_size)
    if noise is not None:
        noise = check_noise(noise, shape)
    conditional = guidance is not None or cond is not None
    moments = prior_moments(prior, score_obj, shape, noise, conditional)
    data_prior = None
    if moments is not None:  # computed once; each shard draws N(0, 1) and maps it
        loc, scale = sde_obj.data_prior(*moments)
        data_prior = (loc.to(device=device, dtype=dtype), scale.to(device=device, dtype=dtype))
    classifier_obj = None
    if guidance_obj is not None:  # built and checked against the solver above
        if isinstance(classifier, str):
            classifier_obj = b.build("classifier", classifier, sde=sde_obj, **routed["classifier"])
        elif classifier is not None and not callable(classifier):
            raise DiffuseError(
                f"classifier must be a callable logits(x, t) -> (B, K) or a registry name, "
                f"not {type(classifier).__name__}"
            )
        else:
            classifier_obj = classifier
        guidance_obj.check(solver_obj, sde_obj, score_obj, classifier_obj)
        cond = guidance_obj.validate(check_cond(cond, shape[0], guidance_obj.shared), shape)
        labels = cond.get("label")
        num_classes = getattr(score_obj, "num_classes", None)
        if labels is not None and num_classes and int(labels.max()) >= num_classes:
            raise DiffuseError(
                f"cond['label'] has label {int(labels.max())}; this score model knows "
                f"{num_classes} classes (0 .. {num_classes - 1})"
            )
    elif classifier is not None:
        raise DiffuseError("classifier= is used by guidance='classifier'; pass guidance= too")
    if hasattr(score_obj, "to"):
        score_obj = score_obj.to(device)
    if hasattr(classifier_obj, "to"):
        classifier_obj = classifier_obj.to(device)
    score_name = score if isinstance(score, str) else type(score_obj).name
    config = {
        "sde": {"name": sde, "type": chosen["sde"].name, **sde_obj.config.model_dump()},
        "solver": {"name": solver, "type": chosen["solver"].name, **solver_obj.config.model_dump()},
        "score": {"name": score_name, **score_obj.config.model_dump(mode="json")},
        "shape": list(shape),
        "seed": seed,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "shard_size": shard_size,
    }
    if guidance_obj is not None:
        config["guidance"] = {
            "name": guidance,
            "type": guidance_obj.name,
            **guidance_obj.config.model_dump(mode="json"),
            # the solver's nfe counts guided evaluations: each is this many model calls
            "calls_per_evaluation": guidance_obj.calls_per_evaluation(),
        }
        config["cond"] = describe_cond(cond)
        if classifier is not None:
            config["classifier"] = classifier if isinstance(classifier, str) else "callable"
    if noise is not None:
        config["noise"] = "given"
    else:
        config["prior"] = "sde" if moments is None else "data"
    names = {"sde": sde, "solver": solver, "score": score_name}
    job = SamplingJob(
        sde_obj, solver_obj, score_obj, shape, seed, device, dtype, shard_size, names,
        check_every, cond, guidance_obj, classifier_obj, noise, data_prior,
    )  # fmt: skip
    if (
        guidance_obj is None
        and is_conditional(score_obj)
        and getattr(score_obj, "requires_cond", False)
    ):
        raise DiffuseError(
            f"score model {score_name!r} is conditional and was trained without label "
            "dropout, so it has no unconditional score: pass cond={'label': y}"
        )
    return job, config
