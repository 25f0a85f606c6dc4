"""``diffuse sample``: sample a trained checkpoint, write samples, a plot and metrics."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from diffuse_engine.cli.common import (
    NprocOpt,
    RegistryOpt,
    SetOpt,
    handle_errors,
    make_engine,
    print_table,
    refuse_nproc_here,
)


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def sample(
        checkpoint: Path = typer.Option(
            ..., "--checkpoint", "-c", help="checkpoint file or training folder"
        ),
        solver: str = typer.Option("pc", help="solver entry, e.g. pc, ode, ancestral"),
        n: int = typer.Option(1000, "--n", "-n", help="number of samples"),
        steps: int | None = typer.Option(None, help="solver steps"),
        seed: int = typer.Option(0, help="random seed"),
        device: str = typer.Option("cpu", help="torch device (cpu, cuda, cuda:1)"),
        ema: bool = typer.Option(True, "--ema/--no-ema", help="sample with the EMA weights"),
        out: Path | None = typer.Option(
            None, "--out", "-o", help="output folder (default runs/sample-NAME-SOLVER-TIME)"
        ),
        sample_format: str = typer.Option("pt", "--format", help="samples file: pt or npz"),
        overwrite: bool = typer.Option(False, help="replace an existing --out folder"),
        registry: list[Path] | None = RegistryOpt,
        set_: list[str] | None = SetOpt,
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar or table"),
        nproc: int | None = NprocOpt,
    ):
        """Sample from a trained checkpoint with any solver; write samples, plot, metrics."""
        from diffuse_engine.cli.run_cmd import _check_device
        from diffuse_engine.cli.train_cmd import split_sets
        from diffuse_engine.components.mixture import mode_statistics
        from diffuse_engine.core.errors import DiffuseError
        from diffuse_engine.output.files import RunFolder, write_json
        from diffuse_engine.runs import SAMPLE_FORMATS, save_tensor
        from diffuse_engine.training import load_trained, plot_result, sample_overrides

        if sample_format not in SAMPLE_FORMATS:
            raise DiffuseError(
                f"unknown sample format {sample_format!r}; choices: {', '.join(SAMPLE_FORMATS)}"
            )
        if n < 1:
            raise DiffuseError(f"--n must be >= 1, got {n}")
        _check_device(device)
        refuse_nproc_here(nproc)
        registry_sets, overrides = split_sets(set_)
        engine = make_engine(registry, registry_sets)  # honours --allow-imports
        model, ckpt = load_trained(engine, checkpoint, ema=ema)
        if steps is not None:
            overrides["steps"] = steps
        cfg = ckpt.config
        name = (checkpoint if checkpoint.is_dir() else checkpoint.parent).name or "checkpoint"
        out = out or Path("runs") / f"sample-{name}-{solver}-{time.strftime('%Y%m%d-%H%M%S')}"
        from diffuse_engine.core.distributed import on_main

        # under torchrun every rank samples its shards; rank 0 alone writes the folder
        with on_main(engine.dist, RunFolder(out, overwrite)) as folder:
            result = engine.sampling(
                score=model,
                sde=cfg["sde"]["type"],
                solver=solver,
                shape=(n, *model.data_shape),
                seed=seed,
                device=device,
                progress=not quiet,
                **{**sample_overrides(cfg), **overrides},
            )
            if folder is None:
                return
            x = result.samples.cpu()
            metrics = {
                "nfe": result.nfe,
                "seconds": round(result.seconds, 4),
                "checkpoint_step": ckpt.step,
            }
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
            plot_result(
                x,
                folder.path / "samples.png",
                dataset=dataset,
                title=f"{cfg['score']['type']} step {ckpt.step}: {solver}, "
                f"{result.nfe} score evaluations",
            )
            write_json(folder.path / "metrics.json", metrics)
        if quiet:
            return
        rows = [
            ("samples", n, str(out / f"samples.{sample_format}")),
            ("score evaluations", result.nfe, ""),
        ]
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
