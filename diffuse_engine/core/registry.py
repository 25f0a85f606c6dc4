"""The declarative registry: named, validated component entries and run presets.

A registry file is TOML with one table per entry, ``[KIND.NAME]``, whose ``type``
names an implementation and whose other keys are that implementation's config fields::

    [sde.vp]
    type = "vp"
    beta_min = 0.1

    [run.default]
    sde = "vp"
    solver = "pc"

Files merge in order over the built-in default (an entry with the same type merges
field by field; a different ``type`` replaces it), then fully qualified ``--set
KIND.NAME.FIELD=VALUE`` assignments apply. Every entry is validated against its
implementation's pydantic ``Config``; errors name the file, table, field and what is
allowed, on one line.
"""

from __future__ import annotations

import itertools
import math
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from diffuse_engine.core.component import ComponentRef
from diffuse_engine.core.errors import RegistryError
from diffuse_engine.core.plugins import Catalogue
from diffuse_engine.core.registry_text import (
    format_validation_error,
    read_toml,
)
from diffuse_engine.core.registry_text import (  # re-exported: documented import paths
    parse_assignment as parse_assignment,
)
from diffuse_engine.core.suggest import did_you_mean
from diffuse_engine.core.trust import import_implementation, is_import_path, refuse_import

#: registry tables whose entries name implementations in the catalogue
COMPONENT_TABLES = ("sde", "kernel", "score", "loss", "data", "solver", "guidance", "classifier")
RUN_TABLE = "run"
#: ``[train.NAME]`` tables: training settings, validated by the model the engine hands in
TRAIN_TABLE = "train"
DEFAULT_SOURCE = "registry.toml (built-in)"


def default_registry_text() -> str:
    """The default registry shipped inside the package."""
    return resources.files("diffuse_engine").joinpath("registry.toml").read_text()


