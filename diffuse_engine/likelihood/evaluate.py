"""Exact log-likelihoods through the probability-flow ODE (Song et al. 2021, Sec. 4.3,
App. D.2).

With the probability-flow ODE ``dx/dt = f~(x, t) = f(x, t) - 1/2 g(t)^2 s(x, t)`` and
the instantaneous change of variables (Chen et al., "Neural Ordinary Differential
Equations", 2018)::

    log p_eps(x(eps)) = log p_T(x(T)) + int_eps^T div f~(x(t), t) dt

integrated forward from the data at ``eps`` to ``T`` together with ``x`` by torchdiffeq
(adaptive Dormand-Prince by default). The divergence is

* ``exact``: ``sum_i d f~_i / d x_i`` by ``D`` reverse-mode passes (small ``D``);
* ``hutchinson``: the Hutchinson-Skilling estimator ``v^T (d f~ / d x) v`` with
  ``probes`` Rademacher or Gaussian vectors ``v`` (``E[v v^T] = I``), one
  vector-Jacobian product each (Hutchinson 1989; Skilling 1989; Grathwohl et al.,
  FFJORD, 2019). The probes are drawn once per solve and held fixed along the
  trajectory, so the log-likelihood estimate is unbiased (the state ``x(t)`` does not
  depend on them);
* ``auto``: exact up to ``exact_max_dim`` dimensions, Hutchinson above.

``log p_T`` is the SDE's prior log-density. What is returned is ``log p_eps`` at the
SDE's sampling ``eps`` (1e-3 for VP and sub-VP, 1e-5 for VE): the density of the data
perturbed by the kernel at ``eps``. It tends to ``log p_0`` as ``eps -> 0`` for VP and
sub-VP; for VE the kernel std never drops below ``sigma_min``, so it is the data
convolved with ``N(0, sigma_min^2 I)`` (the paper's convention).

Image data: with ``dequantize = true`` each value on the ``levels`` grid spanning
``data_range`` (e.g. 256 levels on ``[-1, 1]``) is replaced by a uniform draw over its
bin and the result is the variational bound on the discrete log-probability,
``log p(y) + D log(bin width)`` (Theis et al. 2016; Ho et al. 2019), which
:func:`bits_per_dim` turns into bits/dim as the SDE paper reports them.

Settings are a validated pydantic model, :class:`LikelihoodConfig`, rather than a
registry entry: the registry's tables (``sde``, ``kernel``, ``score``, ``loss``,
``data``, ``solver``) name interchangeable plugin implementations, and a likelihood
estimator is neither a sampler nor a plugin kind; registering it as a ``solver``
would offer it to ``diffuse run --solver``. Its fields are passed as keyword
overrides (``engine.log_likelihood(x, rtol=1e-6, divergence="hutchinson")``) or
``--set`` on the command line, and are validated with the same one-line errors.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torchdiffeq
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor

from diffuse_engine.components.builder import Builder
from diffuse_engine.components.differentiable import ADAPTIVE_ODE_METHODS, FIXED_ODE_METHODS
from diffuse_engine.components.score import ScoreBoundary, ScoreFn
from diffuse_engine.components.sde import SDE
from diffuse_engine.components.solver import MAX_STEPS
from diffuse_engine.core.devices import check_device
from diffuse_engine.core.errors import DiffuseError, NumericalError, RegistryError
from diffuse_engine.output.progress import progress_bar


class LikelihoodConfig(BaseModel):
    """Settings of the likelihood estimator (validated; unknown fields are errors)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal[
        "dopri5",
        "dopri8",
        "bosh3",
        "fehlberg2",
        "adaptive_heun",
        "euler",
        "midpoint",
        "heun3",
        "rk4",
    ] = Field("dopri5", description="torchdiffeq method (adaptive unless euler/midpoint/heun3/rk4)")
    rtol: float = Field(1e-5, gt=0, description="relative tolerance (adaptive methods)")
    atol: float = Field(1e-5, gt=0, description="absolute tolerance (adaptive methods)")
    steps: int = Field(200, ge=1, le=MAX_STEPS, description="steps of a fixed-grid method")
    eps: float | None = Field(
        None, gt=0, lt=1, description="start time; default: the SDE's sampling_eps"
    )
    divergence: Literal["auto", "exact", "hutchinson"] = Field(
        "auto", description="divergence of the ODE drift"
    )
    exact_max_dim: int = Field(16, ge=1, description="auto: exact up to this dimension")
    probe: Literal["rademacher", "gaussian"] = Field(
        "rademacher", description="Hutchinson probe distribution"
    )
    probes: int = Field(1, ge=1, description="Hutchinson probes per point (averaged)")
    seed: int = Field(0, ge=0, description="seed of the probes and the dequantisation")
    batch_size: int = Field(1000, ge=1, description="points per ODE solve")
    dequantize: bool = Field(False, description="uniform dequantisation (image data)")
    levels: int = Field(256, ge=2, description="quantisation levels (dequantize)")
    data_range: tuple[float, float] = Field((-1.0, 1.0), description="range the levels span")

    @model_validator(mode="after")
    def _range(self):
        lo, hi = self.data_range
        if not lo < hi:
            raise ValueError(
                f"data_range must be (low, high) with low < high, got {self.data_range}"
            )
        return self


