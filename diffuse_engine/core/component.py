"""The base every plugin implementation derives from.

An implementation is a class that declares its ``kind`` (set by the kind's base
class, e.g. :class:`~diffuse_engine.components.sde.SDE`), a unique ``name`` within that kind
and a pydantic ``Config`` model describing the registry fields it accepts. The
engine validates a registry entry against ``Config`` and passes the validated model
to the constructor, so implementations never see unchecked input.
"""

from __future__ import annotations

import types
import typing
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


class ComponentConfig(BaseModel):
    """Base of every implementation's config: unknown fields are errors, and so are
    NaN and infinite floats (a registry value of ``inf`` only ever ends in NaN samples)."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, arbitrary_types_allowed=True, allow_inf_nan=False
    )
    #: ``{field: fields it replaces}``: an override of ``field`` drops the entry's own
    #: values of those (``steps=`` on an entry with an ``nfe`` budget samples ``steps``)
    override_replaces: ClassVar[dict[str, tuple[str, ...]]] = {}

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """Refuse ``true`` / ``false`` for a number field (``nfe = true``, ``--set
        steps=true``): pydantic reads it as 1 / 0, a run nobody asked for."""
        if isinstance(value, bool) and _takes_numbers(cls.model_fields[info.field_name]):
            raise ValueError("expected a number, not a boolean")
        return value


def _takes_numbers(field) -> bool:
    """Whether a field's type is a number (``int``, ``float``, optionally ``None``) and
    not also a boolean."""
    kinds = {field.annotation}
    while any(typing.get_origin(k) in (typing.Union, types.UnionType) for k in kinds):
        kinds = {a for k in kinds for a in (typing.get_args(k) or (k,))}
    return bool(kinds & {int, float}) and bool not in kinds


class ComponentRef:
    """Marks a config field whose value names another component of ``kind``.

    Use as ``Annotated[str, ComponentRef("predictor")]``; the registry checks the
    name exists and lists the installed choices when it does not.
    """

    def __init__(self, kind: str, allow_none: bool = False):
        self.kind = kind
        self.allow_none = allow_none

    def __repr__(self) -> str:  # shows up in `diffuse plugins --verbose` schemas
        return f"ComponentRef({self.kind!r})"


class Component:
    """Base class of all implementations (SDEs, score models, solvers, ...)."""

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    Config: ClassVar[type[ComponentConfig]] = ComponentConfig

    def __init__(self, config: ComponentConfig | None = None, **fields: Any):
        if config is None:
            config = self.Config(**fields)
        elif fields:
            config = self.Config.model_validate({**config.model_dump(), **fields})
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"
