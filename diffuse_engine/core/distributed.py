"""Distributed training and sampling on ``torch.distributed`` (launched by torchrun).

Nothing here is a home-made scheme: processes are started by ``torchrun``
(:mod:`torch.distributed.run`), which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
the rendezvous; the process group is ``gloo`` on CPU and ``nccl`` for CUDA tensors
(``"cpu:gloo,cuda:nccl"`` when CUDA is present, so CPU-side collectives still work);
training wraps the backbone in :class:`~torch.nn.parallel.DistributedDataParallel`.

Determinism is designed so that the number of processes does not change the numbers:

* **Sampling** splits the ``n`` samples into *shards* of a fixed ``shard_size``
  (independent of the number of ranks). Shard ``j`` draws its prior sample and all of
  its solver noise from its own generator seeded by :func:`shard_seed` ``(seed, j)`` and
  is integrated as its own batch. A single process loops over all shards; rank ``r`` of
  ``R`` takes shards ``r, r + R, ...`` and the results are gathered in shard order. On
  the CPU the gathered tensor equals the single-process one bit for bit. Shard 0 uses
  ``seed`` itself, so any run with ``n <= shard_size`` is the unsharded run of before.
* **Training** splits the global batch into ``shards`` equal parts (default: the
  number of processes; recorded in the run's config). Shard ``k`` draws its data from
  its own data generator and its times/noise from its own noise generator; rank ``r``
  holds a contiguous block of ``shards / R`` of them and accumulates their gradients
  (``no_sync`` for all but the last), and DDP averages over ranks. So a run on ``R``
  processes computes the same global loss and gradient as one process with the same
  ``shards`` (``--set shards=R``), up to floating-point summation order. Shard 0 uses
  the generators of the plain single-process run (``seed``, ``seed + 1``).

Only rank 0 writes files (checkpoints, logs, plots, samples); the others compute and
take part in the collectives. Every rank holds the same weights and the same EMA (DDP
broadcasts rank 0's initial weights and all-reduces every gradient, so the optimiser
and EMA updates are identical).
"""

from __future__ import annotations

import atexit
import math
import os
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffuse_engine.core.errors import DiffuseError

#: environment variables torchrun sets in every worker
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
#: samples per seeded shard when sampling (fixed, so results do not depend on the ranks)
DEFAULT_SHARD_SIZE = 10_000
#: sub-stream tags of :func:`stream_seed`
SAMPLE_STREAM, DATA_STREAM, NOISE_STREAM = 1, 2, 3


class DistributedError(DiffuseError):
    """A distributed run cannot start or its settings do not fit the number of ranks."""


# ---- seeds ---------------------------------------------------------------------------------
def stream_seed(seed: int, *key: int) -> int:
    """A 63-bit seed for sub-stream ``key`` of ``seed`` (numpy's ``SeedSequence`` hash),
    so streams of different shards and purposes are statistically independent."""
    state = np.random.SeedSequence([int(seed), *map(int, key)]).generate_state(1, np.uint64)
    return int(state[0]) >> 1


def shard_seed(seed: int, shard: int) -> int:
    """The seed of sampling shard ``shard``: ``seed`` itself for shard 0, else a hash."""
    return int(seed) if shard == 0 else stream_seed(seed, SAMPLE_STREAM, shard)


#: the memory budget of one sampling shard: its sample tensor holds at most this many
#: bytes (16 MiB), so image-sized samples get fewer per shard and the time per sample
#: stays flat as ``n`` grows; 2-D or 64-D samples keep ``DEFAULT_SHARD_SIZE``
DEFAULT_SHARD_BYTES = 16 * 2**20


