"""Plugin discovery and the catalogue of implementations.

Plugins are loaded from the entry-point group :data:`ENTRY_POINT_GROUP`; the built-in
plugins are entry points of the ``diffuse-engine`` distribution itself and load the same
way. A plugin that fails to import or register is recorded (with its distribution,
entry point and error) and skipped; the rest load. ``DIFFUSE_DISABLE_PLUGIN_AUTOLOAD=1``
(or ``Engine(autoload=False)``) loads only the built-ins and the plugins passed in;
``DIFFUSE_TRACE_HOOKS=1`` traces every hook call to stderr.

The catalogue maps ``kind -> name -> implementation class``. It is a plain dict built
once per engine from the registration hooks: no global state.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType
from typing import Any

import pluggy

from diffuse_engine.core import hookspecs
from diffuse_engine.core.component import Component
from diffuse_engine.core.errors import PluginError, UnknownComponentError

ENTRY_POINT_GROUP = "diffuse_engine.plugins"
DISTRIBUTION = "diffuse-engine"

#: component kind -> the registration hook that provides it
REGISTRATION_HOOKS = {
    "sde": "diffuse_register_sdes",
    "kernel": "diffuse_register_kernels",
    "score": "diffuse_register_score_models",
    "loss": "diffuse_register_losses",
    "data": "diffuse_register_datasets",
    "solver": "diffuse_register_solvers",
    "predictor": "diffuse_register_predictors",
    "corrector": "diffuse_register_correctors",
    "guidance": "diffuse_register_guidance",
    "classifier": "diffuse_register_classifiers",
}


@dataclass
class PluginInfo:
    """What ``diffuse plugins`` shows about one plugin."""

    name: str
    distribution: str
    version: str
    entry_point: str
    builtin: bool
    error: str | None = None
    hooks: list[str] = field(default_factory=list)
    #: the name it is registered under in the plugin manager (None: never registered)
    registered_as: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def describe(self) -> str:
        """``plugin NAME (distribution D V, entry point E)``, for messages."""
        where = f"{self.distribution} {self.version}".strip()
        if not self.distribution.startswith("("):
            where += f", entry point {self.name} = {self.entry_point}"
        return f"plugin {self.name!r} ({where})"


def _dist_of(ep: metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "?", "?"
    return dist.metadata["Name"], dist.version


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def _autoload_disabled() -> bool:
    return os.environ.get("DIFFUSE_DISABLE_PLUGIN_AUTOLOAD", "") not in ("", "0")


def make_plugin_manager(
    plugins: Iterable[Any] = (), autoload: bool = True
) -> tuple[pluggy.PluginManager, list[PluginInfo]]:
    """A fresh plugin manager with entry-point plugins and ``plugins`` registered."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if os.environ.get("DIFFUSE_TRACE_HOOKS"):
        pm.trace.root.setwriter(sys.stderr.write)
        pm.enable_tracing()
    infos: list[PluginInfo] = []
    third_party = autoload and not _autoload_disabled()
    seen: set[str] = set()
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist, version = _dist_of(ep)
        builtin = dist == DISTRIBUTION
        if not (builtin or third_party) or (dist, ep.name) in seen:
            continue
        seen.add((dist, ep.name))
        info = PluginInfo(ep.name, dist, version, ep.value, builtin)
        infos.append(info)
        try:
            obj = ep.load()
            info.registered_as = pm.register(obj, name=ep.name if builtin else f"{dist}:{ep.name}")
        except Exception as exc:  # a broken plugin is reported, the rest still load
            info.error = _describe(exc)
    for obj in plugins:
        name = getattr(obj, "__name__", None) or type(obj).__name__
        info = PluginInfo(name, "(passed to Engine)", "", repr(obj)[:60], False)
        infos.append(info)
        try:
            info.registered_as = pm.register(
                obj, name=name if pm.get_plugin(name) is None else None
            )
        except Exception as exc:
            info.error = _describe(exc)
    _drop_unknown_hooks(pm, infos)
    by_name = {pm.get_name(p): p for p in pm.get_plugins()}
    for info in infos:
        plugin = by_name.get(info.registered_as) if info.registered_as else None
        if plugin is not None:
            info.hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or ())
    return pm, infos


