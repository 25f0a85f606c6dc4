"""Every hook a diffuse-engine plugin can implement, in one place.

Plugins are Python objects (usually modules) with functions marked
``@diffuse_engine.hookimpl`` whose names match the specs below. They are found through
the entry-point group ``diffuse_engine.plugins`` or passed as ``Engine(plugins=[...])``.

Two families of hooks:

* **Registration hooks** (``diffuse_register_*``) are called once when an engine is
  created. Each returns a list of implementation *classes*; every class declares a
  ``name`` unique within its kind and a pydantic ``Config``. Two classes with the same
  kind and name are an error naming both providers.
* **Event hooks** are called for coarse events (run start and end, a checkpoint
  written) and, only when some plugin implements them, once per sampling or training
  step. No tensor computation is ever routed through a hook: solver loops are plain
  tensor code. ``diffuse_configure(engine)`` runs once per engine after loading, so a
  plugin can register an observer only when an option asks for it (the metrics logger).

The hook reference in docs/plugins.md is generated from the docstrings below
(``python scripts/gen_hook_docs.py``; a test fails when it is stale).

Shape and time conventions shared by all components: data ``x`` is ``(B, *dims)``;
times ``t`` are ``(B,)`` tensors on ``x``'s device with ``x``'s dtype, continuous in
``[eps, T]`` with ``T = 1`` by default; the forward SDE runs from data at ``t = 0`` to
noise at ``T``, samplers run backwards from ``T`` to ``eps``. For the discrete DDPM
chain, step ``i`` of ``N`` is ``t = i / N``.
"""

from __future__ import annotations

import pluggy

PROJECT = "diffuse_engine"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ---------------------------------------------------------------------------------
# Registration: forward processes
# ---------------------------------------------------------------------------------
@hookspec
def diffuse_register_sdes():
    """Return SDE classes (subclasses of :class:`diffuse_engine.SDE`).

    An SDE gives the drift ``f(x, t)`` (same shape as ``x``), the diffusion ``g(t)``
    ``(B,)``, its Gaussian perturbation kernel ``marginal(t) -> (mean_coeff, std)``
    each ``(B,)``, the prior at ``T`` (``prior_sample``, ``prior_log_prob`` -> ``(B,)``)
    and the discretisations used by the predictors. Results keep ``x``'s dtype and
    device. Time runs forward (data at 0, noise at ``T``). Optionally,
    ``time_of_log_snr(lam)`` inverts ``log_snr`` in closed form (VP, sub-VP and VE do);
    the log-SNR and Karras schedules then skip their bisection, and a closed form whose
    times do not give back the targets is ignored. The data prior (``data_prior``,
    ``start_sample``) is derived from ``marginal(T)``.
    """


@hookspec
def diffuse_register_kernels():
    """Return perturbation-kernel classes (:class:`diffuse_engine.PerturbationKernel`).

    A kernel is built for one SDE and gives ``marginal(t) -> (mean_coeff, std)`` for
    ``t`` of shape ``(B,)``. Selected per SDE entry with ``kernel = "NAME"``; replaces
    the SDE's closed form.
    """


# ---------------------------------------------------------------------------------
# Registration: models and objectives
# ---------------------------------------------------------------------------------
@hookspec
def diffuse_register_score_models():
    """Return score-model classes (:class:`diffuse_engine.ScoreModel`).

    Built as ``cls(config, sde=sde)``; calling the model with ``x`` ``(B, *dims)`` and
    ``t`` ``(B,)`` returns ``grad_x log p_t(x)`` of ``x``'s shape, dtype and device.
    ``forward`` may instead output epsilon or x0 per ``config.parameterisation``.
    A conditional model sets ``conditional = True``: it is called as ``model(x, t,
    cond)`` with ``cond`` a dict of per-sample tensors (``{"label": (B,) int64}`` for
    class-conditional models) and returns ``grad_x log p_t(x | cond)``; ``cond=None``
    asks for the unconditional score (a model trained with label dropout has it).
    Optionally ``data_moments()`` returns the per-coordinate ``(mean, var)`` of the
    data (each of ``data_shape``): unconditional sampling then starts from the Gaussian
    with ``p_T``'s mean and variance instead of the SDE's prior (``prior="auto"``).
    """