def likelihood_config(overrides: dict[str, Any]) -> LikelihoodConfig:
    """Validate likelihood ``overrides`` with a one-line :class:`RegistryError`."""
    from diffuse_engine.core.registry_text import format_validation_error

    try:
        return LikelihoodConfig.model_validate(overrides)
    except ValidationError as exc:
        raise RegistryError(
            format_validation_error("likelihood settings:", exc, LikelihoodConfig)
        ) from None


@dataclass
class LikelihoodResult:
    """Per-point log-likelihoods in nats, ``(n,)``, and what it took."""

    log_likelihood: Tensor
    dim: int
    nfe: int
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)
    sde: SDE | None = None
    score: Any = None

    @property
    def bits_per_dim(self) -> Tensor:
        """``-log_likelihood / (D ln 2)`` per point."""
        return bits_per_dim(self.log_likelihood, self.dim)

    def summary(self) -> dict[str, float]:
        """Mean, standard error of the mean, and mean bits/dim."""
        ll = self.log_likelihood.double()
        n = ll.numel()
        se = float(ll.std() / math.sqrt(n)) if n > 1 else float("nan")
        return {
            "n": n,
            "mean": float(ll.mean()),
            "stderr": se,
            "bits_per_dim": float(bits_per_dim(ll.mean(), self.dim)),
            "nfe": self.nfe,
            "seconds": round(self.seconds, 3),
        }


def bits_per_dim(log_likelihood: Tensor, dim: int) -> Tensor:
    """Nats per data point to bits per dimension: ``-ll / (dim ln 2)``.

    For dequantised images (``log_likelihood`` from ``dequantize = true``, which
    already includes the bin-width term) this is the SDE paper's bits/dim.
    """
    return -log_likelihood / (dim * math.log(2.0))


def dequantize(
    x: Tensor,
    levels: int,
    data_range: tuple[float, float],
    generator: torch.Generator | None = None,
) -> tuple[Tensor, float]:
    """Uniform dequantisation of ``x`` whose values lie on ``levels`` equally spaced
    points spanning ``data_range``: returns ``y`` and the log bin width per dimension.

    Value ``k`` (of ``0..levels-1``) becomes ``lo + (hi - lo) (k + u) / levels`` with
    ``u ~ U[0, 1)``, so ``log P(k) >= E_u[log p(y)] + D log((hi - lo) / levels)``.
    """
    lo, hi = data_range
    k = torch.round((x - lo) / (hi - lo) * (levels - 1)).clamp(0, levels - 1)
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return lo + (hi - lo) * (k + u) / levels, math.log((hi - lo) / levels)


