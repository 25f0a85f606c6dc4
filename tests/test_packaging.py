"""A plain ``pip install .`` ships every sub-package and every plugin module."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_subpackage_is_listed_for_setuptools():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "diffuse_engine").rglob("__init__.py")
    }
    assert found - listed == set(), "add these to [tool.setuptools] packages"


def test_every_plugin_module_has_an_entry_point_or_is_a_helper():
    points = set(PYPROJECT["project"]["entry-points"]["diffuse_engine.plugins"].values())
    modules = {f"diffuse_plugins.{p.stem}" for p in (ROOT / "plugins").glob("*.py")}
    helpers = {"diffuse_plugins.__init__", "diffuse_plugins.data_files"}  # no hooks inside
    unregistered = {m for m in modules - points - helpers if "hookimpl" in
                    (ROOT / "plugins" / (m.rpartition(".")[2] + ".py")).read_text()}  # fmt: skip
    assert unregistered == set(), "register these in [project.entry-points]"
