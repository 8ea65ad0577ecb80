"""hutch's own control plane, through `hutch serve` on a real port."""

from __future__ import annotations

import contextlib
import time
import uuid

import httpx
import pytest

from tests.e2e.test_restart import _invoke


def _function(client, **overrides) -> str:
    name = f"fn-{uuid.uuid4().hex[:8]}"
    body = {"name": name, "resources": {"memoryMB": 256, "diskMB": 64}, **overrides}
    response = client.post("/v1/functions", json=body)
    assert response.status_code == 201, response.text
    return name


def _wait_for(predicate, timeout: float = 10.0, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not met in time")


def test_health_and_openapi_are_served(server):
    import httpx

    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert "/v1/functions/{name}/sessions" in spec["paths"]


def test_every_request_is_authenticated(server):
    import httpx

    for headers in ({}, {"X-API-Key": "hk_wrong"}, {"Authorization": "Bearer nope"}):
        response = httpx.get(f"{server.url}/v1/sessions", headers=headers)
        assert response.status_code == 401
        assert response.json()["code"] == "unauthenticated"


def test_builtin_functions_exist_out_of_the_box(server):
    client = server.new_tenant()
    names = {f["name"]: f for f in client.get("/v1/functions").json()["functions"]}
    assert names["base"]["builtin"] and names["code-interpreter-v1"]["prestartKernel"]


def test_a_session_is_created_read_listed_renewed_and_deleted(server):
    client = server.new_tenant()
    name = _function(client)
    created = client.post(f"/v1/functions/{name}/sessions", json={"sessionId": "my-key_1", "metadata": {"a": "b"}})
    assert created.status_code == 201, created.text
    session = created.json()
    assert session["sessionId"] == "my-key_1" and session["sessionStatus"] == "Active"
    assert session["containerId"] and session["epoch"] == 0 and session["metadata"] == {"a": "b"}

    got = client.get(f"/v1/functions/{name}/sessions/my-key_1").json()
    assert got["containerId"] == session["containerId"]
    listed = client.get(f"/v1/functions/{name}/sessions", params={"status": "Active"}).json()["sessions"]
    assert [s["sessionId"] for s in listed] == ["my-key_1"]

    renewed = client.patch(
        f"/v1/functions/{name}/sessions/my-key_1",
        json={"sessionTTLInSeconds": 600, "sessionIdleTimeoutInSeconds": 120},
    )
    assert renewed.status_code == 200
    assert renewed.json()["sessionTTLInSeconds"] == 600 and renewed.json()["sessionIdleTimeoutInSeconds"] == 120

    assert client.post(f"/v1/functions/{name}/sessions", json={"sessionId": "my-key_1"}).status_code == 409
    assert client.delete(f"/v1/functions/{name}/sessions/my-key_1").status_code == 204
    ended = client.get(f"/v1/functions/{name}/sessions/my-key_1").json()
    assert ended["sessionStatus"] == "Expired" and ended["endReason"] == "deleted"
    assert client.delete(f"/v1/functions/{name}/sessions/my-key_1").status_code == 404
    assert client.patch(f"/v1/functions/{name}/sessions/my-key_1", json={"sessionTTLInSeconds": 5}).status_code == 400


def test_a_session_s_metrics_are_served_in_e2b_s_fields(server):
    client = server.new_tenant("metrics")
    made = client.post("/v1/functions/base/sessions", json={"sessionTTLInSeconds": 60}).json()
    answer = client.get(f"/v1/functions/base/sessions/{made['sessionId']}/metrics")
    assert answer.status_code == 200
    sample = answer.json()["metrics"][0]
    assert set(sample) == {
        "timestamp", "timestampUnix", "cpuCount", "cpuUsedPct", "memUsed", "memTotal", "memCache", "diskUsed",
        "diskTotal",
    }  # fmt: skip
    assert sample["memTotal"] == 512 << 20 and sample["memUsed"] > 0
    empty = client.get(f"/v1/functions/base/sessions/{made['sessionId']}/metrics", params={"start": 1, "end": 2})
    assert empty.json() == {"metrics": []}
    bad = client.get(f"/v1/functions/base/sessions/{made['sessionId']}/metrics", params={"start": 5, "end": 1})
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_argument"
    client.delete(f"/v1/functions/base/sessions/{made['sessionId']}")


def test_a_crashed_and_replaced_instance_is_in_the_session_s_log(server):
    client = server.new_tenant("crash-log")
    assert _invoke(client, "crashy", "echo up").strip() == "up"
    container = client.get("/v1/functions/base/sessions/crashy").json()["containerId"]
    _invoke_quietly(client, "kill -9 2")  # the agent (pid 2): the instance goes down with it
    path = "/v1/functions/base/sessions/crashy/logs"

    def replaced():
        _invoke_quietly(client, "true")  # the next request brings it back
        got = client.get(path, params={"level": "warn"}).json()["logs"]
        return got if any(e["message"].startswith("instance replaced") for e in got) else None

    logs = _wait_until(replaced)
    crashed = [e for e in logs if e["message"] == "instance crashed"]
    assert crashed and crashed[0]["level"] == "error" and crashed[0]["fields"]["instance"] == container
    replacement = next(e for e in logs if e["message"].startswith("instance replaced"))
    assert replacement["fields"]["lost"] == container and replacement["fields"]["epoch"] == 1
    client.delete("/v1/functions/base/sessions/crashy")


def test_what_a_user_server_prints_is_in_the_session_s_log(server):
    client = server.new_tenant("server-log")
    web = {"name": "web", "startCommand": ["python3", "-m", "http.server", "8080"], "port": 8080}
    assert client.post("/v1/functions", json=web).status_code == 201
    assert client.post("/v1/functions/web/sessions", json={"sessionId": "printer"}).status_code == 201
    path = "/v1/functions/web/sessions/printer/logs"

    def printed():
        client.get("/functions/web/invoke/hello-log", headers={"x-fc-session-id": "printer"})
        got = client.get(path, params={"search": "GET /hello-log"}).json()["logs"]
        return got or None

    line = _wait_until(printed)[0]  # http.server logs each request on stderr
    assert line["fields"]["source"] == "user-server" and line["fields"]["stream"] == "stderr"
    assert '"GET /hello-log HTTP/1.1" 404' in line["message"] and line["level"] == "info"
    client.delete("/v1/functions/web/sessions/printer")


def _invoke_quietly(client, command: str) -> None:
    with contextlib.suppress(AssertionError, httpx.HTTPError):
        _invoke(client, "crashy", command)


def _wait_until(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def test_an_idempotency_key_makes_a_retried_create_return_the_same_session(server):
    client = server.new_tenant("idem")
    body = {"sessionTTLInSeconds": 60, "metadata": {"run": "1"}}
    key = {"Idempotency-Key": "job-7"}
    first = client.post("/v1/functions/base/sessions", json=body, headers=key)
    again = client.post("/v1/functions/base/sessions", json=body, headers=key)
    assert first.status_code == again.status_code == 201
    assert first.json()["sessionId"] == again.json()["sessionId"]
    assert len(client.get("/v1/sessions", params={"status": "Active"}).json()["sessions"]) == 1

    other_body = client.post("/v1/functions/base/sessions", json={**body, "metadata": {"run": "2"}}, headers=key)
    other_function = client.post("/v1/functions/code-interpreter-v1/sessions", json=body, headers=key)
    for refused in (other_body, other_function):
        assert refused.status_code == 409 and refused.json()["code"] == "already_exists"
    failed = client.post("/v1/functions/nosuch/sessions", json=body, headers={"Idempotency-Key": "job-8"})
    assert failed.status_code == 404
    client.post("/v1/functions", json={"name": "nosuch"}).raise_for_status()
    retried = client.post("/v1/functions/nosuch/sessions", json=body, headers={"Idempotency-Key": "job-8"})
    assert retried.status_code == 201  # a failed create gave its key back
    client.delete(f"/v1/functions/base/sessions/{first.json()['sessionId']}")
    client.delete(f"/v1/functions/nosuch/sessions/{retried.json()['sessionId']}")


@pytest.mark.parametrize("bad", ["-starts-with-dash", "has space", "x" * 65, "semi;colon", ""])
def test_invalid_session_ids_are_refused_with_400(server, bad):
    client = server.new_tenant()
    response = client.post("/v1/functions/base/sessions", json={"sessionId": bad})
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_argument"


def test_malformed_bodies_get_clear_errors_not_tracebacks(server):
    client = server.new_tenant()
    for body in (b"{not json", b"[]", b'{"sessionTTLInSeconds": -1}', b'{"unknown": 1}'):
        response = client.post(
            "/v1/functions/base/sessions", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400, response.text
        assert set(response.json()) == {"code", "message"}
    assert client.post("/v1/functions", json={"name": "Bad Name"}).status_code == 400
    assert client.get("/v1/functions/nope").status_code == 404


def test_sessions_end_at_their_ttl_and_after_idling(server):
    client = server.new_tenant()
    short_ttl = _function(client, sessionAffinityConfig={"sessionTTLInSeconds": 2, "sessionIdleTimeoutInSeconds": 0})
    short_idle = _function(client, sessionAffinityConfig={"sessionTTLInSeconds": 600, "sessionIdleTimeoutInSeconds": 1})
    ttl = client.post(f"/v1/functions/{short_ttl}/sessions", json={}).json()
    idle = client.post(f"/v1/functions/{short_idle}/sessions", json={}).json()

    def ended(name, session_id):
        body = client.get(f"/v1/functions/{name}/sessions/{session_id}").json()
        return body if body["sessionStatus"] == "Expired" else None

    assert _wait_for(lambda: ended(short_ttl, ttl["sessionId"]), timeout=8)["endReason"] == "ttl"
    assert _wait_for(lambda: ended(short_idle, idle["sessionId"]), timeout=8)["endReason"] == "idle"


def test_a_tenant_at_its_quota_gets_429(server):
    client = server.new_tenant(max_sessions=2)
    name = _function(client)
    first = [client.post(f"/v1/functions/{name}/sessions", json={}) for _ in range(2)]
    assert all(r.status_code == 201 for r in first)
    refused = client.post(f"/v1/functions/{name}/sessions", json={})
    assert refused.status_code == 429
    assert "quota" in refused.json()["message"]
    client.delete(f"/v1/functions/{name}/sessions/{first[0].json()['sessionId']}")
    assert client.post(f"/v1/functions/{name}/sessions", json={}).status_code == 201


def test_tenants_never_see_each_others_sessions(server):
    alice, mallory = server.new_tenant("alice"), server.new_tenant("mallory")
    name = _function(alice)
    session = alice.post(f"/v1/functions/{name}/sessions", json={"sessionId": "secret"}).json()
    assert mallory.get(f"/v1/functions/{name}/sessions/secret").status_code == 404
    assert mallory.delete(f"/v1/functions/{name}/sessions/secret").status_code == 404
    assert mallory.get("/v1/sessions").json()["sessions"] == []
    assert mallory.get(f"/v1/functions/{name}").status_code == 404
    # the same public id in another tenant is another session
    mine = mallory.post("/v1/functions/base/sessions", json={"sessionId": "secret"})
    assert mine.status_code == 201 and mine.json()["containerId"] != session["containerId"]
    assert alice.get(f"/v1/functions/{name}/sessions/secret").json()["sessionStatus"] == "Active"
    assert mallory.post("/v1/tenants", json={"name": "x"}).status_code == 403


def test_listing_is_paginated(server):
    client = server.new_tenant()
    name = _function(client)
    made = {client.post(f"/v1/functions/{name}/sessions", json={}).json()["sessionId"] for _ in range(3)}
    seen, token = [], None
    while True:
        page = client.get("/v1/sessions", params={"limit": 2, **({"nextToken": token} if token else {})}).json()
        seen += [s["sessionId"] for s in page["sessions"]]
        token = page["nextToken"]
        if not token:
            break
    assert set(seen) == made and len(seen) == 3
    assert client.get("/v1/sessions", params={"nextToken": "garbage"}).status_code == 400
