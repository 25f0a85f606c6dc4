"""Gaussian mixtures: the exact test bed.

A mixture of axis-aligned Gaussians ``sum_k w_k N(mu_k, diag(sigma_k^2))`` perturbed by
any SDE's Gaussian kernel stays a mixture: ``p_t = sum_k w_k N(a mu_k, diag(a^2
sigma_k^2 + s^2))`` with ``(a, s) = sde.marginal(t)``; ``stds`` is ``(K,)`` for
isotropic modes or ``(K, d)`` per dimension (elongated modes). Its log-density and
score are therefore known in closed form at every ``t``, which is what lets us check
samplers, kernels and likelihoods against exact answers. :func:`mode_statistics`
measures how well a set of samples reproduces the mixture, mode by mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class GaussianMixture:
    """``means`` ``(K, d)``, ``stds`` ``(K,)`` (isotropic) or ``(K, d)`` (per
    dimension), ``weights`` ``(K,)`` summing to one."""

    means: Tensor
    stds: Tensor
    weights: Tensor

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def std_matrix(self) -> Tensor:
        """Per-mode, per-dimension stds ``(K, d)`` (isotropic modes broadcast)."""
        if self.stds.dim() == 2:
            return self.stds
        return self.stds[:, None].expand(-1, self.dim)

    def moments(self) -> tuple[Tensor, Tensor]:
        """Per-dimension mean and variance of the mixture, each ``(d,)``: ``sum_k w_k
        mu_k`` and ``sum_k w_k (sigma_k^2 + mu_k^2) - mean^2``."""
        w = self.weights[:, None]
        mean = (w * self.means).sum(0)
        second = (w * (self.std_matrix**2 + self.means**2)).sum(0)
        return mean, (second - mean**2).clamp(min=0.0)

    def to(self, device=None, dtype=None) -> GaussianMixture:
        return GaussianMixture(
            *(v.to(device=device, dtype=dtype) for v in (self.means, self.stds, self.weights))
        )

    def _components(self, x: Tensor, mean_coeff: Tensor | None, std: Tensor | None):
        """Per-sample, per-mode centres ``(B, K, d)`` and variances ``(B, K)``
        (isotropic) or ``(B, K, d)``."""
        m = self.to(x.device, x.dtype)
        B = x.shape[0]
        a = torch.ones(B, device=x.device, dtype=x.dtype) if mean_coeff is None else mean_coeff
        s = torch.zeros(B, device=x.device, dtype=x.dtype) if std is None else std
        centres = a[:, None, None] * m.means[None]
        if m.stds.dim() == 2:
            var = a[:, None, None] ** 2 * m.stds[None] ** 2 + s[:, None, None] ** 2
        else:
            var = a[:, None] ** 2 * m.stds[None] ** 2 + s[:, None] ** 2
        return m, centres, var

    def _log_joint(self, x: Tensor, mean_coeff=None, std=None):
        m, centres, var = self._components(x, mean_coeff, std)
        flat = x.reshape(x.shape[0], -1)
        d = flat.shape[1]
        diff = flat[:, None, :] - centres
        if var.dim() == 3:
            logp = torch.log(m.weights)[None] - 0.5 * (
                torch.log(2 * math.pi * var) + diff.pow(2) / var
            ).sum(-1)
            return logp, diff, var
        logp = (
            torch.log(m.weights)[None]
            - 0.5 * d * torch.log(2 * math.pi * var)
            - diff.pow(2).sum(-1) / (2 * var)
        )
        return logp, diff, var[..., None]

    def log_prob(
        self, x: Tensor, mean_coeff: Tensor | None = None, std: Tensor | None = None
    ) -> Tensor:
        """Log-density of the (perturbed) mixture at ``x`` ``(B, *dims)``: ``(B,)``."""
        logp, _, _ = self._log_joint(x, mean_coeff, std)
        return torch.logsumexp(logp, dim=1)

    def score(
        self, x: Tensor, mean_coeff: Tensor | None = None, std: Tensor | None = None
    ) -> Tensor:
        """``grad_x log p`` of the (perturbed) mixture, same shape as ``x``."""
        logp, diff, var = self._log_joint(x, mean_coeff, std)
        resp = torch.softmax(logp, dim=1)
        return (-resp[..., None] / var * diff).sum(1).reshape(x.shape)

    def component_log_probs(
        self, x: Tensor, mean_coeff: Tensor | None = None, std: Tensor | None = None
    ) -> Tensor:
        """``(B, K)``: ``log w_k + log N_k(x)`` of each (perturbed) mode at ``x``; its
        softmax over ``k`` is the exact posterior ``p_t(k | x)`` (the exact classifier)."""
        return self._log_joint(x, mean_coeff, std)[0]

    def component_score(
        self, x: Tensor, k: Tensor, mean_coeff: Tensor | None = None, std: Tensor | None = None
    ) -> Tensor:
        """``grad_x log N_k(x)`` of mode ``k[b]`` for each sample ``b`` (the exact
        class-conditional score); ``k`` is ``(B,)`` integer."""
        m, centres, var = self._components(x, mean_coeff, std)
        idx = torch.arange(x.shape[0], device=x.device)
        flat = x.reshape(x.shape[0], -1)
        v = var[idx, k] if var.dim() == 3 else var[idx, k, None]
        return (-(flat - centres[idx, k]) / v).reshape(x.shape)

    def sample(
        self, n: int, generator: torch.Generator | None = None, device=None, dtype=torch.float32
    ) -> Tensor:
        """Draw ``n`` exact samples ``(n, d)``."""
        m = self.to(device, dtype)
        k = torch.multinomial(m.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, device=device, dtype=dtype)
        return m.means[k] + m.std_matrix[k] * z

    def assign(self, x: Tensor) -> Tensor:
        """Index of the most responsible mode for each sample ``(B,)``."""
        logp, _, _ = self._log_joint(x)
        return logp.argmax(1)


def mode_statistics(samples: Tensor, mixture: GaussianMixture) -> dict:
    """Per-mode statistics of ``samples`` ``(n, d)`` against ``mixture``.

    Each sample is assigned to its most responsible mode. Returns per-mode lists and
    three summaries:

    * ``weight_tv``: total variation ``0.5 * sum_k |w_hat_k - w_k|``; ``weight_max``
      the largest single ``|w_hat_k - w_k|``.
    * ``std_error``: mean over modes of ``mean_d |std_hat_kd / sigma_kd - 1|``
      (relative; a missing mode counts 1).
    * ``centre_error``: mean over modes of ``||(mu_hat_k - mu_k) / sigma_k|| / sqrt(d)``,
      the RMS per-coordinate centre offset in units of the mode's std.

    With ``n_k`` samples in a mode the sampling noise of the last two is about
    ``1 / sqrt(2 n_k)`` and ``1 / sqrt(n_k)``; of a weight ``sqrt(w (1 - w) / n)``.
    """
    x = samples.detach().reshape(samples.shape[0], -1).double().cpu()
    mix = mixture.to("cpu", torch.float64)
    n, d = x.shape
    finite = torch.isfinite(x).all(1)
    x = x[finite]
    k = mix.assign(x)
    K = mix.weights.shape[0]
    counts = torch.bincount(k, minlength=K).double()
    w_hat = counts / n  # non-finite samples count as lost mass
    stds, centres, std_err, centre_err = [], [], [], []
    for j in range(K):
        xs = x[k == j]
        if xs.shape[0] < 2:
            stds.append(float("nan"))
            centres.append([float("nan")] * d)
            std_err.append(1.0)
            centre_err.append(float("inf"))
            continue
        sd = xs.std(0)
        mu = xs.mean(0)
        stds.append(float(sd.mean()))
        centres.append(mu.tolist())
        sj = mix.std_matrix[j]
        std_err.append(float((sd / sj - 1).abs().mean()))
        centre_err.append(float(((mu - mix.means[j]) / sj).norm() / math.sqrt(d)))
    dw = (w_hat - mix.weights).abs()
    return {
        "n": n,
        "non_finite": int((~finite).sum()),
        "weight_tv": float(0.5 * dw.sum()),
        "weight_max": float(dw.max()),
        "std_error": sum(std_err) / K,
        "centre_error": sum(centre_err) / K,
        "modes": {
            "weight": w_hat.tolist(),
            "weight_true": mix.weights.tolist(),
            "std": stds,
            "std_true": mix.stds.tolist(),
            "std_error": std_err,
            "centre": centres,
            "centre_error": centre_err,
        },
    }
