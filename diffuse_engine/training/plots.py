"""Sample plots of a model in training: scatter beside the data, or an image grid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffuse_engine.components.builder import SampleFn
from diffuse_engine.training.settings import TrainSettings


def sample_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """``sde.FIELD`` overrides that rebuild the recorded SDE from its type's defaults."""
    return {f"sde.{k}": v for k, v in config["sde"].items() if k not in ("type", "name")}


def plot_model(
    sample: SampleFn, dist, model, config, dataset, path: Path, s: TrainSettings, step: int
):
    """Sample with the EMA model and save a scatter (vectors) or image grid (images)."""
    result = sample(
        score=model,
        sde=config["sde"]["type"],
        solver=s.plot_solver,
        shape=(s.plot_n, *model.data_shape),
        seed=s.seed,
        device=s.device,
        steps=s.plot_steps,
        **sample_overrides(config),
    )
    if not dist.is_main:  # every rank samples (collectively), rank 0 plots
        return
    plot_result(
        result.samples,
        path,
        dataset=dataset,
        title=f"{config['score']['type']} on {config['data']['name']}, step {step}: "
        f"{s.plot_solver}, {s.plot_steps} steps",
    )


def plot_losses_of(losses: list[float], config: dict[str, Any], path: Path) -> Path:
    """``loss.png``: the loss curve of a training run."""
    from diffuse_engine.output.plotting import plot_losses

    return plot_losses(
        losses,
        path,
        title=f"{config['score']['type']} on {config['data']['name']}: "
        f"{config['loss']['type']} loss",
    )


def plot_result(x: torch.Tensor, path: Path, *, dataset=None, title: str = "") -> Path:
    """Image grid for ``(n, C, H, W)`` samples, else a scatter beside the data."""
    x = x.detach().cpu()
    if x.dim() == 4:
        from diffuse_engine.output.image_grid import plot_image_grid

        if hasattr(dataset, "to_pixels"):
            x = dataset.to_pixels(x).reshape(x.shape)
        return plot_image_grid(x, path, title=title)
    from diffuse_engine.output.plotting import plot_samples

    reference = None
    if dataset is not None:
        reference = dataset.sample(x.shape[0], torch.Generator().manual_seed(12345))
    return plot_samples(x, path, reference=reference, title=title)
