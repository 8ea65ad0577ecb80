"""Metering, quotas and metrics through a real `hutch serve` (real sandboxes, real time).

The server samples every 0.5 s into 10 s buckets, so the amounts here are seconds of real time:
the tolerances are a sampling window or less.
"""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.connect_wire import envelope, stdout_of
from tests.e2e.conftest import ADMIN_KEY, Server, _cleanup
from tests.e2e.test_cli import hutch, ok

HEADER = "x-fc-session-id"
CONFIG = """uid_base = {uid_base}
[warm_pools]
base = 0
"code-interpreter-v1" = 0
[metering]
sample_interval = 0.5
bucket_seconds = 10
"""
# Burns `seconds` of CPU and prints the CPU its process used, its start-up included.
BURN = (
    "python3 -c 'import resource, time\n"
    "while time.process_time() < {seconds}: pass\n"
    "u = resource.getrusage(resource.RUSAGE_SELF)\n"
    "print(u.ru_utime + u.ru_stime)'"
)


@pytest.fixture(scope="module")
def metered():
    root = Path(tempfile.mkdtemp(prefix="hutch-e2e-meter-", dir="/var/tmp"))
    root.chmod(0o755)
    server = Server(root / "data", CONFIG.format(uid_base=1_700_000_000))
    server.start()
    yield server
    _cleanup(server)
    shutil.rmtree(root, ignore_errors=True)


def _function(client: httpx.Client, **resources) -> str:
    name = f"fn-{uuid.uuid4().hex[:8]}"
    body = {"name": name, "resources": {"cpu": 1, "memoryMB": 256, "diskMB": 64, **resources}}
    response = client.post("/v1/functions", json=body)
    assert response.status_code == 201, response.text
    return name


def _run(client: httpx.Client, function: str, session_id: str, command: str) -> tuple[str, float]:
    """Run a command through the gateway; its stdout and how long the request was in flight."""
    message = {"process": {"cmd": "/bin/bash", "args": ["-l", "-c", command]}}
    started = time.monotonic()
    response = client.post(
        f"/functions/{function}/invoke/process.Process/Start",
        content=envelope(message),
        headers={HEADER: session_id, "content-type": "application/connect+json"},
    )
    took = time.monotonic() - started
    assert response.status_code == 200, response.text
    return stdout_of(response.content), took


def _lifetime(record: dict) -> float:
    from datetime import datetime

    def parse(value: str) -> float:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()

    return parse(record["endTime"]) - parse(record["startTime"])


def test_a_session_that_works_then_idles_is_billed_active_for_the_work_and_idle_for_the_rest(metered):
    client = metered.new_tenant("worker")
    function = _function(client)
    created = client.post(f"/v1/functions/{function}/sessions", json={"sessionId": "job"})
    assert created.status_code == 201  # created first: the request below is only the work
    output, took = _run(client, function, "job", BURN.format(seconds=1.5))
    used = float(output)
    time.sleep(2.0)  # idle: nothing in flight, nothing running
    live = client.get(f"/v1/functions/{function}/sessions/job/usage").json()
    assert live["sessionStatus"] == "Active" and live["state"] == "idle"
    assert client.delete(f"/v1/functions/{function}/sessions/job").status_code == 204

    record = client.get(f"/v1/functions/{function}/sessions/job/usage").json()
    assert record["sessionStatus"] == "Expired" and record["endReason"] == "deleted"
    lifetime = _lifetime(record)
    # active: the request, as the gateway saw it (the client saw a little more); idle: the rest
    # What the rule makes true: each window's active time is max(its request time, its CPU
    # seconds), so their sum lies between the request time as the server saw it (inside the
    # client's stopwatch, `took`, less the client's own connect and send time) and that request
    # time plus every CPU second the session used. A request that waits (`sleep`) keeps the CPU
    # term small, so a request counted twice would break the upper bound.
    assert took - 0.25 <= record["activeSeconds"] <= took + record["cpuSeconds"]
    assert record["idleSeconds"] == pytest.approx(lifetime - record["activeSeconds"], abs=0.01)
    assert record["idleSeconds"] >= 2.0 - 0.05 and record["downSeconds"] == 0
    # the CPU the command used, plus bash and the agent serving it
    assert used >= 1.5 and used <= record["cpuSeconds"] <= used + 0.3
    assert record["memoryPeakBytes"] >= record["memoryAverageBytes"] > 1 << 20
    pricing = client.get("/v1/usage").json()["pricing"]
    assert (pricing["basis"], pricing["idleCpuFactor"], pricing["idleMemoryFactor"]) == ("allocated", 0.0, 0.1)
    expected_cpu = pricing["vcpuSecond"] * record["vcpuActiveSeconds"]  # 1 vCPU x active seconds; idle is free
    expected_memory = pricing["memoryGiBSecond"] * (  # 0.25 GiB x (active + idle / 10)
        0.25 * record["activeSeconds"] + 0.1 * 0.25 * record["idleSeconds"]
    )
    assert record["cost"]["cpu"] == pytest.approx(expected_cpu, rel=1e-3)
    assert record["cost"]["memory"] == pytest.approx(expected_memory, rel=1e-3)


