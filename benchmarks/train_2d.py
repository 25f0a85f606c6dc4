"""Benchmark: an MLP trained for at most 2 minutes on the 2-D ``gmm`` ring, judged exactly.

Trains ``[train.default]`` (MLP, VP SDE, continuous DSM on exact samples of the ring of
eight unequal modes) under a wall-clock limit, samples ``n`` points with the ``pc``
sampler at 1000 steps using the EMA weights, and compares every mode's weight and std
with the exact mixture (:func:`diffuse_engine.mode_statistics`), next to the same
statistics of ``n`` exact samples (the Monte-Carlo floor).

Targets (issue 4): every mode's weight error <= 0.05 and relative std error <= 0.15
at n = 20000. Writes the table into docs/training.md (between the ``ring`` markers),
the plot to docs/img/train-ring.png and everything to OUT/results.json.

    python benchmarks/train_2d.py [--minutes 2] [--n 20000] [--out runs/bench-ring]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from diffuse_engine import Engine, mode_statistics

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from train_digits import update_doc  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=2.0, help="training wall-clock limit")
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--sample-steps", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument(
        "--ema", type=float, default=0.995, help="EMA decay (short runs need a short memory)"
    )
    ap.add_argument("--time-sampling", default="mixed", help="uniform | log_uniform | mixed")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-ring")
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()

    engine = Engine()
    torch.set_num_threads(args.threads)
    res = engine.training(
        preset="default",
        out=args.out,
        overwrite=True,
        progress=True,
        steps=1_000_000,
        max_seconds=args.minutes * 60,
        threads=args.threads,
        hidden=args.hidden,
        depth=args.depth,
        batch_size=args.batch_size,
        lr=args.lr,
        checkpoint_every=0,
        plot_n=2000,
        plot_steps=100,
        ema_decay=args.ema,
        time_sampling=args.time_sampling,
    )
    print(f"trained {res.step} steps in {res.seconds:.0f} s", flush=True)
    t0 = time.perf_counter()
    out = engine.sampling(
        score=res.model,
        sde="vp",
        solver="pc",
        shape=(args.n, 2),
        seed=0,
        steps=args.sample_steps,
        progress=True,
    )
    sample_seconds = time.perf_counter() - t0
    mix = res.model.mixture
    stats = mode_statistics(out.samples, mix)
    floor = mode_statistics(mix.sample(args.n, torch.Generator().manual_seed(1)), mix)
    w_err = [
        abs(a - b)
        for a, b in zip(stats["modes"]["weight"], stats["modes"]["weight_true"], strict=True)
    ]
    s_err = stats["modes"]["std_error"]
    ok = max(w_err) <= 0.05 and max(s_err) <= 0.15
    from diffuse_engine.output.plotting import plot_samples

    plot_path = args.out / "ring-samples.png"
    plot_samples(
        out.samples,
        plot_path,
        reference=mix.sample(args.n, torch.Generator().manual_seed(2)),
        title=f"MLP, {res.step} steps in {res.seconds:.0f} s; pc, {args.sample_steps} steps",
    )
    results = {
        "train_steps": res.step,
        "train_seconds": round(res.seconds, 1),
        "parameters": res.model.num_parameters(),
        "n": args.n,
        "sample_steps": args.sample_steps,
        "sample_seconds": round(sample_seconds, 1),
        "nfe": out.nfe,
        "weight_error_per_mode": w_err,
        "std_error_per_mode": s_err,
        "centre_error_per_mode": stats["modes"]["centre_error"],
        "floor_weight_max": floor["weight_max"],
        "floor_std_error_per_mode": floor["modes"]["std_error"],
        "ok": ok,
        "settings": vars(args) | {"out": str(args.out)},
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = [
        "| mode | weight (true) | weight error | std error (relative) | floor std error |",
        "|---|---|---|---|---|",
    ]
    for k in range(len(w_err)):
        rows.append(
            f"| {k} | {stats['modes']['weight'][k]:.4f} ({stats['modes']['weight_true'][k]:.4f}) "
            f"| {w_err[k]:.4f} | {s_err[k]:.3f} | {floor['modes']['std_error'][k]:.3f} |"
        )
    table = "\n".join(
        [
            f"Training: {res.step} steps in {res.seconds:.0f} s wall ({args.threads} torch "
            f"thread(s), MLP {args.hidden}x{args.depth}, {res.model.num_parameters():,} "
            f"parameters, batch {args.batch_size}, lr {args.lr}, EMA {args.ema}, "
            f"{args.time_sampling} t). Sampling: pc, {args.sample_steps} steps, n = "
            f"{args.n}, {out.nfe} score evaluations, {sample_seconds:.0f} s.",
            "",
            *rows,
            "",
            f"Largest weight error {max(w_err):.4f} (target <= 0.05, exact-sample floor "
            f"{floor['weight_max']:.4f}); largest std error {max(s_err):.3f} (target <= 0.15). "
            f"Verdict: {'met' if ok else 'NOT met'}. Load average at the end: "
            f"{results['load_average_at_end']} (2 cores shared with other jobs).",
        ]
    )
    print(table)
    if not args.no_docs:
        (ROOT / "docs" / "img").mkdir(parents=True, exist_ok=True)
        (ROOT / "docs" / "img" / "train-ring.png").write_bytes(plot_path.read_bytes())
        update_doc(ROOT / "docs" / "training.md", "ring", table)


if __name__ == "__main__":
    main()
