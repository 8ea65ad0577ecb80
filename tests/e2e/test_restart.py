"""A restart of `hutch serve` (kill -9 included) loses nothing, through the real gateway."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.connect_wire import envelope, stdout_of

HEADER = "x-fc-session-id"


def _invoke(client, session_id: str, command: str) -> str:
    """Run a command in the session's instance through the gateway (envd Start over Connect)."""
    message = {"process": {"cmd": "/bin/bash", "args": ["-l", "-c", command]}}
    response = client.post(
        "/functions/base/invoke/process.Process/Start",
        content=envelope(message),
        headers={HEADER: session_id, "content-type": "application/connect+json"},
    )
    assert response.status_code == 200, response.text
    return stdout_of(response.content)


def _sandbox_processes(uid_low: int, uid_high: int) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
        if uid_low <= uid < uid_high:
            found.append(int(pid))
    return found


def test_sessions_survive_a_kill_of_the_server_and_dead_instances_are_recovered(fresh_server):
    server = fresh_server('uid_base = 1500000000\n[warm_pools]\nbase = 1\n"code-interpreter-v1" = 0\n')
    client = server.new_tenant()
    for key in ("kept", "lost"):
        assert _invoke(client, key, f"echo {key} > mark; cat mark").strip() == key
    before = {s["sessionId"]: s for s in client.get("/v1/sessions", params={"status": "Active"}).json()["sessions"]}
    lost_container = before["lost"]["containerId"]
    record = server.data_dir / "instances" / lost_container / "instance.json"
    import json

    lost_pid = json.loads(record.read_text())["pid"]

    server.stop(signal.SIGKILL)  # no clean shutdown at all
    os.kill(lost_pid, signal.SIGKILL)  # and one instance dies while the server is away
    time.sleep(0.3)
    server.start()

    after = {s["sessionId"]: s for s in client.get("/v1/sessions", params={"status": "Active"}).json()["sessions"]}
    assert set(after) == {"kept", "lost"}  # nothing lost, nothing duplicated
    assert after["kept"]["containerId"] == before["kept"]["containerId"]  # re-attached
    assert _invoke(client, "kept", "cat mark").strip() == "kept"
    assert _invoke(client, "lost", "cat mark").strip() == "lost"  # the workspace survived
    recovered = client.get("/v1/functions/base/sessions/lost").json()
    assert recovered["epoch"] == 1 and recovered["containerId"] != lost_container


def test_ending_everything_leaves_no_process_or_cgroup_behind(fresh_server):
    server = fresh_server('uid_base = 1600000000\n[warm_pools]\nbase = 0\n"code-interpreter-v1" = 0\n')
    client = server.new_tenant()
    for key in ("a", "b"):
        _invoke(client, key, "sleep 300 >/dev/null 2>&1 & echo started")
    assert _sandbox_processes(1_600_000_000, 1_700_000_000)
    containers = [s["containerId"] for s in client.get("/v1/sessions").json()["sessions"]]
    assert len(containers) == 2 and all(list(Path("/sys/fs/cgroup/pids").glob(f"**/{c}")) for c in containers)
    for key in ("a", "b"):
        assert client.delete(f"/v1/functions/base/sessions/{key}").status_code == 204
    deadline = time.monotonic() + 10
    while _sandbox_processes(1_600_000_000, 1_700_000_000):
        assert time.monotonic() < deadline, "sandbox processes outlived their sessions"
        time.sleep(0.1)
    assert list((server.data_dir / "instances").iterdir()) == []
    leftovers = [p for cid in containers for p in Path("/sys/fs/cgroup").glob(f"*/**/{cid}")]
    assert leftovers == []


def test_a_create_retried_after_a_restart_gets_the_first_create_s_sandbox(fresh_server):
    server = fresh_server()
    client = server.new_tenant()
    body, key = {"templateID": "base", "timeout": 120}, {"Idempotency-Key": "before-the-crash"}
    first = client.post("/v2/sandboxes", json=body, headers=key)
    assert first.status_code == 201
    server.restart()  # kill -9: nothing of the first create is left in memory
    again = client.post("/v2/sandboxes", json=body, headers=key)
    assert again.status_code == 201 and again.json()["sandboxID"] == first.json()["sandboxID"]
    assert [s["sandboxID"] for s in client.get("/v2/sandboxes").json()] == [first.json()["sandboxID"]]
