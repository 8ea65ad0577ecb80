"""The HTTP wire in front of both planes: what `hutch serve` accepts before any app sees a request.

uvicorn's httptools protocol (llhttp) puts no limit on a request head and no deadline on
receiving it: one client could send a header of hundreds of megabytes (httptools accumulates it,
at a quadratic cost in CPU, in hutch's only event loop), or hold thousands of connections open
with a head that never ends (slow loris) until hutch runs out of file descriptors. This protocol
is uvicorn's, with two limits on the head (request line and headers) only:
- at most `MAX_HEAD_BYTES`: beyond, 431 and the connection is closed;
- complete within `head_timeout` seconds (`request_timeout` in the config) of the connection
  opening or of the request's first byte: otherwise 408 and the connection is closed.
Bodies and streams are untouched (uploads and SSE may legitimately take hours); the control
plane bounds its own bodies (`hutch.api.app`).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024
HEAD_TIMEOUT_S = 30.0


class HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a request whose head is too large."""


class GuardedHttpProtocol(HttpToolsProtocol):
    """`uvicorn.run(http=GuardedHttpProtocol)`: see the module docstring."""

    head_timeout = HEAD_TIMEOUT_S
    _in_head = True
    _head_bytes = 0  # bytes received while a head was incomplete
    _head_timer: asyncio.TimerHandle | None = None
    _too_large = False

    @classmethod
    def configured(cls, head_timeout: float) -> type[GuardedHttpProtocol]:
        """This protocol with another deadline for request heads."""
        return type(cls.__name__, (cls,), {"head_timeout": head_timeout})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        waiting = self._in_head
        super().data_received(data)
        if waiting and self._in_head and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(431, "Request Header Fields Too Large", f"request head over {MAX_HEAD_BYTES} bytes")

    def on_message_begin(self) -> None:
        # The first byte of a request (uvicorn's keep-alive timeout covered the wait for it on a
        # kept-alive connection; the deadline of a new connection runs from its opening).
        super().on_message_begin()
        if not self._in_head or self._head_timer is None:
            self._start_head()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._stop_timer()
        # A head that arrived in one piece was not counted as it came: count it whole.
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > MAX_HEAD_BYTES:
            self._too_large = True
            raise HeadTooLarge  # httptools stops; uvicorn answers through send_400_response
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        if self._too_large:
            self._refuse(431, "Request Header Fields Too Large", f"request head over {MAX_HEAD_BYTES} bytes")
            return
        super().send_400_response(msg)

    def _start_head(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        self._stop_timer()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timeout)

    def _stop_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            self._refuse(408, "Request Timeout", f"request head not received within {self.head_timeout:g} s")

    def _refuse(self, status: int, reason: str, message: str) -> None:
        body = message.encode()
        self.transport.write(
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
            + body
        )
        self.transport.close()
        self._stop_timer()