def test_ended_sessions_keep_their_records_and_tenant_totals_add_up(metered):
    client = metered.new_tenant("totals")
    first, second = _function(client), _function(client, memoryMB=512)
    _run(client, first, "a", "echo a")
    _run(client, second, "b", "echo b")
    time.sleep(0.6)
    for function, key in ((first, "a"), (second, "b")):
        assert client.delete(f"/v1/functions/{function}/sessions/{key}").status_code == 204
    ended = client.get("/v1/usage/sessions", params={"status": "Expired"}).json()["sessions"]
    assert {r["sessionId"] for r in ended} == {"a", "b"}
    assert all(r["endTime"] and r["state"] == "ended" for r in ended)
    time.sleep(1.0)  # samples go on; ended records must not change
    again = client.get("/v1/usage/sessions", params={"status": "Expired"}).json()["sessions"]
    assert again == ended

    summary = client.get("/v1/usage").json()
    for name in ("activeSeconds", "idleSeconds", "cpuSeconds", "vcpuIdleSeconds"):
        assert summary["totals"][name] == pytest.approx(sum(r[name] for r in ended), abs=0.005), name
    per_function = {f["functionName"]: f for f in summary["functions"]}
    assert set(per_function) == {first, second}
    only_second = client.get("/v1/usage", params={"function": second}).json()
    assert only_second["totals"]["idleSeconds"] == per_function[second]["idleSeconds"]
    later = client.get("/v1/usage", params={"from": time.time() + 60, "to": time.time() + 120}).json()
    assert later["totals"]["idleSeconds"] == 0 and later["functions"] == []
    series = client.get("/v1/usage/series", params={"step": 10}).json()
    assert sum(p["idleSeconds"] for p in series["points"]) == pytest.approx(summary["totals"]["idleSeconds"], abs=0.005)

    exported = client.get("/v1/usage/sessions", params={"format": "csv"})
    assert exported.headers["content-type"].startswith("text/csv")
    lines = exported.text.strip().splitlines()
    assert lines[0].startswith("sessionId,functionName,sessionStatus,state,startTime,endTime")
    assert sorted(line.split(",")[0] for line in lines[1:]) == ["a", "b"]


