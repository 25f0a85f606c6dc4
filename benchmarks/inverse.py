"""Benchmark: inverse-problem guidance against the exact posterior of the mixture test bed.

Every method of :data:`diffuse_engine.testbed.inverse.METHODS` on every problem at every
budget, the particle trend of ``smc``, and the floor of exact posterior samples of the
same size; writes JSON lines to ``--results`` and markdown tables to ``--report``.

    flock /tmp/heavy.lock python benchmarks/inverse.py [--n 1000] [--budgets 20,50,100,1000]
"""

from __future__ import annotations

import argparse
import json
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
    engine = Engine()
    budgets = [int(b) for b in a.budgets.split(",")]
    cells, floors = [], {}
    with a.results.open("w") as out:
        for prob in I.problems(engine.builder, a.problems.split(","), seed=a.seed):
            n = 2 * a.n if prob.name == "ring-x0" else a.n
            floors[prob.name] = I.floor(prob, n, a.seed)
            print(prob.name, "floor", floors[prob.name], flush=True)
            runs = [(m, b, 16) for m in a.methods.split(",") for b in budgets]
            if "smc" in a.methods:
                runs += [("smc", 100, int(k)) for k in a.particles.split(",") if int(k) != 16]
            for method, budget, k in runs:
                extra = {"particles": k} if method == "smc" else {}
                cell = I.run_cell(engine, prob, method, budget, n, a.seed, **extra)
                cells.append(cell)
                out.write(json.dumps(cell) + "\n")
                out.flush()
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in cell.items()},
                      flush=True)  # fmt: skip
    parts = [f"<!-- written by benchmarks/inverse.py, n = {a.n} (ring: {2 * a.n}) -->"]
    for metric in I.METRICS:
        parts += [f"\n### {metric}\n", I.table(cells, floors, metric)]
    a.report.write_text("\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
