"""Perturbation kernels that can be attached to an SDE by name.

Built-in SDEs carry their closed-form kernel in :meth:`SDE.marginal`. A kernel plugin
supplies ``marginal`` for SDEs that lack one (or replaces it), e.g. a kernel obtained
by integrating the moment ODEs of a linear SDE numerically. Select one in the registry
with ``[sde.NAME] kernel = "KERNEL"``.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from diffuse_engine.core.component import Component, ComponentConfig


class PerturbationKernel(Component):
    """Gaussian kernel ``x_t | x_0 ~ N(mean_coeff(t) x_0, std(t)^2 I)`` of an SDE."""

    kind: ClassVar[str] = "kernel"
    Config: ClassVar[type[ComponentConfig]] = ComponentConfig

    def __init__(self, config: ComponentConfig | None = None, *, sde, **fields):
        super().__init__(config, **fields)
        self.sde = sde

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean_coeff, std)`` at times ``t`` ``(B,)``, each ``(B,)``."""
        raise NotImplementedError
