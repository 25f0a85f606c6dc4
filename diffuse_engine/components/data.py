"""Dataset contract: a source of training data ``x_0``."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from diffuse_engine.components.mixture import GaussianMixture
from diffuse_engine.core.component import Component, ComponentConfig


class Dataset(Component):
    """Base class of datasets (registry kind ``data``).

    ``sample(n, generator)`` returns ``(n, *shape)`` float tensors; datasets with a
    known Gaussian-mixture law expose it as :attr:`mixture` so runs can score samples
    against it exactly. Labelled datasets set :attr:`num_classes` and implement
    :meth:`sample_labelled`, which class-conditional training uses.
    """

    kind: ClassVar[str] = "data"
    Config: ClassVar[type[ComponentConfig]] = ComponentConfig
    mixture: GaussianMixture | None = None
    #: ``K`` for data with integer class labels ``0 .. K - 1`` (else ``None``)
    num_classes: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one data point."""
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` data points ``(n, *shape)`` (with replacement for finite sets)."""
        raise NotImplementedError

    def sample_labelled(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(x, labels)``: ``n`` data points and their ``(n,)`` int64 class labels in
        ``[0, num_classes)``; only for labelled datasets."""
        raise NotImplementedError(f"dataset {self.name!r} has no labels")
