"""The trust model: installed plugins are trusted code; files are data.

Code runs only from what the user installed (entry-point plugins) or handed to
``Engine(plugins=[...])`` in their own program. Everything the engine *reads* — registry
files, ``--set`` values, data files, checkpoints — is data: it selects and configures
installed implementations by name and never makes the engine import or unpickle
anything. Two consequences:

* A registry ``type`` may be an import path ``"package.module:Class"`` only when the user
  opts in with ``Engine(allow_imports=True)`` / ``diffuse --allow-imports``; otherwise the
  entry is refused with a one-line :class:`~diffuse_engine.core.errors.RegistryError` *before*
  anything is imported (importing a module runs its top-level code).
* Checkpoints and tensor files are read with safetensors or ``torch.load(...,
  weights_only=True)``, which cannot construct arbitrary objects (tested with a pickle
  whose ``__reduce__`` would run a command).
"""

from __future__ import annotations

import importlib

from diffuse_engine.core.component import Component
from diffuse_engine.core.errors import RegistryError


def is_import_path(type_name: str) -> bool:
    """Whether a registry ``type`` is an import path ``module:attr`` (not a plugin name)."""
    return ":" in type_name


def refuse_import(where: str, type_name: str, installed: list[str]) -> RegistryError:
    """The error for an import path in a registry without the user's opt-in."""
    return RegistryError(
        f"{where} type: {type_name!r} is a Python import path; registry files are data and "
        "may not import code unless you trust this file and pass --allow-imports "
        "(Engine(allow_imports=True)); or install the implementation as a plugin. "
        f"Installed: {', '.join(installed) or '(none)'}"
    )


def import_implementation(type_name: str, kind: str, where: str) -> type[Component]:
    """Import ``"package.module:Class"`` (opted in) and check it implements ``kind``."""
    module_name, _, qualname = type_name.partition(":")
    parts = [*module_name.split("."), *qualname.split(".")]
    if not qualname or not all(p.isidentifier() for p in parts):
        raise RegistryError(
            f"{where} type: {type_name!r} is not an import path of the form 'package.module:Class'"
        )
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:  # an import can fail in any way; say which and why
        raise RegistryError(
            f"{where} type: cannot import {module_name!r} "
            f"({type(exc).__name__}: {exc})".splitlines()[0]
        ) from None
    for attr in qualname.split("."):
        obj = getattr(obj, attr, None)
        if obj is None:
            raise RegistryError(f"{where} type: {module_name!r} has no attribute {qualname!r}")
    if not (isinstance(obj, type) and issubclass(obj, Component) and obj.kind == kind):
        raise RegistryError(
            f"{where} type: {type_name!r} is not a {kind} implementation "
            f"(a subclass of the {kind} base class with a Config)"
        )
    return obj
