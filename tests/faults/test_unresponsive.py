"""Parts that stop answering without dying: a frozen instance, a stopped `hutch serve`.

In one `hutch serve` process the scheduler answers "is this instance live" from memory, so "a
scheduler that stops answering" comes down to two real faults: an instance that is alive but
answers nothing (its cgroup frozen with the freezer: the agent, every process of it, stopped),
and the whole server stopped (SIGSTOP) while clients keep sending. A frozen instance costs its
requests a 504 after `[gateway] head_timeout` (2 s here), never a hang, and costs the other
sessions nothing; thawed, it answers again as the same instance with its memory. A stopped
server answers every request that waited once it runs again, and loses no session.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx

from tests.faults.conftest import HEADER, cgroup_dir, config, resume, run, session

UID_BASE = 1_920_000_000
HEAD_TIMEOUT = 2.0


def _freeze(directory: Path, state: str) -> None:
    (directory / "freezer.state").write_text(state)
    if state == "FROZEN":
        for _ in range(200):
            if (directory / "freezer.state").read_text().strip() == "FROZEN":
                return
            time.sleep(0.01)


def test_a_frozen_instance_is_a_504_within_the_head_timeout_and_answers_again_when_thawed(make_server, fault):
    fault.injected(
        "instance stops answering",
        f"freezer cgroup of one instance set FROZEN (head_timeout {HEAD_TIMEOUT:g} s), then THAWED",
    )
    server = make_server(config(UID_BASE, extra=f"[gateway]\nhead_timeout = {HEAD_TIMEOUT}"))
    client = server.new_tenant("frozen")
    for key in ("frozen", "other"):
        assert run(client, key, f"echo {key} > identity; sleep 1000 >/dev/null 2>&1 & echo $! > pid") == ""
    e2b = client.post("/sandboxes", json={"templateID": "base", "timeout": 300})
    assert e2b.status_code == 201
    sandbox = e2b.json()
    e2b_headers = {
        "E2b-Sandbox-Id": sandbox["sandboxID"],
        "E2b-Sandbox-Port": "49983",
        "X-Access-Token": sandbox["envdAccessToken"],
    }
    before = session(client, "frozen")
    e2b_container = session(client, sandbox["sandboxID"])["containerId"]
    freezers = [cgroup_dir(server, c, "freezer") for c in (before["containerId"], e2b_container)]
    for directory in freezers:
        _freeze(directory, "FROZEN")
    try:
        started = time.monotonic()
        frozen = client.get("/functions/base/invoke/files?path=identity", headers={HEADER: "frozen"}, timeout=30)
        waited = time.monotonic() - started
        assert frozen.status_code == 504
        assert frozen.json()["code"] == "deadline_exceeded" and "did not begin its answer" in frozen.json()["message"]
        assert HEAD_TIMEOUT <= waited < HEAD_TIMEOUT + 5
        e2b_frozen = client.get("/files", params={"path": "identity"}, headers=e2b_headers, timeout=30)
        assert e2b_frozen.status_code == 504 and e2b_frozen.json()["code"] == 504  # E2B's error shape

        started = time.monotonic()
        other = client.get("/functions/base/invoke/files?path=identity", headers={HEADER: "other"})
        other_took = time.monotonic() - started
        assert other.status_code == 200 and other.text == "other\n"
    finally:
        for directory in freezers:
            _freeze(directory, "THAWED")

    assert run(client, "frozen", "cat identity; kill -0 $(cat pid) && echo alive") == "frozen\nalive\n"
    after = session(client, "frozen")
    assert (after["containerId"], after["epoch"]) == (before["containerId"], before["epoch"])  # same instance
    assert client.get("/files", params={"path": "identity"}, headers=e2b_headers).status_code == 404  # answers
    fault.observed(
        frozen_request=f"{frozen.status_code} {frozen.json()['code']} after {waited:.2f} s",
        e2b_request=f"{e2b_frozen.status_code} {e2b_frozen.json()}",
        other_session=f"200 in {other_took * 1000:.1f} ms while the instance was frozen",
        after_thaw="same instance, same epoch, its background process still alive",
    )


def test_a_stopped_hutch_serve_answers_every_waiting_request_once_it_runs_again(make_server, fault):
    fault.injected("hutch serve stops answering", "SIGSTOP to hutch serve for 3 s under traffic, then SIGCONT")
    server = make_server(config(UID_BASE + 10_000_000))
    client = server.new_tenant("stopped")
    keys = [f"s{n}" for n in range(6)]
    for key in keys:
        assert run(client, key, f"echo {key} > identity") == ""
    results: list[tuple[str, int, str, float]] = []
    stop = threading.Event()

    def traffic(key: str) -> None:
        with httpx.Client(base_url=server.url, headers=dict(client.headers), timeout=30) as own:
            while not stop.is_set():
                started = time.monotonic()
                response = own.get("/functions/base/invoke/files?path=identity", headers={HEADER: key})
                results.append((key, response.status_code, response.text, time.monotonic() - started))

    workers = [threading.Thread(target=traffic, args=(key,)) for key in keys]
    for worker in workers:
        worker.start()
    time.sleep(0.5)
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(3)
    finally:
        resume(server.proc.pid)
    time.sleep(0.5)
    stop.set()
    for worker in workers:
        worker.join(60)

    assert results and all(status == 200 and text == f"{key}\n" for key, status, text, _ in results)
    longest = max(took for *_, took in results)
    assert longest >= 2.5  # requests did wait through the stop, and were answered after it
    active = client.get("/v1/sessions", params={"status": "Active"}).json()["sessions"]
    assert sorted(s["sessionId"] for s in active) == keys and all(s["epoch"] == 0 for s in active)
    fault.observed(
        requests=len(results),
        errors=0,
        longest_wait=f"{longest:.2f} s",
        sessions="all 6 still Active, epoch 0",
    )
