""" "Did you mean ...?" for every unknown name: the closest choices by
:func:`difflib.get_close_matches` (Ratcliff-Obershelp similarity), as a message clause."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def close_matches(name: object, choices: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` of ``choices`` closest to ``name`` (case-insensitive), best first."""
    if not isinstance(name, str) or not name:
        return []
    choices = sorted(set(choices))
    lowered = {c.lower(): c for c in choices}
    found = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.6)
    return [lowered[f] for f in found]


def did_you_mean(name: object, choices: Iterable[str]) -> str:
    """``" (did you mean 'mlp'?)"`` (or ``'a' or 'b'``), or ``""`` when nothing is close."""
    found = close_matches(name, choices)
    if not found:
        return ""
    return " (did you mean " + " or ".join(repr(f) for f in found) + "?)"
