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
- An instance that fails before answering is a 502 (raised to the gateway's error boundary), sent
  once the rest of the request body is read and dropped (up to 64 MB, 10 s), so that a client
  still uploading reads it rather than a reset connection. One that fails mid-answer cuts the
  client's connection, as it cannot be told otherwise once the status line is out; except that
  an agent's own Connect or NDJSON stream is ended with that protocol's error where it stopped
  between two messages (`hutch.gateway.endings`).
- An instance whose socket nobody listens on any more (its agent died a moment ago, before hutch
  saw its exit) never saw the request: `reroute` (the gateway's) replaces the instance and the
  request goes to the new one, whatever its method.
- An instance that does not begin its answer within `head_timeout` seconds of having the whole
  request (or that stops taking a request body for that long: a frozen or hung instance) is a
  504; the upstream connection is dropped. The wait for a slow client does not count, and once
  the answer has begun there is no timeout.
- A pooled connection that turns out closed (a user server's keep-alive ended just then) is
  retried once on a new one, for idempotent methods whose body was sent whole and when nothing
  was answered; anything else is a 502 rather than a request the instance might see twice (or
  that, having crashed one instance, would crash its replacement too).
- A target's `observer` (MCP session affinity) sees the answer's head before the client does,
  and may add headers to it; it sees every chunk before the client does too, and may hold back
  the bytes of an SSE event that is not complete yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from hutch.errors import DeadlineExceeded
from hutch.gateway import endings
from hutch.gateway import headers as hop
from hutch.gateway.types import Receive, Scope, Send, Target
from hutch.gateway.upstream import InstanceGone, UpstreamConnection, UpstreamError, UpstreamPool

log = logging.getLogger(__name__)

NO_BUFFERING = (b"x-accel-buffering", b"no")
# Safe to send twice (RFC 9110 §9.2.2): only these are retried on a new connection.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
DISCARD_LIMIT = 64 * 1024 * 1024  # request bytes read and dropped before an error answer (beyond: cut)
DISCARD_SECONDS = 10.0


class _Exchange:
    """The state the proxy and its client watcher share for one request."""

    __slots__ = ("body_sent", "client_gone", "conn", "finished", "stalled_since", "timed_out", "timer")

    def __init__(self, conn: UpstreamConnection, body_sent: bool) -> None:
        self.conn = conn
        self.body_sent = body_sent  # all of the request is written (else the connection is not reused)
        self.client_gone = False
        self.finished = False
        self.stalled_since: float | None = None  # waiting for the instance since (loop time); None: for the client
        self.timed_out = False  # the instance did not answer within the head timeout
        self.timer: asyncio.TimerHandle | None = None


def _frame(data: bytes, chunked: bool, last: bool) -> bytes:
    if not chunked:
        return data
    out = b"%x\r\n%s\r\n" % (len(data), data) if data else b""
    return out + b"0\r\n\r\n" if last else out


async def _watch_client(receive: Receive, exchange: _Exchange, more: bool, chunked: bool) -> None:
    """Stream the rest of the request body, then wait for the client to disconnect."""
    loop = asyncio.get_running_loop()
    try:
        while more:
            exchange.stalled_since = None  # the client's turn: its slowness is not the instance's
            message = await receive()
            if message["type"] != "http.request":
                break
            data: bytes = message.get("body", b"")
            more = message.get("more_body", False)
            conn = exchange.conn
            conn.write(_frame(data, chunked, not more))
            exchange.stalled_since = loop.time()
            await conn.drain()
        else:
            exchange.body_sent = True
            message = await receive()
        if message["type"] == "http.disconnect" and not exchange.finished:
            exchange.client_gone = True
            exchange.conn.abort()
    except UpstreamError:
        # The instance went away (the reading side reports it). Read and drop the rest of the body,
        # so that a client still uploading gets to read the error answer.
        dropped = 0
        while more and dropped < DISCARD_LIMIT:
            message = await receive()
            if message["type"] != "http.request":
                break
            dropped += len(message.get("body", b""))
            more = message.get("more_body", False)


async def _body_dropped(exchange: _Exchange, watcher: asyncio.Task[Any]) -> None:
    """Before an error answer to a request the instance did not take whole: wait (a bounded time)
    for the client watcher to read and drop the rest of its body."""
    if not exchange.body_sent:
        with contextlib.suppress(TimeoutError, UpstreamError):
            await asyncio.wait_for(asyncio.shield(watcher), DISCARD_SECONDS)


def _watch_head(exchange: _Exchange, timeout: float) -> None:
    """Drop the upstream connection once the instance has kept the request waiting `timeout` s."""
    loop = asyncio.get_running_loop()

    def check() -> None:
        if exchange.conn.answered:
            return
        since = exchange.stalled_since
        waited = 0.0 if since is None else loop.time() - since
        if waited >= timeout:
            exchange.timed_out = True
            exchange.conn.abort()  # read_head raises; the proxy answers 504
        else:
            exchange.timer = loop.call_later(timeout - waited, check)

    exchange.timer = loop.call_later(timeout, check)


def _stream_ended(target: Target) -> str:
    # E2B's own words: the SDKs then probe the sandbox and, if it is gone, raise
    # SandboxNotRunningException ("killed or reached its end of life while the request was in flight").
    return f"the connection to sandbox {target.session.session_id} ended before the stream completed"


async def _connect(
    pool: UpstreamPool, target: Target, reroute: Callable[[Target], Awaitable[Target]] | None, fresh: bool = False
) -> tuple[UpstreamConnection, bool, Target]:
    """A connection to the target's instance, or to its replacement if it is gone; (conn, reused, target)."""
    assert target.address is not None  # the gateway sets it (a node's, in a cluster) before proxying
    try:
        conn, reused = await pool.acquire(target.pool_key, target.address, fresh=fresh)
    except InstanceGone:
        if reroute is None:
            raise
        target = await reroute(target)
        assert target.address is not None
        conn, reused = await pool.acquire(target.pool_key, target.address, fresh=fresh)
    return conn, reused, target


async def proxy_http(
    pool: UpstreamPool,
    target: Target,
    scope: Scope,
    receive: Receive,
    send: Send,
    *,
    head_timeout: float | None = None,
    reroute: Callable[[Target], Awaitable[Target]] | None = None,
    ended: Callable[[Target], bool] | None = None,
) -> None:
    """Forward one HTTP request to `target` and stream its answer back.

    `head_timeout`: see the module docstring (None: wait as long as it takes). `reroute`: called
    with the target when its instance is gone before the request reached it; returns the target
    on the instance that replaces it. `ended`: whether the target's session has ended (killed,
    timed out): a code interpreter answer it cut short is then cut for the client too, as E2B's
    proxy does, and the SDK, finding the sandbox gone, says it was killed mid-request.

    Raises:
        UpstreamError: the instance could not be reached or did not answer (no byte was sent yet).
        DeadlineExceeded: the instance did not begin its answer within `head_timeout`.
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

    conn, reused, target = await _connect(pool, target, reroute)
    exchange = _Exchange(conn, body_sent=not more)
    head_only = method == "HEAD"
    conn.begin(head_only)
    conn.write(first)
    if not more:
        exchange.stalled_since = asyncio.get_running_loop().time()
    if head_timeout is not None:
        _watch_head(exchange, head_timeout)
    watcher = asyncio.create_task(_watch_client(receive, exchange, more, chunked))
    try:
        try:
            status, upstream_headers = await conn.read_head()
        except UpstreamError:
            if exchange.client_gone:
                return
            if exchange.timed_out:
                await _body_dropped(exchange, watcher)
                raise DeadlineExceeded(
                    f"the instance did not begin its answer within {head_timeout:g} s (frozen, hung or "
                    "overloaded); the request was abandoned"
                ) from None
            if not (reused and not more and not conn.received and method in IDEMPOTENT):
                await _body_dropped(exchange, watcher)
                raise  # never again after a crash: a request that kills its instance would kill the next
            # A pooled connection the instance had closed: once more on a new one.
            conn, _, target = await _connect(pool, target, None, fresh=True)  # the same instance only
            exchange.conn = conn
            conn.begin(head_only)
            conn.write(first)
            status, upstream_headers = await conn.read_head()
        if exchange.timer is not None:
            exchange.timer.cancel()

        answer, sized = hop.response_headers(upstream_headers, target.answer_drop)
        answer += target.answer
        observer = target.observer
        if observer is not None:
            answer += observer.head(status, upstream_headers)
        if not sized and not head_only and status not in (204, 304) and NO_BUFFERING not in answer:
            answer.append(NO_BUFFERING)
        await send({"type": "http.response.start", "status": status, "headers": answer})
        # The agent's own streams (not a user server's) can be ended with an error if cut.
        ending = endings.for_answer(upstream_headers) if target.pool_key[1] is None and observer is None else None

        while True:
            try:
                data = await conn.read_body()
            except UpstreamError as exc:
                if exchange.client_gone:
                    return
                tail = ending.tail(_stream_ended(target)) if ending is not None else None
                if (
                    tail is not None
                    and isinstance(ending, endings.NdjsonEnding)
                    and ended is not None
                    and ended(target)
                ):
                    tail = None  # the sandbox was killed: the SDK probes it and words that itself
                if tail is not None:
                    log.warning("%s %s: %s; ending the stream with an error", method, scope["path"], exc.message)
                    await send({"type": "http.response.body", "body": tail, "more_body": False})
                    return
                log.warning("%s %s: %s; cutting the client's connection", method, scope["path"], exc.message)
                return  # the ASGI server closes a response left incomplete
            if data is None or conn.complete:
                exchange.finished = True
                watcher.cancel()
                conn.finish(exchange.body_sent)
                if observer is not None:
                    data = observer.body(data or b"", True)
                    await observer.settle()
                await send({"type": "http.response.body", "body": data or b"", "more_body": False})
                return
            if exchange.client_gone:
                return
            if observer is not None:
                data = observer.body(data, False)
                if not data:
                    continue  # held back: part of an SSE event still arriving
                await observer.settle()  # a binding this chunk reveals is recorded first
            if ending is not None:
                ending.feed(data)
            await send({"type": "http.response.body", "body": data, "more_body": True})
    finally:
        if exchange.timer is not None:
            exchange.timer.cancel()
        if not exchange.finished:
            exchange.finished = True
            watcher.cancel()
            exchange.conn.abort()
