"""``diffuse run``: sample a preset on the built-in default and write a run folder."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from diffuse_engine.cli.common import (
    LogOpt,
    NprocOpt,
    RegistryOpt,
    SetOpt,
    check_counts,
    check_names,
    console,
    err,
    handle_errors,
    make_engine,
    out_option,
    print_fitted_hint,
    print_table,
    refuse_nproc_here,
    use_loggers,
)
from diffuse_engine.core.errors import DiffuseError


def _past_fitted_grid(engine, base, solver: str, nfe: int) -> str | None:
    """:func:`~diffuse_engine.components.solver.schedule_for_budget` for table entry
    ``solver`` as the run would configure it (with the engine-wide ``--set`` fields, so
    a schedule the user set is seen, not the entry's)."""
    from diffuse_engine.components.solver import schedule_for_budget

    names = {"sde": base.sde, "solver": solver, "score": base.score}
    chosen = {k: engine.resolve(k, n)[0] for k, n in names.items()}
    fields = engine.route_overrides(chosen, base.overrides)["solver"]
    fields.pop("nfe", None)  # the budget is what is being tried
    return schedule_for_budget(engine.resolve("solver", solver, **fields)[1], nfe)


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def run(
        preset: str = typer.Option("default", "--preset", "-p", help="[run.NAME] preset"),
        sde: str | None = typer.Option(None, help="SDE entry, e.g. vp, subvp, ve, ddpm"),
        solver: str | None = typer.Option(None, help="solver entry, e.g. pc, ode"),
        score: str | None = typer.Option(None, help="score-model entry, e.g. gmm"),
        steps: int | None = typer.Option(None, help="solver steps"),
        nfe: int | None = typer.Option(
            None,
            help="score evaluations per sample; without --solver the registry's "
            "best-SDE-NFE entry for the data's size (the benchmark's best at that budget)",
        ),
        n: int | None = typer.Option(None, "--n", "-n", help="number of samples"),
        seed: int | None = typer.Option(None, help="random seed"),
        prior: str | None = typer.Option(
            None,
            help="where sampling starts: data (p_T's mean and variance for the score's "
            "data), sde (the SDE's prior, as the reference code), auto (data when known)",
        ),
        device: str | None = typer.Option(None, help="torch device (cpu, cuda, cuda:1)"),
        out_: str | None = typer.Option(
            None, "--out", "-o", help="run folder (default runs/PRESET-SDE-SOLVER-TIME)"
        ),
        registry: list[Path] | None = RegistryOpt,
        set_: list[str] | None = SetOpt,
        sample_format: str = typer.Option("pt", "--format", help="samples file: pt or npz"),
        overwrite: bool = typer.Option(False, help="replace an existing --out folder"),
        dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved config and stop"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar or table"),
        nproc: int | None = NprocOpt,
        log: list[str] | None = LogOpt,
    ):
        """Sample with a preset, score samples against the exact law, write a run folder."""
        from diffuse_engine.runs import default_out

        refuse_nproc_here(nproc)
        check_counts(nfe=nfe, steps=steps, n=n)
        out = out_option(out_)
        use_loggers(log)  # before the engine: its logger plugins read DIFFUSE_LOG
        engine = make_engine(registry, set_)
        check_names(engine, sde=("sde", sde), solver=("solver", solver), score=("score", score))
        budget = {} if nfe is None else {"nfe": nfe}
        if nfe is not None and solver is None:  # the best-at-budget table (registry.toml)
            from diffuse_engine.components.gits import MAX_STEPS as GITS_MAX_STEPS
            from diffuse_engine.components.solver import best_at_budget
            from diffuse_engine.runs.plan import data_dims

            base = engine.plan_run(preset, sde=sde, score=score)
            dims = data_dims(engine.builder, base)  # the table has entries by data size
            picked = best_at_budget(engine.registry.names("solver"), base.sde, nfe, dims)
            if picked is None:
                err(
                    f"note: no best-{base.sde}-N entries in the registry; --nfe {nfe} "
                    f"spends its budget on the preset's solver {base.solver!r}"
                )
            else:
                solver = picked
                long = _past_fitted_grid(engine, base, picked, nfe)
                if long is not None:
                    budget["schedule"] = long
                    err(
                        f"note: {picked}'s fitted gits grid fits at most {GITS_MAX_STEPS} "
                        f"steps; --nfe {nfe} takes {long!r} steps"
                    )
        plan = engine.plan_run(
            preset,
            sde=sde,
            solver=solver,
            score=score,
            n=n,
            seed=seed,
            device=device,
            steps=steps,
            prior=prior,
            **budget,
        )
        _check_device(plan.device)
        if dry_run:
            kinds = ("sde", "solver", "score")
            chosen = {k: engine.resolve(k, getattr(plan, k))[0] for k in kinds}
            routed = engine.route_overrides(chosen, plan.overrides)
            resolved = {
                k: engine.resolve(k, getattr(plan, k), **routed[k])[1].model_dump(mode="json")
                for k in kinds
            }
            console.print_json(json.dumps({"plan": plan.as_dict(), "entries": resolved}))
            return
        out = out or default_out(plan)
        from diffuse_engine.output.interrupts import TerminateAsInterrupt

        try:
            with TerminateAsInterrupt():  # SIGTERM ends the run like Ctrl-C
                metrics = engine.run(
                    plan, out, overwrite=overwrite, progress=not quiet, sample_format=sample_format
                )
        except (DiffuseError, KeyboardInterrupt):
            partial = Path(f"{out}.partial")
            if partial.is_dir():  # say where the incomplete run is (status.json says why)
                err(f"run stopped: incomplete output left in {partial}")
            raise
        if quiet:
            return
        rows = [("score evaluations", metrics["nfe"], "")]
        if metrics.get("setup_nfe"):
            rows.append(("setup evaluations (pilot batch)", metrics["setup_nfe"], ""))
        rows.append(("seconds", metrics["seconds"], ""))
        floor = metrics.get("floor", {})
        for key, label in (
            ("weight_tv", "mode weight error (TV)"),
            ("std_error", "mode std error (relative)"),
            ("centre_error", "mode centre error (in stds)"),
        ):
            if key in metrics:
                rows.append((label, metrics[key], floor.get(key)))
        print_table(
            f"{plan.sde} / {plan.solver} -> {out}",
            rows,
            ["metric", "value", f"floor (exact samples, n={plan.n})"],
        )
        if metrics.get("fitted_solver"):
            print_fitted_hint(out, metrics["fitted_solver"])


def _check_device(device: str) -> None:
    from diffuse_engine.core.devices import check_device

    check_device(device)
