"""The MCP endpoint of `hutch serve`: hutch's sandbox tools over Streamable HTTP at `/mcp`.

- Who: the caller's API key (`X-API-Key`, or `Authorization: Bearer <key>`), checked before the
  MCP SDK sees the request; without a valid one the answer is 401 with a JSON-RPC error body
  (this module is that wire's error boundary; tool errors are `hutch.mcp.server`'s). The tools
  act as that tenant: they call hutch's own API and gateway in-process (a streaming httpx ASGI
  transport to the whole app, `hutch.mcp.transport`) with the same key, so what a key may do is
  decided where it always is.
- Stateless: every request stands alone and no `Mcp-Session-Id` is issued; the tools carry
  sandbox ids instead. Clients of every era work: 2026-07-28 ones (`server/discover`) and
  session-era ones (`initialize`).
- The SDK's session manager needs a running task group: `run()` is entered in hutch's lifespan
  (`hutch.asgi`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import httpx
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings

from hutch.api.auth import api_key_of
from hutch.errors import HutchError
from hutch.gateway.types import Receive, Scope, Send
from hutch.mcp.sandboxes import Sandboxes
from hutch.mcp.server import build_server
from hutch.mcp.transport import StreamingASGITransport

if TYPE_CHECKING:
    from hutch.tenants import TenantService

PATH = "/mcp"
LOOPBACK = "http://hutch.internal"


class _Headers:
    """`api_key_of` reads `.get(name)`; ASGI gives a list of byte pairs."""

    def __init__(self, scope: Scope) -> None:
        self._headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._headers.get(name, default)


class McpEndpoint:
    """`/mcp` on `hutch serve`; `app` is the whole ASGI app, which the tools call back into."""

    def __init__(self, tenants: TenantService, app: Any) -> None:
        self.tenants = tenants
        self.app = app
        self.server = build_server(self._sandboxes)
        # The API key authenticates every request; the Host is whatever hutch is reached by.
        self.server.streamable_http_app(
            stateless_http=True, transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False)
        )
        self.manager = self.server.session_manager

    @staticmethod
    def claims(scope: Scope) -> bool:
        return scope["path"] == PATH or scope["path"] == PATH + "/"

    @asynccontextmanager
    async def run(self) -> AsyncIterator[None]:
        async with self.manager.run():
            yield

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008})
            return
        try:
            await self.tenants.authenticate(api_key_of(_Headers(scope)))
        except HutchError as exc:
            error = {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": exc.message}}
            body = json.dumps(error, separators=(",", ":")).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"www-authenticate", b'Bearer realm="hutch"'),
                (b"content-length", str(len(body)).encode()),
            ]
            await send({"type": "http.response.start", "status": exc.http_status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.manager.handle_request(scope, receive, send)

    @asynccontextmanager
    async def _sandboxes(self, ctx: Context) -> AsyncIterator[Sandboxes]:
        key = api_key_of(ctx.headers or {})
        if not key:
            raise ToolError("this request carries no API key")  # authenticated above: only a broken transport
        transport = StreamingASGITransport(self.app)  # answers stream: a tool holds what it keeps
        async with httpx.AsyncClient(transport=transport, base_url=LOOPBACK, headers={"X-API-Key": key}) as http:
            yield Sandboxes(http)
