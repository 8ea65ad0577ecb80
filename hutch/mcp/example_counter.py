"""The example MCP server of `examples/mcp-counter`: a counter whose state lives in its instance.

hutch gives every MCP session an instance of its own (`sessionAffinity` `MCP_STREAMABLE` or
`MCP_SSE`), so what this process keeps in memory is one session's state, and what it writes to
the workspace (`$HOME`, `/home/user`) is that session's files. One process serves both
transports: Streamable HTTP at `/mcp`, HTTP+SSE at `/sse` and `/messages/`.

It runs inside the sandbox as a script, by path, with hutch's Python (which has the `mcp`
SDK): `python3 -P /opt/hutch/lib/hutch/mcp/example_counter.py`. Every sandbox sees hutch's
package read-only at `/opt/hutch/lib/hutch`; that is how this file gets into instances, so it
imports nothing from hutch. `-P` keeps this directory off `sys.path`.

`--era legacy` makes it answer requests of spec 2026-07-28 the way servers built before that
revision do (400, unsupported protocol version), to show a 2026 client falling back to
`initialize` through the gateway.
"""

from __future__ import annotations

import argparse
import os
import secrets
from collections import deque
from pathlib import Path
from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.streamable_http import EventCallback, EventId, EventMessage, EventStore, StreamId
from mcp.server.transport_security import TransportSecuritySettings
from pydantic import Field

LEGACY_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
# Behind hutch's gateway, which authenticates every request: the Host header is hutch's.
OPEN = TransportSecuritySettings(enable_dns_rebinding_protection=False)

INSTANCE = secrets.token_hex(8)  # tells instances apart (each MCP session has its own)
state = {"count": 0}

SandboxId = Annotated[
    str,
    Field(
        description="The hutch session (sandbox) whose counter to use; the client mirrors it into the "
        "Mcp-Param-Sandbox-Id header and hutch's gateway routes the call to that session's instance.",
        json_schema_extra={"x-mcp-header": "Sandbox-Id"},
    ),
]


def workspace() -> Path:
    return Path(os.environ.get("HOME") or "/home/user")


def _add(by: int) -> dict[str, Any]:
    state["count"] += by
    with open(workspace() / "counter.log", "a") as log:
        log.write(f"count={state['count']}\n")
    return {"count": state["count"], "instance": INSTANCE}


def build() -> MCPServer:
    server = MCPServer(
        "mcp-counter",
        instructions="A counter kept by this MCP session's own sandbox.",
        version="1.0.0",
        log_level="WARNING",
    )

    @server.tool()
    def increment(by: int = 1) -> dict[str, Any]:
        """Add `by` to this session's counter, log the new value to counter.log in the workspace, return it."""
        return _add(by)

    @server.tool()
    def increment_sandbox(sandbox_id: SandboxId, by: int = 1) -> dict[str, Any]:
        """Add `by` to the counter of the sandbox `sandbox_id` (the call is routed to it) and return it."""
        return {**_add(by), "sandbox": sandbox_id}

    @server.tool()
    def count() -> dict[str, Any]:
        """This session's counter and the instance that keeps it."""
        return {"count": state["count"], "instance": INSTANCE}

    @server.tool()
    def read_log() -> str:
        """The workspace file the counter writes (counter.log)."""
        path = workspace() / "counter.log"
        return path.read_text() if path.exists() else ""

    @server.tool()
    async def count_slowly(to: int, ctx: Context) -> int:
        """Count from 1 to `to`, reporting progress on the way (a streamed answer)."""
        for step in range(1, to + 1):
            await ctx.report_progress(step, to, f"counted {step}")
        return to

    @server.tool()
    async def count_after_a_break(to: int, ctx: Context) -> int:
        """Count to `to` with progress, closing this call's stream halfway: the client resumes with
        `Last-Event-ID`, gets the progress it missed, and the answer."""
        for step in range(1, to + 1):
            await ctx.report_progress(step, to, f"counted {step}")
            if step == to // 2:
                await ctx.close_sse_stream()
        return to

    @server.resource("counter://value")
    def value() -> str:
        """The counter, as a resource."""
        return str(state["count"])

    @server.prompt()
    def report(style: str = "short") -> str:
        """Ask for a report on the counter."""
        return f"Report the counter ({state['count']}) in a {style} style."

    return server


class MemoryEventStore(EventStore):
    """Keeps the last events of each stream so a client can resume with `Last-Event-ID`."""

    def __init__(self, per_stream: int = 256) -> None:
        self.events: dict[StreamId, deque[tuple[EventId, EventMessage | None]]] = {}
        self.stream_of: dict[EventId, StreamId] = {}
        self.per_stream = per_stream

    async def store_event(self, stream_id: StreamId, message: Any) -> EventId:
        event_id = secrets.token_hex(8)
        events = self.events.setdefault(stream_id, deque(maxlen=self.per_stream))
        events.append((event_id, message))
        self.stream_of[event_id] = stream_id
        return event_id

    async def replay_events_after(self, last_event_id: EventId, send_callback: EventCallback) -> StreamId | None:
        stream_id = self.stream_of.get(last_event_id)
        if stream_id is None:
            return None
        after = False
        for event_id, message in self.events.get(stream_id, ()):
            if after and message is not None:
                await send_callback(EventMessage(message, event_id))  # type: ignore[arg-type]
            after = after or event_id == last_event_id
        return stream_id


def refuse_modern(app: Any) -> Any:
    """Answer 2026-07-28 requests like a server that predates that revision does."""

    async def wrapped(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            version = dict(scope["headers"]).get(b"mcp-protocol-version", b"").decode("latin-1")
            if version and version not in LEGACY_VERSIONS:
                body = (
                    b'{"jsonrpc":"2.0","id":"server-error","error":{"code":-32600,'
                    b'"message":"Bad Request: Unsupported protocol version"}}'
                )
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                await send({"type": "http.response.start", "status": 400, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, send)

    return wrapped


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--era", choices=("current", "legacy"), default="current")
    args = parser.parse_args()
    server = build()
    # hutch ends idle sessions (and their instances): the server need not expire its own.
    app = server.streamable_http_app(
        streamable_http_path="/mcp",
        session_idle_timeout=None,
        event_store=MemoryEventStore(),  # streams can be resumed (Last-Event-ID)
        retry_interval=100,  # how soon a client comes back to a closed stream, in ms
        transport_security=OPEN,
    )
    app.router.routes.extend(server.sse_app(transport_security=OPEN).routes)
    uvicorn.run(
        refuse_modern(app) if args.era == "legacy" else app,
        host=args.host,
        port=args.port,
        log_level="warning",
        lifespan="on",
    )


if __name__ == "__main__":
    main()
