"""Registry text: TOML files and ``--set KEY=VALUE`` assignments read safely (UTF-8,
regular files only, bounded nesting), and pydantic errors turned into one line naming
the field, what was given and what is allowed."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from diffuse_engine.core.errors import RegistryError
from diffuse_engine.core.suggest import did_you_mean

#: deepest nesting of arrays / tables a registry value may have (real configs use 2)
MAX_DEPTH = 16


#: the ``--set`` value that unsets a field (TOML has no null): ``--set sigma_end=null``
NULL = "null"
#: first characters of a ``--set`` value that is meant as TOML, never as a bare string
STRUCTURED = ("[", "{", '"', "'")


def parse_value(text: str) -> Any:
    """Parse a ``--set`` value as a TOML value (``0.2``, ``true``, ``[1, 2]``, ``"x"``);
    a bare ``null`` is ``None`` (the field unset, for fields that allow it; ``"null"``
    in quotes is the string); anything else that is not valid TOML is taken as a bare
    string, unless it opens an array, a table or a quoted string: ``[1, null]`` or
    ``[1, 2`` taken as text would reach the field as a string it never meant."""
    if text == NULL:
        return None
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as exc:
        if text.lstrip()[:1] in STRUCTURED:
            why = re.sub(r" \(at [^)]*\)$", "", str(exc))  # its columns count "v = "
            if NULL in text:
                why += " (null is a value only on its own: TOML arrays have none)"
            raise RegistryError(
                f"--set value {text[:60]!r} is not a TOML value: {why}; "
                'e.g. [1, 2], {a = 1}, "text"'
            ) from None
        return text
    except RecursionError:
        raise RegistryError(
            f"--set value {text[:40]!r}...: nested deeper than {MAX_DEPTH} levels"
        ) from None
    check_depth(value, f"--set value {text[:40]!r}")
    return value


def check_depth(value: Any, where: str, limit: int = MAX_DEPTH) -> None:
    """Refuse arrays / tables nested deeper than ``limit`` (checked without recursion)."""
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth >= limit:
                raise RegistryError(f"{where}: nested deeper than {limit} levels")
            stack.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v))


def parse_assignment(item: str) -> tuple[str, Any]:
    """Split ``KEY=VALUE`` into the key and the parsed value."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RegistryError(
            f"--set {item!r}: expected KEY=VALUE, e.g. steps=100 or sde.vp.beta_max=10"
        )
    return key, parse_value(value.strip())


def format_validation_error(where: str, exc: ValidationError, model: type[BaseModel]) -> str:
    """One line naming each invalid field, what was given and what is allowed."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(entry)"
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(sorted(model.model_fields)) or "(none)"
            hint = did_you_mean(str(err["loc"][-1]), model.model_fields)
            parts.append(f"{loc}: unknown field{hint}; allowed: {allowed}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            given = err.get("input")
            shown = "" if isinstance(given, dict) else f" (got {given!r})"
            if err["type"] == "literal_error":  # one of fixed names: the closest ones
                expected = re.findall(r"'([^']*)'", str(err.get("ctx", {}).get("expected", "")))
                shown += did_you_mean(given, expected)
            parts.append(f"{loc}: {msg}{shown}")
    return f"{where} " + "; ".join(parts)


def read_toml(path: str | Path) -> dict:
    """Read a registry file; a missing file or TOML syntax error is a RegistryError."""
    p = Path(path)
    try:
        if p.exists() and not p.is_file():  # a FIFO or device would block the read
            raise RegistryError(f"{path}: not a regular file; give a registry .toml file")
        raw = p.read_bytes()
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read registry file ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RegistryError(
            f"{path}: not UTF-8 text (byte {raw[exc.start]:#04x} at line {line}); TOML "
            "files are UTF-8"
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RegistryError(f"{path}: invalid TOML: {exc}") from None
    except RecursionError:
        raise RegistryError(f"{path}: arrays or tables nested too deeply") from None
    for kind, table in data.items():  # each value, named where it is
        for name, fields in table.items() if isinstance(table, dict) else ():
            for key, value in fields.items() if isinstance(fields, dict) else ():
                check_depth(value, f"{path}: [{kind}.{name}] {key}")
    check_depth(data, str(path), MAX_DEPTH + 3)  # anything else: + the [KIND.NAME] levels
    return data
