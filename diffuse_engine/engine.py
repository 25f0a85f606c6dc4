"""The Engine: the public Python API every CLI command is a thin layer over.

``Engine()`` loads plugins (entry points plus any passed in), builds the catalogue of
implementations, and merges and validates the registry. ``build`` turns registry
entries into components; ``sample`` runs a solver. No global state: two engines
with different plugins coexist in one process.
"""

from __future__ import annotations

import operator
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from .component import Component
from .devices import check_device
from .distributed import (DEFAULT_SHARD_SIZE, as_context, gather_shards, my_shards,
                          shard_seed, shard_sizes)
from .errors import DiffuseError, NumericalError, RegistryError
from .faults import FiniteWatch, NonFiniteSeen, locate
from .plugins import Catalogue, make_plugin_manager
from .progress import progress_bar
from .registry import Registry, parse_assignment
from .score import CallableScore, ScoreModel
from .sde import SDE

#: kinds whose components are bound to an SDE when built
SDE_BOUND = ("score", "loss")


@dataclass
class SamplingResult:
    """Samples plus what it took to make them."""

    samples: Tensor
    nfe: int
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)
    sde: SDE | None = None
    score: Any = None
    #: score evaluations spent once per run before sampling (a fitted schedule's pilot)
    setup_nfe: int = 0


class ScoreBoundary:
    """Checks a score function's output once per call (shape and dtype, no device
    sync) and counts evaluations. Wraps every score the engine hands a solver."""

    def __init__(self, fn, name: str):
        self.fn = fn
        self.name = name
        self.calls = 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        out = self.fn(x, t)
        if (not isinstance(out, Tensor) or out.shape != x.shape or out.dtype != x.dtype
                or out.device != x.device):
            got = (f"shape {tuple(out.shape)} dtype {out.dtype} on {out.device}"
                   if isinstance(out, Tensor) else type(out).__name__)
            raise DiffuseError(f"score model {self.name!r} returned {got}; expected a tensor "
                               f"of the input's shape {tuple(x.shape)} and dtype {x.dtype} "
                               f"on {x.device}")
        return out


def _check_shape(shape, data_shape, dtype) -> tuple[int, ...]:
    """``shape`` as ``(n, *dims)`` of positive ints matching the score's data shape."""
    try:
        out = tuple(operator.index(s) for s in shape)
    except TypeError:
        raise DiffuseError(f"shape must be (n, *dims) of integers, not {shape!r}") from None
    if len(out) < 2 or min(out) < 1:
        raise DiffuseError(f"shape must be (n, *dims) with n >= 1 and dims >= 1, not {out}")
    if data_shape is not None and tuple(out[1:]) != tuple(data_shape):
        raise DiffuseError(f"shape {out}: this score model's data are {tuple(data_shape)}; "
                           f"use shape=(n, {', '.join(map(str, data_shape))}) or shape=n")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise DiffuseError(f"dtype must be a floating-point torch dtype, not {dtype!r}")
    return out


def _as_list(v) -> list:
    if v is None:
        return []
    if isinstance(v, (str, Path)):
        return [v]
    return list(v)


