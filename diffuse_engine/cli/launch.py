"""``--nproc N``: run a ``diffuse`` command on N local processes through torchrun.

The launcher is a command-line concern: the engine and its services only see the
process group a launch creates (:mod:`diffuse_engine.core.distributed`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from diffuse_engine.core.distributed import DistributedError, launched_by_torchrun


def split_nproc(argv: Sequence[str]) -> tuple[int | None, list[str]]:
    """``(N, argv without --nproc N)``; ``N`` is None when ``--nproc`` is absent."""
    args, nproc, i = list(argv), None, 0
    out: list[str] = []
    while i < len(args):
        a = args[i]
        if a == "--nproc" or a.startswith("--nproc="):
            if a == "--nproc":
                if i + 1 >= len(args):
                    raise DistributedError("--nproc needs a number of processes, e.g. --nproc 2")
                value, i = args[i + 1], i + 2
            else:
                value, i = a.split("=", 1)[1], i + 1
            try:
                nproc = int(value)
            except ValueError:
                raise DistributedError(
                    f"--nproc must be a whole number of processes, not {value!r}"
                ) from None
            if nproc < 1:
                raise DistributedError(f"--nproc must be at least 1, not {nproc}")
            continue
        out.append(a)
        i += 1
    return nproc, out


def torchrun_args(nproc: int, argv: Iterable[str]) -> list[str]:
    """torchrun's arguments for ``diffuse ARGV`` on ``nproc`` processes of this machine:
    ``torchrun --standalone --nproc-per-node=N -m diffuse_engine ARGV`` (a single-node
    rendezvous on a free local port)."""
    return ["--standalone", f"--nproc-per-node={nproc}", "-m", "diffuse_engine", *argv]


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``diffuse ARGV`` on ``nproc`` processes of this machine with torchrun
    (:func:`torch.distributed.run.run`, the function behind the ``torchrun`` command, so
    this process is the elastic agent); return the exit status: 0, or the first failed
    worker's (2 for a user error, as without ``--nproc``). For several nodes, run
    torchrun yourself (README, "Several processes, GPUs and nodes")."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if launched_by_torchrun():
        raise DistributedError(
            "--nproc inside a torchrun worker: give the process count to torchrun only"
        )
    args = parse_args(torchrun_args(nproc, []))
    args.training_script_args = list(argv)  # verbatim: argparse would misread "--n 5"
    try:
        run(args)
    except ChildFailedError as exc:
        codes = [f.exitcode for _, f in sorted(exc.failures.items())]
        return next((c for c in codes if c > 0), 1)
    return 0
