"""The exact score of a Gaussian mixture, perturbed by any SDE's kernel.

This is the engine's test bed and the default score of ``diffuse run``: with
``(a, s) = sde.marginal(t)`` the perturbed mixture is ``sum_k w_k N(a mu_k, (a^2
sigma_k^2 + s^2) I)`` and its score is exact. Mixture layouts:

* ``ring``: ``modes`` modes on a circle of ``radius`` in 2-D, with unequal weights
  (proportional to ``linspace(1, 3)``) and stds (``linspace(std, 1.75 std)``), so
  solvers that blur weights or widths are caught.
* ``random``: ``modes`` modes in ``dim`` dimensions with centres drawn (seeded) from
  ``N(0, radius^2 / dim I)``, same weight and std pattern.
* ``explicit``: ``means``, ``stds`` and ``weights`` given in full.

``weight_ratio`` sets the largest over the smallest weight of the ring and random
layouts (default 3). The score (not the dataset) also takes ``elongation``: every
mode's std along the first coordinate is ``elongation`` times its std along the
others (anisotropic modes), and ``shape``: the data shape of a ``random`` mixture
(``[3, 8, 8]`` for image-shaped samples; its product is ``dim``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator

from diffuse_engine import (
    Classifier,
    ComponentConfig,
    GaussianMixture,
    ScoreConfig,
    ScoreModel,
    hookimpl,
)


class MixtureFields(ComponentConfig):
    """The fields that define a mixture, shared by the ``gmm`` score and dataset."""

    layout: Literal["ring", "random", "explicit"] = Field("ring", description="mixture layout")
    modes: int = Field(8, ge=1, description="number of modes (ring, random)")
    radius: float = Field(2.0, gt=0, description="ring radius / spread of random centres")
    std: float = Field(0.1, gt=0, description="smallest mode std (ring, random)")
    dim: int = Field(2, ge=1, description="dimension (random layout)")
    seed: int = Field(0, ge=0, lt=2**63, description="seed of the random layout")
    means: list[list[float]] | None = Field(None, description="explicit means (K x d)")
    stds: list[float] | None = Field(None, description="explicit per-mode stds (K)")
    weights: list[float] | None = Field(None, description="explicit weights (K), normalised")
    weight_ratio: float = Field(
        3.0, ge=1, description="largest / smallest mode weight (ring, random)"
    )

    @model_validator(mode="after")
    def _consistent(self):
        if self.layout == "explicit":
            if self.means is None or self.stds is None:
                raise ValueError("layout 'explicit' needs means and stds")
            k = len(self.means)
            if k == 0 or len({len(m) for m in self.means}) != 1:
                raise ValueError("means must be a non-empty list of equal-length lists")
            if len(self.stds) != k or (self.weights is not None and len(self.weights) != k):
                raise ValueError(f"stds and weights need one value per mode ({k})")
            if any(s <= 0 for s in self.stds) or any(w <= 0 for w in self.weights or [1]):
                raise ValueError("stds and weights must be > 0")
        elif self.means is not None or self.stds is not None or self.weights is not None:
            raise ValueError(
                f"means/stds/weights are only used with layout 'explicit', not {self.layout!r}"
            )
        return self


class MixtureConfig(MixtureFields, ScoreConfig):
    """The ``gmm`` score model: the mixture's exact score (never another parameterisation)."""

    parameterisation: Literal["score"] = "score"
    elongation: float = Field(
        1.0, gt=0, description="std along the first coordinate / std along the others"
    )
    shape: list[int] | None = Field(
        None, min_length=1, description="data shape of a random mixture (product = dim)"
    )

    @model_validator(mode="after")
    def _shape_matches(self):
        if self.shape is not None:
            if self.layout != "random" or math.prod(self.shape) != self.dim or min(self.shape) < 1:
                raise ValueError(
                    f"shape {self.shape} needs layout 'random' and a product equal to "
                    f"dim ({self.dim})"
                )
        return self


