"""WebSocket pass-through against a real WebSocket server on a Unix socket (as the agent's splice
presents a user server)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from websockets.asyncio.server import ServerConnection, unix_serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from hutch.gateway.types import Target
from hutch.gateway.websocket import proxy_websocket
from tests.gateway.test_proxy import _session


class WsClient:
    def __init__(self, *messages: dict) -> None:
        self.incoming: asyncio.Queue[dict] = asyncio.Queue()
        for message in ({"type": "websocket.connect"}, *messages):
            self.incoming.put_nowait(message)
        self.sent: list[dict] = []
        self.changed = asyncio.Event()

    async def receive(self) -> dict:
        return await self.incoming.get()

    async def send(self, message: dict) -> None:
        self.sent.append(message)
        self.changed.set()

    async def wait_for(self, kind: str) -> dict:
        while True:
            for message in self.sent:
                if message["type"] == kind:
                    return message
            self.changed.clear()
            await self.changed.wait()


def _scope(headers=(), subprotocols=("chat",)) -> dict:
    return {
        "type": "websocket",
        "path": "/ws",
        "headers": [(b"host", b"h"), *headers],
        "subprotocols": list(subprotocols),
        "extensions": {"websocket.http.response": {}},
    }


def _target(sock: Path) -> Target:
    return Target(
        session=_session(),
        address=sock,
        pool_key=("inst", 8080),
        path=b"/ws?x=1",
        add=[(b"e2b-sandbox-port", b"8080")],
        answer=[(b"x-fc-session-id", b"s")],
    )


def run(handler, test, tmp_path: Path, process_request=None) -> None:
    async def main() -> None:
        sock = tmp_path / "ws.sock"
        async with unix_serve(
            handler, str(sock), subprotocols=["chat", "other"], process_request=process_request
        ) as server:
            async with asyncio.timeout(20):
                await test(sock)
            server.close()

    asyncio.run(main())


def test_messages_are_relayed_both_ways_as_text_and_binary(tmp_path):
    seen: dict = {}

    async def echo(connection: ServerConnection) -> None:
        seen["path"] = connection.request.path
        seen["headers"] = connection.request.headers
        async for message in connection:
            await connection.send(message)

    async def test(sock):
        client = WsClient(
            {"type": "websocket.receive", "text": "hello"},
            {"type": "websocket.receive", "bytes": b"\x00\x01"},
        )
        scope = _scope(headers=[(b"cookie", b"a=1"), (b"sec-websocket-protocol", b"chat")], subprotocols=["chat"])
        task = asyncio.create_task(proxy_websocket(_target(sock), scope, client.receive, client.send))
        accept = await client.wait_for("websocket.accept")
        assert accept["subprotocol"] == "chat" and accept["headers"] == [(b"x-fc-session-id", b"s")]
        while len([m for m in client.sent if m["type"] == "websocket.send"]) < 2:
            client.changed.clear()
            await client.changed.wait()
        echoed = [m for m in client.sent if m["type"] == "websocket.send"]
        assert echoed[0].get("text") == "hello" and echoed[1].get("bytes") == b"\x00\x01"
        client.incoming.put_nowait({"type": "websocket.disconnect", "code": 1000})
        await task
        assert seen["path"] == "/ws?x=1"
        assert seen["headers"]["cookie"] == "a=1" and seen["headers"]["e2b-sandbox-port"] == "8080"

    run(echo, test, tmp_path)


def test_a_close_by_the_server_reaches_the_client_with_its_code(tmp_path):
    async def closer(connection: ServerConnection) -> None:
        await connection.recv()
        await connection.close(code=4001, reason="bye")

    async def test(sock):
        client = WsClient({"type": "websocket.receive", "text": "x"})
        await proxy_websocket(_target(sock), _scope(), client.receive, client.send)
        close = await client.wait_for("websocket.close")
        assert close["code"] == 4001 and close["reason"] == "bye"

    run(closer, test, tmp_path)


def test_an_upgrade_the_server_refuses_is_answered_with_its_status(tmp_path):
    def refuse(connection: ServerConnection, request: Request) -> Response:
        return Response(404, "Not Found", Headers([("content-type", "text/plain")]), b"no such socket")

    async def unused(connection: ServerConnection) -> None:
        raise AssertionError("never accepted")

    async def test(sock):
        client = WsClient()
        await proxy_websocket(_target(sock), _scope(), client.receive, client.send)
        start = await client.wait_for("websocket.http.response.start")
        body = await client.wait_for("websocket.http.response.body")
        assert start["status"] == 404 and body["body"] == b"no such socket"
        assert all(m["type"] != "websocket.accept" for m in client.sent)

    run(unused, test, tmp_path, process_request=refuse)
