"""Numeric checks against closed forms: sample quality on the exact mixture and the
kernel against a Monte Carlo solve of the forward SDE."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffuse_engine.components.mixture import GaussianMixture, mode_statistics
from diffuse_engine.components.sde import SDE, bcast
from diffuse_engine.testbed.conformance.report import (
    CheckResult,
)


# ------------------------------------------------------------------------------------
# statistics shared with the test suite
# ------------------------------------------------------------------------------------
def quality_checks(
    samples: Tensor, mixture: GaussianMixture, z: float = 5.0, label: str = "sample quality"
) -> list[CheckResult]:
    """Per-mode weight, std and centre of ``samples`` against ``mixture``, each as the
    worst mode's deviation in standard errors at this sample size (bound ``z``)."""
    stats = mode_statistics(samples, mixture)
    n = stats["n"]
    m = stats["modes"]
    w_true = torch.tensor(m["weight_true"], dtype=torch.float64)
    w_hat = torch.tensor(m["weight"], dtype=torch.float64)
    n_k = (w_hat * n).clamp_min(1)
    w_se = (w_true * (1 - w_true) / n).sqrt().clamp_min(1e-12)
    w_z = float(((w_hat - w_true).abs() / w_se).max())
    std_z = float((torch.tensor(m["std_error"], dtype=torch.float64) * (2 * n_k).sqrt()).max())
    centre_z = float((torch.tensor(m["centre_error"], dtype=torch.float64) * n_k.sqrt()).max())
    nf = stats["non_finite"]
    detail = (
        f"n={n}, TV={stats['weight_tv']:.3g}, std err={stats['std_error']:.3g}, "
        f"centre err={stats['centre_error']:.3g}"
    )
    out = [
        CheckResult(
            f"{label}: mode weights",
            w_z <= z and nf == 0,
            f"{w_z:.2f} SE",
            f"<= {z:g} SE",
            detail + (f", {nf} non-finite" if nf else ""),
        ),
        CheckResult(f"{label}: mode stds", std_z <= z, f"{std_z:.2f} SE", f"<= {z:g} SE"),
        CheckResult(f"{label}: mode centres", centre_z <= z, f"{centre_z:.2f} SE", f"<= {z:g} SE"),
    ]
    return out


class _ForwardSDE(torch.nn.Module):
    """``sde`` as a torchsde Ito SDE with diagonal noise on flattened states."""

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, sde: SDE, shape: tuple[int, ...]):
        super().__init__()
        self.sde, self.shape = sde, shape

    def _t(self, t: Tensor, y: Tensor) -> Tensor:
        return t.to(y.dtype).expand(y.shape[0])

    def f(self, t, y):
        return self.sde.drift(y.view(self.shape), self._t(t, y)).reshape(y.shape)

    def g(self, t, y):
        return bcast(self.sde.diffusion(self._t(t, y)), y).expand_as(y)


def auto_mc_steps(sde: SDE, t_first: float, t_end: float, n: int) -> int:
    """Euler-Maruyama steps on ``[0, t_end]`` that keep its bias under about one
    standard error of the Monte-Carlo variance estimate at the compared times.

    Over a step ``dt`` EM's variance is off by about ``r dt / 2`` relative, with ``r =
    2 |f| + |d log g^2 / dt|`` (the stationary variance of EM on an OU process is
    ``v / (1 - |f| dt / 2)``; a left Riemann sum of ``g^2`` errs by half the log-rate),
    plus ``dt / t_first`` for a variance that starts like a power of ``t`` (sub-VP).
    With the largest ``r`` on ``[t_first / 2, t_end]`` and ``SE = sqrt(2 / n)``:
    ``dt = SE / (r + 1 / t_first)``.
    """
    t = torch.linspace(t_first / 2, t_end, 1001, dtype=torch.float64)
    f = sde.drift_coeff(t).abs()
    lg = torch.log(sde.diffusion(t).double() ** 2)
    dlg = (lg[1:] - lg[:-1]).abs() / (t[1] - t[0])
    rate = float((2 * f[1:] + dlg).max()) + 1 / t_first
    steps = math.ceil(t_end * rate / math.sqrt(2 / n))
    return int(min(max(steps, 200), 50_000))


