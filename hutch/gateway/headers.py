"""Which headers cross the gateway: hop-by-hop filtering (RFC 9110 §7.6.1) and the upstream head.

Hop-by-hop headers describe one connection, not the message, so they are never forwarded:
`Connection` and every header it names, `Keep-Alive`, `TE`, `Trailer`, `Transfer-Encoding`,
`Upgrade` and `Proxy-*`. The gateway frames bodies itself on each side (`Content-Length` kept
when the sender gave one, chunked otherwise), and answers `Expect: 100-continue` itself (the
ASGI server does, once the body is read), so those do not travel either.

Header names arrive lowercased from the ASGI server and from the upstream parser.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

Header = tuple[bytes, bytes]

HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)
# Also not copied from the client: the gateway re-frames the body and handles 100-continue.
REQUEST_SKIP = HOP_BY_HOP | {b"content-length", b"expect"}
# Also not copied from the instance: the ASGI server adds its own Date and Server.
RESPONSE_SKIP = HOP_BY_HOP | {b"date", b"server"}
# Never forwarded on a WebSocket upgrade: the client library of the upstream leg makes its own.
WEBSOCKET_SKIP = HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"sec-websocket-key",
    b"sec-websocket-version",
    b"sec-websocket-extensions",
    b"sec-websocket-protocol",
}


def connection_tokens(value: bytes) -> set[bytes]:
    """The header names a `Connection` header lists (lowercased)."""
    return {token.strip().lower() for token in value.split(b",") if token.strip()}


def _filter(headers: Iterable[Header], skip: frozenset[bytes], drop: frozenset[bytes]) -> list[Header]:
    out: list[Header] = []
    listed: set[bytes] | None = None
    for name, value in headers:
        if name in skip or name in drop or name.startswith(b"proxy-"):
            if name == b"connection":
                listed = connection_tokens(value) if listed is None else listed | connection_tokens(value)
            continue
        out.append((name, value))
    if listed:
        out = [header for header in out if header[0] not in listed]
    return out


def request_headers(headers: Sequence[Header], drop: frozenset[bytes] = frozenset()) -> tuple[list[Header], bool]:
    """The end-to-end headers of a client request (minus `drop`), and whether its body is chunked.

    The caller adds the body framing: `content-length` as the client sent it, or chunked. A
    request without `Host` (HTTP/1.0) gets one: HTTP/1.1 servers may refuse it otherwise.
    """
    chunked = False
    host = False
    for name, value in headers:
        if name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif name == b"host":
            host = True
    out = _filter(headers, REQUEST_SKIP, drop)
    if not host:
        out.append((b"host", b"localhost"))
    return out, chunked


def content_length(headers: Iterable[Header]) -> bytes | None:
    for name, value in headers:
        if name == b"content-length":
            return value
    return None


def response_headers(headers: Iterable[Header], drop: frozenset[bytes] = frozenset()) -> tuple[list[Header], bool]:
    """The end-to-end headers of an instance's answer (minus `drop`), and whether it has a length."""
    out = _filter(headers, RESPONSE_SKIP, drop)
    sized = False
    for name, _ in out:
        if name == b"content-length":
            sized = True
            break
    return out, sized


def websocket_headers(headers: Iterable[Header], drop: frozenset[bytes] = frozenset()) -> list[Header]:
    """The client's upgrade-request headers that the upstream WebSocket handshake carries on."""
    return _filter(headers, WEBSOCKET_SKIP, drop)


def request_head(method: bytes, target: bytes, headers: Iterable[Header]) -> bytes:
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)
