"""HTTP/1.1 to instances over their agent's Unix socket: the gateway's upstream client and its pool.

A minimal client on an `asyncio.Protocol`, responses parsed by `httptools` (llhttp): one
exchange at a time per connection, bodies streamed both ways with flow control (a slow client
pauses reading from the instance, a slow instance pauses the upload), no timeouts on reads
(streams may stay open for hours). It was chosen by measurement over aiohttp's and httpx's
clients on a Unix socket (see `bench/gateway.py --clients`): it adds the least per request.

Connections are pooled per `(instance id, port)`: the instance id, never the socket path, so a
replaced or reassigned instance can never be handed a connection meant for another; the port,
because the agent splices a connection that asked for a user-server port to that port for the
rest of its life. Idle connections leave the pool when the instance closes them (its agent
died, a user server's keep-alive ran out) or when the gateway drops the instance's pool; and an
idle connection is polled before it is reused (one system call), so that one the instance closed
a moment ago, before the event loop saw it, never carries a request into the void.

It knows nothing of sessions, affinity or ASGI: `hutch.gateway.proxy` drives it.
"""

from __future__ import annotations

import asyncio
import errno
import select
import time
from collections import deque
from pathlib import Path
from typing import Any

import httptools

from hutch.errors import InstanceCrashed

PoolKey = tuple[str, int | None]  # (instance id, user-server port or None for the agent itself)

HIGH_WATER = 256 * 1024  # response bytes buffered before reading from the instance pauses
MAX_IDLE_PER_KEY = 8  # each idle connection holds a thread in the agent
IDLE_TIMEOUT_S = 60.0


class UpstreamError(InstanceCrashed):
    """The instance could not be reached, or broke the connection before answering in full.

    A gateway answers this 502 (Bad Gateway), not InstanceCrashed's 503: the instance, not hutch,
    failed this request, and the next request recovers the session on a new instance.
    """

    http_status = 502


class InstanceGone(UpstreamError):
    """Nothing listens on the instance's socket any more (refused, or the socket is gone): its
    agent is dead, and nothing of the request reached it, so sending it to a replacement is safe
    whatever its method."""


MISDIRECTED_HEADER = b"x-hutch-misdirected"  # on a 421: a cluster's node does not hold the session


class Misdirected(InstanceCrashed):
    """A cluster's node answered that it does not hold the session (421 `x-hutch-misdirected`):
    the gateway's cached route is stale."""


