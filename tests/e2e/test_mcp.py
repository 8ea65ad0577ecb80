"""MCP through the gateway, with the official clients: every MCP session on an instance of its own.

The function is the repository's example (`examples/mcp-counter`): a counter kept in the memory
of the instance's MCP server, which also appends to a file in the workspace and names its
instance with a random token. So a client whose counts go 1, 2, 3 on one token, with a log of
just its own lines, was routed to its own instance every time; another client seeing a fresh
counter was not routed there.

Clients: the Python SDK 2.x (`mode="legacy"`, the default auto mode, `sse_client`) in this
process, the last 1.x release in a virtualenv of its own, the TypeScript SDK and the conformance
suite under Node (`mcp_node/`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client, ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from tests.e2e.mcp_support import deploy, run_conformance, run_mcp1, run_node, sessions_of, wait_until

pytestmark = [pytest.mark.sandbox, pytest.mark.slow]


@pytest.fixture
def tenant(server) -> httpx.Client:
    return server.new_tenant(f"mcp-{secrets.token_hex(3)}")


def key_of(tenant: httpx.Client) -> str:
    return tenant.headers["x-api-key"]


def _http(key: str, **headers: str) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(headers={"X-API-Key": key, **headers}, timeout=httpx2.Timeout(60, read=120))


async def _count(url: str, key: str, mode: str = "legacy", times: int = 2, **headers: str) -> dict[str, Any]:
    """One client session: `increment` `times` times, then the workspace log and the cookies it kept."""
    http = _http(key, **headers)
    async with http, Client(streamable_http_client(url, http_client=http), mode=mode) as client:
        results = [(await client.call_tool("increment", {"by": 1})).structured_content for _ in range(times)]
        log = (await client.call_tool("read_log", {})).content[0].text
        session = client.session
        era = "modern" if session.discover_result is not None and session.initialize_result is None else "legacy"
        return {
            "counts": [r["count"] for r in results],
            "instances": {r["instance"] for r in results},
            "log": log,
            "era": era,
            "cookies": dict(http.cookies),
        }


def test_python_sdk_in_legacy_mode_gets_one_instance_and_its_delete_ends_the_session(server, tenant):
    fn = deploy(tenant, "counter")
    url = f"{server.url}/functions/{fn}/invoke/mcp"
    first = asyncio.run(_count(url, key_of(tenant), "legacy", times=3))
    second = asyncio.run(_count(url, key_of(tenant), "legacy", times=1))

    assert first["era"] == "legacy"
    assert first["counts"] == [1, 2, 3] and len(first["instances"]) == 1
    assert first["log"] == "count=1\ncount=2\ncount=3\n"
    assert second["counts"] == [1] and second["instances"] != first["instances"]
    assert second["log"] == "count=1\n"
    assert first["cookies"] == {}  # the MCP session id is the handle: no cookie
    # Each client's DELETE on exit ended its session, which had recorded its MCP session id.
    sessions = sessions_of(tenant, fn)
    assert [s["sessionStatus"] for s in sessions] == ["Expired", "Expired"]
    assert {s["endReason"] for s in sessions} == {"mcp_closed"}
    assert all(len(s["metadata"]["mcpSessionId"]) == 32 for s in sessions)


def test_python_sdk_in_auto_mode_speaks_2026_07_28_and_comes_back_by_cookie(server, tenant):
    fn = deploy(tenant, "counter")
    url = f"{server.url}/functions/{fn}/invoke/mcp"
    seen = asyncio.run(_count(url, key_of(tenant), "auto", times=3))

    assert seen["era"] == "modern"  # server/discover answered: no initialize, no MCP session id
    assert seen["counts"] == [1, 2, 3] and len(seen["instances"]) == 1
    [session] = sessions_of(tenant, fn)
    assert seen["cookies"] == {"x-fc-cookie-session-id": session["sessionId"]}
    assert session["sessionStatus"] == "Active"  # stateless clients never end it: the idle timeout will
    assert "mcpSessionId" not in session["metadata"]


def test_a_2026_client_falls_back_to_initialize_through_the_gateway_when_the_server_predates_it(server, tenant):
    spec = json.loads((Path(__file__).parents[2] / "examples/mcp-counter/function.json").read_text())
    fn = deploy(tenant, "old-counter", startCommand=[*spec["startCommand"], "--era", "legacy"])
    seen = asyncio.run(_count(f"{server.url}/functions/{fn}/invoke/mcp", key_of(tenant), "auto", times=2))

    assert seen["era"] == "legacy"
    assert seen["counts"] == [1, 2] and len(seen["instances"]) == 1
    assert seen["cookies"] == {}  # the refused discover set no cookie
    reasons = sorted(s["endReason"] for s in sessions_of(tenant, fn))
    # The session the 2026 probe started was ended as soon as the server refused it; the
    # initialize that followed got a session of its own, which the client's DELETE ended.
    assert reasons == ["mcp_closed", "mcp_refused"]


def test_2026_clients_without_a_session_id_are_routed_by_path_header_and_mcp_param(server, tenant):
    fn = deploy(tenant, "counter")
    key = key_of(tenant)
    by_path = f"{server.url}/functions/{fn}/sessions/by-path/mcp"
    assert asyncio.run(_count(by_path, key, "auto"))["counts"] == [1, 2]
    again = asyncio.run(_count(by_path, key, "auto"))  # a new client, the same path
    assert again["counts"] == [3, 4] and again["era"] == "modern"

    plain = f"{server.url}/functions/{fn}/invoke/mcp"
    assert asyncio.run(_count(plain, key, "auto", **{"x-fc-session-id": "by-header"}))["counts"] == [1, 2]
    assert asyncio.run(_count(plain, key, "auto", **{"x-fc-session-id": "by-header"}))["counts"] == [3, 4]

    async def by_param() -> list[dict]:
        http = _http(key)
        async with http, Client(streamable_http_client(plain, http_client=http), mode="auto") as client:
            await client.list_tools()  # the client learns which argument it mirrors into Mcp-Param-Sandbox-Id
            calls = [("p-one", 1), ("p-two", 10), ("p-one", 1), ("by-path", 100)]
            return [
                (await client.call_tool("increment_sandbox", {"sandbox_id": sandbox, "by": by})).structured_content
                for sandbox, by in calls
            ]

    seen = asyncio.run(by_param())
    assert [(s["sandbox"], s["count"]) for s in seen] == [("p-one", 1), ("p-two", 10), ("p-one", 2), ("by-path", 104)]
    assert seen[0]["instance"] == seen[2]["instance"] != seen[1]["instance"]
    ids = {s["sessionId"] for s in sessions_of(tenant, fn)}
    assert {"by-path", "by-header", "p-one", "p-two"} <= ids


def test_a_stream_the_instance_closes_mid_call_is_resumed_with_last_event_id(server, tenant, caplog):
    fn = deploy(tenant, "counter")
    url = f"{server.url}/functions/{fn}/invoke/mcp"
    caplog.set_level(logging.INFO, logger="mcp.client.streamable_http")

    async def run() -> tuple[Any, list[float]]:
        progress: list[float] = []

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            progress.append(value)

        http = _http(key_of(tenant))
        async with http, Client(streamable_http_client(url, http_client=http), mode="legacy") as client:
            result = await client.call_tool("count_after_a_break", {"to": 6}, progress_callback=on_progress)
            return result.structured_content, progress

    result, progress = asyncio.run(run())
    # The instance closed the call's stream after step 3; the client came back with a GET carrying
    # Last-Event-ID, which the gateway routed by the MCP session id, and the instance replayed the rest.
    assert "Reconnected to SSE stream" in caplog.text
    assert result == {"result": 6}
    assert progress == [1, 2, 3, 4, 5, 6]


def test_mcp_sessions_survive_a_restart_of_hutch_serve(fresh_server):
    srv = fresh_server()
    tenant = srv.new_tenant("mcp-restart")
    fn = deploy(tenant, "counter")
    url = f"{srv.url}/functions/{fn}/invoke/mcp"
    opened = run_node(["client.mjs", "open", url], key_of(tenant))
    assert opened["count"] == 1
    srv.restart()  # kill -9: the instance and its MCP server live on; the binding is read back from MetaDB
    back = run_node(["client.mjs", "resume", url, opened["sessionId"]], key_of(tenant))
    assert back["ok"] is True, back
    assert back["result"]["structuredContent"]["count"] == 2


def test_python_sdk_sse_client_holds_one_instance_for_as_long_as_its_stream(server, tenant):
    fn = deploy(tenant, "counter-sse", "function-sse.json")
    url = f"{server.url}/functions/{fn}/invoke/sse"

    async def run() -> tuple[list[int], set[str], list[str]]:
        headers = {"X-API-Key": key_of(tenant)}
        async with sse_client(url, headers=headers) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            results = [(await session.call_tool("increment", {"by": 2})).structured_content for _ in range(3)]
            live = [s["sessionStatus"] for s in sessions_of(tenant, fn)]
        return [r["count"] for r in results], {r["instance"] for r in results}, live

    counts, instances, live = asyncio.run(run())
    assert counts == [2, 4, 6] and len(instances) == 1
    assert live == ["Active"]
    # The stream closed with the client: the binding and the session ended with it.
    ended = wait_until(lambda: [s for s in sessions_of(tenant, fn) if s["sessionStatus"] == "Expired"])
    assert [s["endReason"] for s in ended] == ["mcp_closed"]


def test_python_sdk_1x_works_over_both_transports(server, tenant):
    streamable = deploy(tenant, "counter")
    sse = deploy(tenant, "counter-sse", "function-sse.json")
    seen = run_mcp1(
        f"{server.url}/functions/{streamable}/invoke/mcp", f"{server.url}/functions/{sse}/invoke/sse", key_of(tenant)
    )
    for transport in ("streamable", "sse"):
        assert "error" not in seen[transport], seen[transport]["error"]
        assert seen[transport]["counts"] == [7, 14]
        assert len(set(seen[transport]["instances"])) == 1
        assert seen[transport]["log"] == "count=7\ncount=14\n"
    assert seen["streamable"]["afterEnd"] == "Session terminated"  # the 1.x client's words for our 404


def test_typescript_sdk_works_over_both_transports(server, tenant):
    streamable = deploy(tenant, "counter")
    sse = deploy(tenant, "counter-sse", "function-sse.json")
    key = key_of(tenant)
    over_http = run_node(["client.mjs", "streamable", f"{server.url}/functions/{streamable}/invoke/mcp"], key)
    over_sse = run_node(["client.mjs", "sse", f"{server.url}/functions/{sse}/invoke/sse"], key)

    for seen in (over_http, over_sse):
        assert "error" not in seen, seen.get("error")
        assert seen["counts"] == [5, 10] and len(set(seen["instances"])) == 1
        assert seen["log"] == "count=5\ncount=10\n"
    [session] = sessions_of(tenant, streamable)
    assert session["metadata"]["mcpSessionId"] == over_http["sessionId"]
    assert session["endReason"] == "mcp_closed"  # terminateSession's DELETE
    assert [s["endReason"] for s in sessions_of(tenant, sse)] == ["mcp_closed"]


def test_many_concurrent_mcp_sessions_each_stay_on_their_own_instance(server, tenant):
    fn = deploy(tenant, "counter", warmPoolSize=2)
    url = f"{server.url}/functions/{fn}/invoke/mcp"
    key = key_of(tenant)
    clients, rounds = 8, 6

    async def one(i: int) -> dict:
        http = _http(key)
        async with http, Client(streamable_http_client(url, http_client=http), mode="legacy") as client:
            seen = []
            for _ in range(rounds):
                result = (await client.call_tool("increment", {"by": i + 1})).structured_content
                seen.append((result["count"], result["instance"]))
                await asyncio.sleep(0)  # interleave the clients' calls
            log = (await client.call_tool("read_log", {})).content[0].text
            return {"seen": seen, "log": log}

    async def all_at_once() -> list[dict]:
        return await asyncio.gather(*(one(i) for i in range(clients)))

    results = asyncio.run(all_at_once())
    instances = []
    for i, result in enumerate(results):
        step = i + 1
        assert [count for count, _ in result["seen"]] == [step * n for n in range(1, rounds + 1)]
        mine = {instance for _, instance in result["seen"]}
        assert len(mine) == 1
        instances.append(mine.pop())
        assert result["log"] == "".join(f"count={step * n}\n" for n in range(1, rounds + 1))
    assert len(set(instances)) == clients
    sessions = sessions_of(tenant, fn)
    assert len(sessions) == clients
    assert len({s["containerId"] for s in sessions}) == clients


def test_a_tenant_never_reaches_another_tenants_mcp_sessions(server, tenant):
    other = server.new_tenant("mcp-other")
    fn = deploy(tenant, "counter")
    deploy(other, "counter")  # same function name, the other tenant's own
    sse = deploy(tenant, "counter-sse", "function-sse.json")
    deploy(other, "counter-sse", "function-sse.json")
    key = key_of(tenant)

    async def hold_sessions() -> dict:
        http = _http(key)
        url = f"{server.url}/functions/{fn}/invoke/mcp"
        async with http, Client(streamable_http_client(url, http_client=http), mode="legacy") as client:
            await client.call_tool("increment", {"by": 1})
            mcp_id = sessions_of(tenant, fn)[0]["metadata"]["mcpSessionId"]
            stolen = other.post(
                f"/functions/{fn}/invoke/mcp",
                headers={"mcp-session-id": mcp_id, "accept": "application/json, text/event-stream"},
                json={"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "count", "arguments": {}}},
            )
            by_path = asyncio.create_task(
                _count(f"{server.url}/functions/{fn}/sessions/{sessions_of(tenant, fn)[0]['sessionId']}/mcp",
                       key_of(other), "auto", times=1)
            )  # fmt: skip
            path_counts = (await by_path)["counts"]
            mine = (await client.call_tool("count", {})).structured_content["count"]
        sse_ids: list[str] = []
        sse_url = f"{server.url}/functions/{sse}/invoke/sse"
        async with (
            sse_client(sse_url, headers={"X-API-Key": key}, on_session_created=sse_ids.append) as (r, w),
            ClientSession(r, w) as session,
        ):
            await session.initialize()
            sse_stolen = other.post(f"/functions/{sse}/invoke/messages/?session_id={sse_ids[0]}", json={})
            assert (await session.call_tool("count", {})).structured_content["count"] == 0
        return {"stolen": stolen, "path_counts": path_counts, "mine": mine, "sse_stolen": sse_stolen}

    seen = asyncio.run(hold_sessions())
    assert seen["stolen"].status_code == 404
    not_found = {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "Session not found"}}
    assert seen["stolen"].json() == not_found
    assert seen["path_counts"] == [1]  # the same session id in the other tenant's path: a session of its own
    assert seen["mine"] == 1  # untouched by the other tenant
    assert seen["sse_stolen"].status_code == 404 and seen["sse_stolen"].json() == not_found


def test_an_idle_mcp_session_is_reclaimed_and_its_client_then_gets_404(server, tenant):
    fn = deploy(tenant, "counter", sessionAffinityConfig={"sessionIdleTimeoutInSeconds": 2})
    url = f"{server.url}/functions/{fn}/invoke/mcp"
    key = key_of(tenant)
    opened = run_node(["client.mjs", "open", url], key)
    assert opened["count"] == 1
    # The client left without ending its session: hutch reclaims it once idle, instance and all.
    ended = wait_until(lambda: [s for s in sessions_of(tenant, fn) if s["sessionStatus"] == "Expired"], timeout=30)
    assert [s["endReason"] for s in ended] == ["idle"]
    assert ended[0]["metadata"]["mcpSessionId"] == opened["sessionId"]

    back = run_node(["client.mjs", "resume", url, opened["sessionId"]], key)
    assert back["ok"] is False and back["code"] == 404
    assert '"message":"Session not found"' in back["message"]
    # The spec's way on: a new session with initialize, on a new instance.
    assert asyncio.run(_count(url, key, "legacy", times=1))["counts"] == [1]


def test_the_conformance_suite_runs_through_the_gateway_against_the_example(server, tenant, tmp_path):
    # Every scenario opens a session the suite's client never ends: a short idle timeout reclaims them.
    fn = deploy(tenant, "counter", warmPoolSize=1, sessionAffinityConfig={"sessionIdleTimeoutInSeconds": 5})
    results = run_conformance(f"{server.url}/functions/{fn}/invoke/mcp", key_of(tenant), tmp_path)
    passed = sorted(name for name, checks in results.items() if all(c["status"] != "FAILURE" for c in checks))
    failed = {
        name: [c.get("errorMessage", "")[:160] for c in checks if c["status"] == "FAILURE"]
        for name, checks in results.items()
        if name not in passed
    }
    print("conformance passed:", passed)
    print("conformance failed:", json.dumps(failed, indent=1))
    # What the transport and the gateway carry: the handshake, requests and answers, errors, listings,
    # several SSE streams on one session. The rest need the suite's fixture tools, which the example lacks.
    assert {
        "server-initialize",
        "ping",
        "tools-list",
        "tools-call-error",
        "resources-list",
        "prompts-list",
        "server-sse-multiple-streams",
    } <= set(passed)
    for reasons in failed.values():
        for reason in reasons:
            assert "Session not found" not in reason and "502" not in reason and "503" not in reason
