"""The gateway through a real `hutch serve`: affinity, streaming, WebSockets, activity, E2B traffic.

Sessions are told apart by what lives in their instance (a file with a random token in the
sandbox's home): the same key must find its own file again, another key must not see it.
User-server functions run small servers written inline (`python3 -c`), using only the standard
library and the `websockets` package of hutch's environment, which sandboxes see read-only.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from tests.e2e.conftest import Server, _cleanup

HTTP_SERVER = r"""
import hashlib, http.server, json, os, threading, urllib.parse
acks, lock = {}, threading.Lock()
def ack(key):
    with lock:
        return acks.setdefault(key, threading.Event())
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def reply(self, status, body, ctype="application/json"):
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()
    def route(self):
        url = urllib.parse.urlsplit(self.path)
        return url.path, dict(urllib.parse.parse_qsl(url.query))
    def body(self):
        if "chunked" in self.headers.get("transfer-encoding", ""):
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                data = self.rfile.read(size + 2)[:size]  # no trailers: "0\r\n\r\n" ends it
                if not size:
                    return
                yield data
        left = int(self.headers.get("content-length", 0))
        while left:
            data = self.rfile.read(min(left, 1 << 20))
            left -= len(data)
            yield data
    def do_GET(self):
        path, q = self.route()
        if path == "/sse":
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for i in range(3):
                self.chunk(f"id: {i}\ndata: event {i}\n\n".encode())
                if i < 2 and not ack(q["stream"] + str(i)).wait(60):
                    self.chunk(b"event: timeout\ndata: no ack\n\n")
                    break
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/download":
            size = int(q["size"])
            block = hashlib.sha256(q["seed"].encode()).digest() * 2048
            self.send_response(200)
            self.send_header("content-type", "application/octet-stream")
            self.send_header("content-length", str(size))
            self.end_headers()
            while size:
                part = block[: min(size, len(block))]
                self.wfile.write(part)
                size -= len(part)
        elif path == "/whoami":
            self.reply(200, json.dumps({"pid": os.getpid(), "headers": dict(self.headers)}).encode())
        elif path == "/die":
            os.kill(2, 9)  # the agent: the instance goes down with it, this request unanswered
        else:
            self.reply(404, b'{"error": "no such path"}')
    def do_POST(self):
        path, q = self.route()
        if path == "/ack":
            ack(q["stream"] + q["i"]).set()
            self.reply(200, b"{}")
        elif path == "/upload":
            digest, size = hashlib.sha256(), 0
            for data in self.body():
                digest.update(data)
                size += len(data)
            self.reply(200, json.dumps({"size": size, "sha256": digest.hexdigest()}).encode())
        else:
            self.reply(404, b"{}")
http.server.ThreadingHTTPServer(("127.0.0.1", 8080), H).serve_forever()
"""

WS_SERVER = r"""
import asyncio
from websockets.asyncio.server import serve
async def echo(ws):
    async for message in ws:
        await ws.send(message)
async def main():
    async with serve(echo, "127.0.0.1", 8081, subprotocols=["echo"]) as server:
        await server.serve_forever()
