"""Engine overhead: ``Engine.sample`` against a plain hand-written torch loop.

Both do the same updates with the same score, alternating in one process so both see
the same machine; the ratio is engine time over loop time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

import torch


def mlp_score(dim: int = 2, width: int = 128, seed: int = 0, device: str = "cpu"):
    """A 3-layer MLP ``(x, t) -> score`` with fixed random weights (its values do not
    matter for timing; it is scaled small so 1000-step runs stay finite)."""
    g = torch.Generator().manual_seed(seed)

    def layer(i, o):
        w = torch.randn(i, o, generator=g) / math.sqrt(i)
        return w.to(device), torch.zeros(o, device=device)

    (w1, b1), (w2, b2), (w3, b3) = layer(dim + 1, width), layer(width, width), layer(width, dim)
    w3 = w3 * 0.01

    def score(x, t):
        h = torch.nn.functional.silu(torch.cat([x, t[:, None]], 1) @ w1 + b1)
        h = torch.nn.functional.silu(h @ w2 + b2)
        return h @ w3 + b3 - x

    return score


def hand_pc_vp(
    score, x, steps: int, eps: float, beta_min: float, beta_max: float, snr: float, generator
) -> torch.Tensor:
    """Hand-written PC sampler on the VP SDE: Langevin corrector then reverse-diffusion
    predictor per step, final Tweedie step (Song et al. 2021, Alg. 1) — the updates the
    engine's ``pc`` solver makes, written as one plain loop."""
    B = x.shape[0]

    def lmc(t):
        return -0.5 * (beta_min * t + 0.5 * t * t * (beta_max - beta_min))

    for i in range(steps):
        t = 1.0 + (eps - 1.0) * i / steps
        t_next = 1.0 + (eps - 1.0) * (i + 1) / steps
        tt = torch.full((B,), t, device=x.device, dtype=x.dtype)
        grad = score(x, tt)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        gn = torch.linalg.vector_norm(grad.flatten(1), dim=1).mean()
        nn_ = torch.linalg.vector_norm(noise.flatten(1), dim=1).mean()
        step = 2 * (snr * nn_ / gn) ** 2
        x = x + step * grad + (2 * step).sqrt() * noise
        beta = -math.expm1(2 * (lmc(t) - lmc(t_next)))
        x = x - (math.sqrt(1 - beta) - 1) * x + beta * score(x, tt)
        x = x + math.sqrt(beta) * torch.randn(
            x.shape, generator=generator, device=x.device, dtype=x.dtype
        )
    tt = torch.full((B,), eps, device=x.device, dtype=x.dtype)
    lm = lmc(eps)
    a, s2 = math.exp(lm), -math.expm1(2 * lm)
    return (x + s2 * score(x, tt)) / a


