"""kill -9 of `hutch serve` under load, then a restart.

Clients read and write files and run commands in a dozen sessions, others start new sessions and
end old ones, while the server is killed with SIGKILL (and, while it is down, one instance dies
too). After the restart: every session that was acknowledged as created and not as ended is
Active exactly once and answers as itself, re-attached to its instance (or recovered, epoch + 1,
for the one that died); what was acknowledged as ended stays ended; nothing on the host (process,
cgroup, workspace mount, network namespace) belongs to no instance; every session's usage adds
up to its lifetime once (active + idle + down); and once all is ended and the server stopped,
nothing at all is left.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import _cleanup
from tests.e2e.teardown import stop_leftover_instances
from tests.faults.conftest import (
    CONNECT,
    HEADER,
    assert_nothing_left,
    assert_nothing_orphaned,
    config,
    connect_request,
    instance_record,
    sandbox_processes,
    stdout_of,
    wait_for,
    wait_gone,
)

UID_BASE = 1_950_000_000


def _seconds(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _all_sessions(client: httpx.Client, **params: object) -> list[dict]:
    out, token = [], None
    while True:
        page = client.get("/v1/sessions", params={**params, "limit": 1000, **({"nextToken": token} if token else {})})
        assert page.status_code == 200, page.text
        out += page.json()["sessions"]
        token = page.json()["nextToken"]
        if not token:
            return out


def test_a_kill_9_of_hutch_serve_under_load_loses_duplicates_and_leaks_nothing(make_server, fault):
    fault.injected(
        "kill -9 of hutch serve under load",
        "SIGKILL to hutch serve while 4 clients read, write and run commands in 12 sessions, one creates "
        "sessions and one ends them; one instance killed while the server is down; then a restart",
    )
    server = make_server(config(UID_BASE, base_pool=2))
    client = server.new_tenant("restart", max_sessions=200)
    key = client.headers["X-API-Key"]
    upload = "/functions/base/invoke/files?path=identity"

    def identify(http: httpx.Client, name: str) -> httpx.Response:
        """Start the session `name` (or use it) and write its identity file, acknowledged."""
        headers = {HEADER: name, "content-type": "application/octet-stream"}
        return http.post(upload, content=name.encode(), headers=headers)

    stable = [f"s{n}" for n in range(12)]
    for name in stable:
        assert identify(client, name).status_code == 200
    before = {s["sessionId"]: s for s in _all_sessions(client, status="Active")}

    stop = threading.Event()
    served = {"reads": 0, "commands": 0, "errors": 0}
    created: list[str] = []  # acknowledged creates
    ended: list[str] = []  # acknowledged ends
    misroutes: list[str] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=server.url, headers={"X-API-Key": key}, timeout=10) as own:
            while not stop.is_set():
                name = rng.choice(stable[:10])  # s10 and s11 may be ended meanwhile
                try:
                    if rng.random() < 0.25:
                        response = own.post(
                            "/functions/base/invoke/process.Process/Start",
                            content=connect_request("cat identity"),
                            headers={HEADER: name, "content-type": CONNECT},
                        )
                        text, kind = stdout_of(response.content), "commands"
                    else:
                        response = own.get("/functions/base/invoke/files?path=identity", headers={HEADER: name})
                        text, kind = response.text, "reads"
                except httpx.HTTPError:
                    served["errors"] += 1
                    time.sleep(0.05)
                    continue
                if response.status_code == 200:
                    served[kind] += 1
                    if text != name:
                        misroutes.append(f"{name} got {text!r}")
                else:
                    served["errors"] += 1

    def creator() -> None:
        with httpx.Client(base_url=server.url, headers={"X-API-Key": key}, timeout=10) as own:
            n = 0
            while not stop.is_set():
                name = f"n{n}"
                n += 1
                try:
                    response = identify(own, name)
                except httpx.HTTPError:
                    time.sleep(0.05)
                    continue
                if response.status_code == 200:
                    created.append(name)

    def ender() -> None:
        with httpx.Client(base_url=server.url, headers={"X-API-Key": key}, timeout=10) as own:
            for name in ("s10", "s11"):
                time.sleep(0.5)
                try:
                    if own.delete(f"/v1/functions/base/sessions/{name}").status_code == 204:
                        ended.append(name)
                except httpx.HTTPError:
                    pass

    workers = [threading.Thread(target=reader, args=(n,)) for n in range(4)]
    workers += [threading.Thread(target=creator), threading.Thread(target=ender)]
    for worker in workers:
        worker.start()
    time.sleep(2.5)
    assert server.proc is not None
    server.proc.kill()  # SIGKILL: no shutdown at all
    server.proc.wait()
    killed_at_load = dict(served)
    stop.set()
    for worker in workers:
        worker.join(30)
    victim = instance_record(server, before["s9"]["containerId"])["pid"]
    os.kill(victim, signal.SIGKILL)  # an instance dies while hutch is away
    wait_gone(victim)
    server.proc = None
    restarted = time.monotonic()
    server.start()
    restart_took = time.monotonic() - restarted

    assert misroutes == []
    assert killed_at_load["reads"] + killed_at_load["commands"] > 50 and len(created) >= 3
    active = _all_sessions(client, status="Active")
    names = [s["sessionId"] for s in active]
    assert len(names) == len(set(names)), "a session is Active twice"
    expected = (set(stable) - set(ended)) | set(created)
    assert expected <= set(names), f"sessions lost: {expected - set(names)}"
    assert set(names) - expected <= {f"n{len(created) + i}" for i in range(3)}  # a create in flight at the kill
    ended_now = {s["sessionId"] for s in _all_sessions(client, status="Expired")}
    assert set(ended) <= ended_now and not set(ended) & set(names)

    for item in active:
        name = item["sessionId"]
        response = client.get("/functions/base/invoke/files?path=identity", headers={HEADER: name})
        if name in expected:
            assert response.status_code == 200 and response.text == name, name
        else:  # in flight at the kill: the session exists, its identity upload may not have landed
            assert response.status_code in (200, 404), name
    after = {s["sessionId"]: s for s in _all_sessions(client, status="Active")}
    for name in stable[:9]:
        assert (after[name]["containerId"], after[name]["epoch"]) == (before[name]["containerId"], 0)  # re-attached
    assert after["s9"]["epoch"] == 1 and after["s9"]["containerId"] != before["s9"]["containerId"]  # recovered
    state = assert_nothing_orphaned(server, UID_BASE)

    time.sleep(1.2)  # a metering round of the restarted server
    for name in after:
        assert client.delete(f"/v1/functions/base/sessions/{name}").status_code == 204
    records = client.get("/v1/usage/sessions", params={"status": "Expired", "limit": 1000}).json()["sessions"]
    by_name: dict[str, list[dict]] = {}
    for record in records:
        by_name.setdefault(record["sessionId"], []).append(record)
    assert set(by_name) >= set(after) and all(len(v) == 1 for v in by_name.values()), "a usage record twice"
    for record in records:
        total = record["activeSeconds"] + record["idleSeconds"] + record["downSeconds"]
        lifetime = _seconds(record["endTime"]) - _seconds(record["startTime"])
        assert total == pytest.approx(lifetime, abs=0.05), record["sessionId"]
    totals = client.get("/v1/usage").json()["totals"]
    for field in ("activeSeconds", "idleSeconds", "downSeconds"):
        assert totals[field] == pytest.approx(sum(r[field] for r in records), abs=0.05), field

    _cleanup(server)  # SIGTERM, then whatever instances are left (the warm pool) are stopped
    assert_nothing_left(server, UID_BASE)
    fault.observed(
        load_before_kill=f"{killed_at_load['reads']} reads, {killed_at_load['commands']} commands, "
        f"{len(created)} creates, {len(ended)} ends acknowledged",
        restart=f"{restart_took:.2f} s to healthy",
        sessions_after=f"{len(after)} Active, none lost, none twice, {len(after) - 1} re-attached, 1 recovered",
        misroutes=0,
        host=f"{len(state['instances'])} instances, every process/cgroup/mount/netns accounted for; "
        "nothing left after the end",
        metering="active + idle + down = lifetime for every session; tenant totals = sum of sessions",
    )


CRASH_MID_START = """
import asyncio, os, signal, sys
from pathlib import Path
from hutch.runtime.base import InstanceSpec, Resources
from hutch.runtime.bwrap import BwrapRuntime
from hutch.runtime.userns import UidSlots
from hutch.storage.local import DirectoryStore

