"""The :class:`Builder`: registry entries and recorded specs -> component objects.

It is what every service needs from the plugin world, handed down by the
:class:`~diffuse_engine.Engine` facade: the catalogue of implementations, the merged
registry, the engine-wide ``--set`` overrides, the event relay (pluggy's hook caller, for
coarse events and observers) and the process group. Services take a builder as an
argument; they never import the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

from diffuse_engine.components.score import CallableScore, ScoreModel
from diffuse_engine.components.sde import SDE
from diffuse_engine.core.component import Component
from diffuse_engine.core.distributed import DistContext
from diffuse_engine.core.errors import DiffuseError, RegistryError
from diffuse_engine.core.plugins import Catalogue
from diffuse_engine.core.registry import Registry
from diffuse_engine.core.suggest import did_you_mean

#: kinds whose components are bound to an SDE when built
SDE_BOUND = ("score", "loss", "classifier")


class Builder:
    """Builds components from ``[kind.name]`` registry entries (or implementation names
    with their defaults) and from the ``{"type": ..., **fields}`` specs checkpoints record.

    ``set_overrides``: bare ``FIELD=V`` / ``KIND.FIELD=V`` assignments of
    ``Engine(sets=...)``, applied to every call that has the field. ``known_settings``:
    ``(kind, field)`` pairs of service settings (``("train", "lr")``) that such a set may
    name without being a typo.
    """

    def __init__(
        self,
        catalogue: Catalogue,
        registry: Registry,
        *,
        hook: Any,
        dist: DistContext,
        set_overrides: Mapping[str, Any] | None = None,
        known_settings: Collection[tuple[str, str]] = (),
    ):
        self.catalogue = catalogue
        self.registry = registry
        self.hook = hook
        self.dist = dist
        self.set_overrides = dict(set_overrides or {})
        self.known_settings = frozenset(known_settings)

    def has_observers(self, hook_name: str) -> bool:
        """Whether any plugin implements ``hook_name`` (so per-step events cost nothing)."""
        return bool(getattr(self.hook, hook_name).get_hookimpls())

    # ---- registry entries ----------------------------------------------------------------
    def resolve(self, kind: str, name: str, **overrides):
        """``(class, validated config)`` for entry ``[kind.name]`` with ``overrides``."""
        return self.registry.resolve(kind, name, overrides)

    def implementation(self, kind: str, name: str) -> type:
        """The class of entry ``[kind.name]`` before overrides complete its config (a
        checkpoint score needs ``path=`` from the call); bad names get the registry's error."""
        entry = self.registry.entry(kind, name)
        if entry.type is not None and self.catalogue.has(kind, entry.type):
            return self.catalogue.get(kind, entry.type)
        return self.resolve(kind, name)[0]

    def build(self, kind: str, name: str, *, sde: SDE | None = None, **overrides) -> Component:
        """Build the component of registry entry ``[kind.name]`` (or implementation
        ``name`` with its defaults). Score models and losses need ``sde=``."""
        cls, config = self.resolve(kind, name, **overrides)
        return self._construct(kind, cls, config, sde)

    def build_recorded(self, kind: str, spec: dict[str, Any], sde: SDE | None = None):
        """Build ``kind`` from a recorded ``{"type": ..., **fields}`` (no registry lookup)."""
        from diffuse_engine.components.checkpoint import recorded_config

        fields = {k: v for k, v in spec.items() if k not in ("type", "name")}
        cls = self.catalogue.get(kind, spec["type"])
        cfg = recorded_config(cls, fields, f"recorded {kind} {spec['type']!r}")
        return self._construct(kind, cls, cfg, sde)

    def _construct(self, kind: str, cls: type, config, sde: SDE | None):
        if kind == "sde":
            obj = cls(config)
            if getattr(config, "kernel", None) is not None:
                obj.attach_kernel(self.build("kernel", config.kernel, sde=obj))
            return obj
        if kind == "kernel":
            return cls(config, sde=sde)
        if kind in SDE_BOUND:
            if sde is None:
                raise TypeError(f"building a {kind} needs sde=")
            obj = cls(config, sde=sde)
            if hasattr(obj, "bind_builder"):  # e.g. a checkpoint score building its network
                obj.bind_builder(self)
            return obj
        if kind == "solver":
            return cls(config, catalogue=self.catalogue)
        return cls(config)

    # ---- overrides -----------------------------------------------------------------------
    def route_overrides(
        self, chosen: Mapping[str, type], overrides: Mapping[str, Any], *, with_sets: bool = True
    ) -> dict[str, dict[str, Any]]:
        """Send each ``FIELD`` or ``KIND.FIELD`` override to the chosen entry that has it
        (``with_sets``: the engine-wide sets too, under the call's own overrides: a set
        gives way to a call's field that replaces it, ``ComponentConfig.override_replaces``,
        so a call's ``nfe=`` beats an engine-wide ``steps``)."""
        sets = self.set_overrides if with_sets else {}
        routed: dict[str, dict[str, Any]] = {k: {} for k in chosen}
        from_set: dict[str, set[str]] = {k: set() for k in chosen}
        for key, value in {**sets, **overrides}.items():
            from_sets = key in sets and key not in overrides
            kind, _, fname = key.rpartition(".")
            if kind:
                if kind not in chosen:
                    raise RegistryError(
                        f"override {key}: {kind!r} is not part of this call; "
                        f"use one of: {', '.join(chosen)}"
                    )
                targets = [kind]
            else:
                targets = [k for k, cls in chosen.items() if fname in cls.Config.model_fields]
            if not targets and from_sets and self.known_setting(key):
                continue  # the engine's sets apply to the calls that have the field
            if not targets:
                allowed = sorted(
                    {f"{k}.{f}" for k, c in chosen.items() for f in c.Config.model_fields}
                )
                names = {a.rpartition(".")[2]: a for a in allowed} if not kind else {}
                hint = did_you_mean(fname, names) if names else did_you_mean(key, allowed)
                raise RegistryError(
                    f"override {key!r}: no chosen entry has that field{hint}; "
                    f"allowed: {', '.join(allowed)}"
                )
            if len(targets) > 1:
                raise RegistryError(
                    f"override {key!r} is ambiguous; qualify it as one of "
                    + ", ".join(f"{k}.{fname}" for k in targets)
                )
            routed[targets[0]][fname] = value
            if from_sets:
                from_set[targets[0]].add(fname)
        for kind, fields in routed.items():
            replaces = getattr(chosen[kind].Config, "override_replaces", {})
            for f in [f for f in fields if f not in from_set[kind] and fields[f] is not None]:
                for g in replaces.get(f, ()):
                    if g in from_set[kind]:
                        fields.pop(g, None)
        return routed

    def known_setting(self, key: str) -> bool:
        """Whether ``key`` (``FIELD`` or ``KIND.FIELD``) names a service setting or a
        field of some installed implementation: an ``Engine(sets=...)`` entry that is
        real but not for this call, as opposed to a typo."""
        kind, _, fname = key.rpartition(".")
        if any(fname == f and kind in ("", k) for k, f in self.known_settings):
            return True
        kinds = [kind] if kind else self.catalogue.kinds()
        return any(
            fname in self.catalogue.get(k, n).Config.model_fields
            for k in kinds
            if k in self.catalogue.kinds()
            for n in self.catalogue.names(k)
        )

    # ---- score models --------------------------------------------------------------------
    def score_class(self, score: Any) -> type:
        """The implementation class behind ``score``: a registry name, a
        :class:`ScoreModel` or a callable ``fn(x, t)`` (wrapped as :class:`CallableScore`)."""
        if isinstance(score, str):
            return self.implementation("score", score)
        return type(score) if isinstance(score, ScoreModel) else CallableScore

    def bind_score(self, score: Any, sde: SDE, **fields) -> ScoreModel:
        """The score model for ``sde`` from a registry name (with ``fields`` overriding its
        entry), a ready :class:`ScoreModel`, or a callable ``fn(x, t)``."""
        if isinstance(score, str):
            model = self.build("score", score, sde=sde, **fields)
        elif isinstance(score, ScoreModel):
            model = score
        elif callable(score):
            model = CallableScore(score, sde=sde, **fields)
        else:
            raise DiffuseError(
                f"score must be a callable fn(x, t), a ScoreModel or a registry "
                f"name, not {type(score).__name__}"
            )
        if hasattr(model, "check_sde"):  # trained models refuse another SDE
            model.check_sde(sde)
        return model

    def needs_training(self, score: Any) -> bool:
        """Whether score-model entry ``score`` (a name) must be trained before sampling."""
        if not isinstance(score, str):
            return False
        return bool(getattr(self.resolve("score", score)[0], "needs_training", False))


#: what a service calls to sample with built components (``Engine.sampling``'s signature)
SampleFn = Callable[..., Any]
