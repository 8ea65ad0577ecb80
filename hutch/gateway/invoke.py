"""Function invocation: `/functions/{name}/invoke/{path}`, any method, to the session's instance.

The flow of DESIGN.md §1: API key -> tenant; the function by name (the tenant's own, else the
built-in); the session key from the request's affinity header or cookie; its internal id; the
in-memory lookup; on a miss a new session from the warm pool (`create(existing_ok=True)`, so that
racing first requests with one key share one instance); `route` (the instance is live, or a dead
one is replaced); then the target: the function's user server (`E2b-Sandbox-Port: <port>`, which
the agent splices to) or the agent itself, at `/{path}`.

Nothing here touches MetaDB on a hit: tenants, functions and Active sessions are cached by their
services. The tenant's credentials never reach the instance (user code runs there).
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import quote

from hutch.api.auth import api_key_of
from hutch.errors import NotFound
from hutch.gateway import affinity
from hutch.gateway.types import Header, Scope, Target

if TYPE_CHECKING:
    from hutch.server import Hutch

PREFIX = "/functions/"
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


def parse_path(path: str) -> tuple[str, str] | None:
    """(function name, rest) of `/functions/{name}/invoke[/rest]`; None for any other path."""
    if not path.startswith(PREFIX):
        return None
    slash = path.find("/", len(PREFIX))
    if slash <= len(PREFIX) or not path.startswith("/invoke", slash):
        return None
    end = slash + len("/invoke")
    if len(path) > end and path[end] != "/":
        return None
    return path[len(PREFIX) : slash], path[end:] or "/"


def _target(scope: Scope, name: str, rest: str) -> bytes:
    """The request-target on the instance: the rest of the raw path (still percent-encoded), and the query."""
    raw: bytes | None = scope.get("raw_path")
    prefix = f"{PREFIX}{name}/invoke".encode()
    if raw is not None and raw.startswith(prefix):
        path = raw[len(prefix) :] or b"/"
        if not path.startswith(b"/"):
            path = quote(rest).encode()
    else:
        path = quote(rest).encode("latin-1")
    query: bytes = scope.get("query_string", b"")
    return path + b"?" + query if query else path


class _HeaderView:
    """`api_key_of` reads headers through `.get(name)`; this answers from the ASGI list."""

    __slots__ = ("headers",)

    def __init__(self, headers: list[Header]) -> None:
        self.headers = headers

    def get(self, name: str, default: str | None = None) -> str | None:
        value = affinity.header_value(self.headers, name.encode("latin-1"))
        return default if value is None else value.decode("latin-1")


async def resolve(hutch: Hutch, scope: Scope, name: str, rest: str) -> Target:
    """The target of one invocation (creating its session on a miss).

    Raises:
        Unauthenticated: no or a wrong API key.
        NotFound: no such function for this tenant.
        InvalidArgument: a malformed session key.
        FailedPrecondition: an expired key of a function that disables reuse.
        QuotaExceeded: a new session would exceed the tenant's quota.
        Unimplemented: the function uses an MCP affinity mode.
    """
    sessions = hutch.sessions
    assert sessions is not None
    headers: list[Header] = scope["headers"]
    view = _HeaderView(headers)
    key = api_key_of(view)
    tenant = await hutch.tenants.authenticate(key)
    _, spec = await sessions.function(tenant.tenant_id, name)
    session_key = affinity.session_key(spec, headers)
    session = None
    created = False
    for _attempt in range(2):
        if session_key is not None:
            session = sessions.active(sessions.internal_id(tenant.tenant_id, name, session_key))
        if session is None:
            session, created = await sessions.create(
                tenant, name, session_id=session_key, affinity=spec.session_affinity.value, existing_ok=True
            )
        try:
            route = await sessions.route(session)
            break
        except NotFound:
            # Reaped between the lookup and the route: the key starts a new session.
            session = None
    else:
        raise NotFound(f"session {session_key} ended while it was being routed; retry")
    drop = ALWAYS_DROPPED
    if headers_have(headers, b"x-api-key"):
        drop = drop | {b"x-api-key"}
    elif key is not None:
        drop = drop | {b"authorization"}  # the key came as a bearer token
    add: list[Header] = [
        (b"x-forwarded-proto", scope.get("scheme", "http").encode("latin-1")),
        (b"x-forwarded-prefix", f"{PREFIX}{name}/invoke".encode()),
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
    answer = affinity.response_headers(spec, session.session_id, session.ttl_s, created)
    return Target(
        session=session,
        socket_path=route.socket_path,
        pool_key=(session.instance_id or "", route.port),
        path=_target(scope, name, rest),
        drop=drop,
        add=add,
        answer=answer,
        answer_drop=frozenset(name for name, _ in answer if name != b"set-cookie"),
    )


def headers_have(headers: list[Header], name: bytes) -> bool:
    return any(key == name for key, _ in headers)