def kernel_vs_sde(
    sde: SDE,
    *,
    n: int = 20000,
    mc_steps: int | None = None,
    seed: int = 0,
    z: float = 5.0,
    times: tuple[float, ...] = (0.1, 0.5, 0.9),
    device: str | torch.device = "cpu",
) -> list[CheckResult]:
    """Euler-Maruyama simulation of the forward SDE against its kernel.

    From ``x_0 = (1, -0.5)`` (each of ``n`` paths starts from the kernel at ``t = 0``,
    which is ``x_0`` itself unless the SDE starts from smoothed data), simulate with
    ``torchsde.sdeint(method="euler")`` in float64 to the fractions ``times`` of ``T``
    (``mc_steps`` steps up to the last; :func:`auto_mc_steps` when None) and compare per
    coordinate: the mean in units of ``std / sqrt(n)``, the variance ratio in units of
    ``sqrt(2 / (n - 1))``. The last time stays below ``T`` because schedules are often
    clipped to be stiff there (cosine), where EM would need far smaller steps.
    """
    import torchsde

    dev = torch.device(device)
    dt64 = torch.float64
    T = float(sde.T) * max(times)
    if mc_steps is None:
        try:
            mc_steps = auto_mc_steps(sde, min(times) * float(sde.T), T, n)
        except NotImplementedError:  # non-linear drift: no f(t) to size the step by
            mc_steps = 2000
    x0 = torch.tensor([1.0, -0.5], dtype=dt64, device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    zero = torch.zeros(n, dtype=dt64, device=dev)
    a0, s0 = sde.marginal(zero)
    y0 = bcast(a0, x0[None]) * x0 + bcast(s0, x0[None]) * torch.randn(
        n, 2, generator=gen, dtype=dt64, device=dev
    )
    ts = torch.tensor([0.0] + [f * float(sde.T) for f in times], dtype=dt64, device=dev)
    bm = torchsde.BrownianInterval(
        t0=0.0,
        t1=T,
        size=(n, 2),
        dtype=dt64,
        device=dev,
        entropy=seed,
        levy_area_approximation="none",
    )
    with torch.no_grad():
        ys = torchsde.sdeint(
            _ForwardSDE(sde, (n, 2)), y0, ts, method="euler", dt=T / mc_steps, bm=bm
        )
    out = []
    for j, frac in enumerate(times, start=1):
        t = torch.full((1,), float(ts[j]), dtype=dt64, device=dev)
        a, s = (float(v) for v in sde.marginal(t))
        y = ys[j]
        if not torch.isfinite(y).all():
            out.append(CheckResult(f"kernel vs SDE at t={frac:g}T", False, "non-finite paths"))
            continue
        mean_z = float(((y.mean(0) - a * x0).abs() / (s / math.sqrt(n))).max())
        var_ratio = y.var(0) / s**2
        var_z = float(((var_ratio - 1).abs() / math.sqrt(2 / (n - 1))).max())
        detail = (
            f"kernel mean coeff {a:.4g}, std {s:.4g}; MC mean {y.mean(0).tolist()[0]:.4g}"
            f"/{a * float(x0[0]):.4g}, var ratio {float(var_ratio.mean()):.4f}"
        )
        out.append(
            CheckResult(
                f"kernel vs SDE at t={frac:g}T: mean",
                mean_z <= z,
                f"{mean_z:.2f} SE",
                f"<= {z:g} SE",
                detail,
            )
        )
        out.append(
            CheckResult(
                f"kernel vs SDE at t={frac:g}T: variance",
                var_z <= z,
                f"{var_z:.2f} SE",
                f"<= {z:g} SE",
                f"n={n}, EM steps={mc_steps}",
            )
        )
    return out
