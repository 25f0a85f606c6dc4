"""Describing installed implementations: config schemas as rows a person can read.

Used by ``diffuse plugins --verbose`` and the plugin docs. Each pydantic field of an
implementation's ``Config`` becomes ``(field, type, default, allowed, description)``:
``Literal`` choices are listed, numeric bounds are written as ``> 0``-style
constraints, and a :class:`~diffuse_engine.ComponentRef` field lists the installed
names of the kind it refers to.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel

from diffuse_engine.core.component import ComponentRef

_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def type_name(annotation: Any) -> str:
    """A short, readable name for a field annotation (``float | None``, ``int``)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is typing.Literal:
        return "choice"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join(type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _literals(annotation: Any) -> list[Any]:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return list(args)
    if origin in (typing.Union, types.UnionType, typing.Annotated):
        return [v for a in args for v in _literals(a)]
    return []


def allowed(finfo, catalogue=None) -> str:
    """What values a field accepts, beyond its type: choices, bounds, component names."""
    parts = []
    choices = _literals(finfo.annotation)
    if choices:
        parts.append(" | ".join(str(c) for c in choices))
    for meta in finfo.metadata:
        if isinstance(meta, ComponentRef):
            names = catalogue.names(meta.kind) if catalogue is not None else []
            extra = ["none"] if meta.allow_none else []
            parts.append(f"a {meta.kind}: " + (", ".join(names + extra) or "(none installed)"))
        for attr, sym in _BOUNDS:
            v = getattr(meta, attr, None)
            if v is not None:
                parts.append(f"{sym} {v}")
    return ", ".join(parts)


def config_rows(config: type[BaseModel], catalogue=None) -> list[tuple[str, str, str, str, str]]:
    """``(field, type, default, allowed, description)`` for every field of ``config``."""
    rows = []
    for name, f in config.model_fields.items():
        default = (
            "(required)" if f.is_required() else repr(f.get_default(call_default_factory=True))
        )
        rows.append(
            (name, type_name(f.annotation), default, allowed(f, catalogue), f.description or "")
        )
    return rows
