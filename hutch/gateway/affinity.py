"""Session affinity of function invocations: which session key a request carries, and what the
answer tells the client back.

- `HEADER_FIELD`: the key is in a header (`x-fc-session-id` unless the function names another).
  Without it the request starts a new session, whose generated id comes back in that header.
- `GENERATED_COOKIE`: the key is a cookie (`x-fc-cookie-session-id` by default) that the gateway
  sets on the answer that created the session: `<name>=<id>; Path=/; Max-Age=<ttl>; HttpOnly`.
- `MCP_STREAMABLE`, `MCP_SSE`: MCP session ids are `hutch.gateway.mcp`'s. A request without one
  (a client of spec 2026-07-28) may still name a session: by `Mcp-Param-Sandbox-Id` (a tool
  argument the client mirrors into a header), the function's header, or its cookie, in that order.

A key a client sends must be 1-64 characters of `[A-Za-z0-9_-]`, not starting with `-`; any
other value is rejected (400), never hashed into a session. This module only reads and writes
headers; sessions are the session manager's.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

from hutch.errors import InvalidArgument
from hutch.functions import AffinityType, FunctionSpec
from hutch.scheduler.sessions import SESSION_ID

Header = tuple[bytes, bytes]

ID_RULE = "1-64 characters from [A-Za-z0-9_-], not starting with '-'"
MCP_PARAM_SANDBOX_ID = b"mcp-param-sandbox-id"


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


def checked_key(value: str, where: str) -> str:
    """`value` if it is a well-formed session key.

    Raises:
        InvalidArgument: it is not.
    """
    if not SESSION_ID.fullmatch(value):
        raise InvalidArgument(f"invalid session id in {where}: {ID_RULE}")
    return value


def header_key(spec: FunctionSpec, headers: Sequence[Header]) -> str | None:
    name = spec.affinity_config.header_name  # lowercased by AffinityConfig
    raw = header_value(headers, name.encode("latin-1"))
    return None if raw is None else checked_key(raw.decode("latin-1"), f"header {name}")


def cookie_key(spec: FunctionSpec, headers: Sequence[Header]) -> str | None:
    name = spec.affinity_config.cookie_name
    value = cookie_value(headers, name)
    return None if value is None else checked_key(value, f"cookie {name}")


def mcp_param_key(headers: Sequence[Header]) -> str | None:
    """The session a 2026-07-28 `tools/call` names with `Mcp-Param-Sandbox-Id` (spec: a value that is
    not a plain token travels as `=?base64?...?=`)."""
    raw = header_value(headers, MCP_PARAM_SANDBOX_ID)
    if raw is None:
        return None
    value = raw.strip()
    if value.startswith(b"=?base64?") and value.endswith(b"?="):
        try:
            value = base64.b64decode(value[9:-2], validate=True)
        except binascii.Error:
            raise InvalidArgument("invalid base64 in header Mcp-Param-Sandbox-Id") from None
    return checked_key(value.decode("latin-1"), "header Mcp-Param-Sandbox-Id")


def session_key(spec: FunctionSpec, headers: Sequence[Header]) -> str | None:
    """The session key a request carries for this function; None: start a new session.

    Raises:
        InvalidArgument: the key is malformed.
    """
    mode = spec.session_affinity
    if mode == AffinityType.HEADER_FIELD:
        return header_key(spec, headers)
    if mode == AffinityType.GENERATED_COOKIE:
        return cookie_key(spec, headers)
    return mcp_param_key(headers) or header_key(spec, headers) or cookie_key(spec, headers)


def response_headers(spec: FunctionSpec, session_id: str, ttl_s: int, created: bool) -> list[Header]:
    """What the answer carries for the client to keep its session."""
    if spec.session_affinity == AffinityType.HEADER_FIELD:
        return [(spec.affinity_config.header_name.encode("latin-1"), session_id.encode("latin-1"))]
    if spec.session_affinity == AffinityType.GENERATED_COOKIE and created:
        return [(b"set-cookie", set_cookie(spec.affinity_config.cookie_name, session_id, ttl_s))]
    return []


def set_cookie(name: str, value: str, max_age: int) -> bytes:
    return f"{name}={value}; Path=/; Max-Age={max_age}; HttpOnly".encode("latin-1")
