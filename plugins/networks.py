"""Trainable score networks: the preconditioner every network shares, and an MLP.

The small U-Net for images is in :mod:`diffuse_plugins.unet`.

Both are plain ``torch.nn`` backbones ``F(x_in, t)`` wrapped by one preconditioner,
:class:`NetworkScore`, in the manner of Karras et al., "Elucidating the Design Space of
Diffusion-Based Generative Models" (EDM, 2022): with the kernel ``x_t = a x_0 + s z``
(``(a, s) = sde.marginal(t)``)

* input scaling ``c_in = 1 / sqrt(a^2 sigma_data^2 + s^2)`` keeps the network's input
  at unit variance for every SDE (VE inputs grow to ``sigma_max`` otherwise);
* the output is read in the configured parameterisation:
  ``epsilon``: ``eps_hat = F`` (Ho et al. 2020);
  ``score``: ``s = F / s`` with ``scale_by_std`` (NCSN's output scaling, Song & Ermon
  2020, "Improved techniques"), else ``s = F``;
  ``x0``: EDM's ``D = c_skip x/a + c_out F`` with ``sigma = s / a``, ``c_skip =
  sigma_data^2 / (sigma^2 + sigma_data^2)``, ``c_out = sigma sigma_data / sqrt(sigma^2 +
  sigma_data^2)``;
  ``v``: ``v_hat = F``, the velocity ``(a z - s x_0) / sqrt(a^2 + s^2)`` (Salimans & Ho
  2022; see :func:`diffuse_engine.to_score`), unit-scale like epsilon;

and :meth:`ScoreModel.__call__` converts that to a score through the same kernel. The
backbones know nothing of SDEs or parameterisations.

Class-conditional networks (``num_classes = K``) add a learned embedding of the label
(``K`` classes and a reserved null label ``K``, the unconditional score) to the time
embedding; ``label_dropout`` trains that share of each batch with the null label, so one
network gives both scores classifier-free guidance needs (Ho & Salimans 2022).

The data shape is a config field (``shape``); training fills it from the dataset and
the checkpoint records it.
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from diffuse_engine import DiffuseError, ScoreConfig, ScoreModel, bcast, hookimpl
from diffuse_engine.components.score import Parameterisation
from diffuse_engine.core.memory import FLOAT32, check_fits


# ---- time embeddings -----------------------------------------------------------------------
class GaussianFourierEmbedding(nn.Module):
    """``[sin(2 pi W t), cos(2 pi W t)]`` with fixed ``W ~ N(0, scale^2)`` (Tancik et al.
    2020; used for continuous t by Song et al. 2021)."""

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("W", torch.randn(dim // 2) * scale)

    def forward(self, t):
        proj = 2 * math.pi * t[:, None] * self.W[None]
        return torch.cat([proj.sin(), proj.cos()], dim=1)


class SinusoidalEmbedding(nn.Module):
    """Transformer positional encoding of ``1000 t`` (Vaswani et al. 2017; DDPM)."""

    def __init__(self, dim: int, max_period: float = 10000.0):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(max_period) * torch.arange(half) / half))

    def forward(self, t):
        arg = 1000 * t[:, None] * self.freqs[None]
        return torch.cat([arg.sin(), arg.cos()], dim=1)


def make_embedding(kind: str, dim: int, scale: float) -> nn.Module:
    return GaussianFourierEmbedding(dim, scale) if kind == "fourier" else SinusoidalEmbedding(dim)


# ---- the preconditioning wrapper ------------------------------------------------------------
class NetworkConfig(ScoreConfig):
    parameterisation: Parameterisation = Field(
        "epsilon", description="what the network predicts: score, epsilon, x0 or v"
    )
    shape: list[int] | None = Field(
        None, description="data shape (filled from the dataset by training)"
    )
    scale_by_std: bool = Field(
        True, description="score parameterisation: divide the output by the kernel std (NCSN)"
    )
    input_scaling: bool = Field(
        True, description="scale inputs by 1/sqrt(a^2 sigma_data^2 + std^2)"
    )
    sigma_data: float = Field(0.5, gt=0, description="data std assumed by the scalings")
    embedding: Literal["fourier", "sinusoidal"] = Field("fourier", description="time embedding")
    embedding_dim: int = Field(64, ge=2, multiple_of=2, description="time-embedding width (even)")
    fourier_scale: float = Field(16.0, gt=0, description="std of the Fourier frequencies")
    init_seed: int = Field(0, ge=0, lt=2**63, description="seed of the weight initialisation")
    num_classes: int | None = Field(
        None, ge=1, description="class-conditional: K labels 0 .. K-1 (embedding + time emb.)"
    )
    label_dropout: float = Field(
        0.0, ge=0, lt=1, description="probability of training with the null label (for cfg)"
    )

    @field_validator("shape")
    @classmethod
    def _positive_shape(cls, v):
        if v is not None and (not v or min(v) < 1):
            raise ValueError(f"shape must be a non-empty list of sizes >= 1, got {v}")
        return v


class NetworkScore(ScoreModel):
    """A trainable backbone behind the one preconditioner (see module doc)."""

    needs_training = True
    Config = NetworkConfig

    def __init__(self, config=None, *, sde, **fields):
        super().__init__(config, sde=sde, **fields)
        if self.config.shape is None:
            raise DiffuseError(
                f"score model {self.name!r} needs its data shape (shape = "
                "[2] or [1, 8, 8]); training sets it from the dataset"
            )
        self.data_shape = tuple(self.config.shape)
        # class-conditional: labels 0 .. K-1, the null label K (see drop_labels)
        self.num_classes = self.config.num_classes
        self.conditional = self.num_classes is not None
        self.requires_cond = self.conditional and self.config.label_dropout == 0
        with torch.random.fork_rng(devices=[]):
            self._check_size()
            torch.manual_seed(self.config.init_seed)
            self.net = self.build_net(self.data_shape)

    def _check_size(self) -> None:
        """Refuse, before allocating, a network whose weights alone exceed free memory: the
        backbone is first built on the ``meta`` device (shapes only) to count them."""
        if torch.empty(0).device.type == "meta":
            return  # being built for its shapes only: nothing is allocated
        with torch.device("meta"):
            n = sum(p.numel() for p in self.build_net(self.data_shape).parameters())
        check_fits(
            n * FLOAT32,
            "cpu",
            f"score model {self.name!r} ({n:,} parameters for data {list(self.data_shape)})",
            "make it smaller (hidden, depth, channels, channel_mult)",
        )

    def build_net(self, shape: tuple[int, ...]) -> nn.Module:
        """The backbone ``F(x_in, t)`` for data of ``shape``."""
        raise NotImplementedError

    # ---- class labels ---------------------------------------------------------------------
    def labels_of(self, cond, batch: int, device) -> torch.Tensor:
        """The ``(B,)`` label indices for ``cond``: its ``label``, or the null label
        ``num_classes`` for ``cond=None`` (the unconditional score, classifier-free
        guidance; Ho & Salimans 2022)."""
        if cond is not None and cond.get("label") is not None:
            return cond["label"].to(device=device, dtype=torch.long)
        if self.requires_cond:
            raise DiffuseError(
                f"score model {self.name!r} is conditional and was trained without label "
                "dropout, so it has no unconditional score: pass a label (cond={'label': y})"
            )
        return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)

    def drop_labels(self, cond, generator=None):
        """``cond`` with each label replaced by the null label with probability
        ``label_dropout``, drawn from the loss's ``generator`` (so runs reproduce)."""
        p = self.config.label_dropout
        if not self.conditional or cond is None or p == 0:
            return cond
        y = cond["label"]
        drop = torch.rand(y.shape, generator=generator, device=y.device) < p
        return {**cond, "label": torch.where(drop, torch.full_like(y, self.num_classes), y)}

    # ---- preconditioning ------------------------------------------------------------------
    def forward(self, x, t, cond=None):
        c = self.config
        a, s = self.sde.marginal(t)
        a_, s_ = bcast(a, x), bcast(s, x)
        x_in = x * torch.rsqrt(a_**2 * c.sigma_data**2 + s_**2) if c.input_scaling else x
        if self.conditional:
            out = self.net(x_in, t, self.labels_of(cond, x.shape[0], x.device))
        else:
            out = self.net(x_in, t)
        if c.parameterisation in ("epsilon", "v"):
            return out
        if c.parameterisation == "score":
            return out / s_ if c.scale_by_std else out
        sig = s_ / a_
        c_skip = c.sigma_data**2 / (sig**2 + c.sigma_data**2)
        c_out = sig * c.sigma_data * torch.rsqrt(sig**2 + c.sigma_data**2)
        return c_skip * (x / a_) + c_out * out

    def check_sde(self, sde) -> None:
        """Refuse to sample with an SDE other than the one this model is bound to."""
        from diffuse_engine.components.checkpoint import check_same_sde, sde_spec

        check_same_sde(sde_spec(self.sde), sde, f"score model {self.name!r}")

    # ---- the nn.Module side -----------------------------------------------------------------
    def parameters(self):
        return self.net.parameters()

    def to(self, device=None, dtype=None) -> NetworkScore:
        self.net.to(device=device, dtype=dtype)
        return self

    def train(self, mode: bool = True) -> NetworkScore:
        self.net.train(mode)
        return self

    def eval(self) -> NetworkScore:
        return self.train(False)

    def with_net(self, net: nn.Module) -> NetworkScore:
        """A shallow copy using ``net`` (e.g. the EMA weights) as its backbone."""
        other = copy.copy(self)
        other.net = net
        return other

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.net.parameters())


