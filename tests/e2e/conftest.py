"""`hutch serve` as a real process on a real port, for end-to-end tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

from hutch.selftest.target import wait_healthy

ADMIN_KEY = "e2b_0123456789abcdef0123456789abcdef01234567"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `hutch serve` process; `restart()` kills it (-9 by default) and starts it again."""

    def __init__(self, data_dir: Path, config_text: str = "") -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = data_dir.parent / f"{data_dir.name}.toml"
        self.config.write_text(config_text)
        self.log = data_dir.parent / f"{data_dir.name}.log"
        self.proc: subprocess.Popen | None = None
        self.admin = httpx.Client(base_url=self.url, headers={"X-API-Key": ADMIN_KEY}, timeout=60)

    def start(self) -> None:
        env = {**os.environ, "HUTCH_API_KEY": ADMIN_KEY}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hutch", "serve", "--port", str(self.port),
                 "--data-dir", str(self.data_dir), "--config", str(self.config), "--log-level", "warning"],
                env=env, stdout=log, stderr=log,
            )  # fmt: skip
        wait_healthy(self.proc, f"{self.url}/health", self.log)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, sig: int = signal.SIGKILL) -> None:
        self.stop(sig)
        self.start()

    def new_tenant(self, name: str = "tenant", max_sessions: int = 50) -> httpx.Client:
        """A client authenticated as a fresh tenant."""
        made = self.admin.post("/v1/tenants", json={"name": name, "maxSessions": max_sessions})
        made.raise_for_status()
        return httpx.Client(base_url=self.url, headers={"X-API-Key": made.json()["apiKey"]}, timeout=60)


def _cleanup(server: Server) -> None:
    """Stop the server, then every instance it left running (sessions survive restarts on purpose)."""
    server.stop()
    from tests.e2e.teardown import stop_leftover_instances

    stop_leftover_instances(server.data_dir)


@pytest.fixture(scope="session")
def server():
    root = Path(tempfile.mkdtemp(prefix="hutch-e2e-", dir="/var/tmp"))
    root.chmod(0o755)
    srv = Server(root / "data", config_text='[warm_pools]\nbase = 1\n"code-interpreter-v1" = 1\n')
    srv.start()
    yield srv
    _cleanup(srv)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def fresh_server():
    """A server of its own, for tests that restart or reconfigure it."""
    root = Path(tempfile.mkdtemp(prefix="hutch-e2e-", dir="/var/tmp"))
    root.chmod(0o755)
    created: list[Server] = []

    def make(config_text: str = '[warm_pools]\nbase = 0\n"code-interpreter-v1" = 0\n') -> Server:
        srv = Server(root / f"data{len(created)}", config_text)
        srv.start()
        created.append(srv)
        return srv

    yield make
    for srv in created:
        _cleanup(srv)
    shutil.rmtree(root, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="hutch serve starts sandboxes: root only")
        for item in items:
            if "/e2e/" in str(item.fspath):
                item.add_marker(skip)
