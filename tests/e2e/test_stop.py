"""A stop of `hutch serve` leaves the host as found; a crash leaves it to `hutch cleanup` or the
deadline keeper; with `live_restore`, instances outlive hutch only until their deadlines."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time

import httpx

from hutch.runtime.keeper import KEEPER_LOCK, held_by
from tests.hostleaks import leaks

HEADER = "x-fc-session-id"
POOLS = '[warm_pools]\nbase = 1\n"code-interpreter-v1" = 0\n'


def _start_command(server, key: str, command: str) -> threading.Thread:
    """A command running in a header session's instance, its answer streaming while we go on."""
    message = json.dumps({"process": {"cmd": "/bin/bash", "args": ["-c", command]}}).encode()
    tenant_key = server.admin.headers["X-API-Key"]

    def run() -> None:
        try:
            with (
                httpx.Client(base_url=server.url, timeout=60) as client,
                client.stream(
                    "POST",
                    "/functions/base/invoke/process.Process/Start",
                    content=struct.pack(">BI", 0, len(message)) + message,
                    headers={HEADER: key, "content-type": "application/connect+json", "X-API-Key": tenant_key},
                ) as response,
            ):
                for _ in response.iter_bytes():
                    pass
        except httpx.HTTPError:
            pass  # cut by the stop

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _busy_server(server) -> None:
    """A warm pool (in the config), an E2B sandbox with a network, a header session running a command."""
    body = {"templateID": "base", "timeout": 300, "allow_internet_access": True}
    made = server.admin.post("/v2/sandboxes", json=body)
    assert made.status_code == 201, made.text
    assert server.admin.get("/functions/base/invoke/health", headers={HEADER: "h1"}).status_code == 204
    _start_command(server, "h1", "sleep 600")
    time.sleep(0.5)
    state = leaks(server.data_dir)
    assert any(s.startswith("network namespace") for s in state), state
    assert any(s.startswith("nftables") for s in state), state
    assert any(s.startswith("mount") for s in state), state


def _cleanup_cli(data_dir) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hutch", "cleanup", "--data-dir", str(data_dir)], capture_output=True, text=True
    )


def _usage(data_dir) -> list[tuple]:
    with sqlite3.connect(data_dir / "metadb.sqlite3") as db:
        return db.execute("SELECT session_id, ended_at, end_reason FROM usage").fetchall()


def test_a_sigterm_of_hutch_serve_removes_every_instance_and_all_they_made_and_finishes_usage(fresh_server):
    server = fresh_server(POOLS)
    _busy_server(server)
    server.stop(signal.SIGTERM)
    assert leaks(server.data_dir) == []
    records = _usage(server.data_dir)
    assert len(records) == 2 and all(ended is not None and reason == "shutdown" for _, ended, reason in records)
    assert "nothing to remove" in _cleanup_cli(server.data_dir).stdout


def test_after_a_kill_9_hutch_cleanup_removes_everything_and_a_second_run_finds_nothing(fresh_server):
    server = fresh_server(POOLS)
    _busy_server(server)
    server.stop(signal.SIGKILL)
    assert leaks(server.data_dir) != []  # the instances run on: a restart would adopt them
    first = _cleanup_cli(server.data_dir)
    assert first.returncode == 0, first.stderr
    assert "removed instance" in first.stdout and "nftables table" in first.stdout
    assert leaks(server.data_dir) == []
    assert "nothing to remove" in _cleanup_cli(server.data_dir).stdout


def test_hutch_cleanup_is_refused_while_a_hutch_serves_the_directory(fresh_server):
    server = fresh_server('[warm_pools]\nbase = 0\n"code-interpreter-v1" = 0\n')
    refused = _cleanup_cli(server.data_dir)
    assert refused.returncode == 1
    assert f"pid {server.proc.pid}" in refused.stderr
    assert server.admin.get("/health").status_code in (200, 204)


def _where_is_the_keeper(data_dir) -> None:
    """Have a keeper that did not finish write its stack (and its children's) to keeper.log."""
    pid = held_by(data_dir / KEEPER_LOCK)
    with open(data_dir / "keeper.log", "a") as log:
        log.write(f"-- keeper pid {pid}\n")
        if pid:
            children = subprocess.run(["ps", "--ppid", str(pid), "-o", "pid,stat,wchan:30,cmd"], capture_output=True)
            log.write(children.stdout.decode())
    if pid:
        os.kill(pid, signal.SIGUSR1)
        time.sleep(0.5)


def test_with_live_restore_a_killed_hutchs_instances_end_at_their_deadlines(fresh_server):
    server = fresh_server("live_restore = true\nwarm_lease = 3\n" + POOLS)
    made = server.admin.post("/v2/sandboxes", json={"templateID": "base", "timeout": 4})
    assert made.status_code == 201, made.text
    time.sleep(0.5)
    assert leaks(server.data_dir) != []
    server.stop(signal.SIGKILL)
    # The sandbox ends at its E2B timeout, the warm instance 3 s after the keeper last saw a
    # hutch; then the keeper removes everything and exits.
    deadline = time.monotonic() + 30
    while (left := leaks(server.data_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    if left:
        _where_is_the_keeper(server.data_dir)
    log = (server.data_dir / "keeper.log").read_text()
    assert left == [], f"keeper.log:\n{log}\nhutch serve's log:\n{server.log.read_text()[-3000:]}"
    assert "reached its deadline" in log