data = Path(sys.argv[1])
runtime = BwrapRuntime(data, DirectoryStore(data / "workspaces"), UidSlots(first_uid=int(sys.argv[2])))
record = runtime._record

def die(*args, **kwargs):  # hutch is killed the moment before it records the instance
    os.kill(os.getpid(), signal.SIGKILL)

runtime._record = die
asyncio.run(runtime.start(InstanceSpec(instance_id="i-midstart", resources=Resources(memory_mb=128))))
"""


def test_a_hutch_killed_in_the_middle_of_an_instance_start_leaves_no_sandbox_running(fault):
    fault.injected(
        "kill -9 of hutch in the middle of an instance start",
        "SIGKILL to the process running the runtime between starting bwrap and recording the instance",
    )
    uid_base = UID_BASE + 50_000_000
    root = Path(tempfile.mkdtemp(prefix="hutch-faults-midstart-", dir="/var/tmp"))
    root.chmod(0o755)
    data = root / "data"
    try:
        died = subprocess.run([sys.executable, "-c", CRASH_MID_START, str(data), str(uid_base)], timeout=60)
        assert died.returncode == -signal.SIGKILL
        # The sandbox was started, then released by the closing of hutch's end of its block pipe:
        # its agent reads end-of-file on `go_fd` and exits, taking the sandbox with it.
        wait_for(lambda: not sandbox_processes(uid_base), 10, "the unrecorded sandbox to exit")
        stop_leftover_instances(data)  # what a restart does: sweep directories, cgroups, mounts
        assert not sandbox_processes(uid_base)
        assert not list((data / "instances").iterdir())
    finally:
        stop_leftover_instances(data)
        shutil.rmtree(root, ignore_errors=True)
    fault.observed(after="the unrecorded sandbox exited by itself; the restart swept its cgroups and directory")
