"""diffusers' discrete schedulers in the engine's continuous time.

A diffusers DDPM-family scheduler (``DDPMScheduler``, ``DDIMScheduler``,
``DPMSolverMultistepScheduler``, ...) holds ``alphas_cumprod`` for timesteps ``k = 0 ..
N - 1``; timestep ``k`` is chain step ``k + 1``, so its engine time is ``t = (k + 1) / N``
(the convention of the built-in ``ddpm`` chain, see :mod:`~diffuse_engine.interop.discrete`)
and a model is called with ``timestep_of(t) = t N - 1``. Times that land within 1e-3
of an integer timestep (a float32 ``t`` of a grid point) call it with exactly that
integer, as diffusers does; in between the model sees the fractional timestep.

:func:`like_diffusers` gives the engine solver and settings that take the same steps as a
diffusers scheduler: the engine times of the scheduler's own ``set_timesteps``
(``timestep_spacing``, ``steps_offset``, ``lambda_min_clipped``, ...), its final step
(``set_alpha_to_one`` / ``final_sigmas_type``: to ``alpha = 1``, the engine's final
denoising step, or to timestep 0), its orders (``solver_order``, ``lower_order_final``)
and its clipping (``clip_sample``, ``thresholding``), as an explicit ``times`` grid
(:class:`~diffuse_engine.components.kernel_solver.KernelSolverConfig`). From the same
``x_T`` the samples then agree with diffusers' loop to float round-off (the tests check
1e-4 relative per sample).

Scheduler configs are JSON, read as data; the class they name must be a scheduler of the
installed diffusers. diffusers is an optional extra: without it these functions say how
to install it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffuse_engine.core.errors import DiffuseError, IncompatibleError

INSTALL_HINT = 'diffusers is not installed; pip install "diffuse-engine[diffusers]"'
SCHEDULER_CONFIG = "scheduler_config.json"
#: integer timesteps within this distance are that integer (float32 grid times)
SNAP = 1e-3


def require_diffusers():
    """The ``diffusers`` module, or a one-line :class:`DiffuseError` saying how to install it."""
    try:
        import diffusers
    except ImportError:
        raise DiffuseError(INSTALL_HINT) from None
    return diffusers


def scheduler_config_path(path: str | Path) -> Path:
    """``path`` itself (a ``.json`` file) or ``scheduler_config.json`` in the folder ``path``
    or its ``scheduler/`` subfolder (the layout of a diffusers pipeline folder)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    for candidate in (p / SCHEDULER_CONFIG, p / "scheduler" / SCHEDULER_CONFIG):
        if candidate.is_file():
            return candidate
    raise DiffuseError(
        f"diffusers scheduler {p}: no {SCHEDULER_CONFIG} there or in {p / 'scheduler'}; "
        "give a diffusers model folder or the scheduler config file"
    )


def load_scheduler(source: Any):
    """A fresh diffusers scheduler from a folder or file (``scheduler_config.json``), a
    config dict, or a scheduler object (copied, so ``set_timesteps`` never touches it)."""
    diffusers = require_diffusers()
    where = "diffusers scheduler"
    if hasattr(source, "config") and hasattr(source, "set_timesteps"):
        return type(source).from_config(source.config)
    if isinstance(source, Mapping):
        config = dict(source)
    else:
        path = scheduler_config_path(source)
        where = f"diffusers scheduler {path}"
        try:
            config = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DiffuseError(f"{where}: not a readable JSON file ({exc})") from None
    name = config.get("_class_name") if isinstance(config, dict) else None
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise DiffuseError(
            f"{where}: _class_name {name!r} is not a scheduler of diffusers {diffusers.__version__}"
        )
    try:
        return cls.from_config(config)
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise DiffuseError(f"{where}: {name} refuses its config ({exc})") from None


def alphas_cumprod_of(scheduler) -> Tensor:
    """The scheduler's ``alphas_cumprod`` ``(N,)`` as float64, or a one-line error."""
    abar = getattr(scheduler, "alphas_cumprod", None)
    if not isinstance(abar, Tensor):
        raise IncompatibleError(
            f"diffusers scheduler {type(scheduler).__name__} has no alphas_cumprod: it is "
            "not a DDPM-family discrete schedule (DDPM, DDIM, DPM-Solver, PNDM, ...)"
        )
    return abar.detach().to(torch.float64).cpu()


def timestep_of(t: Tensor, N: int) -> Tensor:
    """diffusers' timestep ``t N - 1`` of engine times ``t`` (float64; snapped to the
    integer within :data:`SNAP`)."""
    u = t.detach().to(torch.float64) * N - 1
    r = u.round()
    return torch.where((u - r).abs() < SNAP, r, u)


def engine_time(k: int | float, N: int) -> float:
    """The engine time ``(k + 1) / N`` of diffusers timestep ``k``."""
    return (float(k) + 1.0) / N


def _clipping(config) -> dict[str, Any]:
    """The engine's x0 clipping fields for diffusers' ``thresholding`` / ``clip_sample``."""
    off = {"x0_clip": None, "x0_threshold": None, "x0_threshold_max": None}
    if config.get("thresholding", False):
        return {
            "x0_clip": 1.0,
            "x0_threshold": float(config["dynamic_thresholding_ratio"]),
            "x0_threshold_max": max(float(config["sample_max_value"]), 1.0),
        }
    if config.get("clip_sample", False):
        return {**off, "x0_clip": float(config.get("clip_sample_range", 1.0))}
    return off


