"""MCP session affinity: one MCP session, one hutch session, one instance.

The instance runs the function's own MCP server (its `startCommand` and `port`). The gateway
never speaks MCP: it reads the few things that say which session a request belongs to, and
passes everything else through (`Last-Event-ID` included, so resumption works end to end).

MCP_STREAMABLE (Streamable HTTP, spec 2025-03-26 to 2025-11-25, and 2026-07-28):
- A request with `Mcp-Session-Id` goes to the session bound to that id for this tenant and
  function; an unknown id is a 404 with the JSON-RPC body the spec's clients expect. Ids are
  looked up per tenant and function, so another tenant's id is as unknown as a guessed one.
  Behind several gateways (`hutch gateway`) an id this gateway has not seen is looked up in the
  sessions' metadata in MetaDB, where the gateway that bound it wrote it.
- Without one, a session key the request carries (2026-07-28 clients have no session id): the
  path `/functions/{name}/sessions/{id}/...`, `Mcp-Param-Sandbox-Id` (a tool argument the client
  mirrors into a header where the tool declares `x-mcp-header: Sandbox-Id`), the function's
  affinity header, or its cookie, in that order. As with `x-fc-session-id`, an unknown key starts
  a session with that key.
- Without either, a POST starts a new session (anything else is a 400). The gateway reads the
  instance's answer head before the client sees it:
  - an `Mcp-Session-Id` in it (the instance's MCP server answered `initialize`) is bound to the
    session, in memory for the hot path and in the session's metadata (`mcpSessionId`), so the
    binding outlives a restart of `hutch serve` as the instance and its MCP server do;
  - a success without one (a stateless 2026-07-28 exchange) sets the session's cookie, so a
    client that keeps cookies (the Python SDK) comes back to the same instance; other clients
    name the session by path, header or `Mcp-Param-Sandbox-Id`;
  - an error ends the new session at once: nothing was established, and the client's fallback
    to `initialize` (a 2026-07-28 client facing an older server gets a 4xx) starts a fresh one.
- A DELETE answered 200, 204 or 404 ends the binding and the session.
- An open GET stream is a request in flight, so it counts as activity (`Gateway._forward`).

MCP_SSE (HTTP+SSE, 2024-11-05):
- A GET without a session starts a new session. The first `event: endpoint` of its stream is
  parsed as it passes (the only bytes ever held back, until that one short event is complete):
  the `session_id` (Python servers) or `sessionId` (TypeScript servers) of its URI is bound to
  the session, and a URI that is an absolute path gets the gateway's path prefix
  (`/functions/{name}/invoke`) in front, as the instance does not know where it is mounted.
  The binding is recorded in the session's metadata (`mcpSseSessionId`) before the client sees
  the endpoint, so its POSTs may reach any gateway of a cluster.
- `POST ...?session_id=...` (or `sessionId`) goes to the instance holding that stream: an unknown
  id is a 404; neither parameter nor a session key is a 400.
- When the GET ends, so do the binding and the session.

Every error on an MCP function's traffic is answered with a JSON-RPC error body (`JsonRpcError`),
which MCP clients parse. This module knows headers, SSE framing and query strings; sessions are
`Sessions`' (`hutch.scheduler.interface`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from hutch.errors import HutchError
from hutch.functions import AffinityType, FunctionSpec
from hutch.gateway import affinity
from hutch.gateway.types import Header, Observer, Scope
from hutch.metadb.records import SessionRecord

if TYPE_CHECKING:
    from hutch.metadb.base import MetaDB
    from hutch.scheduler.interface import Sessions

log = logging.getLogger(__name__)

MCP_SESSION_ID = b"mcp-session-id"
METADATA_KEY = "mcpSessionId"  # where a session records the Streamable HTTP session bound to it
SSE_METADATA_KEY = "mcpSseSessionId"  # ... and the HTTP+SSE session (its stream's endpoint id)
HTTP, SSE = "http", "sse"
METADATA_KEYS = {HTTP: METADATA_KEY, SSE: SSE_METADATA_KEY}
ENDED = "mcp_closed"  # end reason: the client ended its MCP session (DELETE, or the SSE stream closed)
REFUSED = "mcp_refused"  # end reason: the instance refused the request that started the session
ENDPOINT_LIMIT = 16 * 1024  # bytes held back at most while looking for the endpoint event
INVALID_REQUEST, INTERNAL_ERROR = -32600, -32603  # JSON-RPC error codes

BindingKey = tuple[str, str, str, str]  # (tenant, function, HTTP or SSE, MCP session id)


# -- errors ------------------------------------------------------------------------------------


class JsonRpcError(HutchError):
    """An error on an MCP function's traffic: answered with a JSON-RPC error body (`id` null)."""

    def __init__(self, message: str, http_status: int = 400, code: str = "invalid_argument") -> None:
        super().__init__(message)
        self.http_status = http_status
        self.code = code

    @classmethod
    def of(cls, exc: HutchError) -> JsonRpcError:
        """The same error, in MCP's wire shape."""
        if isinstance(exc, JsonRpcError):
            return exc
        return cls(exc.message, exc.http_status, exc.code)

    def body(self) -> bytes:
        code = INVALID_REQUEST if self.http_status < 500 else INTERNAL_ERROR
        error = {"jsonrpc": "2.0", "id": None, "error": {"code": code, "message": self.message}}
        return json.dumps(error, separators=(",", ":")).encode()