class Engine:
    """Plugins + catalogue + registry; builds components and samples.

    ``registry``: extra registry file(s) merged over the built-in default.
    ``plugins``: objects with ``@hookimpl`` functions, registered without entry points.
    ``autoload``: also load third-party entry-point plugins (built-ins always load).
    ``sets``: ``"KEY=VALUE"`` strings as on the command line; ``KIND.NAME.FIELD=V``
    changes the registry, a bare ``FIELD=V`` (or ``KIND.FIELD=V``) overrides the
    entries chosen by each call.
    ``allow_imports``: let registry entries name ``type = "package.module:Class"``
    (imports code; off by default, see :mod:`diffuse_engine.trust`).
    ``distributed``: ``True`` to train and sample across the processes of a torchrun
    launch (initialising ``torch.distributed`` from its environment), or a
    :class:`~diffuse_engine.distributed.DistContext`; see :mod:`diffuse_engine.distributed`.
    """

    def __init__(self, registry: str | Path | Sequence[str | Path] | None = None,
                 plugins: Iterable[Any] = (), *, autoload: bool = True,
                 sets: Iterable[str] = (), allow_imports: bool = False,
                 distributed: Any = False):
        self.dist = as_context(distributed)
        self.pm, self.plugin_infos = make_plugin_manager(plugins, autoload)
        self.catalogue = Catalogue.from_plugin_manager(self.pm, self.plugin_infos)
        qualified, self.set_overrides = [], {}
        for item in sets:
            key, value = parse_assignment(item)
            if key.count(".") == 2:
                qualified.append((key, value))
            else:
                self.set_overrides[key] = value
        self.registry = Registry.load(_as_list(registry), self.catalogue, sets=qualified,
                                      allow_imports=allow_imports)
        # plugins may now register observers (the metrics logger does when enabled)
        self.pm.hook.diffuse_configure(engine=self)

    @property
    def hook(self):
        """The pluggy hook relay, for firing events (``engine.hook.diffuse_run_end``)."""
        return self.pm.hook

    def has_observers(self, hook_name: str) -> bool:
        """Whether any plugin implements ``hook_name`` (so per-step events cost nothing)."""
        return bool(getattr(self.pm.hook, hook_name).get_hookimpls())

    # ---- building -------------------------------------------------------------
    def resolve(self, kind: str, name: str, **overrides):
        """``(class, validated config)`` for entry ``[kind.name]`` with ``overrides``."""
        return self.registry.resolve(kind, name, overrides)

    def build(self, kind: str, name: str, *, sde: SDE | None = None, **overrides) -> Component:
        """Build the component of registry entry ``[kind.name]`` (or implementation
        ``name`` with its defaults). Score models and losses need ``sde=``."""
        cls, config = self.resolve(kind, name, **overrides)
        if kind == "sde":
            obj = cls(config)
            if config.kernel is not None:
                obj.attach_kernel(self.build("kernel", config.kernel, sde=obj))
            return obj
        if kind == "kernel":
            return cls(config, sde=sde)
        if kind in SDE_BOUND:
            if sde is None:
                raise TypeError(f"building a {kind} needs sde=")
            obj = cls(config, sde=sde)
            if hasattr(obj, "bind_engine"):  # e.g. a checkpoint score building its network
                obj.bind_engine(self)
            return obj
        if kind == "solver":
            return cls(config, catalogue=self.catalogue)
        return cls(config)

    def route_overrides(self, chosen: Mapping[str, type], overrides: Mapping[str, Any]
                        ) -> dict[str, dict[str, Any]]:
        """Send each ``FIELD`` or ``KIND.FIELD`` override to the chosen entry that has it."""
        routed: dict[str, dict[str, Any]] = {k: {} for k in chosen}
        for key, value in {**self.set_overrides, **overrides}.items():
            from_sets = key in self.set_overrides and key not in overrides
            kind, _, fname = key.rpartition(".")
            if kind:
                if kind not in chosen:
                    raise RegistryError(f"override {key}: {kind!r} is not part of this call; "
                                        f"use one of: {', '.join(chosen)}")
                targets = [kind]
            else:
                targets = [k for k, cls in chosen.items() if fname in cls.Config.model_fields]
            if not targets and from_sets and self._known_setting(key):
                continue  # the engine's sets apply to the calls that have the field
            if not targets:
                allowed = sorted({f"{k}.{f}" for k, c in chosen.items() for f in c.Config.model_fields})
                raise RegistryError(f"override {key!r}: no chosen entry has that field; "
                                    f"allowed: {', '.join(allowed)}")
            if len(targets) > 1:
                raise RegistryError(f"override {key!r} is ambiguous; qualify it as one of "
                                    + ", ".join(f"{k}.{fname}" for k in targets))
            routed[targets[0]][fname] = value
        return routed

    def _known_setting(self, key: str) -> bool:
        """Whether ``key`` (``FIELD`` or ``KIND.FIELD``) names a training setting or a
        field of some installed implementation: an ``Engine(sets=...)`` entry that is
        real but not for this call, as opposed to a typo."""
        from .training import TrainSettings
        kind, _, fname = key.rpartition(".")
        if kind in ("", "train") and fname in TrainSettings.model_fields:
            return True
        kinds = [kind] if kind else self.catalogue.kinds()
        return any(fname in self.catalogue.get(k, n).Config.model_fields
                   for k in kinds if k in self.catalogue.kinds()
                   for n in self.catalogue.names(k))

    # ---- training -------------------------------------------------------------
    def train(self, data: str | None = None, sde: str | None = None, model: str | None = None,
              loss: str | None = None, **kwargs) -> ScoreModel:
        """Train a score model; returns it with EMA weights, ready for ``sample(score=)``.

        See :meth:`training` for the arguments.
        """
        return self.training(data=data, sde=sde, model=model, loss=loss, **kwargs).model

    def training(self, data: str | None = None, sde: str | None = None,
                 model: str | None = None, loss: str | None = None, *,
                 preset: str = "default", out: str | Path | None = None,
                 resume: bool = False, overwrite: bool = False, progress: bool = False,
                 **overrides):
        """Train per ``[train.PRESET]`` with the given entries; a ``TrainResult``.

        ``overrides`` are training settings (``steps=``, ``lr=``, ``batch_size=``, ...,
        see :class:`~diffuse_engine.training.TrainSettings`) or fields of the chosen
        data/sde/score/loss entries (``hidden=``, ``likelihood_weighting=``,
        ``data.noise=``). ``out`` writes checkpoints and plots there; ``resume``
        continues the run in ``out`` (with the same losses as an uninterrupted run).
        """
        from .training import run_training, split_overrides
        set_settings, _ = split_overrides(self.set_overrides)  # Engine(sets=["lr=1e-3"])
        settings_fields, fields = split_overrides(overrides)
        settings_fields = {**set_settings, **settings_fields}
        choices = {k: v for k, v in (("data", data), ("sde", sde), ("model", model),
                                     ("loss", loss)) if v is not None}
        if resume:  # everything comes from the checkpoint except what may change
            from .training import RESUMABLE, TrainSettings
            fixed = sorted(set(choices) | set(fields) | (set(settings_fields) - set(RESUMABLE)))
            if fixed:
                raise DiffuseError(f"resume continues the recorded run; these cannot change: "
                                   f"{', '.join(fixed)}; allowed: {', '.join(RESUMABLE)}")
            settings = TrainSettings.model_validate(settings_fields)
        else:
            settings = self.registry.train_settings(preset, {**choices, **settings_fields})
        return run_training(self, settings, fields, out=out, resume=resume,
                            overwrite=overwrite, progress=progress)

    # ---- sampling -------------------------------------------------------------
    def score_class(self, score: Any) -> type:
        """The implementation class behind ``score``: a registry name, a
        :class:`ScoreModel` or a callable ``fn(x, t)`` (wrapped as :class:`CallableScore`)."""
        if isinstance(score, str):
            return self.resolve("score", score)[0]
        return type(score) if isinstance(score, ScoreModel) else CallableScore

    def bind_score(self, score: Any, sde: SDE, **fields) -> ScoreModel:
        """The score model for ``sde`` from a registry name (with ``fields`` overriding its
        entry), a ready :class:`ScoreModel`, or a callable ``fn(x, t)``."""
        if isinstance(score, str):
            model = self.build("score", score, sde=sde, **fields)
        elif isinstance(score, ScoreModel):
            model = score
        elif callable(score):
            model = CallableScore(score, sde=sde, **fields)
        else:
            raise DiffuseError(f"score must be a callable fn(x, t), a ScoreModel or a registry "
                               f"name, not {type(score).__name__}")
        if hasattr(model, "check_sde"):  # trained models refuse another SDE
            model.check_sde(sde)
        return model

    def sample(self, score: Any = "gmm", sde: str = "vp", solver: str = "pc",
               shape: int | Sequence[int] = 1000, seed: int = 0, **kwargs) -> Tensor:
        """Samples ``shape`` (or ``(shape, *data_dims)`` for an int) from ``score``.

        ``score`` is a callable ``fn(x, t)``, a :class:`ScoreModel`, or a registry name.
        Remaining keyword arguments: ``device``, ``dtype``, ``progress`` and registry
        field overrides of the chosen entries (``steps=``, ``snr=``, ...).
        """
        return self.sampling(score=score, sde=sde, solver=solver, shape=shape, seed=seed,
                             **kwargs).samples

    # ---- likelihood -----------------------------------------------------------
    def log_likelihood(self, x: Tensor, score: Any = "gmm", sde: str = "vp",
                       **overrides) -> Tensor:
        """``log p(x)`` in nats per sample, shape ``(n,)``, through the probability-flow
        ODE (:mod:`diffuse_engine.likelihood`). Keyword arguments: ``device``,
        ``progress``, likelihood settings (``rtol=``, ``divergence=``, ``probes=``,
        ... of :class:`~diffuse_engine.likelihood.LikelihoodConfig`) and registry
        fields of the chosen SDE and score. ``engine.likelihood(...)`` returns the
        full :class:`~diffuse_engine.likelihood.LikelihoodResult`."""
        return self.likelihood(x, score=score, sde=sde, **overrides).log_likelihood

    def likelihood(self, x: Tensor, score: Any = "gmm", sde: str = "vp", **overrides):
        """Like :meth:`log_likelihood`, with NFE, time, bits/dim and the settings."""
        from .likelihood import evaluate
        return evaluate(self, x, score=score, sde=sde, **overrides)

    def sampling(self, score: Any = "gmm", sde: str = "vp", solver: str = "pc",
                 shape: int | Sequence[int] = 1000, seed: int = 0, *,
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                 progress: bool = False, check_every: int = 0,
                 shard_size: int = DEFAULT_SHARD_SIZE, **overrides) -> SamplingResult:
        """Like :meth:`sample`, returning a :class:`SamplingResult` (NFE, time, config).

        Samples are made in seeded shards of ``shard_size`` (shard ``j`` from its own
        generator, :func:`~diffuse_engine.distributed.shard_seed`), so an engine with
        ``distributed=True`` spreads the shards over the ranks and every rank returns the
        same complete samples as one process would. ``nfe`` counts the score
        evaluations of one shard (the most of any shard, for adaptive solvers).

        NaN/Inf in the samples raises :class:`NumericalError` naming the step, time and
        component where it first appeared (located by a replay, see :mod:`.faults`);
        ``check_every=k`` also checks every ``k`` score calls to stop a bad run early.
        """
        if not isinstance(check_every, int) or check_every < 0:
            raise DiffuseError(f"check_every must be an integer >= 0 (0: check at the end "
                               f"only), not {check_every!r}")
        device = self.dist.device(check_device(device or "cpu"))
        if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:
            raise DiffuseError(f"shard_size must be a whole number of samples >= 1, not "
                               f"{shard_size!r}")
        try:
            seed = operator.index(seed)
        except TypeError:
            raise DiffuseError(f"seed must be an integer, not {seed!r}") from None
        if not 0 <= seed < 2**63:
            raise DiffuseError(f"seed must be in [0, 2**63), not {seed}")
        sde_cls, _ = self.resolve("sde", sde)
        solver_cls, _ = self.resolve("solver", solver)
        score_cls = self.score_class(score)
        routed = self.route_overrides({"sde": sde_cls, "solver": solver_cls,
                                       "score": score_cls}, overrides)
        sde_obj = self.build("sde", sde, **routed["sde"])
        solver_obj = self.build("solver", solver, **routed["solver"])
        score_obj = self.bind_score(score, sde_obj, **routed["score"])
        solver_obj.check(sde_obj)
        if isinstance(shape, int):
            data_shape = getattr(score_obj, "data_shape", None)
            if data_shape is None:
                raise DiffuseError("shape=int needs a score model that knows its data shape; "
                                   "pass shape=(n, *dims)")
            shape = (shape, *data_shape)
        shape = _check_shape(shape, getattr(score_obj, "data_shape", None), dtype)
        if hasattr(score_obj, "to"):
            score_obj = score_obj.to(device)
        # seeded shards (see diffuse_engine.distributed): the same samples on any number
        # of processes; shard 0 is seeded by `seed`, so n <= shard_size is one plain run
        sizes = shard_sizes(shape[0], shard_size)
        ctx = self.dist
        mine = my_shards(len(sizes), ctx)
        counted = ScoreBoundary(score_obj, score if isinstance(score, str) else score_cls.name)
        config = {"sde": {"name": sde, "type": sde_cls.name, **sde_obj.config.model_dump()},
                  "solver": {"name": solver, "type": solver_cls.name,
                             **solver_obj.config.model_dump()},
                  "score": {"name": score if isinstance(score, str) else score_cls.name,
                            **score_obj.config.model_dump(mode="json")},
                  "shape": list(shape), "seed": seed, "device": str(device),
                  "dtype": str(dtype).removeprefix("torch."), "shard_size": shard_size}
        # rank 0 alone reports (its own shards' steps) so observers log once
        observe = self.has_observers("diffuse_sampling_step") and ctx.is_main
        steps = solver_obj.config.steps
        start = time.perf_counter()
        with torch.no_grad():
            fitted = solver_obj.prepare(counted, sde_obj, torch.empty((1, *shape[1:]),
                                                                      device=device, dtype=dtype))
        setup_nfe = counted.calls
        if fitted is not None and ctx.enabled:  # round-off may differ across devices
            solver_obj.adopt(ctx.all_gather_object(fitted)[0])
        local: dict[int, Tensor] = {}
        failed, nfe, crash = None, 0, None
        with progress_bar(steps * len(mine), f"sampling {sde}/{solver}",
                          enabled=progress and ctx.is_main) as bar:
            for i, j in enumerate(mine):
                callback = None
                if bar is not None or observe:
                    hook = self.pm.hook.diffuse_sampling_step

                    def callback(step: int, total: int, t: float, done: int = i * steps) -> None:
                        if bar is not None:
                            bar(done + step, t=t)
                        if observe:
                            hook(step=step, total=total, t=t)
                gen = torch.Generator(device=device).manual_seed(shard_seed(seed, j))
                x = sde_obj.prior_sample((sizes[j], *shape[1:]), generator=gen, device=device,
                                         dtype=dtype)
                scored = FiniteWatch(counted, check_every) if check_every else counted
                calls = counted.calls
                try:
                    with torch.no_grad():
                        out = solver_obj.sample(scored, sde_obj, x, generator=gen,
                                                callback=callback)
                except NonFiniteSeen:
                    out = None
                except DiffuseError:
                    raise
                except Exception as exc:  # a solver library giving up on NaN (torchdiffeq's
                    out, crash = None, exc  # "underflow in dt"): located below, else re-raised
                nfe = max(nfe, counted.calls - calls)
                if out is None or not torch.isfinite(out).all():
                    failed = j
                    break
                local[j] = out
        if ctx.enabled:  # agree before gathering, so no rank waits for one that failed
            status = ctx.all_gather_object((failed, nfe))
            nfe = max(n for _, n in status)
            elsewhere = [(r, f) for r, (f, _) in enumerate(status) if f is not None]
            if failed is None and elsewhere:
                raise NumericalError(f"sampling produced NaN/Inf on rank {elsewhere[0][0]} "
                                     f"(shard {elsewhere[0][1]}); its error says where")
        if failed is not None:
            def replay(score_fn, step_callback):  # the failed shard again, same seed
                g = torch.Generator(device=device).manual_seed(shard_seed(seed, failed))
                x_T = sde_obj.prior_sample((sizes[failed], *shape[1:]), generator=g,
                                           device=device, dtype=dtype)
                with torch.no_grad():
                    return solver_obj.sample(score_fn, sde_obj, x_T, generator=g,
                                             callback=step_callback)
            raise locate(replay, counted, score_name=counted.name, solver_name=solver,
                         sde_name=sde, steps=getattr(solver_obj.config, "steps", None),
                         crash=crash)
        out = local[0] if len(sizes) == 1 and not ctx.enabled else gather_shards(local, sizes, ctx)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        return SamplingResult(out, nfe, seconds, config, sde_obj, score_obj, setup_nfe)
