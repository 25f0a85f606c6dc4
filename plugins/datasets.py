"""Built-in datasets (registry kind ``data``): 2-D toys, a mixture, 8x8 digits, your files.

Every dataset returns float32 CPU tensors ``(n, *shape)`` from ``sample(n, generator)``;
randomness comes only from ``generator`` so training is reproducible.

* ``swissroll`` and ``moons``: scikit-learn's ``make_swiss_roll`` (the x-z plane, as in
  the FFJORD / score-matching toy benchmarks) and ``make_moons``, scaled to unit-ish
  spread.
* ``checkerboard``: uniform on the black squares of a 4x4 board on [-2, 2]^2
  (Grathwohl et al., "FFJORD", 2019).
* ``gmm``: exact samples of the Gaussian mixture of the ``gmm`` score model (same
  fields); :attr:`mixture` exposes it so runs score samples exactly.
* ``digits``: the 1797 8x8 handwritten digits bundled with scikit-learn (no download),
  scaled from [0, 16] to [-1, 1], optionally centred by the training-set mean image;
  a seeded ``holdout`` fraction is kept out of the ``train`` split for evaluation.
* ``file``: a ``.npy`` / ``.pt`` tensor file, or a folder of images scaled to [-1, 1],
  read as untrusted input (:mod:`diffuse_plugins.data_files`: validated before anything
  is allocated, never blocking on a FIFO or device, never running code).

Labelled datasets (``num_classes`` and ``sample_labelled``, for class-conditional
training): ``gmm`` (the mode index), ``digits`` (the digit), ``file`` given an ``.npz``
with ``x`` and integer ``labels``, or an image folder with one sub-folder per class.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from diffuse_engine import ComponentConfig, Dataset, DiffuseError, hookimpl
from diffuse_plugins.data_files import IMAGE_SUFFIXES, read_images, read_npy, read_npz, read_pt
from diffuse_plugins.gmm import MixtureFields, build_mixture


def _numpy_seed(generator: torch.Generator | None) -> int:
    """A numpy/scikit-learn seed drawn from ``generator`` (so one torch seed drives all)."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


class _Finite(Dataset):
    """A dataset held in memory; ``sample`` draws rows with replacement."""

    @cached_property
    def data(self) -> torch.Tensor:
        return self.load()

    def load(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[1:])

    def __len__(self) -> int:
        return self.data.shape[0]

    def sample(self, n, generator=None):
        idx = torch.randint(0, len(self), (n,), generator=generator)
        return self.data[idx]

    @property
    def labels(self) -> torch.Tensor | None:
        """Class labels ``(n,)`` aligned with :attr:`data`, or ``None`` (unlabelled)."""
        return None

    def sample_labelled(self, n, generator=None):
        """The rows :meth:`sample` draws (same generator use) and their labels."""
        if self.labels is None:
            return super().sample_labelled(n, generator)
        idx = torch.randint(0, len(self), (n,), generator=generator)
        return self.data[idx], self.labels[idx]


# ---- 2-D toys ---------------------------------------------------------------------------
class ToyConfig(ComponentConfig):
    noise: float = Field(0.5, ge=0, description="noise added by scikit-learn's generator")
    scale: float = Field(1.0, gt=0, description="multiplies the points")


class SwissRoll(Dataset):
    """Swiss roll in 2-D: scikit-learn ``make_swiss_roll``'s x-z plane, divided by 5."""

    name = "swissroll"
    Config = ToyConfig
    shape = (2,)

    def sample(self, n, generator=None):
        from sklearn.datasets import make_swiss_roll

        x, _ = make_swiss_roll(n, noise=self.config.noise, random_state=_numpy_seed(generator))
        return torch.from_numpy(x[:, [0, 2]] / 5.0 * self.config.scale).float()


class MoonsConfig(ToyConfig):
    noise: float = Field(0.05, ge=0, description="noise added by make_moons")