def _drop_unknown_hooks(pm: pluggy.PluginManager, infos: list[PluginInfo]) -> None:
    """``pm.check_pending()``, with each plugin implementing a hook that does not exist (a
    misspelt name) reported on its :class:`PluginInfo` and unregistered, not fatal."""
    by_registered = {i.registered_as: i for i in infos if i.registered_as}
    for _ in range(len(infos) + 1):
        try:
            pm.check_pending()
            return
        except pluggy.PluginValidationError as exc:
            name = pm.get_name(exc.plugin)
            info = by_registered.get(name)
            if info is None:  # not one of ours to skip: a bug to report loudly
                raise PluginError(f"a plugin implements an unknown hook: {exc}") from None
            hooks = sorted(h.name for h in pm.get_hookcallers(exc.plugin) or () if h.spec is None)
            info.error = (
                f"implements unknown hook(s) {', '.join(hooks) or '?'} (a misspelt hook name?)"
            )
            pm.unregister(exc.plugin)
            info.registered_as = None


@dataclass(frozen=True)
class Provided:
    """An implementation class and the plugin that registered it."""

    cls: type[Component]
    provider: str


class Catalogue:
    """``kind -> name -> implementation``, built once from the registration hooks."""

    def __init__(self, entries: dict[str, dict[str, Provided]], failures: list[PluginInfo]):
        self._entries = entries
        self.failures = failures

    @classmethod
    def from_plugin_manager(cls, pm: pluggy.PluginManager, infos: list[PluginInfo]) -> Catalogue:
        """Call every registration hook once. A plugin whose hook raises, returns anything
        but a list of classes of the hook's kind (with a ``name``, and for trainable score
        models the training contract, :func:`trainable_problem`), or names an
        implementation that is already taken (a built-in wins) is reported on its
        :class:`PluginInfo`, unregistered and skipped as a whole; the rest load."""
        by_registered = {i.registered_as: i for i in infos if i.registered_as}
        offered: dict[str, list[tuple[str, type]]] = {}  # provider -> [(kind, class)]
        failed: dict[str, str] = {}
        for kind, hook_name in REGISTRATION_HOOKS.items():
            for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls()):
                provider = impl.plugin_name
                if provider in failed:
                    continue
                try:
                    result = impl.function()
                except Exception as exc:  # registration failure: report, keep going
                    failed[provider] = f"{hook_name} failed: {_describe(exc)}"
                    continue
                problem = _registration_problem(result, kind, hook_name)
                if problem:
                    failed[provider] = problem
                    continue
                offered.setdefault(provider, []).extend((kind, c) for c in result or ())
        # built-ins first, then the others in load order: the first to claim a name keeps it
        order = sorted(offered, key=lambda p: not getattr(by_registered.get(p), "builtin", False))
        entries: dict[str, dict[str, Provided]] = {k: {} for k in REGISTRATION_HOOKS}
        for provider in order:
            if provider in failed:
                continue
            clash = None
            seen: set[tuple[str, str]] = set()
            for kind, c in offered[provider]:
                other = entries[kind].get(c.name)
                if other is not None or (kind, c.name) in seen:
                    by = f"plugin {other.provider!r}" if other else "the same plugin"
                    clash = (
                        f"its {kind} {c.name!r} ({c.__module__}.{c.__qualname__}) clashes "
                        f"with {kind} {c.name!r} from {by}; rename it"
                    )
                    break
                seen.add((kind, c.name))
            if clash:
                failed[provider] = clash
                continue
            for kind, c in offered[provider]:
                entries[kind][c.name] = Provided(c, provider)
        for provider, problem in failed.items():
            info = by_registered.get(provider)
            if info is None:
                raise PluginError(f"plugin {provider!r}: {problem}")
            info.error = f"skipped: {problem}"
            plugin = pm.get_plugin(provider)
            if plugin is not None:  # its other hooks (observers, commands) are off too
                pm.unregister(plugin)
            info.hooks = []
        return cls(entries, [i for i in infos if not i.ok])

    def kinds(self) -> list[str]:
        return list(self._entries)

    def names(self, kind: str) -> list[str]:
        return sorted(self._entries.get(kind, {}))

    def has(self, kind: str, name: str) -> bool:
        return name in self._entries.get(kind, {})

    def provided(self, kind: str, name: str) -> Provided:
        try:
            return self._entries[kind][name]
        except KeyError:
            raise UnknownComponentError(self.unknown_message(kind, name)) from None

    def get(self, kind: str, name: str) -> type[Component]:
        """The class implementing ``name`` of ``kind``; a clear error listing choices."""
        return self.provided(kind, name).cls

    def unknown_message(self, kind: str, name: str) -> str:
        from diffuse_engine.core.suggest import did_you_mean

        hint = did_you_mean(name, self.names(kind))
        msg = f"unknown {kind} {name!r}{hint}; choices: {', '.join(self.names(kind)) or '(none)'}"
        if self.failures:
            broken = ", ".join(f"{f.name} ({f.error})" for f in self.failures)
            return msg + f"; note: plugins failed to load: {broken}"
        return msg + " (is a plugin missing? `diffuse plugins` lists what is installed)"


