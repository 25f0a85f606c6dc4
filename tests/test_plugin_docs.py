"""docs/plugins.md stays true: generated hook reference in sync, its example runs."""

from __future__ import annotations

import importlib.util
import math
import re
import types
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from diffuse_engine import Engine, hookspecs
from diffuse_engine.cli import build_app
from diffuse_engine.core.introspect import config_rows, type_name

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "plugins.md"


def load_generator():
    spec = importlib.util.spec_from_file_location(
        "gen_hook_docs", ROOT / "scripts" / "gen_hook_docs.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_hook_reference_is_in_sync_with_the_hookspecs():
    gen = load_generator()
    block = gen.current_block(DOC.read_text())
    assert block is not None, "docs/plugins.md lost its hook reference markers"
    assert block == gen.render(), (
        "docs/plugins.md hook reference is stale: run `python scripts/gen_hook_docs.py`"
    )


def test_every_hook_is_documented():
    text = DOC.read_text()
    specs = [n for n, f in vars(hookspecs).items() if hasattr(f, "diffuse_engine_spec")]
    assert len(specs) >= 14
    for name in specs:
        assert f"#### `{name}(" in text, name
        assert (getattr(hookspecs, name).__doc__ or "").strip(), f"{name} has no docstring"


def test_the_ten_minute_plugin_in_the_docs_runs():
    code = next(
        b
        for b in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
        if "class OrnsteinUhlenbeck" in b
    )
    mod = types.ModuleType("my_plugin")
    exec(compile(code, "docs/plugins.md", "exec"), mod.__dict__)
    engine = Engine(plugins=[mod], autoload=False)
    x = engine.sample(score="gmm", sde="my_ou", solver="my_euler", shape=(256, 2), seed=0, steps=50)
    assert x.shape == (256, 2) and torch.isfinite(x).all()
    # its kernel came from f and g alone: the OU closed form
    a, s = engine.build("sde", "my_ou").marginal(torch.tensor([0.3], dtype=torch.float64))
    assert float(a) == pytest.approx(math.exp(-1.5), rel=1e-8)


def test_plugins_verbose_shows_versions_hooks_and_schemas(monkeypatch):
    from diffuse_engine.cli import common

    monkeypatch.setattr(common.console, "width", 250)  # rich fixes its width at creation
    result = CliRunner().invoke(build_app(with_plugin_commands=False), ["plugins", "--verbose"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "register_solvers" in out and "diffuse-engine" in out and "0.1.0" in out
    assert 'solver type = "pc"' in out
    assert "a predictor: ancestral, euler_maruyama" in out  # ComponentRef choices
    assert "uniform | quadratic" in out or 'type = "pc"' in out
    assert "> 0" in out and ">= 1" in out  # bounds


def test_schema_rows_describe_types_defaults_and_choices():
    engine = Engine(autoload=False)
    rows = {
        r[0]: r for r in config_rows(engine.catalogue.get("sde", "cosine").Config, engine.catalogue)
    }
    assert rows["end"][1:4] == ("float", "0.995", "> 0, < 1")
    assert rows["kernel"][1] == "str | None"
    assert "a kernel: numeric" in rows["kernel"][3] and "none" in rows["kernel"][3]
    assert type_name(int) == "int"
