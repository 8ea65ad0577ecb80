"""`hutch`: run a sandbox platform, and talk to one.

Commands stay thin: parse, call the component, render (rich tables, or `--json`).
"""

from __future__ import annotations

import typer

from hutch import __version__
from hutch.cli import sandbox
from hutch.cli.serve import serve

app = typer.Typer(no_args_is_help=True, add_completion=False, help="hutch: sandboxes for AI agents.")
app.add_typer(sandbox.app, name="sandbox")
app.command()(serve)


@app.command()
def version() -> None:
    """Print hutch's version."""
    typer.echo(__version__)


def main() -> None:
    app()
