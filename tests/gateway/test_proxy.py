"""The streaming proxy and its upstream client against scripted HTTP servers on Unix sockets.

Each test plays the instance with a small asyncio server that writes exactly the bytes the case
needs (keep-alive, chunks held back until the client saw the previous ones, 1xx, bodies ended by
EOF, connections dropped mid-answer), and drives `proxy_http` as an ASGI server would.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from hutch.errors import DeadlineExceeded
from hutch.gateway.proxy import proxy_http
from hutch.gateway.types import Target
from hutch.gateway.upstream import UpstreamError, UpstreamPool
from hutch.metadb.records import SessionRecord, SessionStatus

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _session() -> SessionRecord:
    return SessionRecord(
        row_id="r",
        internal_id="i",
        session_id="s",
        tenant_id="t",
        function="f",
        affinity="HEADER_FIELD",
        status=SessionStatus.ACTIVE,
        created_at=0,
        last_modified=0,
        last_activity=0,
        expires_at=0,
        ttl_s=1,
        idle_timeout_s=1,
        instance_id="inst",
    )


def _target(sock: Path, **kwargs) -> Target:
    return Target(session=_session(), address=sock, pool_key=("inst", None), path=b"/p?q=1", **kwargs)


def _scope(method: str = "GET", headers: list[tuple[bytes, bytes]] | None = None) -> dict:
    return {"type": "http", "method": method, "path": "/p", "headers": headers or [(b"host", b"example")]}


class Client:
    """The ASGI server's side: feeds request messages, records what the proxy sends."""

    def __init__(self, body: list[bytes] | None = None) -> None:
        self.incoming: asyncio.Queue[dict] = asyncio.Queue()
        chunks = body or [b""]
        for i, chunk in enumerate(chunks):
            self.incoming.put_nowait({"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1})
        self.sent: list[dict] = []
        self.got_body = asyncio.Event()

    async def receive(self) -> dict:
        return await self.incoming.get()

    async def send(self, message: dict) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body":
            self.got_body.set()

    def disconnect(self) -> None:
        self.incoming.put_nowait({"type": "http.disconnect"})

    @property
    def status(self) -> int:
        return self.sent[0]["status"]

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.sent[0]["headers"])

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent[1:])

    @property
    def complete(self) -> bool:
        return bool(self.sent) and self.sent[-1]["type"] == "http.response.body" and not self.sent[-1]["more_body"]


async def read_head(reader: asyncio.StreamReader) -> tuple[str, dict[str, str]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    out = b""
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        data = await reader.readexactly(size + 2)
        if size == 0:
            return out
        out += data[:-2]


def run(handler: Handler, test: Callable[[Path, UpstreamPool], Awaitable[None]], tmp_path: Path) -> None:
    async def main() -> None:
        sock = tmp_path / "up.sock"
        server = await asyncio.start_unix_server(handler, str(sock))
        pool = UpstreamPool()
        try:
            async with asyncio.timeout(20):
                await test(sock, pool)
        finally:
            pool.close()
            server.close()

    asyncio.run(main())


def test_a_keep_alive_connection_carries_the_next_request(tmp_path):
    seen = []

    async def handler(reader, writer):
        while True:
            try:
                line, _ = await read_head(reader)
            except asyncio.IncompleteReadError:
                return
            seen.append(line)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    async def test(sock, pool):
        for _ in range(3):
            client = Client()
            await proxy_http(pool, _target(sock), _scope(), client.receive, client.send)
            assert client.status == 200 and client.body == b"ok" and client.complete
        assert pool.opened == 1
        assert seen == ["GET /p?q=1 HTTP/1.1"] * 3

    run(handler, test, tmp_path)


def test_chunks_reach_the_client_before_the_answer_ends(tmp_path):
    async def handler(reader, writer):
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: text/event-stream\r\n\r\n")
        writer.write(b"d\r\ndata: first\n\n\r\n")
        await released.wait()  # only once the client has the first event
        writer.write(b"e\r\ndata: second\n\n\r\n0\r\n\r\n")

    released = asyncio.Event()

    async def test(sock, pool):
        client = Client()
        task = asyncio.create_task(proxy_http(pool, _target(sock), _scope(), client.receive, client.send))
        await client.got_body.wait()
        assert client.body == b"data: first\n\n" and not client.complete
        assert client.headers[b"x-accel-buffering"] == b"no"
        assert b"transfer-encoding" not in client.headers
        released.set()
        await task
        assert client.body == b"data: first\n\ndata: second\n\n" and client.complete

    run(handler, test, tmp_path)


@pytest.mark.parametrize("chunked", [False, True])
def test_a_request_body_is_streamed_upstream_with_its_framing(tmp_path, chunked):
    parts = [b"a" * 70000, b"b" * 5, b"c" * 100000]
    total = b"".join(parts)

    async def handler(reader, writer):
        _, headers = await read_head(reader)
        if headers.get("transfer-encoding") == "chunked":
            data = await read_chunked(reader)
        else:
            data = await reader.readexactly(int(headers["content-length"]))
        digest = hashlib.sha256(data).hexdigest().encode()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(digest), digest))

    async def test(sock, pool):
        framing = (b"transfer-encoding", b"chunked") if chunked else (b"content-length", str(len(total)).encode())
        client = Client(body=parts)
        await proxy_http(pool, _target(sock), _scope("POST", [(b"host", b"h"), framing]), client.receive, client.send)
        assert client.body == hashlib.sha256(total).hexdigest().encode()

    run(handler, test, tmp_path)


