"""Session affinity of function invocations: which session key a request carries, and what the
answer tells the client back (DESIGN.md §1, "Affinity modes").

- `HEADER_FIELD`: the key is in a header (`x-fc-session-id` unless the function names another).
  Without it the request starts a new session, whose generated id comes back in that header.
- `GENERATED_COOKIE`: the key is a cookie (`x-fc-cookie-session-id` by default) that the gateway
  sets on the answer that created the session: `<name>=<id>; Path=/; Max-Age=<ttl>; HttpOnly`.

A key a client sends must be 1-64 characters of `[A-Za-z0-9_-]`, not starting with `-`; any
other value is rejected (400), never hashed into a session. The MCP modes are answered 501 by the
gateway until the MCP issue lands. This module only reads and writes headers; sessions are the
session manager's.
"""

from __future__ import annotations

from collections.abc import Sequence

from hutch.errors import InvalidArgument, Unimplemented
from hutch.functions import AffinityType, FunctionSpec
from hutch.scheduler.sessions import SESSION_ID

Header = tuple[bytes, bytes]

ID_RULE = "1-64 characters from [A-Za-z0-9_-], not starting with '-'"


def header_value(headers: Sequence[Header], name: bytes) -> bytes | None:
    """The value of a header (several occurrences joined with ', ', as RFC 9110 §5.3 allows)."""
    found: bytes | None = None
    for key, value in headers:
        if key == name:
            found = value if found is None else found + b", " + value
    return found


def cookie_value(headers: Sequence[Header], name: str) -> str | None:
    """The value of cookie `name` in the request's `Cookie` header(s), or None."""
    wanted = name.encode("latin-1")
    for key, value in headers:
        if key != b"cookie":
            continue
        for pair in value.split(b";"):
            cookie, sep, raw = pair.strip().partition(b"=")
            if sep and cookie == wanted:
                raw = raw.strip()
                if len(raw) >= 2 and raw[:1] == b'"' and raw[-1:] == b'"':
                    raw = raw[1:-1]
                return raw.decode("latin-1")
    return None


def _checked(value: str, where: str) -> str:
    if not SESSION_ID.fullmatch(value):
        raise InvalidArgument(f"invalid session id in {where}: {ID_RULE}")
    return value


def session_key(spec: FunctionSpec, headers: Sequence[Header]) -> str | None:
    """The session key a request carries for this function; None: start a new session.

    Raises:
        InvalidArgument: the key is malformed.
        Unimplemented: the function uses an MCP affinity mode (not routed by the gateway yet).
    """
    mode = spec.session_affinity
    if mode == AffinityType.HEADER_FIELD:
        name = spec.affinity_config.header_name  # lowercased by AffinityConfig
        raw = header_value(headers, name.encode("latin-1"))
        return None if raw is None else _checked(raw.decode("latin-1"), f"header {name}")
    if mode == AffinityType.GENERATED_COOKIE:
        name = spec.affinity_config.cookie_name
        value = cookie_value(headers, name)
        return None if value is None else _checked(value, f"cookie {name}")
    raise Unimplemented(
        f"function {spec.name} uses {mode.value} session affinity, which the gateway does not route yet"
    )


def response_headers(spec: FunctionSpec, session_id: str, ttl_s: int, created: bool) -> list[Header]:
    """What the answer carries for the client to keep its session."""
    if spec.session_affinity == AffinityType.HEADER_FIELD:
        return [(spec.affinity_config.header_name.encode("latin-1"), session_id.encode("latin-1"))]
    if spec.session_affinity == AffinityType.GENERATED_COOKIE and created:
        return [(b"set-cookie", set_cookie(spec.affinity_config.cookie_name, session_id, ttl_s))]
    return []


def set_cookie(name: str, value: str, max_age: int) -> bytes:
    return f"{name}={value}; Path=/; Max-Age={max_age}; HttpOnly".encode("latin-1")