class SessionNotFound(JsonRpcError):
    """An MCP session id nobody bound for this tenant and function (or whose session ended): the
    404 the spec requires, after which a client starts a new session with `initialize`."""

    def __init__(self) -> None:
        super().__init__("Session not found", 404, "not_found")


# -- bindings ------------------------------------------------------------------------------------


class McpBindings:
    """MCP session ids -> the hutch sessions holding them; in memory, so routing by id is a dict hit.

    A binding names the session's row too: a session that ended and was started again under the
    same key is a new row, never reachable through an old MCP id.
    """

    def __init__(self) -> None:
        self._sessions: dict[BindingKey, tuple[str, str]] = {}  # -> (internal id, row id)
        self._by_row: dict[str, set[BindingKey]] = {}

    def bind(self, key: BindingKey, session: SessionRecord) -> None:
        self._sessions[key] = (session.internal_id, session.row_id)
        self._by_row.setdefault(session.row_id, set()).add(key)

    def lookup(self, key: BindingKey) -> tuple[str, str] | None:
        """(internal id, row id) of the session bound to `key`, or None."""
        return self._sessions.get(key)

    def unbind(self, key: BindingKey) -> None:
        found = self._sessions.pop(key, None)
        if found is not None:
            keys = self._by_row.get(found[1])
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_row[found[1]]

    def forget(self, row_id: str) -> None:
        """Drop every binding of a session (it ended)."""
        for key in self._by_row.pop(row_id, ()):
            self._sessions.pop(key, None)

    def restore(self, sessions: Iterable[SessionRecord]) -> None:
        """Bind again the Streamable HTTP sessions that Active sessions recorded (after a restart)."""
        for session in sessions:
            mcp_id = session.metadata.get(METADATA_KEY)
            if isinstance(mcp_id, str) and mcp_id:
                self.bind((session.tenant_id, session.function, HTTP, mcp_id), session)

    def __len__(self) -> int:
        return len(self._sessions)


# -- routing -------------------------------------------------------------------------------------


def sse_session_id(query: bytes) -> str | None:
    """The HTTP+SSE session a POST names in its query (`session_id`, or TypeScript's `sessionId`)."""
    if not query:
        return None
    found = None
    for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if name == "session_id" or (name == "sessionId" and found is None):
            found = value
    return found


@dataclass(slots=True)
class Plan:
    """Where one request to an MCP function goes, decided before any session is touched."""

    mode: AffinityType
    tenant_id: str
    function: str
    spec: FunctionSpec
    method: str
    bindings: McpBindings
    session_key: str | None = None  # the session this key names (a new one if unknown)
    bound: tuple[str, str] | None = None  # (internal id, row id) of the MCP session's session
    mcp_id: str | None = None  # the MCP session id the request carried
    transport: str = HTTP  # HTTP (Streamable HTTP) or SSE
    keyed: bool = False  # the client named the session (path, Mcp-Param-Sandbox-Id, header, cookie)

    def answer_headers(self, session: SessionRecord) -> list[Header]:
        """Every answer names the hutch session (for the session API, or to come back by header)."""
        return [(self.spec.affinity_config.header_name.encode("latin-1"), session.session_id.encode("latin-1"))]

    def exchange(
        self, sessions: Sessions, metadb: MetaDB, session: SessionRecord, created: bool, prefix: str
    ) -> Observer | None:
        if self.mode == AffinityType.MCP_STREAMABLE:
            return StreamableExchange(self, sessions, metadb, session, created)
        if self.method == "GET" and self.mcp_id is None:
            return SseStream(self, sessions, metadb, session, created, prefix.encode("latin-1"))
        return None


