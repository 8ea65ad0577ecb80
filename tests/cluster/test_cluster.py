"""Two gateways and three nodes as separate processes, each node in a network namespace of its own,
PostgreSQL as MetaDB and workspaces on JuiceFS (tests/cluster/harness.py). What a cluster must
do: spread sessions, keep affinity whichever gateway a request takes, survive the death of a
gateway, of a node (its sessions move with their files) and a restart of PostgreSQL.

"Same instance" is checked with a file in the instance's private /tmp (gone with the instance),
"same workspace" with a file in its home (kept on the shared volume).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import os
import shutil
import signal
import time
import uuid

import httpx
import httpx2
import pytest
from mcp import Client, ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from tests.cluster.harness import ADMIN_KEY, NODE_PORT, Cluster
from tests.e2e.mcp_support import deploy, sessions_of
from tests.e2e.test_restart import _invoke

pytestmark = [pytest.mark.slow, pytest.mark.sandbox]


@pytest.fixture(scope="module")
def cluster(shared_volume):
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    made = Cluster(shared_volume)
    try:
        made.start()
        yield made
    finally:
        made.stop()


@pytest.fixture(scope="module")
def api_key(cluster) -> str:
    made = cluster.gateways[0].client().post("/v1/tenants", json={"name": "cluster", "maxSessions": 40})
    assert made.status_code == 201, made.text
    return made.json()["apiKey"]


@pytest.fixture
def gateways(cluster, api_key) -> list[httpx.Client]:
    return [gateway.client(api_key) for gateway in cluster.gateways]


def _session(client: httpx.Client, key: str, function: str = "base") -> dict:
    answer = client.get(f"/v1/functions/{function}/sessions/{key}")
    assert answer.status_code == 200, answer.text
    return answer.json()


def _until(predicate, timeout: float = 30.0, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(step)


def test_sessions_spread_over_nodes_and_either_gateway_reaches_the_same_instance(gateways):
    keys = [f"spread-{i}" for i in range(9)]
    for index, key in enumerate(keys):
        assert _invoke(gateways[index % 2], key, f"echo {key} > /tmp/mark; echo ok").strip() == "ok"
        time.sleep(0.3)  # the nodes' heartbeats carry their load to the gateways
    nodes = {_session(gateways[0], key)["nodeId"] for key in keys}
    assert len(nodes) >= 2, f"every session landed on {nodes}"
    for index, key in enumerate(keys):  # the other gateway, the same instance
        assert _invoke(gateways[(index + 1) % 2], key, "cat /tmp/mark").strip() == key


def test_racing_first_requests_through_both_gateways_share_one_instance(gateways):
    key = f"race-{uuid.uuid4().hex[:6]}"
    # Whoever runs first names the instance; everyone must read that same name.
    command = "echo $$ > /tmp/id.$$; mv -n /tmp/id.$$ /tmp/id; cat /tmp/id"
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: _invoke(gateways[i % 2], key, command).strip(), range(8)))
    assert len(set(answers)) == 1, answers
    live = gateways[0].get("/v1/sessions", params={"status": "Active"}).json()["sessions"]
    assert [s["sessionId"] for s in live].count(key) == 1


def test_a_create_retried_through_the_other_gateway_gets_the_first_create_s_sandbox(gateways):
    body, key = {"templateID": "base", "timeout": 60}, {"Idempotency-Key": f"idem-{uuid.uuid4().hex[:6]}"}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # racing retries, both gateways
        answers = list(pool.map(lambda i: gateways[i % 2].post("/v2/sandboxes", json=body, headers=key), range(4)))
    assert [a.status_code for a in answers] == [201] * 4, [a.text for a in answers]
    assert len({a.json()["sandboxID"] for a in answers}) == 1
    changed = gateways[1].post("/v2/sandboxes", json={**body, "timeout": 90}, headers=key)
    assert changed.status_code == 409 and changed.json()["code"] == 409
    assert gateways[0].delete(f"/sandboxes/{answers[0].json()['sandboxID']}").status_code == 204


def test_host_named_traffic_through_either_gateway_finds_sandboxes_and_native_sessions(gateways):
    made = gateways[0].post(
        "/v2/sandboxes", json={"templateID": "code-interpreter-v1", "network": {"allowPublicTraffic": False}}
    )
    assert made.status_code == 201, made.text
    sandbox = made.json()
    host = {"Host": f"49999-{sandbox['sandboxID']}.localhost"}
    private = gateways[1].get("/contexts", headers=host)
    assert private.status_code == 403 and private.json()["code"] == 403
    token = {**host, "e2b-traffic-access-token": sandbox["trafficAccessToken"]}
    assert gateways[1].get("/contexts", headers=token).status_code == 200

    native = gateways[0].post("/v1/functions/base/sessions", json={}).json()
    envd = gateways[1].get("/health", headers={"Host": f"49983-{native['previewId']}.localhost"})
    assert envd.status_code == 403  # found through the other gateway; its agent is not open by host name
    gateways[0].delete(f"/sandboxes/{sandbox['sandboxID']}")
    gateways[0].delete(f"/v1/functions/base/sessions/{native['sessionId']}")


def test_metrics_and_logs_written_by_a_node_are_read_through_any_gateway(gateways):
    made = gateways[0].post("/v2/sandboxes", json={"templateID": "base", "timeout": 120})
    assert made.status_code == 201, made.text
    sandbox_id = made.json()["sandboxID"]
    assert gateways[0].post(f"/sandboxes/{sandbox_id}/timeout", json={"timeout": 200}).status_code == 204
    metrics = _until(lambda: gateways[1].get(f"/sandboxes/{sandbox_id}/metrics").json())
    assert metrics[0]["memUsed"] > 0 and metrics[0]["cpuCount"] == 1
    logs = _until(lambda: len(got := gateways[1].get(f"/v2/sandboxes/{sandbox_id}/logs").json()["logs"]) >= 2 and got)
    assert [e["message"] for e in logs[:2]] == ["created", "renewed"]
    assert gateways[1].delete(f"/sandboxes/{sandbox_id}").status_code == 204


def test_cookie_affinity_holds_across_gateways(gateways):
    name = f"cookie-{uuid.uuid4().hex[:6]}"
    made = gateways[0].post(
        "/v1/functions", json={"name": name, "sessionAffinity": "GENERATED_COOKIE", "warmPoolSize": 0}
    )
    assert made.status_code == 201, made.text
    first = gateways[0].get(f"/functions/{name}/invoke/health")
    assert first.status_code == 204, first.text
    cookie = first.headers["set-cookie"].split(";")[0]
    session_id = cookie.split("=", 1)[1]
    for client in gateways:  # both gateways, one session
        again = client.get(f"/functions/{name}/invoke/health", headers={"cookie": cookie})
        assert again.status_code == 204
    live = [s for s in gateways[1].get("/v1/sessions").json()["sessions"] if s["functionName"] == name]
    assert [s["sessionId"] for s in live] == [session_id]


def test_the_e2b_sdk_through_one_gateway_then_the_other(cluster, api_key, monkeypatch):
    from e2b_code_interpreter import Sandbox

    monkeypatch.setenv("E2B_API_KEY", api_key)
    monkeypatch.delenv("E2B_DOMAIN", raising=False)
    first, second = cluster.gateways
    monkeypatch.setenv("E2B_API_URL", first.url)
    monkeypatch.setenv("E2B_SANDBOX_URL", first.url)
    sandbox = Sandbox.create()
    assert sandbox.run_code("x = 41").error is None
    sandbox.files.write("/home/user/note.txt", "kept")
    monkeypatch.setenv("E2B_API_URL", second.url)
    monkeypatch.setenv("E2B_SANDBOX_URL", second.url)
    again = Sandbox.connect(sandbox.sandbox_id)
    assert again.run_code("x + 1").text == "42"
    assert again.files.read("/home/user/note.txt") == "kept"
    assert again.sandbox_id in [s.sandbox_id for s in Sandbox.list().next_items()]
    again.kill()


class _RoundRobin(httpx2.AsyncBaseTransport):
    """A load balancer in front of the gateways: each request goes to the next one."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = itertools.cycle(ports)
        self.inner = httpx2.AsyncHTTPTransport()
        self.seen: list[int] = []

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        port = next(self.ports)
        self.seen.append(port)
        request.url = request.url.copy_with(port=port)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_an_mcp_session_started_through_one_gateway_is_served_through_every_gateway(cluster, gateways, api_key):
    function = deploy(gateways[0], "cluster-counter")
    ports = [gateway.port for gateway in cluster.gateways]

    async def count() -> tuple[list[dict], list[int]]:
        balancer = _RoundRobin(ports)
        http = httpx2.AsyncClient(transport=balancer, headers={"X-API-Key": api_key}, timeout=60)
        url = f"{cluster.gateways[0].url}/functions/{function}/invoke/mcp"
        async with http, Client(streamable_http_client(url, http_client=http), mode="legacy") as client:
            results = [(await client.call_tool("increment", {"by": 1})).structured_content for _ in range(4)]
        return results, balancer.seen

    results, seen = asyncio.run(count())
    assert set(seen) == set(ports)  # initialize through one gateway, the calls through both
    assert [r["count"] for r in results] == [1, 2, 3, 4] and len({r["instance"] for r in results}) == 1
    # The client's DELETE, through whichever gateway, ends the session once it was answered.
    ended = _until(lambda: [s for s in sessions_of(gateways[1], function) if s["sessionStatus"] != "Active"])
    assert [s["endReason"] for s in ended] == ["mcp_closed"] and len(sessions_of(gateways[1], function)) == 1
    unknown = gateways[1].post(
        f"/functions/{function}/invoke/mcp",
        headers={"Mcp-Session-Id": "not-bound-anywhere", "Accept": "application/json, text/event-stream"},
        json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
    )
    assert unknown.status_code == 404 and unknown.json()["error"]["message"] == "Session not found", unknown.text


