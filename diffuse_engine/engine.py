"""The Engine: the public Python API every CLI command is a thin layer over.

``Engine()`` loads plugins (entry points plus any passed in), builds the catalogue of
implementations, and merges and validates the registry. ``build`` turns registry
entries into components; ``sample`` runs a solver. No global state: two engines
with different plugins coexist in one process.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffuse_engine.components.builder import Builder
from diffuse_engine.components.memory_data import MemoryData
from diffuse_engine.components.score import ScoreModel
from diffuse_engine.core.devices import check_device
from diffuse_engine.core.distributed import DEFAULT_SHARD_SIZE, as_context
from diffuse_engine.core.errors import DiffuseError
from diffuse_engine.core.plugins import Catalogue, make_plugin_manager
from diffuse_engine.core.registry import Registry
from diffuse_engine.core.registry_text import parse_assignment
from diffuse_engine.likelihood import LikelihoodConfig, evaluate
from diffuse_engine.runs import RunPlan, execute_run, plan_run
from diffuse_engine.sampling.loop import SamplingResult, run_sampling
from diffuse_engine.sampling.request import build_job, sde_and_solver
from diffuse_engine.training import (
    RESUMABLE,
    TrainSettings,
    run_training,
    split_overrides,
    train_for_run,
)

#: service settings an ``Engine(sets=...)`` assignment may name (not component fields)
SERVICE_SETTINGS = [("train", f) for f in TrainSettings.model_fields] + [
    ("likelihood", f) for f in LikelihoodConfig.model_fields
]


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
    (imports code; off by default, see :mod:`diffuse_engine.core.trust`).
    ``distributed``: ``True`` to train and sample across the processes of a torchrun
    launch (initialising ``torch.distributed`` from its environment), or a
    :class:`~diffuse_engine.core.distributed.DistContext`; see
    :mod:`diffuse_engine.core.distributed`.
    """

    def __init__(
        self,
        registry: str | Path | Sequence[str | Path] | None = None,
        plugins: Iterable[Any] = (),
        *,
        autoload: bool = True,
        sets: Iterable[str] = (),
        allow_imports: bool = False,
        distributed: Any = False,
    ):
        if isinstance(sets, (str, bytes)) or not isinstance(sets, Iterable):
            raise DiffuseError(f"sets must be a list of 'KEY=VALUE' strings, not {sets!r}")
        self.dist = as_context(distributed)
        self.pm, self.plugin_infos = make_plugin_manager(plugins, autoload)
        catalogue = Catalogue.from_plugin_manager(self.pm, self.plugin_infos)
        qualified, set_overrides = [], {}
        for item in sets:
            if not isinstance(item, str):
                raise DiffuseError(f"sets must be 'KEY=VALUE' strings, not {item!r}")
            key, value = parse_assignment(item)
            if key.count(".") == 2:
                qualified.append((key, value))
            else:
                set_overrides[key] = value
        registry = Registry.load(
            _as_list(registry),
            catalogue,
            sets=qualified,
            allow_imports=allow_imports,
            train_model=TrainSettings,
        )
        #: what the services get: catalogue, registry, sets, events and process group
        self.builder = Builder(
            catalogue,
            registry,
            hook=self.pm.hook,
            dist=self.dist,
            set_overrides=set_overrides,
            known_settings=SERVICE_SETTINGS,
        )
        # plugins may now register observers (the metrics logger does when enabled)
        self.pm.hook.diffuse_configure(engine=self)

    # ---- what the builder knows ------------------------------------------------------------
    @property
    def catalogue(self) -> Catalogue:
        """Installed implementations by kind and name."""
        return self.builder.catalogue

    @property
    def registry(self) -> Registry:
        """The merged, validated registry."""
        return self.builder.registry

    @property
    def set_overrides(self) -> dict[str, Any]:
        """The bare ``FIELD=V`` / ``KIND.FIELD=V`` assignments of ``sets``."""
        return self.builder.set_overrides

    @property
    def hook(self):
        """The pluggy hook relay, for firing events (``engine.hook.diffuse_run_end``)."""
        return self.pm.hook

    def has_observers(self, hook_name: str) -> bool:
        """Whether any plugin implements ``hook_name`` (so per-step events cost nothing)."""
        return self.builder.has_observers(hook_name)

    def resolve(self, kind: str, name: str, **overrides):
        """``(class, validated config)`` for entry ``[kind.name]`` with ``overrides``."""
        return self.builder.resolve(kind, name, **overrides)

    def build(self, kind: str, name: str, **overrides):
        """Build the component of entry ``[kind.name]``; score models and losses need
        ``sde=`` (see :meth:`Builder.build`)."""
        return self.builder.build(kind, name, **overrides)

    def route_overrides(self, chosen, overrides):
        """Send each ``FIELD`` or ``KIND.FIELD`` override to the chosen entry that has it."""
        return self.builder.route_overrides(chosen, overrides)

    def bind_score(self, score: Any, sde, **fields) -> ScoreModel:
        """The score model for ``sde`` from a name, a :class:`ScoreModel` or ``fn(x, t)``."""
        return self.builder.bind_score(score, sde, **fields)

    # ---- training ------------------------------------------------------------------------
    def train(
        self,
        data: Any = None,
        sde: str | None = None,
        model: str | None = None,
        loss: str | None = None,
        **kwargs,
    ) -> ScoreModel:
        """Train a score model; returns it with EMA weights, ready for ``sample(score=)``.

        See :meth:`training` for the arguments.
        """
        return self.training(data=data, sde=sde, model=model, loss=loss, **kwargs).model

    def training(
        self,
        data: Any = None,
        sde: str | None = None,
        model: str | None = None,
        loss: str | None = None,
        *,
        labels: Any = None,
        preset: str = "default",
        out: str | Path | None = None,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = False,
        **overrides,
    ):
        """Train per ``[train.PRESET]`` with the given entries; a ``TrainResult``.

        ``overrides`` are training settings (``steps=``, ``lr=``, ``batch_size=``, ...,
        see :class:`~diffuse_engine.training.TrainSettings`) or fields of the chosen
        data/sde/score/loss entries (``hidden=``, ``likelihood_weighting=``,
        ``data.noise=``). ``out`` writes checkpoints and plots there; ``resume``
        continues the run in ``out`` (with the same losses as an uninterrupted run).

        ``data`` is a dataset entry name or in-memory data: a tensor, NumPy array,
        ``torch.utils.data.Dataset`` (items ``x`` or ``(x, label)``) or iterable of
        batches, with ``labels=`` (see :mod:`diffuse_engine.components.memory_data`).
        """
        memory = None
        if data is not None and not isinstance(data, str):
            memory, data = MemoryData(data, labels), None
        elif labels is not None:
            raise DiffuseError("labels= goes with in-memory data= (a tensor, array, ...)")
        set_settings, _ = split_overrides(self.set_overrides)  # Engine(sets=["lr=1e-3"])
        settings_fields, fields = split_overrides(overrides)
        settings_fields = {**set_settings, **settings_fields}
        choices = {
            k: v
            for k, v in (("data", data), ("sde", sde), ("model", model), ("loss", loss))
            if v is not None
        }
        if resume:  # everything comes from the checkpoint except what may change
            fixed = sorted(set(choices) | set(fields) | (set(settings_fields) - set(RESUMABLE)))
            if fixed:
                raise DiffuseError(
                    f"resume continues the recorded run; these cannot change: "
                    f"{', '.join(fixed)}; allowed: {', '.join(RESUMABLE)}"
                )
            settings = TrainSettings.model_validate(settings_fields)
        else:
            settings = self.registry.train_settings(preset, {**choices, **settings_fields})
        return run_training(
            self.builder,
            settings,
            fields,
            sample=self.sampling,
            out=out,
            resume=resume,
            overwrite=overwrite,
            progress=progress,
            data=memory,
        )

    # ---- runs ------------------------------------------------------------------------------
    def plan_run(self, preset: str = "default", **choices: Any) -> RunPlan:
        """``[run.PRESET]`` with ``choices`` (sde, solver, score, data, n, seed, device; other
        keys are field overrides), validated before anything touches the disk."""
        return plan_run(self.builder, preset, **choices)

    def run(
        self,
        plan: RunPlan,
        out: str | Path,
        *,
        overwrite: bool = False,
        progress: bool = False,
        sample_format: str = "pt",
    ) -> dict[str, Any]:
        """What ``diffuse run`` does: train the plan's model if it needs it, sample, and
        write run folder ``out`` (samples, plot, metrics, config); the metrics."""

        def train(plan: RunPlan, train_out: Path, progress: bool = False):
            return train_for_run(
                self.builder, plan, train_out, sample=self.sampling, progress=progress
            )

        def check(**kw) -> None:  # the SDE and solver, before anything is on disk
            sde_and_solver(self.builder, **kw)

        return execute_run(
            self.builder,
            plan,
            out,
            sample=self.sampling,
            train=train,
            check=check,
            overwrite=overwrite,
            progress=progress,
            sample_format=sample_format,
        )

    # ---- sampling ------------------------------------------------------------------------
    def sample(
        self,
        score: Any = "gmm",
        sde: str | None = None,
        solver: str = "pc",
        shape: int | Sequence[int] = 1000,
        seed: int = 0,
        **kwargs,
    ) -> Tensor:
        """Samples ``shape`` (or ``(shape, *data_dims)`` for an int) from ``score``.

        ``score`` is a callable ``fn(x, t)`` (or a conditional ``fn(x, t, cond)``), a
        :class:`ScoreModel`, or a registry name. ``sde=None`` takes the score model's own
        SDE (a trained model's, a diffusers model's scheduler), else ``vp``. Remaining
        keyword arguments: ``device``, ``dtype``, ``progress``, ``nfe`` (a budget of score
        evaluations per sample), ``cond`` / ``guidance`` / ``classifier`` / ``noise`` /
        ``prior`` (see :meth:`sampling`) and registry field overrides of the chosen
        entries (``steps=``, ``snr=``, ``scale=``, ...).
        """
        return self.sampling(
            score=score, sde=sde, solver=solver, shape=shape, seed=seed, **kwargs
        ).samples

    def sampling(
        self,
        score: Any = "gmm",
        sde: str | None = None,
        solver: str = "pc",
        shape: int | Sequence[int] = 1000,
        seed: int = 0,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        progress: bool = False,
        check_every: int = 0,
        shard_size: int = DEFAULT_SHARD_SIZE,
        cond: dict[str, Any] | None = None,
        guidance: str | None = None,
        classifier: Any = None,
        noise: Tensor | None = None,
        prior: str = "auto",
        **overrides,
    ) -> SamplingResult:
        """Like :meth:`sample`, returning a :class:`SamplingResult` (NFE, time, config).

        Samples are made in seeded shards of ``shard_size`` (see
        :mod:`diffuse_engine.sampling.loop`), so an engine with ``distributed=True``
        spreads the shards over the ranks and every rank returns the same samples.

        ``cond``: a dict of per-sample tensors (first dimension ``n``, sharded with the
        samples) the score model or ``guidance`` method reads, e.g. ``{"label": y}``;
        ``guidance``: a guidance entry (``conditional`` by default when ``cond`` has a
        ``label``; ``cfg``, ``classifier``, ... see :mod:`diffuse_engine.components.guidance`)
        whose fields (``scale=``) are overrides too; ``classifier``: ``logits(x, t) -> (B,
        K)`` or a classifier entry, for ``guidance="classifier"``; ``noise``: the prior
        sample ``x_T`` to start from, of the samples' shape (default: drawn per shard).
        ``prior``: where the draw comes from: ``"data"``, the Gaussian with the mean and
        variance of ``p_T`` for the score model's data (``ScoreModel.data_moments()``),
        ``"sde"``, the SDE's own prior (``N(0, I)`` for VP, as the reference code), or
        ``"auto"`` (the default): ``"data"`` when the model knows its data's moments.

        NaN/Inf in the samples raises :class:`NumericalError` naming the step, time and
        component where it first appeared (located by a replay, see
        :mod:`diffuse_engine.sampling.faults`); ``check_every=k`` also checks every
        ``k`` score calls to stop a bad run early.
        """
        if not isinstance(check_every, int) or check_every < 0:
            raise DiffuseError(
                f"check_every must be an integer >= 0 (0: check at the end "
                f"only), not {check_every!r}"
            )
        device = self.dist.device(check_device(device or "cpu"))
        if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:
            raise DiffuseError(
                f"shard_size must be a whole number of samples >= 1, not {shard_size!r}"
            )
        job, config = build_job(
            self.builder,
            score=score,
            sde=sde,
            solver=solver,
            shape=shape,
            seed=seed,
            device=device,
            dtype=dtype,
            shard_size=shard_size,
            check_every=check_every,
            cond=cond,
            guidance=guidance,
            classifier=classifier,
            noise=noise,
            overrides=overrides,
            prior=prior,
        )
        observe = self.has_observers("diffuse_sampling_step")
        samples, nfe, setup_nfe, seconds = run_sampling(
            job,
            dist=self.dist,
            progress=progress,
            step_hook=self.pm.hook.diffuse_sampling_step if observe else None,
        )
        return SamplingResult(
            samples,
            nfe,
            seconds,
            config,
            job.sde,
            job.score,
            setup_nfe,
            fitted_times=job.solver.fitted_times,
            fitted_fields=job.solver.fitted_fields,
        )

    # ---- likelihood ----------------------------------------------------------------------
    def log_likelihood(self, x: Tensor, score: Any = "gmm", sde: str = "vp", **overrides) -> Tensor:
        """``log p(x)`` in nats per sample, shape ``(n,)``, through the probability-flow
        ODE (:mod:`diffuse_engine.likelihood`). Keyword arguments: ``device``,
        ``progress``, likelihood settings (``rtol=``, ``divergence=``, ``probes=``,
        ... of :class:`~diffuse_engine.likelihood.LikelihoodConfig`) and registry
        fields of the chosen SDE and score. ``engine.likelihood(...)`` returns the
        full :class:`~diffuse_engine.likelihood.LikelihoodResult`."""
        return self.likelihood(x, score=score, sde=sde, **overrides).log_likelihood

    def likelihood(self, x: Tensor, score: Any = "gmm", sde: str = "vp", **overrides):
        """Like :meth:`log_likelihood`, with NFE, time, bits/dim and the settings."""
        return evaluate(self.builder, x, score=score, sde=sde, **overrides)