def like_diffusers(scheduler: Any, steps: int) -> dict[str, Any]:
    """The engine solver and settings that take ``steps`` steps as ``scheduler`` does.

    ``scheduler``: a diffusers model folder, a ``scheduler_config.json``, a config dict or
    a scheduler object. Returns ``{"solver": NAME, **fields}``, ready for
    ``engine.sample(..., **like_diffusers(path, 10))`` together with the model's SDE
    (``sde="diffusers", scheduler=path``); the fields include the explicit ``times``.

    * ``DDIMScheduler`` -> ``ddim``. diffusers steps from ``k`` to ``k - N // steps``
      whatever its spacing; that must be the next timestep (``leading`` and ``trailing``
      spacings; ``linspace`` is refused). With ``clip_sample`` / ``thresholding`` the
      engine re-derives the noise from the clipped ``x0_hat``, which is diffusers'
      ``use_clipped_model_output=True``; ``eta`` is a call argument in both.
    * ``DPMSolverMultistepScheduler`` (``dpmsolver++`` and ``dpmsolver``, solver type
      ``midpoint``) -> ``dpm_solver`` multistep, same order and final step.

    Other schedulers, and options no engine solver reproduces step for step (Karras or
    other sigma spacings, the SDE variants, ``heun`` solver type, ``euler_at_final`` at 15
    steps or more with ``final_sigmas_type = "sigma_min"``), are refused with a one-line
    error; the model still samples with every engine solver.
    """
    sched = load_scheduler(scheduler)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise DiffuseError(f"steps must be a whole number >= 1, not {steps!r}")
    name = type(sched).__name__
    N = int(sched.config.num_train_timesteps)
    try:
        sched.set_timesteps(steps)
    except ValueError as exc:
        raise DiffuseError(f"diffusers {name}.set_timesteps({steps}): {exc}") from None
    ts = [int(k) for k in sched.timesteps.tolist()]
    if name == "DDIMScheduler":
        return _like_ddim(sched, ts, N, steps)
    if name == "DPMSolverMultistepScheduler":
        return _like_dpm(sched, ts, N)
    raise IncompatibleError(
        f"no engine solver reproduces diffusers' {name} step for step; supported: "
        "DDIMScheduler (ddim), DPMSolverMultistepScheduler (dpm_solver)"
    )


def _like_ddim(sched, ts: list[int], N: int, steps: int) -> dict[str, Any]:
    c = sched.config
    ratio = N // steps
    nxt = [k - ratio for k in ts]
    if nxt[:-1] != ts[1:]:
        raise IncompatibleError(
            f"diffusers DDIMScheduler with timestep_spacing {c.timestep_spacing!r} steps from "
            f"each timestep to t - {ratio}, which is not the next timestep ({ts[:3]} ...); "
            "no single time grid reproduces it: use 'leading' or 'trailing' spacing"
        )
    times = [engine_time(k, N) for k in ts]
    last = nxt[-1]
    denoise = False
    if last >= 0:  # a last step to timestep `last`
        times.append(engine_time(last, N))
    elif c.set_alpha_to_one:  # to alpha = 1: x0_hat at the last timestep
        denoise = True
    elif ts[-1] != 0:  # to alphas_cumprod[0], timestep 0 (from 0 itself: no move)
        times.append(engine_time(0, N))
    if len(times) < 2:
        raise IncompatibleError(
            f"diffusers DDIMScheduler with {steps} step(s) makes no engine step; use steps >= 2"
        )
    return {"solver": "ddim", "eta": 0.0, "times": times, "denoise": denoise, **_clipping(c)}


def _like_dpm(sched, ts: list[int], N: int) -> dict[str, Any]:
    c = sched.config
    n = len(ts)
    refused = [
        k
        for k in (
            "use_karras_sigmas",
            "use_lu_lambdas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "use_flow_sigmas",
        )
        if c.get(k, False)
    ]
    if c.algorithm_type not in ("dpmsolver++", "dpmsolver"):
        refused.append(f"algorithm_type {c.algorithm_type!r}")
    if c.solver_order == 2 and c.solver_type != "midpoint":
        refused.append(f"solver_type {c.solver_type!r}")
    lowered = c.lower_order_final and n < 15
    zero = c.final_sigmas_type == "zero"
    if not zero and c.euler_at_final and not lowered:
        refused.append("euler_at_final")
    if refused:
        raise IncompatibleError(
            f"diffusers DPMSolverMultistepScheduler with {', '.join(refused)}: no engine "
            "solver takes the same steps; the engine's own dpm_solver samples the model"
        )
    times = [engine_time(k, N) for k in ts]
    if not zero:  # the last step goes to timestep 0's sigma
        if ts[-1] == 0:
            raise IncompatibleError("diffusers DPMSolverMultistepScheduler ends at timestep 0")
        times.append(engine_time(0, N))
    return {
        "solver": "dpm_solver",
        "method": "multistep",
        "order": int(c.solver_order),
        "third_order": "reference",  # diffusers' 3M update (plugins/dpm_solver.py)
        "prediction": "data" if c.algorithm_type == "dpmsolver++" else "noise",
        # "zero": diffusers' last step (to sigma 0) is the engine's denoising step, which
        # the engine's lower_order_final counts as the run's last step, as diffusers does
        "lower_order_final": bool(c.lower_order_final),
        "times": times,
        "denoise": zero,
        **_clipping(c),
    }
