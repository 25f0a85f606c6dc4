"""Trainable noise-conditional classifiers for classifier guidance, and their loss.

A noise-conditional classifier ``logits(x_t, t) -> (B, K)`` estimates ``log p_t(k | x_t)``
on the SDE's perturbed marginals, so ``grad_x log p_t(y | x)`` steers the reverse SDE
toward class ``y`` (Song et al. 2021, Sec. 5 and App. I, "controllable generation";
Dhariwal & Nichol 2021, "Diffusion models beat GANs", Sec. 4). It is trained like the
score networks, on ``x_t = a(t) x_0 + s(t) z`` drawn from the SDE's kernel at ``t ~
U[eps, T]``, with the cross-entropy of the data's labels (``loss = "cross_entropy"``):

    diffuse train --task classifier --data gmm --out runs/ring-clf
    diffuse sample --checkpoint runs/ring-score --label 3 --guidance classifier \\
        --classifier runs/ring-clf

* ``mlp`` (classifier kind): the score MLP's trunk (Fourier time embedding, residual
  SiLU blocks) with a ``K``-way head, on flattened inputs scaled by ``1 / sqrt(a^2
  sigma_data^2 + s^2)`` (EDM's ``c_in``, so every ``t`` sees unit-variance inputs).
* ``checkpoint`` (classifier kind): a trained classifier loaded from its training
  folder (``[classifier.NAME] type = "checkpoint" path = "runs/ring-clf"``), bound to
  the SDE it was trained with.
* ``cross_entropy`` (loss kind): ``-log softmax(logits(x_t, t))[y]``, averaged.
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from diffuse_engine import (
    Classifier,
    ComponentConfig,
    DiffuseError,
    IncompatibleError,
    Loss,
    bcast,
    hookimpl,
)
from diffuse_engine.components.checkpoint import (
    Checkpoint,
    CheckpointError,
    build_model,
    check_same_sde,
    sde_spec,
)
from diffuse_plugins.losses import uniform_times
from diffuse_plugins.networks import MLPNet


# ---- the network ----------------------------------------------------------------------------
class MLPClassifierConfig(ComponentConfig):
    num_classes: int | None = Field(None, ge=2, description="classes K (filled from the data)")
    shape: list[int] | None = Field(None, description="data shape (filled from the dataset)")
    hidden: int = Field(256, ge=1, description="hidden width")
    depth: int = Field(3, ge=1, description="residual blocks")
    embedding: Literal["fourier", "sinusoidal"] = Field("fourier", description="time embedding")
    embedding_dim: int = Field(64, ge=2, multiple_of=2, description="time-embedding width")
    fourier_scale: float = Field(16.0, gt=0, description="std of the Fourier frequencies")
    sigma_data: float = Field(0.5, gt=0, description="data std assumed by the input scaling")
    input_scaling: bool = Field(True, description="scale inputs by 1/sqrt(a^2 sigma_data^2 + s^2)")
    init_seed: int = Field(0, ge=0, lt=2**63, description="seed of the weight initialisation")


class MLPClassifier(Classifier):
    """A trainable noise-conditional classifier (see the module docstring)."""

    name = "mlp"
    Config = MLPClassifierConfig
    needs_training = True
    #: ShardedBatches draws (x, label) batches for it
    trains_on_labels = True

    def __init__(self, config=None, *, sde, **fields):
        super().__init__(config, sde=sde, **fields)
        c = self.config
        if c.shape is None or c.num_classes is None:
            raise DiffuseError(
                f"classifier {self.name!r} needs its data shape and num_classes; training "
                "(diffuse train --task classifier) fills both from the dataset"
            )
        self.data_shape = tuple(c.shape)
        self.num_classes = c.num_classes
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.init_seed)
            # the residual MLP of the mlp score network, with K logits and no label input
            self.net = MLPNet(
                math.prod(self.data_shape), c, out_features=c.num_classes, num_labels=None
            )

    def logits(self, x, t):
        c = self.config
        if c.input_scaling:
            a, s = self.sde.marginal(t)
            x = x * torch.rsqrt(bcast(a, x) ** 2 * c.sigma_data**2 + bcast(s, x) ** 2)
        return self.net(x, t)

    def check_with(self, score, sde) -> None:
        """Refuse to guide ``score`` under ``sde`` unless this classifier learnt the same
        SDE's marginals in the same coordinates: a score model trained on normalised
        data samples in its normalised space, so the classifier must have been trained
        with the same normalisation (the same ``normalise`` and seed on the same data)."""
        check_same_sde(sde_spec(self.sde), sde, f"classifier {self.name!r}")
        mine, theirs = coordinates(self), coordinates(score)
        if mine != theirs:
            raise IncompatibleError(
                f"classifier {self.name!r} was trained in "
                f"{'normalised' if mine else 'raw data'} coordinates but the score model "
                f"samples in {'normalised' if theirs else 'raw data'} ones"
                + (" with another normalisation" if mine and theirs else "")
                + "; train both with the same normalise setting and seed on the same data"
            )

    # ---- the nn.Module side, as the training loop expects ------------------------------------
    def parameters(self):
        return self.net.parameters()

    def to(self, device=None, dtype=None):
        self.net.to(device=device, dtype=dtype)
        return self

    def train(self, mode: bool = True):
        self.net.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def with_net(self, net: nn.Module):
        """A shallow copy using ``net`` (the EMA weights, or the DDP wrapper)."""
        other = copy.copy(self)
        other.net = net
        return other


def coordinates(model) -> tuple[list[float], list[float]] | None:
    """``(mean, scale)`` of the data normalisation ``model`` works in (its
    ``normaliser``, or the ``normalise`` record of its checkpoint); ``None`` for raw data."""
    norm = getattr(model, "normaliser", None)
    rec = norm.record() if norm is not None else getattr(model, "normalise_record", None)
    if not rec:
        return None
    mean, scale = (
        torch.as_tensor(rec.get(k), dtype=torch.float64).flatten().tolist()
        for k in ("mean", "scale")
    )
    if all(m == 0 for m in mean) and all(v == 1 for v in scale):
        return None
    return mean, scale


# ---- a trained classifier from its checkpoint ------------------------------------------------
class CheckpointClassifierConfig(ComponentConfig):
    path: str = Field(..., description="classifier checkpoint (or its training folder)")
    ema: bool = Field(True, description="use the EMA weights")


class CheckpointClassifier(Classifier):
    """A classifier trained by ``diffuse train --task classifier``, loaded with safetensors
    (no pickle) through the engine's catalogue; refuses an SDE other than its own."""

    name = "checkpoint"
    Config = CheckpointClassifierConfig

    def __init__(self, config=None, *, sde, **fields):
        super().__init__(config, sde=sde, **fields)
        self.inner = None

    def bind_builder(self, builder) -> None:
        """Load the checkpoint (called by the builder that builds this classifier)."""
        self.inner = load_classifier(builder, self.config.path, sde=self.sde, ema=self.config.ema)
        self.num_classes = self.inner.num_classes

    def _model(self):
        if self.inner is None:
            raise DiffuseError(
                "a checkpoint classifier must be built by the engine (classifier='NAME' "
                "with [classifier.NAME] type = 'checkpoint', or load_classifier(engine, path))"
            )
        return self.inner

    def to(self, device=None, dtype=None):
        self._model().to(device, dtype)
        return self

    def logits(self, x, t):
        return self._model().logits(x, t)

    def check_with(self, score, sde) -> None:
        """See :meth:`MLPClassifier.check_with`."""
        self._model().check_with(score, sde)