def test_hop_by_hop_headers_stop_at_the_gateway_both_ways(tmp_path):
    received: dict[str, str] = {}

    async def handler(reader, writer):
        _, headers = await read_head(reader)
        received.update(headers)
        writer.write(
            b"HTTP/1.1 200 OK\r\nconnection: x-private\r\nx-private: 1\r\nkeep-alive: timeout=5\r\n"
            b"x-end-to-end: yes\r\ncontent-length: 0\r\n\r\n"
        )

    async def test(sock, pool):
        headers = [
            (b"host", b"h"),
            (b"connection", b"keep-alive, x-hop"),
            (b"x-hop", b"secret"),
            (b"te", b"trailers"),
            (b"proxy-authorization", b"Basic Zm9v"),
            (b"upgrade", b"h2c"),
            (b"x-api-key", b"hk_key"),
            (b"x-kept", b"1"),
        ]
        client = Client()
        target = _target(sock, drop=frozenset({b"x-api-key"}), add=[(b"e2b-sandbox-port", b"8080")])
        await proxy_http(pool, target, _scope("GET", headers), client.receive, client.send)
        assert set(received) == {"host", "x-kept", "e2b-sandbox-port"}
        assert client.headers == {b"x-end-to-end": b"yes", b"content-length": b"0"}

    run(handler, test, tmp_path)


def test_head_answers_have_no_body_and_the_connection_is_reused(tmp_path):
    async def handler(reader, writer):
        while True:
            try:
                line, _ = await read_head(reader)
            except asyncio.IncompleteReadError:
                return
            if line.startswith("HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nget")

    async def test(sock, pool):
        head = Client()
        await proxy_http(pool, _target(sock), _scope("HEAD"), head.receive, head.send)
        assert head.status == 200 and head.headers[b"content-length"] == b"1000" and head.complete
        get = Client()
        await proxy_http(pool, _target(sock), _scope(), get.receive, get.send)
        assert get.body == b"get" and pool.opened == 1

    run(handler, test, tmp_path)


def test_informational_answers_are_skipped(tmp_path):
    async def handler(reader, writer):
        await read_head(reader)
        writer.write(
            b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 1\r\n\r\nx"
        )

    async def test(sock, pool):
        client = Client()
        await proxy_http(pool, _target(sock), _scope(), client.receive, client.send)
        assert client.status == 201 and client.body == b"x" and b"link" not in client.headers

    run(handler, test, tmp_path)


