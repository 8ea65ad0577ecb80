"""`hutch`: run a sandbox platform, and talk to one.

Commands stay thin: parse, call the component, render (rich tables, or `--json`). The client
commands (`function`, `session`, `tenant`, `key`, `usage`) talk to the server at `HUTCH_URL` with
`HUTCH_API_KEY` (`hutch/cli/remote.py`); so does `mcp`, which serves hutch's sandbox tools over MCP
on stdio (`hutch/cli/mcp.py`).
"""

from __future__ import annotations

import typer

from hutch import __version__
from hutch.cli import functions, sandbox, sessions, templates, tenants, usage
from hutch.cli.cleanup import cleanup
from hutch.cli.mcp import mcp
from hutch.cli.selftest import selftest
from hutch.cli.serve import gateway, node, serve

app = typer.Typer(no_args_is_help=True, add_completion=False, help="hutch: sandboxes for AI agents.")
app.add_typer(sandbox.app, name="sandbox")
app.add_typer(functions.app, name="function")
app.add_typer(templates.app, name="template")
app.add_typer(sessions.app, name="session")
app.add_typer(tenants.app, name="tenant")
app.add_typer(tenants.keys, name="key")
app.add_typer(usage.app, name="usage")
app.command()(serve)
app.command()(gateway)
app.command()(node)
app.command()(mcp)
app.command()(selftest)
app.command()(cleanup)


@app.command()
def version() -> None:
    """Print hutch's version."""
    typer.echo(__version__)


def main() -> None:
    app()
