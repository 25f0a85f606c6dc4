"""PNG plots of samples (matplotlib, headless)."""

from __future__ import annotations

import io
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
    return save_figure(fig, path, dpi=110)


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Render ``fig`` to PNG in memory, then write it atomically
    (:func:`~diffuse_engine.output.files.atomic_write_bytes`): a full disk leaves no
    half-written image, only a one-line :class:`~diffuse_engine.output.files.OutputError`."""
    from diffuse_engine.output.files import atomic_write_bytes

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def plot_losses(losses: list[float], path: str | Path, *, title: str = "") -> Path:
    """The training loss per step (light) and its running mean over ~1 % of the run
    (dark), on a log scale when every loss is positive."""
    import numpy as np

    y = np.asarray(losses, dtype=float)
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = np.arange(1, len(y) + 1)
    ax.plot(steps, y, lw=0.5, alpha=0.35, color="tab:blue", label="loss")
    w = max(1, len(y) // 100)
    if len(y) >= 2 * w > 2:
        smooth = np.convolve(y, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1 :], smooth, lw=1.5, color="tab:blue", label=f"mean of {w} steps")
        ax.legend(loc="upper right")
    if len(y) and np.all(np.isfinite(y)) and np.all(y > 0):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)
