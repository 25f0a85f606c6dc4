"""Loss contract: a training objective for score models."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from diffuse_engine.core.component import Component, ComponentConfig


class Loss(Component):
    """Base class of losses (registry kind ``loss``).

    ``loss(model, x0, generator, cond=None)`` returns a scalar tensor to minimise, where
    ``model`` is a :class:`~diffuse_engine.components.score.ScoreModel` bound to the SDE
    ``self.sde`` and ``x0`` a batch of data ``(B, *dims)``. For class-conditional
    training ``cond`` is ``{"label": (B,) int64}`` and the loss calls ``model(x, t,
    cond)``; a model trained with label dropout replaces some labels by its null label
    itself (``model.drop_labels(cond, generator)``).
    """

    kind: ClassVar[str] = "loss"
    Config: ClassVar[type[ComponentConfig]] = ComponentConfig

    def __init__(self, config: ComponentConfig | None = None, *, sde, **fields):
        super().__init__(config, **fields)
        self.sde = sde

    def __call__(self, model, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError
