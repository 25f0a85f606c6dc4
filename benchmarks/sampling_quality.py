"""Sampling quality per score evaluation, throughput and engine overhead.

    python benchmarks/sampling_quality.py                       # the full sweep (long)
    python benchmarks/sampling_quality.py --solvers dpm_solver_pp,unipc --schedules logsnr \
        --nfe 10,20 --problems gmm --n 50000

Same options as ``diffuse bench`` (this script calls it, with ``--out docs`` unless you
give another ``--out``). Results append to
``docs/benchmarks.jsonl`` (resumable: finished cells are skipped), and the report is
written to ``docs/benchmarks.md`` with plots in ``docs/img/``. The logic lives in
:mod:`diffuse_engine.testbed.bench`.
"""

from diffuse_engine.cli import main

if __name__ == "__main__":
    import sys

    args = sys.argv[1:]
    # the repository's report lives in docs/; `diffuse bench` alone writes to runs/
    main(["bench", *([] if "--out" in args or "-o" in args else ["--out", "docs"]), *args])