def test_quotas_refuse_creates_over_the_tenants_vcpus_or_memory_with_429(metered):
    made = metered.admin.post("/v1/tenants", json={"name": "quota", "maxVcpu": 1.5, "maxMemoryMB": 600})
    assert made.status_code == 201, made.text
    assert (made.json()["maxVcpu"], made.json()["maxMemoryMB"]) == (1.5, 600)
    assert made.json()["maxImageDiskMB"] == 20 * 1024  # hibernation images: bounded by default
    client = httpx.Client(base_url=metered.url, headers={"X-API-Key": made.json()["apiKey"]}, timeout=60)
    function = _function(client)  # 1 vCPU, 256 MB
    assert client.post(f"/v1/functions/{function}/sessions", json={}).status_code == 201

    refused = client.post(f"/v1/functions/{function}/sessions", json={})
    assert refused.status_code == 429
    assert refused.json()["code"] == "resource_exhausted"
    assert "maxVcpu 1.5" in refused.json()["message"] and "maxMemoryMB" not in refused.json()["message"]
    through_gateway = client.get(f"/functions/{function}/invoke/health", headers={HEADER: "new"})
    assert through_gateway.status_code == 429 and "maxVcpu" in through_gateway.json()["message"]
    e2b = client.post("/sandboxes", json={"templateID": function})
    assert e2b.status_code == 429 and e2b.json()["code"] == 429

    tenant_id = client.get("/v1/tenants/me").json()["tenantId"]
    lifted = metered.admin.patch(f"/v1/tenants/{tenant_id}", json={"maxVcpu": None})
    assert lifted.status_code == 200 and lifted.json()["maxVcpu"] is None and lifted.json()["maxMemoryMB"] == 600
    assert client.post(f"/v1/functions/{function}/sessions", json={}).status_code == 201  # 512 MB of 600
    refused = client.post(f"/v1/functions/{function}/sessions", json={})
    assert refused.status_code == 429 and "maxMemoryMB 600" in refused.json()["message"]
    assert client.patch(f"/v1/tenants/{tenant_id}", json={"maxVcpu": 8}).status_code == 403  # admins only
    lifted = metered.admin.patch(f"/v1/tenants/{tenant_id}", json={"maxImageDiskMB": None})
    assert lifted.status_code == 200 and lifted.json()["maxImageDiskMB"] is None
    assert metered.admin.patch(f"/v1/tenants/{tenant_id}", json={"maxImageDiskMB": -1}).status_code == 400
    for body in ({}, {"maxSessions": None}):
        assert metered.admin.patch(f"/v1/tenants/{tenant_id}", json=body).status_code == 400


