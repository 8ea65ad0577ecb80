"""The streaming HTTP proxy: one ASGI request to its instance and the answer back, never buffered.

- The request body goes upstream as the ASGI server hands it over (a large upload never sits in
  memory; a slow instance pauses reading from the client). Its framing is redone: the client's
  `Content-Length` is kept, a chunked body is re-chunked.
- The answer streams back chunk by chunk as the instance writes it: SSE events and NDJSON lines
  are flushed one by one, with `X-Accel-Buffering: no` on every unsized answer so that a proxy in
  front of hutch does not buffer them either. There is no read timeout: a stream may stay open
  for as long as both ends want it.
- While the request is in flight a watcher waits for the client to go away; when it does, the
  upstream connection is dropped at once, so the agent sees its peer leave (the code interpreter
  interrupts the kernel, a process stream stops).
- An instance that fails before answering is a 502 (raised to the gateway's error boundary); one
  that fails mid-answer cuts the client's connection, as it cannot be told otherwise once the
  status line is out.
- A pooled connection that turns out closed (a user server's keep-alive ended just then) is
  retried once on a new one, for idempotent methods whose body was sent whole and when nothing
  was answered; anything else is a 502 rather than a request the instance might see twice.
- A target's `observer` (MCP session affinity) sees the answer's head before the client does,
  and may add headers to it; it sees every chunk before the client does too, and may hold back
  the bytes of an SSE event that is not complete yet.
"""

from __future__ import annotations

import asyncio
import logging

from hutch.gateway import headers as hop
from hutch.gateway.types import Receive, Scope, Send, Target
from hutch.gateway.upstream import UpstreamConnection, UpstreamError, UpstreamPool

log = logging.getLogger(__name__)

NO_BUFFERING = (b"x-accel-buffering", b"no")
# Safe to send twice (RFC 9110 §9.2.2): only these are retried on a new connection.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class _Exchange:
    """The state the proxy and its client watcher share for one request."""

    __slots__ = ("body_sent", "client_gone", "conn", "finished")

    def __init__(self, conn: UpstreamConnection, body_sent: bool) -> None:
        self.conn = conn
        self.body_sent = body_sent  # all of the request is written (else the connection is not reused)
        self.client_gone = False
        self.finished = False


def _frame(data: bytes, chunked: bool, last: bool) -> bytes:
    if not chunked:
        return data
    out = b"%x\r\n%s\r\n" % (len(data), data) if data else b""
    return out + b"0\r\n\r\n" if last else out


async def _watch_client(receive: Receive, exchange: _Exchange, more: bool, chunked: bool) -> None:
    """Stream the rest of the request body, then wait for the client to disconnect."""
    try:
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            data: bytes = message.get("body", b"")
            more = message.get("more_body", False)
            conn = exchange.conn
            conn.write(_frame(data, chunked, not more))
            await conn.drain()
        else:
            exchange.body_sent = True
            message = await receive()
        if message["type"] == "http.disconnect" and not exchange.finished:
            exchange.client_gone = True
            exchange.conn.abort()
    except UpstreamError:
        pass  # the instance went away: the reading side reports it


async def proxy_http(pool: UpstreamPool, target: Target, scope: Scope, receive: Receive, send: Send) -> None:
    """Forward one HTTP request to `target` and stream its answer back.

    Raises:
        UpstreamError: the instance could not be reached or did not answer (no byte was sent yet).
    """
    message = await receive()
    if message["type"] == "http.disconnect":
        return
    body: bytes = message.get("body", b"")
    more: bool = message.get("more_body", False)
    request_headers, chunked = hop.request_headers(scope["headers"], target.drop)
    request_headers += target.add
    length = None if chunked else hop.content_length(scope["headers"])
    if chunked:
        request_headers.append((b"transfer-encoding", b"chunked"))
    elif length is not None:
        request_headers.append((b"content-length", length))
    elif body or more:
        chunked = True  # a body the client did not frame (HTTP/1.0): chunk it
        request_headers.append((b"transfer-encoding", b"chunked"))
    method: str = scope["method"]
    first = hop.request_head(method.encode("latin-1"), target.path, request_headers) + _frame(body, chunked, not more)

    conn, reused = await pool.acquire(target.pool_key, target.socket_path)
    exchange = _Exchange(conn, body_sent=not more)
    head_only = method == "HEAD"
    conn.begin(head_only)
    conn.write(first)
    watcher = asyncio.create_task(_watch_client(receive, exchange, more, chunked))
    try:
        try:
            status, upstream_headers = await conn.read_head()
        except UpstreamError:
            if exchange.client_gone:
                return
            if not (reused and not more and not conn.received and method in IDEMPOTENT):
                raise
            # A pooled connection the instance had closed: once more on a new one.
            conn, _ = await pool.acquire(target.pool_key, target.socket_path, fresh=True)
            exchange.conn = conn
            conn.begin(head_only)
            conn.write(first)
            status, upstream_headers = await conn.read_head()

        answer, sized = hop.response_headers(upstream_headers, target.answer_drop)
        answer += target.answer
        observer = target.observer
        if observer is not None:
            answer += observer.head(status, upstream_headers)
        if not sized and not head_only and status not in (204, 304):
            answer.append(NO_BUFFERING)
        await send({"type": "http.response.start", "status": status, "headers": answer})

        while True:
            try:
                data = await conn.read_body()
            except UpstreamError as exc:
                if not exchange.client_gone:
                    log.warning("%s %s: %s; cutting the client's connection", method, scope["path"], exc.message)
                return  # the ASGI server closes a response left incomplete
            if data is None or conn.complete:
                exchange.finished = True
                watcher.cancel()
                conn.finish(exchange.body_sent)
                if observer is not None:
                    data = observer.body(data or b"", True)
                await send({"type": "http.response.body", "body": data or b"", "more_body": False})
                return
            if exchange.client_gone:
                return
            if observer is not None:
                data = observer.body(data, False)
                if not data:
                    continue  # held back: part of an SSE event still arriving
            await send({"type": "http.response.body", "body": data, "more_body": True})
    finally:
        if not exchange.finished:
            exchange.finished = True
            watcher.cancel()
            exchange.conn.abort()
