"""The agent listening on TCP (`--listen HOST:PORT`), as it does in a pod of the kubernetes backend."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_tcp_agent(tmp_path: Path, args: list[str], env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    home = tmp_path / "home"
    home.mkdir()
    environ = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "hutch.agent", "--home", str(home), *args], env=environ)
    return proc, home


def wait_health(base_url: str, proc: subprocess.Popen) -> httpx.Client:
    client = httpx.Client(base_url=base_url, timeout=30)
    deadline = time.monotonic() + 10
    while True:
        try:
            if client.get("/health").status_code == 204:
                return client
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            client.close()
            raise RuntimeError("agent did not answer on TCP")
        time.sleep(0.01)


@pytest.fixture
def tcp_agent(tmp_path):
    port = free_port()
    proc, home = start_tcp_agent(tmp_path, ["--listen", f"127.0.0.1:{port}"])
    try:
        client = wait_health(f"http://127.0.0.1:{port}", proc)
        yield client, home, port
        client.close()
    finally:
        proc.kill()  # not SIGTERM: the kernel may hand it to a worker thread while accept() blocks
        proc.wait(5)


def test_the_agent_serves_files_over_tcp(tcp_agent):
    client, home, _ = tcp_agent
    data = os.urandom(300_000)
    put = client.post(
        "/files", params={"path": f"{home}/blob"}, content=data, headers={"content-type": "application/octet-stream"}
    )
    assert put.status_code == 200, put.text
    assert (home / "blob").read_bytes() == data
    got = client.get("/files", params={"path": f"{home}/blob"}, headers={"accept-encoding": "identity"})
    assert got.status_code == 200
    assert got.content == data


def test_accepted_connections_send_small_writes_at_once():
    """Streamed answers are many small writes: none may wait for Nagle's timer (40 ms)."""
    from hutch.agent.main import _tcp_listener

    listener = _tcp_listener("127.0.0.1:0")
    with listener, socket.create_connection(listener.getsockname()):
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


def test_an_ipv6_address_is_served_when_the_host_has_ipv6():
    from hutch.agent.main import _tcp_listener

    try:
        listener = _tcp_listener("[::1]:0")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with listener:
        assert listener.family == socket.AF_INET6


def test_listen_comes_from_the_boot_config_too(tmp_path):
    port = free_port()
    config = {"listen": f"127.0.0.1:{port}", "env": {"FROM_BOOT": "yes"}}
    proc, _ = start_tcp_agent(tmp_path, [], env={"HUTCH_AGENT": json.dumps(config)})
    try:
        client = wait_health(f"http://127.0.0.1:{port}", proc)
        client.close()
    finally:
        proc.kill()
        proc.wait(5)


@pytest.mark.parametrize("address", ["49983", "localhost", "127.0.0.1:http", ":49983"])
def test_a_malformed_listen_address_is_refused_with_a_message(tmp_path, address):
    home = tmp_path / "home"
    home.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "hutch.agent", "--home", str(home), "--listen", address],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode != 0
    assert "--listen wants HOST:PORT" in result.stderr
