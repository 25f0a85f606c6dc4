"""``diffuse sample``: sample a trained checkpoint, write samples, a plot and metrics.

Everything is checked before the output folder is made (the checkpoint, the solver and
its overrides, ``--out``); the folder is locked while written. Ctrl-C or SIGTERM stops
the run, marks ``NAME.partial`` interrupted and exits 130.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from diffuse_engine.cli.common import (
    LogOpt,
    NprocOpt,
    RegistryOpt,
    SetOpt,
    check_counts,
    check_names,
    err,
    handle_errors,
    make_engine,
    out_option,
    print_fitted_hint,
    print_table,
    refuse_nproc_here,
    use_loggers,
)


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def sample(
        checkpoint: Path | None = typer.Option(
            None, "--checkpoint", "-c", help="checkpoint file or training folder"
        ),
        diffusers: Path | None = typer.Option(
            None, "--diffusers", help="a local diffusers model folder instead of --checkpoint"
        ),
        like_diffusers: bool = typer.Option(
            False, "--like-diffusers", help="with --diffusers: its scheduler's own steps"
        ),
        solver: str = typer.Option("pc", help="solver entry, e.g. pc, ode, ancestral"),
        n: int = typer.Option(1000, "--n", "-n", help="number of samples"),
        steps: int | None = typer.Option(None, help="solver steps"),
        nfe: int | None = typer.Option(None, help="score evaluations per sample"),
        seed: int = typer.Option(0, help="random seed"),
        prior: str = typer.Option(
            "auto",
            help="where sampling starts: data (p_T's mean and variance for the model's "
            "data), sde (the SDE's prior), auto (data when the model knows them)",
        ),
        device: str = typer.Option("cpu", help="torch device (cpu, cuda, cuda:1)"),
        ema: bool = typer.Option(True, "--ema/--no-ema", help="sample with the EMA weights"),
        out_: str | None = typer.Option(
            None, "--out", "-o", help="output folder (default runs/sample-NAME-SOLVER-TIME)"
        ),
        sample_format: str = typer.Option("pt", "--format", help="samples file: pt or npz"),
        overwrite: bool = typer.Option(False, help="replace an existing --out folder"),
        registry: list[Path] | None = RegistryOpt,
        set_: list[str] | None = SetOpt,
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar or table"),
        nproc: int | None = NprocOpt,
        log: list[str] | None = LogOpt,
        label: str | None = typer.Option(
            None, help="class label(s): 3, 0..9 or 0,4,7 (several: --n per class, one row each)"
        ),
        guidance: str | None = typer.Option(
            None, help="guidance entry: conditional (default with --label), cfg, classifier"
        ),
        scale: float | None = typer.Option(None, help="guidance scale (cfg: s_c + w (s_c - s_u))"),
        classifier: str | None = typer.Option(
            None, help="classifier guidance: a classifier entry or a classifier checkpoint"
        ),
    ):
        """Sample from a trained checkpoint with any solver; write samples, plot, metrics."""
        from diffuse_engine.cli.run_cmd import _check_device
        from diffuse_engine.cli.train_cmd import split_sets
        from diffuse_engine.core.distributed import on_main
        from diffuse_engine.core.errors import DiffuseError
        from diffuse_engine.output.files import RunFolder
        from diffuse_engine.output.interrupts import TerminateAsInterrupt
        from diffuse_engine.runs import SAMPLE_FORMATS
        from diffuse_engine.training import load_trained, sample_overrides

        if sample_format not in SAMPLE_FORMATS:
            raise DiffuseError(
                f"unknown sample format {sample_format!r}; choices: {', '.join(SAMPLE_FORMATS)}"
            )
        check_counts(n=n, nfe=nfe, steps=steps)
        from diffuse_engine.sampling.request import PRIORS

        if prior not in PRIORS:
            raise DiffuseError(f"unknown --prior {prior!r}; choices: {', '.join(PRIORS)}")
        _check_device(device)
        refuse_nproc_here(nproc)
        out = out_option(out_)
        registry_sets, overrides = split_sets(set_)
        use_loggers(log)  # before the engine: its logger plugins read DIFFUSE_LOG
        engine = make_engine(registry, registry_sets)  # honours --allow-imports
        check_names(engine, solver=("solver", solver))
        if (checkpoint is None) == (diffusers is None):
            raise DiffuseError("give one of --checkpoint (a training run) or --diffusers PATH")
        if diffusers is not None:  # a diffusers model folder: diffusers_cmd.py
            from diffuse_engine.cli.diffusers_cmd import sample_diffusers

            if prior == "data":  # refused before the folder; its scheduler's prior is p_T's
                raise DiffuseError(
                    "--prior data needs a model that knows its data's mean and variance; "
                    "a diffusers model does not: use --prior sde or auto"
                )

            return sample_diffusers(
                engine, diffusers, solver=solver, n=n, steps=steps, nfe=nfe, seed=seed,
                device=device, out=out, sample_format=sample_format, overwrite=overwrite,
                overrides=overrides, like=like_diffusers, quiet=quiet,
            )  # fmt: skip
        model, ckpt = load_trained(engine, checkpoint, ema=ema)
        if prior == "data" and (label is not None or guidance is not None):
            raise DiffuseError(
                "--prior data is the unconditional data's moments; conditional sampling "
                "(--label, --guidance) starts from the SDE's prior: use --prior sde or auto"
            )
        if prior == "data" and model.data_moments() is None:
            raise DiffuseError(
                "--prior data needs a model that knows its data's mean and variance; a "
                "trained network records none (training normalises its data): use "
                "--prior sde or auto"
            )
        if steps is not None:
            overrides["steps"] = steps
        if nfe is not None:
            overrides["nfe"] = nfe
        overrides = {**sample_overrides(ckpt.config), **overrides}
        _check_sampling(engine, model, ckpt.config, solver, overrides)
        n, per_class, conditioning = _conditioning(label, guidance, scale, classifier, n, model)
        _check_conditioning(engine, conditioning, model)
        name = (checkpoint if checkpoint.is_dir() else checkpoint.parent).name or "checkpoint"
        out = out or Path("runs") / f"sample-{name}-{solver}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_folder = RunFolder(out, overwrite)
        run_folder.check()  # the output exists, is a file, ...: refused before sampling
        job = dict(solver=solver, n=n, seed=seed, device=device, progress=not quiet, prior=prior)
        job["conditioning"] = conditioning  # cond, guidance, scale, classifier (--label)
        run = {
            "command": "sample",
            "out": str(out),
            "config": {
                "checkpoint": str(checkpoint),
                "solver": solver,
                "n": n,
                "seed": seed,
                "overrides": overrides,
            },
        }
        if engine.dist.is_main:  # events for observers (metrics and tensorboard loggers)
            engine.hook.diffuse_run_start(run=run)
        try:  # SIGTERM (a scheduler's stop) ends it like Ctrl-C: marked, exit 130
            # under torchrun every rank samples its shards; rank 0 alone writes the folder
            with TerminateAsInterrupt(), on_main(engine.dist, run_folder) as folder:
                result = _sample(engine, model, ckpt, overrides, **job)
                metrics = _write(
                    engine, folder, result, model, ckpt, checkpoint, sample_format, solver,
                    per_class,
                )  # fmt: skip
        except (DiffuseError, KeyboardInterrupt):
            if run_folder.path.is_dir():  # say where the incomplete output is
                err(f"sampling stopped: incomplete output left in {run_folder.path}")
            raise
        if metrics is not None:
            engine.hook.diffuse_run_end(run=run, metrics=metrics)
        if metrics is None or quiet:  # another rank of a distributed run, or --quiet
            return
        _table(result, metrics, ckpt, solver, n, out / f"samples.{sample_format}", out)


def _check_sampling(engine, model, cfg, solver: str, overrides: dict) -> None:
    """The solver and overrides resolve, and the solver fits the model's SDE (as
    ``Engine.sampling`` will check), before any folder."""
    from diffuse_engine.sampling.request import sde_and_solver

    sde_and_solver(
        engine.builder, score=model, sde=cfg["sde"]["type"], solver=solver, overrides=overrides
    )


def _sample(
    engine, model, ckpt, overrides, *, solver, n, seed, device, progress, conditioning, prior
):
    return engine.sampling(
        score=model,
        sde=ckpt.config["sde"]["type"],
        solver=solver,
        shape=(n, *model.data_shape),
        seed=seed,
        device=device,
        progress=progress,
        prior=prior,
        **overrides,
        **conditioning,
    )


def _write(engine, folder, result, model, ckpt, checkpoint, sample_format, solver, per_class=None):
    """Samples, plot, metrics and config into ``folder`` (rank 0); the metrics."""
    from diffuse_engine.components.mixture import mode_statistics
    from diffuse_engine.output.files import write_json
    from diffuse_engine.runs import save_tensor
    from diffuse_engine.runs.fitted import write_fitted
    from diffuse_engine.training import plot_result

    if folder is None:  # another rank: its shards are in rank 0's samples
        return None
    cfg = ckpt.config
    x = result.samples.cpu()
    metrics = {"nfe": result.nfe, "seconds": round(result.seconds, 4), "checkpoint_step": ckpt.step}
    if result.setup_nfe:  # a fitted schedule's pilot, spent once for the run
        metrics["setup_nfe"] = result.setup_nfe
    mix = getattr(model, "mixture", None)
    if mix is not None:
        metrics.update(mode_statistics(x, mix))
    write_json(
        folder.path / "config.json",
        {"checkpoint": str(checkpoint), "sampling": result.config, "training": cfg},
    )
    save_tensor(x, folder.path / f"samples.{sample_format}")
    dataset = engine.builder.build_recorded("data", cfg["data"])
    title = f"{cfg['score']['type']} step {ckpt.step}: {solver}, {result.nfe} score evaluations"
    if per_class is not None and x.dim() == 4:  # several labels: one row per class
        _plot_class_rows(x, per_class, dataset, folder.path / "samples.png", title)
    else:
        plot_result(x, folder.path / "samples.png", dataset=dataset, title=title)
    if result.fitted_fields is not None:  # keep the fit, so it is fitted once
        fitted = write_fitted(folder.path, result)  # None: the solver takes no times
        if fitted is not None:
            metrics["fitted_solver"] = fitted
    write_json(folder.path / "metrics.json", metrics)
    return metrics


def _table(result, metrics, ckpt, solver, n, samples_path, out) -> None:
    cfg = ckpt.config
    rows = [("samples", n, str(samples_path)), ("score evaluations", result.nfe, "")]
    if result.setup_nfe:
        rows.append(("setup evaluations (pilot batch)", result.setup_nfe, ""))
    rows.append(("seconds", metrics["seconds"], ""))
    for key, label in (
        ("weight_max", "largest mode weight error"),
        ("std_error", "mode std error (relative)"),
        ("centre_error", "mode centre error (in stds)"),
    ):
        if key in metrics:
            rows.append((label, metrics[key], ""))
    print_table(
        f"{cfg['score']['type']} ({cfg['data']['name']}, step {ckpt.step}) / {solver} -> {out}",
        rows,
        ["", "value", "note"],
    )
    if metrics.get("fitted_solver"):
        print_fitted_hint(out, metrics["fitted_solver"])


# ---- conditional sampling (--label, --guidance, --scale, --classifier) ------------------------
def parse_labels(text: str) -> list[int]:
    """``3`` -> [3]; ``0..9`` -> [0, ..., 9] (inclusive); ``0,4,7`` -> [0, 4, 7]."""
    from diffuse_engine.core.errors import DiffuseError

    try:
        if ".." in text:
            lo, hi = (int(v) for v in text.split(".."))
            labels = list(range(lo, hi + 1))
        else:
            labels = [int(v) for v in text.split(",")]
    except ValueError:
        labels = []
    if not labels or min(labels) < 0:
        raise DiffuseError(
            f"--label {text!r}: give a class label >= 0 (3), a range (0..9) or a list (0,4,7)"
        )
    return labels


def _conditioning(label, guidance, scale, classifier, n, model):
    """``(total samples, samples per class or None, sampling keywords)`` of the
    conditioning options: ``cond``, ``guidance``, ``scale``, ``classifier`` (checked
    against ``model`` before any folder is made)."""
    import torch

    from diffuse_engine.core.errors import DiffuseError

    if label is None:
        given = [f"--{k}" for k, v in (("guidance", guidance), ("scale", scale),
                                        ("classifier", classifier)) if v is not None]  # fmt: skip
        if given:
            raise DiffuseError(f"{', '.join(given)} steer(s) toward a class: pass --label too")
        return n, None, {}
    labels = parse_labels(label)
    classes = getattr(model, "num_classes", None)
    if classes is not None and max(labels) >= classes:
        raise DiffuseError(
            f"--label {label}: this model knows {classes} classes (0 .. {classes - 1})"
        )
    if guidance is None and not getattr(model, "conditional", False):
        raise DiffuseError(
            "this checkpoint is an unconditional score model: --label needs --guidance "
            "classifier --classifier NAME_OR_CHECKPOINT (or train with --set num_classes=K)"
        )
    kw = {"cond": {"label": torch.tensor(labels).repeat_interleave(n)}}
    if guidance is not None:
        kw["guidance"] = guidance
    if scale is not None:
        kw["guidance.scale"] = scale
    if classifier is not None:
        if Path(classifier).exists():  # a classifier checkpoint (diffuse train --task classifier)
            kw["classifier"] = "checkpoint"
            kw["classifier.path"] = classifier
        else:
            kw["classifier"] = classifier
    return n * len(labels), (n if len(labels) > 1 else None), kw


def _plot_class_rows(x, per_class: int, dataset, path: Path, title: str) -> None:
    """Image grid with one row per class (up to 10 images each)."""
    from diffuse_engine.output.image_grid import plot_image_grid

    if hasattr(dataset, "to_pixels"):
        x = dataset.to_pixels(x).reshape(x.shape)
    k, cols = x.shape[0] // per_class, min(per_class, 10)
    rows = x.reshape(k, per_class, *x.shape[1:])[:, :cols].reshape(-1, *x.shape[1:])
    plot_image_grid(rows, path, title=title, nrow=cols, max_images=len(rows))


def _check_conditioning(engine, kw: dict, model) -> None:
    """The guidance and classifier resolve, and the classifier fits the model (its SDE
    and data coordinates), before any folder is made."""
    if "guidance" in kw:
        engine.builder.implementation("guidance", kw["guidance"])
    if "classifier" in kw:
        fields = {"path": kw["classifier.path"]} if "classifier.path" in kw else {}
        clf = engine.builder.build("classifier", kw["classifier"], sde=model.sde, **fields)
        check_with = getattr(clf, "check_with", None)
        if check_with is not None:
            check_with(model, model.sde)