def shard_size_for(
    shard_size: int, sample_shape, itemsize: int, max_bytes: int | None = None
) -> int:
    """``shard_size`` samples, fewer when that many of ``sample_shape`` (of ``itemsize``
    bytes per value) would pass ``max_bytes`` (default :data:`DEFAULT_SHARD_BYTES`).

    Depends only on its arguments, so every rank of a distributed run makes the same
    shards and ``--nproc N`` runs still equal one process."""
    budget = DEFAULT_SHARD_BYTES if max_bytes is None else max_bytes
    per_sample = max(1, itemsize * math.prod(sample_shape))
    return max(1, min(int(shard_size), budget // per_sample))


def shard_sizes(n: int, shard_size: int) -> list[int]:
    """Sizes of the sampling shards of ``n`` samples: full shards, then the remainder."""
    full, rest = divmod(int(n), int(shard_size))
    return [int(shard_size)] * full + ([rest] if rest else [])


# ---- the process group -----------------------------------------------------------------------
@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a distributed run (rank 0 of 1 when not distributed).

    Collectives are no-ops for a single process, so code calls them unconditionally.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """Whether there is more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the only rank that writes files and prints."""
        return self.rank == 0

    def device(self, requested: str | torch.device) -> torch.device:
        """``requested`` for this rank: a bare ``cuda`` becomes ``cuda:LOCAL_RANK``; an
        explicit ``cuda:N`` is refused with several processes (they would share a GPU)."""
        dev = torch.device(requested)
        if dev.type == "cuda" and self.enabled:
            if dev.index is not None:
                raise DistributedError(
                    f"device {str(dev)!r} with {self.world_size} processes: "
                    "give --device cuda, each process takes cuda:LOCAL_RANK "
                    "(choose GPUs with CUDA_VISIBLE_DEVICES)"
                )
            return torch.device("cuda", self.local_rank)
        return dev

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.enabled:
            torch.distributed.barrier()

    def all_reduce_mean(self, x: Tensor) -> Tensor:
        """The mean of ``x`` over ranks (a new tensor; ``x`` itself for one process)."""
        if not self.enabled:
            return x
        y = x.clone()
        torch.distributed.all_reduce(y)
        return y / self.world_size

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (picklable objects)."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def run_on_main(self, fn, *args, **kwargs):
        """Call ``fn`` on rank 0 only; re-raise a :class:`DiffuseError` it raised on every
        rank (so no rank waits forever for one that failed); return its result on rank 0."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn(*args, **kwargs)
            except DiffuseError as exc:
                error = exc
        if self.enabled:
            error = self.broadcast_object(error)
        if error is not None:
            raise error
        return result


SINGLE = DistContext()


def launched_by_torchrun() -> bool:
    """Whether this process is a torchrun worker of a run with more than one process."""
    return all(k in os.environ for k in TORCHRUN_ENV) and int(os.environ["WORLD_SIZE"]) > 1


def default_backend() -> str:
    """``gloo`` on CPU-only machines; ``cpu:gloo,cuda:nccl`` where CUDA is present."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def context(init: bool = True) -> DistContext:
    """The :class:`DistContext` of this process.

    From the initialised default process group; else, in a torchrun worker (and with
    ``init``), after initialising it from torchrun's environment (``env://``) with
    :func:`default_backend`; else the single-process context.
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return DistContext(dist.get_rank(), dist.get_world_size(), local)
    if not (init and launched_by_torchrun()):
        return SINGLE
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; run one process")
    local = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise DistributedError(
                f"local rank {local} has no GPU: this node has "
                f"{torch.cuda.device_count()}; lower --nproc-per-node"
            )
        torch.cuda.set_device(local)
    dist.init_process_group(backend=default_backend())
    atexit.register(_close_group)
    return DistContext(dist.get_rank(), dist.get_world_size(), local)


def _close_group() -> None:
    """At exit, wait for every rank before tearing the group down: a rank that closes its
    gloo connections while another still uses them aborts that one ("terminate called
    without an active exception")."""
    dist = torch.distributed
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def as_context(distributed: bool | DistContext | None) -> DistContext:
    """``True``: :func:`context`; ``False``/``None``: single process; a context: itself."""
    if isinstance(distributed, DistContext):
        return distributed
    return context() if distributed else SINGLE


@contextmanager
def on_main(ctx: DistContext, manager):
    """Enter context manager ``manager`` (e.g. a :class:`~diffuse_engine.output.files.RunFolder`)
    on rank 0 only; yield its value there and ``None`` on the other ranks.

    An error entering it (a :class:`DiffuseError`, e.g. the output exists) is raised on
    every rank, so no rank goes on into collectives that rank 0 will never join.
    """
    if not ctx.enabled:
        with manager as value:
            yield value
        return
    value = ctx.run_on_main(manager.__enter__)
    if not ctx.is_main:
        yield None
        return
    try:
        yield value
    except BaseException as exc:
        if not manager.__exit__(type(exc), exc, exc.__traceback__):
            raise
    else:
        manager.__exit__(None, None, None)


# ---- sampling --------------------------------------------------------------------------------
def my_shards(num_shards: int, ctx: DistContext) -> list[int]:
    """The sampling shards rank ``ctx.rank`` integrates: ``rank, rank + R, ...``."""
    return list(range(ctx.rank, num_shards, ctx.world_size))


def gather_shards(local: dict[int, Tensor], sizes: Sequence[int], ctx: DistContext) -> Tensor:
    """All shards, concatenated in shard order, on every rank.

    ``local`` maps this rank's shard indices (:func:`my_shards`) to their samples. Each
    rank pads its block to the largest block so one tensor ``all_gather`` suffices (gloo
    for CPU tensors, nccl for CUDA ones).
    """
    if not ctx.enabled:
        return torch.cat([local[j] for j in range(len(sizes))])
    example = next(iter(local.values())) if local else None
    meta = ctx.all_gather_object(
        None if example is None else (tuple(example.shape[1:]), example.dtype, str(example.device))
    )
    dims, dtype, _ = next(m for m in meta if m is not None)
    device = example.device if example is not None else torch.device("cpu")
    width, size = -(-len(sizes) // ctx.world_size), max(sizes)
    block = torch.zeros((width * size, *dims), dtype=dtype, device=device)
    for i, j in enumerate(my_shards(len(sizes), ctx)):
        block[i * size : i * size + sizes[j]] = local[j]
    blocks = [torch.empty_like(block) for _ in range(ctx.world_size)]
    torch.distributed.all_gather(blocks, block)
    parts = []
    for j, n in enumerate(sizes):
        r, i = j % ctx.world_size, j // ctx.world_size
        parts.append(blocks[r][i * size : i * size + n])
    return torch.cat(parts)


# ---- training ----------------------------------------------------------------------------------
class ShardedBatches:
    """The shards of each global batch that this rank draws, with their generators.

    ``shards`` parts of ``batch_size / shards`` samples each; rank ``r`` holds shards
    ``r * shards / R ... (r + 1) * shards / R - 1``. Shard ``k`` has a data generator (CPU,
    datasets sample on the CPU) and a noise generator (on ``device``), seeded from
    ``seed`` by :func:`stream_seed`; shard 0 uses ``seed`` and ``seed + 1`` exactly like
    the single-process loop.
    """

    def __init__(
        self, seed: int, shards: int, batch_size: int, ctx: DistContext, device: torch.device
    ):
        if shards % ctx.world_size:
            raise DistributedError(
                f"shards = {shards} cannot be split over {ctx.world_size} "
                f"processes; use a multiple of {ctx.world_size}"
            )
        if batch_size % shards:
            raise DistributedError(
                f"batch_size = {batch_size} is not divisible into {shards} "
                "equal shards; choose a multiple of the shard count"
            )
        per_rank = shards // ctx.world_size
        self.shard_batch = batch_size // shards
        self.local = list(range(ctx.rank * per_rank, (ctx.rank + 1) * per_rank))
        self.shards = shards
        self.data = {
            k: torch.Generator().manual_seed(seed if k == 0 else stream_seed(seed, DATA_STREAM, k))
            for k in self.local
        }
        self.noise = {
            k: torch.Generator(device=device).manual_seed(
                seed + 1 if k == 0 else stream_seed(seed, NOISE_STREAM, k)
            )
            for k in self.local
        }

    def step(self, model, loss_fn, dataset, device: torch.device, ddp=None) -> Tensor:
        """Forward and backward over this rank's shards (gradients accumulate into the
        parameters; DDP all-reduces after the last); returns the mean loss (detached)."""
        total = None
        last = len(self.local) - 1
        # class-conditional models and classifiers train on (x, label) batches
        labelled = getattr(model, "conditional", False) or getattr(model, "trains_on_labels", False)
        for i, k in enumerate(self.local):
            if labelled:
                x0, y = dataset.sample_labelled(self.shard_batch, self.data[k])
                x0, cond = x0.to(device), {"label": y.to(device)}
            else:
                x0 = dataset.sample(self.shard_batch, self.data[k]).to(device)
            sync = nullcontext() if ddp is None or i == last else ddp.no_sync()
            with sync:
                if labelled:
                    loss = loss_fn(model, x0, self.noise[k], cond=cond)
                else:
                    loss = loss_fn(model, x0, self.noise[k])
                if len(self.local) > 1:  # one shard: exactly the single-process loss
                    loss = loss / len(self.local)
                loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        return total

    @staticmethod
    def key(kind: str, k: int) -> str:
        """Checkpoint name of shard ``k``'s generator (``data``/``noise`` for shard 0)."""
        return kind if k == 0 else f"{kind}.{k}"

    def state(self, ctx: DistContext) -> dict[str, Tensor]:
        """Generator states of every shard (collective: gathered from all ranks)."""
        mine = {}
        for k in self.local:
            mine[self.key("data", k)] = self.data[k].get_state()
            mine[self.key("noise", k)] = self.noise[k].get_state().cpu()
        merged: dict[str, Tensor] = {}
        for part in ctx.all_gather_object(mine):
            merged.update(part)
        return merged

    def load_state(self, rng: dict[str, Tensor]) -> None:
        """Restore this rank's generators from a checkpoint's ``rng`` tensors."""
        for k in self.local:
            for kind, gens in (("data", self.data), ("noise", self.noise)):
                name = self.key(kind, k)
                if name not in rng:
                    raise DistributedError(
                        f"checkpoint has no generator state {name!r} for shard {k} of {self.shards}"
                    )
                state = rng[name]
                gens[k].set_state(state.to(gens[k].get_state().device))


__all__ = [
    "DistContext",
    "DistributedError",
    "SINGLE",
    "context",
    "as_context",
    "launched_by_torchrun",
    "default_backend",
    "on_main",
    "stream_seed",
    "shard_seed",
    "shard_sizes",
    "my_shards",
    "gather_shards",
    "ShardedBatches",
    "DEFAULT_SHARD_SIZE",
    "DEFAULT_SHARD_BYTES",
    "shard_size_for",
]