class _AugmentedFlow(torch.nn.Module):
    """``d/dt (x, delta) = (f~(x, t), div f~(x, t))`` on flattened ``x`` ``(B, D)``."""

    def __init__(
        self, score: ScoreFn, sde: SDE, shape: tuple[int, ...], exact: bool, probes: Tensor | None
    ):
        super().__init__()
        self.score, self.sde, self.shape = score, sde, shape
        self.exact, self.probes = exact, probes

    def forward(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        y, _ = state
        B, D = y.shape
        tt = t.to(y.dtype).expand(B)
        with torch.enable_grad():
            y = y.detach().requires_grad_(True)
            x = y.view(self.shape)
            drift = self.sde.reverse_drift(x, tt, self.score(x, tt), probability_flow=True).reshape(
                B, D
            )
            if self.exact:
                div = torch.zeros(B, device=y.device, dtype=y.dtype)
                for i in range(D):
                    (gi,) = torch.autograd.grad(drift[:, i].sum(), y, retain_graph=i < D - 1)
                    div = div + gi[:, i]
            else:
                div = torch.zeros(B, device=y.device, dtype=y.dtype)
                P = self.probes.shape[0]
                for j, v in enumerate(self.probes):
                    (vjp,) = torch.autograd.grad(drift, y, v, retain_graph=j < P - 1)
                    div = div + (vjp * v).sum(1)
                div = div / P
        return drift.detach(), div.detach()


def _probes(c: LikelihoodConfig, shape: tuple[int, int], generator, device, dtype) -> Tensor:
    B, D = shape
    if c.probe == "gaussian":
        return torch.randn((c.probes, B, D), generator=generator, device=device, dtype=dtype)
    bits = torch.randint(0, 2, (c.probes, B, D), generator=generator, device=device)
    return (2 * bits - 1).to(dtype)


def ode_log_likelihood(
    score: ScoreFn, sde: SDE, x: Tensor, config: LikelihoodConfig | None = None, *, progress=None
) -> Tensor:
    """``log p_eps(x)`` in nats, ``(n,)``, for data ``x`` ``(n, *dims)`` (see module doc).

    ``score`` is called with ``(B, *dims)`` states and ``(B,)`` times; evaluations
    happen under autograd (for the divergence) but no gradient reaches the caller.
    With ``config.dequantize`` the result is the discrete log-probability bound.
    ``progress(done)`` is called after each batch with the number of points done.
    """
    c = config or LikelihoodConfig()
    if x.dim() < 2 or x.shape[0] == 0:
        raise DiffuseError(
            f"log_likelihood needs data of shape (n, *dims) with n >= 1, got {tuple(x.shape)}"
        )
    if not torch.is_floating_point(x):
        raise DiffuseError(f"log_likelihood needs floating-point data, got {x.dtype}")
    finite = torch.isfinite(x).reshape(x.shape[0], -1).all(1)
    if not bool(finite.all()):  # the ODE solver would stall on them ("underflow in dt")
        rows = (~finite).nonzero().flatten()
        raise DiffuseError(
            f"log_likelihood: {rows.numel()} of {x.shape[0]} data points contain NaN/Inf "
            f"(first: row {int(rows[0])}); clean or drop them"
        )
    eps = sde.sampling_eps if c.eps is None else c.eps
    T = float(sde.T)
    D = x[0].numel()
    exact = c.divergence == "exact" or (c.divergence == "auto" and D <= c.exact_max_dim)
    gen = torch.Generator(device=x.device).manual_seed(c.seed)
    offset = 0.0
    if c.dequantize:
        x, log_bin = dequantize(x, c.levels, c.data_range, gen)
        offset = D * log_bin
    ts = torch.tensor([eps, T], dtype=x.dtype, device=x.device)
    kw: dict[str, Any] = dict(method=c.method, rtol=c.rtol, atol=c.atol)
    if c.method in ADAPTIVE_ODE_METHODS:
        kw["options"] = {"step_t": ts[-1:]}  # no stage beyond T
    elif c.method in FIXED_ODE_METHODS:
        kw["options"] = {
            "grid_constructor": lambda f, y0, t: torch.linspace(t[0], t[-1], c.steps + 1).to(t)
        }
    out = []
    for start in range(0, x.shape[0], c.batch_size):
        xb = x[start : start + c.batch_size]
        B = xb.shape[0]
        y0 = xb.reshape(B, D)
        probes = None if exact else _probes(c, (B, D), gen, x.device, x.dtype)
        func = _AugmentedFlow(score, sde, tuple(xb.shape), exact, probes)
        zero = torch.zeros(B, device=x.device, dtype=x.dtype)
        with torch.no_grad():
            ys, delta = torchdiffeq.odeint(func, (y0, zero), ts, **kw)
        z = ys[-1].reshape(xb.shape)
        ll = sde.prior_log_prob(z) + delta[-1] + offset
        out.append(ll)
        if progress is not None:
            progress(start + B)
    ll = torch.cat(out)
    if not torch.isfinite(ll).all():
        bad = int((~torch.isfinite(ll)).sum())
        raise NumericalError(
            f"{bad} of {ll.numel()} log-likelihoods are NaN/Inf; try a "
            "larger eps or tighter rtol/atol"
        )
    return ll


def split_overrides(
    overrides: dict[str, Any], chosen: dict[str, type]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split keyword overrides into likelihood settings and component fields.

    ``likelihood.FIELD`` always goes to the estimator; a bare ``FIELD`` of
    :class:`LikelihoodConfig` does too unless a chosen component (``sde``, ``score``)
    has the same field, which is an ambiguity error naming both spellings.
    """
    mine, rest = {}, {}
    fields = LikelihoodConfig.model_fields
    for key, value in overrides.items():
        kind, _, name = key.rpartition(".")
        if kind == "likelihood":
            mine[name] = value
        elif not kind and key in fields:
            clash = [k for k, cls in chosen.items() if key in cls.Config.model_fields]
            if clash:
                raise RegistryError(
                    f"override {key!r} is ambiguous; qualify it as one of "
                    + ", ".join(f"{k}.{key}" for k in ["likelihood", *clash])
                )
            mine[key] = value
        elif not kind and not any(key in cls.Config.model_fields for cls in chosen.values()):
            allowed = sorted(
                {f"{k}.{f}" for k, c in chosen.items() for f in c.Config.model_fields}
                | {f"likelihood.{f}" for f in fields}
            )
            from diffuse_engine.core.suggest import did_you_mean

            hint = did_you_mean(key, {a.rpartition(".")[2] for a in allowed})
            raise RegistryError(
                f"override {key!r}: no likelihood setting or chosen entry has "
                f"that field{hint}; allowed: {', '.join(allowed)}"
            )
        else:
            rest[key] = value
    return mine, rest


def evaluate(
    builder: Builder,
    x: Tensor,
    score: Any = "gmm",
    sde: str = "vp",
    *,
    device: str | torch.device | None = None,
    progress: bool = False,
    **overrides,
) -> LikelihoodResult:
    """What :meth:`Engine.log_likelihood` runs: build the SDE and score like
    ``Engine.sampling`` does, validate the likelihood settings, solve, count score
    evaluations (through :class:`~diffuse_engine.components.score.ScoreBoundary`)."""

    if not isinstance(x, Tensor):
        raise DiffuseError(
            f"log_likelihood needs a tensor x of shape (n, *dims), not {type(x).__name__}"
        )
    device = check_device(device) if device is not None else x.device
    x = x.to(device)
    sde_cls = builder.implementation("sde", sde)
    score_cls = builder.score_class(score)
    chosen = {"sde": sde_cls, "score": score_cls}
    # --set FIELD=VALUE of the engine may name likelihood settings too
    mine, rest = split_overrides({**builder.set_overrides, **overrides}, chosen)
    config = likelihood_config(mine)
    routed = builder.route_overrides(chosen, rest, with_sets=False)  # sets are in `rest`
    sde_obj = builder.build("sde", sde, **routed["sde"])
    score_obj = builder.bind_score(score, sde_obj, **routed["score"])
    data_shape = getattr(score_obj, "data_shape", None)
    if data_shape is not None and tuple(x.shape[1:]) != tuple(data_shape):
        raise DiffuseError(
            f"log_likelihood: data of shape {tuple(x.shape)} but score model "
            f"{score if isinstance(score, str) else score_cls.name!r} is for data "
            f"{tuple(data_shape)}; give points of shape (n, {', '.join(map(str, data_shape))})"
        )
    if hasattr(score_obj, "to"):
        score_obj = score_obj.to(device)
    counted = ScoreBoundary(score_obj, score if isinstance(score, str) else score_cls.name)
    norm = getattr(score_obj, "normaliser", None)  # trained on T(x): see components/normalise
    start = time.perf_counter()
    with progress_bar(x.shape[0], f"log-likelihood {sde}", enabled=progress) as bar:
        ll = ode_log_likelihood(
            counted,
            sde_obj,
            x if norm is None else norm.encode(x),
            config,
            progress=(lambda done: bar(done)) if bar else None,
        )
    if norm is not None:  # log p_x(x) = log p_z(T(x)) + log |det dT/dx|
        ll = ll + norm.log_det(x).to(ll.dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return LikelihoodResult(
        ll,
        x[0].numel(),
        counted.calls,
        time.perf_counter() - start,
        {
            "sde": sde,
            "score": score if isinstance(score, str) else score_cls.name,
            **config.model_dump(),
        },
        sde_obj,
        score_obj,
    )