class RunPreset(BaseModel):
    """A ``[run.NAME]`` preset: which entries ``diffuse run`` combines, and run settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sde: str = Field("vp", description="SDE entry (or implementation) name")
    solver: str = Field("pc", description="solver entry (or implementation) name")
    score: str = Field("gmm", description="score-model entry (or implementation) name")
    data: str | None = Field(None, description="dataset entry to train on / compare to")
    train: str | None = Field(
        None,
        description="[train.NAME] settings used when the "
        "score model needs training (default: train.default)",
    )
    n: int = Field(20000, ge=1, description="number of samples")
    seed: int = Field(0, ge=0, lt=2**63, description="random seed")
    device: str = Field("cpu", description="torch device, e.g. cpu or cuda")
    label: int | None = Field(
        None, ge=0, description="sample class `label` only (cond={'label': label}); gmm: a mode"
    )
    guidance: str | None = Field(
        None, description="guidance entry with label (default: conditional), e.g. cfg"
    )
    classifier: str | None = Field(None, description="classifier entry for guidance classifier")
    prior: Literal["auto", "data", "sde"] = Field(
        "auto",
        description="where sampling starts: data (p_T's mean and variance for the score "
        "model's data), sde (the SDE's prior) or auto (data when the model knows them)",
    )


@dataclass
class Entry:
    """One ``[KIND.NAME]`` table after merging, with where each field came from."""

    kind: str
    name: str
    fields: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)
    #: the merge layer each field came from (0: the first file merged; a call's
    #: overrides lie above all): a later layer's field replaces the earlier layers'
    #: fields it stands for (``ComponentConfig.override_replaces``)
    layers: dict[str, float] = field(default_factory=dict)

    @property
    def type(self) -> str | None:
        return self.fields.get("type")

    @property
    def config_fields(self) -> dict[str, Any]:
        return {k: v for k, v in self.fields.items() if k != "type"}

    def where(self, key: str | None = None) -> str:
        if key is None:  # an entry-level problem: name every source that shaped it
            src = " + ".join(dict.fromkeys(self.sources.values())) or "?"
        else:
            src = (
                self.sources.get(key)
                or self.sources.get("type")
                or next(iter(self.sources.values()), "?")
            )
        return f"{src}: [{self.kind}.{self.name}]"


def check_refs(config: BaseModel, catalogue: Catalogue, where: str) -> None:
    """Every field marked ``ComponentRef(kind)`` must name an installed ``kind``."""
    for fname, finfo in type(config).model_fields.items():
        for meta in finfo.metadata:
            if isinstance(meta, ComponentRef):
                value = getattr(config, fname)
                if value is None and meta.allow_none:
                    continue
                if not catalogue.has(meta.kind, value):
                    raise RegistryError(
                        f"{where} {fname}: " + catalogue.unknown_message(meta.kind, value)
                    )


class Registry:
    """Merged and validated registry entries (``kind -> name -> Entry``) and presets."""

    def __init__(
        self,
        entries: dict[str, dict[str, Entry]],
        catalogue: Catalogue,
        *,
        allow_imports: bool = False,
        train_model: type[BaseModel] | None = None,
    ):
        self.entries = entries
        #: validates ``[train.NAME]`` tables; handed in by the engine (the training
        #: service owns it), so the registry never imports a service
        self.train_model = train_model
        self.catalogue = catalogue
        #: whether ``type = "package.module:Class"`` may import code (see :mod:`.trust`)
        self.allow_imports = allow_imports

    # ---- loading --------------------------------------------------------------
    @classmethod
    def load(
        cls,
        files: Iterable[str | Path],
        catalogue: Catalogue,
        *,
        sets: Iterable[tuple[str, Any]] = (),
        with_default: bool = True,
        allow_imports: bool = False,
        train_model: type[BaseModel] | None = None,
    ) -> Registry:
        """Merge the default registry, ``files`` and qualified ``sets``; validate all.
        ``allow_imports`` lets a ``type`` be an import path (off: files are data)."""
        entries: dict[str, dict[str, Entry]] = {}
        layers = itertools.count()  # merge order: a later layer's field wins
        if with_default:
            _merge(entries, tomllib.loads(default_registry_text()), DEFAULT_SOURCE, next(layers))
        for f in files:
            _merge(entries, read_toml(f), str(f), next(layers))
        for key, value in sets:
            parts = key.split(".")
            if len(parts) != 3:
                raise RegistryError(f"--set {key}: expected KIND.NAME.FIELD")
            table = {parts[0]: {parts[1]: {parts[2]: value}}}
            _merge(entries, table, f"--set {key}", next(layers))
        reg = cls(entries, catalogue, allow_imports=allow_imports, train_model=train_model)
        reg.validate()
        return reg

    def validate(self) -> None:
        """Validate every entry; raise the first error as a one-line RegistryError."""
        for kind, table in self.entries.items():
            for name in table:
                if kind == RUN_TABLE:
                    self.preset(name)
                elif kind == TRAIN_TABLE and self.train_model is not None:
                    self.train_settings(name)
                else:
                    self.resolve(kind, name)

    # ---- lookup ---------------------------------------------------------------
    def entry(self, kind: str, name: str) -> Entry:
        """The entry ``[kind.name]``; an implementation name with no entry gets defaults."""
        table = self.entries.get(kind, {})
        if name in table:
            return table[name]
        if kind in COMPONENT_TABLES and self.catalogue.has(kind, name):
            return Entry(kind, name, {"type": name}, {"type": "(implementation default)"})
        if kind == TRAIN_TABLE and name == "default":  # the settings' own defaults
            return Entry(kind, name, {}, {"type": "(defaults)"})
        entries = ", ".join(sorted(table)) or "(none)"
        impls = self.catalogue.names(kind) if kind in COMPONENT_TABLES else []
        extra = f"; implementations: {', '.join(impls)}" if impls else ""
        hint = did_you_mean(name, [*table, *impls])
        raise RegistryError(
            f"no {kind} entry named {name!r}{hint}; registry entries: {entries}{extra}"
        )

    def resolve(
        self,
        kind: str,
        name: str,
        overrides: dict[str, Any] | None = None,
        override_source: str = "override",
    ):
        """``(implementation class, validated config)`` for ``[kind.name]`` + overrides."""
        entry = self.entry(kind, name)
        if overrides:
            entry = Entry(
                kind,
                name,
                {**entry.fields, **overrides},
                {**entry.sources, **{k: override_source for k in overrides}},
                {**entry.layers, **dict.fromkeys(overrides, math.inf)},
            )
        if entry.type is None:
            raise RegistryError(
                f"{entry.where()} type: missing; choices: " + ", ".join(self.catalogue.names(kind))
            )
        if not isinstance(entry.type, str):
            raise RegistryError(
                f"{entry.where('type')} type: must be a string naming an "
                f"implementation (got {entry.type!r}); choices: "
                + ", ".join(self.catalogue.names(kind))
            )
        impl = self.implementation(kind, entry.type, entry.where("type"))
        layer = entry.layers
        replaced = {  # a field of None unsets itself and replaces nothing; fields of one
            f  # layer (one table, one call) are checked against each other instead
            for k, v in entry.fields.items()
            if v is not None
            for f in impl.Config.override_replaces.get(k, ())
            if f in entry.fields and layer.get(f, 0) < layer.get(k, 0)
        }
        if replaced:  # what a later layer's field replaces goes with it
            entry = Entry(
                kind,
                name,
                {k: v for k, v in entry.fields.items() if k not in replaced},
                {k: v for k, v in entry.sources.items() if k not in replaced},
                {k: v for k, v in entry.layers.items() if k not in replaced},
            )
        try:
            config = impl.Config.model_validate(entry.config_fields)
        except ValidationError as exc:
            bad = str(exc.errors()[0]["loc"][0]) if exc.errors()[0]["loc"] else None
            raise RegistryError(
                format_validation_error(entry.where(bad), exc, impl.Config)
            ) from None
        check_refs(config, self.catalogue, entry.where())
        return impl, config

    def implementation(self, kind: str, type_name: str, where: str):
        """The class a ``type`` names: an installed implementation, or (only with
        ``allow_imports``) an import path ``package.module:Class``; ``where`` prefixes errors."""
        if is_import_path(type_name):
            if not self.allow_imports:
                raise refuse_import(where, type_name, self.catalogue.names(kind))
            return import_implementation(type_name, kind, where)
        if not self.catalogue.has(kind, type_name):
            raise RegistryError(f"{where} type: " + self.catalogue.unknown_message(kind, type_name))
        return self.catalogue.get(kind, type_name)

    def preset(self, name: str, overrides: dict[str, Any] | None = None) -> RunPreset:
        """The validated ``[run.NAME]`` preset."""
        entry = self.entry(RUN_TABLE, name)
        if overrides:
            entry = Entry(
                RUN_TABLE,
                name,
                {**entry.fields, **overrides},
                {**entry.sources, **{k: "command line" for k in overrides}},
            )
        fields = entry.fields
        try:
            preset = RunPreset.model_validate(fields)
        except ValidationError as exc:
            bad = str(exc.errors()[0]["loc"][0]) if exc.errors()[0]["loc"] else None
            raise RegistryError(format_validation_error(entry.where(bad), exc, RunPreset)) from None
        for kind in ("sde", "solver", "score", "data", "train"):
            ref = getattr(preset, kind)
            if ref is not None:
                try:
                    self.entry(kind, ref)
                except RegistryError as exc:
                    raise RegistryError(f"{entry.where(kind)} {kind}: {exc}") from None
        return preset

    def train_settings(
        self,
        name: str = "default",
        overrides: dict[str, Any] | None = None,
        override_source: str = "argument",
    ):
        """The ``[train.NAME]`` table with ``overrides``, validated by :attr:`train_model`;
        an unknown name given in ``overrides`` is reported as ``override_source`` (where
        the user wrote it), one from the table as the table."""
        TrainSettings = self.train_model  # noqa: N806 - a class
        if TrainSettings is None:
            raise RegistryError("this registry was loaded without a training settings model")
        entry = self.entry(TRAIN_TABLE, name)
        try:
            settings = TrainSettings.model_validate({**entry.fields, **(overrides or {})})
        except ValidationError as exc:
            bad = str(exc.errors()[0]["loc"][0]) if exc.errors()[0]["loc"] else None
            where = f"{override_source}:" if bad in (overrides or {}) else entry.where(bad)
            raise RegistryError(format_validation_error(where, exc, TrainSettings)) from None
        for field_name, kind in (
            ("data", "data"),
            ("sde", "sde"),
            # task = "classifier" trains a classifier entry
            (
                "model",
                "classifier" if getattr(settings, "task", "score") == "classifier" else "score",
            ),
            ("loss", "loss"),
            ("plot_solver", "solver"),
        ):
            try:
                self.entry(kind, getattr(settings, field_name))
            except RegistryError as exc:
                where = (
                    f"{override_source} {field_name}"
                    if field_name in (overrides or {})
                    else f"{entry.where(field_name)} {field_name}"
                )
                raise RegistryError(f"{where}: {exc}") from None
        return settings

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries.get(kind, {}))

    def as_dict(self) -> dict[str, dict[str, dict[str, Any]]]:
        """The merged registry as plain nested dicts (what ``registry show`` prints)."""
        return {
            k: {n: dict(e.fields) for n, e in sorted(t.items())}
            for k, t in sorted(self.entries.items())
        }


def _merge(entries: dict[str, dict[str, Entry]], data: dict, source: str, layer: int) -> None:
    allowed = ", ".join((*COMPONENT_TABLES, RUN_TABLE, TRAIN_TABLE))
    for kind, table in data.items():
        if kind not in COMPONENT_TABLES and kind not in (RUN_TABLE, TRAIN_TABLE):
            hint = did_you_mean(kind, (*COMPONENT_TABLES, RUN_TABLE, TRAIN_TABLE))
            raise RegistryError(f"{source}: [{kind}] unknown table{hint}; allowed kinds: {allowed}")
        if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
            raise RegistryError(
                f"{source}: [{kind}] must hold named entries like "
                f"[{kind}.NAME] with key = value fields"
            )
        for name, fields in table.items():
            old = entries.setdefault(kind, {}).get(name)
            if old is not None and fields.get("type", old.type) == old.type:
                old.fields.update(fields)
                old.sources.update({k: source for k in fields})
                old.layers.update(dict.fromkeys(fields, layer))
            else:
                entries[kind][name] = Entry(
                    kind,
                    name,
                    dict(fields),
                    {k: source for k in fields} or {"type": source},
                    dict.fromkeys(fields, layer),
                )
