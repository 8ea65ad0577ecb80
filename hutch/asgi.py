"""The one ASGI app `hutch serve` runs: data-plane traffic to the gateway, `/mcp` to hutch's own
MCP server (`hutch.mcp.endpoint`), the rest to the API. Requests on the preview listener
(`[preview] port`) are host-named sandbox traffic only.

It also owns the ASGI lifespan: the server answers requests only once `Hutch.start` has
finished (so `GET /health` answering 200 means ready), and `Hutch.stop` runs on shutdown. The
gateway and the API are made then, from what `Hutch.start` returns (`hutch.server.Started`),
each with exactly the collaborators it uses (`hutch.gateway.types.DataPlane`,
`hutch.api.deps.ControlPlane`).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass

from hutch.api.app import create_app
from hutch.api.deps import ControlPlane
from hutch.gateway.app import Gateway
from hutch.gateway.types import DataPlane, Receive, Scope, Send
from hutch.lifespan import run_lifespan
from hutch.mcp.endpoint import McpEndpoint
from hutch.server import Hutch, Started

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Planes:
    """The apps that serve requests, made once the server has started, each with the
    collaborators it uses."""

    gateway: Gateway
    api: Callable[[Scope, Receive, Send], Awaitable[None]]  # the control plane's FastAPI app


class HutchApp:
    def __init__(self, hutch: Hutch) -> None:
        self.hutch = hutch
        self.mcp = McpEndpoint(hutch.tenants, self)
        self.preview_port = hutch.config.preview.port
        self._planes: _Planes | None = None  # set by the lifespan's startup, before any request
        self._running = AsyncExitStack()

    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        planes = self._planes
        if planes is None:
            await _not_started(scope, send)
        elif self.preview_port and (scope.get("server") or (None, None))[1] == self.preview_port:
            await planes.gateway.preview(scope, receive, send)
        elif planes.gateway.claims(scope):
            await planes.gateway(scope, receive, send)
        elif self.mcp.claims(scope):
            await self.mcp(scope, receive, send)
        else:
            await planes.api(scope, receive, send)

    async def _lifespan(self, receive, send) -> None:
        await run_lifespan(receive, send, self._start, self._stop, "hutch")

    async def _start(self) -> None:
        started = await self.hutch.start()
        self._planes = self._make_planes(started)
        self._planes.gateway.start()
        await self._running.enter_async_context(self.mcp.run())
        if self.hutch.bootstrap_key:
            sys.stderr.write(
                "\nhutch: created the default tenant. Its API key (shown once, store it):\n"
                f"    {self.hutch.bootstrap_key}\n\n"
            )
            sys.stderr.flush()

    def _make_planes(self, started: Started) -> _Planes:
        """The gateway and the API, each handed what it uses of the started server."""
        hutch = self.hutch
        scheduler = started.scheduler
        data = DataPlane(hutch.config, started.sessions, hutch.tenants, hutch.metadb, hutch.metrics)
        control = ControlPlane(
            config=hutch.config,
            metadb=hutch.metadb,
            tenants=hutch.tenants,
            sessions=started.sessions,
            metrics=hutch.metrics,
            secret=hutch.secret,
            templates=started.templates,
            warm_pools=scheduler.pool_sizes if scheduler is not None else dict,
        )
        return _Planes(Gateway(data), create_app(control))

    async def _stop(self) -> None:
        await self._running.aclose()
        if self._planes is not None:
            self._planes.gateway.close()
        await self.hutch.stop()


async def _not_started(scope, send) -> None:
    """A request before the server has started (only a listener without the lifespan can send one)."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1013})
        return
    body = json.dumps({"code": "unavailable", "message": "hutch is starting"}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})
