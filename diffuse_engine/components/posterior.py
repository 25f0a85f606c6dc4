"""The exact posterior of the Gaussian-mixture test bed under a linear-Gaussian observation.

With the prior ``sum_k w_k N(mu_k, s_k^2 I)`` and ``y = A x + sigma z`` (``A`` ``(m, d)``,
``z ~ N(0, I_m)``), Bayes' rule keeps a mixture, now with full covariances (the Kalman
update of each mode; Bishop, *PRML* 2006, sec. 2.3.3):

    S_k = s_k^2 A A^T + sigma^2 I          (the evidence covariance of mode k)
    G_k = s_k^2 A^T S_k^{-1}               (its gain)
    m_k = mu_k + G_k (y - A mu_k),   C_k = s_k^2 (I - G_k A)
    w'_k proportional to w_k N(y; A mu_k, S_k)

This form holds for ``sigma = 0`` too (a noiseless mask or projection), where the
posterior lives on the affine subspace ``{A x = y}``: :class:`GaussianPosterior` keeps an
orthonormal ``basis`` of its support (the null space of ``A`` when ``sigma = 0``, all of
``R^d`` otherwise), and its log-density is with respect to Lebesgue measure on that
support. :func:`posterior_statistics` measures samples against it mode by mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from diffuse_engine.components.mixture import GaussianMixture
from diffuse_engine.core.errors import DiffuseError


@dataclass(frozen=True)
class GaussianPosterior:
    """``sum_k weights_k N(means_k, covs_k)`` supported on ``offset + span(basis)``.

    ``means`` ``(K, d)``, ``covs`` ``(K, d, d)``, ``weights`` ``(K,)``, ``basis`` ``(d, r)``
    orthonormal, ``offset`` ``(d,)``; float64 on the CPU. ``log_evidence`` is ``log p(y)``.
    """

    means: Tensor
    covs: Tensor
    weights: Tensor
    basis: Tensor
    offset: Tensor
    log_evidence: float

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _reduced(self):
        """Means ``(K, r)``, Cholesky factors ``(K, r, r)`` in the support's coordinates."""
        B = self.basis
        mean_r = (self.means - self.offset) @ B
        cov_r = B.T @ self.covs @ B
        cov_r = 0.5 * (cov_r + cov_r.transpose(1, 2))
        return mean_r, torch.linalg.cholesky(cov_r)

    def component_log_probs(self, x: Tensor) -> Tensor:
        """``(B, K)``: ``log w_k + log N_k(x)`` on the support (``x`` ``(B, d)``)."""
        mean_r, L = self._reduced()
        z = (x.reshape(x.shape[0], -1).double().cpu() - self.offset) @ self.basis
        diff = z[:, None, :] - mean_r[None]  # (B, K, r)
        white = torch.linalg.solve_triangular(L[None], diff[..., None], upper=False)[..., 0]
        r = z.shape[1]
        logdet = 2 * torch.log(torch.diagonal(L, dim1=1, dim2=2)).sum(1)
        return (
            torch.log(self.weights)[None]
            - 0.5 * (r * math.log(2 * math.pi) + logdet)[None]
            - 0.5 * white.pow(2).sum(-1)
        )

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x | y)`` ``(B,)`` (density on the support)."""
        return torch.logsumexp(self.component_log_probs(x), dim=1)

    def assign(self, x: Tensor) -> Tensor:
        """The most responsible posterior mode of each sample ``(B,)``."""
        return self.component_log_probs(x).argmax(1)

    def sample(
        self, n: int, generator: torch.Generator | None = None, dtype=torch.float32
    ) -> Tensor:
        """``n`` exact posterior samples ``(n, d)`` (CPU), seeded by ``generator``."""
        mean_r, L = self._reduced()
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, mean_r.shape[1], generator=generator, dtype=torch.float64)
        xr = mean_r[k] + (L[k] @ z[..., None])[..., 0]
        return (self.offset + xr @ self.basis.T).to(dtype)


def linear_gaussian_posterior(
    prior: GaussianMixture, A: Tensor, y: Tensor, noise_std: float
) -> GaussianPosterior:
    """The exact posterior of ``prior`` given ``y = A x + noise_std z`` (module docstring).

    ``A`` is ``(m, d)``, ``y`` ``(m,)``. With ``noise_std = 0``, ``A`` must have full row
    rank (otherwise the observation may be impossible and the posterior undefined).
    """
    f64 = torch.float64
    mix = prior.to("cpu", f64)
    A, y = A.detach().to("cpu", f64), y.detach().reshape(-1).to("cpu", f64)
    m, d = A.shape
    if d != mix.dim or y.shape[0] != m:
        raise DiffuseError(
            f"posterior: A is {tuple(A.shape)} and y has {y.shape[0]} entries for a "
            f"{mix.dim}-dimensional prior; A must be (m, {mix.dim}) and y (m,)"
        )
    gram = A @ A.T
    eye_m, eye_d = torch.eye(m, dtype=f64), torch.eye(d, dtype=f64)
    if noise_std == 0 and m and torch.linalg.matrix_rank(A) < m:
        raise DiffuseError(
            f"posterior: a noiseless observation needs A of full row rank ({m}); this A "
            f"has rank {int(torch.linalg.matrix_rank(A))}"
        )
    var = mix.stds**2
    S = var[:, None, None] * gram + noise_std**2 * eye_m  # (K, m, m)
    resid = y - mix.means @ A.T  # (K, m)
    L = torch.linalg.cholesky(S)
    sol = torch.cholesky_solve(resid[..., None], L)[..., 0]  # S^-1 (y - A mu)
    means = mix.means + var[:, None] * (sol @ A)
    AtSinvA = A.T @ torch.cholesky_solve(A.expand(len(var), m, d), L)  # (K, d, d)
    covs = var[:, None, None] * (eye_d - var[:, None, None] * AtSinvA)
    covs = 0.5 * (covs + covs.transpose(1, 2))
    log_ev = (
        torch.log(mix.weights)
        - 0.5 * m * math.log(2 * math.pi)
        - torch.log(torch.diagonal(L, dim1=1, dim2=2)).sum(1)
        - 0.5 * (resid * sol).sum(1)
    )
    evidence = torch.logsumexp(log_ev, 0)
    weights = torch.softmax(log_ev, 0)
    if noise_std == 0 and m:
        _, _, Vh = torch.linalg.svd(A)
        basis, offset = Vh[m:].T.contiguous(), torch.linalg.pinv(A) @ y
    else:
        basis, offset = eye_d, torch.zeros(d, dtype=f64)
    return GaussianPosterior(means, covs, weights, basis, offset, float(evidence))


def posterior_statistics(
    samples: Tensor, post: GaussianPosterior, A: Tensor, y: Tensor, min_count: int = 10
) -> dict:
    """Samples ``(n, *dims)`` against the exact posterior, mode by mode.

    Each sample goes to its most responsible posterior mode. Summaries:

    * ``weight_tv``: ``0.5 sum_k |w_hat_k - w_k|``;
    * ``mean_error``: per mode, ``||L_k^{-1} (mean_hat_k - m_k)|| / sqrt(r)`` (the RMS
      offset in the mode's own standard deviations, ``C_k = L_k L_k^T`` on the ``r``-
      dimensional support), averaged with the posterior weights;
    * ``cov_error``: per mode, ``||L_k^{-1} C_hat_k L_k^{-T} - I||_F / sqrt(r)``, averaged
      the same way;
    * ``obs_error``: the RMS of ``A x - y`` per observed coordinate (compare ``noise_std``).

    Modes whose expected count ``n w_k`` is below ``min_count`` (or, for the covariance,
    below ``2 (r + 1)``) are left out of the averages; a mode with weight but no samples
    counts an error of 1. Exact samples of the same size give the noise floor.
    """
    x = samples.detach().reshape(samples.shape[0], -1).double().cpu()
    n = x.shape[0]
    finite = torch.isfinite(x).all(1)
    x = x[finite]
    A64, y64 = A.detach().double().cpu(), y.detach().reshape(-1).double().cpu()
    obs = (x @ A64.T - y64).pow(2).mean().sqrt().item() if A64.shape[0] else 0.0
    k = post.assign(x)
    K = post.weights.shape[0]
    w_hat = torch.bincount(k, minlength=K).double() / n
    mean_r, L = post._reduced()
    z = (x - post.offset) @ post.basis
    r = z.shape[1]
    mean_err, cov_err = [], []
    for j in range(K):
        expected = n * float(post.weights[j])
        zs = z[k == j]
        if expected < min_count:
            mean_err.append(None)
            cov_err.append(None)
            continue
        if zs.shape[0] < 2:
            mean_err.append(1.0)
            cov_err.append(1.0 if expected >= 2 * (r + 1) else None)
            continue
        off = torch.linalg.solve_triangular(L[j], (zs.mean(0) - mean_r[j])[:, None], upper=False)
        mean_err.append(float(off.norm() / math.sqrt(r)))
        if expected < 2 * (r + 1):
            cov_err.append(None)
            continue
        c = torch.cov(zs.T).reshape(r, r)
        Li = torch.linalg.inv(L[j])
        cov_err.append(float((Li @ c @ Li.T - torch.eye(r, dtype=c.dtype)).norm() / math.sqrt(r)))

    def avg(errs):
        pairs = [(float(post.weights[j]), e) for j, e in enumerate(errs) if e is not None]
        total = sum(w for w, _ in pairs)
        return sum(w * e for w, e in pairs) / total if total else float("nan")

    return {
        "n": n,
        "non_finite": int((~finite).sum()),
        "weight_tv": float(0.5 * (w_hat - post.weights).abs().sum()),
        "mean_error": avg(mean_err),
        "cov_error": avg(cov_err),
        "obs_error": obs,
        "modes": {
            "weight": w_hat.tolist(),
            "weight_true": post.weights.tolist(),
            "mean_error": mean_err,
            "cov_error": cov_err,
        },
    }
