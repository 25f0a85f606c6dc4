"""Solver contracts: samplers, and the predictors and correctors of the PC sampler.

Time runs backwards in sampling: a solver starts from ``x_T`` drawn from the SDE's
prior and integrates down to ``eps``. Time grids are lists of Python floats computed
once before the loop, so the loop never syncs with the device to read a time.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from typing import ClassVar

import torch
from pydantic import Field, model_validator
from torch import Tensor

from diffuse_engine.components.gits import too_many_steps
from diffuse_engine.components.guidance import StepTransform
from diffuse_engine.components.schedules import SCHEDULE_HELP, Schedule, time_grid
from diffuse_engine.components.score import ScoreFn
from diffuse_engine.components.sde import SDE
from diffuse_engine.core.component import Component, ComponentConfig
from diffuse_engine.core.errors import IncompatibleError

#: the most time steps a solver accepts: the time grid is built in memory before the loop,
#: and 10 million steps is far past any sampler's use (1000-4000 for PC samplers)
MAX_STEPS = 10_000_000

#: ``callback(step, total_steps, t)`` after each solver step; used for progress bars
#: and per-step observers. It receives Python numbers only.
StepCallback = Callable[[int, int, float], None]


class SolverConfig(ComponentConfig):
    """Fields every solver accepts."""

    steps: int = Field(1000, ge=1, le=MAX_STEPS, description="number of time steps from T to eps")
    eps: float | None = Field(
        None, gt=0, lt=1, description="smallest time; default: the SDE's sampling_eps"
    )
    denoise: bool = Field(True, description="final Tweedie denoising step at eps")
    schedule: Schedule = Field("uniform", description=SCHEDULE_HELP)
    rho: float = Field(7.0, gt=0, description="exponent of the karras schedule")
    pilot: int = Field(512, ge=1, description="gits schedule: pilot batch size")
    fine: int = Field(100, ge=2, description="gits schedule: fine log-SNR grid intervals")
    pilot_seed: int = Field(
        0,
        ge=0,
        description="gits schedule and fitted weights: the pilot batch's seed (another "
        "shows how much a fit owes to its pilot)",
    )
    nfe: int | None = Field(
        None,
        ge=1,
        le=MAX_STEPS,
        description="budget of score evaluations per sample: sets steps (and the solver's "
        "orders and final denoising step) to spend it; replaces steps",
    )

    # nfe, steps and an explicit times grid each fix the steps: an override of one
    # replaces the entry's others (a best-at-budget entry's nfe, an entry's steps)
    override_replaces: ClassVar[dict[str, tuple[str, ...]]] = {
        "nfe": ("steps", "times"),
        "steps": ("nfe", "times"),
        "times": ("nfe", "steps"),
    }

    def budget(self, nfe: int) -> dict:
        """The field values that spend ``nfe`` score evaluations per sample.

        The default is for solvers with one evaluation per step: ``steps = nfe - 1``
        with the final denoising step, ``nfe`` steps without it; a one-evaluation
        budget drops the denoising step. Solvers with other costs override this.
        """
        denoise = self.denoise and nfe >= 2
        return {"steps": nfe - int(denoise), "denoise": denoise}

    @model_validator(mode="after")
    def _spend_budget(self):
        """With ``nfe`` set, replace ``steps`` (and whatever :meth:`budget` says). Steps
        given too are refused unless they are the budget's own (a config's dump, which
        ``Component(config, **fields)`` and ``config.json`` validate again)."""
        if self.nfe is not None:
            spend = self.budget(self.nfe)
            given = "steps" in self.model_fields_set  # in one entry or one call
            # a budget that leaves the steps to the solver (an adaptive one's cap) has
            # no steps to compare; such a solver refuses steps itself
            if given and "steps" in spend and self.steps != spend["steps"]:
                raise ValueError(
                    f"nfe ({self.nfe}) and steps ({self.steps}) both fix the steps "
                    f"(nfe {self.nfe} takes {spend['steps']}); give one of them"
                )
            # the config is frozen: the budget's fields are written once, here
            self.__dict__.update(spend)
        return self

    @model_validator(mode="after")
    def _gits_fits(self):
        """A fitted grid's step limit, checked with the config (a dry run and a run
        refuse alike, before any output) rather than when the grid is fitted."""
        if self.schedule == "gits" and (problem := too_many_steps(self.steps)) is not None:
            raise ValueError(problem)
        return self


def uniform_schedule_only(config: SolverConfig, why: str) -> SolverConfig:
    """Validator body for solvers that choose their own times: refuse another
    ``schedule`` instead of ignoring it (``why`` says how the solver steps)."""
    if config.schedule != "uniform":
        raise ValueError(
            f'schedule {config.schedule!r} does not apply: {why}; leave schedule = "uniform"'
        )
    return config


class Solver(Component):
    """Base class of samplers: ``sample(score, sde, x_T, generator=...) -> x_0``.

    A solver that steps in Python can apply ``transform(x, step, t_next) -> x`` to its
    state after each step (a guidance method's projection, see
    :mod:`diffuse_engine.components.guidance`); it says so with
    ``supports_transform = True`` and accepts ``transform=`` in :meth:`sample`. Solvers
    that integrate inside a library (torchsde, torchdiffeq) cannot, and the engine
    refuses projection guidance with them.

    Within one :meth:`sample` call a solver hands the score tensors of one layout (the
    shape and dtype of its first call: the sample's, or its own flattened view), so the
    engine checks the score's output on the first call of each shard only. A solver
    that changes layout mid-run (evaluating a larger batch for some steps) sets
    ``fixed_layout = False`` and gets a score that checks every new layout.
    """

    kind: ClassVar[str] = "solver"
    Config: ClassVar[type[ComponentConfig]] = SolverConfig
    #: applies ``transform=`` after each step (see the class docstring)
    supports_transform: ClassVar[bool] = False
    #: calls the score on one layout per :meth:`sample` (see the class docstring)
    fixed_layout: ClassVar[bool] = True

    def __init__(self, config: SolverConfig | None = None, *, catalogue=None, **fields):
        super().__init__(config, **fields)
        self.catalogue = catalogue

    def check(self, sde: SDE) -> None:
        """Raise :class:`~diffuse_engine.core.errors.IncompatibleError` if ``sde`` is unusable."""

    def eps(self, sde: SDE) -> float:
        return self.config.eps if self.config.eps is not None else sde.sampling_eps

    def time_grid(
        self, sde: SDE, score: ScoreFn | None = None, like: Tensor | None = None
    ) -> list[float]:
        """``steps + 1`` decreasing times from ``T`` to ``eps``, spaced by the configured
        schedule (:mod:`diffuse_engine.components.schedules`; uniform in ``t`` by default).

        The ``gits`` schedule is fitted to ``score`` on a pilot batch shaped, placed and
        typed like ``like`` (:mod:`diffuse_engine.components.gits`); the fit is kept for the next
        call with the same score, SDE and data, so sharded runs fit once. A grid the run
        pinned (:meth:`adopt`) is used whatever the score.
        """
        c = self.config
        if c.schedule != "gits":
            return time_grid(sde, c.steps, self.eps(sde), c.schedule, c.rho)
        pinned = getattr(self, "_gits_pinned", None)
        if pinned is not None:
            return list(pinned)
        if score is None or like is None:
            raise IncompatibleError(
                f"solver {self.name!r}: schedule 'gits' is fitted to the "
                "score model; pass score and a sample batch to time_grid"
            )
        from diffuse_engine.components.gits import gits_time_grid

        start = getattr(self, "_pilot_start", None)
        key = (innermost(score), sde, tuple(like.shape[1:]), like.device, like.dtype)
        fitted = getattr(self, "_gits_fit", None)
        # score, SDE and start (tensors: never ==) compare by identity
        if fitted is None or fitted[0] != key or fitted[1] is not start:
            grid = gits_time_grid(
                score,
                sde,
                c.steps,
                self.eps(sde),
                like,
                pilot=c.pilot,
                fine=c.fine,
                start=start,
                seed=c.pilot_seed,
            )
            self._gits_fit = fitted = (key, start, grid)
        return list(fitted[2])

    def prepare(self, score: ScoreFn, sde: SDE, like: Tensor) -> list[float] | None:
        """Work done once per run before sampling, with ``score`` (the engine counts its
        evaluations apart from the per-sample ones): fits a ``gits`` schedule and returns
        its grid (``None`` when there is nothing to fit)."""
        if self.fits_grid:
            return self.time_grid(sde, score, like)
        return None

    @property
    def fits_grid(self) -> bool:
        """Whether :meth:`prepare` fits a grid that :meth:`adopt` then pins (a ``gits``
        schedule): a distributed run fits it on rank 0 alone and shares it."""
        return self.config.schedule == "gits"

    @property
    def fitted_times(self) -> list[float] | None:
        """The grid :meth:`prepare` fitted (a ``gits`` schedule), else ``None``; a kernel
        solver given it as ``times`` samples on the same steps without fitting again
        (the PC sampler and the ODE solvers take no ``times``)."""
        pinned = getattr(self, "_gits_pinned", None)
        if pinned is not None:
            return list(pinned)
        fitted = getattr(self, "_gits_fit", None)
        return None if fitted is None else list(fitted[2])

    @property
    def fitted_fields(self) -> dict | None:
        """Fields that sample again on what :meth:`prepare` fitted, without fitting:
        ``{"times": fitted_times}`` for a fitted grid (a solver that fits more, e.g.
        weights, adds them), else ``None``."""
        times = self.fitted_times
        return None if times is None else {"times": times}

    def start_from(self, loc: Tensor, scale: Tensor) -> None:
        """The run's samples start from ``N(loc, scale^2)`` (the data prior): a fitted
        ``gits`` schedule draws its pilot batch there too, not from the SDE's prior."""
        self._pilot_start = (loc, scale)

    def adopt(self, grid: list[float]) -> None:
        """Sample on ``grid`` from now on, whatever score :meth:`sample` gets. The engine
        pins what :meth:`prepare` fitted with the model's own score (rank 0's, in a
        distributed run, so every rank samples on the same times): a guidance method
        then wraps the score, with each shard's condition, and must not refit."""
        self._gits_pinned = list(grid)

    def sample(
        self,
        score: ScoreFn,
        sde: SDE,
        x: Tensor,
        *,
        generator: torch.Generator | None = None,
        callback: StepCallback | None = None,
        transform: StepTransform | None = None,
    ) -> Tensor:
        """Integrate from ``x`` (a prior sample at ``T``) down to ``eps``; return samples.

        ``transform`` (only passed to solvers with ``supports_transform``) is applied to
        the state after each step, before ``callback``.
        """
        raise NotImplementedError

    def finish(self, score: ScoreFn, sde: SDE, x: Tensor, t: float) -> Tensor:
        """Apply the optional final Tweedie denoising at time ``t``."""
        if not self.config.denoise:
            return x
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
        return sde.denoise(x, score(x, tt), tt)


#: prefix of the registry's best-at-budget solver entries, ``[solver.best-SDE-NFE]``
BEST_PREFIX = "best"
#: ``best-SDE-NFE`` or ``best-SDE-NFE-dimD`` (the entry for data of at least ``D`` numbers)
BEST_NAME = re.compile(rf"{BEST_PREFIX}-(?P<sde>.+)-(?P<nfe>\d+)(?:-dim(?P<dims>\d+))?")


def best_at_budget(names, sde: str, nfe: int, dims: int | None = None) -> str | None:
    """The solver entry ``best-SDE-B`` among ``names`` with the largest ``B <= nfe`` (the
    smallest ``B`` when ``nfe`` is below them all); ``None`` if ``sde`` has none.

    An entry ``best-SDE-B-dimD`` is the table's choice for data of at least ``D``
    numbers per sample (``prod(data_shape)``): given ``dims``, the entries of the
    largest ``D <= dims`` are used (those without a suffix count as ``D = 1``, and are
    the only ones used when ``dims`` is unknown).

    These entries are registry.toml's table of what the benchmark found best per SDE,
    budget and data size (docs/sampling.md); ``diffuse run --nfe N`` samples with the
    chosen one and ``nfe = N``.
    """
    classes: dict[int, dict[int, str]] = {}
    for name in names:
        m = BEST_NAME.fullmatch(name)
        if m and m["sde"] == sde:
            classes.setdefault(int(m["dims"] or 1), {})[int(m["nfe"])] = name
    fits = [d for d in classes if d <= (dims or 1)]
    if not fits:
        return None
    found = classes[max(fits)]
    within = [b for b in found if b <= nfe]
    return found[max(within) if within else min(found)]


def schedule_for_budget(config: SolverConfig, nfe: int) -> str | None:
    """``"logsnr"`` when ``config``'s fitted ``gits`` grid cannot take the steps ``nfe``
    spends (more than :data:`~diffuse_engine.components.gits.MAX_STEPS`), else
    ``None``. A best-at-budget entry chosen for a smaller budget is on a fitted grid
    that stops paying beyond that many steps; log-SNR steps are the grid it refines."""
    if config.schedule != "gits":
        return None
    return "logsnr" if too_many_steps(config.budget(nfe).get("steps", 0)) else None


def innermost(score: ScoreFn) -> ScoreFn:
    """The score function under the engine's wrappers (which keep it as ``.fn``)."""
    while hasattr(score, "fn") and callable(score.fn):
        score = score.fn
    return score


#: elements of one block of :func:`time_tensors` (64 KiB of float32): the steps of a
#: block share one allocation, and a large batch gets fewer steps per block; from
#: ``TIME_BLOCK_ELEMENTS // 2`` samples up a block would hold one step, so each step
#: gets its own fill
TIME_BLOCK_ELEMENTS = 2**14
#: most steps per block of :func:`time_tensors`
TIME_BLOCK_STEPS = 64


def time_tensors(times: Sequence[float], like: Tensor) -> Iterator[Tensor]:
    """The ``(B,)`` time tensors a solver loop hands the score, one per entry of
    ``times`` in order: ``torch.full((B,), t)`` with ``like``'s batch size, dtype and
    device, the same values bit for bit.

    At small batches they are made a block of steps at a time (one small tensor of the
    block's times and one broadcast copy into a ``(steps, B)`` buffer, whose rows are
    yielded), so a step costs a ``next()`` instead of a fill: a few microseconds per
    step, where the loop's own Python work is most of the time. At large batches the
    copy costs more than the fill's call (a broadcast copy writes and reads, a fill
    only writes) and a block would keep several steps' times in memory the step's
    other tensors want in cache, so every step gets its own ``torch.full`` there, as a
    hand-written loop does. Rows are distinct memory, as separate fills would be.
    """
    B = like.shape[0]
    block = max(1, min(TIME_BLOCK_STEPS, TIME_BLOCK_ELEMENTS // max(B, 1)))
    if block == 1:
        for t in times:
            yield torch.full((B,), t, dtype=like.dtype, device=like.device)
        return
    for j in range(0, len(times), block):
        part = torch.tensor(times[j : j + block], dtype=like.dtype, device=like.device)
        yield from part[:, None].expand(-1, B).contiguous().unbind(0)


def noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like ``x``, drawn from ``generator``."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


class Predictor(Component):
    """One reverse-time step ``t -> t_next < t``; returns ``(x, x_mean)``."""

    kind: ClassVar[str] = "predictor"

    def check(self, sde: SDE) -> None:
        """Raise if this predictor cannot step ``sde``."""

    def step(
        self,
        x: Tensor,
        t: Tensor,
        t_next: Tensor,
        score: ScoreFn,
        sde: SDE,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def plan(self, sde: SDE, grid: list[float]) -> list | None:
        """Optional: per-step coefficients for the whole ``grid`` as Python floats,
        computed once before the loop; then the sampler calls :meth:`planned_step`
        instead of :meth:`step`. ``None`` (the default) keeps :meth:`step`."""
        return None

    def planned_step(
        self, x: Tensor, t: Tensor, coefficients, score: ScoreFn, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """:meth:`step` with this step's entry of :meth:`plan` (``t`` is the start time)."""
        raise NotImplementedError


class CorrectorConfig(ComponentConfig):
    """Fields every corrector accepts (set through the PC solver's entry)."""

    snr: float = Field(0.16, gt=0, description="target signal-to-noise ratio")
    steps: int = Field(1, ge=0, description="corrector steps per time step")


class Corrector(Component):
    """MCMC steps at a fixed ``t`` targeting ``p_t``; returns ``(x, x_mean)``."""

    kind: ClassVar[str] = "corrector"
    Config: ClassVar[type[ComponentConfig]] = CorrectorConfig

    def step(
        self, x: Tensor, t: Tensor, score: ScoreFn, sde: SDE, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError
