"""Old import paths of modules that moved into the layered packages keep working.

Before the layered layout every module sat directly in ``diffuse_engine/``; plugin
authors and scripts import some of them (``diffuse_engine.kernel_solver``,
``diffuse_engine.schedules``, ``diffuse_engine.differentiable`` ...). A meta-path finder
answers those names with the module at its new home (the same module object, so
``isinstance`` and monkeypatching behave), importing it only when asked for.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

#: old module name (under ``diffuse_engine.``) -> its new home
MOVED = {
    "errors": "core.errors",
    "hookspecs": "core.hookspecs",
    "plugins": "core.plugins",
    "registry": "core.registry",
    "component": "core.component",
    "trust": "core.trust",
    "devices": "core.devices",
    "introspect": "core.introspect",
    "distributed": "core.distributed",
    "allocator": "core.allocator",
    "outputs": "output.files",
    "plotting": "output.plotting",
    "image_grid": "output.image_grid",
    "progress": "output.progress",
    "interrupts": "output.interrupts",
    "sde": "components.sde",
    "kernel": "components.kernel",
    "linear": "components.linear",
    "score": "components.score",
    "solver": "components.solver",
    "kernel_solver": "components.kernel_solver",
    "loss": "components.loss",
    "data": "components.data",
    "schedules": "components.schedules",
    "gits": "components.gits",
    "checkpoint": "components.checkpoint",
    "mixture": "components.mixture",
    "differentiable": "components.differentiable",
    "faults": "sampling.faults",
    "conformance": "testbed.conformance",
    "bench": "testbed.bench",
}


class _MovedModuleLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module) -> None:  # already executed at its new home
        pass


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds ``diffuse_engine.OLD`` as the module at ``diffuse_engine.MOVED[OLD]``."""

    prefix = __name__.rpartition(".")[0] + "."

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(self.prefix):
            return None
        new = MOVED.get(fullname[len(self.prefix) :])
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _MovedModuleLoader(self.prefix + new))


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
