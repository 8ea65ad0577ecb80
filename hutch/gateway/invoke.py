"""Function invocation, any method, to the session's instance:
- `/functions/{name}/invoke/{path}`: the session is the one the request's affinity key names;
- `/functions/{name}/sessions/{id}/{path}`: the path names the session (the same key space as
  the affinity header: an unknown id starts a session with that id).

The flow (ARCHITECTURE.md, "A request"): API key -> tenant; the function by name (the tenant's own, else the
built-in); the session key from the path, or the request's affinity header or cookie (MCP
functions: `hutch.gateway.mcp` decides); its internal id; the in-memory lookup; on a miss a new
session from the warm pool (`create(existing_ok=True)`, so that racing first requests with one
key share one instance); `route` (the instance is live, or a dead one is replaced); then the
target: the function's user server (`E2b-Sandbox-Port: <port>`, which the agent splices to) or
the agent itself, at `/{path}`.

Nothing here touches MetaDB on a hit: tenants, functions and Active sessions are cached by their
services. The tenant's credentials never reach the instance (user code runs there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote

from hutch.api.auth import api_key_of
from hutch.errors import HutchError, NotFound
from hutch.functions import AffinityType, FunctionSpec
from hutch.gateway import affinity, mcp
from hutch.gateway.types import DataPlane, Header, Scope, Target

if TYPE_CHECKING:
    from hutch.metadb.records import SessionRecord, Tenant
    from hutch.scheduler.interface import Route, Sessions

PREFIX = "/functions/"
MCP_MODES = (AffinityType.MCP_STREAMABLE, AffinityType.MCP_SSE)
# Set by the gateway alone: a client must not steer the agent to another port.
# The X-Forwarded-* set describes this hop and is rewritten (X-Forwarded-For extended).
ALWAYS_DROPPED = frozenset(
    {
        b"e2b-sandbox-port",
        b"e2b-sandbox-id",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-prefix",
    }
)


@dataclass(frozen=True, slots=True)
class Invocation:
    """What an invocation path says: the function, the path on the instance, and maybe the session."""

    function: str
    rest: str  # the path on the instance (decoded), "/" at least
    prefix: str  # the part of the path the gateway consumed (`X-Forwarded-Prefix`)
    session_key: str | None = None  # `/functions/{name}/sessions/{id}/...`: the session named by the path


def parse_path(path: str) -> Invocation | None:
    """The invocation `/functions/{name}/invoke[/rest]` or `/functions/{name}/sessions/{id}[/rest]`
    names; None for any other path."""
    if not path.startswith(PREFIX):
        return None
    slash = path.find("/", len(PREFIX))
    if slash <= len(PREFIX):
        return None
    name = path[len(PREFIX) : slash]
    key = None
    if path.startswith("/invoke", slash):
        end = slash + len("/invoke")
    elif path.startswith("/sessions/", slash):
        start = slash + len("/sessions/")
        end = path.find("/", start)
        if end < 0:
            end = len(path)
        key = path[start:end]
        if not key:
            return None
    else:
        return None
    if len(path) > end and path[end] != "/":
        return None
    return Invocation(name, path[end:] or "/", path[:end], key)


def _target(scope: Scope, prefix: str, rest: str) -> bytes:
    """The request-target on the instance: the rest of the raw path (still percent-encoded), and the query."""
    raw: bytes | None = scope.get("raw_path")
    encoded = quote(prefix).encode("latin-1")
    if raw is not None and raw.startswith(encoded):
        path = raw[len(encoded) :] or b"/"
        if not path.startswith(b"/"):
            path = quote(rest).encode()
    else:
        path = quote(rest).encode("latin-1")
    query: bytes = scope.get("query_string", b"")
    return path + b"?" + query if query else path


class HeaderView:
    """`api_key_of` reads headers through `.get(name)`; this answers from the ASGI list."""

    __slots__ = ("headers",)

    def __init__(self, headers: list[Header]) -> None:
        self.headers = headers

    def get(self, name: str, default: str | None = None) -> str | None:
        value = affinity.header_value(self.headers, name.encode("latin-1"))
        return default if value is None else value.decode("latin-1")


async def resolve(plane: DataPlane, scope: Scope, invocation: Invocation, bindings: mcp.McpBindings) -> Target:
    """The target of one invocation (creating its session on a miss).

    Raises:
        Unauthenticated: no or a wrong API key.
        NotFound: no such function for this tenant.
        InvalidArgument: a malformed session key.
        FailedPrecondition: an expired key of a function that disables reuse.
        QuotaExceeded: a new session would exceed the tenant's quota.
        JsonRpcError: any of these (and an unknown MCP session) for an MCP function.
    """
    sessions = plane.sessions
    headers: list[Header] = scope["headers"]
    view = HeaderView(headers)
    key = api_key_of(view)
    tenant = await plane.tenants.authenticate(key)
    name = invocation.function
    _, spec = await sessions.function(tenant.tenant_id, name)
    plan: mcp.Plan | None = None
    if spec.session_affinity in MCP_MODES:
        plan = mcp.plan(spec, scope, tenant.tenant_id, name, invocation.session_key, bindings)
        session = None
        if plan.bound is not None:
            internal_id, row_id = plan.bound
            session = sessions.active(internal_id)
            if session is None or session.row_id != row_id:
                raise mcp.SessionNotFound()
        elif plan.mcp_id is not None:  # bound by another gateway, or by nobody
            metadata_key = mcp.METADATA_KEYS[plan.transport]
            session = await sessions.bound_session(tenant.tenant_id, name, metadata_key, plan.mcp_id)
            if session is None:
                raise mcp.SessionNotFound()
            bindings.bind((tenant.tenant_id, name, plan.transport, plan.mcp_id), session)
        try:
            route, created = await _session_route(sessions, tenant, name, spec, plan.session_key, session)
        except HutchError as exc:
            raise mcp.JsonRpcError.of(exc) from None
    else:
        path_key = invocation.session_key
        session_key = affinity.checked_key(path_key, "the path") if path_key else affinity.session_key(spec, headers)
        route, created = await _session_route(sessions, tenant, name, spec, session_key, None)
    drop = ALWAYS_DROPPED
    if headers_have(headers, b"x-api-key"):
        drop = drop | {b"x-api-key"}
    elif key is not None:
        drop = drop | {b"authorization"}  # the key came as a bearer token
    add: list[Header] = [
        (b"x-forwarded-proto", scope.get("scheme", "http").encode("latin-1")),
        (b"x-forwarded-prefix", invocation.prefix.encode("latin-1")),
    ]
    client = scope.get("client")
    if client:
        forwarded = affinity.header_value(headers, b"x-forwarded-for")
        peer = client[0].encode("latin-1")
        add.append((b"x-forwarded-for", forwarded + b", " + peer if forwarded else peer))
    host = affinity.header_value(headers, b"host")
    if host is not None:
        add.append((b"x-forwarded-host", host))
    if route.port is not None:
        add.append((b"e2b-sandbox-port", str(route.port).encode()))
    session = route.session
    if plan is not None:
        answer = plan.answer_headers(session)
        observer = plan.exchange(sessions, plane.metadb, session, created, invocation.prefix)
    else:
        answer = affinity.response_headers(spec, session.session_id, session.ttl_s, created)
        observer = None
    return Target(
        session=session,
        address=route.socket_path,
        node=route.node,
        hop=route.hop,
        pool_key=(session.instance_id or "", route.port),
        path=_target(scope, invocation.prefix, invocation.rest),
        drop=drop,
        add=add,
        answer=answer,
        answer_drop=frozenset(name for name, _ in answer if name != b"set-cookie"),
        observer=observer,
    )


async def _session_route(
    sessions: Sessions,
    tenant: Tenant,
    name: str,
    spec: FunctionSpec,
    session_key: str | None,
    session: SessionRecord | None,
) -> tuple[Route, bool]:
    """The route of the session `session` (or that `session_key` names, or a new one); (route, created)."""
    bound = session is not None
    created = False
    for _attempt in range(2):
        if session is None and session_key is not None:
            session = sessions.active(sessions.internal_id(tenant.tenant_id, name, session_key))
        if session is None:
            session, created = await sessions.create(
                tenant, name, session_id=session_key, affinity=spec.session_affinity.value, existing_ok=True
            )
        try:
            return await sessions.route(session), created
        except NotFound:
            if bound:
                raise mcp.SessionNotFound() from None  # an MCP session's instance ended under it
            # Reaped between the lookup and the route: the key starts a new session.
            session = None
    raise NotFound(f"session {session_key} ended while it was being routed; retry")


def headers_have(headers: list[Header], name: bytes) -> bool:
    return any(key == name for key, _ in headers)
