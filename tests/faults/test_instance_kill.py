"""kill -9 of an instance's processes during a command, during uploads, while idle.

After each kill the session keeps its id and its workspace (every file whose upload was
acknowledged is there, byte for byte), `epoch` goes up by one, the next request is served by a
new instance, and the interrupted call ends with an error the client can read, within seconds
(or, when it had not reached the dead instance yet, is served whole by the new one).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.connect_wire import parse_envelopes as envelopes
from tests.e2e.conftest import Server, _cleanup
from tests.faults.conftest import (
    CONNECT,
    HEADER,
    agent_pid,
    config,
    connect_request,
    instance_record,
    resume,
    run,
    session,
    sha,
    wait_gone,
)

UID_BASE = 1_910_000_000


@pytest.fixture(scope="module")
def server():
    root = Path(tempfile.mkdtemp(prefix="hutch-faults-kill-", dir="/var/tmp"))
    root.chmod(0o755)
    srv = Server(root / "data", config(UID_BASE, base_pool=1))
    srv.start()
    yield srv
    _cleanup(srv)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def client(server) -> httpx.Client:
    return server.new_tenant("kill")


def test_a_command_whose_instance_is_killed_ends_with_an_unavailable_error_and_the_session_carries_on(
    server, client, fault
):
    fault.injected("kill -9 during a command", "SIGKILL to the agent while a command streams its output")
    assert run(client, "cmd", "echo kept > mark; cat mark") == "kept\n"
    before = session(client, "cmd")
    agent = agent_pid(server, before["containerId"])

    started = time.monotonic()
    with client.stream(
        "POST",
        "/functions/base/invoke/process.Process/Start",
        content=connect_request("for i in $(seq 1 100); do echo $i; sleep 0.05; done"),
        headers={HEADER: "cmd", "content-type": CONNECT},
        timeout=30,
    ) as response:
        assert response.status_code == 200
        body = b""
        for chunk in response.iter_bytes():
            body += chunk
            if b"stdout" in body and agent is not None:
                os.kill(agent, signal.SIGKILL)
                killed_at, agent = time.monotonic(), None
    took = time.monotonic() - killed_at
    messages = envelopes(body)
    flags, end = messages[-1]
    assert flags == 2 and end["error"]["code"] == "unavailable"  # a Connect error, not a broken connection
    assert "ended before the stream completed" in end["error"]["message"]
    assert took < 10 and time.monotonic() - started < 30

    assert run(client, "cmd", "cat mark") == "kept\n"
    after = session(client, "cmd")
    assert after["sessionId"] == "cmd" and after["epoch"] == before["epoch"] + 1
    assert after["containerId"] != before["containerId"]
    fault.observed(
        client_saw=f"Connect end-of-stream error `unavailable` after {took * 1000:.0f} ms",
        epoch=f"{before['epoch']} -> {after['epoch']}",
        workspace="kept (the file written before the kill reads back)",
    )


def test_every_acknowledged_upload_survives_a_kill_of_the_instance_mid_upload(server, client, fault):
    fault.injected("kill -9 during a file upload", "SIGKILL to the agent halfway through the 6th of 16 uploads")
    headers = {HEADER: "up", "content-type": "application/octet-stream"}
    assert client.get("/functions/base/invoke/health", headers={HEADER: "up"}).status_code == 204
    before = session(client, "up")
    agent = agent_pid(server, before["containerId"])
    acknowledged: dict[str, str] = {}
    refused: dict[str, tuple[int, dict]] = {}

    for n in range(16):
        data = os.urandom(8 * 65536)

        def body(n: int = n, data: bytes = data):
            for part in range(8):
                if n == 5 and part == 4:
                    os.kill(agent, signal.SIGKILL)
                    time.sleep(0.2)  # the agent is gone while the client still sends
                yield data[part * 65536 : (part + 1) * 65536]

        response = client.post(f"/functions/base/invoke/files?path=f{n}", content=body(), headers=headers)
        if response.status_code == 200:
            assert response.json()[0]["path"] == f"/home/user/f{n}"
            acknowledged[f"f{n}"] = sha(data)
        else:
            refused[f"f{n}"] = (response.status_code, response.json())

    # f5 either reached the agent before it died (then it is refused, clearly), or the gateway
    # found the agent gone before sending it and sent it whole to the replacement (acknowledged).
    assert set(refused) <= {"f5"} and len(acknowledged) + len(refused) == 16, refused
    if refused:
        status, error = refused["f5"]
        assert status == 502 and error["code"] == "unavailable" and "without answering" in error["message"]
    for name, digest in acknowledged.items():
        read = client.get(f"/functions/base/invoke/files?path={name}", headers={HEADER: "up"})
        assert read.status_code == 200 and sha(read.content) == digest, name
    after = session(client, "up")
    assert after["epoch"] == before["epoch"] + 1 and after["containerId"] != before["containerId"]
    fault.observed(
        uploads_acknowledged=len(acknowledged),
        acknowledged_files_lost=0,
        interrupted_upload=(
            f"{status} {error['code']}: {error['message']}" if refused else "sent whole to the replacement: 200"
        ),
        epoch=f"{before['epoch']} -> {after['epoch']}",
    )


@pytest.mark.parametrize("victim", ["agent", "pid 1"])
def test_an_instance_killed_while_idle_is_replaced_by_the_very_next_request(server, client, fault, victim):
    fault.injected(
        f"kill -9 while idle ({victim})",
        f"SIGKILL to the instance's {victim}; as soon as it is dead, a request for its session",
    )
    key = f"idle-{victim.replace(' ', '')}"
    assert run(client, key, f"echo {key} > identity") == ""
    first = session(client, key)["epoch"]
    epochs = []
    for _ in range(3):
        current = session(client, key)
        record = instance_record(server, current["containerId"])
        target = agent_pid(server, current["containerId"]) if victim == "agent" else record["pid"]
        os.kill(target, signal.SIGKILL)
        wait_gone(target)  # hutch may not have seen it yet: the request must not be lost for that
        assert run(client, key, "cat identity") == f"{key}\n"  # a 200 from a new instance, never a 502
        epochs.append(session(client, key)["epoch"])
    assert epochs == [first + 1, first + 2, first + 3]
    fault.observed(next_request="200, answered by a new instance each time", epochs=epochs)


def test_an_instance_whose_agent_died_while_its_pid_1_lives_on_is_replaced(server, client, fault):
    fault.injected(
        "agent dead, sandbox alive",
        "SIGSTOP to the instance's pid 1 (so it cannot exit), then SIGKILL to its agent",
    )
    assert run(client, "half", "echo half > identity") == ""
    before = session(client, "half")
    pid1 = instance_record(server, before["containerId"])["pid"]
    agent = agent_pid(server, before["containerId"])
    os.kill(pid1, signal.SIGSTOP)
    try:
        os.kill(agent, signal.SIGKILL)
        time.sleep(0.3)  # hutch sees no exit: pid 1 is alive, stopped
        assert run(client, "half", "cat identity") == "half\n"
    finally:
        resume(pid1)
    after = session(client, "half")
    assert after["epoch"] == before["epoch"] + 1 and after["containerId"] != before["containerId"]
    assert not Path(f"/proc/{pid1}").exists()  # the old sandbox is gone, not left stopped
    fault.observed(next_request="200 from a new instance (the old one was killed whole)", epoch=after["epoch"])


def test_e2b_sdk_calls_interrupted_by_a_kill_raise_sdk_errors_and_the_sandbox_carries_on(
    server, client, fault, monkeypatch
):
    fault.injected(
        "kill -9 during E2B SDK calls",
        "SIGKILL to the agent during `commands.run` and during `run_code` (e2b-code-interpreter)",
    )
    from e2b import SandboxException
    from e2b_code_interpreter import Sandbox

    monkeypatch.setenv("E2B_API_URL", server.url)
    monkeypatch.setenv("E2B_SANDBOX_URL", server.url)
    monkeypatch.setenv("E2B_API_KEY", client.headers["X-API-Key"])
    sandbox = Sandbox.create(timeout=300)
    try:
        sandbox.files.write("notes.txt", "survives")
        sandbox.run_code("x = 41")
        sessions = client.get("/v1/sessions", params={"status": "Active"}).json()["sessions"]
        container = next(s["containerId"] for s in sessions if s["sessionId"] == sandbox.sandbox_id)

        def kill_soon(delay: float) -> threading.Thread:
            agent = agent_pid(server, container)
            killer = threading.Timer(delay, os.kill, (agent, signal.SIGKILL))
            killer.start()
            return killer

        killer = kill_soon(1.0)
        with pytest.raises(SandboxException) as caught:
            sandbox.commands.run("sleep 20")
        killer.join()
        command_error = f"{type(caught.value).__name__}: {str(caught.value)[:200]}"

        sessions = client.get("/v1/sessions", params={"status": "Active"}).json()["sessions"]
        container = next(s["containerId"] for s in sessions if s["sessionId"] == sandbox.sandbox_id)
        sandbox.run_code("y = 1")
        killer = kill_soon(1.5)
        started = time.monotonic()
        execution = sandbox.run_code("import time; time.sleep(20)")
        took = time.monotonic() - started
        killer.join()
        assert execution.error is not None and execution.error.name == "InstanceStopped"
        assert took < 15

        assert sandbox.files.read("notes.txt") == "survives"  # the workspace is kept
        assert sandbox.commands.run("echo back").stdout == "back\n"
        lost = sandbox.run_code("x")
        assert lost.error is not None and lost.error.name == "NameError"  # memory is not
        epoch = next(
            s["epoch"]
            for s in client.get("/v1/sessions", params={"status": "Active"}).json()["sessions"]
            if s["sessionId"] == sandbox.sandbox_id
        )
        assert epoch == 2
    finally:
        sandbox.kill()
    fault.observed(
        commands_run=command_error,
        run_code=f"Execution.error {execution.error.name}: {execution.error.value[:80]}",
        after="files kept, commands and code run again, variables lost (epoch 2)",
    )