def test_metrics_parse_with_the_prometheus_text_parser(metered):
    client = metered.new_tenant("metrics")
    function = _function(client)
    _run(client, function, "m", "echo hi")
    assert client.delete(f"/v1/functions/{function}/sessions/m").status_code == 204
    _run(client, function, "napping", "echo hi")
    assert client.post(f"/v1/functions/{function}/sessions/napping/pause").status_code == 200
    assert httpx.get(f"{metered.url}/metrics").status_code == 401
    assert client.get("/metrics").status_code == 403  # a tenant's key is not enough
    response = httpx.get(f"{metered.url}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")

    samples: dict[tuple[str, tuple], float] = {}
    families = {}
    for family in text_string_to_metric_families(response.text):
        families[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert families["hutch_sessions"] == "gauge" and families["hutch_instances"] == "gauge"
    assert families["hutch_sessions_asleep"] == "gauge"
    assert samples[("hutch_sessions_asleep", (("how", "frozen"), ("why", "paused")))] == 1
    assert samples[("hutch_sessions_asleep", (("how", "stopped"), ("why", "idle")))] == 0
    assert families["hutch_session_create_seconds"] == "histogram"
    assert families["hutch_gateway_request_seconds"] == "histogram"
    for name in ("hutch_warm_pool_hits", "hutch_warm_pool_misses", "hutch_instance_crashes", "hutch_sessions_ended"):
        assert families[name] == "counter", name
    for state in ("active", "idle", "down"):
        assert ("hutch_sessions", (("state", state),)) in samples
    for state in ("warm", "bound", "starting"):
        assert ("hutch_instances", (("state", state),)) in samples
    assert samples[("hutch_gateway_request_seconds_count", (("affinity", "HEADER_FIELD"),))] >= 1
    assert samples[("hutch_session_create_seconds_count", ())] >= 1
    assert samples[("hutch_sessions_ended_total", (("reason", "deleted"),))] >= 1
    assert samples[("hutch_sessions_ended_total", (("reason", "idle"),))] >= 0
    assert samples[("hutch_session_idle_seconds_total", ())] > 0
    assert samples[("hutch_session_cpu_seconds_total", ())] > 0
    assert samples[("hutch_warm_pool_misses_total", ())] >= 1


def test_a_kill_9_restart_of_hutch_serve_loses_no_usage_and_counts_nothing_twice(fresh_server):
    server = fresh_server(CONFIG.format(uid_base=1_800_000_000))
    client = server.new_tenant("restart")
    function = _function(client)
    assert client.post(f"/v1/functions/{function}/sessions", json={"sessionId": "r"}).status_code == 201
    _, took = _run(client, function, "r", "sleep 0.8")
    time.sleep(1.0)  # at least one sample wrote the request's window
    before = client.get(f"/v1/functions/{function}/sessions/r/usage").json()

    server.stop(signal.SIGKILL)
    time.sleep(1.0)  # no hutch: the instance runs on, idle
    server.start()

    resumed = client.get(f"/v1/functions/{function}/sessions/r/usage").json()
    assert resumed["sessionStatus"] == "Active" and resumed["state"] == "idle"
    assert resumed["activeSeconds"] == pytest.approx(before["activeSeconds"], abs=0.01)
    assert resumed["cpuSeconds"] >= before["cpuSeconds"]
    assert resumed["idleSeconds"] >= before["idleSeconds"] + 1.0  # the gap, billed idle
    assert client.delete(f"/v1/functions/{function}/sessions/r").status_code == 204
    record = client.get(f"/v1/functions/{function}/sessions/r/usage").json()
    # What the rule makes true: each window's active time is max(its request time, its CPU
    # seconds), so their sum lies between the request time as the server saw it (inside the
    # client's stopwatch, `took`, less the client's own connect and send time) and that request
    # time plus every CPU second the session used. A request that waits (`sleep`) keeps the CPU
    # term small, so a request counted twice would break the upper bound.
    assert took - 0.25 <= record["activeSeconds"] <= took + record["cpuSeconds"]
    total = record["activeSeconds"] + record["idleSeconds"] + record["downSeconds"]
    assert total == pytest.approx(_lifetime(record), abs=0.01)  # every second once, none twice


def test_hutch_usage_prints_tables_json_and_csv(metered, tmp_path):
    key = metered.new_tenant("cli-usage").headers["X-API-Key"]
    client = httpx.Client(base_url=metered.url, headers={"X-API-Key": key}, timeout=60)
    function = _function(client)
    _run(client, function, "c1", "echo work")
    time.sleep(0.6)

    summary = ok(hutch(metered.url, key, "usage"))
    assert "FUNCTION" in summary and function in summary and "TOTAL" in summary and "COST USD" in summary
    assert json.loads(ok(hutch(metered.url, key, "usage", "--since", "1h", "--json")))["liveSessions"] == 1
    table = ok(hutch(metered.url, key, "usage", "sessions", "--status", "Active"))
    assert "c1" in table and "idle" in table
    record = json.loads(ok(hutch(metered.url, key, "usage", "session", "c1", "--json")))
    assert record["sessionId"] == "c1" and record["functionName"] == function and record["idleSeconds"] > 0
    assert "cost" in ok(hutch(metered.url, key, "usage", "session", "c1"))
    out = tmp_path / "usage.csv"
    assert "1 sessions written" in ok(hutch(metered.url, key, "usage", "export", "-o", str(out)))
    assert out.read_text().splitlines()[1].startswith("c1,")
    refused = hutch(metered.url, key, "usage", "tenants")
    assert refused.returncode == 1 and refused.stderr.startswith("error: ") and len(refused.stderr.splitlines()) == 1
    assert "cli-usage" in ok(hutch(metered.url, ADMIN_KEY, "usage", "tenants"))
    bad = hutch(metered.url, key, "usage", "--since", "yesterday")
    assert bad.returncode == 1 and "--since" in bad.stderr
