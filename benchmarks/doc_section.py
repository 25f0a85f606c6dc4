"""Shared by the benchmark scripts: write a table between two markers in a doc page."""

from __future__ import annotations

from pathlib import Path


def replace_section(doc: Path, begin: str, end: str, body: str) -> None:
    """Put ``body`` between the ``begin`` and ``end`` markers of ``doc``, appending the
    markers when the page (or the section) does not exist yet; the rest is kept."""
    text = doc.read_text() if doc.exists() else ""
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{begin}\n{body}\n{end}{tail}")
