"""Benchmark: inverse-problem guidance against the exact posterior of the mixture test bed.

Every method of :data:`diffuse_engine.testbed.inverse.METHODS` on every problem at every
budget, the particle trend of ``smc``, and the floor of exact posterior samples of the
same size (:func:`diffuse_engine.testbed.inverse.sweep`); writes JSON lines to
``--results`` and markdown tables to ``--report``. ``diffuse bench --inverse`` runs the same.

    flock /tmp/heavy.lock python benchmarks/inverse.py [--n 1000] [--budgets 20,50,100,1000]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from diffuse_engine import Engine
from diffuse_engine.testbed import inverse as I

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000, help="samples per cell (ring: 2n)")
    p.add_argument("--budgets", default="20,50,100,1000")
    p.add_argument("--methods", default=",".join(I.METHODS))
    p.add_argument("--problems", default="ring-x0,gmm64-half,gmm64-proj,image-box")
    p.add_argument("--particles", default="1,4,16,32", help="smc trend at NFE 100")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", type=Path, default=ROOT / "docs/inverse.jsonl")
    p.add_argument("--report", type=Path, default=ROOT / "docs/inverse-tables.md")
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # fastest on a shared machine for these batch sizes
    a.results.unlink(missing_ok=True)
    cells, floors = I.sweep(
        Engine(),
        names=a.problems.split(","),
        methods=tuple(a.methods.split(",")),
        budgets=tuple(int(b) for b in a.budgets.split(",")),
        particles=tuple(int(k) for k in a.particles.split(",")),
        n=a.n,
        seed=a.seed,
        results=a.results,
        log=lambda msg: print(msg, flush=True),
    )
    a.report.write_text(I.report(cells, floors, a.n))


if __name__ == "__main__":
    main()
