"""diffuse-engine: plugin-based score-based generative modelling with SDEs.

Plugin authors import everything they need from here::

    from diffuse_engine import hookimpl, SDE, ScoreModel, Solver

The package is layered (see docs/architecture.md): ``core`` and ``output`` (the
foundation), ``components`` (contracts every plugin implements), the services
(``sampling``, ``training``, ``likelihood``, ``runs``, ``testbed``), the
:class:`Engine` facade, and the ``cli``.
"""

from diffuse_engine import _moved
from diffuse_engine.components.classifier import Classifier
from diffuse_engine.components.data import Dataset
from diffuse_engine.components.guidance import Guidance, GuidanceConfig, Guided
from diffuse_engine.components.kernel import PerturbationKernel
from diffuse_engine.components.kernel_solver import KernelGrid, KernelSolver, KernelSolverConfig
from diffuse_engine.components.linear import LinearSDE, NumericKernel
from diffuse_engine.components.loss import Loss
from diffuse_engine.components.mixture import GaussianMixture, mode_statistics
from diffuse_engine.components.schedules import SCHEDULE_HELP, Schedule, time_from_log_snr
from diffuse_engine.components.score import (
    CallableScore,
    Parameterisation,
    ScoreConfig,
    ScoreModel,
    to_score,
)
from diffuse_engine.components.sde import SDE, SDEConfig, VPFamilySDE, bcast
from diffuse_engine.components.solver import (
    MAX_STEPS,
    Corrector,
    CorrectorConfig,
    Predictor,
    Solver,
    SolverConfig,
    noise_like,
    uniform_schedule_only,
)
from diffuse_engine.core.component import Component, ComponentConfig, ComponentRef
from diffuse_engine.core.errors import (
    DiffuseError,
    IncompatibleError,
    NumericalError,
    OutputExistsError,
    PluginError,
    RegistryError,
    UnknownComponentError,
)
from diffuse_engine.core.hookspecs import hookimpl, hookspec
from diffuse_engine.core.plugins import ENTRY_POINT_GROUP, module_plugin
from diffuse_engine.engine import Engine
from diffuse_engine.sampling.loop import SamplingResult

_moved.install()

__version__ = "0.1.0"

__all__ = [
    "Classifier",
    "Guidance",
    "GuidanceConfig",
    "Guided",
    "MAX_STEPS",
    "SCHEDULE_HELP",
    "Component",
    "ComponentConfig",
    "ComponentRef",
    "Corrector",
    "CorrectorConfig",
    "CallableScore",
    "Dataset",
    "DiffuseError",
    "ENTRY_POINT_GROUP",
    "Engine",
    "GaussianMixture",
    "IncompatibleError",
    "KernelGrid",
    "KernelSolver",
    "KernelSolverConfig",
    "LinearSDE",
    "Loss",
    "NumericalError",
    "NumericKernel",
    "OutputExistsError",
    "Parameterisation",
    "PerturbationKernel",
    "PluginError",
    "Predictor",
    "RegistryError",
    "SDE",
    "SDEConfig",
    "SamplingResult",
    "Schedule",
    "ScoreConfig",
    "ScoreModel",
    "Solver",
    "SolverConfig",
    "UnknownComponentError",
    "VPFamilySDE",
    "bcast",
    "hookimpl",
    "hookspec",
    "mode_statistics",
    "module_plugin",
    "noise_like",
    "time_from_log_snr",
    "to_score",
    "uniform_schedule_only",
]
