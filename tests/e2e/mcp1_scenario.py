"""The last 1.x release of the official Python MCP SDK against hutch, run in a virtualenv of its own.

`python mcp1_scenario.py URL_STREAMABLE URL_SSE` (key in HUTCH_API_KEY) prints one JSON line:
per transport, the counts two calls saw, the instance that answered them, the workspace log,
and (Streamable HTTP) the MCP session id and what a call with that id gets after the session
was ended (the client's DELETE on exit). No hutch import: only the SDK under test.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import traceback

from mcp import ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamablehttp_client

HEADERS = {"X-API-Key": os.environ["HUTCH_API_KEY"]}


async def count_twice(session: ClientSession) -> dict:
    init = await session.initialize()
    first = await session.call_tool("increment", {"by": 7})
    second = await session.call_tool("increment", {"by": 7})
    log = await session.call_tool("read_log", {})
    return {
        "protocolVersion": init.protocolVersion,
        "counts": [first.structuredContent["count"], second.structuredContent["count"]],
        "instances": [first.structuredContent["instance"], second.structuredContent["instance"]],
        "log": log.content[0].text,
    }


async def streamable(url: str) -> dict:
    async with streamablehttp_client(url, headers=HEADERS) as (read, write, session_id):
        async with ClientSession(read, write) as session:
            seen = await count_twice(session)
        seen["sessionId"] = session_id()
    # The client ended its session on the way out (DELETE): the id must be unknown now.
    headers = {**HEADERS, "mcp-session-id": seen["sessionId"]}
    async with streamablehttp_client(url, headers=headers) as (r, w, _), ClientSession(r, w) as session:
        try:
            await session.call_tool("increment", {"by": 1})
            seen["afterEnd"] = "answered"
        except Exception as exc:  # the SDK's McpError for the 404
            seen["afterEnd"] = str(exc)
    return seen


async def sse(url: str) -> dict:
    async with sse_client(url, headers=HEADERS) as (read, write), ClientSession(read, write) as session:
        return await count_twice(session)


async def main(streamable_url: str, sse_url: str) -> dict:
    out: dict = {}
    for name, step, url in (("streamable", streamable, streamable_url), ("sse", sse, sse_url)):
        try:
            out[name] = await asyncio.wait_for(step(url), 120)
        except BaseException:
            out[name] = {"error": traceback.format_exc()[-2000:]}
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2]))))
