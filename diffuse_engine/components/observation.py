"""Linear observations ``y = A x + noise_std z`` for inverse problems.

Samples ``x`` are ``(n, *dims)``; ``A`` acts on the flattened ``x`` (``d =
prod(dims)``). Two ways to say what was observed, both in ``cond`` of
``engine.sample(..., guidance=...)``:

* ``{"mask": m, "y": x_observed}``: a boolean ``m`` of shape ``dims`` (or ``(d,)``, or
  per sample ``(n, *dims)``), True where observed; ``y`` is ``(n, *dims)`` and only its
  observed entries are read (imputation, inpainting). ``noise_std`` defaults to 0.
* ``{"A": A, "y": y, "noise_std": s}``: ``A`` a dense ``(m, d)`` tensor or a
  :class:`LinearOperator` (:func:`greyscale`, :func:`downsample`, :func:`mask_operator`,
  :func:`operator` for your own callable and its adjoint); ``y`` is ``(n, m)`` or ``(n,
  *out_shape)``.

:func:`check_observation` validates either form once, before sampling, with one-line
errors naming the mask / ``y`` / ``A`` shape against ``x``; :func:`observation` turns the
validated condition of one shard into an :class:`Observation`, the few operations every
inverse-problem method needs (``A x``, ``A^T r``, the pseudo-inverse, the projector onto
the observed subspace and solves with ``c A A^T + s^2 I``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from diffuse_engine.core.errors import DiffuseError

#: cond keys an observation is made of; all but ``y`` and a per-sample mask are shared
OBSERVATION_KEYS = ("mask", "A", "y", "noise_std")


class LinearOperator:
    """``y = A vec(x)`` on samples of shape ``dims``, with its adjoint.

    ``forward(x) -> (B, m)`` on ``x`` ``(B, *dims)`` and ``adjoint(r) -> (B, *dims)``; the
    dense matrix ``(m, d)`` (built from the adjoint on the identity when not given) backs
    the pseudo-inverse and Gram solves, and the exact posterior.
    """

    def __init__(
        self,
        dims: tuple[int, ...],
        out_dim: int,
        forward: Callable[[Tensor], Tensor] | None = None,
        adjoint: Callable[[Tensor], Tensor] | None = None,
        matrix: Tensor | None = None,
        name: str = "A",
    ):
        self.dims, self.out_dim, self.name = tuple(dims), int(out_dim), name
        self.d = math.prod(self.dims)
        self._forward, self._adjoint = forward, adjoint
        self._matrix = None if matrix is None else matrix.detach().to("cpu", torch.float64)
        self._derived: dict[str, Tensor] = {}

    def __repr__(self) -> str:
        return f"{self.name}({self.out_dim} x {self.d} on {self.dims})"

    def forward(self, x: Tensor) -> Tensor:
        """``A vec(x)``: ``(B, m)``."""
        if self._forward is not None:
            return self._forward(x).reshape(x.shape[0], self.out_dim)
        return x.reshape(x.shape[0], -1) @ self._dense(x).T

    def adjoint(self, r: Tensor) -> Tensor:
        """``A^T r`` reshaped to ``(B, *dims)``."""
        if self._adjoint is not None:
            return self._adjoint(r).reshape(r.shape[0], *self.dims)
        return (r @ self._dense(r)).reshape(r.shape[0], *self.dims)

    def matrix(self) -> Tensor:
        """The dense ``(m, d)`` matrix (float64, CPU; built once)."""
        if self._matrix is None:
            eye = torch.eye(self.out_dim, dtype=torch.float64)
            self._matrix = self._adjoint(eye).reshape(self.out_dim, self.d).to(torch.float64)
        return self._matrix

    def _dense(self, like: Tensor) -> Tensor:
        return self._cached("A", like, lambda: self.matrix())

    def _cached(self, key: str, like: Tensor, make: Callable[[], Tensor]) -> Tensor:
        k = (key, like.device, like.dtype)
        if k not in self._derived:
            self._derived[k] = make().to(device=like.device, dtype=like.dtype)
        return self._derived[k]

    def pinv(self, like: Tensor) -> Tensor:
        """The pseudo-inverse ``A^+`` ``(d, m)`` (``torch.linalg.pinv``)."""
        return self._cached("pinv", like, lambda: torch.linalg.pinv(self.matrix()))

    def gram_eig(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """``A A^T = U diag(lam) U^T``: ``(lam (m,), U (m, m))`` (``torch.linalg.eigh``)."""
        if "eig" not in self._derived:
            A = self.matrix()
            lam, U = torch.linalg.eigh(A @ A.T)
            self._derived["eig"] = torch.cat([lam.clamp_min(0)[None], U])
        eig = self._cached("eig_like", like, lambda: self._derived["eig"])
        return eig[0], eig[1:]


def dense(A: Tensor, dims: tuple[int, ...]) -> LinearOperator:
    """The operator of a dense ``(m, d)`` matrix on samples of shape ``dims``."""
    return LinearOperator(dims, A.shape[0], matrix=A, name="dense")


def mask_operator(mask: Tensor) -> LinearOperator:
    """Selection of the True entries of a boolean ``mask`` (shape ``dims``)."""
    flat = mask.reshape(-1).bool().cpu()
    idx = flat.nonzero()[:, 0]
    A = torch.zeros(len(idx), flat.numel(), dtype=torch.float64)
    A[torch.arange(len(idx)), idx] = 1
    return LinearOperator(tuple(mask.shape), len(idx), matrix=A, name="mask")


def greyscale(dims: tuple[int, ...]) -> LinearOperator:
    """Colourisation: the mean over the channels of ``(C, H, W)`` images, ``(B, H*W)``."""
    if len(dims) != 3:
        raise DiffuseError(f"greyscale needs (C, H, W) images, not data of shape {tuple(dims)}")
    C, H, W = dims
    return LinearOperator(
        dims,
        H * W,
        forward=lambda x: x.mean(1).reshape(x.shape[0], -1),
        adjoint=lambda r: (r.reshape(-1, 1, H, W) / C).expand(-1, C, H, W),
        name="greyscale",
    )


def downsample(dims: tuple[int, ...], factor: int) -> LinearOperator:
    """Super-resolution: ``factor x factor`` average pooling of ``(..., H, W)`` data."""
    H, W = dims[-2:]
    if factor < 1 or H % factor or W % factor:
        raise DiffuseError(
            f"downsample:{factor} needs image sides divisible by {factor}, not {H} x {W}"
        )
    lead, f = dims[:-2], factor
    out = math.prod(lead) * (H // f) * (W // f)

    def fwd(x):
        x = x.reshape(-1, 1, H, W)
        return torch.nn.functional.avg_pool2d(x, f).reshape(-1, out)

    def adj(r):
        r = r.reshape(-1, 1, H // f, W // f)
        up = torch.nn.functional.interpolate(r, scale_factor=f, mode="nearest") / (f * f)
        return up.reshape(-1, *dims)

    return LinearOperator(dims, out, forward=fwd, adjoint=adj, name=f"downsample:{f}")


def operator(
    forward: Callable[[Tensor], Tensor],
    adjoint: Callable[[Tensor], Tensor],
    dims: tuple[int, ...],
    out_dim: int,
    name: str = "operator",
) -> LinearOperator:
    """Your own linear operator (blur, ...): ``forward(x (B, *dims)) -> (B, out_dim)`` and
    its adjoint ``adjoint(r (B, out_dim)) -> (B, *dims)``."""
    return LinearOperator(dims, out_dim, forward=forward, adjoint=adjoint, name=name)


# ---- validation -------------------------------------------------------------------------
def _noise_std(value: Any) -> float:
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise DiffuseError(f"cond['noise_std'] must be a number >= 0, not {value!r}") from None
    if not math.isfinite(s) or s < 0:
        raise DiffuseError(f"cond['noise_std'] must be a finite number >= 0, not {s}")
    return s


def check_observation(cond: Mapping[str, Any], shape: tuple[int, ...]) -> dict[str, Any]:
    """Validate a mask or linear observation for samples of ``shape`` ``(n, *dims)``.

    Returns the condition normalised: ``{"observed": (n, *dims) bool, "y", "noise_std"}``
    for a mask (a shared mask becomes an expanded view, so each shard gets its rows) or
    ``{"A": LinearOperator, "y": (n, m), "noise_std"}``. Other keys pass through.
    """
    n, dims = shape[0], tuple(shape[1:])
    d = math.prod(dims)
    out = {k: v for k, v in cond.items() if k not in OBSERVATION_KEYS}
    if ("mask" in cond) == ("A" in cond):
        raise DiffuseError(
            "an inverse problem needs cond with either 'mask' (and 'y') or 'A' (and 'y', "
            f"'noise_std'); got {', '.join(cond) or 'none'}"
        )
    y = cond.get("y")
    if not isinstance(y, Tensor) or not y.is_floating_point():
        got = f"{y.dtype} tensor" if isinstance(y, Tensor) else type(y).__name__
        raise DiffuseError(f"cond['y'] must be a floating-point tensor of observations, not {got}")
    noise_std = _noise_std(cond.get("noise_std", 0.0))
    if "mask" in cond:
        mask = cond["mask"]
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            got = f"{mask.dtype} tensor" if isinstance(mask, Tensor) else type(mask).__name__
            raise DiffuseError(f"cond['mask'] must be a bool tensor (True: observed), not {got}")
        if tuple(mask.shape) in (dims, (d,)):
            observed = mask.reshape(dims).expand(n, *dims)
        elif tuple(mask.shape) == tuple(shape):
            observed = mask
        else:
            raise DiffuseError(
                f"cond['mask'] has shape {tuple(mask.shape)}; for x of shape {tuple(shape)} "
                f"it must be {' or '.join(map(str, dict.fromkeys([dims, (d,), tuple(shape)])))}"
            )
        if tuple(y.shape) != tuple(shape):
            raise DiffuseError(
                f"cond['y'] has shape {tuple(y.shape)}; with a mask it is x observed, of "
                f"x's shape {tuple(shape)}"
            )
        if not bool(torch.isfinite(y[observed]).all()):
            raise DiffuseError("cond['y'] holds NaN/Inf at observed entries")
        return {**out, "observed": observed, "y": y, "noise_std": noise_std}
    A = cond["A"]
    if isinstance(A, Tensor):
        if A.dim() != 2 or A.shape[1] != d or not A.is_floating_point():
            raise DiffuseError(
                f"cond['A'] has shape {tuple(A.shape)}; for x of shape {tuple(shape)} it "
                f"must be a floating (m, {d}) matrix acting on flattened x"
            )
        A = dense(A, dims)
    elif isinstance(A, LinearOperator):
        if A.dims != dims:
            raise DiffuseError(
                f"cond['A'] ({A!r}) acts on samples of shape {A.dims}; x is {tuple(shape)}"
            )
    else:
        raise DiffuseError(
            f"cond['A'] must be an (m, d) tensor or a LinearOperator, not {type(A).__name__}"
        )
    if y.dim() < 2 or y.shape[0] != n or math.prod(y.shape[1:]) != A.out_dim:
        raise DiffuseError(
            f"cond['y'] has shape {tuple(y.shape)}; with A of {A.out_dim} rows it must be "
            f"({n}, {A.out_dim}) (one observation per sample)"
        )
    if not bool(torch.isfinite(y).all()):
        raise DiffuseError("cond['y'] holds NaN/Inf")
    return {**out, "A": A, "y": y.reshape(n, A.out_dim), "noise_std": noise_std}


# ---- what methods compute with ----------------------------------------------------------
class Observation:
    """One shard's observation: masks work elementwise (each sample may have its own),
    operators through :class:`LinearOperator`. Residuals live in observation space:
    ``(B, *dims)`` (zero off the mask) for masks, ``(B, m)`` for operators."""

    def __init__(self, cond: Mapping[str, Any]):
        self.y, self.noise_std = cond["y"], float(cond["noise_std"])
        self.mask = cond.get("observed")
        self.op: LinearOperator | None = cond.get("A")
        if self.mask is not None:
            self.y = torch.where(self.mask, self.y, torch.zeros_like(self.y))

    def _m(self, x: Tensor) -> Tensor | None:
        """The mask for a batch of ``x.shape[0] / n`` copies per sample (particles)."""
        if self.mask is None:
            return None
        reps = x.shape[0] // self.mask.shape[0]
        return self.mask if reps == 1 else self.mask.repeat_interleave(reps, 0)

    def _y(self, x: Tensor) -> Tensor:
        y = self.y.to(dtype=x.dtype)
        reps = x.shape[0] // y.shape[0]
        return y if reps == 1 else y.repeat_interleave(reps, 0)

    def forward(self, x: Tensor) -> Tensor:
        """``A x``; ``x`` may hold several consecutive copies per sample (particles)."""
        m = self._m(x)
        return x * m if m is not None else self.op.forward(x)

    def residual(self, x: Tensor) -> Tensor:
        """``y - A x``."""
        return self._y(x) - self.forward(x)

    def adjoint(self, r: Tensor, like: Tensor) -> Tensor:
        """``A^T r``, shaped like ``like`` (the ``x`` that ``r`` belongs to)."""
        m = self._m(like)
        return r * m if m is not None else self.op.adjoint(r)

    def gram_solve(self, r: Tensor, c: float, s2: float) -> Tensor:
        """``(c A A^T + s2 I)^{-1} r`` (masks: ``r / (c + s2)``)."""
        if self.mask is not None:
            return r / (c + s2)
        lam, U = self.op.gram_eig(r)
        return ((r @ U) / (c * lam + s2)) @ U.T

    def pinv_y(self, like: Tensor) -> Tensor:
        """``A^+ y``: the least-squares ``x`` of the observation, shaped like ``like``."""
        if self.mask is not None:
            return self._y(like)
        return (self._y(like) @ self.op.pinv(like).T).reshape(like.shape)

    def project(self, x: Tensor) -> Tensor:
        """``P x = A^+ A x``: the part of ``x`` the observation sees."""
        m = self._m(x)
        if m is not None:
            return x * m
        return (self.op.forward(x) @ self.op.pinv(x).T).reshape(x.shape)

    def observed_dim(self, like: Tensor) -> Tensor:
        """Number of observed coordinates per sample ``(B,)`` (the rank of ``A``)."""
        m = self._m(like)
        if m is not None:
            return m.reshape(m.shape[0], -1).sum(1).to(like.dtype)
        return torch.full((like.shape[0],), float(self.op.out_dim), dtype=like.dtype)


def observation(cond: Mapping[str, Any]) -> Observation:
    """The :class:`Observation` of one shard's validated ``cond``."""
    return Observation(cond)
