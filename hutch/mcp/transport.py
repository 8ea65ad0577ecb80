"""An httpx transport that calls hutch's own ASGI app in-process and streams its answers.

The MCP tools of `/mcp` reach hutch's API and gateway in-process. httpx's `ASGITransport` runs
the app to its end and keeps the whole answer in memory before returning it: a sandbox that
writes gigabytes to stdout would then make `hutch serve` itself hold gigabytes. This transport
returns as soon as the answer's head is sent and hands its body over chunk by chunk through a
small bounded queue (the app waits while the reader is behind, as over a socket). Closing the
answer early is a client disconnect to the app, whose task is then cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx

QUEUE_CHUNKS = 8  # body chunks buffered between the app and the reader
_END = object()


class _AnswerStream(httpx.AsyncByteStream):
    def __init__(self, chunks: asyncio.Queue, task: asyncio.Task, gone: asyncio.Event) -> None:
        self._chunks = chunks
        self._task = task
        self._gone = gone

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            chunk = await self._chunks.get()
            if chunk is _END:
                break
            if isinstance(chunk, BaseException):
                raise httpx.ReadError(f"the app failed: {chunk!r}")
            yield chunk

    async def aclose(self) -> None:
        self._gone.set()
        if not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


class StreamingASGITransport(httpx.AsyncBaseTransport):
    """`httpx.AsyncClient(transport=StreamingASGITransport(app))`: see the module docstring."""

    def __init__(self, app: Any, client: tuple[str, int] = ("127.0.0.1", 123)) -> None:
        self.app = app
        self.client = client

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": request.method,
            "headers": [(k.lower(), v) for (k, v) in request.headers.raw],
            "scheme": request.url.scheme,
            "path": request.url.path,
            "raw_path": request.url.raw_path.split(b"?")[0],
            "query_string": request.url.query,
            "server": (request.url.host, request.url.port),
            "client": self.client,
            "root_path": "",
        }
        body = request.stream.__aiter__()
        sent_all = False
        finished = False  # the app sent its last body chunk
        gone = asyncio.Event()  # the reader closed the answer
        head: asyncio.Future = asyncio.get_running_loop().create_future()
        chunks: asyncio.Queue = asyncio.Queue(QUEUE_CHUNKS)

        async def receive() -> dict:
            nonlocal sent_all
            if sent_all:
                await gone.wait()
                return {"type": "http.disconnect"}
            try:
                data = await body.__anext__()
            except StopAsyncIteration:
                sent_all = True
                return {"type": "http.request", "body": b"", "more_body": False}
            return {"type": "http.request", "body": data, "more_body": True}

        async def send(message: dict) -> None:
            nonlocal finished
            if message["type"] == "http.response.start":
                head.set_result(message)
            elif message["type"] == "http.response.body" and not finished:
                data = message.get("body", b"")
                if data and request.method != "HEAD":
                    await chunks.put(data)
                if not message.get("more_body", False):
                    finished = True
                    await chunks.put(_END)

        async def run() -> None:
            try:
                await self.app(scope, receive, send)
            except Exception as exc:
                if not head.done():
                    head.set_exception(exc)
                elif not finished and not gone.is_set():
                    await chunks.put(exc)
                raise
            if not head.done():
                head.set_exception(RuntimeError("the app sent no answer"))
            elif not finished and not gone.is_set():
                await chunks.put(_END)  # an app that never said "no more body"

        task = asyncio.create_task(run())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: no warning
        try:
            start = await head
        except BaseException:
            task.cancel()
            raise
        stream = _AnswerStream(chunks, task, gone)
        return httpx.Response(start["status"], headers=start.get("headers", []), stream=stream)
