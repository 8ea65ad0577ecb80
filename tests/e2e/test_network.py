"""Egress policies end to end: E2B's SDK and hutch's API against a namespace playing the internet.

Only addresses on this machine are used: 10.250.0.2 is a web server in a namespace the test made.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid

import pytest
from e2b import Sandbox

from tests.connect_wire import envelope, stdout_of

FETCH = """
import socket, sys
def fetch(ip, port, host=None):
    try:
        s = socket.create_connection((ip, port), timeout=3)
        s.sendall(f"GET / HTTP/1.0\\r\\nHost: {host or ip}\\r\\n\\r\\n".encode())
        s.settimeout(3)
        return "ok" if s.recv(200).startswith(b"HTTP/") else "closed"
    except OSError as exc:
        return type(exc).__name__
for target in sys.argv[1:]:
    ip, port, *host = target.split(":")
    print(fetch(ip, int(port), *host))
"""


def _fetch(box: Sandbox, *targets: str) -> list[str]:
    box.files.write("/tmp/fetch.py", FETCH)
    return box.commands.run(f"python3 /tmp/fetch.py {' '.join(targets)}", timeout=60).stdout.split()


@pytest.fixture(scope="module")
def world(internet, fresh_server):
    server = fresh_server(
        "uid_base = 1800000000\n"
        '[network]\nhosts = {"allowed.test" = "10.250.0.2"}\n'
        '[warm_pools]\nbase = 1\n"code-interpreter-v1" = 0\n'
    )
    return server, internet


@pytest.fixture(scope="module")
def fresh_server(request):
    """A module-scoped server of its own (the shared fixture is per test)."""
    import shutil
    import tempfile
    from pathlib import Path

    from tests.e2e.conftest import Server, _cleanup

    root = Path(tempfile.mkdtemp(prefix="hutch-e2e-", dir="/var/tmp"))
    root.chmod(0o755)
    made: list[Server] = []

    def make(config_text: str) -> Server:
        srv = Server(root / "data", config_text)
        srv.start()
        made.append(srv)
        return srv

    yield make
    for srv in made:
        _cleanup(srv)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def e2b_env(world, monkeypatch):
    server, _ = world
    tenant = server.new_tenant()
    monkeypatch.setenv("E2B_API_URL", server.url)
    monkeypatch.setenv("E2B_SANDBOX_URL", server.url)
    monkeypatch.setenv("E2B_API_KEY", tenant.headers["X-API-Key"])
    return tenant


def test_an_e2b_sandbox_reaches_the_internet_by_default_and_update_network_closes_it(world, e2b_env):
    _, internet = world
    box = Sandbox.create(timeout=120)
    try:
        assert box.get_info().allow_internet_access is True
        assert _fetch(box, f"{internet}:8080") == ["ok"]
        box.update_network({"deny_out": [f"{internet}/32"]})
        assert _fetch(box, f"{internet}:8080") != ["ok"]
        box.update_network({"allow_out": [f"{internet}/32"], "deny_out": ["0.0.0.0/0"]})
        assert _fetch(box, f"{internet}:8080") == ["ok"]
    finally:
        box.kill()


def test_without_internet_access_only_allowed_names_are_reached_and_resolved(world, e2b_env):
    _, internet = world
    box = Sandbox.create(timeout=120, allow_internet_access=False, network={"allow_out": ["allowed.test"]})
    try:
        assert box.get_info().allow_internet_access is False
        assert _fetch(box, f"{internet}:8080:allowed.test", f"{internet}:8080:other.test", f"{internet}:8080") == [
            "ok",
            "closed",
            "closed",
        ]
        resolved = box.commands.run(
            "python3 -c \"import socket; print(socket.gethostbyname('allowed.test'))\"", timeout=30
        ).stdout
        assert resolved.strip() == internet
    finally:
        box.kill()


def test_the_host_hutch_itself_and_other_sandboxes_stay_out_of_reach(world, e2b_env):
    server, internet = world
    first = Sandbox.create(timeout=120)
    second = Sandbox.create(timeout=120)
    try:
        second.commands.run("python3 -m http.server 9000 --bind 0.0.0.0 >/dev/null 2>&1 &", timeout=30)
        second_ip = second.commands.run("hostname -I", timeout=30).stdout.split()[0]
        host_ip = (
            subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True)
            .stdout.split()[3]
            .split("/")[0]
        )
        outcomes = _fetch(
            first,
            f"127.0.0.1:{server.port}",  # its own loopback: nothing there
            f"{host_ip}:{server.port}",  # hutch's API and gateway on the host
            f"{second_ip}:9000",  # another session
            "169.254.169.254:80",  # cloud metadata
        )
        assert "ok" not in outcomes, outcomes
        assert _fetch(first, f"{internet}:8080") == ["ok"]  # while the internet is reachable
    finally:
        first.kill()
        second.kill()


def test_a_native_session_gets_its_functions_policy_and_can_change_it(world):
    server, internet = world
    client = server.new_tenant()
    name = f"net-{uuid.uuid4().hex[:6]}"
    made = client.post(
        "/v1/functions",
        json={"name": name, "resources": {"memoryMB": 256, "diskMB": 64}, "network": {"allowOut": [f"{internet}/32"]}},
    )
    assert made.status_code == 201, made.text
    session = client.post(f"/v1/functions/{name}/sessions", json={"sessionId": "n1"}).json()
    assert session["network"] is None  # the function's applies

    def fetch() -> str:
        message = {"process": {"cmd": "python3", "args": ["-c", FETCH, f"{internet}:8080"]}}
        answer = client.post(
            f"/functions/{name}/invoke/process.Process/Start",
            content=envelope(message),
            headers={"x-fc-session-id": "n1", "content-type": "application/connect+json"},
            timeout=60,
        )
        return stdout_of(answer.content).strip()

    assert fetch() == "ok"
    changed = client.patch(f"/v1/functions/{name}/sessions/n1", json={"network": {"allowOut": []}})
    assert changed.status_code == 200 and changed.json()["network"]["allowOut"] == []
    assert fetch() != "ok"
    bad = client.patch(f"/v1/functions/{name}/sessions/n1", json={"network": {"denyOut": ["example.com"]}})
    assert bad.status_code == 400


def test_networks_are_torn_down_with_their_sessions_and_after_a_crash_of_hutch(world, e2b_env):
    server, _ = world
    from hutch.runtime.network import layout_for

    layout = layout_for(server.data_dir)
    box = Sandbox.create(timeout=120)
    slots_with_box = set(layout.leftover_slots())
    box.kill()
    deadline = time.monotonic() + 10
    while set(layout.leftover_slots()) == slots_with_box:
        assert time.monotonic() < deadline, "the sandbox's namespace outlived it"
        time.sleep(0.1)

    survivor = Sandbox.create(timeout=300)
    victim = Sandbox.create(timeout=300)
    victim_pid = _instance_record(server.data_dir, victim.sandbox_id)["pid"]
    victim_instance = _instance_record(server.data_dir, victim.sandbox_id)["instance_id"]
    victim_slot = _instance_record(server.data_dir, victim.sandbox_id)["detail"]["slot"]
    server.stop(signal.SIGKILL)
    assert victim_slot in layout.leftover_slots()
    os.kill(victim_pid, signal.SIGKILL)  # the victim's instance dies while hutch is away
    time.sleep(0.3)
    server.start()
    # Every namespace left belongs to a live instance: the dead one's was swept (its slot may
    # already serve a new warm instance, with a namespace of its own).
    time.sleep(1)
    live = {
        json.loads(record.read_text())["detail"]["slot"]
        for record in (server.data_dir / "instances").glob("*/instance.json")
    }
    assert set(layout.leftover_slots()) <= live
    assert not (server.data_dir / "instances" / victim_instance).exists()
    # the survivor was re-attached and its egress works again through the new proxy
    assert _fetch(Sandbox.connect(survivor.sandbox_id), f"{world[1]}:8080") == ["ok"]
    survivor.kill()


def _instance_record(data_dir, sandbox_id: str) -> dict:
    """The runtime's record of a sandbox's instance (MetaDB names the instance)."""
    import sqlite3

    db = sqlite3.connect(data_dir / "metadb.sqlite3")
    (instance_id,) = db.execute(
        "SELECT instance_id FROM sessions WHERE session_id = ? AND status = 'Active'", (sandbox_id,)
    ).fetchone()
    db.close()
    return json.loads((data_dir / "instances" / instance_id / "instance.json").read_text())
