"""hutch as an MCP server, driven by the official Python SDK: `/mcp` on `hutch serve` (Streamable
HTTP, both eras of clients) and `hutch mcp` (stdio), each acting as its caller's tenant."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

pytestmark = [pytest.mark.sandbox, pytest.mark.slow]


@pytest.fixture
def tenant(server) -> httpx.Client:
    return server.new_tenant(f"tools-{secrets.token_hex(3)}")


def key_of(tenant: httpx.Client) -> str:
    return tenant.headers["x-api-key"]


class Tools:
    """A connected client; `call` returns (structured result or text, is_error)."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def call(self, name: str, **arguments: Any) -> tuple[Any, bool]:
        result = await self.client.call_tool(name, arguments)
        if result.is_error:
            return result.content[0].text, True
        value = result.structured_content
        if isinstance(value, dict) and set(value) == {"result"}:
            value = value["result"]  # a list, wrapped by the SDK
        return value, False


async def _over_http(url: str, key: str, mode: str, script) -> Any:
    http = httpx2.AsyncClient(headers={"X-API-Key": key}, timeout=httpx2.Timeout(60, read=300))
    async with http, Client(streamable_http_client(f"{url}/mcp", http_client=http), mode=mode) as client:
        return await script(Tools(client))


def test_the_endpoint_runs_code_statefully_runs_commands_moves_files_and_ends_sandboxes(server, tenant):
    async def script(tools: Tools) -> dict:
        made, error = await tools.call("create_sandbox", idle_timeout_seconds=300)
        assert not error, made
        sid = made["sandboxId"]
        seen: dict[str, Any] = {"made": made}
        seen["define"] = await tools.call("run_code", sandbox_id=sid, code="import math\nx = 41")
        seen["use"] = await tools.call("run_code", sandbox_id=sid, code="x + 1 + math.floor(0.5)")
        seen["raise"] = await tools.call("run_code", sandbox_id=sid, code="print('before'); 1 / 0")
        seen["command"] = await tools.call(
            "run_command", sandbox_id=sid, command="echo $(whoami):$PWD; echo oops >&2; exit 3"
        )
        seen["slow"] = await tools.call("run_command", sandbox_id=sid, command="sleep 30", timeout_seconds=1)
        seen["write"] = await tools.call("write_file", sandbox_id=sid, path="notes/plan.txt", content="step 1\n")
        seen["binary"] = await tools.call(
            "write_file", sandbox_id=sid, path="/home/user/notes/blob", content="AP8A", encoding="base64"
        )
        seen["read"] = await tools.call("read_file", sandbox_id=sid, path="/home/user/notes/plan.txt")
        seen["read_binary"] = await tools.call("read_file", sandbox_id=sid, path="notes/blob")
        seen["by_code"] = await tools.call("run_code", sandbox_id=sid, code="len(open('notes/plan.txt').read())")
        seen["list"] = await tools.call("list_files", sandbox_id=sid, path="/home/user/notes")
        seen["listed"] = await tools.call("list_sandboxes")
        seen["end"] = await tools.call("end_sandbox", sandbox_id=sid)
        seen["after"] = await tools.call("run_command", sandbox_id=sid, command="true")
        return seen

    seen = asyncio.run(_over_http(server.url, key_of(tenant), "auto", script))
    sid = seen["made"]["sandboxId"]
    assert seen["made"]["template"] == "code-interpreter-v1" and seen["made"]["idleTimeoutSeconds"] == 300
    assert seen["define"] == ({"text": None, "stdout": "", "stderr": "", "results": [], "error": None}, False)
    assert seen["use"][0]["text"] == "42"  # the interpreter kept x and math between calls
    assert seen["raise"][0]["stdout"] == "before\n" and seen["raise"][0]["error"]["name"] == "ZeroDivisionError"
    assert seen["command"] == (
        {"exitCode": 3, "stdout": "user:/home/user\n", "stderr": "oops\n", "timedOut": False},
        False,
    )
    assert seen["slow"][0]["timedOut"] is True and seen["slow"][0]["exitCode"] == 124
    assert seen["write"] == ({"path": "notes/plan.txt", "size": 7}, False)
    assert seen["read"][0] == {
        "path": "/home/user/notes/plan.txt",
        "encoding": "utf-8",
        "content": "step 1\n",
        "size": 7,
    }
    assert seen["read_binary"][0]["encoding"] == "base64" and seen["read_binary"][0]["content"] == "AP8A"
    assert seen["by_code"][0]["text"] == "7"  # the interpreter sees the files the tools wrote
    assert sorted((e["name"], e["type"], e["size"]) for e in seen["list"][0]) == [
        ("blob", "file", 3),
        ("plan.txt", "file", 7),
    ]
    assert [s["sandboxId"] for s in seen["listed"][0]] == [sid]
    assert seen["end"] == ({"sandboxId": sid, "template": "code-interpreter-v1", "ended": True}, False)
    assert seen["after"][1] is True and f"no live sandbox '{sid}'" in seen["after"][0]
    [session] = tenant.get("/v1/sessions").json()["sessions"]
    assert session["sessionId"] == sid and session["sessionStatus"] == "Expired"


