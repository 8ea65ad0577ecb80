"""`hutch mcp`: hutch's sandbox tools as an MCP server over stdio.

For agents that start their tools as subprocesses (desktop and IDE agents, the SDKs' stdio
clients). It acts as the tenant of `HUTCH_API_KEY` on the server at `HUTCH_URL` (default
http://127.0.0.1:3000), through its HTTP API; stdout carries MCP and nothing else, logs go to
stderr. The tools are `hutch.mcp.server`'s, the same as `hutch serve` offers at `/mcp`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import typer

from hutch.client import DEFAULT_URL


def mcp(
    url: str = typer.Option(None, "--url", help="The hutch server [default: $HUTCH_URL or http://127.0.0.1:3000]."),
) -> None:
    """Serve hutch's sandbox tools over MCP on stdio (as the tenant of HUTCH_API_KEY)."""
    import anyio
    import httpx

    from hutch.mcp.sandboxes import Sandboxes
    from hutch.mcp.server import build_server

    base = (url or os.environ.get("HUTCH_URL") or DEFAULT_URL).rstrip("/")
    key = os.environ.get("HUTCH_API_KEY")
    if not key:
        typer.echo("error: set HUTCH_API_KEY to the API key the tools act with", err=True)
        raise typer.Exit(1)

    async def main() -> None:
        # No read timeout of its own: each tool bounds its calls (commands and code have timeouts).
        timeout = httpx.Timeout(60, read=None)
        async with httpx.AsyncClient(base_url=base, headers={"X-API-Key": key}, timeout=timeout) as http:
            sandboxes = Sandboxes(http)

            @asynccontextmanager
            async def as_key(_ctx: object) -> AsyncIterator[Sandboxes]:
                yield sandboxes

            await build_server(as_key).run_stdio_async()

    anyio.run(main)
