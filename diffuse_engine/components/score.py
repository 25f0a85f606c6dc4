"""Score models and output parameterisations.

A score model maps ``(x, t)`` with ``x`` of shape ``(B, *dims)`` and ``t`` of shape
``(B,)`` to ``grad_x log p_t(x)``, same shape and dtype as ``x``. Networks may instead
predict the noise (``epsilon``) or the clean data (``x0``); :func:`to_score` converts
through the SDE's Gaussian kernel ``x_t = a x_0 + s z`` (Song et al. 2021, App. C;
Ho et al. 2020; Karras et al. 2022 for the x0 form):

* score:   ``s``
* epsilon: ``s = -eps_hat / std``
* x0:      ``s = (a * x0_hat - x) / std^2``
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal

import torch
from torch import Tensor

from diffuse_engine.components.sde import SDE, bcast
from diffuse_engine.core.component import Component, ComponentConfig
from diffuse_engine.core.errors import DiffuseError

Parameterisation = Literal["score", "epsilon", "x0"]
#: what a kernel-based solver predicts from the score: clean data or the noise
Prediction = Literal["data", "noise"]
ScoreFn = Callable[[Tensor, Tensor], Tensor]


def to_score(
    output: Tensor, x: Tensor, t: Tensor, sde: SDE, parameterisation: Parameterisation
) -> Tensor:
    """Convert a model's ``output`` in ``parameterisation`` to a score at ``(x, t)``."""
    if parameterisation == "score":
        return output
    a, s = sde.marginal(t)
    if parameterisation == "epsilon":
        return -output / bcast(s, x)
    if parameterisation == "x0":
        return (bcast(a, x) * output - x) / bcast(s**2, x)
    raise ValueError(f"unknown parameterisation {parameterisation!r}; choices: score, epsilon, x0")


def kernel_prediction(
    score: ScoreFn, x: Tensor, t: float, a: float, s: float, prediction: Prediction
) -> Tensor:
    """``x0_hat`` (``"data"``, Tweedie's formula ``(x + s^2 score) / a``) or ``eps_hat``
    (``"noise"``, ``-s score``) at ``(x, t)`` from one score call; ``a``, ``s`` are the
    kernel's coefficients at ``t`` as Python floats."""
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
    sc = score(x, tt)
    if prediction == "data":
        return (x + (s * s) * sc) / a
    return sc * (-s)


class ScoreConfig(ComponentConfig):
    """Fields every score model accepts."""

    parameterisation: Parameterisation = "score"


class ScoreModel(Component):
    """Base class of score models; subclasses implement :meth:`forward`.

    ``forward`` returns the raw output in ``config.parameterisation``; calling the
    model returns the score. The model is bound to one SDE, whose kernel the
    conversion uses.
    """

    kind: ClassVar[str] = "score"
    Config: ClassVar[type[ComponentConfig]] = ScoreConfig
    #: True for models that must be trained before they can sample (issue: training).
    needs_training: ClassVar[bool] = False

    def __init__(self, config: ScoreConfig | None = None, *, sde: SDE, **fields):
        super().__init__(config, **fields)
        self.sde = sde

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """Raw model output at ``(x, t)`` in this model's parameterisation."""
        raise NotImplementedError

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        out = self.forward(x, t)
        return to_score(out, x, t, self.sde, self.config.parameterisation)


class CallableScore(ScoreModel):
    """Wraps any ``fn(x, t)``; ``Engine.sample(score=fn, parameterisation=...)`` uses it."""

    name: ClassVar[str] = "callable"

    def __init__(self, fn: ScoreFn, config: ScoreConfig | None = None, *, sde: SDE, **fields):
        super().__init__(config, sde=sde, **fields)
        self.fn = fn

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.fn(x, t)


class ScoreBoundary:
    """Checks a score function's output once per call (shape and dtype, no device
    sync) and counts evaluations. Wraps every score the engine hands a solver."""

    def __init__(self, fn, name: str):
        self.fn = fn
        self.name = name
        self.calls = 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        out = self.fn(x, t)
        if (
            not isinstance(out, Tensor)
            or out.shape != x.shape
            or out.dtype != x.dtype
            or out.device != x.device
        ):
            got = (
                f"shape {tuple(out.shape)} dtype {out.dtype} on {out.device}"
                if isinstance(out, Tensor)
                else type(out).__name__
            )
            raise DiffuseError(
                f"score model {self.name!r} returned {got}; expected a tensor "
                f"of the input's shape {tuple(x.shape)} and dtype {x.dtype} "
                f"on {x.device}"
            )
        return out
