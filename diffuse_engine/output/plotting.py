"""PNG plots of samples (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch import Tensor  # noqa: E402


def plot_samples(
    samples: Tensor,
    path: str | Path,
    *,
    reference: Tensor | None = None,
    title: str = "",
    max_points: int = 20000,
) -> Path:
    """Scatter the first two coordinates of ``samples`` beside ``reference`` data."""
    x = samples.detach().float().cpu().reshape(samples.shape[0], -1)[:max_points]
    panels = [("samples", x)]
    if reference is not None:
        ref = reference.detach().float().cpu().reshape(reference.shape[0], -1)[:max_points]
        panels.insert(0, ("data", ref))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5 * len(panels), 5), squeeze=False, sharex=True, sharey=True
    )
    for ax, (label, pts) in zip(axes[0], panels, strict=True):
        y = pts[:, 1] if pts.shape[1] > 1 else 0 * pts[:, 0]
        ax.scatter(
            pts[:, 0],
            y,
            s=1,
            alpha=0.25,
            color="tab:blue" if label == "samples" else "0.4",
            rasterized=True,
        )
        ax.set_title(label if pts.shape[1] <= 2 else f"{label} (first two of {pts.shape[1]} dims)")
        ax.set_aspect("equal", adjustable="box")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
