"""The README's code runs as written: every name its Python blocks use is defined (fast,
by the symbol tables), and, under ``-m slow``, the blocks run in order."""

from __future__ import annotations

import builtins
import re
import symtable
import sys
import types
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _undefined(table: symtable.SymbolTable, module_names: set[str]) -> set[str]:
    missing = set()
    for sym in table.get_symbols():
        if sym.is_referenced() and sym.is_global() and sym.get_name() not in module_names:
            missing.add(sym.get_name())
    for child in table.get_children():
        missing |= _undefined(child, module_names)
    return missing


def test_readme_python_uses_no_undefined_name():
    known = set(dir(builtins))
    for i, block in enumerate(python_blocks()):
        table = symtable.symtable(block, f"README block {i}", "exec")
        defined = {s.get_name() for s in table.get_symbols() if s.is_assigned() or s.is_imported()}
        missing = _undefined(table, defined | known)
        assert not missing, f"README python block {i} uses undefined {sorted(missing)}"
        known |= defined


@pytest.mark.slow  # the README samples 4096 points with 500 PC steps: about a minute on a CPU
def test_readme_python_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for i, block in enumerate(python_blocks()):
        if block.lstrip().startswith("# my_sdes.py"):  # a plugin module of its own
            mod = types.ModuleType("my_sdes")
            exec(compile(block, "my_sdes.py", "exec"), mod.__dict__)  # noqa: S102
            monkeypatch.setitem(sys.modules, "my_sdes", mod)
            continue
        if '"diffusers"' in block:  # needs a local diffusers model folder
            continue
        exec(compile(block, f"README block {i}", "exec"), ns)  # noqa: S102


def test_relative_links_in_the_docs_point_at_files():
    """Every relative link of README.md and docs/*.md names a file that exists (the
    layered core moved modules; links to their old places were left behind once)."""
    root = README.parent
    broken = []
    for page in [README, *sorted((root / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(root)}: {target}")
    assert not broken, "broken relative links: " + ", ".join(broken)