def plan(
    spec: FunctionSpec, scope: Scope, tenant_id: str, function: str, path_key: str | None, bindings: McpBindings
) -> Plan:
    """Which session a request to an MCP function belongs to.

    Raises:
        SessionNotFound: it names an MCP session that is not bound (for this tenant and function).
        JsonRpcError: a malformed session key, or a request that names no session and cannot start one.
    """
    headers: list[Header] = scope["headers"]
    method: str = scope.get("method", "GET")
    mode = spec.session_affinity
    result = Plan(mode, tenant_id, function, spec, method, bindings)
    if mode == AffinityType.MCP_STREAMABLE:
        raw = affinity.header_value(headers, MCP_SESSION_ID)
        mcp_id = raw.decode("latin-1") if raw is not None else None
        transport = HTTP
    else:
        mcp_id = sse_session_id(scope.get("query_string", b""))
        transport = SSE
    result.transport = transport
    if mcp_id is not None:
        # Not bound here: another gateway may have bound it, MetaDB knows (`invoke.resolve` asks).
        result.mcp_id = mcp_id
        result.bound = bindings.lookup((tenant_id, function, transport, mcp_id))
        return result
    try:
        key = affinity.checked_key(path_key, "the path") if path_key is not None else None
        key = key or affinity.session_key(spec, headers)
    except HutchError as exc:
        raise JsonRpcError.of(exc) from None
    if key is None:
        if mode == AffinityType.MCP_STREAMABLE and method != "POST":
            raise JsonRpcError("Bad Request: Mcp-Session-Id header is required")
        if mode == AffinityType.MCP_SSE and method != "GET":
            raise JsonRpcError("Bad Request: session_id is required")
    result.session_key = key
    result.keyed = key is not None
    return result


# -- watching answers ----------------------------------------------------------------------------


class _Binder:
    """Binds an MCP session id to the session of an exchange: in this gateway's memory, at once,
    and in the session's metadata in MetaDB, where other gateways (and this one after a restart)
    look it up; `settle` waits for that write before the client may act on the id."""

    def __init__(self, plan: Plan, sessions: Sessions, metadb: MetaDB, session: SessionRecord, created: bool) -> None:
        self.plan = plan
        self.sessions = sessions
        self.metadb = metadb
        self.session = session
        self.created = created
        self._persisting: asyncio.Future[Any] | None = None

    def _bind(self, transport: str, mcp_id: str) -> BindingKey:
        session = self.session
        key = (session.tenant_id, session.function, transport, mcp_id)
        self.plan.bindings.bind(key, session)
        # The live record: the session API shows the binding at once.
        session.metadata = {**session.metadata, METADATA_KEYS[transport]: mcp_id}
        self._persisting = asyncio.ensure_future(self.metadb.update_session(session.row_id, metadata=session.metadata))
        return key

    async def settle(self) -> None:
        persisting, self._persisting = self._persisting, None
        if persisting is not None:
            try:
                await persisting
            except HutchError:
                log.exception("recording MCP session of %s", self.session.session_id)


class StreamableExchange(_Binder):
    """One Streamable HTTP exchange: binds the id the instance assigns, ends what must end."""

    def __init__(self, plan: Plan, sessions: Sessions, metadb: MetaDB, session: SessionRecord, created: bool) -> None:
        super().__init__(plan, sessions, metadb, session, created)
        self.end_reason: str | None = None
        self.answered = False

    def head(self, status: int, headers: list[Header]) -> list[Header]:
        plan = self.plan
        self.answered = True
        if plan.mcp_id is not None:
            if plan.method == "DELETE" and status in (200, 204, 404):
                self.end_reason = ENDED
            return []
        assigned = affinity.header_value(headers, MCP_SESSION_ID)
        if assigned is not None and status < 400:
            self._bind(HTTP, assigned.decode("latin-1"))  # before the client sees the id
        elif self.created and not plan.keyed:
            if status >= 400:
                self.end_reason = REFUSED
            else:
                cookie = affinity.set_cookie(
                    plan.spec.affinity_config.cookie_name, self.session.session_id, self.session.ttl_s
                )
                return [(b"set-cookie", cookie)]
        return []

    def body(self, data: bytes, last: bool) -> bytes:
        return data

    async def finish(self) -> None:
        await self.settle()
        if self.end_reason is None and not self.answered and self.created and not self.plan.keyed:
            self.end_reason = REFUSED  # the instance failed before answering: nobody can reach this session
        if self.end_reason is not None:
            await self.sessions.end(self.session, self.end_reason)