asyncio.run(main())
"""

DOMAIN = "sandbox.test"


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    """One server for the module: warm pools, a short reap interval, E2B host routing on."""
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="hutch-e2e-gw-", dir="/var/tmp"))
    root.chmod(0o755)
    config = f'reap_interval = 0.2\ndomain = "{DOMAIN}"\n[warm_pools]\nbase = 2\n"code-interpreter-v1" = 1\n'
    srv = Server(root / "data", config)
    srv.start()
    yield srv
    _cleanup(srv)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def tenant(gw) -> httpx.Client:
    return gw.new_tenant("gateway", max_sessions=100)


def _function(client: httpx.Client, **spec) -> str:
    name = f"fn-{uuid.uuid4().hex[:8]}"
    body = {"name": name, "resources": {"memoryMB": 256, "diskMB": 64}, **spec}
    response = client.post("/v1/functions", json=body)
    assert response.status_code == 201, response.text
    return name


@pytest.fixture(scope="module")
def web(tenant) -> str:
    return _function(tenant, startCommand=["python3", "-c", HTTP_SERVER], port=8080)


@pytest.fixture(scope="module")
def ws_fn(tenant) -> str:
    return _function(tenant, startCommand=["python3", "-c", WS_SERVER], port=8081)


def _wait_for(predicate, timeout: float = 15.0, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not met in time")


def _put(client: httpx.Client, function: str, key: str, path: str, data: bytes) -> httpx.Response:
    return client.post(
        f"/functions/{function}/invoke/files",
        params={"path": path},
        content=data,
        headers={"x-fc-session-id": key, "content-type": "application/octet-stream"},
    )


def _get(client: httpx.Client, function: str, key: str, path: str) -> httpx.Response:
    return client.get(f"/functions/{function}/invoke/files", params={"path": path}, headers={"x-fc-session-id": key})


def _session(client: httpx.Client, function: str, key: str) -> dict:
    return client.get(f"/v1/functions/{function}/sessions/{key}").json()


# -- affinity ------------------------------------------------------------------------------------


def test_the_same_key_always_reaches_its_own_instance_and_other_keys_never_do(tenant):
    token = secrets.token_hex(16).encode()
    assert _put(tenant, "base", "alice", "/home/user/mine.txt", token).status_code == 200
    for _ in range(5):
        read = _get(tenant, "base", "alice", "/home/user/mine.txt")
        assert read.status_code == 200 and read.content == token
        assert read.headers["x-fc-session-id"] == "alice"
    assert _get(tenant, "base", "bob", "/home/user/mine.txt").status_code == 404
    alice, bob = _session(tenant, "base", "alice"), _session(tenant, "base", "bob")
    assert alice["containerId"] != bob["containerId"]
    assert alice["sessionAffinityType"] == "HEADER_FIELD"


def test_the_same_key_in_another_tenant_is_another_session(gw, tenant):
    token = secrets.token_hex(8).encode()
    assert _put(tenant, "base", "shared-key", "/home/user/t.txt", token).status_code == 200
    other = gw.new_tenant("other")
    assert _get(other, "base", "shared-key", "/home/user/t.txt").status_code == 404


def test_a_request_without_a_key_gets_a_generated_one_in_the_same_header(tenant):
    first = tenant.post(
        "/functions/base/invoke/files",
        params={"path": "/home/user/g.txt"},
        content=b"generated",
        headers={"content-type": "application/octet-stream"},
    )
    assert first.status_code == 200, first.text
    key = first.headers["x-fc-session-id"]
    assert len(key) == 20
    assert _get(tenant, "base", key, "/home/user/g.txt").content == b"generated"
    assert _session(tenant, "base", key)["sessionStatus"] == "Active"


def test_a_function_with_its_own_header_name_routes_by_it(tenant):
    name = _function(tenant, sessionAffinityConfig={"headerName": "X-Agent-Conversation"})
    put = tenant.post(
        f"/functions/{name}/invoke/files",
        params={"path": "/home/user/h.txt"},
        content=b"named",
        headers={"X-Agent-Conversation": "conv-1", "content-type": "application/octet-stream"},
    )
    assert put.status_code == 200 and put.headers["x-agent-conversation"] == "conv-1"
    read = tenant.get(
        f"/functions/{name}/invoke/files",
        params={"path": "/home/user/h.txt"},
        headers={"x-agent-conversation": "conv-1"},
    )
    assert read.content == b"named"


@pytest.mark.parametrize("bad", ["-dash-first", "has space", "x" * 65, "semi;colon", "ünï"])
def test_malformed_keys_are_refused_with_400(tenant, bad):
    response = tenant.get("/functions/base/invoke/health", headers={"x-fc-session-id": bad.encode()})
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_argument"
    assert "1-64 characters" in response.json()["message"]


def test_cookie_mode_sets_the_cookie_on_the_first_answer_and_routes_by_it(gw, tenant):
    name = _function(tenant, sessionAffinity="GENERATED_COOKIE", sessionAffinityConfig={"sessionTTLInSeconds": 900})
    key = tenant.headers["X-API-Key"]
    with httpx.Client(base_url=gw.url, headers={"X-API-Key": key}) as browser:
        first = browser.post(
            f"/functions/{name}/invoke/files",
            params={"path": "/home/user/c.txt"},
            content=b"jar",
            headers={"content-type": "application/octet-stream"},
        )
        assert first.status_code == 200
        cookie = first.headers["set-cookie"]
        session_id = browser.cookies["x-fc-cookie-session-id"]
        assert cookie == f"x-fc-cookie-session-id={session_id}; Path=/; Max-Age=900; HttpOnly"
        again = browser.get(f"/functions/{name}/invoke/files", params={"path": "/home/user/c.txt"})
        assert again.content == b"jar" and "set-cookie" not in again.headers
    with httpx.Client(base_url=gw.url, headers={"X-API-Key": key}) as stranger:
        other = stranger.get(f"/functions/{name}/invoke/files", params={"path": "/home/user/c.txt"})
        assert other.status_code == 404 and "set-cookie" in other.headers
    assert _session(tenant, name, session_id)["sessionAffinityType"] == "GENERATED_COOKIE"


def test_an_ended_key_starts_a_new_session(tenant):
    assert _put(tenant, "base", "again", "/home/user/a.txt", b"1").status_code == 200
    before = _session(tenant, "base", "again")
    assert tenant.delete("/v1/functions/base/sessions/again").status_code == 204
    assert _get(tenant, "base", "again", "/home/user/a.txt").status_code == 404
    after = _session(tenant, "base", "again")
    assert after["sessionStatus"] == "Active" and after["containerId"] != before["containerId"]


def test_an_ended_key_is_refused_when_the_function_disables_reuse(tenant):
    name = _function(tenant, sessionAffinityConfig={"disableSessionIdReuse": True})
    assert tenant.get(f"/functions/{name}/invoke/health", headers={"x-fc-session-id": "once"}).status_code == 204
    assert tenant.delete(f"/v1/functions/{name}/sessions/once").status_code == 204
    refused = tenant.get(f"/functions/{name}/invoke/health", headers={"x-fc-session-id": "once"})
    assert refused.status_code == 400
    assert refused.json()["code"] == "failed_precondition" and "reuse" in refused.json()["message"]


def test_concurrent_first_requests_with_one_key_share_one_instance(gw, tenant):
    name = _function(tenant, warmPoolSize=1)
    _wait_for(lambda: httpx.get(f"{gw.url}/health").json()["warmPools"].get(f"{_tenant_id(tenant)}/{name}") == 1)
    barrier = threading.Barrier(10)

    def first_request(_: int) -> httpx.Response:
        with httpx.Client(base_url=gw.url, headers=tenant.headers, timeout=60) as client:
            barrier.wait()
            return client.get(f"/functions/{name}/invoke/health", headers={"x-fc-session-id": "racer"})

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(first_request, range(10)))
    assert [a.status_code for a in answers] == [204] * 10
    active = tenant.get(f"/v1/functions/{name}/sessions", params={"status": "Active"}).json()["sessions"]
    assert [s["sessionId"] for s in active] == ["racer"]
    listed = tenant.get(f"/v1/functions/{name}/sessions").json()["sessions"]
    assert len(listed) == 1


def _tenant_id(client: httpx.Client) -> str:
    return client.get("/v1/tenants/me").json()["tenantId"]


def test_invocation_needs_an_api_key_and_a_known_function(gw, tenant):
    anonymous = httpx.get(f"{gw.url}/functions/base/invoke/health")
    assert anonymous.status_code == 401 and anonymous.json()["code"] == "unauthenticated"
    wrong = httpx.get(f"{gw.url}/functions/base/invoke/health", headers={"X-API-Key": "hk_nope"})
    assert wrong.status_code == 401
    missing = tenant.get("/functions/no-such-fn/invoke/health")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"


def test_a_bearer_token_works_too_and_credentials_never_reach_the_instance(gw, tenant, web):
    key = tenant.headers["X-API-Key"]
    for headers in ({"X-API-Key": key}, {"Authorization": f"Bearer {key}"}):
        seen = httpx.get(
            f"{gw.url}/functions/{web}/invoke/whoami", headers={**headers, "x-fc-session-id": "creds"}
        ).json()["headers"]
        lowered = {k.lower(): v for k, v in seen.items()}
        assert "x-api-key" not in lowered and "authorization" not in lowered
        assert lowered["x-fc-session-id"] == "creds" and lowered["x-forwarded-prefix"] == f"/functions/{web}/invoke"


def test_mcp_affinity_modes_answer_unknown_mcp_sessions_with_json_rpc_404s(tenant):
    # The MCP modes themselves are tested with real MCP clients in test_mcp.py.
    name = _function(tenant, sessionAffinity="MCP_STREAMABLE")
    response = tenant.post(f"/functions/{name}/invoke/mcp", json={}, headers={"mcp-session-id": "unknown"})
    assert response.status_code == 404
    assert response.json() == {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "Session not found"}}


# -- user servers: streaming, large bodies, SSE, WebSocket ---------------------------------------


def test_sse_events_arrive_one_by_one_before_the_stream_ends(gw, tenant, web):
    """The server sends event N+1 only after the client acknowledged event N (on another
    connection), so a buffering gateway would deadlock into the server's `timeout` event."""
    headers = {"x-fc-session-id": "sse"}
    events = []
    with tenant.stream("GET", f"/functions/{web}/invoke/sse", params={"stream": "s1"}, headers=headers) as stream:
        assert stream.headers["content-type"] == "text/event-stream"
        assert stream.headers["x-accel-buffering"] == "no"
        for line in stream.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) < 3 and events[-1] != "no ack":
                    i = len(events) - 1
                    ack = tenant.post(f"/functions/{web}/invoke/ack", params={"stream": "s1", "i": i}, headers=headers)
                    assert ack.status_code == 200
    assert events == ["event 0", "event 1", "event 2"]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_large_upload_streams_through_intact(tenant, web, framing):
    size = 40 * 1024 * 1024
    data = secrets.token_bytes(1 << 20) * 40
    content = data if framing == "content-length" else (data[i : i + (1 << 20)] for i in range(0, size, 1 << 20))
    answer = tenant.post(f"/functions/{web}/invoke/upload", content=content, headers={"x-fc-session-id": "big"})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"size": size, "sha256": hashlib.sha256(data).hexdigest()}


