"""Inverse problems with an unconditional score: ``replacement``, ``repaint``, ``dps``, ``pigdm``.

All four sample ``p(x | y)`` for ``y = A x + noise_std z`` from a model of ``p(x)`` alone,
``cond={"mask": m, "y": x_obs}`` or ``cond={"A": A, "y": y, "noise_std": s}`` (see
:mod:`diffuse_engine.components.observation`). None is exact; docs/inverse.md measures
each one's bias against the exact posterior of the mixture test bed.

* ``replacement`` (Song et al. 2021, App. I.2; score_sde's ``controllable_generation``
  inpainter and colorizer): after each solver step the observed part of the state,
  ``P x = A^+ A x``, is replaced by a fresh forward-noised observation ``a_t A^+ y + s_t
  P z``; at the end ``P x = A^+ y``. It treats ``y`` as noiseless. A projection: solvers
  with ``supports_transform`` (pc, ode, ddim, dpm_solver, unipc, edm).
* ``repaint`` (Lugmayr et al., CVPR 2022): the same replacement around ancestral steps
  (the Gaussian posterior kernel ``q(x_s | x_t, x0_hat)``), with resampling: every
  ``jump_length`` steps it noises the state back up ``jump_length`` steps and denoises
  again, ``resamplings - 1`` times (the paper's ``jump_n_sample``), so the unobserved part
  harmonises with the observed one. Score evaluations: about ``steps * resamplings``. It
  owns the loop; the solver lends its time grid (``ddim`` or ``pc``).
* ``dps``, diffusion posterior sampling (Chung et al., ICLR 2023): the score plus ``scale
  grad_{x_t} log N(y; A x0_hat(x_t), std^2 I)`` with Tweedie's ``x0_hat`` and ``std =
  max(noise_std, min_std)`` (the Gaussian-noise form of the paper; ``min_std`` stands in
  for a noiseless observation). Any solver.
* ``pigdm``, pseudoinverse-guided diffusion (Song, Vahdat, Mardani & Kautz, ICLR 2023):
  the score plus ``scale (v^T d x0_hat / d x_t)`` with ``v = A^T (r_t^2 A A^T +
  noise_std^2 I)^{-1} (y - A x0_hat)`` and ``r_t^2 = c v_t / (c + v_t)``, ``v_t =
  (s_t / a_t)^2``, ``c = prior_var`` (the posterior variance of ``x_0`` given ``x_t`` under
  an ``N(0, c I)`` prior; the paper's ``c = 1``). Any solver.

``dps`` and ``pigdm`` differentiate through the score model (one evaluation with a
vector-Jacobian product per score call).
"""

from __future__ import annotations

import torch
from pydantic import Field

from diffuse_engine import SDE, Guidance, Guided, hookimpl
from diffuse_engine.components.guidance import GuidanceConfig
from diffuse_engine.components.observation import check_observation, observation


def times(t: float, like: torch.Tensor) -> torch.Tensor:
    """``t`` as a ``(B,)`` tensor like ``like``."""
    return torch.full((like.shape[0],), t, device=like.device, dtype=like.dtype)


def marginal(sde, t: float) -> tuple[float, float]:
    """``(a_t, s_t)`` of the kernel at one time, as floats."""
    a, s = sde.marginal(torch.tensor([t], dtype=torch.float64))
    return float(a[0]), float(s[0])


def posterior_kernel(sde, x, score, t: float, t_next: float):
    """The Gaussian posterior ``q(x_s | x_t, x0_hat)`` with Tweedie's ``x0_hat``, for any
    SDE (the base :meth:`SDE.ancestral_step`): ``(mean, std)``, ``std`` ``(B,)``."""
    return SDE.ancestral_step(sde, x, score, times(t, x), times(t_next, x))


def bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.dim() - 1)))


class InverseGuidance(Guidance):
    """Shared by the inverse-problem methods: validate a mask or a linear observation."""

    requires = ("y",)
    shared = ("mask", "A", "noise_std")

    def validate(self, cond, shape):
        return check_observation(super().validate(cond, shape), shape)


def replace_observed(obs, x, a: float, s: float, generator):
    """``x - P x + a A^+ y + s P z``: the observed part set to the noised observation."""
    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x - obs.project(x) + a * obs.pinv_y(x) + s * obs.project(z)


def pin(obs, x):
    """``x - P x + A^+ y``: the observed part set to the observation."""
    return x - obs.project(x) + obs.pinv_y(x)


class Replacement(InverseGuidance):
    """score_sde's replacement: project the observed part after each step."""

    name = "replacement"
    projects = True

    def bind(self, score, sde, cond, *, classifier=None, generator=None):
        obs = observation(cond)

        def transform(x, step, t_next):
            a, s = marginal(sde, t_next)
            return replace_observed(obs, x, a, s, generator)

        return Guided(
            score=lambda x, t: score(x, t, None),
            transform=transform,
            finish=lambda x: pin(obs, x),
        )


