"""diffuse-engine: plugin-based score-based generative modelling with SDEs.

Plugin authors import everything they need from here::

    from diffuse_engine import hookimpl, SDE, ScoreModel, Solver
"""

from .component import Component, ComponentConfig, ComponentRef
from .data import Dataset
from .engine import Engine, SamplingResult
from .errors import (DiffuseError, IncompatibleError, NumericalError, OutputExistsError,
                     PluginError, RegistryError, UnknownComponentError)
from .hookspecs import hookimpl, hookspec
from .kernel import PerturbationKernel
from .linear import LinearSDE, NumericKernel
from .loss import Loss
from .mixture import GaussianMixture, mode_statistics
from .plugins import ENTRY_POINT_GROUP, module_plugin
from .score import CallableScore, ScoreConfig, ScoreModel, to_score
from .sde import SDE, SDEConfig, VPFamilySDE, bcast
from .solver import (Corrector, CorrectorConfig, Predictor, Solver, SolverConfig,
                     noise_like)

__version__ = "0.1.0"

__all__ = [
    "Component", "ComponentConfig", "ComponentRef", "Corrector", "CorrectorConfig",
    "CallableScore", "Dataset", "DiffuseError", "ENTRY_POINT_GROUP", "Engine",
    "GaussianMixture", "IncompatibleError", "LinearSDE", "Loss", "NumericalError", "NumericKernel",
    "OutputExistsError", "PerturbationKernel", "PluginError", "Predictor",
    "RegistryError", "SDE", "SDEConfig", "SamplingResult", "ScoreConfig", "ScoreModel",
    "Solver", "SolverConfig", "UnknownComponentError", "VPFamilySDE", "bcast",
    "hookimpl", "hookspec", "mode_statistics", "module_plugin", "noise_like", "to_score",
]