def _registration_problem(result: Any, kind: str, hook_name: str) -> str | None:
    """What is wrong with what a registration hook returned, or ``None``."""
    if result is None:
        return None
    if not isinstance(result, (list, tuple)):
        return f"{hook_name} returned {_short(result)}; it must return a list of {kind} classes"
    for c in result:
        if not isinstance(c, type):
            return f"{hook_name} returned {_short(c)} in its list; it must hold {kind} classes"
        if getattr(c, "kind", None) != kind or not isinstance(getattr(c, "name", None), str):
            return (
                f"{hook_name} returned {c.__module__}.{c.__qualname__}: it must be a class "
                f"with kind {kind!r} and a non-empty name"
            )
        if not c.name:
            return f"{hook_name} returned {c.__qualname__} with an empty name"
        if kind == "score" and getattr(c, "needs_training", False):
            problem = trainable_problem(c)
            if problem:
                return f"{hook_name}: trainable score model {c.name!r} {problem}"
    return None


#: what training calls on a trainable score model (see docs/plugins.md)
TRAINABLE_METHODS = ("parameters", "to", "train", "eval", "with_net")


def trainable_problem(cls: type) -> str | None:
    """Why ``cls`` (``needs_training = True``) cannot be trained, or ``None``: it needs
    :data:`TRAINABLE_METHODS` and a ``to(device=None, dtype=None)`` that takes ``dtype``
    (sampling in another dtype). What only an instance shows (a ``torch.nn.Module``
    backbone ``net`` and ``data_shape`` equal to the data's) is checked when training
    builds it, before the first step (:mod:`diffuse_engine.training.preflight`)."""
    import inspect

    missing = [m for m in TRAINABLE_METHODS if not callable(getattr(cls, m, None))]
    if missing:
        return f"lacks {', '.join(missing)} (training needs {', '.join(TRAINABLE_METHODS)})"
    try:
        params = inspect.signature(cls.to).parameters
    except (TypeError, ValueError):
        params = {}
    takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in params.values())
    if params and "dtype" not in params and not takes_kwargs:
        return "has to() without a dtype= argument (it must accept to(device=None, dtype=None))"
    return None


def _short(obj: Any) -> str:
    text = repr(obj)
    return f"{type(obj).__name__} {text[:60]}" if len(text) <= 60 else f"a {type(obj).__name__}"


def module_plugin(**hooks: Any) -> ModuleType:
    """Build a throwaway plugin module from hook functions (handy in tests and apps)."""
    mod = ModuleType("plugin_" + "_".join(sorted(hooks))[:40])
    for k, fn in hooks.items():
        setattr(mod, k, hookspecs.hookimpl(fn))
    return mod
