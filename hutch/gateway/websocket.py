"""WebSocket pass-through: an ASGI WebSocket on the client side, a WebSocket client to the instance.

The upstream handshake goes over the instance's agent socket with `E2b-Sandbox-Port: <port>`, so
the agent splices the connection to the user server, which answers the upgrade itself. The
client's subprotocols, cookies, origin and other end-to-end headers are offered upstream; the
subprotocol the user server picks is the one accepted. Messages are relayed both ways as they
come, text as text and binary as binary, and a close on either side closes the other with the
same code. An upstream refusal (its status and body) is answered to the client as such, where
the ASGI server supports the `websocket.http.response` extension; otherwise the upgrade is
refused (403).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from websockets.asyncio.client import ClientConnection, connect, unix_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from hutch.errors import HutchError
from hutch.gateway import headers as hop
from hutch.gateway.types import Receive, Scope, Send, Target
from hutch.gateway.upstream import Misdirected, UpstreamError

log = logging.getLogger(__name__)

OPEN_TIMEOUT_S = 30.0
MAX_MESSAGE = 64 * 1024 * 1024  # from the instance; what the client may send is the ASGI server's limit
NO_STATUS_CODES = (1005, 1006, 1015)  # reported by a close, never sent in one


async def _refuse(scope: Scope, send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    if "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})


async def refuse_with_error(
    scope: Scope,
    send: Send,
    exc: HutchError,
    body: dict[str, Any],
    status: int | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """The gateway's error answer to an upgrade request, before any accept (`status`, `headers`:
    other than the error's own status; more headers)."""
    data = json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), *(headers or [])]
    await _refuse(scope, send, status or exc.http_status, head, data)


async def proxy_websocket(target: Target, scope: Scope, receive: Receive, send: Send) -> None:
    """Relay one WebSocket between the client and the instance until either side closes.

    Raises:
        UpstreamError: the instance could not be reached (nothing was sent to the client yet).
    """
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    forwarded = hop.websocket_headers(scope["headers"], target.drop) + target.add
    options: dict[str, Any] = dict(
        additional_headers=[(n.decode("latin-1"), v.decode("latin-1")) for n, v in forwarded],
        subprotocols=scope.get("subprotocols") or None,
        compression=None,  # each leg negotiates its own; no need to inflate and deflate twice
        max_size=MAX_MESSAGE,
        ping_interval=None,  # a busy user server is not a dead one; the agent socket is local
        open_timeout=OPEN_TIMEOUT_S,
        user_agent_header=None,
        proxy=None,
    )
    path = target.path.decode("latin-1")
    try:
        if isinstance(target.address, tuple):  # a cluster's node, which relays to the instance
            host, port = target.address
            upstream = await connect(f"ws://{host}:{port}{path}", **options)
        else:
            upstream = await unix_connect(str(target.address), uri="ws://localhost" + path, **options)
    except InvalidStatus as exc:
        response = exc.response
        if response.status_code == 421 and response.headers.get("x-hutch-misdirected"):
            raise Misdirected("the node does not hold this session") from None
        passed = [
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in response.headers.raw_items()
            if name.lower().encode("latin-1") not in hop.RESPONSE_SKIP and name.lower() != "content-length"
        ]
        await _refuse(scope, send, response.status_code, passed, bytes(response.body or b""))
        return
    except (OSError, InvalidHandshake, TimeoutError) as exc:
        raise UpstreamError(f"the instance did not accept the WebSocket ({exc})") from None

    await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol, "headers": list(target.answer)})
    to_upstream = asyncio.create_task(_client_to_upstream(receive, upstream))
    to_client = asyncio.create_task(_upstream_to_client(upstream, send))
    try:
        await asyncio.wait((to_upstream, to_client), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (to_upstream, to_client):
            task.cancel()
        for task in (to_upstream, to_client):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await upstream.close()


async def _client_to_upstream(receive: Receive, upstream: ClientConnection) -> None:
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "websocket.receive":
            data = message.get("bytes")
            try:
                await upstream.send(data if data is not None else message.get("text") or "")
            except ConnectionClosed:
                return
        elif kind == "websocket.disconnect":
            code = message.get("code", 1000)
            await upstream.close(code=1000 if code in NO_STATUS_CODES else code, reason=message.get("reason") or "")
            return


async def _upstream_to_client(upstream: ClientConnection, send: Send) -> None:
    try:
        async for data in upstream:
            if isinstance(data, str):
                await send({"type": "websocket.send", "text": data})
            else:
                await send({"type": "websocket.send", "bytes": data})
    except ConnectionClosed:
        pass
    code = upstream.close_code or 1006
    reason = upstream.close_reason or ""
    if code == 1006:
        code, reason = 1011, "the instance closed the connection"
    with contextlib.suppress(Exception):  # the client may be gone already
        await send({"type": "websocket.close", "code": 1000 if code in NO_STATUS_CODES else code, "reason": reason})
