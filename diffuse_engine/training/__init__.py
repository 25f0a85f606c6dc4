"""The training service: settings, the resolved configuration, the loop, sample plots.

Takes a :class:`~diffuse_engine.components.builder.Builder` and settings; sample plots
go through a ``sample`` callable handed in by the engine. Never imports the engine.
"""

from diffuse_engine.components.checkpoint import check_same_sde, load_trained, sde_spec
from diffuse_engine.training.loop import run_training, train_for_run
from diffuse_engine.training.plots import plot_result, sample_overrides
from diffuse_engine.training.resolve import resolve_config
from diffuse_engine.training.settings import RESUMABLE, TrainResult, TrainSettings, split_overrides

__all__ = [
    "RESUMABLE",
    "TrainResult",
    "TrainSettings",
    "check_same_sde",
    "load_trained",
    "plot_result",
    "resolve_config",
    "run_training",
    "sample_overrides",
    "sde_spec",
    "split_overrides",
    "train_for_run",
]
