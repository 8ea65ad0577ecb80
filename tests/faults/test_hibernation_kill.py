"""kill -9 of `hutch serve` while a session hibernates to disk (CRIU dumping it) and while it is
restored: after the restart the session answers with its files, either restored with its memory
(same epoch, its background process still there) or recovered on its files (epoch + 1, a new
instance) — never half of each, never two copies of it, and nothing left on the host once it
ends. Skipped where no usable CRIU is installed (scripts/install-criu.sh)."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import httpx
import pytest

from tests.conftest import TEST_TEMPLATE
from tests.faults.conftest import (
    assert_nothing_left,
    assert_nothing_orphaned,
    config,
    run,
    session,
    wait_for,
)

UID_BASE = 1_930_000_000
FUNCTION = "napper"


def _criu_running(instance_id: str, action: str) -> int | None:
    """The pid of a `criu <action>` working on the instance, if one runs."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            action.encode() in argv
            and any(instance_id.encode() in arg for arg in argv)
            and any(arg.endswith(b"criu") for arg in argv)
        ):
            return int(entry.name)
    return None


def _kill_during(server, client: httpx.Client, path: str, instance_id: str, action: str) -> None:
    """POST `path` (a pause or a resume) and kill -9 the server as soon as CRIU works on it."""
    answers: list[object] = []

    def call() -> None:
        try:
            answers.append(client.post(path, timeout=60).status_code)
        except httpx.HTTPError as exc:
            answers.append(type(exc).__name__)  # the server died under it: expected

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    criu = wait_for(lambda: _criu_running(instance_id, action), 30, f"criu {action}")
    server.stop(signal.SIGKILL)
    caller.join(60)
    # CRIU was no child to die with it: let it finish or fail, as it would on a real host.
    wait_for(lambda: not Path(f"/proc/{criu}").exists(), 60, "criu to end")
    server.start()


def _state(server, client: httpx.Client, key: str) -> tuple[int, str, bool]:
    """(epoch, the file's content, whether the background process from before is there)."""
    content = run(client, key, "cat /home/user/kept.txt", FUNCTION).strip()  # a request: recovers it if need be
    sleeper = run(client, key, "pgrep -x -f 'sleep 777777' || true", FUNCTION).strip()
    return session(client, key, FUNCTION)["epoch"], content, bool(sleeper)


@pytest.fixture
def hibernating(make_server, template_store, fault):
    server = make_server(config(UID_BASE, extra=f'[templates]\ndir = "{template_store.root}"\n'))
    client = server.new_tenant("hib")
    made = client.post("/v1/functions", json={"name": FUNCTION, "template": TEST_TEMPLATE})
    assert made.status_code == 201, made.text
    key = "k1"
    assert client.post(f"/v1/functions/{FUNCTION}/sessions", json={"sessionId": key}).status_code == 201
    instance_id = session(client, key, FUNCTION)["containerId"]
    record = json.loads((server.data_dir / "instances" / instance_id / "instance.json").read_text())
    if not record["detail"].get("hibernatable"):
        pytest.skip("this host cannot hibernate sandboxes (no usable CRIU: scripts/install-criu.sh)")
    run(client, key, "echo kept > /home/user/kept.txt; (setsid sleep 777777 >/dev/null 2>&1 &)", FUNCTION)
    yield server, client, key, instance_id
    ended = client.delete(f"/v1/functions/{FUNCTION}/sessions/{key}")
    assert ended.status_code in (204, 404)
    server.stop()
    assert_nothing_left(server, UID_BASE)


def test_kill_9_during_a_hibernation_and_during_a_restore_loses_nothing(hibernating, fault):
    server, client, key, instance_id = hibernating
    base = f"/v1/functions/{FUNCTION}/sessions/{key}"
    fault.injected("kill -9 during a hibernation", "SIGKILL to hutch serve while criu dump works on the session")
    _kill_during(server, client, f"{base}/pause", instance_id, "dump")
    # Paused or not, its next request (a resume, as a client would send) brings it back.
    client.post(f"{base}/resume", timeout=60)
    epoch, content, sleeper = _state(server, client, key)
    assert content == "kept"
    assert sleeper == (epoch == 0), f"epoch {epoch} with its process {'there' if sleeper else 'gone'}: half of each"
    after_dump = "kept its memory" if sleeper else "recovered on its files, epoch + 1"
    if not sleeper:  # a process whose fate the restore below shows
        run(client, key, "(setsid sleep 777777 >/dev/null 2>&1 &)", FUNCTION)
    assert_nothing_orphaned(server, UID_BASE)

    # Hibernated properly this time, then killed while the restore runs.
    instance_id = session(client, key, FUNCTION)["containerId"]
    assert client.post(f"{base}/pause", timeout=60).status_code == 200
    assert session(client, key, FUNCTION)["state"] == "hibernated"
    fault.injected("kill -9 during a restore", "SIGKILL to hutch serve while criu restore works on the session")
    _kill_during(server, client, f"{base}/resume", instance_id, "restore")
    client.post(f"{base}/resume", timeout=60)
    epoch_after, content, sleeper_after = _state(server, client, key)
    assert content == "kept"
    assert sleeper_after == (epoch_after == epoch), "half restored"
    # One copy of it only: a restore the kill cut, finished by CRIU meanwhile, is not left running
    # beside the one the resume made.
    assert len(_host_sleepers()) == int(sleeper_after)
    assert_nothing_orphaned(server, UID_BASE)
    fault.observed(
        after_dump=after_dump,
        after_restore="restored with its memory" if sleeper_after else "recovered on its files, epoch + 1",
    )


def _host_sleepers() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes() == b"sleep\x00777777\x00":
                    found.append(int(entry.name))
            except OSError:
                pass
    return found
