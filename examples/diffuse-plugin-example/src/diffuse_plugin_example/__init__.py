"""diffuse-plugin-example: an SDE, a solver, a score network and a CLI command.

The engine loads this module through the ``diffuse_engine.plugins`` entry point of the
distribution and calls the hook implementations below once at start-up.
"""

from __future__ import annotations

from diffuse_engine import hookimpl

from .cli import register_command
from .network import TinyMLPScore
from .sde import OrnsteinUhlenbeck
from .solver import DDIMSampler

__version__ = "0.1.0"


@hookimpl
def diffuse_register_sdes():
    return [OrnsteinUhlenbeck]


@hookimpl
def diffuse_register_solvers():
    return [DDIMSampler]


@hookimpl
def diffuse_register_score_models():
    return [TinyMLPScore]


@hookimpl
def diffuse_register_commands(app):
    register_command(app)
