"""``diffuse example-info``: a command added by a plugin (hook diffuse_register_commands)."""

from __future__ import annotations

import math

import typer


def register_command(app: typer.Typer) -> None:
    @app.command("example-info")
    def example_info(
        theta: float = typer.Option(5.0, min=1e-6, help="OU rate"),
        sigma: float = typer.Option(1.0, min=1e-6, help="OU stationary std"),
    ):
        """Show the example OU SDE's numeric kernel next to its closed form."""
        import torch

        from diffuse_engine import Engine

        sde = Engine().build("sde", "example_ou", theta=theta, sigma=sigma)
        t = torch.tensor([0.01, 0.1, 0.5, 1.0], dtype=torch.float64)
        a, s = sde.marginal(t)
        typer.echo("t      mean_coeff  closed_form  std        closed_form")
        for ti, ai, si in zip(t.tolist(), a.tolist(), s.tolist(), strict=True):
            ca = math.exp(-theta * ti)
            cs = sigma * math.sqrt(1 - ca * ca)
            typer.echo(f"{ti:<6g} {ai:<11.6g} {ca:<12.6g} {si:<10.6g} {cs:.6g}")
