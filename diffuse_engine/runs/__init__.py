"""The runs service: ``diffuse run`` plans, run folders with samples, plots and metrics.

Takes a :class:`~diffuse_engine.components.builder.Builder` and the engine's ``sample``
and ``train`` callables; never imports the engine or another service.
"""

from diffuse_engine.output.files import save_tensor
from diffuse_engine.runs.plan import (
    SAMPLE_FORMATS,
    RunPlan,
    default_out,
    execute_run,
    plan_run,
    reference_mixture,
)

__all__ = [
    "SAMPLE_FORMATS",
    "RunPlan",
    "default_out",
    "execute_run",
    "plan_run",
    "reference_mixture",
    "save_tensor",
]
