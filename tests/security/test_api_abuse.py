"""API abuse of hutch's own HTTP surface: another tenant's ids, guessed ids, forged cookies, E2B
headers and MCP ids, oversized bodies and heads, malformed JSON and Connect envelopes, slow-loris
clients, hoarded warm pools, endless output through hutch's own MCP tools. Each check of an
attack is an exact status and error code (`hutch.selftest.api_abuse`); the regressions below pin
the defects the battery found."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from hutch.selftest import api_abuse

CASES = [pytest.param(run, id=name) for name, run in api_abuse.ATTACKS]


@pytest.mark.parametrize("attack", CASES)
def test_each_api_abuse_meets_its_exact_refusal_and_harms_nobody(stage, attack):
    outcome = attack(stage)
    assert outcome.contained, outcome.failure()
    assert outcome.bystanders_ok, outcome.failure()


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"step": str(10**30)}, "step"),
        ({"from": "1e308"}, "invalid time '1e308'"),
        ({"from": "nan"}, "invalid time 'nan'"),
        ({"to": "inf"}, "invalid time 'inf'"),
        ({"from": "0001-01-01T00:00:00"}, "between 1970 and 9999"),
    ],
)
def test_usage_ranges_beyond_any_calendar_are_refused_with_a_400(stage, query, message):
    # Found by the fuzzer: ?step=10**30 reached SQLite (OverflowError, a 500).
    answer = stage.attacker.http.get("/v1/usage/series", params=query)
    assert answer.status_code == 400, answer.text
    assert answer.json()["code"] == "invalid_argument"
    assert message in answer.json()["message"]
    assert stage.attacker.http.get("/v1/usage", params={k: v for k, v in query.items() if k != "step"}).status_code in (
        200,
        400,
    )


def test_a_tenant_cannot_hold_warm_instances_beyond_its_quotas(stage):
    made = stage.target.admin.post("/v1/tenants", json={"name": "hoarder", "maxSessions": 3, "maxMemoryMB": 256})
    client = httpx.Client(base_url=stage.target.url, headers={"X-API-Key": made.json()["apiKey"]}, timeout=60)
    spec = {"name": "pool", "resources": {"memoryMB": 64, "diskMB": 16}}
    try:
        over = client.post("/v1/functions", json={**spec, "warmPoolSize": 4})
        assert over.status_code == 429, over.text
        assert "maxSessions 3 (they would hold 4 instances)" in over.json()["message"]
        too_big = client.post("/v1/functions", json={**spec, "resources": {"memoryMB": 512}, "warmPoolSize": 1})
        assert too_big.status_code == 429 and "maxMemoryMB 256 (they would hold 512 MB)" in too_big.json()["message"]
        assert client.post("/v1/functions", json={**spec, "warmPoolSize": 0}).status_code == 201
        second = client.post("/v1/functions", json={**spec, "name": "pool-2", "warmPoolSize": 4})
        assert second.status_code == 429
        assert client.put("/v1/functions/pool", json={**spec, "warmPoolSize": 0}).status_code == 200
    finally:
        for name in ("pool", "pool-2"):
            client.delete(f"/v1/functions/{name}")
        client.close()


def _read_response(sock: socket.socket) -> bytes:
    """One whole HTTP response with a Content-Length (its head and body may come in several
    segments: the next read must start at the next response)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed mid-head: {data[:100]!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed mid-body"
        body += chunk
    return head + b"\r\n\r\n" + body


def test_a_kept_alive_connection_whose_next_head_never_ends_is_cut(stage):
    with socket.create_connection(("127.0.0.1", stage.target.port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = _read_response(sock)
        assert first.startswith(b"HTTP/1.1 200"), first[:100]
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: a")
        started = time.monotonic()
        sock.settimeout(stage.request_timeout + 10)
        second = sock.recv(65536)
        waited = time.monotonic() - started
    assert second.startswith(b"HTTP/1.1 408 Request Timeout"), second[:100]
    print(f"cut after {waited:.1f} s (request_timeout {stage.request_timeout} s)")
