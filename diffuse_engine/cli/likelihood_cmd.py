"""``diffuse likelihood``: log-likelihood of data under a score model, through the
probability-flow ODE (:mod:`diffuse_engine.likelihood.evaluate`)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from diffuse_engine.cli.common import (
    RegistryOpt,
    SetOpt,
    console,
    handle_errors,
    make_engine,
    print_table,
)


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def likelihood(
        score: str = typer.Option(
            "gmm", help="score-model entry (e.g. gmm, gmm64, a trained checkpoint entry)"
        ),
        sde: str = typer.Option("vp", help="SDE entry, e.g. vp, subvp, ve"),
        checkpoint: Path | None = typer.Option(
            None, help="trained checkpoint file or training folder (score 'checkpoint')"
        ),
        data: str | None = typer.Option(
            None, help="dataset entry to evaluate (default: exact samples of the score's mixture)"
        ),
        n: int = typer.Option(1000, "--n", "-n", min=1, help="number of data points"),
        seed: int = typer.Option(0, min=0, max=2**63 - 1, help="seed of the data points"),
        dequantize: bool = typer.Option(
            False,
            help="uniform dequantisation for image data (--set levels=..., data_range=[lo, hi])",
        ),
        device: str | None = typer.Option(None, help="torch device (cpu, cuda)"),
        registry: list[Path] | None = RegistryOpt,
        set_: list[str] | None = SetOpt,
        as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    ):
        """Mean log-likelihood (nats), its standard error and bits/dim of data points.

        Settings of the estimator go through --set: rtol, atol, method, divergence
        (auto | exact | hutchinson), probe (rademacher | gaussian), probes, eps,
        batch_size, levels, data_range.
        """
        import torch

        from diffuse_engine.core.errors import DiffuseError

        engine = make_engine(registry, set_)
        overrides = {}
        if checkpoint is not None:
            score = "checkpoint"
            overrides["score.path"] = str(checkpoint)
        if dequantize:
            overrides["likelihood.dequantize"] = True
        gen = torch.Generator().manual_seed(seed)
        exact = None
        if data is not None:
            x = engine.build("data", data).sample(n, gen)
            source = f"data {data!r}"
        else:
            sde_obj = engine.build("sde", sde)
            score_obj = engine.build(
                "score", score, sde=sde_obj, **({"path": str(checkpoint)} if checkpoint else {})
            )
            mixture = getattr(score_obj, "mixture", None)
            if mixture is None:
                raise DiffuseError(
                    f"score {score!r} has no known data law to draw points from; pass --data NAME"
                )
            x = mixture.sample(n, generator=gen)
            source = f"exact samples of {score!r}"
        result = engine.likelihood(
            x, score=score, sde=sde, device=device, progress=not quiet, **overrides
        )
        summary = result.summary()
        if data is None and hasattr(result.score, "log_prob") and not dequantize:
            # the exact log-density of p_eps at the same points, for comparison
            eps = result.config["eps"] or result.sde.sampling_eps
            t = torch.full((n,), eps, dtype=torch.float64)
            ref = result.score.log_prob(x.double(), t=t)
            err = result.log_likelihood.double().cpu() - ref
            exact = {
                "exact_mean": float(ref.mean()),
                "error_mean": float(err.mean()),
                "error_rms": float(err.pow(2).mean().sqrt()),
            }
            summary.update(exact)
        summary["dim"] = result.dim
        if as_json:
            console.print_json(json.dumps(summary))
            return
        rows = [
            ("points", summary["n"], source),
            ("mean log-likelihood (nats)", summary["mean"], ""),
            ("standard error (nats)", summary["stderr"], ""),
            ("bits/dim", summary["bits_per_dim"], f"D = {result.dim}"),
            ("score evaluations", summary["nfe"], ""),
            ("seconds", summary["seconds"], ""),
        ]
        if exact is not None:
            rows += [
                ("exact mean log p_eps (nats)", exact["exact_mean"], "closed form"),
                ("error of the mean (nats)", exact["error_mean"], ""),
                ("per-point RMS error (nats)", exact["error_rms"], ""),
            ]
        print_table(f"log-likelihood: {score} / {sde}", rows, ["quantity", "value", "note"])
