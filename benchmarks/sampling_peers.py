"""The engine's registry defaults against diffusers' DPM-Solver++ on the same beds.

    python benchmarks/sampling_peers.py --budgets 5,10,20,50 --beds ring,mix64,ring12-1to20

Needs diffusers (the ``diffusers`` extra; no other torch). k-diffusion is not run: its
wheel pulls another torch (``pip install --dry-run k-diffusion`` wants torch 2.14 and
CUDA wheels), which this project's machines must not install.

Bed: the DDPM chain of diffusers' default scheduler (linear betas 1e-4 .. 0.02, 1000
steps) is the registry's ``ddpm`` SDE, so both sample the same exact mixture: diffusers
gets the noise prediction ``eps = -s(t) * score(x, t)`` at engine time ``(k + 1) / 1000``
of its timestep ``k``, one call per inference step (``num_inference_steps = N``, its
final step to sigma 0 included: ``N`` evaluations). Its variants: DPMSolverMultistep
(dpmsolver++, order 2) with its default spacing, Karras sigmas and Lu lambdas; the best
of them per bed and budget is the peer. The engine: the registry's ``best-vp-B`` entry
(the VP table; the chain is a VP SDE) with ``nfe = N``. Prints and writes
``docs/suite/peers.jsonl``: per bed and budget the figure of each (each floor-normalised
error's mean over seeds 1..K, the worst of the three; ``suite.bed_error``) and the
engine / best-peer ratio.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffuse_engine.components.solver import best_at_budget
from diffuse_engine.testbed.bench import beds as B
from diffuse_engine.testbed.bench.suite import bed_error, run_one

VARIANTS = {
    "dpmpp2m": {},
    "dpmpp2m-karras": {"use_karras_sigmas": True},
    "dpmpp2m-lu": {"use_lu_lambdas": True},
}


def diffusers_sample(score, sde, shape, nfe: int, seed: int, **kw) -> torch.Tensor:
    """DPMSolverMultistepScheduler on the exact score; ``nfe`` model calls."""
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero", **kw,
    )  # fmt: skip
    sched.set_timesteps(nfe)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * sched.init_noise_sigma
    for k in sched.timesteps:
        t = torch.full((shape[0],), (float(k) + 1.0) / 1000, dtype=torch.float64)
        _, s = sde.marginal(t)
        eps = -s.view(-1, *[1] * (x.dim() - 1)) * score(x, t)
        x = sched.step(eps, k, x).prev_sample
    return x


def main() -> None:
    from diffuse_engine.components.mixture import mode_statistics
    from diffuse_engine.testbed.bench.beds import normalised

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="5,10,20,50")
    ap.add_argument("--beds", default="ring,ring-wide,mix64,ring12-1to20,mix32-1to50")
    ap.add_argument("--seeds", type=int, default=4, help="seeds 1..K per cell")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from sampling_suite import engine

    e, floors = engine(), B.Floors()
    out = Path("docs/suite/peers.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_suffix(".partial")  # the old results stay until the new are complete
    part.unlink(missing_ok=True)
    for name in args.beds.split(","):
        bed = B.bed(name)
        sde = e.build("sde", "ddpm")
        score = e.build("score", bed.entry, sde=sde)
        floor = floors.of(score.mixture, bed.name, bed.n)
        for nfe in (int(b) for b in args.budgets.split(",")):
            entry = best_at_budget(e.registry.names("solver"), "vp", nfe)
            seeds = range(1, 1 + args.seeds)
            mine = [run_one(e, bed, "ddpm", entry, {}, nfe, s, floors, label=entry) for s in seeds]
            peers = {}
            for label, kw in VARIANTS.items():
                recs = []
                for seed in seeds:
                    x = diffusers_sample(score, sde, (bed.n, *score.data_shape), nfe, seed, **kw)
                    r = normalised(mode_statistics(x, score.mixture), floor)
                    recs.append({**{f"{m}_ratio": r[m] for m in B.METRICS}, "worst": r["worst"]})
                peers[label] = bed_error(recs)
            best = min(peers, key=peers.get)
            rec = {
                "bed": name,
                "nfe": nfe,
                "engine": entry,
                "seeds": args.seeds,
                "engine_worst": bed_error(mine),
                "peers": peers,
                "best_peer": best,
                "ratio": bed_error(mine) / peers[best],
            }
            print(
                f"{name:14s} nfe {nfe:3d}  engine {rec['engine_worst']:7.2f}  {best} "
                f"{peers[best]:7.2f}  ratio {rec['ratio']:.2f}",
                flush=True,
            )
            with part.open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
    part.replace(out)


if __name__ == "__main__":
    main()