def test_a_body_ended_by_closing_the_connection_is_complete(tmp_path):
    async def handler(reader, writer):
        await read_head(reader)
        writer.write(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nall of it")
        writer.close()

    async def test(sock, pool):
        client = Client()
        await proxy_http(pool, _target(sock), _scope(), client.receive, client.send)
        assert client.body == b"all of it" and client.complete and pool.idle_count() == 0

    run(handler, test, tmp_path)


def test_an_instance_that_dies_mid_answer_leaves_the_answer_incomplete(tmp_path):
    async def handler(reader, writer):
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        await writer.drain()
        writer.transport.abort()

    async def test(sock, pool):
        client = Client()
        await proxy_http(pool, _target(sock), _scope(), client.receive, client.send)
        assert client.status == 200 and client.body == b"partial" and not client.complete

    run(handler, test, tmp_path)


def test_an_instance_that_closes_without_answering_is_a_bad_gateway(tmp_path):
    async def handler(reader, writer):
        await read_head(reader)
        writer.transport.abort()

    async def test(sock, pool):
        client = Client()
        with pytest.raises(UpstreamError) as caught:
            await proxy_http(pool, _target(sock), _scope(), client.receive, client.send)
        assert caught.value.http_status == 502 and client.sent == []

    run(handler, test, tmp_path)


def test_an_unreachable_instance_is_a_bad_gateway(tmp_path):
    async def main() -> None:
        client = Client()
        with pytest.raises(UpstreamError):
            await proxy_http(UpstreamPool(), _target(tmp_path / "missing.sock"), _scope(), client.receive, client.send)

    asyncio.run(main())


def test_a_pooled_connection_closed_by_the_instance_is_retried_once_on_a_new_one(tmp_path):
    async def handler(reader, writer):
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n1")
        await read_head(reader)  # a keep-alive server whose timeout ran out just now
        writer.transport.abort()

    async def test(sock, pool):
        for _ in range(2):
            client = Client()
            await proxy_http(pool, _target(sock), _scope(), client.receive, client.send)
            assert client.body == b"1"
        assert pool.opened == 2

    run(handler, test, tmp_path)


def test_a_post_on_a_pooled_connection_the_instance_closed_is_not_sent_twice(tmp_path):
    requests = []

    async def handler(reader, writer):
        requests.append(await read_head(reader))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n1")
        requests.append(await read_head(reader))
        writer.transport.abort()

    async def test(sock, pool):
        first = Client()
        await proxy_http(pool, _target(sock), _scope(), first.receive, first.send)
        post = Client(body=[b"x"])
        headers = [(b"host", b"h"), (b"content-length", b"1")]
        with pytest.raises(UpstreamError):
            await proxy_http(pool, _target(sock), _scope("POST", headers), post.receive, post.send)
        assert len(requests) == 2 and pool.opened == 1

    run(handler, test, tmp_path)


def test_a_client_that_leaves_closes_the_upstream_connection(tmp_path):
    upstream_saw_eof = asyncio.Event()

    async def handler(reader, writer):
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        if await reader.read() == b"":
            upstream_saw_eof.set()

    async def test(sock, pool):
        client = Client()
        task = asyncio.create_task(proxy_http(pool, _target(sock), _scope(), client.receive, client.send))
        await client.got_body.wait()
        client.disconnect()
        await upstream_saw_eof.wait()
        await task
        assert not client.complete and pool.idle_count() == 0

    run(handler, test, tmp_path)


def _envelope(flags: int, message: dict) -> bytes:
    data = json.dumps(message).encode()
    return bytes([flags]) + len(data).to_bytes(4, "big") + data


def _envelopes(data: bytes) -> list[tuple[int, dict]]:
    out = []
    while data:
        length = int.from_bytes(data[1:5], "big")
        out.append((data[0], json.loads(data[5 : 5 + length])))
        data = data[5 + length :]
    return out


def test_an_agent_stream_cut_between_envelopes_ends_with_a_connect_unavailable_error(tmp_path):
    start = _envelope(0, {"event": {"start": {"pid": 7}}})

    async def handler(reader, writer):
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/connect+json\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.write(b"%x\r\n%s\r\n" % (len(start), start))
        await writer.drain()
        writer.transport.abort()  # the instance is killed mid-command

    async def test(sock, pool):
        client = Client()
        await proxy_http(pool, _target(sock), _scope("POST"), client.receive, client.send)
        assert client.status == 200 and client.complete
        (flags, first), (end_flags, end) = _envelopes(client.body)
        assert flags == 0 and first == {"event": {"start": {"pid": 7}}}
        assert end_flags == 2 and end["error"]["code"] == "unavailable"
        assert end["error"]["message"] == "the connection to sandbox s ended before the stream completed"

    run(handler, test, tmp_path)


def test_an_agent_stream_cut_inside_an_envelope_is_cut_for_the_client_too(tmp_path):
    start = _envelope(0, {"event": {"start": {"pid": 7}}})

    async def handler(reader, writer):
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/connect+json\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.write(b"%x\r\n%s\r\n" % (len(start) - 3, start[:-3]))
        await writer.drain()
        writer.transport.abort()

    async def test(sock, pool):
        client = Client()
        await proxy_http(pool, _target(sock), _scope("POST"), client.receive, client.send)
        assert client.body == start[:-3] and not client.complete

    run(handler, test, tmp_path)


def test_a_code_interpreter_answer_cut_between_lines_ends_with_an_error_line(tmp_path):
    async def handler(reader, writer):
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n")
        line = b'{"type": "number_of_executions", "execution_count": 1}\n'
        writer.write(b"%x\r\n%s\r\n" % (len(line), line))
        await writer.drain()
        writer.transport.abort()

    async def test(sock, pool):
        client = Client()
        await proxy_http(pool, _target(sock), _scope("POST"), client.receive, client.send)
        lines = [json.loads(line) for line in client.body.splitlines()]
        assert client.complete and lines[0]["type"] == "number_of_executions"
        assert lines[1]["type"] == "error" and lines[1]["name"] == "InstanceStopped"

    run(handler, test, tmp_path)


def test_a_user_server_stream_that_is_cut_is_never_completed_by_the_gateway(tmp_path):
    async def handler(reader, writer):
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.write(b"3\r\n{}\n\r\n")
        await writer.drain()
        writer.transport.abort()

    async def test(sock, pool):
        client = Client()
        target = Target(session=_session(), address=sock, pool_key=("inst", 8080), path=b"/")
        await proxy_http(pool, target, _scope(), client.receive, client.send)
        assert client.body == b"{}\n" and not client.complete

    run(handler, test, tmp_path)


def test_an_instance_that_never_answers_is_a_gateway_timeout_after_the_head_timeout(tmp_path):
    dropped = asyncio.Event()

    async def handler(reader, writer):
        await read_head(reader)
        await reader.read()  # a frozen instance: reads nothing more, answers nothing
        dropped.set()

    async def test(sock, pool):
        client = Client()
        with pytest.raises(DeadlineExceeded) as caught:
            await proxy_http(pool, _target(sock), _scope(), client.receive, client.send, head_timeout=0.2)
        assert caught.value.http_status == 504 and "within 0.2 s" in caught.value.message
        await dropped.wait()  # the upstream connection was dropped
        assert client.sent == [] and pool.idle_count() == 0

    run(handler, test, tmp_path)


def test_a_slow_client_upload_does_not_count_against_the_head_timeout(tmp_path):
    async def handler(reader, writer):
        _, headers = await read_head(reader)
        data = await reader.readexactly(int(headers["content-length"]))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(data), data))

    async def test(sock, pool):
        client = Client()
        client.incoming = asyncio.Queue()
        scope = _scope("POST", [(b"host", b"h"), (b"content-length", b"6")])
        proxied = proxy_http(pool, _target(sock), scope, client.receive, client.send, head_timeout=0.2)
        task = asyncio.create_task(proxied)
        for part in (b"ab", b"cd", b"ef"):
            client.incoming.put_nowait({"type": "http.request", "body": part, "more_body": part != b"ef"})
            await asyncio.sleep(0.15)  # 0.45 s in all: longer than the timeout, but the client's doing
        await task
        assert client.status == 200 and client.body == b"abcdef"

    run(handler, test, tmp_path)


