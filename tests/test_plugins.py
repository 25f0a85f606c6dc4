"""The plugin system: discovery, direct registration, failures and clashes."""

from __future__ import annotations

import pytest
import torch

from diffuse_engine import SDE, Engine, UnknownComponentError, hookimpl, module_plugin
from diffuse_engine.core.plugins import ENTRY_POINT_GROUP


class OU(SDE):
    """dx = -x dt + sqrt(2) dw."""

    name = "ou"

    def drift_coeff(self, t):
        return -torch.ones_like(t)

    def diffusion(self, t):
        return torch.full_like(t, 2**0.5)

    def marginal(self, t):
        a = torch.exp(-t)
        return a, (1 - a**2).sqrt()


class OUPlugin:
    @hookimpl
    def diffuse_register_sdes(self):
        return [OU]


def test_builtins_are_entry_points_of_our_distribution(engine):
    infos = {i.name: i for i in engine.plugin_infos}
    assert ENTRY_POINT_GROUP == "diffuse_engine.plugins"
    for name in ("vp", "ve", "subvp", "ddpm", "gmm", "pc", "ode", "predictors", "correctors"):
        assert infos[name].builtin and infos[name].ok
        assert infos[name].entry_point.startswith("diffuse_plugins.")


def test_core_never_imports_builtins_by_name():
    import pathlib
    import re

    import diffuse_engine

    root = pathlib.Path(diffuse_engine.__file__).parent
    offenders = [
        p
        for p in root.rglob("*.py")
        if re.search(r"^\s*(from|import)\s+diffuse_plugins", p.read_text(), re.M)
    ]
    assert offenders == []


def test_plugin_passed_directly_is_usable_end_to_end():
    e = Engine(plugins=[OUPlugin()], autoload=False)
    assert "ou" in e.catalogue.names("sde")
    x = e.sample(score="gmm", sde="ou", solver="pc", shape=256, seed=0, steps=50)
    assert x.shape == (256, 2) and torch.isfinite(x).all()


def test_a_plugin_clashing_with_a_built_in_name_is_reported_and_skipped():
    class Other(OU):
        """Another OU."""

    Other.name = "vp"
    e = Engine(plugins=[module_plugin(diffuse_register_sdes=lambda: [Other])], autoload=False)
    (info,) = [i for i in e.plugin_infos if not i.ok]
    assert "its sde 'vp' (" in info.error and "Other) clashes with sde 'vp' from plugin 'vp'" in (
        info.error
    )
    assert e.catalogue.get("sde", "vp").__qualname__ == "VPSDE"  # the built-in keeps it


def test_broken_registration_is_reported_and_the_rest_loads():
    def boom():
        raise RuntimeError("kaboom")

    bad = module_plugin(diffuse_register_sdes=boom)
    e = Engine(plugins=[bad], autoload=False)
    failed = [i for i in e.plugin_infos if not i.ok]
    assert len(failed) == 1 and "kaboom" in failed[0].error
    assert "vp" in e.catalogue.names("sde")
    with pytest.raises(UnknownComponentError, match="plugins failed to load: .*kaboom"):
        e.catalogue.get("sde", "mine")


def test_unknown_hook_name_is_an_error():
    class Typo:
        @hookimpl
        def diffuse_register_sde(self):  # missing "s"
            return []

    e = Engine(plugins=[Typo()], autoload=False)
    (info,) = [i for i in e.plugin_infos if not i.ok]
    assert "unknown hook(s) diffuse_register_sde " in info.error
    assert "vp" in e.catalogue.names("sde")


def test_wrong_kind_from_registration_hook_is_an_error():
    e = Engine(plugins=[module_plugin(diffuse_register_solvers=lambda: [OU])], autoload=False)
    (info,) = [i for i in e.plugin_infos if not i.ok]
    assert "must be a class with kind 'solver'" in info.error
    assert "ou" not in e.catalogue.names("sde") and "pc" in e.catalogue.names("solver")


def test_broken_entry_point_is_reported(monkeypatch):
    from importlib import metadata

    import diffuse_engine.core.plugins as plugins_mod

    real = metadata.entry_points

    class FakeDist:
        metadata = {"Name": "broken-dist"}
        version = "9.9"

    def fake_entry_points(group=None):
        eps = list(real(group=group))
        bad = metadata.EntryPoint("broken", "no_such_module_xyz", group)
        object.__setattr__(bad, "dist", FakeDist())
        return eps + [bad]

    monkeypatch.setattr(plugins_mod.metadata, "entry_points", fake_entry_points)
    e = Engine()
    info = next(i for i in e.plugin_infos if i.name == "broken")
    assert info.distribution == "broken-dist" and info.version == "9.9"
    assert "ModuleNotFoundError" in info.error
    assert "vp" in e.catalogue.names("sde")
    monkeypatch.setenv("DIFFUSE_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert all(i.name != "broken" for i in Engine().plugin_infos)


def test_engines_do_not_share_state():
    a = Engine(plugins=[OUPlugin()], autoload=False)
    b = Engine(autoload=False)
    assert "ou" in a.catalogue.names("sde") and "ou" not in b.catalogue.names("sde")


def test_every_hookspec_is_documented():
    from diffuse_engine import hookspecs

    names = [n for n in dir(hookspecs) if n.startswith("diffuse_")]
    assert len(names) >= 10
    for n in names:
        assert (getattr(hookspecs, n).__doc__ or "").strip(), n


def test_sampling_step_observer_called_only_when_implemented():
    calls = []
    obs = module_plugin(diffuse_sampling_step=lambda step, total, t: calls.append((step, t)))
    e = Engine(plugins=[obs], autoload=False)
    e.sample(score="gmm", shape=4, steps=5, corrector="none")
    assert [c[0] for c in calls] == [1, 2, 3, 4, 5]
    assert not Engine(autoload=False).has_observers("diffuse_sampling_step")
