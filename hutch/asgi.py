"""The one ASGI app `hutch serve` runs: data-plane traffic to the gateway, `/mcp` to hutch's own
MCP server (`hutch.mcp.endpoint`), the rest to the API.

It also owns the ASGI lifespan: the server answers requests only once `Hutch.start` has
finished (so `GET /health` answering 200 means ready), and `Hutch.stop` runs on shutdown.
"""

from __future__ import annotations

import logging
import sys
from contextlib import AsyncExitStack

from hutch.api.app import create_app
from hutch.errors import BackendUnavailable, InvalidArgument
from hutch.gateway.app import Gateway
from hutch.mcp.endpoint import McpEndpoint
from hutch.server import Hutch

log = logging.getLogger(__name__)


class HutchApp:
    def __init__(self, hutch: Hutch) -> None:
        self.hutch = hutch
        self.api = create_app(hutch)
        self.gateway = Gateway(hutch)
        self.mcp = McpEndpoint(hutch, self)
        self._running = AsyncExitStack()

    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
        elif self.gateway.claims(scope):
            await self.gateway(scope, receive, send)
        elif self.mcp.claims(scope):
            await self.mcp(scope, receive, send)
        else:
            await self.api(scope, receive, send)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.hutch.start()
                    self.gateway.start()
                    await self._running.enter_async_context(self.mcp.run())
                except Exception as exc:
                    if isinstance(exc, InvalidArgument | BackendUnavailable):  # a setting or the host: said in full
                        log.error("hutch failed to start: %s", exc)
                    else:
                        log.exception("hutch failed to start")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                if self.hutch.bootstrap_key:
                    sys.stderr.write(
                        "\nhutch: created the default tenant. Its API key (shown once, store it):\n"
                        f"    {self.hutch.bootstrap_key}\n\n"
                    )
                    sys.stderr.flush()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await self._running.aclose()
                    self.gateway.close()
                    await self.hutch.stop()
                finally:
                    await send({"type": "lifespan.shutdown.complete"})
                return