@hookspec
def diffuse_register_classifiers():
    """Return noise-conditional classifier classes (:class:`diffuse_engine.Classifier`).

    Built as ``cls(config, sde=sde)``; ``classifier(x, t)`` with ``x`` ``(B, *dims)`` and
    ``t`` ``(B,)`` returns logits ``(B, K)``: ``log p_t(k | x)`` up to a per-sample
    constant, for the ``classifier`` guidance method (its gradient in ``x`` is taken
    by autograd, so the computation must be differentiable). ``num_classes`` is ``K``.
    """


@hookspec
def diffuse_register_losses():
    """Return loss classes (:class:`diffuse_engine.Loss`).

    Built as ``cls(config, sde=sde)``; ``loss(model, x0, generator, cond=None)`` returns
    a scalar tensor for a data batch ``x0`` ``(B, *dims)``, sampling ``t`` in ``[eps,
    T]``. Class-conditional training passes ``cond={"label": (B,) int64}`` (only then),
    and the loss calls ``model(x, t, cond)``; all randomness comes from ``generator``.
    """


@hookspec
def diffuse_register_datasets():
    """Return dataset classes (:class:`diffuse_engine.Dataset`).

    ``sample(n, generator)`` returns float tensors ``(n, *shape)`` on the CPU; the
    engine moves batches to the run's device. Labelled datasets set ``num_classes`` and
    implement ``sample_labelled(n, generator) -> (x, labels)`` with ``(n,)`` int64 labels
    in ``[0, num_classes)``, for class-conditional models and classifiers.
    """


# ---------------------------------------------------------------------------------
# Registration: solvers
# ---------------------------------------------------------------------------------
@hookspec
def diffuse_register_solvers():
    """Return sampler classes (:class:`diffuse_engine.Solver`).

    ``sample(score, sde, x_T, generator=, callback=)`` integrates from ``x_T`` (a prior
    sample, ``(B, *dims)``) at time ``T`` down to ``eps`` and returns samples of the
    same shape. ``check(sde)`` raises ``IncompatibleError`` for unsupported SDEs; the
    engine calls it when it builds the pair, before sampling. Take times from
    ``self.time_grid(sde, score, x_T)`` so every registry ``schedule`` works, the
    score-fitted ``gits`` one included (the engine fits it once per run through
    ``prepare``, on rank 0 alone in a distributed run when ``fits_grid`` is true, and
    counts those evaluations apart). Within one ``sample`` call, call the score on one
    layout (the shape and dtype of the first call): the engine checks the score's
    output on each shard's first call only. A solver that evaluates another batch
    size or dtype mid-run (a doubled batch for some steps) sets ``fixed_layout =
    False`` and gets a score that checks every new layout.
    """


@hookspec
def diffuse_register_predictors():
    """Return predictor classes for the PC sampler (:class:`diffuse_engine.Predictor`).

    ``step(x, t, t_next, score, sde, generator) -> (x, x_mean)`` moves from ``t`` to
    ``t_next < t``; ``t`` and ``t_next`` are ``(B,)`` tensors. Optionally
    ``plan(sde, grid)`` returns per-step coefficients (Python floats) computed once
    before the loop, and the sampler then calls ``planned_step(x, t, coefficients,
    score, generator)`` instead; return ``None`` from ``plan`` to keep ``step``.
    """


@hookspec
def diffuse_register_correctors():
    """Return corrector classes for the PC sampler (:class:`diffuse_engine.Corrector`).

    ``step(x, t, score, sde, generator) -> (x, x_mean)`` runs ``config.steps`` MCMC
    steps targeting ``p_t`` at fixed ``t`` ``(B,)``.
    """


