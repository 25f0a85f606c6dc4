"""``diffuse bench``: the sampling benchmark (quality per score evaluation, overhead).

Everything goes into one folder, ``--out`` (default ``runs/bench-TIME``): the JSON-lines
results, the markdown report and its plots. Rerunning with the same ``--out`` skips the
finished cells. The repository's own report is regenerated with ``--out docs``.
"""

from __future__ import annotations

from pathlib import Path

import typer

from diffuse_engine.cli.common import console, handle_errors, make_engine

#: as diffuse_engine.testbed.bench.DEFAULT_SOLVERS (not imported here so --help stays fast)
DEFAULT_SOLVERS = (
    "pc,ancestral,ode,ddim,dpm_solver,dpm_solver_pp,dpm_solver_pp_ring,dpm_solver_pp3,edm,unipc,"
    "ipndm"
)


def _csv(text: str, kind=str) -> list:
    return [kind(v.strip()) for v in text.split(",") if v.strip()]


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def bench(
        solvers: str = typer.Option(DEFAULT_SOLVERS, help="comma-separated solver entries"),
        schedules: str = typer.Option(
            "uniform,quadratic,logsnr,karras,gits",
            help="comma-separated schedules: uniform, quadratic, logsnr, karras, gits",
        ),
        nfe: str = typer.Option("5,10,20,50,100,1000", help="score-evaluation budgets"),
        problems: str = typer.Option("gmm,gmm64", help="exact-GMM score entries"),
        sde: str = typer.Option("vp", help="SDE entry"),
        n: int = typer.Option(50000, "--n", "-n", help="samples per run"),
        n_ref: int = typer.Option(5000, help="samples compared with the dopri5 reference"),
        seed: int = typer.Option(0, help="random seed"),
        device: str = typer.Option("cpu", help="torch device"),
        threads: int | None = typer.Option(
            None, help="torch CPU threads (1 is fastest on a busy machine)"
        ),
        out_: str | None = typer.Option(
            None,
            "--out",
            "-o",
            help="folder for results, report and plots (default runs/bench-TIME; "
            "the same folder again skips finished cells)",
        ),
        results: Path | None = typer.Option(
            None,
            help="JSON-lines results (default OUT/benchmarks.jsonl; appended, finished "
            "cells are skipped)",
        ),
        report: Path | None = typer.Option(
            None, help="markdown report (default OUT/benchmarks.md)"
        ),
        img_dir: Path | None = typer.Option(None, help="folder for the plots (default OUT/img)"),
        fresh: bool = typer.Option(False, help="ignore earlier results in --results"),
        quality: bool = typer.Option(True, help="run the quality sweep"),
        overhead: bool = typer.Option(True, help="time the engine against a hand-written loop"),
        overhead_steps: int = typer.Option(1000, help="steps of the overhead runs"),
        overhead_batch: int = typer.Option(4096, help="batch of the overhead runs"),
        overhead_repeats: int = typer.Option(3, help="alternating repeats of the overhead runs"),
        inverse: bool = typer.Option(
            False, "--inverse", help="the inverse-problem benchmark instead (docs/inverse.md)"
        ),
    ):
        """Quality of every solver and schedule per score evaluation on the exact GMM,
        throughput, and the engine's overhead; writes a markdown report and plots."""
        import json
        import time

        import torch

        from diffuse_engine.cli.common import out_option
        from diffuse_engine.components.schedules import ALL_SCHEDULES
        from diffuse_engine.core.errors import DiffuseError
        from diffuse_engine.output.files import FolderLock, make_folder
        from diffuse_engine.testbed import bench as B

        if threads is not None:
            torch.set_num_threads(threads)
        if inverse:  # method x NFE against the exact posterior (testbed/inverse.py)
            from diffuse_engine.testbed import inverse as I

            default = (n == 50000, nfe == "5,10,20,50,100,1000")  # the sampling sweep's
            budgets = I.BUDGETS if default[1] else _csv(nfe, int)
            log = lambda msg: console.print(msg, markup=False, highlight=False)  # noqa: E731
            I.cli_bench(
                make_engine(), out_option(out_), 1000 if default[0] else n, budgets, seed, log
            )
            return
        engine = make_engine()
        solver_list, schedule_list = _csv(solvers), _csv(schedules)
        try:
            budgets = _csv(nfe, int)
        except ValueError:
            raise DiffuseError(
                f"--nfe {nfe!r}: expected comma-separated integers, e.g. 10,20,50"
            ) from None
        bad = [s for s in schedule_list if s not in ALL_SCHEDULES]
        if bad:
            from diffuse_engine.core.suggest import did_you_mean

            raise DiffuseError(
                f"--schedules: unknown {', '.join(bad)}{did_you_mean(bad[0], ALL_SCHEDULES)}; "
                "choices: " + ", ".join(ALL_SCHEDULES)
            )
        if any(b < 1 for b in budgets) or n < 1:
            raise DiffuseError("--nfe budgets and --n must be positive integers")
        out = out_option(out_) or Path("runs") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
        results = results or out / "benchmarks.jsonl"
        report = report or out / "benchmarks.md"
        img_dir = img_dir or out / "img"
        for s in solver_list:  # unknown names fail here, before any sampling
            engine.resolve("solver", B.resolve_variant(s)[0])
        for p in _csv(problems):
            engine.resolve("score", p)
        cases = [
            B.Case(p, sde, s, sch, b, n, seed)
            for p in _csv(problems)
            for s in solver_list
            for sch in schedule_list
            for b in budgets
        ]
        log = lambda msg: console.print(msg, markup=False, highlight=False)  # noqa: E731
        lock = FolderLock(out).acquire()  # released when the process ends
        for folder in (out, results.parent, report.parent, img_dir):
            make_folder(folder)
        log(f"writing into {out}")
        records = B.load_results(results) if not fresh else {}
        if quality:
            records = B.sweep(
                engine, cases, results, device=device, resume=not fresh, n_ref=n_ref, log=log
            )
        rows = []
        over_path = results.with_name(results.stem + "-overhead.json")
        if overhead:
            rows = B.overhead(
                engine,
                ("pc", "ode"),
                steps=overhead_steps,
                batch=overhead_batch,
                repeats=overhead_repeats,
                device=device,
                log=log,
            )
            over_path.parent.mkdir(parents=True, exist_ok=True)
            over_path.write_text(json.dumps(rows, indent=1))
        elif over_path.exists():
            rows = json.loads(over_path.read_text())
        md = B.write_report(records, rows, report, img_dir)
        lock.release()
        log(f"wrote {md}")
