"""Reach servers that user code runs inside the sandbox.

The sandbox has no network but its own loopback, so the agent is the only way in. Two forms:
- `CONNECT 127.0.0.1:PORT` (or `localhost:PORT`): answered `200`, then the connection is a raw
  byte tunnel to that port.
- Any request carrying `E2b-Sandbox-Port: PORT` (E2B's routing header) for a port that is not one
  of the agent's own: the request head and everything after it go to that port as they are, and
  the connection is spliced both ways until either side closes. WebSocket upgrades, SSE and
  chunked bodies therefore pass through untouched; a client keeps to one port per connection.

Only the sandbox's own loopback is ever dialled.
"""

from __future__ import annotations

import select
import socket

from hutch.agent.http import Connection, Request, Takeover
from hutch.errors import InvalidArgument, Unavailable

SPLICE_CHUNK = 256 * 1024
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]", "::1")


def _parse_port(value: str | None) -> int:
    try:
        port = int(value or "")
    except ValueError:
        raise InvalidArgument(f"invalid port {value!r}") from None
    if not 0 < port < 65536:
        raise InvalidArgument(f"invalid port {port}")
    return port


def _dial(port: int) -> socket.socket:
    try:
        return socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError as exc:
        raise Unavailable(f"nothing is listening on port {port} in the sandbox ({exc.strerror})") from None


def forward(req: Request, port_header: str | None) -> Takeover:
    if req.method == "CONNECT":
        host, _, port_text = req.target.rpartition(":")
        if host not in LOOPBACK_NAMES:
            raise InvalidArgument("CONNECT only reaches the sandbox's own loopback")
        port = _parse_port(port_text)
        upstream = _dial(port)

        def tunnel(conn: Connection) -> None:
            conn.sock.sendall(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            _splice(conn, upstream, b"")

        return Takeover(tunnel)

    port = _parse_port(port_header)
    upstream = _dial(port)

    def proxy(conn: Connection) -> None:
        _splice(conn, upstream, req.raw_head)

    return Takeover(proxy)


def _buffered(conn: Connection) -> bytes:
    """Bytes the reader already pulled off the socket (part of a body, say), without blocking."""
    conn.sock.setblocking(False)
    try:
        return conn.rfile.read1(SPLICE_CHUNK) or b""  # type: ignore[attr-defined]
    except (BlockingIOError, TypeError):
        return b""
    finally:
        conn.sock.setblocking(True)


def _splice(conn: Connection, upstream: socket.socket, first: bytes) -> None:
    client = conn.sock
    upstream.settimeout(None)
    try:
        pending = first + _buffered(conn)
        if pending:
            upstream.sendall(pending)
        peers = {client: upstream, upstream: client}
        open_reads = [client, upstream]
        while open_reads:
            readable, _, _ = select.select(open_reads, [], [])
            for src in readable:
                try:
                    data = src.recv(SPLICE_CHUNK)
                except OSError:
                    data = b""
                dst = peers[src]
                if data:
                    try:
                        dst.sendall(data)
                        continue
                    except OSError:
                        return
                # EOF one way: pass the half-close on, keep the other direction open.
                open_reads.remove(src)
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    return
    finally:
        upstream.close()