class SseStream(_Binder):
    """The GET of an HTTP+SSE session: binds its endpoint's session id; its end ends the session."""

    def __init__(
        self,
        plan: Plan,
        sessions: Sessions,
        metadb: MetaDB,
        session: SessionRecord,
        created: bool,
        prefix: bytes,
    ) -> None:
        super().__init__(plan, sessions, metadb, session, created)
        self.endpoint: EndpointEvent | None = None
        self.prefix = prefix
        self.key: BindingKey | None = None

    def head(self, status: int, headers: list[Header]) -> list[Header]:
        content_type = affinity.header_value(headers, b"content-type") or b""
        if status == 200 and content_type.lower().startswith(b"text/event-stream"):
            self.endpoint = EndpointEvent(self.prefix)
        return []

    def body(self, data: bytes, last: bool) -> bytes:
        endpoint = self.endpoint
        if endpoint is None or endpoint.done:
            return data
        out = endpoint.feed(data, last)
        if endpoint.session_id is not None:
            # Bound before the client sees the endpoint (the proxy settles first), so its first
            # POST finds it, through this gateway or another.
            self.key = self._bind(SSE, endpoint.session_id)
        return out

    async def finish(self) -> None:
        if self.key is not None:
            self.plan.bindings.unbind(self.key)
        if self.key is not None or (self.created and not self.plan.keyed):
            await self.sessions.end(self.session, ENDED)


# Line terminators of SSE (CRLF, CR, LF); an event ends at an empty line.
_LINE = re.compile(rb"\r\n|\r(?!\n)|\n")


class EndpointEvent:
    """Finds the `endpoint` event at the head of an SSE stream, passing everything else through.

    Complete events before it are let through as they come; only the bytes of an event not yet
    complete are held, up to `ENDPOINT_LIMIT` (then the search gives up and all passes as is).
    """

    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix.rstrip(b"/")
        self.pending = b""
        self.done = False
        self.session_id: str | None = None

    def feed(self, data: bytes, last: bool) -> bytes:
        """The bytes the client may have now (the endpoint event rewritten where needed)."""
        if self.done:
            return data
        self.pending += data
        out: list[bytes] = []
        while not self.done:
            event = self._next_event(last)
            if event is None:
                break
            out.append(self._endpoint(event))
        if last or self.done or len(self.pending) > ENDPOINT_LIMIT:
            self.done = True
            out.append(self.pending)
            self.pending = b""
        return b"".join(out)

    def _next_event(self, last: bool) -> list[bytes] | None:
        """The lines (with their terminators) of the next complete event; None if there is none yet."""
        lines: list[bytes] = []
        start = 0
        for match in _LINE.finditer(self.pending):
            if match.end() == len(self.pending) and self.pending.endswith(b"\r") and not last:
                return None  # maybe the first half of a CRLF
            lines.append(self.pending[start : match.end()])
            blank = match.start() == start
            start = match.end()
            if blank:
                self.pending = self.pending[start:]
                return lines
        return None

    def _endpoint(self, lines: list[bytes]) -> bytes:
        """The event as the client gets it; records the session id if it is the endpoint event."""
        event = b"message"
        data: list[bytes] = []
        for line in lines:
            text = line.rstrip(b"\r\n")
            name, _, value = text.partition(b":")
            value = value[1:] if value.startswith(b" ") else value
            if name == b"event":
                event = value
            elif name == b"data":
                data.append(value)
        if event != b"endpoint" or not data:
            return b"".join(lines)
        self.done = True
        uri = b"\n".join(data).decode("utf-8", "replace")
        split = urlsplit(uri)
        self.session_id = sse_session_id(split.query.encode("latin-1"))
        if not uri.startswith("/") or uri.startswith("//"):
            return b"".join(lines)  # an absolute URL or a relative path: the client resolves it right
        path = uri.encode("utf-8")
        if self.prefix and not (path == self.prefix or path.startswith(self.prefix + b"/")):
            path = self.prefix + path
        terminator = _LINE.search(lines[0])
        end = terminator.group() if terminator else b"\n"
        out = [line for line in lines if line.rstrip(b"\r\n").partition(b":")[0] != b"data"]
        out.insert(len(out) - 1, b"data: " + path + end)  # before the blank line
        return b"".join(out)
