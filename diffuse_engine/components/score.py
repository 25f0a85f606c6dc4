"""Score models and output parameterisations.

A score model maps ``(x, t)`` with ``x`` of shape ``(B, *dims)`` and ``t`` of shape
``(B,)`` to ``grad_x log p_t(x)``, same shape and dtype as ``x``. Networks may instead
predict the noise (``epsilon``), the clean data (``x0``) or the velocity (``v``);
:func:`to_score` converts through the SDE's Gaussian kernel ``x_t = a x_0 + s z`` (Song
et al. 2021, App. C; Ho et al. 2020; Karras et al. 2022 for the x0 form; Salimans & Ho
2022 for v):

* score:   ``s``
* epsilon: ``s = -eps_hat / std``
* x0:      ``s = (a * x0_hat - x) / std^2``
* v:       see :func:`to_score` (``v = (a eps - s x0) / sqrt(a^2 + s^2)``)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal

import torch
from torch import Tensor

from diffuse_engine.components.guidance import is_conditional
from diffuse_engine.components.sde import SDE, bcast
from diffuse_engine.core.component import Component, ComponentConfig
from diffuse_engine.core.errors import DiffuseError

Parameterisation = Literal["score", "epsilon", "x0", "v"]
#: what a kernel-based solver predicts from the score: clean data or the noise
Prediction = Literal["data", "noise"]
ScoreFn = Callable[[Tensor, Tensor], Tensor]


def to_score(
    output: Tensor, x: Tensor, t: Tensor, sde: SDE, parameterisation: Parameterisation
) -> Tensor:
    """Convert a model's ``output`` in ``parameterisation`` to a score at ``(x, t)``.

    With the kernel ``x_t = a x_0 + s z`` at ``t`` and ``r = sqrt(a^2 + s^2)``:

    * ``score``:   the output is the score;
    * ``epsilon``: ``score = -eps_hat / s``;
    * ``x0``:      ``score = (a x0_hat - x) / s^2``;
    * ``v``:       the velocity of Salimans & Ho (2022, "Progressive distillation",
      Sec. 4), ``v = (a z - s x_0) / r``. For a variance-preserving kernel (``r = 1``,
      ``a = cos phi``, ``s = sin phi``) it is their ``v = a eps - s x_0 = dx_t / dphi``.
      For any Gaussian kernel, ``x_t / r = (a/r) x_0 + (s/r) z`` is variance-preserving
      with angle ``phi = atan(s / a)``, and ``v`` is that kernel's velocity, so its
      variance stays ``O(1)`` for unit-variance data whatever ``r`` is (VE's ``r``
      grows to ``sigma_max``). Inverting the rotation, ``x0_hat = a x / r^2 - (s / r) v``
      and ``eps_hat = s x / r^2 + (a / r) v``, hence
      ``score = -eps_hat / s = -x / r^2 - a v / (s r)``.
    """
    if parameterisation == "score":
        return output
    a, s = sde.marginal(t)
    if parameterisation == "epsilon":
        return -output / bcast(s, x)
    if parameterisation == "x0":
        return (bcast(a, x) * output - x) / bcast(s**2, x)
    if parameterisation == "v":
        r2 = a * a + s * s
        return -x / bcast(r2, x) - bcast(a / (s * r2.sqrt()), x) * output
    raise ValueError(
        f"unknown parameterisation {parameterisation!r}; choices: score, epsilon, x0, v"
    )


def kernel_prediction(
    score: ScoreFn, x: Tensor, t: float | Tensor, a: float, s: float, prediction: Prediction
) -> Tensor:
    """``x0_hat`` (``"data"``, Tweedie's formula ``(x + s^2 score) / a``) or ``eps_hat``
    (``"noise"``, ``-s score``) at ``(x, t)`` from one score call; ``a``, ``s`` are the
    kernel's coefficients at ``t`` as Python floats. ``t`` is a float or already its
    ``(B,)`` tensor (from :func:`~diffuse_engine.components.solver.time_tensors`)."""
    tt = (
        t if isinstance(t, Tensor) else torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
    )
    # the score's output is a temporary of the expression, freed as soon as it is
    # used (a name would keep one more batch-sized buffer alive through the update)
    if prediction == "data":
        return (x + (s * s) * score(x, tt)) / a
    return score(x, tt) * (-s)


class ScoreConfig(ComponentConfig):
    """Fields every score model accepts."""

    parameterisation: Parameterisation = "score"


class ScoreModel(Component):
    """Base class of score models; subclasses implement :meth:`forward`.

    ``forward`` returns the raw output in ``config.parameterisation``; calling the
    model returns the score. The model is bound to one SDE, whose kernel the
    conversion uses. A conditional model sets ``conditional = True`` and implements
    ``forward(x, t, cond)``, where ``cond`` is a dict of per-sample tensors (``label``
    ``(B,)`` for class-conditional models) or ``None`` for the unconditional score.
    """

    kind: ClassVar[str] = "score"
    Config: ClassVar[type[ComponentConfig]] = ScoreConfig
    #: True for models that must be trained before they can sample (issue: training).
    needs_training: ClassVar[bool] = False
    #: True for models whose ``forward`` takes ``cond`` (may be set per instance)
    conditional: ClassVar[bool] = False

    def __init__(self, config: ScoreConfig | None = None, *, sde: SDE, **fields):
        super().__init__(config, **fields)
        self.sde = sde

    @classmethod
    def own_sde(cls, config: ScoreConfig) -> dict | None:
        """The SDE this model was made for, as ``{"type": NAME, **fields}``, when the
        model itself fixes it (a diffusers model's scheduler); the engine then samples
        with it unless the call names an SDE. ``None`` (the default): no own SDE."""
        return None

    def forward(self, x: Tensor, t: Tensor, cond: dict | None = None) -> Tensor:
        """Raw model output at ``(x, t)`` (given ``cond``) in this model's parameterisation."""
        raise NotImplementedError

    def data_moments(self) -> tuple[Tensor, Tensor] | None:
        """Per-coordinate mean and variance of the data this model's score is of, each
        of ``data_shape``, or ``None`` (the default) when the model does not know them.
        Sampling with ``prior="auto"`` or ``"data"`` starts from the Gaussian with
        ``p_T``'s first two moments (:meth:`~diffuse_engine.components.sde.SDE.data_prior`)
        when they are known: for data far from unit scale the SDE's ``N(0, I)`` is not
        ``p_T``, and no solver recovers from a wrong start."""
        return None

    def __call__(self, x: Tensor, t: Tensor, cond: dict | None = None) -> Tensor:
        out = self.forward(x, t, cond) if self.conditional else self.forward(x, t)
        return to_score(out, x, t, self.sde, self.config.parameterisation)


class CallableScore(ScoreModel):
    """Wraps any ``fn(x, t)`` or conditional ``fn(x, t, cond)``;
    ``Engine.sample(score=fn, parameterisation=...)`` uses it."""

    name: ClassVar[str] = "callable"

    def __init__(self, fn, config: ScoreConfig | None = None, *, sde: SDE, **fields):
        super().__init__(config, sde=sde, **fields)
        self.fn = fn
        self.conditional = is_conditional(fn)
        #: a conditional callable without an unconditional score says so like a model
        self.requires_cond = bool(getattr(fn, "requires_cond", False))

    def forward(self, x: Tensor, t: Tensor, cond: dict | None = None) -> Tensor:
        return self.fn(x, t, cond) if self.conditional else self.fn(x, t)


def model_dtype(model) -> torch.dtype | None:
    """The floating dtype of a model's weights, if it has any (trainable networks)."""
    params = getattr(model, "parameters", None)
    if not callable(params):
        return None
    try:
        first = next(iter(params()), None)
    except TypeError:
        return None
    return first.dtype if isinstance(first, Tensor) and first.is_floating_point() else None


class ScoreBoundary:
    """Checks a score function's output (shape, dtype, device; once per input layout,
    no device sync) and counts evaluations. Wraps every score the engine hands a solver.

    A model with weights in another floating dtype than the samples (a float32 network
    sampled in float64) runs in its own dtype; inputs and output are converted, so
    neither the user nor the solver touches the model.

    Once a layout is checked, later calls with it go straight to the model's own
    function (:func:`direct_score`: a ``score``-parameterised model's ``forward``, a
    wrapped callable itself), so the per-call cost is one counter and one layout
    comparison; the check's effect is unchanged (torchsde's ``check_contract`` does
    the same once before solving). Solvers get :attr:`call`, a plain function doing
    exactly what calling the boundary does with a Python frame less per evaluation.
    The per-call comparison is of shape and dtype: a run's tensors stay on its device
    (the first call of a layout checks the device too).

    :attr:`call_once_checked` drops that comparison too, for a run whose layout cannot
    change (an unguided shard of a ``fixed_layout`` solver): after :meth:`rearm`, its
    first call is checked like any new layout and the later ones count and call the
    model, until the next :meth:`rearm`. A plain model asked for a condition, and dtype
    conversions, take the checking path on every call, as with :attr:`call`.
    """

    def __init__(self, fn, name: str):
        self.fn = fn
        self.name = name
        self.conditional = is_conditional(fn)
        self.dtype = model_dtype(fn)
        self._direct = direct_score(fn)
        self._state = _Checked(fn, name, self.conditional, self.dtype)
        #: the score function solvers call: ``call(x, t[, cond])``
        self.call = _fast_call(self._state, self._direct)
        #: ``call`` without the per-call layout comparison (see the class docstring)
        self.call_once_checked = _once_checked_call(self._state, self._direct)

    def rearm(self) -> None:
        """Check the next call's layout again (a new shard of
        :attr:`call_once_checked`)."""
        self._state.shape = None

    @property
    def calls(self) -> int:
        """Score evaluations so far, through :attr:`call` or the boundary itself."""
        return self._state.calls

    def __call__(self, x: Tensor, t: Tensor, cond: dict | None = None) -> Tensor:
        return self.call(x, t, cond)


class _Checked:
    """A boundary's count, its checked layout and the checking path. Kept apart from
    :class:`ScoreBoundary` so that :attr:`ScoreBoundary.call` holds no reference back
    to the boundary: no reference cycle, so a boundary (and the model it holds) is
    freed when the run drops it, not at the next garbage collection."""

    __slots__ = ("fn", "name", "conditional", "dtype", "calls", "shape", "layout_dtype")

    def __init__(self, fn, name: str, conditional: bool, dtype: torch.dtype | None):
        self.fn, self.name, self.conditional, self.dtype = fn, name, conditional, dtype
        self.calls = 0
        #: shape and dtype of the layout checked without a conversion (the fast path)
        self.shape: torch.Size | None = None
        self.layout_dtype: torch.dtype | None = None

    def first(self, x: Tensor, t: Tensor, cond: dict | None) -> Tensor:
        """A call with a layout not checked yet (or one that converts dtypes): call,
        convert and check the output."""
        xin, tin = x, t
        if self.dtype is not None and x.dtype != self.dtype:
            xin, tin = x.to(self.dtype), t.to(self.dtype)
        if self.conditional:
            out = self.fn(xin, tin, cond)
        elif cond is None:
            out = self.fn(xin, tin)
        else:  # a guidance method asked a plain model for a conditional score
            raise DiffuseError(f"score model {self.name!r} takes no condition (cond={list(cond)})")
        if xin is not x and isinstance(out, Tensor):
            out = out.to(x.dtype)
        if (
            not isinstance(out, Tensor)
            or out.shape != x.shape
            or out.dtype != x.dtype
            or out.device != x.device
        ):
            got = (
                f"shape {tuple(out.shape)} dtype {out.dtype} on {out.device}"
                if isinstance(out, Tensor)
                else type(out).__name__
            )
            raise DiffuseError(
                f"score model {self.name!r} returned {got}; expected a tensor "
                f"of the input's shape {tuple(x.shape)} and dtype {x.dtype} "
                f"on {x.device}"
            )
        if xin is x:  # the fast path skips conversions, so only layouts without one
            self.shape, self.layout_dtype = x.shape, x.dtype
        return out


def _fast_call(state: _Checked, direct):
    """:attr:`ScoreBoundary.call`: count, and on a checked layout call ``direct``."""
    first = state.first
    if state.conditional:

        def call(x: Tensor, t: Tensor, cond: dict | None = None) -> Tensor:
            state.calls += 1
            if x.shape == state.shape and x.dtype is state.layout_dtype:
                return direct(x, t, cond)
            return first(x, t, cond)

    else:

        def call(x: Tensor, t: Tensor, cond: dict | None = None) -> Tensor:
            state.calls += 1
            if cond is None and x.shape == state.shape and x.dtype is state.layout_dtype:
                return direct(x, t)
            return first(x, t, cond)

    call.fn = state.fn  # what innermost() looks through to
    call.conditional = state.conditional
    return call


def _once_checked_call(state: _Checked, direct):
    """:attr:`ScoreBoundary.call_once_checked`: count, and once a layout is checked
    since the last :meth:`~ScoreBoundary.rearm`, call ``direct`` without comparing."""
    first = state.first
    if state.conditional:

        def call(x: Tensor, t: Tensor, cond: dict | None = None) -> Tensor:
            state.calls += 1
            if state.shape is not None:
                return direct(x, t, cond)
            return first(x, t, cond)

    else:

        def call(x: Tensor, t: Tensor, cond: dict | None = None) -> Tensor:
            state.calls += 1
            if cond is None and state.shape is not None:
                return direct(x, t)
            return first(x, t, cond)

    call.fn = state.fn  # what innermost() looks through to
    call.conditional = state.conditional
    return call


def direct_score(fn):
    """The function that ``fn(x, t[, cond])`` ends up calling, with the wrappers that
    do nothing peeled off: a :class:`ScoreModel` in the ``score`` parameterisation that
    keeps the base ``__call__`` is its ``forward`` (:func:`to_score` returns the output
    as it is), and a :class:`CallableScore` among those is the user's callable. The
    result computes the same values with fewer Python frames per call."""
    if not isinstance(fn, ScoreModel) or type(fn).__call__ is not ScoreModel.__call__:
        return fn
    if fn.config.parameterisation != "score":
        return fn
    if type(fn).forward is CallableScore.forward:  # forward calls fn.fn as we would
        return fn.fn
    return fn.forward
