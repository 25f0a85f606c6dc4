"""Inpainting and linear observations of real images (``diffuse inpaint``).

:func:`parse_mask` and :func:`parse_observe` turn the command line's ``--mask`` and
``--observe`` into a ``cond`` for ``engine.sample(..., guidance=METHOD)``;
:func:`inpaint` samples completions of a batch of images and measures the observation
error; :func:`save_grids` writes observed / sampled / original grids as one PNG;
:func:`classifier_agreement` labels completions with an independent scikit-learn
classifier (the digits benchmark of docs/inverse.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffuse_engine.components.observation import downsample, greyscale
from diffuse_engine.core.errors import DiffuseError

MASKS = ("top", "bottom", "left", "right", "centre", "random:P", "FILE.npy")


def parse_mask(text: str, dims: tuple[int, ...], n: int, seed: int = 0) -> Tensor:
    """``--mask``: the hidden region (``top``, ``bottom``, ``left``, ``right`` half,
    ``centre`` box, ``random:P`` hides a fraction ``P`` of pixels per image) or a ``.npy``
    bool file of shape ``dims`` or ``(H, W)``, True where observed. Returns the
    observed mask ``(n, *dims)``."""
    H, W = dims[-2:]
    keep = torch.ones(dims, dtype=torch.bool)
    if text in ("top", "bottom", "left", "right", "centre"):
        if text == "top":
            keep[..., : H // 2, :] = False
        elif text == "bottom":
            keep[..., H // 2 :, :] = False
        elif text == "left":
            keep[..., :, : W // 2] = False
        elif text == "right":
            keep[..., :, W // 2 :] = False
        else:
            keep[..., H // 4 : H - H // 4, W // 4 : W - W // 4] = False
        return keep.expand(n, *dims)
    if text.startswith("random:"):
        try:
            p = float(text.split(":", 1)[1])
        except ValueError:
            p = -1.0
        if not 0 <= p <= 1:
            raise DiffuseError(f"--mask {text!r}: random:P needs a fraction P in [0, 1]")
        g = torch.Generator().manual_seed(seed)
        hide = torch.rand((n, 1, H, W), generator=g) < p
        return (~hide).expand(n, *dims[:-2], H, W)
    if text.endswith(".npy"):
        path = Path(text)
        if not path.is_file():
            raise DiffuseError(f"--mask {text!r}: no such file")
        arr = np.load(path, allow_pickle=False)
        if arr.dtype != np.bool_ or arr.shape not in (tuple(dims), (H, W)):
            raise DiffuseError(
                f"--mask {text!r}: a bool array of shape {tuple(dims)} or {(H, W)} "
                f"(True where observed), not {arr.dtype} {arr.shape}"
            )
        return torch.from_numpy(arr).expand(n, *dims)
    raise DiffuseError(f"--mask {text!r}: choices are {', '.join(MASKS)}")


def parse_observe(text: str, dims: tuple[int, ...]):
    """``--observe``: ``greyscale`` (colourisation, ``(C, H, W)`` images) or
    ``downsample:F`` (super-resolution by ``F x F`` averaging): a LinearOperator."""
    if text == "greyscale":
        return greyscale(dims)
    if text.startswith("downsample:"):
        try:
            factor = int(text.split(":", 1)[1])
        except ValueError:
            factor = 0
        return downsample(dims, factor)
    raise DiffuseError(f"--observe {text!r}: choices are greyscale, downsample:F")


def condition(x: Tensor, *, mask: Tensor | None = None, op=None, noise_std: float = 0.0,
              seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """The ``cond`` observing images ``x`` through ``mask`` or ``op`` (plus noise)."""
    g = torch.Generator().manual_seed(seed)
    if mask is not None:
        y = x + noise_std * torch.randn(x.shape, generator=g)
        return {
            "mask": mask,
            "y": torch.where(mask, y, torch.zeros_like(y)),
            "noise_std": noise_std,
        }
    y = op.forward(x)
    y = y + noise_std * torch.randn(y.shape, generator=g)
    return {"A": op, "y": y, "noise_std": noise_std}


def observed_view(cond: dict[str, Any], shape: tuple[int, ...]) -> Tensor:
    """What was seen, as images: hidden pixels mid-grey (0); ``A^T``-shaped
    (nearest upsampling, grey broadcast) for operators, rescaled by ``A A^T``."""
    if "mask" in cond:
        return torch.where(cond["mask"], cond["y"], torch.zeros(shape))
    op = cond["A"]
    back = op.adjoint(cond["y"].double())
    scale = op.adjoint(op.forward(torch.ones(1, *op.dims, dtype=torch.float64)))
    return (back / scale).float()


def observation_error(x: Tensor, cond: dict[str, Any]) -> float:
    """RMS of ``A x - y`` over observed entries."""
    if "mask" in cond:
        m = cond["mask"]
        return float((x - cond["y"])[m].pow(2).mean().sqrt()) if m.any() else 0.0
    return float((cond["A"].forward(x.double()) - cond["y"].double()).pow(2).mean().sqrt())


def save_grids(path: Path, panels: list[tuple[str, Tensor]], cols: int = 8) -> Path:
    """One PNG with a grid of images per panel (``(n, C, H, W)`` in [-1, 1])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffuse_engine.output.plotting import save_figure

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, imgs) in zip(axes[0], panels, strict=True):
        imgs = imgs.detach().float().cpu().clamp(-1, 1)[: cols * cols]
        n, C, H, W = imgs.shape
        rows = -(-n // cols)
        grid = torch.full((C, rows * (H + 1), cols * (W + 1)), -1.0)
        for i in range(n):
            r, c = divmod(i, cols)
            grid[:, r * (H + 1) : r * (H + 1) + H, c * (W + 1) : c * (W + 1) + W] = imgs[i]
        img = ((grid.permute(1, 2, 0) + 1) / 2).numpy()
        ax.imshow(img[..., 0] if C == 1 else img, cmap="gray" if C == 1 else None, vmin=0, vmax=1)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)


def classifier_agreement(train_x: Tensor, train_y: Tensor, x: Tensor, labels: Tensor) -> float:
    """Fraction of ``x`` that a scikit-learn classifier (logistic regression on the
    training images, independent of the score model) labels as ``labels``."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000).fit(train_x.reshape(len(train_x), -1).numpy(), train_y)
    pred = clf.predict(x.detach().float().cpu().reshape(len(x), -1).clamp(-1, 1).numpy())
    return float((torch.from_numpy(pred) == labels).float().mean())
