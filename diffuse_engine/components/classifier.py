"""Noise-conditional classifiers: ``logits(x, t) -> (B, K)``, ``log p_t(k | x)`` up to a
per-sample constant, for classifier guidance (Dhariwal & Nichol 2021; Song et al. 2021,
Sec. 5 and App. I). Bound to the SDE whose marginals ``p_t`` they classify.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from diffuse_engine.components.sde import SDE
from diffuse_engine.core.component import Component, ComponentConfig


class Classifier(Component):
    """Base class of noise-conditional classifiers; subclasses implement :meth:`logits`.

    ``num_classes`` is the number of classes ``K``; trainable classifiers set
    ``needs_training = True`` and expose ``net`` like trainable score models.
    """

    kind: ClassVar[str] = "classifier"
    Config: ClassVar[type[ComponentConfig]] = ComponentConfig
    needs_training: ClassVar[bool] = False
    num_classes: int = 0

    def __init__(self, config: ComponentConfig | None = None, *, sde: SDE, **fields):
        super().__init__(config, **fields)
        self.sde = sde

    def logits(self, x: Tensor, t: Tensor) -> Tensor:
        """``(B, K)`` unnormalised ``log p_t(k | x)`` at ``x`` ``(B, *dims)``, ``t`` ``(B,)``."""
        raise NotImplementedError

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        return self.logits(x, t)
