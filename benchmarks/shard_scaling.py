"""Time per sample against n for image-shaped samples: byte-sized shards against the old
fixed 10 000-sample shards (issue 16: "time per sample stays flat from n = 1e3 to 1e5").

A trivial closed-form score (the exact score of N(0, I) data under the VP SDE, one
tensor op) so the measurement is the engine's memory traffic, not a network; DDIM, 20
steps, one thread, shape (3, 32, 32), float32. Each cell runs once after a warm-up at the
smallest n; the table goes to stdout and to docs/shard-scaling.md.

    flock /tmp/heavy.lock python benchmarks/shard_scaling.py [--ns 1000,10000,100000]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from diffuse_engine import Engine
from diffuse_engine.core.distributed import DEFAULT_SHARD_BYTES

SHAPE = (3, 32, 32)


def unit_gaussian_score(x, t):
    """The VP marginal of N(0, I) data is N(0, I) at every t: its score is -x."""
    return -x


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ns", default="1000,10000,100000")
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    engine = Engine()
    ns = [int(n) for n in a.ns.split(",")]
    per_sample = 4 * torch.Size(SHAPE).numel()
    configs = {
        "bytes (default)": DEFAULT_SHARD_BYTES,  # the default cap
        "10 000 samples (before)": 10_000 * per_sample,
    }

    def run(n, max_bytes):
        from unittest import mock

        from diffuse_engine.core import distributed

        capped = lambda size, shape, item: distributed.shard_size_for(size, shape, item, max_bytes)  # noqa: E731
        with mock.patch("diffuse_engine.sampling.request.shard_size_for", capped):
            start = time.perf_counter()
            engine.sampling(score=unit_gaussian_score, sde="vp", solver="ddim",
                            shape=(n, *SHAPE), steps=a.steps, seed=0)  # fmt: skip
            return time.perf_counter() - start

    run(ns[0], DEFAULT_SHARD_BYTES)  # warm-up
    rows = []
    for label, max_bytes in configs.items():
        for n in ns:
            s = run(n, max_bytes)
            shard = min(10_000, max_bytes // per_sample)
            rows.append((label, n, shard, s, 1e6 * s / n))
            print(f"{label:24s} n {n:7d} shard {shard:6d}  {s:7.2f} s  "
                  f"{rows[-1][4]:7.1f} us/sample", flush=True)  # fmt: skip
    lines = [
        "<!-- written by benchmarks/shard_scaling.py -->",
        f"DDIM, {a.steps} steps, trivial score, shape {SHAPE}, float32, one thread.",
        "",
        "| shards | n | samples per shard | seconds | us per sample |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.1f} |" for r in rows]
    out = Path(__file__).resolve().parents[1] / "docs/shard-scaling.md"
    out.write_text(
        "# Time per sample against n, image-shaped samples\n\n" + "\n".join(lines) + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