GONE_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ENOENT, errno.EHOSTUNREACH, errno.ENETUNREACH})
NODE_CONNECT_TIMEOUT_S = 3.0


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to an instance's socket; one request/response at a time."""

    def __init__(self, pool: UpstreamPool, key: PoolKey) -> None:
        self.pool = pool
        self.key = key
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[Any] | None = None  # the proxy waiting for head, body or EOF
        self._drain: asyncio.Future[Any] | None = None  # the proxy waiting for the instance to read
        self._write_paused = False
        self._read_paused = False
        self._reset()

    def _reset(self) -> None:
        self._parser: httptools.HttpResponseParser | None = None
        self._head_only = False
        self._informational = False
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_done = False
        self._until_eof = False
        self._complete = False
        self._keep_alive = False
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._error: UpstreamError | None = None
        self.received = False  # any byte of the answer arrived (then a retry would be wrong)

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or self._complete:
            # Bytes nobody asked for: the connection is out of step, never reuse it.
            self._fail("the instance sent data outside of a response")
            return
        self.received = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail("the instance switched protocols on a plain HTTP request")
        except httptools.HttpParserError as exc:
            self._fail(f"the instance sent an invalid HTTP response ({exc})")

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.discard(self)
        if self._parser is not None and not self._complete and self._error is None:
            if self._head_done and self._until_eof:
                self._complete = True  # a body delimited by the end of the connection
            elif self._head_done:
                self._error = UpstreamError("the instance closed the connection in the middle of its answer")
            else:
                self._error = UpstreamError("the instance closed the connection without answering (did it crash?)")
        self._wake()
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    # -- httptools callbacks -------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._complete:
            self._keep_alive = False  # a second answer to one request: out of step
            return
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        if self._complete:
            self._keep_alive = False
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            # 1xx (100 Continue, 103 Early Hints): informational, the real answer follows.
            self._informational = True
            self._headers = []
            return
        self._status = status
        self._head_done = True
        if self._head_only:
            # The answer to HEAD has no body, whatever its Content-Length says; httptools cannot be
            # told so, and the connection goes back with a fresh parser per request.
            self._complete = True
            self._keep_alive = self._parser.should_keep_alive()
        elif status not in (204, 304):
            framed = False
            for name, _ in self._headers:
                if name == b"content-length" or name == b"transfer-encoding":
                    framed = True
                    break
            self._until_eof = not framed
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._complete:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        if self._complete:
            return
        assert self._parser is not None
        self._keep_alive = self._parser.should_keep_alive()
        self._complete = True
        self._wake()

    # -- used by the proxy ---------------------------------------------------------------------

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = self.loop.create_future()
        await self._waiter

    def _fail(self, message: str) -> None:
        if self._error is None and not self._complete:
            self._error = UpstreamError(message)
        self.abort()

    def begin(self, head_only: bool) -> None:
        """Start an exchange (before writing the request)."""
        self._reset()
        self._head_only = head_only
        self._parser = httptools.HttpResponseParser(self)

    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            raise self._error or UpstreamError("the connection to the instance is closed")
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the instance is not reading what we write (large uploads)."""
        if self._write_paused and not self.closed:
            self._drain = self.loop.create_future()
            await self._drain
        if self.closed:
            raise self._error or UpstreamError("the instance closed the connection while receiving the request")

    async def read_head(self) -> tuple[int, list[tuple[bytes, bytes]]]:
        while not self._head_done:
            if self._error is not None:
                raise self._error
            if self.closed:
                raise UpstreamError("the instance closed the connection without answering (did it crash?)")
            await self._wait()
        return self._status, self._headers

    async def read_body(self) -> bytes | None:
        """The next bytes of the body as they arrive (everything buffered, joined); None at its end."""
        while not self._chunks:
            if self._complete:
                return None
            if self._error is not None:
                raise self._error
            await self._wait()
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._read_paused and self.transport is not None and not self.closed:
            self._read_paused = False
            self.transport.resume_reading()
        return data

    @property
    def answered(self) -> bool:
        """The head of the current exchange's answer has arrived."""
        return self._head_done

    @property
    def complete(self) -> bool:
        return self._complete and not self._chunks

    def finish(self, request_sent: bool) -> None:
        """End the exchange: back to the pool if it can carry another request, else closed."""
        if self._complete and self._keep_alive and request_sent and not self.closed and self._error is None:
            self._parser = None
            self.pool.release(self)
        else:
            self.abort()

    def stale(self) -> bool:
        """An idle connection with something to read (the instance closed it, or sent bytes nobody
        asked for), which the event loop may not have seen yet."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is None:
            return True
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)
        return bool(poller.poll(0))

    def abort(self) -> None:
        """Drop the connection now (the instance sees the peer go away)."""
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self.closed = True
        self.pool.discard(self)


class UpstreamPool:
    """Idle keep-alive connections per (instance id, port)."""

    def __init__(self, max_idle: int = MAX_IDLE_PER_KEY, idle_timeout: float = IDLE_TIMEOUT_S) -> None:
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self._idle: dict[PoolKey, list[UpstreamConnection]] = {}
        self._open: dict[str | None, set[UpstreamConnection]] = {}  # by instance id: idle or in use
        self.opened = 0  # connections made, for tests and the benchmark

    async def acquire(
        self, key: PoolKey, address: Path | str | tuple[str, int], fresh: bool = False
    ) -> tuple[UpstreamConnection, bool]:
        """A connection for one exchange; (connection, reused). `fresh`: never a pooled one.
        `address`: an instance's Unix socket, or (host, port) of a cluster's node.

        Raises:
            InstanceGone: no agent listens on the instance's socket any more.
            UpstreamError: the instance's socket cannot be connected to for another reason.
        """
        if not fresh:
            idle = self._idle.get(key)
            if idle:
                now = time.monotonic()
                while idle:
                    conn = idle.pop()
                    if conn.closed:
                        continue
                    if now - conn.idle_since > self.idle_timeout or conn.stale():
                        conn.abort()
                        continue
                    return conn, True
        loop = asyncio.get_running_loop()
        try:
            if isinstance(address, tuple):
                # A node across a network: one that does not accept in time is as good as gone (a
                # connection never made carried no request, so the caller may go elsewhere).
                made = loop.create_connection(lambda: UpstreamConnection(self, key), *address)
                try:
                    _, conn = await asyncio.wait_for(made, NODE_CONNECT_TIMEOUT_S)
                except TimeoutError:
                    raise InstanceGone(f"node {address[0]}:{address[1]} did not accept a connection") from None
            else:
                _, conn = await loop.create_unix_connection(lambda: UpstreamConnection(self, key), str(address))
        except OSError as exc:
            error = InstanceGone if exc.errno in GONE_ERRNOS else UpstreamError
            raise error(f"the instance is not reachable ({exc.strerror or exc})") from None
        self.opened += 1
        self._open.setdefault(key[0], set()).add(conn)
        return conn, False

    def release(self, conn: UpstreamConnection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= self.max_idle:
            conn.abort()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    def discard(self, conn: UpstreamConnection) -> None:
        """Forget a connection that closed."""
        live = self._open.get(conn.key[0])
        if live is not None:
            live.discard(conn)
            if not live:
                del self._open[conn.key[0]]
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
            if not idle:
                del self._idle[conn.key]

    def drop_instance(self, instance_id: str | None) -> None:
        """Close every idle connection to an instance (its session ended, it was replaced)."""
        for key in [k for k in self._idle if k[0] == instance_id]:
            for conn in self._idle.pop(key):
                conn.abort()

    def cut_instance(self, instance_id: str | None) -> None:
        """Close every connection to an instance, those carrying a request or a stream too (a
        background command's output): it is about to hibernate, and CRIU cannot dump a socket
        whose other end is out here. Their clients see the stream end, as when E2B pauses one."""
        self.drop_instance(instance_id)
        for conn in list(self._open.get(instance_id, ())):
            conn.abort()

    def idle_count(self, instance_id: str | None = None) -> int:
        return sum(len(v) for k, v in self._idle.items() if instance_id is None or k[0] == instance_id)

    def close(self) -> None:
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.abort()