def test_an_mcp_sse_stream_held_by_one_gateway_takes_posts_through_every_gateway(cluster, gateways, api_key):
    function = deploy(gateways[0], "cluster-counter-sse", "function-sse.json")
    ports = [gateway.port for gateway in cluster.gateways]
    balancer = _RoundRobin(ports)

    def through_balancer(headers=None, timeout=None, auth=None) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(transport=balancer, headers=headers, timeout=timeout, auth=auth)

    async def count() -> list[dict]:
        url = f"{cluster.gateways[0].url}/functions/{function}/invoke/sse"
        headers = {"X-API-Key": api_key}
        async with (
            sse_client(url, headers=headers, httpx_client_factory=through_balancer) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            return [(await session.call_tool("increment", {"by": 1})).structured_content for _ in range(4)]

    results = asyncio.run(count())
    assert set(balancer.seen) == set(ports)  # the GET through one gateway, the POSTs through both
    assert [r["count"] for r in results] == [1, 2, 3, 4] and len({r["instance"] for r in results}) == 1
    # The stream's end (the client left) ends the session, on the gateway that held it.
    ended = _until(lambda: [s for s in sessions_of(gateways[1], function) if s["sessionStatus"] != "Active"])
    assert [s["endReason"] for s in ended] == ["mcp_closed"] and len(sessions_of(gateways[1], function)) == 1


def test_each_node_exposes_its_own_sessions_and_instances_to_prometheus_for_admins_only(cluster, gateways):
    from prometheus_client.parser import text_string_to_metric_families

    key = f"metrics-{uuid.uuid4().hex[:6]}"
    assert _invoke(gateways[0], key, "echo ok").strip() == "ok"
    node = cluster.node(_session(gateways[0], key)["nodeId"])
    url = f"http://{node.ip}:{NODE_PORT}/metrics"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"X-API-Key": gateways[0].headers["X-API-Key"]}).status_code == 403
    answer = httpx.get(url, headers={"X-API-Key": ADMIN_KEY})
    assert answer.status_code == 200, answer.text
    families = {family.name: family for family in text_string_to_metric_families(answer.text)}
    assert sum(s.value for s in families["hutch_sessions"].samples) >= 1  # this node's sessions, ours among them
    assert "hutch_instances" in families and "hutch_warm_pool_size" in families