@hookspec
def diffuse_register_guidance():
    """Return guidance classes (:class:`diffuse_engine.Guidance`): how ``cond`` steers
    sampling (``engine.sample(..., cond={...}, guidance="NAME")``).

    Built as ``cls(config)``; ``validate(cond, shape)`` checks the condition for samples
    of ``shape`` ``(n, *dims)`` before any sampling (one-line errors naming the key);
    then per shard ``bind(score, sde, cond, classifier=, generator=)`` returns a
    ``Guided`` holding any of: ``score(x, t)``, the guided score the solver calls;
    ``transform(x, step, t_next)``, a projection of the state after each solver step
    (set ``projects = True``: only solvers with ``supports_transform`` run it, the
    others are refused when the call is built); ``finish(x)``, applied to the final
    samples; ``run(solver, sde, x_T, generator=, callback=)``, which owns the whole
    loop (particle methods; the solver lends its time grid). ``score`` there is the
    model as ``score(x, t, cond)``, and ``score(x, t, None)`` is unconditional. ``cond``
    holds the shard's rows of every per-sample tensor (first dimension ``n``) and the
    whole of the keys listed in ``shared``. Solvers a method supports are declared in
    ``solvers`` (``None``: all) and checked in ``check_solver``, before a run makes its
    folder (``check`` calls it too). Time runs from ``T`` down.
    """


# ---------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------
@hookspec
def diffuse_register_commands(app):
    """Add commands to the ``diffuse`` typer application ``app`` (``app.command()``)."""


# ---------------------------------------------------------------------------------
# Events (observers). Return values are ignored.
# ---------------------------------------------------------------------------------
@hookspec
def diffuse_configure(engine):
    """An :class:`~diffuse_engine.Engine` was built (plugins, catalogue and registry loaded).

    Called once per engine. A plugin may register further plugin objects here with
    ``engine.pm.register(obj)``, e.g. an observer that is enabled by an option, so that
    per-step event hooks have implementations only when someone asked for them.
    """


@hookspec
def diffuse_run_start(run):
    """A run begins. ``run`` is a dict with ``command``, ``out`` (a path or None) and
    ``config`` (the fully resolved configuration, JSON-serialisable).

    ``command`` is ``"run"``, ``"sample"`` or ``"train"``; a ``diffuse run`` that trains
    first nests a ``"train"`` run (``out`` its training folder) inside its own. For
    ``run`` and ``sample`` ``out`` is where the finished folder will be (it is complete at
    ``diffuse_run_end``); for ``train`` it is the folder being written now (with
    ``--overwrite`` the hidden ``.NAME.new-PID`` sibling until the first checkpoint is
    swapped in as ``NAME``).
    """


@hookspec
def diffuse_run_end(run, metrics):
    """A run finished successfully; ``metrics`` is the dict written to metrics.json."""


@hookspec
def diffuse_sampling_step(step, total, t):
    """Sampling step ``step`` of ``total`` reached time ``t`` (a float).

    Called only if some plugin implements it, so it costs nothing otherwise.
    """


@hookspec
def diffuse_training_step(step, loss):
    """Training step ``step`` finished with ``loss`` (a float). Called only if implemented."""


@hookspec
def diffuse_checkpoint_saved(path, step):
    """A checkpoint was written completely (atomically) to ``path`` at ``step``."""


@hookspec
def diffuse_training_stats(step, stats):
    """Training reached ``step``, a loss read-back step (every ``log_every`` steps and
    the last): ``stats`` is a dict of floats, ``loss`` (the mean since the previous
    read-back), ``lr`` (this step's learning rate), ``grad_norm`` (this step's total
    gradient norm before clipping) and ``ema_lag`` (``|theta_ema - theta| / |theta|``,
    how far the EMA weights trail the trained ones). Called on rank 0 only, and only if
    implemented: the norms cost nothing otherwise.
    """


@hookspec
def diffuse_plot_saved(path, step):
    """A sample plot (image grid or scatter, a PNG) was written to ``path`` at training
    ``step`` (every ``plot_every`` steps and at the end)."""
