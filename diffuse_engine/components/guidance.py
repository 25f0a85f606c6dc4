"""Guidance: how a condition steers sampling, as plugins of their own kind.

``engine.sample(score=fn, ..., cond={...}, guidance="NAME", **fields)`` samples
``p(x | cond)``. A guidance method turns the model and the condition into what the
solver runs, so solvers stay unaware of conditioning. Per shard of samples,
:meth:`Guidance.bind` returns a :class:`Guided` with any of:

* ``score(x, t)``: the guided score the solver calls (classifier-free guidance,
  classifier guidance, DPS, PiGDM change the score);
* ``transform(x, step, t)``: applied to the state after each solver step (replacement
  and RePaint project the observed part); only solvers with
  ``Solver.supports_transform`` apply it, the engine refuses the others;
* ``finish(x)``: applied once to the final samples;
* ``run(solver, sde, x_T, generator, callback)``: the method owns the whole loop
  (particle methods that resample), using the solver only for its time grid.

The model a method receives is conditional-aware: ``score(x, t, cond)`` returns
``grad_x log p_t(x | cond)`` and ``score(x, t, None)`` the unconditional score (see
:class:`~diffuse_engine.components.score.ScoreBoundary`, which refuses a condition for a
plain model). ``cond`` is a dict: per-sample tensors (first dimension ``n``) are
sharded with the samples, exactly like them, so sharded and ``--nproc`` runs stay
bit-identical; keys a method lists in :attr:`Guidance.shared` (an observation operator,
a noise level) are given whole to every shard.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor

from diffuse_engine.core.component import Component, ComponentConfig
from diffuse_engine.core.errors import DiffuseError, IncompatibleError

#: ``transform(x, step, t_next) -> x`` after solver step ``step`` (1-based) ending at ``t_next``
StepTransform = Callable[[Tensor, int, float], Tensor]


class GuidanceConfig(ComponentConfig):
    """Fields every guidance method accepts."""

    scale: float = Field(1.0, ge=0, description="guidance strength (0: no guidance)")


@dataclass
class Guided:
    """What one shard samples with; see the module docstring."""

    score: Callable[[Tensor, Tensor], Tensor]
    transform: StepTransform | None = None
    finish: Callable[[Tensor], Tensor] | None = None
    run: Callable[..., Tensor] | None = None


class Guidance(Component):
    """Base class of guidance methods.

    Class attributes say what a method needs, so the engine checks a call before any
    sampling: ``requires`` (keys ``cond`` must hold), ``shared`` (keys given whole to
    every shard), ``needs_conditional_score`` (the model must take ``cond``),
    ``needs_unconditional_score`` (it calls ``score(x, t, None)``, which a conditional
    model trained without label dropout lacks), ``needs_classifier`` (``classifier=``
    must be passed), ``projects`` (it returns a
    ``transform``, so the solver must support one) and ``solvers`` (implementation names
    it works with; ``None`` for any).
    """

    kind: ClassVar[str] = "guidance"
    Config: ClassVar[type[ComponentConfig]] = GuidanceConfig
    requires: ClassVar[tuple[str, ...]] = ()
    shared: ClassVar[tuple[str, ...]] = ()
    needs_conditional_score: ClassVar[bool] = False
    needs_unconditional_score: ClassVar[bool] = False
    needs_classifier: ClassVar[bool] = False
    projects: ClassVar[bool] = False
    solvers: ClassVar[tuple[str, ...] | None] = None

    def calls_per_evaluation(self) -> int:
        """Score-model calls per evaluation of the guided score. A budget ``nfe = N``
        counts model calls (as the run's reported ``nfe`` does), so the solver is given
        ``N // calls`` guided evaluations."""
        return 1

    def check_solver(self, solver) -> None:
        """Raise :class:`IncompatibleError` if this method cannot run with ``solver``: the
        part of :meth:`check` that needs no score model, so a run makes it before it
        touches disk."""
        if self.solvers is not None and solver.name not in self.solvers:
            raise IncompatibleError(
                f"guidance {self.name!r} works with solver(s) {', '.join(self.solvers)}, "
                f"not {solver.name!r}"
            )
        if self.projects and not getattr(solver, "supports_transform", False):
            cat = getattr(solver, "catalogue", None)
            able = [
                n
                for n in (cat.names("solver") if cat is not None else [])
                if getattr(cat.get("solver", n), "supports_transform", False)
            ]
            raise IncompatibleError(
                f"guidance {self.name!r} projects the state after each step; solver "
                f"{solver.name!r} cannot (it integrates internally); solvers that can: "
                f"{', '.join(able) or 'none installed'}"
            )

    def check(self, solver, sde, score, classifier) -> None:
        """Raise :class:`IncompatibleError` if this method cannot run with these."""
        self.check_solver(solver)
        if self.needs_conditional_score and not is_conditional(score):
            raise IncompatibleError(
                f"guidance {self.name!r} needs a conditional score model fn(x, t, cond); "
                f"{type(score).__name__} takes no condition"
            )
        if self.needs_unconditional_score and getattr(score, "requires_cond", False):
            raise IncompatibleError(
                f"guidance {self.name!r} needs the unconditional score s(x, t, None); this "
                "model was trained without label dropout and has none (train with "
                "label_dropout > 0, or use guidance='conditional')"
            )
        if self.needs_classifier and classifier is None:
            raise IncompatibleError(
                f"guidance {self.name!r} needs classifier= (logits(x, t) -> (B, K), or a "
                "classifier registry name)"
            )

    def validate(self, cond: Mapping[str, Any], shape: tuple[int, ...]) -> dict[str, Any]:
        """Check ``cond`` for samples of ``shape`` ``(n, *dims)`` before sampling; return
        it (possibly normalised). Errors are one line naming the key, what it was and
        what is allowed."""
        self.check_keys(cond)
        return dict(cond)

    def check_keys(self, cond: Mapping[str, Any]) -> None:
        """Raise :class:`DiffuseError` if ``cond`` lacks a key this method ``requires``:
        the part of :meth:`validate` that needs neither the samples' shape nor the score
        model, so a run makes it before it touches disk."""
        missing = [k for k in self.requires if k not in cond]
        if missing:
            raise DiffuseError(
                f"guidance {self.name!r} needs cond key(s) {', '.join(missing)}; "
                f"got {', '.join(cond) or 'none'}"
            )

    def bind(
        self,
        score: Callable[..., Tensor],
        sde,
        cond: dict[str, Any],
        *,
        classifier: Callable[[Tensor, Tensor], Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> Guided:
        """What the solver samples one shard with; ``cond`` holds this shard's rows."""
        raise NotImplementedError


# ---- conditional score models -----------------------------------------------------------
def is_conditional(score: Any) -> bool:
    """Whether ``score`` takes a condition: a model with ``conditional = True``, or a
    callable with a parameter named ``cond`` or a third positional parameter without a
    default (``fn(x, t, temperature=1.0)`` is a plain score with an option)."""
    flag = getattr(score, "conditional", None)
    if flag is not None:
        return bool(flag)
    try:
        params = list(inspect.signature(score).parameters.values())
    except (TypeError, ValueError):
        return False
    required = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    return len(required) >= 3 or any(p.name == "cond" for p in params)


# ---- the condition ----------------------------------------------------------------------
def check_cond(cond: Any, n: int, shared: tuple[str, ...]) -> dict[str, Any]:
    """``cond`` as a dict; per-sample tensors must have first dimension ``n``."""
    if not isinstance(cond, Mapping) or not all(isinstance(k, str) for k in cond):
        raise DiffuseError(
            f"cond must be a dict of named tensors like {{'label': y}}, not {type(cond).__name__}"
        )
    for key, value in cond.items():
        if key in shared or not isinstance(value, Tensor):
            continue
        if value.dim() == 0 or value.shape[0] != n:
            raise DiffuseError(
                f"cond[{key!r}] has shape {tuple(value.shape)}: per-sample values need "
                f"first dimension n = {n} (one row per sample)"
            )
    return dict(cond)


def shard_cond(
    cond: dict[str, Any], start: int, stop: int, shared: tuple[str, ...], device: torch.device
) -> dict[str, Any]:
    """Rows ``start:stop`` of every per-sample tensor, on ``device``; the rest as given."""
    out = {}
    for key, value in cond.items():
        if isinstance(value, Tensor):
            value = value if key in shared else value[start:stop]
            value = value.to(device)
        out[key] = value
    return out


def check_labels(labels: Any, n: int, num_classes: int | None, key: str = "label") -> Tensor:
    """A ``(n,)`` integer tensor of class labels in ``[0, num_classes)``."""
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dim() != 1:
        got = (
            f"{labels.dtype} of shape {tuple(labels.shape)}"
            if isinstance(labels, Tensor)
            else type(labels).__name__
        )
        raise DiffuseError(f"cond[{key!r}] must be an (n,) integer tensor of labels, not {got}")
    if labels.shape[0] != n:
        raise DiffuseError(f"cond[{key!r}] has {labels.shape[0]} labels for n = {n} samples")
    if labels.numel() and int(labels.min()) < 0:
        raise DiffuseError(f"cond[{key!r}] has negative labels; labels are 0 .. K - 1")
    if num_classes is not None and labels.numel() and int(labels.max()) >= num_classes:
        raise DiffuseError(
            f"cond[{key!r}] has label {int(labels.max())}; this model knows "
            f"{num_classes} classes (0 .. {num_classes - 1})"
        )
    return labels