def build_mixture(c: MixtureFields) -> GaussianMixture:
    """The mixture that ``c`` (score or dataset fields) describes (float64, CPU)."""
    f64 = torch.float64
    if c.layout == "explicit":
        means = torch.tensor(c.means, dtype=f64)
        stds = torch.tensor(c.stds, dtype=f64)
        w = torch.tensor(c.weights, dtype=f64) if c.weights else torch.ones(len(c.stds), dtype=f64)
    else:
        K = c.modes
        w = torch.linspace(1, c.weight_ratio, K, dtype=f64) if K > 1 else torch.ones(1, dtype=f64)
        stds = c.std * (
            torch.linspace(1, 1.75, K, dtype=f64) if K > 1 else torch.ones(1, dtype=f64)
        )
        if c.layout == "ring":
            ang = torch.arange(K, dtype=f64) * 2 * math.pi / K
            means = c.radius * torch.stack([ang.cos(), ang.sin()], 1)
        else:
            g = torch.Generator().manual_seed(c.seed)
            means = torch.randn(K, c.dim, generator=g, dtype=f64) * c.radius / math.sqrt(c.dim)
    elongation = getattr(c, "elongation", 1.0)
    if elongation != 1.0:  # per-dimension stds: the first coordinate stretched
        stds = stds[:, None].repeat(1, means.shape[1])
        stds[:, 0] *= elongation
    return GaussianMixture(means, stds, w / w.sum())


class GMMScore(ScoreModel):
    """Exact score of the configured mixture under ``sde``'s kernel.

    Conditional on ``cond={"label": k}`` (``k`` ``(B,)``, the mode index) it is the exact
    class-conditional score of mode ``k``, ``-(x - a mu_k) / (a^2 sigma_k^2 + s^2)``;
    ``cond=None`` gives the mixture's score.
    """

    name = "gmm"
    Config = MixtureConfig
    conditional = True

    def __init__(self, config=None, *, sde, **fields):
        super().__init__(config, sde=sde, **fields)
        self.mixture = build_mixture(self.config)
        c = self.config
        self.data_shape = tuple(c.shape) if c.shape is not None else (self.mixture.dim,)
        self.num_classes = self.mixture.weights.shape[0]

    def forward(self, x, t, cond=None):
        a, s = self.sde.marginal(t)
        if cond is None or "label" not in cond:
            return self.mixture.score(x, a, s)
        return self.mixture.component_score(x, cond["label"], a, s)

    def log_prob(self, x, t=None):
        """Exact log-density of ``p_t`` at ``x`` (of the data when ``t`` is None)."""
        if t is None:
            return self.mixture.log_prob(x)
        a, s = self.sde.marginal(t)
        return self.mixture.log_prob(x, a, s)

    def data_moments(self):
        """The mixture's per-coordinate mean and variance, of ``data_shape``."""
        mean, var = self.mixture.moments()
        return mean.reshape(self.data_shape), var.reshape(self.data_shape)


class GMMClassifierConfig(MixtureFields):
    """The ``gmm`` classifier: the same mixture fields as the ``gmm`` score."""


class GMMClassifier(Classifier):
    """The exact noise-conditional classifier of the mixture: ``log p_t(k | x)`` up to a
    constant is ``log w_k + log N(x; a mu_k, (a^2 sigma_k^2 + s^2) I)``."""

    name = "gmm"
    Config = GMMClassifierConfig

    def __init__(self, config=None, *, sde, **fields):
        super().__init__(config, sde=sde, **fields)
        self.mixture = build_mixture(self.config)
        self.num_classes = self.mixture.weights.shape[0]

    def logits(self, x, t):
        a, s = self.sde.marginal(t)
        return self.mixture.component_log_probs(x, a, s)


@hookimpl
def diffuse_register_score_models():
    return [GMMScore]


@hookimpl
def diffuse_register_classifiers():
    return [GMMClassifier]
