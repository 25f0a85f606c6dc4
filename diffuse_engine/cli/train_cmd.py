"""``diffuse train``: train a score model and write a training folder with checkpoints."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from diffuse_engine.cli.common import (
    LogOpt,
    NprocOpt,
    RegistryOpt,
    SetOpt,
    check_names,
    console,
    handle_errors,
    make_engine,
    out_option,
    print_table,
    refuse_nproc_here,
    use_loggers,
)


def split_sets(sets: list[str] | None) -> tuple[list[str], dict]:
    """``(KIND.NAME.FIELD=V registry edits, FIELD=V / KIND.FIELD=V overrides)``."""
    from diffuse_engine.core.registry_text import parse_assignment

    registry_sets, overrides = [], {}
    for item in sets or []:
        key, value = parse_assignment(item)
        if key.count(".") == 2:
            registry_sets.append(item)
        else:
            overrides[key] = value
    return registry_sets, overrides


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def train(
        preset: str = typer.Option("default", "--preset", "-p", help="[train.NAME] settings"),
        data: str | None = typer.Option(
            None,
            help="dataset entry: gmm, swissroll, moons, "
            "checkerboard, digits, or [data.NAME] of type file",
        ),
        sde: str | None = typer.Option(None, help="SDE entry, e.g. vp, subvp, ve, ddpm"),
        model: str | None = typer.Option(None, help="trainable score model entry: mlp, unet"),
        loss: str | None = typer.Option(None, help="loss entry: dsm, ddpm, smld, ism, ssm"),
        steps: int | None = typer.Option(None, help="optimiser steps in total"),
        batch_size: int | None = typer.Option(None, "--batch-size", help="samples per step"),
        lr: float | None = typer.Option(None, help="peak learning rate"),
        seed: int | None = typer.Option(None, help="random seed"),
        device: str | None = typer.Option(None, help="torch device (cpu, cuda, cuda:1)"),
        threads: int | None = typer.Option(None, help="torch CPU threads while training"),
        max_seconds: float | None = typer.Option(
            None, "--max-seconds", help="stop (and checkpoint) after this long"
        ),
        out_: str | None = typer.Option(
            None, "--out", "-o", help="training folder (default runs/train-DATA-SDE-MODEL-TIME)"
        ),
        resume: bool = typer.Option(False, help="continue the run in --out from its checkpoint"),
        overwrite: bool = typer.Option(False, help="replace an existing --out training folder"),
        registry: list[Path] | None = RegistryOpt,
        set_: list[str] | None = SetOpt,
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar or table"),
        nproc: int | None = NprocOpt,
        log: list[str] | None = LogOpt,
        task: str | None = typer.Option(
            None,
            help="score (default), or classifier: a noise-conditional classifier for "
            "classifier guidance (--model mlp, loss cross_entropy)",
        ),
    ):
        """Train a score model (data + SDE + network + loss); checkpoints go to --out."""
        from diffuse_engine.core.errors import DiffuseError
        from diffuse_engine.training.settings import split_overrides

        refuse_nproc_here(nproc)
        out = out_option(out_)
        registry_sets, overrides = split_sets(set_)
        use_loggers(log)  # before the engine: its logger plugins read DIFFUSE_LOG
        engine = make_engine(registry, registry_sets)  # honours --allow-imports
        if task == "classifier" and loss is None:
            loss = "cross_entropy"  # what a classifier trains with unless told otherwise
        model_kind = "classifier" if task == "classifier" else "score"
        check_names(engine, data=("data", data), sde=("sde", sde), model=(model_kind, model))
        check_names(engine, loss=("loss", loss))
        explicit = {
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "device": device,
            "threads": threads,
            "max_seconds": max_seconds,
            "task": task,
        }
        overrides.update({k: v for k, v in explicit.items() if v is not None})
        if resume and out is None:
            raise DiffuseError("--resume needs --out, the training folder to continue")
        if not resume:  # every setting is checked, and named as typed, before any work
            choices = {"data": data, "sde": sde, "model": model, "loss": loss}
            engine.registry.train_settings(
                preset,
                {
                    **{k: v for k, v in choices.items() if v is not None},
                    **split_overrides(overrides)[0],
                },
                override_source="command line",
            )
        if out is None:
            s = engine.registry.train_settings(
                preset,
                {
                    k: v
                    for k, v in (("data", data), ("sde", sde), ("model", model))
                    if v is not None
                },
            )
            out = (
                Path("runs") / f"train-{s.data}-{s.sde}-{s.model}-{time.strftime('%Y%m%d-%H%M%S')}"
            )
        if device is not None:
            from diffuse_engine.cli.run_cmd import _check_device

            _check_device(device)
        result = engine.training(
            data=data,
            sde=sde,
            model=model,
            loss=loss,
            preset=preset,
            out=out,
            resume=resume,
            overwrite=overwrite,
            progress=not quiet,
            **overrides,
        )
        if quiet:
            return
        tail = result.losses[-min(100, len(result.losses)) :]
        rows = [
            ("steps", result.step, "stopped early (max_seconds)" if result.stopped_early else ""),
            ("seconds", round(result.seconds, 2), ""),
            ("steps per second", round(result.steps_per_second, 2), ""),
            ("loss (mean of last 100 steps)", sum(tail) / max(len(tail), 1), ""),
            (
                "checkpoint",
                str(out / "checkpoint.safetensors"),
                f"sample: diffuse sample --checkpoint {out}"
                if result.config["train"].get("task") != "classifier"
                else f"guide: diffuse sample --checkpoint SCORE --label K --guidance "
                f"classifier --classifier {out}",
            ),
        ]
        print_table(
            f"trained {result.config['score']['type']} on {result.config['data']['name']}"
            f" with {result.config['sde']['type']} / {result.config['loss']['type']}",
            rows,
            ["", "value", "note"],
        )
        for label, name in (("plot", "samples.png"), ("loss curve", "loss.png")):
            if (out / name).is_file():
                console.print(f"{label}: {out / name}", markup=False, highlight=False)