# ---- MLP ---------------------------------------------------------------------------------
class MLPConfig(NetworkConfig):
    hidden: int = Field(256, ge=1, description="hidden width")
    depth: int = Field(3, ge=1, description="residual blocks")


#: ``MLPNet(num_labels=...)`` default: the label embedding the config asks for
LABELS_OF_CONFIG = object()


class MLPNet(nn.Module):
    """Residual SiLU MLP; each block adds a projection of the time embedding.

    ``out_features``: the output width (default: ``dim``, the output reshaped like the
    input, as a score network needs; a classifier asks for ``K`` logits).
    ``num_labels``: classes of the label embedding (default: ``c.num_classes``; ``None``
    for no label input).
    """

    def __init__(self, dim: int, c, out_features: int | None = None, num_labels=LABELS_OF_CONFIG):
        super().__init__()
        num_labels = c.num_classes if num_labels is LABELS_OF_CONFIG else num_labels
        self.flat_output = out_features is not None
        self.embed = make_embedding(c.embedding, c.embedding_dim, c.fourier_scale)
        self.temb = nn.Sequential(nn.Linear(c.embedding_dim, c.hidden), nn.SiLU())
        self.inp = nn.Linear(dim, c.hidden)
        self.t_proj = nn.ModuleList(nn.Linear(c.hidden, c.hidden) for _ in range(c.depth))
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.SiLU(), nn.Linear(c.hidden, c.hidden), nn.SiLU(), nn.Linear(c.hidden, c.hidden)
            )
            for _ in range(c.depth)
        )
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(c.hidden, out_features or dim))
        # labels 0 .. K-1 and the null label K, added to the time embedding
        self.label = None if num_labels is None else nn.Embedding(num_labels + 1, c.hidden)

    def forward(self, x, t, y=None):
        shape = x.shape
        emb = self.temb(self.embed(t))
        if self.label is not None:
            emb = emb + self.label(y)
        h = self.inp(x.reshape(shape[0], -1))
        for proj, block in zip(self.t_proj, self.blocks, strict=True):
            h = h + block(h + proj(emb))
        return self.out(h) if self.flat_output else self.out(h).reshape(shape)


class MLPScore(NetworkScore):
    """MLP score network with a Fourier or sinusoidal time embedding, for vector data."""

    name = "mlp"
    Config = MLPConfig

    def build_net(self, shape):
        return MLPNet(math.prod(shape), self.config)


@hookimpl
def diffuse_register_score_models():
    return [MLPScore]
