"""``diffuse registry show|check``: print the merged registry, validate a file."""

from __future__ import annotations

from pathlib import Path

import tomli_w
import typer

from diffuse_engine.cli.common import RegistryOpt, SetOpt, console, handle_errors, make_engine


def register(app: typer.Typer) -> None:
    registry_app = typer.Typer(
        help="Show the merged registry or check a registry file.", no_args_is_help=True
    )
    app.add_typer(registry_app, name="registry")

    @registry_app.command("show")
    @handle_errors
    def show(registry: list[Path] | None = RegistryOpt, set_: list[str] | None = SetOpt):
        """Print the default registry merged with --registry files and --set values."""
        engine = make_engine(registry, set_)
        console.print(
            tomli_w.dumps(_without_unset(engine.registry.as_dict())), markup=False, highlight=False
        )

    @registry_app.command("check")
    @handle_errors
    def check(file: Path = typer.Argument(..., help="registry file to validate")):
        """Validate FILE merged over the default registry; exit 2 with the first error."""
        engine = make_engine([file])
        n = sum(len(t) for t in engine.registry.entries.values())
        console.print(
            f"{file}: ok ({n} entries after merging with the default)",
            markup=False,
            highlight=False,
        )


def _without_unset(value):
    """The registry with fields unset by ``--set FIELD=null`` left out: TOML has no
    null, and an absent field is what an unset one means in a registry file."""
    if isinstance(value, dict):
        return {k: _without_unset(v) for k, v in value.items() if v is not None}
    return value