def test_killing_a_gateway_loses_nothing(cluster, gateways):
    assert _invoke(gateways[0], "gw-kill", "echo here > /tmp/mark; echo ok").strip() == "ok"
    cluster.gateways[1].kill(signal.SIGKILL)
    assert _invoke(gateways[0], "gw-kill", "cat /tmp/mark").strip() == "here"
    cluster.gateways[1].start()
    assert _invoke(gateways[1], "gw-kill", "cat /tmp/mark").strip() == "here"


def test_a_killed_node_s_sessions_move_with_their_files_and_it_comes_back_harmless(cluster, gateways):
    key = f"move-{uuid.uuid4().hex[:6]}"
    assert _invoke(gateways[0], key, "echo mine > kept.txt; echo here > /tmp/mark; echo ok").strip() == "ok"
    before = _session(gateways[0], key)
    node = cluster.node(before["nodeId"])
    record = json.loads((node.data_dir / "instances" / before["containerId"] / "instance.json").read_text())
    node.kill(signal.SIGKILL)

    # Within the lease the node may only be restarting: a clear 503, and the session stays put.
    answer = gateways[1].get(f"/functions/base/sessions/{key}/health")
    assert answer.status_code == 503, answer.text
    assert answer.json()["code"] == "unavailable" and "moves to another node" in answer.json()["message"]

    time.sleep(cluster.lease_seconds)
    assert _invoke(gateways[1], key, "cat kept.txt; cat /tmp/mark 2>/dev/null || echo fresh").split() == [
        "mine",
        "fresh",
    ]  # the workspace came along; the instance is new
    after = _session(gateways[0], key)
    assert after["nodeId"] != before["nodeId"] and after["epoch"] == before["epoch"] + 1
    assert _invoke(gateways[0], key, "echo there > /tmp/mark; cat /tmp/mark").strip() == "there"

    # The node comes back: it stops the instance it had (its session lives elsewhere now) and
    # serves nothing of it.
    node.start()
    _until(lambda: not _alive(record["pid"]))
    assert _session(gateways[1], key)["nodeId"] == after["nodeId"]
    assert _invoke(gateways[1], key, "cat /tmp/mark").strip() == "there"


