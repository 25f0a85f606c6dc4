"""``diffuse inpaint``: complete partly observed images with an unconditional checkpoint.

``--mask`` hides a region (``top``, ``bottom``, ``left``, ``right``, ``centre``,
``random:P``) or reads a ``.npy`` bool array (True where observed); ``--observe`` is a
linear observation instead (``greyscale`` for colourisation, ``downsample:F``). The
method is any inverse-problem guidance entry (``replacement``, ``repaint``, ``dps``,
``pigdm``, ``smc``; docs/inverse.md). Writes ``inpaint.png`` (observed / sampled /
original grids), ``samples.pt`` and ``metrics.json`` (the observation error, and with
labelled data the agreement of an independent classifier with the original labels).
``--nproc N`` shards the images over N processes (torchrun), with the samples of one.
"""

from __future__ import annotations

from pathlib import Path

import typer

from diffuse_engine.cli.common import (
    NprocOpt,
    SetOpt,
    check_names,
    handle_errors,
    make_engine,
    out_option,
    refuse_nproc_here,
)


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def inpaint(
        checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="training folder"),
        data: str = typer.Option("digits", help="dataset entry (its held-out split if any)"),
        mask: str | None = typer.Option(
            None, help="hidden region: top|bottom|left|right|centre|random:P|FILE.npy"
        ),
        observe: str | None = typer.Option(None, help="greyscale | downsample:F"),
        method: str = typer.Option("dps", help="guidance: replacement, repaint, dps, pigdm, smc"),
        solver: str = typer.Option("ddim", help="solver entry (repaint and smc: ddim or pc)"),
        steps: int | None = typer.Option(None, help="solver steps"),
        noise_std: float = typer.Option(0.0, help="observation noise added to y"),
        n: int = typer.Option(32, "--n", "-n", help="images to complete"),
        seed: int = typer.Option(0, help="random seed"),
        device: str = typer.Option("cpu", help="torch device"),
        out_: str | None = typer.Option(None, "--out", "-o", help="output folder"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out"),
        set_: list[str] | None = SetOpt,
        nproc: int | None = NprocOpt,
    ):
        """Inpaint / colourise / super-resolve images of --data with a trained checkpoint."""
        import time

        import torch

        from diffuse_engine.cli.train_cmd import split_sets
        from diffuse_engine.core.errors import DiffuseError
        from diffuse_engine.output.files import RunFolder, write_json
        from diffuse_engine.testbed import inpaint as P
        from diffuse_engine.training import load_trained, sample_overrides

        refuse_nproc_here(nproc)
        if (mask is None) == (observe is None):
            raise DiffuseError("give one of --mask (inpainting) or --observe (greyscale, ...)")
        if n < 1:
            raise DiffuseError(f"--n must be >= 1, got {n}")
        out = out_option(out_) or Path("runs") / f"inpaint-{method}-{time.strftime('%H%M%S')}"
        run_folder = RunFolder(out, overwrite)
        run_folder.check()  # exists without --overwrite, not a folder, ...: refused first
        registry_sets, overrides = split_sets(set_)
        engine = make_engine(None, registry_sets)
        check_names(engine, solver=("solver", solver))
        engine.resolve("guidance", method)
        model, ckpt = load_trained(engine, checkpoint, ema=True)
        overrides = {**sample_overrides(ckpt.config), **overrides}
        if steps is not None:
            overrides["steps"] = steps
        try:
            dataset = engine.build("data", data, split="test")
        except DiffuseError:
            dataset = engine.build("data", data)
        x = dataset.load()[:n].float()
        dims = tuple(x.shape[1:])
        if mask is not None:
            cond = P.condition(x, mask=P.parse_mask(mask, dims, len(x), seed), noise_std=noise_std)
        else:
            cond = P.condition(x, op=P.parse_observe(observe, dims), noise_std=noise_std)
        result = engine.sampling(
            score=model, sde=ckpt.config["sde"]["type"], solver=solver, shape=tuple(x.shape),
            seed=seed, device=device, cond=cond, guidance=method, **overrides,
        )  # fmt: skip
        if not engine.dist.is_main:  # every rank has the gathered samples; rank 0 writes
            return
        samples = result.samples.cpu()
        metrics = {
            "method": method,
            "solver": solver,
            "n": len(x),
            "nfe": result.nfe,
            "seconds": result.seconds,
            "observation_error": P.observation_error(samples, cond),
            "noise_std": noise_std,
        }
        labels = getattr(dataset, "labels", None)
        if labels is not None:
            train = engine.build("data", data)
            metrics["classifier_agreement"] = P.classifier_agreement(
                train.load(), train.labels, samples, labels[: len(x)]
            )
        view = P.observed_view(cond, tuple(x.shape))
        with run_folder as folder:  # written as OUT.partial, renamed to OUT once complete
            P.save_grids(
                folder.path / "inpaint.png",
                [("observed", view), ("sampled", samples), ("original", x)],
            )
            torch.save(samples, folder.path / "samples.pt")
            write_json(folder.path / "metrics.json", metrics)
        for k, v in metrics.items():
            typer.echo(f"{k}: {v}")
        typer.echo(f"wrote {out / 'inpaint.png'}")
