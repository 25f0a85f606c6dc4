"""PNG grids of image samples (matplotlib, headless)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def tile(images: torch.Tensor, nrow: int | None = None, pad: int = 1) -> torch.Tensor:
    """``(n, C, H, W)`` images in [-1, 1] -> one ``(rows*(H+pad), cols*(W+pad), C)`` array
    in [0, 1], ``nrow`` images per row (default: a square grid)."""
    x = images.detach().float().cpu().clamp(-1, 1).add(1).div(2)
    n, C, H, W = x.shape
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.ones(rows * (H + pad) + pad, cols * (W + pad) + pad, C)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[
            pad + r * (H + pad) : pad + r * (H + pad) + H,
            pad + c * (W + pad) : pad + c * (W + pad) + W,
        ] = x[i].permute(1, 2, 0)
    return grid


def plot_image_grid(
    images: torch.Tensor,
    path: str | Path,
    *,
    title: str = "",
    nrow: int | None = None,
    max_images: int = 100,
) -> Path:
    """Save up to ``max_images`` images ``(n, C, H, W)`` in [-1, 1] as a PNG grid."""
    grid = tile(images[:max_images], nrow)
    fig, ax = plt.subplots(figsize=(6, 6 * grid.shape[0] / grid.shape[1] + (0.4 if title else 0)))
    cmap = "gray" if grid.shape[2] == 1 else None
    ax.imshow(
        grid.squeeze(2) if grid.shape[2] == 1 else grid,
        cmap=cmap,
        vmin=0,
        vmax=1,
        interpolation="nearest",
    )
    ax.axis("off")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    from diffuse_engine.output.plotting import save_figure

    return save_figure(fig, path, dpi=110)