def test_a_request_to_an_instance_whose_agent_is_gone_goes_to_the_one_that_replaces_it(tmp_path):
    async def handler(reader, writer):
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nnew")

    async def test(sock, pool):
        dead = tmp_path / "dead.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(dead))
        listener.close()  # the socket file is there; nobody listens on it (connection refused)
        rerouted: list[tuple] = []

        async def reroute(target: Target) -> Target:
            rerouted.append(target.pool_key)
            return Target(session=target.session, address=sock, pool_key=("replacement", None), path=target.path)

        client = Client()
        target = Target(session=_session(), address=dead, pool_key=("inst", None), path=b"/")
        await proxy_http(pool, target, _scope("POST"), client.receive, client.send, reroute=reroute)
        assert rerouted == [("inst", None)] and client.status == 200 and client.body == b"new"

    run(handler, test, tmp_path)


def test_an_agent_answer_that_already_sets_no_buffering_gets_it_once(tmp_path):
    async def handler(reader, writer):
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nx-accel-buffering: no\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.write(b"1\r\nx\r\n0\r\n\r\n")

    async def test(sock, pool):
        client = Client()
        await proxy_http(pool, _target(sock), _scope(), client.receive, client.send)
        assert [h for h in client.sent[0]["headers"] if h[0] == b"x-accel-buffering"] == [(b"x-accel-buffering", b"no")]

    run(handler, test, tmp_path)


def test_an_instance_that_dies_during_an_upload_is_a_502_after_the_rest_of_the_body_is_read(tmp_path):
    async def handler(reader, writer):
        await read_head(reader)
        await reader.readexactly(10)
        writer.transport.abort()  # killed while the client still uploads

    async def test(sock, pool):
        client = Client(body=[b"x" * 10, b"y" * 70000, b"z" * 70000, b"end"])
        headers = [(b"host", b"h"), (b"content-length", b"140013")]
        with pytest.raises(UpstreamError) as caught:
            await proxy_http(pool, _target(sock), _scope("POST", headers), client.receive, client.send)
        assert caught.value.http_status == 502 and client.sent == []
        assert client.incoming.empty()  # every part was read: the client can now read the answer

    run(handler, test, tmp_path)
