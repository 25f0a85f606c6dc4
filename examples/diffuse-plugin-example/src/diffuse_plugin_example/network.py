"""A small, self-contained MLP score network.

An epsilon-predicting network (Ho et al. 2020) for flat data ``(B, dim)`` (or any
``(B, *dims)`` with ``prod(dims) == dim``), conditioned on time through sinusoidal
features of ``t`` (Vaswani et al. 2017). The engine turns its epsilon output into a
score through the SDE's kernel (:func:`diffuse_engine.to_score`).
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from diffuse_engine import ScoreConfig, ScoreModel


class TinyMLPConfig(ScoreConfig):
    parameterisation: Literal["score", "epsilon", "x0"] = "epsilon"
    dim: int = Field(2, ge=1, description="data dimension")
    hidden: int = Field(64, ge=1, description="hidden width")
    frequencies: int = Field(8, ge=1, description="sinusoidal time features")
    seed: int = Field(0, description="seed of the initial weights")


class TinyMLPScore(ScoreModel):
    """Small MLP network predicting epsilon (needs training)."""

    name = "example_mlp"
    Config = TinyMLPConfig
    needs_training = True

    def __init__(self, config=None, *, sde, **fields):
        super().__init__(config, sde=sde, **fields)
        c = self.config
        self.data_shape = (c.dim,)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            self.net = nn.Sequential(
                nn.Linear(c.dim + 2 * c.frequencies, c.hidden),
                nn.SiLU(),
                nn.Linear(c.hidden, c.hidden),
                nn.SiLU(),
                nn.Linear(c.hidden, c.dim),
            )
        self.register_freqs = 2.0 ** torch.arange(c.frequencies) * math.pi

    def parameters(self):
        return self.net.parameters()

    def to(self, device=None, dtype=None):
        self.net.to(device=device, dtype=dtype)
        self.register_freqs = self.register_freqs.to(device=device)
        return self

    # what `diffuse train` needs of a trainable model (see diffuse_engine.training)
    def train(self, mode: bool = True):
        self.net.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def with_net(self, net):
        """A shallow copy using ``net`` (e.g. the EMA weights) as its backbone."""
        other = copy.copy(self)
        other.net = net
        return other

    def forward(self, x, t):
        flat = x.reshape(x.shape[0], -1)
        ang = t[:, None] * self.register_freqs.to(t.dtype)
        h = torch.cat([flat, ang.sin(), ang.cos()], dim=1).to(next(self.net.parameters()).dtype)
        return self.net(h).to(x.dtype).reshape(x.shape)