def test_a_dead_node_s_sessions_still_end_at_their_ttl_and_their_workspace_is_wiped(cluster, gateways):
    made = gateways[0].post("/v1/functions/base/sessions", json={"sessionId": "orphan", "sessionTTLInSeconds": 4})
    assert made.status_code == 201, made.text
    marker = f"orphan-{uuid.uuid4().hex}"
    assert _invoke(gateways[0], "orphan", f"touch {marker}; echo ok").strip() == "ok"
    workspaces = cluster.volume.a.mount_point / cluster.shared_dir / "workspaces"
    assert _find(workspaces, marker), "the workspace is on the shared volume"
    before = made.json()
    node = cluster.node(before["nodeId"])
    record = json.loads((node.data_dir / "instances" / before["containerId"] / "instance.json").read_text())
    node.kill(signal.SIGKILL)
    try:
        # No request comes to move it: a live node ends it once its TTL is past.
        ended = _until(lambda: (s := _session(gateways[1], "orphan"))["sessionStatus"] != "Active" and s, timeout=30)
        assert ended["endReason"] == "ttl", ended
        assert not _find(workspaces, marker), "the ended session's workspace is wiped"
    finally:
        node.start()
    _until(lambda: not _alive(record["pid"]))  # the node came back and stopped its stale instance


def _find(root, name: str) -> bool:
    return any(name in files for _, _, files in os.walk(root))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_postgres_restart_is_survived_with_clear_errors_in_between(cluster, gateways):
    key = f"pg-{uuid.uuid4().hex[:6]}"
    assert _invoke(gateways[0], key, "echo here > /tmp/mark; echo ok").strip() == "ok"
    before = _session(gateways[0], key)
    cluster.postgres.stop()
    try:
        seen = set()
        deadline = time.monotonic() + cluster.lease_seconds * 1.5  # long enough for every node to fence
        while time.monotonic() < deadline:
            for client in gateways:
                answer = client.get(f"/functions/base/sessions/{key}/health")
                seen.add(answer.status_code)
                if answer.status_code != 204:
                    assert answer.status_code == 503, answer.text
                    assert answer.json()["code"] == "unavailable"
            time.sleep(0.2)
        assert 503 in seen
        refused = gateways[1].get("/functions/base/sessions/new-during-outage/health")
        assert refused.status_code == 503 and refused.json()["code"] == "unavailable"
    finally:
        cluster.postgres.start()
    _until(lambda: gateways[0].get(f"/functions/base/sessions/{key}/health").status_code == 204)
    for client in gateways:
        assert _invoke(client, key, "cat /tmp/mark").strip() == "here"  # nothing moved, nothing lost
    after = _session(gateways[1], key)
    assert (after["nodeId"], after["epoch"]) == (before["nodeId"], before["epoch"])
