"""MetaDB slow, then locked, by another process, under a real `hutch serve`.

Another process takes SQLite's exclusive lock on the server's MetaDB: first in short bursts (a
slow database), then for 7 s (longer than the 5 s a call waits). Sessions that exist keep being
served (their path never touches MetaDB, and nothing waits for the lock on the event loop);
creates wait, then fail with a 503 naming the lock; when the lock goes, everything works again
and nothing half-done is left (no session Active in MetaDB that the server does not serve).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.faults.conftest import HEADER, config, run

UID_BASE = 1_930_000_000
HOLD = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
mode, seconds = sys.argv[2], float(sys.argv[3])
end = time.monotonic() + seconds
print("holding", flush=True)
while time.monotonic() < end:
    db.execute("BEGIN EXCLUSIVE")
    time.sleep(0.3 if mode == "slow" else seconds)
    db.execute("COMMIT")
    time.sleep(0.05)
"""


def _hold(path, mode: str, seconds: float) -> subprocess.Popen:
    argv = [sys.executable, "-c", HOLD, str(path), mode, str(seconds)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
    return proc


def test_a_slow_or_locked_metadb_fails_creates_with_503_keeps_sessions_served_and_recovers(make_server, fault):
    fault.injected(
        "MetaDB slow, then locked",
        "another process holds SQLite's exclusive lock 300 ms of every 350 ms for 3 s, then for 7 s",
    )
    server = make_server(config(UID_BASE))
    client = server.new_tenant("metadb")
    for key in ("hot-a", "hot-b"):
        assert run(client, key, f"echo {key} > identity") == ""
    latencies: list[float] = []
    failures: list[str] = []
    stop = threading.Event()

    def hot_traffic() -> None:
        with httpx.Client(base_url=server.url, headers=dict(client.headers), timeout=30) as own:
            while not stop.is_set():
                for key in ("hot-a", "hot-b"):
                    started = time.monotonic()
                    response = own.get("/functions/base/invoke/files?path=identity", headers={HEADER: key})
                    latencies.append(time.monotonic() - started)
                    if response.status_code != 200 or response.text != f"{key}\n":
                        failures.append(f"{key}: {response.status_code} {response.text[:100]}")
                time.sleep(0.02)

    traffic = threading.Thread(target=hot_traffic)
    traffic.start()
    database = server.data_dir / "metadb.sqlite3"
    try:
        slow = _hold(database, "slow", 3)
        started = time.monotonic()
        created_slow = client.post("/v1/functions/base/sessions", json={"sessionId": "during-slow"})
        slow_create = time.monotonic() - started
        assert created_slow.status_code == 201, created_slow.text
        slow.wait(30)
        slow_latencies = list(latencies)

        locked = _hold(database, "locked", 7)
        started = time.monotonic()
        with ThreadPoolExecutor(3) as pool:  # three kinds of create at once, all during the lock
            calls = {
                "api": pool.submit(client.post, "/v1/functions/base/sessions", json={"sessionId": "during-lock"}),
                "gateway": pool.submit(client.get, "/functions/base/invoke/health", headers={HEADER: "implicit"}),
                "e2b": pool.submit(client.post, "/sandboxes", json={"templateID": "base"}),
            }
            listed = client.get("/v1/sessions", params={"status": "Active"})  # reads still work
            refused = {name: call.result() for name, call in calls.items()}
        waited = time.monotonic() - started
        lock_latencies = latencies[len(slow_latencies) :]
        locked.wait(30)
    finally:
        stop.set()
        traffic.join(30)

    assert failures == []
    assert max(lock_latencies) < 2.5  # never stuck behind the lock (it was 5 s per write before)
    for name, response in refused.items():
        assert response.status_code == 503, (name, response.text)
        code = response.json()["code"]
        assert code == (503 if name == "e2b" else "unavailable")
        assert "MetaDB is locked by another process" in response.json()["message"]
    assert 4.5 <= waited < 10  # it waited for the lock, boundedly
    assert listed.status_code == 200

    # The lock is gone: creates work again, with the very keys refused during it.
    assert client.post("/v1/functions/base/sessions", json={"sessionId": "during-lock"}).status_code == 201
    assert client.get("/functions/base/invoke/health", headers={HEADER: "implicit"}).status_code == 204
    active = client.get("/v1/sessions", params={"status": "Active"}).json()["sessions"]
    assert sorted(s["sessionId"] for s in active) == ["during-lock", "during-slow", "hot-a", "hot-b", "implicit"]
    for item in active:  # every session MetaDB calls Active is served
        assert run(client, item["sessionId"], "echo ok") == "ok\n"
    time.sleep(1.5)  # an activity flush and a metering round after the lock
    for item in active:
        assert client.delete(f"/v1/functions/base/sessions/{item['sessionId']}").status_code == 204
    for record in client.get("/v1/usage/sessions", params={"status": "Expired"}).json()["sessions"]:
        total = record["activeSeconds"] + record["idleSeconds"] + record["downSeconds"]
        lifetime = _seconds(record["endTime"]) - _seconds(record["startTime"])
        assert total == pytest.approx(lifetime, abs=0.02), record["sessionId"]
    fault.observed(
        slow_create=f"201 after {slow_create:.2f} s",
        locked_create=f"503 unavailable after {waited:.2f} s: {refused['api'].json()['message']}",
        hot_requests=f"{len(latencies)} served, 0 failed; slowest {max(latencies) * 1000:.0f} ms "
        f"(slowest while locked {max(lock_latencies) * 1000:.0f} ms)",
        after="creates work again with the refused keys; usage accounts every second once",
    )


def _seconds(value: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
