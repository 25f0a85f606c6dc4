"""``diffuse sample --diffusers PATH``: sample a local diffusers model with an engine solver.

The model folder's own scheduler fixes the SDE (``sde = "diffusers"``, see
``diffuse_plugins.diffusers_score``), so any engine solver applies; ``--like-diffusers``
takes the scheduler's own timesteps, orders and clipping instead of the solver's
schedule (:func:`diffuse_engine.interop.like_diffusers`: the engine's ``ddim`` or
``dpm_solver`` for a DDIM / DPM-Solver multistep scheduler). Writes a run folder like
``diffuse sample --checkpoint``: ``samples.pt`` (or ``.npz``), an image grid
``samples.png``, ``metrics.json`` and ``config.json``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


def sample_diffusers(
    engine,
    folder_in: Path,
    *,
    solver: str,
    n: int,
    steps: int | None,
    nfe: int | None,
    seed: int,
    device: str,
    out: Path | None,
    sample_format: str,
    overwrite: bool,
    overrides: dict[str, Any],
    like: bool,
    quiet: bool,
) -> None:
    """What ``diffuse sample --diffusers FOLDER`` does (options already parsed)."""
    from diffuse_engine.cli.common import print_table
    from diffuse_engine.core.errors import DiffuseError
    from diffuse_engine.interop import like_diffusers
    from diffuse_engine.output.files import RunFolder, write_json
    from diffuse_engine.runs import SAMPLE_FORMATS, save_tensor
    from diffuse_engine.training import plot_result

    if sample_format not in SAMPLE_FORMATS:
        raise DiffuseError(
            f"unknown sample format {sample_format!r}; choices: {', '.join(SAMPLE_FORMATS)}"
        )
    if n < 1:
        raise DiffuseError(f"--n must be >= 1, got {n}")
    path = str(folder_in)
    fields = {"sde.scheduler": path, "score.path": path, **overrides}
    if like and nfe is not None:  # the scheduler's own steps: --steps is its count
        raise DiffuseError(
            "--nfe does not apply with --like-diffusers (it takes the scheduler's steps); "
            "give --steps, or drop --like-diffusers"
        )
    if like:
        settings = like_diffusers(folder_in, steps if steps is not None else 50)
        solver = settings.pop("solver")
        fields.update(settings)
    else:
        fields.update({k: v for k, v in (("steps", steps), ("nfe", nfe)) if v is not None})
    name = folder_in.resolve().name or "diffusers"
    out = out or Path("runs") / f"sample-{name}-{solver}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_folder = RunFolder(out, overwrite)
    run_folder.check()  # refused before the model is loaded and sampled
    run = {"command": "sample", "out": str(out), "config": {"diffusers": path, **fields}}
    engine.hook.diffuse_run_start(run=run)
    with run_folder as folder:
        result = engine.sampling(
            score="diffusers",
            sde="diffusers",
            solver=solver,
            shape=n,
            seed=seed,
            device=device,
            progress=not quiet,
            **fields,
        )
        x = result.samples.cpu()
        metrics = {"nfe": result.nfe, "seconds": round(result.seconds, 4)}
        write_json(folder.path / "config.json", {"diffusers": path, "sampling": result.config})
        save_tensor(x, folder.path / f"samples.{sample_format}")
        title = f"{name}: {solver}, {result.nfe} score evaluations"
        plot_result(x.clamp(-1, 1), folder.path / "samples.png", title=title)
        write_json(folder.path / "metrics.json", metrics)
    engine.hook.diffuse_run_end(run=run, metrics=metrics)
    if not quiet:
        rows = [
            ("samples", n, str(out / f"samples.{sample_format}")),
            ("score evaluations", result.nfe, ""),
            ("seconds", metrics["seconds"], ""),
        ]
        print_table(f"diffusers {path} / {solver} -> {out}", rows, ["", "value", "note"])