def hand_rk4_vp(score, x, steps: int, eps: float, beta_min: float, beta_max: float) -> torch.Tensor:
    """Hand-written classic RK4 on the VP probability-flow ODE ``dx/dt = -1/2 beta(t)
    (x + score)``, final Tweedie step: the engine's ``ode`` solver as one plain loop."""
    B = x.shape[0]

    def f(x, t):
        beta = beta_min + t * (beta_max - beta_min)
        tt = torch.full((B,), t, device=x.device, dtype=x.dtype)
        return (-0.5 * beta) * (x + score(x, tt))

    for i in range(steps):
        t = 1.0 + (eps - 1.0) * i / steps
        h = (eps - 1.0) / steps
        k1 = f(x, t)
        k2 = f(x + 0.5 * h * k1, t + 0.5 * h)
        k3 = f(x + 0.5 * h * k2, t + 0.5 * h)
        k4 = f(x + h * k3, t + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    tt = torch.full((B,), eps, device=x.device, dtype=x.dtype)
    lm = -0.5 * (beta_min * eps + 0.5 * eps * eps * (beta_max - beta_min))
    a, s2 = math.exp(lm), -math.expm1(2 * lm)
    return (x + s2 * score(x, tt)) / a


def overhead(
    engine: Any,
    solvers: Iterable[str] = ("pc", "ode"),
    steps: int = 1000,
    batch: int = 4096,
    repeats: int = 3,
    device: str = "cpu",
    log=print,
) -> list[dict[str, Any]]:
    """Engine time over hand-written-loop time for each solver (VP SDE, MLP score).

    Runs alternate (engine, loop, engine, loop, ...) so both see the same machine load;
    the ratio uses the fastest run of each, the usual estimate of the true cost. On the
    CPU the clock is the process's CPU time (use one thread), which other jobs on a
    busy machine do not inflate; on CUDA it is wall time after a synchronize. glibc's
    page-fault churn on large blocks, which made identical loops differ by 30 %, is
    turned off first (:func:`~diffuse_engine.core.allocator.keep_freed_memory`).
    """
    from diffuse_engine.core.allocator import keep_freed_memory

    kept = keep_freed_memory()
    score = mlp_score(device=device)
    sde_obj = engine.build("sde", "vp")
    c = sde_obj.config
    rows = []
    for name in solvers:
        solver_obj = engine.build("solver", name, steps=steps)
        eps = solver_obj.eps(sde_obj)
        t_engine, t_hand = [], []
        for _ in range(repeats):
            start = _clock(device)
            engine.sample(
                score=score,
                sde="vp",
                solver=name,
                shape=(batch, 2),
                seed=0,
                device=device,
                steps=steps,
            )
            _sync(device)
            t_engine.append(_clock(device) - start)
            gen = torch.Generator(device=device).manual_seed(0)
            start = _clock(device)
            x = sde_obj.prior_sample((batch, 2), generator=gen, device=device)
            with torch.no_grad():
                if solver_obj.name == "pc":
                    hand_pc_vp(
                        score, x, steps, eps, c.beta_min, c.beta_max, solver_obj.config.snr, gen
                    )
                else:
                    hand_rk4_vp(score, x, steps, eps, c.beta_min, c.beta_max)
            _sync(device)
            t_hand.append(_clock(device) - start)
        # the engine's own cost, isolated: the same runs with a free score (-x), where
        # the difference is all bookkeeping; added to the MLP loop time it gives a ratio
        # far less sensitive to a busy machine than the direct one
        free_e, free_h = [], []
        for _ in range(max(repeats, 5)):
            free_e.append(
                _timed(
                    device,
                    lambda name=name: engine.sample(
                        score=_free_score,
                        sde="vp",
                        solver=name,
                        shape=(batch, 2),
                        seed=0,
                        device=device,
                        steps=steps,
                    ),
                )
            )
            free_h.append(
                _timed(
                    device,
                    lambda s=solver_obj, e=eps: _hand(
                        s, _free_score, sde_obj, batch, steps, e, device
                    ),
                )
            )
        extra = min(free_e) - min(free_h)
        row = {
            "solver": name,
            "steps": steps,
            "batch": batch,
            "engine_s": min(t_engine),
            "loop_s": min(t_hand),
            "ratio": min(t_engine) / min(t_hand),
            "extra_ms_per_step": 1e3 * extra / steps,
            "implied_ratio": (min(t_hand) + extra) / min(t_hand),
            "engine_runs": t_engine,
            "loop_runs": t_hand,
            "device": device,
            "allocator": "freed memory kept" if kept else "default",
        }
        rows.append(row)
        log(
            f"overhead {name}: engine {row['engine_s']:.2f}s, loop {row['loop_s']:.2f}s, "
            f"ratio {row['ratio']:.3f}; bookkeeping {row['extra_ms_per_step']:.3f} ms/step, "
            f"implied ratio {row['implied_ratio']:.3f}"
        )
    return rows


def _free_score(x, t):
    return -x


def _hand(solver_obj, score, sde_obj, batch, steps, eps, device):
    c = sde_obj.config
    gen = torch.Generator(device=device).manual_seed(0)
    x = sde_obj.prior_sample((batch, 2), generator=gen, device=device)
    with torch.no_grad():
        if solver_obj.name == "pc":
            return hand_pc_vp(
                score, x, steps, eps, c.beta_min, c.beta_max, solver_obj.config.snr, gen
            )
        return hand_rk4_vp(score, x, steps, eps, c.beta_min, c.beta_max)


def _timed(device, fn) -> float:
    start = _clock(device)
    fn()
    _sync(device)
    return _clock(device) - start


def _clock(device: str) -> float:
    """CPU time of this process on the CPU (robust to other jobs on a shared machine,
    with one intra-op thread), wall time on an accelerator."""
    return time.perf_counter() if torch.device(device).type == "cuda" else time.process_time()


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