def test_a_large_download_streams_through_intact(tenant, web):
    size = 48 * 1024 * 1024 + 123
    block = hashlib.sha256(b"seed-1").digest() * 2048
    expected = hashlib.sha256((block * (size // len(block) + 1))[:size]).hexdigest()
    digest, received = hashlib.sha256(), 0
    with tenant.stream(
        "GET",
        f"/functions/{web}/invoke/download",
        params={"size": size, "seed": "seed-1"},
        headers={"x-fc-session-id": "big"},
    ) as stream:
        assert stream.headers["content-length"] == str(size)
        for chunk in stream.iter_bytes():
            digest.update(chunk)
            received += len(chunk)
    assert received == size and digest.hexdigest() == expected


def test_a_websocket_reaches_the_user_server_and_echoes(gw, tenant, ws_fn):
    url = gw.url.replace("http://", "ws://") + f"/functions/{ws_fn}/invoke/chat"
    headers = {"X-API-Key": tenant.headers["X-API-Key"], "x-fc-session-id": "ws-1"}
    with ws_connect(url, additional_headers=headers, subprotocols=["echo"]) as ws:
        assert ws.subprotocol == "echo"
        assert ws.response.headers["x-fc-session-id"] == "ws-1"
        ws.send("hello")
        assert ws.recv(timeout=20) == "hello"
        ws.send(b"\x00\xff" * 1000)
        assert ws.recv(timeout=20) == b"\x00\xff" * 1000
    assert _session(tenant, ws_fn, "ws-1")["sessionStatus"] == "Active"


def test_a_websocket_without_a_key_gets_a_generated_session(gw, tenant, ws_fn):
    url = gw.url.replace("http://", "ws://") + f"/functions/{ws_fn}/invoke/"
    with ws_connect(url, additional_headers={"X-API-Key": tenant.headers["X-API-Key"]}, subprotocols=["echo"]) as ws:
        key = ws.response.headers["x-fc-session-id"]
        ws.send("x")
        assert ws.recv(timeout=20) == "x"
    assert _session(tenant, ws_fn, key)["sessionStatus"] == "Active"


def test_a_websocket_to_a_function_without_one_is_refused_with_the_reason(gw, tenant):
    from websockets.exceptions import InvalidStatus

    url = gw.url.replace("http://", "ws://") + "/functions/no-such-fn/invoke/"
    with pytest.raises(InvalidStatus) as caught:
        ws_connect(url, additional_headers={"X-API-Key": tenant.headers["X-API-Key"]})
    assert caught.value.response.status_code == 404


# -- client disconnects, instance crashes ----------------------------------------------------------


def test_a_client_that_leaves_interrupts_its_execution(tenant):
    """`while True: pass` is interrupted once its client goes; the next run on the same session
    answers (it would queue behind the loop forever otherwise)."""
    headers = {"x-fc-session-id": "runaway"}
    url = "/functions/code-interpreter-v1/invoke/execute"
    with tenant.stream("POST", url, json={"code": "while True: pass"}, headers=headers) as stream:
        first = json.loads(next(stream.iter_lines()))
        assert first["type"] == "number_of_executions"
    answer = tenant.post(url, json={"code": "6 * 7"}, headers=headers, timeout=30)
    results = [json.loads(line) for line in answer.text.splitlines()]
    assert any(r["type"] == "result" and r["text"] == "42" for r in results)


def test_an_instance_that_dies_under_a_request_is_a_502_and_the_next_request_recovers(tenant, web):
    headers = {"x-fc-session-id": "crashy"}
    before = tenant.get(f"/functions/{web}/invoke/whoami", headers=headers)
    assert before.status_code == 200
    died = tenant.get(f"/functions/{web}/invoke/die", headers=headers)
    assert died.status_code == 502
    assert died.json()["code"] == "unavailable" and "instance" in died.json()["message"]

    def recovered():
        answer = tenant.get(f"/functions/{web}/invoke/whoami", headers=headers)
        return answer if answer.status_code == 200 else None

    _wait_for(recovered)
    assert _session(tenant, web, "crashy")["epoch"] == 1


# -- activity and the idle timeout ---------------------------------------------------------------


def test_requests_and_open_streams_keep_a_session_alive_and_idling_ends_it(tenant):
    name = _function(tenant, sessionAffinityConfig={"sessionIdleTimeoutInSeconds": 2})
    key = "idler"
    assert _put(tenant, name, key, "/home/user/alive.txt", b"yes").status_code == 200
    container = _session(tenant, name, key)["containerId"]

    # Requests every half second for three idle timeouts.
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        assert _get(tenant, name, key, "/home/user/alive.txt").content == b"yes"
        time.sleep(0.5)
    # One request that stays open for two and a half idle timeouts.
    answer = tenant.post(
        f"/functions/{name}/invoke/execute",
        json={"code": "import time; time.sleep(5); 'slept'"},
        headers={"x-fc-session-id": key},
        timeout=60,
    )
    assert "slept" in answer.text
    session = _session(tenant, name, key)
    assert session["sessionStatus"] == "Active" and session["containerId"] == container

    ended = _wait_for(lambda: (s := _session(tenant, name, key))["sessionStatus"] == "Expired" and s)
    assert ended["endReason"] == "idle"
    assert _get(tenant, name, key, "/home/user/alive.txt").status_code == 404


def _execute(client: httpx.Client, function: str, key: str, code: str) -> str:
    answer = client.post(
        f"/functions/{function}/invoke/execute", json={"code": code}, headers={"x-fc-session-id": key}, timeout=60
    )
    assert answer.status_code == 200, answer.text
    return answer.text


def test_an_idle_session_freezes_and_its_next_request_wakes_it_with_its_memory(tenant):
    name = _function(tenant, sessionAffinityConfig={"sessionFreezeAfterIdleInSeconds": 1})
    key = "sleeper"
    _execute(tenant, name, key, "x = 41")
    awake = _session(tenant, name, key)
    assert awake["state"] == "running"
    asleep = _wait_for(lambda: (s := _session(tenant, name, key))["state"] == "frozen" and s)
    assert asleep["paused"] is False and asleep["containerId"] == awake["containerId"]
    assert "42" in _execute(tenant, name, key, "x + 1")  # the request wakes it: no error, same memory
    woken = _session(tenant, name, key)
    assert woken["epoch"] == awake["epoch"] and woken["containerId"] == awake["containerId"]
    assert _wait_for(lambda: _session(tenant, name, key)["state"] == "frozen")  # and it sleeps again


def test_a_paused_session_answers_409_until_resumed(tenant):
    name = _function(tenant)
    key = "paused"
    assert _put(tenant, name, key, "/home/user/kept.txt", b"kept").status_code == 200
    paused = tenant.post(f"/v1/functions/{name}/sessions/{key}/pause")
    assert paused.status_code == 200 and paused.json()["state"] == "frozen" and paused.json()["paused"] is True
    refused = _get(tenant, name, key, "/home/user/kept.txt")
    assert refused.status_code == 409 and "paused" in refused.json()["message"]
    resumed = tenant.post(f"/v1/functions/{name}/sessions/{key}/resume")
    assert resumed.status_code == 200 and resumed.json()["state"] == "running"
    assert _get(tenant, name, key, "/home/user/kept.txt").content == b"kept"
    ghost = tenant.post(f"/v1/functions/{name}/sessions/nobody/pause")
    assert ghost.status_code == 404 and ghost.json()["code"] == "not_found"


# -- E2B traffic -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox(tenant) -> dict:
    created = tenant.post("/sandboxes", json={"templateID": "base", "timeout": 600})
    assert created.status_code == 201, created.text
    return created.json()


def _e2b(sandbox: dict, port: int, token: bool = True) -> dict[str, str]:
    headers = {"E2b-Sandbox-Id": sandbox["sandboxID"], "E2b-Sandbox-Port": str(port)}
    if token:
        headers["X-Access-Token"] = sandbox["envdAccessToken"]
    return headers


def test_e2b_headers_route_to_the_sandbox_with_its_token(gw, sandbox):
    envs = httpx.get(f"{gw.url}/envs", headers=_e2b(sandbox, 49983))
    assert envs.status_code == 200 and "PATH" in envs.json()
    health = httpx.get(f"{gw.url}/health", headers=_e2b(sandbox, 49983, token=False))
    assert health.status_code == 204


def test_e2b_traffic_without_or_with_a_wrong_token_is_refused(gw, sandbox):
    missing = httpx.get(f"{gw.url}/envs", headers=_e2b(sandbox, 49983, token=False))
    assert missing.status_code == 401 and missing.json()["code"] == 401
    wrong = httpx.get(f"{gw.url}/envs", headers={**_e2b(sandbox, 49983), "X-Access-Token": "guess"})
    assert wrong.status_code == 401
    run = httpx.post(f"{gw.url}/execute", json={"code": "1"}, headers=_e2b(sandbox, 49999, token=False))
    assert run.status_code == 401


def test_an_unknown_sandbox_is_a_502_the_sdks_read_as_not_found(gw):
    headers = {"E2b-Sandbox-Id": "inosuchsandbox000000", "E2b-Sandbox-Port": "49983"}
    answer = httpx.get(f"{gw.url}/health", headers=headers)
    assert answer.status_code == 502
    assert answer.json()["code"] == 502 and "was not found" in answer.json()["message"]


def test_sessions_without_a_token_are_not_reachable_as_sandboxes(gw, tenant):
    native = tenant.post("/v1/functions/base/sessions", json={}).json()
    headers = {"E2b-Sandbox-Id": native["sessionId"], "E2b-Sandbox-Port": "49983"}
    assert httpx.get(f"{gw.url}/health", headers=headers).status_code == 502


def test_the_e2b_host_form_routes_to_envd_and_to_user_ports(gw, sandbox):
    host = f"49983-{sandbox['sandboxID']}.{DOMAIN}"
    envs = httpx.get(f"{gw.url}/envs", headers={"Host": host, "X-Access-Token": sandbox["envdAccessToken"]})
    assert envs.status_code == 200
    # A user server on port 8000 inside the sandbox, started through envd's process service; its
    # event stream stays open while the port is tried.
    start = _envelope({"process": {"cmd": "python3", "args": ["-m", "http.server", "8000", "--bind", "127.0.0.1"]}})
    headers = {**_e2b(sandbox, 49983), "content-type": "application/connect+json"}
    with httpx.stream("POST", f"{gw.url}/process.Process/Start", headers=headers, content=start, timeout=60) as events:
        assert events.status_code == 200
        assert b"start" in next(events.iter_raw())

        def listing():
            answer = httpx.get(f"{gw.url}/", headers={"Host": f"8000-{sandbox['sandboxID']}.{DOMAIN}"})
            return answer if answer.status_code == 200 else None

        assert "Directory listing" in _wait_for(listing).text


def _envelope(message: dict) -> bytes:
    data = json.dumps(message).encode()
    return b"\x00" + len(data).to_bytes(4, "big") + data