def test_the_endpoint_serves_session_era_clients_as_well(server, tenant):
    async def script(tools: Tools) -> tuple:
        made, _ = await tools.call("create_sandbox", template="base")
        ran = await tools.call("run_command", sandbox_id=made["sandboxId"], command="echo $((6 * 7))")
        await tools.call("end_sandbox", sandbox_id=made["sandboxId"])
        return made, ran, tools.client.session.initialize_result

    made, ran, initialized = asyncio.run(_over_http(server.url, key_of(tenant), "legacy", script))
    assert initialized is not None and initialized.server_info.name == "hutch"
    assert made["template"] == "base"
    assert ran == ({"exitCode": 0, "stdout": "42\n", "stderr": "", "timedOut": False}, False)


def test_tool_errors_say_what_is_wrong_and_no_tenant_reaches_another_tenants_sandbox(server, tenant):
    other = server.new_tenant("tools-other")
    web = {"name": "web", "startCommand": ["python3", "-m", "http.server", "8080"], "port": 8080}
    assert tenant.post("/v1/functions", json=web).status_code == 201

    async def mine(tools: Tools) -> tuple:
        made, _ = await tools.call("create_sandbox", template="base")
        await tools.call("write_file", sandbox_id=made["sandboxId"], path="secret.txt", content="mine")
        errors = [
            await tools.call("create_sandbox", template="no-such-function"),
            await tools.call("create_sandbox", template="web"),
            await tools.call("read_file", sandbox_id=made["sandboxId"], path="/home/user/missing.txt"),
            await tools.call("write_file", sandbox_id=made["sandboxId"], path="x", content="%%", encoding="base64"),
        ]
        return made["sandboxId"], errors

    sid, errors = asyncio.run(_over_http(server.url, key_of(tenant), "auto", mine))
    assert all(is_error for _, is_error in errors)
    assert "no-such-function" in errors[0][0] and "not found" in errors[0][0]
    assert "runs its own server on port 8080" in errors[1][0]
    assert "/home/user/missing.txt" in errors[2][0]
    assert "not valid base64" in errors[3][0]

    async def as_other(tools: Tools) -> list:
        return [
            await tools.call("read_file", sandbox_id=sid, path="secret.txt"),
            await tools.call("run_command", sandbox_id=sid, command="cat secret.txt"),
            await tools.call("end_sandbox", sandbox_id=sid),
        ]

    for text, is_error in asyncio.run(_over_http(server.url, key_of(other), "auto", as_other)):
        assert is_error and f"no live sandbox '{sid}'" in text
    [session] = tenant.get("/v1/sessions").json()["sessions"]
    assert session["sessionStatus"] == "Active"  # the other tenant's end_sandbox did nothing


def test_the_endpoint_refuses_requests_without_a_valid_api_key(server):
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    for headers in ({}, {"X-API-Key": "e2b_" + "0" * 40}):
        answer = httpx.post(f"{server.url}/mcp", json=body, headers=headers)
        assert answer.status_code == 401
        assert answer.headers["www-authenticate"] == 'Bearer realm="hutch"'
        assert answer.json()["error"]["code"] == -32600


def test_hutch_mcp_serves_the_tools_over_stdio_as_the_tenant_of_its_key(server, tenant):
    env = {**os.environ, "HUTCH_URL": server.url, "HUTCH_API_KEY": key_of(tenant)}
    params = StdioServerParameters(command=sys.executable, args=["-m", "hutch", "mcp"], env=env)

    async def script() -> tuple:
        async with Client(params) as client:
            tools = Tools(client)
            made, _ = await tools.call("create_sandbox", template="base", timeout_seconds=120)
            ran = await tools.call("run_command", sandbox_id=made["sandboxId"], command="echo from stdio")
            listed = await tools.call("list_sandboxes")
            ended = await tools.call("end_sandbox", sandbox_id=made["sandboxId"])
            return made, ran, listed, ended

    made, ran, listed, ended = asyncio.run(script())
    assert ran[0]["stdout"] == "from stdio\n"
    assert [s["sandboxId"] for s in listed[0]] == [made["sandboxId"]]
    assert ended[0]["ended"] is True
    [session] = tenant.get("/v1/sessions").json()["sessions"]
    assert session["sessionId"] == made["sandboxId"] and session["sessionTTLInSeconds"] == 120


def test_hutch_mcp_without_a_key_says_so_and_exits():
    env = {k: v for k, v in os.environ.items() if k != "HUTCH_API_KEY"}
    done = subprocess.run([sys.executable, "-m", "hutch", "mcp"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stdout == ""
    assert "HUTCH_API_KEY" in done.stderr