def load_classifier(builder, path, *, sde=None, ema: bool = True) -> Classifier:
    """The trained classifier of checkpoint ``path`` (file or folder), bound to its
    training SDE (``sde``, if given, must be that SDE). ``builder``: an Engine or Builder."""
    builder = getattr(builder, "builder", builder)
    ckpt = Checkpoint.load(path)
    where = f"checkpoint {path}"
    if ckpt.config["train"].get("task") != "classifier":
        raise CheckpointError(
            f"{where} holds a score model, not a classifier; train one with "
            "diffuse train --task classifier"
        )
    if sde is None:
        sde = builder.build_recorded("sde", ckpt.config["sde"])
    model = build_model(builder.catalogue, ckpt, sde, ema=ema, where=where, kind="classifier")
    model.normalise_record = ckpt.config.get("normalise")  # the data coordinates it learnt
    return model


# ---- the loss ---------------------------------------------------------------------------
class CrossEntropyConfig(ComponentConfig):
    eps: float | None = Field(
        None, gt=0, lt=1, description="smallest training time; default: the SDE's sampling eps"
    )
    time_sampling: Literal["uniform", "log_uniform", "mixed"] = Field(
        "uniform", description="law of the training times t in [eps, T]"
    )


class CrossEntropy(Loss):
    """Cross-entropy of a noise-conditional classifier on ``x_t`` from the SDE's kernel
    (Song et al. 2021, App. I; Dhariwal & Nichol 2021): ``t ~ U[eps, T]``, ``x_t = a x_0
    + s z``, ``-log softmax(logits(x_t, t))[y]``; needs labelled batches (``cond``)."""

    name = "cross_entropy"
    Config = CrossEntropyConfig
    #: trains a classifier (diffuse train --task classifier), not a score model
    for_classifiers = True

    def __call__(self, model, x0, generator=None, cond=None):
        if cond is None or "label" not in cond:
            raise DiffuseError("loss cross_entropy needs labelled batches (cond={'label': y})")
        eps = self.config.eps if self.config.eps is not None else self.sde.sampling_eps
        t = uniform_times(x0.shape[0], self.sde, eps, generator, x0, self.config.time_sampling)
        z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return F.cross_entropy(model(self.sde.perturb(x0, t, z), t), cond["label"])


@hookimpl
def diffuse_register_classifiers():
    return [MLPClassifier, CheckpointClassifier]


@hookimpl
def diffuse_register_losses():
    return [CrossEntropy]
