"""Concurrent sessions of every affinity, every answer from its own session's instance.

A modest size for CI (32 sessions: header, cookie, E2B and user-server ones, 12 requests each,
16 concurrent clients); `bench/load.py` runs the same driver (`tests/faults/load.py`) with 200
sessions and reports latencies.
"""

from __future__ import annotations

import asyncio

from tests.e2e.conftest import ADMIN_KEY
from tests.faults.conftest import config
from tests.faults.load import run_load

UID_BASE = 1_960_000_000


def test_concurrent_sessions_of_every_kind_get_only_their_own_answers(make_server, fault):
    fault.injected("load (CI size)", "32 sessions (header, cookie, E2B, user server) x 12 requests, 16 clients")
    server = make_server(config(UID_BASE))
    result = asyncio.run(run_load(server.url, ADMIN_KEY, sessions=32, requests_per_session=12, concurrency=16))
    summary = result.summary()

    assert result.sessions == 32 and result.requests == 32 * 12
    assert result.misroutes == []
    assert result.errors == []
    assert result.lost_sessions == [] and result.rebound_sessions == []
    assert set(result.latencies) >= {"header read", "cookie read", "e2b read", "server GET", "header command"}
    fault.observed(
        requests=result.requests,
        misroutes=0,
        errors=0,
        latency_ms=summary["latency_ms"]["all"],
        sessions="all Active on the instance they started on",
    )
