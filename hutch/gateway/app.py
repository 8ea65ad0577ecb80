"""The gateway: the data plane of `hutch serve`, a pure ASGI app (no middleware on the hot path).

`hutch.asgi.HutchApp` asks `claims(scope)` for every HTTP and WebSocket request and hands over
the claimed ones:
- function invocations, `/functions/{name}/invoke[/{path}]` and
  `/functions/{name}/sessions/{id}[/{path}]` (`hutch.gateway.invoke`; MCP session affinity in
  `hutch.gateway.mcp`, whose bindings of MCP session ids live here);
- E2B in-sandbox traffic: `E2b-Sandbox-Id` + `E2b-Sandbox-Port` headers, or a host
  `{port}-{sandboxId}.{domain}` when `domain` is configured (`hutch.gateway.e2b`).
Everything else belongs to the control plane.

Per request: resolve the target (tenant, function, session, live instance: all in memory on a
hit), count the request as session activity from before it is forwarded until its answer (or
stream, or WebSocket) ends or the client leaves, and proxy it (`proxy`, `websocket`) over a
pooled keep-alive connection to the instance's socket. Its latency, from arrival to the end of
the exchange, goes to a histogram by affinity mode (`hutch.metrics`, about a microsecond).

This module is the gateway's one error boundary: a `HutchError` raised before the answer
started becomes `{"code": "<wire code>", "message"}` with the error's HTTP status, E2B's
`{"code": <status>, "message"}` for E2B traffic, or a JSON-RPC error body for an MCP function's.
Anything unexpected is logged and answered 500 in the same shape: never a traceback on the wire.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from hutch.errors import HutchError, NotFound, Unavailable
from hutch.gateway import e2b, invoke, mcp
from hutch.gateway.proxy import proxy_http
from hutch.gateway.types import DataPlane, Header, Message, Receive, Scope, Send, Target
from hutch.gateway.upstream import MISDIRECTED_HEADER, Misdirected, UpstreamPool
from hutch.gateway.websocket import proxy_websocket, refuse_with_error
from hutch.metadb.records import SessionRecord

if TYPE_CHECKING:
    from hutch.scheduler.interface import Sessions

log = logging.getLogger(__name__)

JSON_HEADERS: list[Header] = [(b"content-type", b"application/json")]


class Gateway:
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.sessions = plane.sessions
        self.domain = plane.config.domain.strip(".").lower()
        self.head_timeout = plane.config.gateway.head_timeout
        self.pool = UpstreamPool()
        self.mcp = mcp.McpBindings()

    def start(self) -> None:
        """Called once the sessions are up: bind again the MCP sessions that survived a restart, and
        drop pooled connections and MCP bindings of sessions that end."""
        self.mcp.restore(self.sessions.active_sessions())
        self.sessions.on_end.append(self._session_ended)
        quiesce = getattr(self.sessions, "on_quiesce", None)  # sessions of this host (not a cluster's gateway)
        if quiesce is not None:
            quiesce.append(self.pool.cut_instance)

    def close(self) -> None:
        self.pool.close()

    def _session_ended(self, session: SessionRecord) -> None:
        self.pool.drop_instance(session.instance_id)
        self.mcp.forget(session.row_id)

    # -- routing -------------------------------------------------------------------------------

    def claims(self, scope: Scope) -> bool:
        """Whether a request is data-plane traffic (cheap: runs for every request hutch serves)."""
        if scope["path"].startswith(invoke.PREFIX) and invoke.parse_path(scope["path"]) is not None:
            return True
        for name, _ in scope["headers"]:
            if name == b"e2b-sandbox-id":
                return True
        if self.domain:
            try:
                return e2b.sandbox_address(scope, self.domain) is not None
            except HutchError:
                return True  # malformed E2B traffic: the gateway says what is wrong
        return False

    async def preview(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A request on the preview listener (`[preview] port`): host-named traffic only."""
        if self.claims(scope):
            await self(scope, receive, send)
            return
        expected = f"{{port}}-{{sandboxId}}.{self.domain}" if self.domain else "nothing (no domain is configured)"
        await self._error(scope, send, NotFound(f"this host names no sandbox: this port serves {expected}"), True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        parsed = invoke.parse_path(scope["path"])
        is_e2b = parsed is None
        replay = _Replay(receive)
        try:
            for attempt in (1, 2):
                if parsed is not None:
                    target = await invoke.resolve(self.plane, scope, parsed, self.mcp)
                else:
                    address = e2b.sandbox_address(scope, self.domain)
                    if address is None:  # claimed by a sibling check; should not happen
                        raise e2b.SandboxNotFound("no sandbox named by this request")
                    target = await e2b.resolve(self.plane, scope, *address)
                try:
                    await self._forward(target, scope, replay, send, started)
                    return
                except Misdirected:
                    # A cluster's node does not hold the session (it moved or ended a moment ago):
                    # the cached route is gone; the request goes again if its body can be replayed.
                    await self.sessions.misdirected(target.session)
                    if attempt == 2 or not replay.rewind():
                        raise Unavailable("the session moved to another node just now; retry") from None
        except HutchError as exc:
            if exc.http_status >= 500 and not isinstance(exc, e2b.SandboxNotFound):
                log.warning("%s %s: %s", scope.get("method", "WS"), scope["path"], exc.message)
            await self._error(scope, send, exc, is_e2b)
        except Exception as exc:
            log.exception("%s %s failed", scope.get("method", "WS"), scope["path"])
            await self._error(scope, send, HutchError(f"internal error: {exc.__class__.__name__}"), is_e2b)

    async def _forward(self, target: Target, scope: Scope, receive: Receive, send: Send, started: float) -> None:
        """Proxy the request to its target. Raises `Misdirected` when the target's node answered
        that it does not hold the session (nothing has reached the client then)."""
        sessions = self.sessions
        row_id = target.session.row_id
        target = self._via_node(target)
        watch = _MisdirectWatch(send) if target.node is not None else None
        sessions.activity.begin(row_id)
        try:
            if scope["type"] == "http":
                await proxy_http(
                    self.pool,
                    target,
                    scope,
                    receive,
                    watch.send if watch is not None else send,
                    head_timeout=self.head_timeout,
                    reroute=self._reroute,
                    ended=lambda target: _has_ended(sessions, target.session),
                )
                if watch is not None and watch.misdirected:
                    raise Misdirected()
            else:
                await proxy_websocket(target, scope, receive, send)
        finally:
            sessions.activity.end(row_id)
            self.plane.metrics.observe_request(target.session.affinity, time.perf_counter() - started)
            if target.observer is not None:
                try:
                    await target.observer.finish()  # may end the session (MCP DELETE, SSE stream closed)
                except Exception:
                    log.exception("%s %s: ending the MCP exchange", scope.get("method", "WS"), scope["path"])

    async def _reroute(self, target: Target) -> Target:
        """The target's instance took no connection (its agent is dead): the same request, to the
        instance that replaces it."""
        sessions = self.sessions
        self.pool.drop_instance(target.pool_key[0])
        route = await sessions.reroute(target.session)
        return self._via_node(
            replace(
                target,
                session=route.session,
                address=route.socket_path,
                pool_key=(route.session.instance_id or "", target.pool_key[1]),
                node=route.node,
                hop=route.hop,
            )
        )

    def _via_node(self, target: Target) -> Target:
        """A target on a cluster's node: the connection goes to the node, with the headers the
        route gave for it (the cluster's key, the session's row id: `hutch.cluster.wire`)."""
        node = target.node
        if node is None:
            return target
        names = {name for name, _ in target.hop}
        add = [h for h in target.add if h[0] not in names] + list(target.hop)
        return replace(target, address=(node.host, node.port), pool_key=(f"node:{node.node_id}", None), add=add)

    # -- the error boundary --------------------------------------------------------------------

    @staticmethod
    async def _error(scope: Scope, send: Send, exc: HutchError, is_e2b: bool) -> None:
        body = {"code": exc.http_status, "message": exc.message} if is_e2b else exc.to_dict()
        if scope["type"] == "websocket":
            await refuse_with_error(scope, send, exc, body)
            return
        data = exc.body() if isinstance(exc, mcp.JsonRpcError) else json.dumps(body).encode()
        try:
            await send({"type": "http.response.start", "status": exc.http_status, "headers": JSON_HEADERS})
            await send({"type": "http.response.body", "body": data})
        except RuntimeError:
            pass  # the answer had started: the ASGI server cuts the connection instead


class _MisdirectWatch:
    """Between the proxy and the client for a request sent to a node: a 421 answer marked
    `x-hutch-misdirected` (the node does not hold the session) is kept from the client."""

    __slots__ = ("misdirected", "send_to_client")

    def __init__(self, send: Send) -> None:
        self.send_to_client = send
        self.misdirected = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] == 421:
            self.misdirected = any(name == MISDIRECTED_HEADER for name, _ in message.get("headers", ()))
        if not self.misdirected:
            await self.send_to_client(message)


class _Replay:
    """The client's request messages, kept so that a request whose body came in one message
    (most do: small JSON, no body at all) can be sent a second time."""

    __slots__ = ("again", "first", "receive", "taken")

    def __init__(self, receive: Receive) -> None:
        self.receive = receive
        self.first: Message | None = None
        self.taken = 0
        self.again: Message | None = None  # what the next read gives once more (after `rewind`)

    async def __call__(self) -> Message:
        again = self.again
        if again is not None:
            self.again = None
            return again
        message = await self.receive()
        self.taken += 1
        if self.taken == 1:
            self.first = message
        return message

    def rewind(self) -> bool:
        """Whether the request can be read again from its start (then the next read does)."""
        first = self.first
        if first is None or self.taken != 1 or first["type"] != "http.request" or first.get("more_body"):
            return first is None
        self.again = first
        return True


def _has_ended(sessions: Sessions, session: SessionRecord) -> bool:
    """Whether this session (this row, not a later one of its key) is over: ending a session
    forgets it before its instance stops, so a stream that instance cut short sees it ended."""
    current = sessions.active(session.internal_id)
    return current is None or current.row_id != session.row_id
