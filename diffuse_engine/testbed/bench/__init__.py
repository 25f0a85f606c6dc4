"""The sampling benchmark: quality per score evaluation, throughput and engine overhead.

Run by ``benchmarks/sampling_quality.py`` and ``diffuse bench`` (the grid of solvers,
schedules and budgets on a problem) and by ``benchmarks/sampling_suite.py`` (the
registry defaults on every test bed of :mod:`.beds`, held-out beds apart). Modules:

* :mod:`.cells`: one cell (problem, SDE, solver, schedule, budget), sweeps, references.
* :mod:`.beds`: the suite of exact-score test beds and their floors.
* :mod:`.suite`: defaults on every bed, normalised by the floor; choosing defaults.
* :mod:`.overhead`: the engine against a hand-written loop.
* :mod:`.report`: markdown tables and plots.
"""

from diffuse_engine.testbed.bench.cells import (
    DEFAULT_NFE,
    DEFAULT_PROBLEMS,
    DEFAULT_SCHEDULES,
    DEFAULT_SOLVERS,
    VARIANTS,
    Case,
    count_nfe,
    is_deterministic,
    load_results,
    prior_noise,
    reference_solution,
    resolve_variant,
    run_case,
    steps_for_budget,
    sweep,
)
from diffuse_engine.testbed.bench.overhead import hand_pc_vp, hand_rk4_vp, mlp_score, overhead
from diffuse_engine.testbed.bench.report import write_report

__all__ = [
    "DEFAULT_NFE",
    "DEFAULT_PROBLEMS",
    "DEFAULT_SCHEDULES",
    "DEFAULT_SOLVERS",
    "VARIANTS",
    "Case",
    "count_nfe",
    "hand_pc_vp",
    "hand_rk4_vp",
    "is_deterministic",
    "load_results",
    "mlp_score",
    "overhead",
    "prior_noise",
    "reference_solution",
    "resolve_variant",
    "run_case",
    "steps_for_budget",
    "sweep",
    "write_report",
]
