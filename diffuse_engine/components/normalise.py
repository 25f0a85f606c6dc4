"""Data normalisation for training: fitted once, recorded in the checkpoint, undone after.

A score network learns best on data of unit scale: the preconditioner's input scaling
``c_in = 1 / sqrt(a^2 sigma_data^2 + s^2)`` (Karras et al. 2022) and the SDE's prior both
assume it. So training maps the user's data ``x`` to ``z = T(x) = (x - mean) / scale``,
the model learns the score of ``z``, and

* sampling returns ``T^-1(z) = mean + scale * z`` (the model's :attr:`normaliser`, which
  :func:`~diffuse_engine.sampling.loop.run_sampling` applies to the solver's output);
* the likelihood is reported in the user's units by the change of variables
  ``log p_x(x) = log p_z(T(x)) + log |det dT/dx|`` with ``log |det dT/dx| = -sum log
  scale`` (an affine map: the Jacobian is constant);
* the preconditioner's ``sigma_data`` is set to the normalised data's standard deviation
  (unless the user set it), so the input scaling matches what the network sees.

Kinds (``normalise =`` in a ``[train.NAME]`` table):

=============  ===========================================================================
``auto``       vectors: ``standard``; images ``(C, H, W)``: ``images`` when their values
               lie in ``[0, 255]`` and exceed 1 (raw pixels), else ``none`` (already
               scaled, as the ``file`` folder reader and ``digits`` deliver them)
``standard``   per-dimension mean and standard deviation (scikit-learn's
               ``StandardScaler``)
``global``     one mean and one standard deviation over all values (keeps the shape's
               aspect ratio)
``images``     the fixed map ``[0, 255] -> [-1, 1]`` (``mean = scale = 127.5``; Ho et
               al. 2020)
``none``       the identity
=============  ===========================================================================

Explicit ``data_mean`` / ``data_scale`` (a number or one value per dimension) replace the
fitted values for those who know their data's scale. Statistics are estimated from the
data (all of an in-memory set up to :data:`FIT_ROWS` rows, else :data:`FIT_ROWS` seeded
draws) with a generator of its own, so the training batches are unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffuse_engine.core.errors import DiffuseError

KINDS = ("auto", "standard", "global", "images", "none")
#: rows used to estimate the statistics
FIT_ROWS = 20_000
#: seed offset of the estimation generator (apart from the data and noise streams)
FIT_SEED_OFFSET = 0x5EED


@dataclass(frozen=True)
class Normaliser:
    """The affine map ``T(x) = (x - mean) / scale``; ``mean`` and ``scale`` broadcast over
    one data point of ``shape`` (scalars or ``shape``-d tensors, float64)."""

    kind: str
    shape: tuple[int, ...]
    mean: Tensor
    scale: Tensor

    @property
    def identity(self) -> bool:
        """Whether ``T`` is the identity (nothing to apply or undo)."""
        return bool((self.mean == 0).all() and (self.scale == 1).all())

    def _cast(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.mean.to(x.device, x.dtype), self.scale.to(x.device, x.dtype)

    def encode(self, x: Tensor) -> Tensor:
        """User units ``(n, *shape)`` -> the normalised space the model is trained in."""
        mean, scale = self._cast(x)
        return (x - mean) / scale

    def decode(self, z: Tensor) -> Tensor:
        """The inverse map: normalised samples ``(n, *shape)`` -> user units."""
        mean, scale = self._cast(z)
        return z * scale + mean

    def log_det(self, x: Tensor) -> Tensor:
        """``log |det dT/dx|`` per sample, ``(n,)``: ``-sum log scale`` over one point."""
        per_point = -torch.log(self.scale.double()).expand(self.shape).sum()
        return per_point.to(x.device, x.dtype).expand(x.shape[0])

    def record(self) -> dict[str, Any]:
        """What a checkpoint stores: ``kind``, ``shape``, ``mean``, ``scale`` (JSON)."""

        def js(v: Tensor):
            return float(v) if v.dim() == 0 else v.tolist()

        return {
            "kind": self.kind,
            "shape": list(self.shape),
            "mean": js(self.mean),
            "scale": js(self.scale),
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any] | None, shape) -> Normaliser:
        """The normaliser a checkpoint recorded (``None``: an older checkpoint, identity)."""
        shape = tuple(int(s) for s in shape)
        if rec is None:
            return identity(shape)
        if not isinstance(rec, dict) or not {"mean", "scale"} <= set(rec):
            raise DiffuseError(f"recorded normalisation {rec!r} is malformed (mean, scale)")
        kind = str(rec.get("kind", "explicit"))
        return _build(kind, shape, rec["mean"], rec["scale"], "recorded")


def identity(shape) -> Normaliser:
    """The identity normaliser for data of ``shape``."""
    one = torch.tensor(1.0, dtype=torch.float64)
    return Normaliser("none", tuple(shape), torch.zeros((), dtype=torch.float64), one)


def _build(kind: str, shape: tuple[int, ...], mean, scale, where: str) -> Normaliser:
    """Check explicit or recorded values: numbers or one per dimension, finite, scale > 0."""
    out = []
    for name, v in (("mean", mean), ("scale", scale)):
        try:
            t = torch.as_tensor(v, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise DiffuseError(
                f"{where} data_{name} {v!r}: expected a number or a list of numbers"
            ) from None
        if t.dim() and tuple(t.shape) != shape:
            raise DiffuseError(
                f"{where} data_{name} has shape {list(t.shape)}; the data are {list(shape)}: "
                "give one number or one value per dimension"
            )
        if not torch.isfinite(t).all() or (name == "scale" and not (t > 0).all()):
            raise DiffuseError(
                f"{where} data_{name} must be finite" + (" and > 0" if name == "scale" else "")
            )
        out.append(t)
    return Normaliser(kind, shape, out[0], out[1])


def _fit_rows(dataset, seed: int) -> Tensor:
    """The rows the statistics are estimated from (float64)."""
    held = getattr(dataset, "data", None)
    if isinstance(held, Tensor) and held.shape[0] <= FIT_ROWS:
        return held.double()
    gen = torch.Generator().manual_seed((seed + FIT_SEED_OFFSET) % 2**63)
    return dataset.sample(FIT_ROWS, gen).double()


def fit_normaliser(kind: str, dataset, *, seed: int = 0, mean=None, scale=None) -> Normaliser:
    """The normaliser of ``kind`` (see the module doc) for ``dataset``; explicit ``mean``
    / ``scale`` replace the fitted values (with ``kind`` ``none`` they are an error)."""
    if kind not in KINDS:
        raise DiffuseError(f"normalise {kind!r} is unknown; choose one of: {', '.join(KINDS)}")
    shape = tuple(dataset.shape)
    explicit = mean is not None or scale is not None
    if kind == "none" and explicit:
        raise DiffuseError(
            "normalise = 'none' takes no data_mean / data_scale; drop them or choose "
            "another normalise"
        )
    x = None
    if kind == "auto" and len(shape) == 3:  # images: raw pixels, or already scaled
        x = _fit_rows(dataset, seed)
        raw = bool(x.min() >= 0 and x.max() <= 255 and x.max() > 1)
        kind = "images" if raw else ("global" if explicit else "none")
    elif kind == "auto":
        kind = "standard"
    if kind == "none":
        return identity(shape)
    if kind == "images":
        fitted_mean, fitted_scale = 127.5, 127.5
    elif mean is None or scale is None:
        x = _fit_rows(dataset, seed) if x is None else x
        fitted_mean = x.mean() if kind == "global" else x.mean(0)
        sd = x.std() if kind == "global" else x.std(0)
        floor = 1e-6 * max(1.0, float(sd.max()))
        fitted_scale = torch.where(sd > floor, sd, torch.ones_like(sd))  # constant dims
    else:
        fitted_mean = fitted_scale = None
    mean = fitted_mean if mean is None else mean
    scale = fitted_scale if scale is None else scale
    return _build("explicit" if explicit else kind, shape, mean, scale, "normalise:")


def normalised_std(norm: Normaliser, dataset, seed: int = 0) -> float:
    """The standard deviation of the normalised data over all values (4 significant
    digits): the ``sigma_data`` the preconditioner assumes."""
    z = norm.encode(_fit_rows(dataset, seed))
    sd = float(z.std())
    if not math.isfinite(sd) or sd <= 0:
        return 1.0
    return float(f"{sd:.4g}")


class NormalisedData:
    """A dataset seen through ``T``: ``sample`` / ``sample_labelled`` return normalised
    points; everything else (``shape``, ``num_classes``, ``name``) is the dataset's."""

    def __init__(self, dataset, norm: Normaliser):
        self.dataset, self.norm = dataset, norm

    def __getattr__(self, name):
        if name in ("dataset", "norm"):  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` normalised data points."""
        return self.norm.encode(self.dataset.sample(n, generator))

    def sample_labelled(self, n: int, generator: torch.Generator | None = None):
        """``(T(x), labels)``."""
        x, y = self.dataset.sample_labelled(n, generator)
        return self.norm.encode(x), y
