"""Steps per second of distributed training, and samples per second of distributed
sampling, on 1 vs 2 (or more) processes of this machine (torch.distributed, gloo on
CPU, nccl with ``--device cuda``).

Each configuration runs in fresh processes started by ``torch.multiprocessing.spawn``
(the same collectives torchrun's workers use); every process uses ``--threads`` torch
threads (default 1, torchrun's default), so 2 processes use twice the cores of 1.

* training: an MLP (``--hidden``, depth 2) on the ``gmm`` ring with the ``dsm`` loss
  and the VP SDE, global batch ``--batch`` split into one shard per process; steps per
  second over ``--steps`` steps after ``--warmup`` steps (the steps_per_second of the
  training result, which excludes start-up);
* sampling: the exact ``gmm`` score with the PC sampler, ``--n`` samples in shards of
  ``--shard-size``, ``--sample-steps`` steps; samples per second including the gather.

Also records the 1-minute load average before each measurement: on a machine shared
with other jobs the numbers move with it. Writes the table into docs/distributed.md
between markers.

    python benchmarks/distributed.py [--procs 1 2] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import time
from pathlib import Path

from doc_section import replace_section

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "distributed.md"
BEGIN, END = "<!-- distributed-bench:begin -->", "<!-- distributed-bench:end -->"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args: dict, folder: str) -> None:
    import torch

    from diffuse_engine import Engine
    from diffuse_engine.core.distributed import default_backend

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    torch.set_num_threads(args["threads"])
    if args["device"] == "cuda":
        torch.cuda.set_device(rank)
    torch.distributed.init_process_group(default_backend(), rank=rank, world_size=world)
    try:
        engine = Engine(autoload=False, distributed=True)
        common = dict(
            batch_size=args["batch"],
            hidden=args["hidden"],
            depth=2,
            threads=args["threads"],
            device=args["device"],
            log_every=50,
            checkpoint_every=0,
            warmup=10,
            seed=0,
        )
        engine.training(steps=args["warmup"], **common)  # warm-up: allocator, DDP buckets
        result = engine.training(steps=args["steps"], **common)
        engine.sample(
            score="gmm",
            sde="vp",
            solver="pc",
            shape=(args["shard_size"], 2),
            steps=5,
            device=args["device"],
            shard_size=args["shard_size"],
        )
        torch.distributed.barrier()
        t0 = time.perf_counter()
        samples = engine.sample(
            score="gmm",
            sde="vp",
            solver="pc",
            shape=(args["n"], 2),
            steps=args["sample_steps"],
            device=args["device"],
            shard_size=args["shard_size"],
        )
        seconds = time.perf_counter() - t0
        if rank == 0:
            Path(folder, f"{world}.txt").write_text(
                f"{result.steps_per_second} {samples.shape[0] / seconds}"
            )
    finally:
        torch.distributed.destroy_process_group()


def measure(world: int, args: dict) -> tuple[float, float, float]:
    """``(load average before, training steps/s, sampling samples/s)`` on ``world``
    processes."""
    import tempfile

    import torch.multiprocessing as tmp

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        tmp.spawn(_worker, args=(world, _free_port(), args, folder), nprocs=world, join=True)
        steps, samples = map(float, Path(folder, f"{world}.txt").read_text().split())
    return load, steps, samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--n", type=int, default=40_000)
    p.add_argument("--shard-size", type=int, default=10_000)
    p.add_argument("--sample-steps", type=int, default=200)
    p.add_argument("--no-write", action="store_true", help="print only")
    a = p.parse_args()
    args = dict(
        device=a.device,
        threads=a.threads,
        batch=a.batch,
        hidden=a.hidden,
        steps=a.steps,
        warmup=a.warmup,
        n=a.n,
        shard_size=a.shard_size,
        sample_steps=a.sample_steps,
    )
    rows = []
    base = None
    for world in a.procs:
        load, steps, samples = measure(world, args)
        base = base or (steps, samples)
        rows.append(
            f"| {world} | {load:.1f} | {steps:.1f} | {steps / base[0]:.2f}x | "
            f"{samples:.0f} | {samples / base[1]:.2f}x |"
        )
        print(rows[-1], flush=True)
    cpu = f"{os.cpu_count()} cores" if a.device == "cpu" else "CUDA"
    table = "\n".join(
        [
            f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.node()} "
            f"({cpu}, {a.device}, {a.threads} torch thread(s) per process, torch "
            f"{__import__('torch').__version__}). Training: MLP hidden {a.hidden} x 2, global "
            f"batch {a.batch}, {a.steps} steps after {a.warmup} warm-up steps. Sampling: exact "
            f"gmm score, PC, {a.sample_steps} steps, n = {a.n} in shards of {a.shard_size}.",
            "",
            "| processes | load avg before | train steps/s | speed-up | samples/s | speed-up |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    if not a.no_write:
        replace_section(DOC, BEGIN, END, table)


if __name__ == "__main__":
    main()
