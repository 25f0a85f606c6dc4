"""``diffuse plugins``: what is installed, from where, and what failed."""

from __future__ import annotations

import typer

from diffuse_engine.cli.common import console, handle_errors, make_engine, print_table


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def plugins(
        verbose: bool = typer.Option(
            False, "--verbose", "-v", help="also list hooks and config schemas"
        ),
    ):
        """List plugins (distribution, version, status) and the implementations they add."""
        from diffuse_engine.core.plugins import REGISTRATION_HOOKS

        engine = make_engine()
        rows = []
        for info in engine.plugin_infos:
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
            for name in engine.catalogue.names(kind):
                p = engine.catalogue.provided(kind, name)
                impl_rows.append(
                    (kind, name, p.provider, (p.cls.__doc__ or "").strip().split("\n")[0])
                )
        print_table("implementations", impl_rows, ["kind", "name", "plugin", "description"])
        if verbose:  # each implementation's config schema, as the registry validates it
            from diffuse_engine.core.introspect import config_rows

            infos = {
                i.name
                if i.builtin or i.distribution.startswith("(")
                else f"{i.distribution}:{i.name}": i
                for i in engine.plugin_infos
            }
            for kind in REGISTRATION_HOOKS:
                for name in engine.catalogue.names(kind):
                    p = engine.catalogue.provided(kind, name)
                    info = infos.get(p.provider)
                    origin = f"{info.distribution} {info.version}".strip() if info else p.provider
                    rows = config_rows(p.cls.Config, engine.catalogue)
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
        if any(not i.ok for i in engine.plugin_infos):
            raise typer.Exit(1)