class Moons(Dataset):
    """Two interleaving half circles: scikit-learn ``make_moons``, centred."""

    name = "moons"
    Config = MoonsConfig
    shape = (2,)

    def sample(self, n, generator=None):
        from sklearn.datasets import make_moons

        x, _ = make_moons(n, noise=self.config.noise, random_state=_numpy_seed(generator))
        x = (x - np.array([0.5, 0.25])) * 1.5
        return torch.from_numpy(x * self.config.scale).float()


class CheckerboardConfig(ComponentConfig):
    squares: int = Field(4, ge=2, description="squares per side (even)")
    half_width: float = Field(2.0, gt=0, description="board spans [-w, w]^2")


class Checkerboard(Dataset):
    """Uniform on alternate squares of a checkerboard (FFJORD's toy)."""

    name = "checkerboard"
    Config = CheckerboardConfig
    shape = (2,)

    def sample(self, n, generator=None):
        k, w = self.config.squares, self.config.half_width
        cell = 2 * w / k
        # pick a black square uniformly, then a point uniformly inside it
        black = torch.tensor([(i, j) for i in range(k) for j in range(k) if (i + j) % 2 == 0])
        sq = black[torch.randint(0, len(black), (n,), generator=generator)]
        u = torch.rand(n, 2, generator=generator)
        return ((sq + u) * cell - w).float()


# ---- the exact mixture ------------------------------------------------------------------
class GMMDataConfig(MixtureFields):
    """The ``gmm`` score model's mixture fields."""


class GMMData(Dataset):
    """Exact samples of the configured Gaussian mixture (same fields as score ``gmm``)."""

    name = "gmm"
    Config = GMMDataConfig

    def __init__(self, config=None, **fields):
        super().__init__(config, **fields)
        self.mixture = build_mixture(self.config)

    @property
    def shape(self):
        return (self.mixture.dim,)

    @property
    def num_classes(self) -> int:
        """The mixture's modes are its classes: the label is the mode index."""
        return self.mixture.weights.shape[0]

    def sample(self, n, generator=None):
        return self.mixture.sample(n, generator)

    def sample_labelled(self, n, generator=None):
        """``(x, k)``: the same draws as :meth:`sample` (mode, then noise) and the modes."""
        m = self.mixture.to(None, torch.float32)
        k = torch.multinomial(m.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, m.dim, generator=generator, dtype=torch.float32)
        return m.means[k] + m.stds[k, None] * z, k


# ---- 8x8 digits ---------------------------------------------------------------------------
class DigitsConfig(ComponentConfig):
    split: Literal["train", "test", "all"] = Field(
        "train", description="train: all but the held-out part; test: the held-out part"
    )
    holdout: float = Field(0.2, ge=0, lt=1, description="held-out fraction (seeded split)")
    split_seed: int = Field(0, description="seed of the train/test split")
    centre: bool = Field(False, description="subtract the training-set mean image")
    flatten: bool = Field(False, description="(n, 64) vectors instead of (n, 1, 8, 8) images")