class RePaintConfig(GuidanceConfig):
    jump_length: int = Field(10, ge=1, description="steps noised back up per resampling")
    resamplings: int = Field(10, ge=1, description="passes over each jump (1: no resampling)")


def repaint_schedule(steps: int, jump_length: int, resamplings: int) -> list[int]:
    """Grid indices visited, from 0 (``T``) to ``steps`` (``eps``): RePaint's
    ``get_schedule_jump`` (Lugmayr et al. 2022, Alg. 1 and their code)."""
    jumps = {j: resamplings - 1 for j in range(0, steps - jump_length, jump_length)}
    t, out = steps, [steps]
    while t >= 1:
        t -= 1
        out.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                out.append(t)
    return [steps - u for u in out]


class RePaint(InverseGuidance):
    """RePaint: replacement around ancestral steps, with resampling jumps."""

    name = "repaint"
    Config = RePaintConfig
    solvers = ("ddim", "pc")

    def bind(self, score, sde, cond, *, classifier=None, generator=None):
        obs, c = observation(cond), self.config
        uncond = lambda x, t: score(x, t, None)  # noqa: E731

        def run(solver, sde, x, *, generator=generator, callback=None):
            grid = solver.time_grid(sde, uncond, x)
            path = repaint_schedule(len(grid) - 1, c.jump_length, c.resamplings)
            a, s = marginal(sde, grid[0])
            x = replace_observed(obs, x, a, s, generator)
            for i, (p, q) in enumerate(zip(path, path[1:], strict=False)):
                t, t_next = grid[p], grid[q]
                if q > p:  # down: one ancestral step, then the noised observation
                    mean, std = posterior_kernel(sde, x, uncond(x, times(t, x)), t, t_next)
                    x = mean + bcast(std, x) * torch.randn(
                        x.shape, generator=generator, device=x.device, dtype=x.dtype
                    )
                    a, s = marginal(sde, t_next)
                    x = replace_observed(obs, x, a, s, generator)
                else:  # up: the forward transition from t to t_next > t
                    (a_t, s_t), (a_n, s_n) = marginal(sde, t), marginal(sde, t_next)
                    ratio = a_n / a_t
                    std = max(s_n * s_n - ratio * ratio * s_t * s_t, 0.0) ** 0.5
                    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                    x = ratio * x + std * z
                if callback is not None:
                    callback(i + 1, len(path) - 1, t_next)
            return pin(obs, solver.finish(uncond, sde, x, grid[-1]))

        return Guided(score=uncond, run=run)


def _guided_score(score, sde, obs, weight_fn, scale: float):
    """``s(x, t) + scale (v^T d x0_hat / d x_t)`` with ``v = weight_fn(residual, t)``
    (the vector-Jacobian product through Tweedie's ``x0_hat``, by autograd)."""

    def guided(x, t):
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            s = score(xg, t, None)
            if scale == 0:
                return s.detach()
            x0 = sde.denoise(xg, s, t)
            v = obs.adjoint(weight_fn(obs.residual(x0).detach(), t), x0)
            (grad,) = torch.autograd.grad((x0 * v.detach()).sum(), xg)
        return torch.add(s.detach(), grad.to(s.dtype), alpha=scale)

    return guided


class DPSConfig(GuidanceConfig):
    min_std: float = Field(
        0.05, gt=0, description="observation std assumed when noise_std is smaller (noiseless)"
    )


class DPS(InverseGuidance):
    """Diffusion posterior sampling (Chung et al. 2023), Gaussian-noise form."""

    name = "dps"
    Config = DPSConfig

    def bind(self, score, sde, cond, *, classifier=None, generator=None):
        obs = observation(cond)
        var = max(obs.noise_std, self.config.min_std) ** 2
        return Guided(score=_guided_score(score, sde, obs, lambda r, t: r / var, self.config.scale))


class PiGDMConfig(GuidanceConfig):
    prior_var: float = Field(
        1.0, gt=0, description="c in r_t^2 = c v_t / (c + v_t): the data's variance scale"
    )


class PiGDM(InverseGuidance):
    """Pseudoinverse-guided diffusion (Song et al. 2023)."""

    name = "pigdm"
    Config = PiGDMConfig

    def bind(self, score, sde, cond, *, classifier=None, generator=None):
        obs, c = observation(cond), self.config.prior_var
        s2 = obs.noise_std**2

        def weight(r, t):
            a, s = marginal(sde, float(t[0]))
            v = (s / a) ** 2
            r2 = c * v / (c + v)
            return obs.gram_solve(r, r2, s2)

        return Guided(score=_guided_score(score, sde, obs, weight, self.config.scale))


@hookimpl
def diffuse_register_guidance():
    return [Replacement, RePaint, DPS, PiGDM]
