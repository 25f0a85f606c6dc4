"""``diffuse plugins``: what is installed, from where, and what failed.

It needs only the plugins, not the registry, so it always runs: a plugin that fails to
import, to register, or clashes with a taken name is listed with its error (and exit
status 1) while the rest are shown. Docstrings and formulas print as written (``[f - g^2
s]`` is text, not rich markup).
"""

from __future__ import annotations

import typer

from diffuse_engine.cli.common import console, handle_errors, print_table


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def plugins(
        verbose: bool = typer.Option(
            False, "--verbose", "-v", help="also list hooks and config schemas"
        ),
    ):
        """List plugins (distribution, version, status) and the implementations they add."""

        from diffuse_engine.core.plugins import (
            REGISTRATION_HOOKS,
            Catalogue,
            make_plugin_manager,
        )

        pm, infos = make_plugin_manager()
        catalogue = Catalogue.from_plugin_manager(pm, infos)
        rows = []
        for info in infos:
            status = "ok" if info.ok else f"FAILED: {info.error}"
            rows.append(
                (
                    info.name,
                    info.distribution,
                    info.version,
                    "built-in" if info.builtin else "",
                    status,
                    ", ".join(h.removeprefix("diffuse_") for h in info.hooks) if verbose else "",
                )
            )
        cols = ["plugin", "distribution", "version", "", "status"] + (["hooks"] if verbose else [])
        print_table("plugins", [r[: len(cols)] for r in rows], cols)
        impl_rows = []
        for kind in REGISTRATION_HOOKS:
            for name in catalogue.names(kind):
                p = catalogue.provided(kind, name)
                impl_rows.append(
                    (kind, name, p.provider, (p.cls.__doc__ or "").strip().split("\n")[0])
                )
        print_table("implementations", impl_rows, ["kind", "name", "plugin", "description"])
        if verbose:  # each implementation's config schema, as the registry validates it
            from diffuse_engine.core.introspect import config_rows

            by_provider = {i.registered_as: i for i in infos if i.registered_as}
            for kind in REGISTRATION_HOOKS:
                for name in catalogue.names(kind):
                    p = catalogue.provided(kind, name)
                    info = by_provider.get(p.provider)
                    origin = f"{info.distribution} {info.version}".strip() if info else p.provider
                    rows = config_rows(p.cls.Config, catalogue)
                    title = (
                        f'{kind} type = "{name}": {p.cls.__module__}.'
                        f"{p.cls.__qualname__} (plugin {p.provider}, {origin})"
                    )
                    if rows:
                        print_table(
                            title, rows, ["field", "type", "default", "allowed", "description"]
                        )
                    else:
                        console.print(title + ": no config fields", markup=False, highlight=False)
        if any(not i.ok for i in infos):
            raise typer.Exit(1)