class Digits(_Finite):
    """scikit-learn's bundled 8x8 digits in [-1, 1] (1797 images, no download)."""

    name = "digits"
    Config = DigitsConfig
    num_classes = 10

    def _split(self):
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.from_numpy(d.images).float() / 8.0 - 1.0  # pixel values 0..16 -> [-1, 1]
        y = torch.from_numpy(d.target).long()
        perm = torch.randperm(
            len(x), generator=torch.Generator().manual_seed(self.config.split_seed)
        )
        n_test = int(round(self.config.holdout * len(x)))
        return (x[perm[n_test:]], y[perm[n_test:]]), (x[perm[:n_test]], y[perm[:n_test]])

    @cached_property
    def _arrays(self):
        (xtr, ytr), (xte, yte) = self._split()
        x, y = {
            "train": (xtr, ytr),
            "test": (xte, yte),
            "all": (torch.cat([xtr, xte]), torch.cat([ytr, yte])),
        }[self.config.split]
        if len(x) == 0:
            raise DiffuseError(
                "data digits: split 'test' is empty with holdout = 0; "
                "set holdout > 0 or use split 'train'"
            )
        self.mean_image = xtr.mean(0) if self.config.centre else torch.zeros(8, 8)
        x = x - self.mean_image
        return (x.reshape(len(x), 64) if self.config.flatten else x[:, None]), y

    def load(self):
        return self._arrays[0]

    @property
    def labels(self) -> torch.Tensor:
        """Digit labels ``(n,)`` aligned with :attr:`data`."""
        return self._arrays[1]

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Undo centring: samples back to [-1, 1] images ``(n, 8, 8)``."""
        _ = self._arrays
        return x.reshape(len(x), 8, 8) + self.mean_image


# ---- the user's files (read by diffuse_plugins.data_files, as untrusted input) ----------


class FileConfig(ComponentConfig):
    path: str = Field(
        ...,
        description=".npy, .npz (x and optional labels) or .pt tensor file (first axis = "
        "samples), or a folder of images (one sub-folder per class for labels)",
    )
    channels: Literal[1, 3] = Field(1, description="images: 1 (grayscale) or 3 (RGB)")
    scale: list[float] | None = Field(
        None, description="tensor files: map [lo, hi] to [-1, 1]; default: as stored"
    )


class FileData(_Finite):
    """Your own data: a .npy/.npz/.pt tensor file or a folder of equally sized images."""

    name = "file"
    Config = FileConfig
    _file_labels: torch.Tensor | None = None

    def load(self):
        p = Path(self.config.path).expanduser()
        if p.is_dir():
            x = self._folder(p)
        elif p.suffix == ".npz":
            x, labels = read_npz(p)
            if labels is not None:
                self._file_labels = labels
        elif p.suffix == ".npy":
            x = read_npy(p)
        elif p.suffix == ".pt":
            x = read_pt(p)
        elif not p.exists():
            raise DiffuseError(
                f"data path {p} does not exist; give a .npy/.pt file or an image folder"
            )
        else:
            raise DiffuseError(
                f"data file {p}: unsupported suffix {p.suffix!r}; allowed: "
                ".npy, .npz, .pt or a folder of images"
            )
        x = x.float()
        if self.config.scale is not None and not p.is_dir():
            if len(self.config.scale) != 2 or self.config.scale[0] >= self.config.scale[1]:
                raise DiffuseError(f"data {p}: scale must be [lo, hi] with lo < hi")
            lo, hi = self.config.scale
            x = (x - lo) / (hi - lo) * 2 - 1
        if not torch.isfinite(x).all():
            raise DiffuseError(f"data {p}: contains NaN or Inf values")
        return x

    # ---- labelled files (class-conditional training) ------------------------------------
    @property
    def labels(self) -> torch.Tensor | None:
        """Class labels of an ``.npz`` with ``labels`` or a folder of class sub-folders."""
        _ = self.data
        return self._file_labels

    @property
    def num_classes(self) -> int | None:
        """``max(label) + 1`` for labelled files (labels are ``0 .. K - 1``), else None."""
        labels = self.labels
        return None if labels is None else int(labels.max()) + 1

    def _folder(self, folder: Path) -> torch.Tensor:
        """Images of ``folder``; with one sub-folder per class (and no loose images), the
        classes are the sub-folders in sorted name order, as torchvision's ImageFolder."""
        subs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
        loose = [f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES]
        if not subs or loose:
            return read_images(folder, self.config.channels)
        parts = [read_images(d, self.config.channels) for d in subs]
        if len({tuple(x.shape[1:]) for x in parts}) > 1:
            raise DiffuseError(
                f"data folder {folder}: the class folders hold images of different sizes; "
                "all images must have one size"
            )
        self.class_names = [d.name for d in subs]
        self._file_labels = torch.cat(
            [torch.full((len(x),), k, dtype=torch.int64) for k, x in enumerate(parts)]
        )
        return torch.cat(parts)


@hookimpl
def diffuse_register_datasets():
    return [SwissRoll, Moons, Checkerboard, GMMData, Digits, FileData]
