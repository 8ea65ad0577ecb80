"""The one ASGI app `hutch serve` runs: data-plane traffic to the gateway, `/mcp` to hutch's own
MCP server (`hutch.mcp.endpoint`), the rest to the API. Requests on the preview listener
(`[preview] port`) are host-named sandbox traffic only.

It also owns the ASGI lifespan: the server answers requests only once `Hutch.start` has
finished (so `GET /health` answering 200 means ready), and `Hutch.stop` runs on shutdown.
"""

from __future__ import annotations

import logging
import sys
from contextlib import AsyncExitStack

from hutch.api.app import create_app
from hutch.gateway.app import Gateway
from hutch.lifespan import run_lifespan
from hutch.mcp.endpoint import McpEndpoint
from hutch.server import Hutch

log = logging.getLogger(__name__)


class HutchApp:
    def __init__(self, hutch: Hutch) -> None:
        self.hutch = hutch
        self.api = create_app(hutch)
        self.gateway = Gateway(hutch)
        self.mcp = McpEndpoint(hutch, self)
        self.preview_port = hutch.config.preview.port
        self._running = AsyncExitStack()

    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
        elif self.preview_port and (scope.get("server") or (None, None))[1] == self.preview_port:
            await self.gateway.preview(scope, receive, send)
        elif self.gateway.claims(scope):
            await self.gateway(scope, receive, send)
        elif self.mcp.claims(scope):
            await self.mcp(scope, receive, send)
        else:
            await self.api(scope, receive, send)

    async def _lifespan(self, receive, send) -> None:
        await run_lifespan(receive, send, self._start, self._stop, "hutch")

    async def _start(self) -> None:
        await self.hutch.start()
        self.gateway.start()
        await self._running.enter_async_context(self.mcp.run())
        if self.hutch.bootstrap_key:
            sys.stderr.write(
                "\nhutch: created the default tenant. Its API key (shown once, store it):\n"
                f"    {self.hutch.bootstrap_key}\n\n"
            )
            sys.stderr.flush()

    async def _stop(self) -> None:
        await self._running.aclose()
        self.gateway.close()
        await self.hutch.stop()
