"""Errors the engine raises for problems a user can fix.

Every :class:`DiffuseError` carries a one-line message that names what was wrong and
what is allowed; the CLI prints it alone (no traceback unless ``--debug``) and exits
with status 2. Anything else escaping the engine is a bug.
"""

from __future__ import annotations


class DiffuseError(Exception):
    """Base class: a user-fixable problem with a one-line explanation."""

    exit_code = 2

    def __str__(self) -> str:
        # messages quote user input (table names, values); keep them on one line
        text = super().__str__()
        if text.isprintable():
            return text
        return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class RegistryError(DiffuseError):
    """A registry file, table or field is invalid (message names file, table, field)."""


class UnknownComponentError(DiffuseError):
    """A name that no installed plugin provides (message lists the choices)."""


class PluginError(DiffuseError):
    """Plugins conflict or break the contract (message names the providers)."""


class IncompatibleError(DiffuseError):
    """Two components that cannot work together (e.g. a solver and an SDE)."""


class OutputExistsError(DiffuseError):
    """An output path exists and ``--overwrite`` was not given."""


class NumericalError(DiffuseError):
    """NaN or Inf appeared in a computation (message names where)."""
