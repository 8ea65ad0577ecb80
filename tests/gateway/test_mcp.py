"""MCP session affinity in the gateway: which session a request belongs to, the bindings of MCP
session ids, the endpoint event of HTTP+SSE streams, and what the answer head teaches the gateway.

The SSE cases feed `EndpointEvent` the bytes real servers write (the Python SDK's sse-starlette
with CRLF, the TypeScript SDK's Express with LF), whole and split at every byte. The exchange
cases drive `proxy_http` against scripted instances on Unix sockets, as `test_proxy.py` does,
with a recording stand-in for the session manager's `end` (the thing under test is the gateway).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from hutch.functions import FunctionSpec
from hutch.gateway import mcp
from hutch.gateway.proxy import proxy_http
from hutch.gateway.types import Target
from hutch.gateway.upstream import UpstreamPool
from hutch.metadb.records import SessionRecord, SessionStatus
from tests.gateway.test_proxy import Client, read_head

PYTHON_ENDPOINT = b"event: endpoint\r\ndata: /messages/?session_id=4f2a9c\r\n\r\n"
TS_ENDPOINT = b"event: endpoint\ndata: /messages?sessionId=7b1e-33\n\n"
PREFIX = b"/functions/counter/invoke"


def _spec(mode: str = "MCP_STREAMABLE") -> FunctionSpec:
    return FunctionSpec.model_validate(
        {"name": "counter", "sessionAffinity": mode, "startCommand": ["python3", "s.py"], "port": 8000}
    )


def _session(row: str = "r1", internal: str = "i1", tenant: str = "t1") -> SessionRecord:
    return SessionRecord(
        row_id=row,
        internal_id=internal,
        session_id="s-" + row,
        tenant_id=tenant,
        function="counter",
        affinity="MCP_STREAMABLE",
        status=SessionStatus.ACTIVE,
        created_at=0,
        last_modified=0,
        last_activity=0,
        expires_at=0,
        ttl_s=600,
        idle_timeout_s=60,
        instance_id="inst",
    )


def _scope(method: str = "POST", headers=(), query: bytes = b"") -> dict:
    return {"type": "http", "method": method, "path": "/functions/counter/invoke/mcp", "headers": list(headers),
            "query_string": query}  # fmt: skip


# -- which session ---------------------------------------------------------------------------------


def test_an_unknown_mcp_session_id_is_the_404_the_spec_requires():
    bindings = mcp.McpBindings()
    # An id this gateway has not bound is for MetaDB to settle (another gateway may have bound
    # it, `invoke.resolve` asks): the plan names it unbound, with its transport.
    found = mcp.plan(_spec(), _scope(headers=[(b"mcp-session-id", b"abc")]), "t1", "counter", None, bindings)
    assert (found.bound, found.mcp_id, found.transport) == (None, "abc", mcp.HTTP)
    sse = mcp.plan(_spec("MCP_SSE"), _scope(query=b"session_id=abc"), "t1", "counter", None, bindings)
    assert (sse.bound, sse.mcp_id, sse.transport) == (None, "abc", mcp.SSE)
    refusal = mcp.SessionNotFound()  # what resolve raises when MetaDB does not know it either
    assert refusal.http_status == 404
    assert refusal.body() == b'{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"Session not found"}}'


def test_mcp_session_ids_are_bound_per_tenant_and_function():
    bindings = mcp.McpBindings()
    bindings.bind(("t1", "counter", mcp.HTTP, "abc"), _session())
    scope = _scope(headers=[(b"mcp-session-id", b"abc")])
    assert mcp.plan(_spec(), scope, "t1", "counter", None, bindings).bound == ("i1", "r1")
    assert mcp.plan(_spec(), scope, "t2", "counter", None, bindings).bound is None  # another tenant's id
    assert mcp.plan(_spec(), scope, "t1", "other", None, bindings).bound is None


def test_a_session_that_ends_takes_its_bindings_with_it():
    bindings = mcp.McpBindings()
    bindings.bind(("t1", "counter", mcp.HTTP, "a"), _session("r1"))
    bindings.bind(("t1", "counter", mcp.SSE, "b"), _session("r1"))
    bindings.bind(("t1", "counter", mcp.HTTP, "c"), _session("r2", "i2"))
    bindings.forget("r1")
    assert bindings.lookup(("t1", "counter", mcp.HTTP, "a")) is None
    assert bindings.lookup(("t1", "counter", mcp.SSE, "b")) is None
    assert bindings.lookup(("t1", "counter", mcp.HTTP, "c")) == ("i2", "r2")
    assert len(bindings) == 1


def test_bindings_recorded_in_session_metadata_come_back_after_a_restart():
    bindings = mcp.McpBindings()
    kept = _session("r1")
    kept.metadata = {mcp.METADATA_KEY: "abc"}
    bindings.restore([kept, _session("r2", "i2")])
    assert bindings.lookup(("t1", "counter", mcp.HTTP, "abc")) == ("i1", "r1")
    assert len(bindings) == 1


def test_without_a_session_id_the_path_then_mcp_param_then_header_then_cookie_name_the_session():
    bindings = mcp.McpBindings()
    headers = [(b"cookie", b"x-fc-cookie-session-id=c1"), (b"x-fc-session-id", b"h1"), (b"mcp-param-sandbox-id", b"p1")]
    assert mcp.plan(_spec(), _scope(headers=headers), "t1", "counter", "path1", bindings).session_key == "path1"
    found = mcp.plan(_spec(), _scope(headers=headers), "t1", "counter", None, bindings)
    assert (found.session_key, found.keyed) == ("p1", True)
    assert mcp.plan(_spec(), _scope(headers=headers[:2]), "t1", "counter", None, bindings).session_key == "h1"
    assert mcp.plan(_spec(), _scope(headers=headers[:1]), "t1", "counter", None, bindings).session_key == "c1"
    new = mcp.plan(_spec(), _scope(), "t1", "counter", None, bindings)
    assert (new.session_key, new.keyed) == (None, False)  # a POST without anything: a new session


def test_a_malformed_key_is_a_json_rpc_400():
    with pytest.raises(mcp.JsonRpcError) as caught:
        mcp.plan(_spec(), _scope(), "t1", "counter", "../etc", mcp.McpBindings())
    assert caught.value.http_status == 400
    assert json.loads(caught.value.body())["error"]["code"] == -32600


@pytest.mark.parametrize(
    ("mode", "method", "query", "message"),
    [
        ("MCP_STREAMABLE", "GET", b"", "Mcp-Session-Id header is required"),
        ("MCP_STREAMABLE", "DELETE", b"", "Mcp-Session-Id header is required"),
        ("MCP_SSE", "POST", b"", "session_id is required"),
        ("MCP_SSE", "POST", b"other=1", "session_id is required"),
    ],
)
def test_requests_that_name_no_session_and_cannot_start_one_are_400(mode, method, query, message):
    with pytest.raises(mcp.JsonRpcError) as caught:
        mcp.plan(_spec(mode), _scope(method, query=query), "t1", "counter", None, mcp.McpBindings())
    assert caught.value.http_status == 400 and message in caught.value.message


def test_sse_posts_name_their_session_in_the_query_as_python_or_typescript_servers_do():
    assert mcp.sse_session_id(b"session_id=abc") == "abc"
    assert mcp.sse_session_id(b"sessionId=xyz&x=1") == "xyz"
    assert mcp.sse_session_id(b"sessionId=xyz&session_id=abc") == "abc"
    assert mcp.sse_session_id(b"x=1") is None
    bindings = mcp.McpBindings()
    bindings.bind(("t1", "counter", mcp.SSE, "xyz"), _session())
    found = mcp.plan(_spec("MCP_SSE"), _scope(query=b"sessionId=xyz"), "t1", "counter", None, bindings)
    assert found.bound == ("i1", "r1")
    assert mcp.plan(_spec("MCP_SSE"), _scope(query=b"session_id=nope"), "t1", "counter", None, bindings).bound is None


# -- the endpoint event of HTTP+SSE --------------------------------------------------------------


def _feed_split(event: mcp.EndpointEvent, data: bytes, size: int) -> bytes:
    out = b""
    for i in range(0, len(data), size):
        out += event.feed(data[i : i + size], last=False)
    return out + event.feed(b"", last=True)


@pytest.mark.parametrize(
    ("stream", "session_id", "rewritten"),
    [
        (PYTHON_ENDPOINT, "4f2a9c", b"event: endpoint\r\ndata: " + PREFIX + b"/messages/?session_id=4f2a9c\r\n\r\n"),
        (TS_ENDPOINT, "7b1e-33", b"event: endpoint\ndata: " + PREFIX + b"/messages?sessionId=7b1e-33\n\n"),
    ],
)
@pytest.mark.parametrize("size", [1, 2, 7, 1000])
def test_the_endpoint_event_gives_the_session_id_and_gets_the_gateway_prefix(stream, session_id, rewritten, size):
    after = b"event: message\r\ndata: {}\r\n\r\n"
    event = mcp.EndpointEvent(PREFIX)
    out = _feed_split(event, stream + after, size)
    assert event.session_id == session_id
    assert out == rewritten + after


def test_events_before_the_endpoint_pass_at_once_and_bytes_after_it_are_not_held():
    event = mcp.EndpointEvent(PREFIX)
    assert event.feed(b": ping\r\n\r\nevent: endp", last=False) == b": ping\r\n\r\n"
    assert event.feed(b"oint\r\ndata: /messages/?session_id=a\r\n\r\nevent: mes", last=False) == (
        b"event: endpoint\r\ndata: " + PREFIX + b"/messages/?session_id=a\r\n\r\nevent: mes"
    )
    assert event.done and event.feed(b"sage\r\n", last=False) == b"sage\r\n"


def test_an_endpoint_the_client_resolves_right_is_left_as_it_is():
    for uri in (b"http://other/messages?sessionId=a", b"messages?sessionId=a", PREFIX + b"/messages?sessionId=a"):
        stream = b"event: endpoint\ndata: " + uri + b"\n\n"
        event = mcp.EndpointEvent(PREFIX)
        assert event.feed(stream, last=False) == stream
        assert event.session_id == "a"


def test_a_stream_without_an_endpoint_event_is_let_through_after_the_limit():
    event = mcp.EndpointEvent(PREFIX)
    big = b"data: " + b"x" * (mcp.ENDPOINT_LIMIT + 10)
    assert event.feed(big, last=False) == big
    assert event.done and event.session_id is None


# -- the answer head, through the proxy ------------------------------------------------------------


class Ends:
    """Records the sessions the exchange ends (the session manager's `end`)."""

    def __init__(self) -> None:
        self.ended: list[tuple[str, str]] = []

    async def end(self, session: SessionRecord, reason: str) -> None:
        self.ended.append((session.row_id, reason))


class MetaDB:
    def __init__(self) -> None:
        self.updates: list[tuple[str, dict]] = []

    async def update_session(self, row_id: str, **changes) -> None:
        self.updates.append((row_id, changes))


def _run(answer: bytes, plan: mcp.Plan, created: bool, tmp_path: Path, chunks: list[bytes] = ()) -> tuple:
    """One exchange against an instance that writes `answer` (then `chunks`, one by one)."""
    ends, metadb = Ends(), MetaDB()
    session = _session()
    bound_at_head: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(answer)
        for chunk in chunks:
            await writer.drain()
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        if chunks:
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def main() -> Client:
        sock = tmp_path / "up.sock"
        server = await asyncio.start_unix_server(handler, str(sock))
        observer = plan.exchange(ends, metadb, session, created, PREFIX.decode())
        target = Target(session=session, address=sock, pool_key=("inst", 8000), path=b"/mcp", observer=observer)
        client = Client()
        send = client.send

        async def watched(message: dict) -> None:
            if message["type"] == "http.response.start":
                bound_at_head.append(len(plan.bindings))
            await send(message)

        client.send = watched  # type: ignore[method-assign]
        try:
            async with asyncio.timeout(20):
                await proxy_http(UpstreamPool(), target, _scope(plan.method), client.receive, client.send)
                assert observer is not None
                await observer.finish()
        finally:
            server.close()
        return client

    client = asyncio.run(main())
    client.bound_at_head = bound_at_head  # type: ignore[attr-defined]
    return client, ends.ended, metadb.updates, session


def _plan(method: str = "POST", mode: str = "MCP_STREAMABLE", **fields) -> mcp.Plan:
    plan = mcp.Plan(getattr(mcp.AffinityType, mode), "t1", "counter", _spec(mode), method, mcp.McpBindings())
    for name, value in fields.items():
        setattr(plan, name, value)
    return plan


def test_the_id_the_instance_assigns_on_initialize_is_bound_before_the_client_sees_it(tmp_path):
    plan = _plan()
    answer = (
        b"HTTP/1.1 200 OK\r\nmcp-session-id: m-123\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
    )
    client, ended, updates, session = _run(answer, plan, True, tmp_path)
    assert client.status == 200 and client.headers[b"mcp-session-id"] == b"m-123"
    assert b"set-cookie" not in client.headers
    assert plan.bindings.lookup(("t1", "counter", mcp.HTTP, "m-123")) == ("i1", "r1")
    assert session.metadata == {"mcpSessionId": "m-123"} and updates == [("r1", {"metadata": session.metadata})]
    assert ended == []


def test_a_stateless_answer_to_a_new_session_sets_its_cookie(tmp_path):
    answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
    client, ended, _, _ = _run(answer, _plan(), True, tmp_path)
    assert client.headers[b"set-cookie"] == b"x-fc-cookie-session-id=s-r1; Path=/; Max-Age=600; HttpOnly"
    assert ended == []


def test_an_error_answer_to_the_request_that_started_a_session_ends_it(tmp_path):
    answer = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
    client, ended, _, _ = _run(answer, _plan(), True, tmp_path)
    assert client.status == 400 and b"set-cookie" not in client.headers
    assert ended == [("r1", mcp.REFUSED)]
    # A session the client named stays: it lives by its TTL and idle timeout.
    _, ended, _, _ = _run(answer, _plan(session_key="mine", keyed=True), True, tmp_path)
    assert ended == []


@pytest.mark.parametrize(("status", "ends"), [(200, True), (204, True), (404, True), (405, False), (500, False)])
def test_a_delete_of_an_mcp_session_ends_it_when_the_instance_agrees(tmp_path, status, ends):
    plan = _plan("DELETE", mcp_id="m-123", bound=("i1", "r1"))
    answer = b"HTTP/1.1 %d X\r\ncontent-length: 0\r\n\r\n" % status
    _, ended, _, _ = _run(answer, plan, False, tmp_path)
    assert ended == ([("r1", mcp.ENDED)] if ends else [])


def test_an_sse_stream_binds_its_endpoint_and_ends_its_session_when_it_closes(tmp_path):
    plan = _plan("GET", "MCP_SSE")
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    message = b"event: message\r\ndata: {}\r\n\r\n"
    chunks = [PYTHON_ENDPOINT[:20], PYTHON_ENDPOINT[20:], message]
    client, ended, _, _ = _run(head, plan, True, tmp_path, chunks)
    endpoint = b"event: endpoint\r\ndata: " + PREFIX + b"/messages/?session_id=4f2a9c\r\n\r\n"
    # The endpoint event reached the client whole (never a half of it), with the gateway's prefix.
    bodies = [m["body"] for m in client.sent[1:] if m["body"]]
    assert bodies[0].startswith(endpoint) and b"".join(bodies) == endpoint + message
    assert ended == [("r1", mcp.ENDED)]
    assert len(plan.bindings) == 0  # bound while the stream lasted, unbound with it
