"""Training schedules: the learning rate of each step and the EMA decay of each update.

Pure functions of the settings and the step, so a resumed run continues them exactly
(the EMA's update count is saved with the EMA as ``n_averaged``).
"""

from __future__ import annotations

import math

import torch

from diffuse_engine.training.settings import TrainSettings


def ema_decay_at(s: TrainSettings, updates: int) -> float:
    """The EMA decay of update number ``updates`` (1, 2, ...): ``min(ema_decay, 1 - (1 +
    updates / gamma)^-power)``, the warm-up of k-diffusion's ``EMAWarmup`` and diffusers'
    ``EMAModel`` (so early, random weights are forgotten fast); ``ema_decay`` without."""
    if s.ema_power is None:
        return s.ema_decay
    return min(s.ema_decay, max(0.0, 1.0 - (1.0 + updates / s.ema_inv_gamma) ** -s.ema_power))


def learning_rate(s: TrainSettings, step: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based): linear warm-up over
    ``warmup`` steps, then constant or a cosine decay to ``lr * lr_min_ratio`` at step
    ``lr_horizon`` (default: the last step) and that rate after it (Loshchilov & Hutter
    2017, SGDR, without restarts). With a fixed horizon the rate of a step depends on
    nothing else, so a run resumed with more steps follows the uninterrupted schedule."""
    if s.warmup and step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    if s.lr_schedule == "constant":
        return s.lr
    end = s.lr_horizon if s.lr_horizon is not None else s.steps
    span = max(1, end - s.warmup)
    frac = min(1.0, max(0.0, (step - s.warmup) / span))
    low = s.lr * s.lr_min_ratio
    return low + (s.lr - low) * 0.5 * (1.0 + math.cos(math.pi * frac))


def ema_update(s: TrainSettings):
    """``multi_avg_fn`` of ``AveragedModel``: ``ema <- d ema + (1 - d) w`` with the decay
    ``d`` of :func:`ema_decay_at` at update ``n_averaged`` (saved with the EMA, so a
    resumed run continues the schedule)."""

    count: list[int] = []  # read from the device once (after a resume's load), then counted

    @torch.no_grad()
    def update(ema_params, params, n_averaged):
        if not count:
            count.append(int(n_averaged))
        decay = ema_decay_at(s, count[0])
        count[0] += 1
        if torch.is_floating_point(ema_params[0]) or torch.is_complex(ema_params[0]):
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        else:  # integer buffers, as torch's own EMA function treats them
            for e, p in zip(ema_params, params, strict=True):
                e.copy_(e * decay + p * (1 - decay))

    return update
