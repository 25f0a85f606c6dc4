"""Differentiable sampling: the reverse-time SDE through torchsde and the
probability-flow ODE through torchdiffeq, with optional adjoint gradients.

Both functions return samples that carry gradients to the initial noise ``x_T`` and
to ``params`` (for example a score network's parameters). With ``adjoint=True`` the
backward pass solves the adjoint equation instead of storing the forward graph, so
memory does not grow with the number of steps:

* SDE: ``torchsde.sdeint_adjoint``, the stochastic adjoint of Li et al., "Scalable
  Gradients for Stochastic Differential Equations" (AISTATS 2020); with
  ``method="reversible_heun"`` the backward pass reconstructs the forward trajectory
  exactly, so adjoint gradients equal backpropagation up to floating point (Kidger
  et al., "Efficient and Accurate Gradients for Neural SDEs", NeurIPS 2021).
* ODE: ``torchdiffeq.odeint_adjoint`` (Chen et al., "Neural Ordinary Differential
  Equations", NeurIPS 2018).

Example::

    engine = Engine()
    sde = engine.build("sde", "vp")
    net = MyScoreNet()                                  # a torch.nn.Module, net(x, t)
    x_T = sde.prior_sample((256, 2), generator=torch.Generator().manual_seed(0))
    x0 = reverse_sde_solve(net, sde, x_T, steps=100, adjoint=True, entropy=0)
    loss(x0).backward()                                 # fills net's .grad, O(1) memory in steps

Time conventions. torchsde only integrates forward in time, so the reverse-time SDE
``dx = [f(x, t) - g(t)^2 s(x, t)] dt + g(t) dw_bar`` from ``T`` down to ``eps`` is
written in the reversed clock ``u = T - t`` (``u`` from ``0`` to ``T - eps``)::

    dy = -[f(y, T - u) - g(T - u)^2 s(y, T - u)] du + g(T - u) dW_u,   y(u) = x(T - u)

(``dw_bar`` run backwards is a forward Brownian motion in ``u``). ``g`` depends on
time only, so the noise is diagonal with ``dg/dx = 0``: the Ito and Stratonovich
readings of this SDE coincide (the Ito-Stratonovich drift correction
``1/2 sum_j g_j d g_j / dx`` vanishes) and the Stratonovich methods (reversible Heun,
Heun, midpoint, Euler-Heun) solve it with the same drift. torchdiffeq integrates in
either direction, so the ODE keeps the original clock.

States of any shape ``(B, *dims)`` are flattened to ``(B, prod(dims))`` for the
libraries and restored on return.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torchdiffeq
import torchsde
from torch import Tensor, nn

from diffuse_engine.components.score import ScoreFn
from diffuse_engine.components.sde import SDE
from diffuse_engine.core.errors import DiffuseError

#: torchsde methods for the reverse SDE and the calculus each one assumes (both are
#: exact here: the diffusion depends on time only, see the module docstring).
SDE_METHODS = {
    "euler": "ito",
    "milstein": "ito",
    "srk": "ito",
    "reversible_heun": "stratonovich",
    "heun": "stratonovich",
    "midpoint": "stratonovich",
    "euler_heun": "stratonovich",
}
#: torchdiffeq methods with adaptive step-size control
ADAPTIVE_ODE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
#: torchdiffeq fixed-grid methods
FIXED_ODE_METHODS = ("euler", "midpoint", "heun3", "rk4")


def _time(v: Tensor, batch: int, like: Tensor) -> Tensor:
    """A solver's scalar time as the engine's ``(B,)`` time tensor."""
    return v.to(like.dtype).expand(batch)


class ReverseTimeSDE(nn.Module):
    """The reverse-time SDE in the clock ``u = T - t``, as a torchsde SDE object.

    ``f(u, y)`` and ``g(u, y)`` take and return flattened states ``(B, D)``. An
    ``nn.Module`` score is registered as a submodule so ``sdeint_adjoint`` finds its
    parameters.
    """

    noise_type = "diagonal"

    def __init__(self, score: ScoreFn, sde: SDE, shape: tuple[int, ...], sde_type: str = "ito"):
        super().__init__()
        self.score = score  # nn.Module scores become submodules
        self.sde = sde
        self.shape = tuple(shape)
        self.sde_type = sde_type
        self.T = float(sde.T)

    def f(self, u: Tensor, y: Tensor) -> Tensor:
        x = y.view(self.shape)
        t = _time(self.T - u, self.shape[0], y)
        return -self.sde.reverse_drift(x, t, self.score(x, t)).reshape(y.shape)

    def g(self, u: Tensor, y: Tensor) -> Tensor:
        t = _time(self.T - u, self.shape[0], y)
        return self.sde.diffusion(t)[:, None].expand(y.shape)


class ProbabilityFlow(nn.Module):
    """``dx/dt = f(x, t) - 1/2 g(t)^2 s(x, t)`` on flattened states, for torchdiffeq."""

    def __init__(self, score: ScoreFn, sde: SDE, shape: tuple[int, ...]):
        super().__init__()
        self.score = score
        self.sde = sde
        self.shape = tuple(shape)

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        x = y.view(self.shape)
        tt = _time(t, self.shape[0], y)
        return self.sde.reverse_drift(x, tt, self.score(x, tt), probability_flow=True).reshape(
            y.shape
        )


def _params(score: Any, params: Iterable[Tensor] | None) -> tuple[Tensor, ...]:
    if params is not None:
        return tuple(params)
    if isinstance(score, nn.Module):
        return tuple(p for p in score.parameters() if p.requires_grad)
    return ()


def brownian_interval(x: Tensor, t1: float, entropy: int, method: str):
    """``torchsde.BrownianInterval`` on ``[0, t1]`` for flattened ``x``, seeded by
    ``entropy`` (same entropy, same path); SRK needs space-time Levy area."""
    levy = "space-time" if method == "srk" else "none"
    return torchsde.BrownianInterval(
        t0=0.0,
        t1=t1,
        size=tuple(x.flatten(1).shape),
        dtype=x.dtype,
        device=x.device,
        entropy=int(entropy),
        levy_area_approximation=levy,
    )


def check_sde_method(method: str) -> str:
    """The calculus of a torchsde ``method``; a clear error if it is not supported."""
    if method not in SDE_METHODS:
        raise DiffuseError(
            f"unknown torchsde method {method!r}; choices: " + ", ".join(SDE_METHODS)
        )
    return SDE_METHODS[method]


def reverse_sde_solve(
    score: ScoreFn,
    sde: SDE,
    x_T: Tensor,
    *,
    method: str = "euler",
    steps: int = 1000,
    eps: float | None = None,
    adaptive: bool = False,
    rtol: float = 1e-3,
    atol: float = 1e-3,
    dt_min: float = 1e-5,
    entropy: int = 0,
    adjoint: bool = False,
    params: Iterable[Tensor] | None = None,
    adjoint_method: str | None = None,
    callback=None,
    chunks: int = 20,
) -> Tensor:
    """Solve the reverse-time SDE from ``x_T`` at ``T`` to ``eps`` with torchsde.

    ``steps`` fixes ``dt = (T - eps) / steps`` (the initial step when ``adaptive``).
    ``entropy`` seeds the ``BrownianInterval``: equal entropy, equal Brownian path,
    also between the forward and the adjoint pass. With ``adjoint=True`` gradients
    of the result with respect to ``x_T`` and ``params`` (default: the parameters of
    an ``nn.Module`` score) come from ``torchsde.sdeint_adjoint``; the default
    adjoint method is torchsde's (``adjoint_reversible_heun`` for
    ``reversible_heun``, Milstein for the Ito methods, midpoint otherwise).
    Returns ``x_eps`` of ``x_T``'s shape (no final denoising step).

    ``callback(step, steps, t)`` reports progress on the uniform grid of ``steps``
    (every step, with its time): torchsde has no step hook, so with a callback the
    solve runs in up to ``chunks`` consecutive pieces on that grid, on the same
    Brownian path and carrying the solver's extra state, and the steps of each piece
    are reported when it ends. Each piece costs one extra drift evaluation (torchsde's
    contract check). Not used with ``adjoint=True``.
    """
    sde_type = check_sde_method(method)
    eps = sde.sampling_eps if eps is None else eps
    span = float(sde.T) - float(eps)
    module = ReverseTimeSDE(score, sde, tuple(x_T.shape), sde_type)
    y0 = x_T.reshape(x_T.shape[0], -1)
    # times in float64 whatever x's dtype: torchsde accumulates t step by step
    us = torch.tensor([0.0, span], dtype=torch.float64, device=x_T.device)
    bm = brownian_interval(x_T, span, entropy, method)
    # a hair over span / steps (times are float64) so rounding never adds a tiny
    # extra step; the last step is clipped to the end time
    kw = dict(
        method=method,
        dt=span / steps * (1 + 1e-12),
        adaptive=adaptive,
        rtol=rtol,
        atol=atol,
        dt_min=dt_min,
        bm=bm,
    )
    if adjoint:
        if method == "reversible_heun" and adjoint_method is None:
            adjoint_method = "adjoint_reversible_heun"
        ys = torchsde.sdeint_adjoint(
            module,
            y0,
            us,
            adjoint_params=_params(score, params),
            adjoint_method=adjoint_method,
            **kw,
        )
    elif callback is None:
        ys = torchsde.sdeint(module, y0, us, **kw)
    else:
        T, y, extra, done = float(sde.T), y0, None, 0
        for end in sorted(
            {round(steps * (j + 1) / min(chunks, steps)) for j in range(min(chunks, steps))}
        ):
            piece = torch.tensor(
                [span * done / steps, span * end / steps], dtype=torch.float64, device=x_T.device
            )
            ys, extra = torchsde.sdeint(
                module, y, piece, extra=True, extra_solver_state=extra, **kw
            )
            y = ys[-1]
            for k in range(done + 1, end + 1):
                callback(k, steps, T - span * k / steps)
            done = end
        ys = [y]
    return ys[-1].reshape(x_T.shape)


def probability_flow_solve(
    score: ScoreFn,
    sde: SDE,
    x_T: Tensor,
    *,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    steps: int = 100,
    eps: float | None = None,
    adjoint: bool = False,
    params: Iterable[Tensor] | None = None,
    callback=None,
) -> Tensor:
    """Solve the probability-flow ODE (Song et al. 2021, eq. 13) from ``T`` to ``eps``
    with torchdiffeq.

    Adaptive methods (:data:`ADAPTIVE_ODE_METHODS`) use ``rtol``/``atol``; fixed-grid
    methods (:data:`FIXED_ODE_METHODS`) take ``steps`` uniform steps. ``adjoint=True``
    uses ``torchdiffeq.odeint_adjoint`` for gradients with respect to ``x_T`` and
    ``params`` (default: the parameters of an ``nn.Module`` score).
    ``callback(t)`` (a float) runs after each accepted step of an adaptive method.
    Returns ``x_eps`` of ``x_T``'s shape.
    """
    if method not in ADAPTIVE_ODE_METHODS + FIXED_ODE_METHODS:
        raise DiffuseError(
            f"unknown ODE method {method!r}; choices: "
            + ", ".join(ADAPTIVE_ODE_METHODS + FIXED_ODE_METHODS)
        )
    eps = sde.sampling_eps if eps is None else eps
    func = ProbabilityFlow(score, sde, tuple(x_T.shape))
    if callback is not None and method in ADAPTIVE_ODE_METHODS:
        func.callback_accept_step = lambda t0, y0, dt: callback(float(t0 + dt))
    ts = torch.tensor([float(sde.T), float(eps)], dtype=x_T.dtype, device=x_T.device)
    kw: dict[str, Any] = dict(method=method, rtol=rtol, atol=atol)
    if method in ADAPTIVE_ODE_METHODS:
        # land a step exactly on eps: stages past it would query the SDE at t < 0
        kw["options"] = {"step_t": ts[-1:]}
    else:
        kw["options"] = {
            "grid_constructor": lambda f, y0, t: torch.linspace(t[0], t[-1], steps + 1).to(t)
        }
    y0 = x_T.reshape(x_T.shape[0], -1)
    if adjoint:
        ys = torchdiffeq.odeint_adjoint(func, y0, ts, adjoint_params=_params(score, params), **kw)
    else:
        ys = torchdiffeq.odeint(func, y0, ts, **kw)
    return ys[-1].reshape(x_T.shape)
