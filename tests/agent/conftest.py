"""Fixtures that run the agent as a plain process on a Unix socket (no sandbox needed)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]


class RunningAgent:
    def __init__(self, socket_path: Path, home: Path, proc: subprocess.Popen) -> None:
        self.socket_path = socket_path
        self.home = home
        self.proc = proc
        self.client = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(socket_path)), base_url="http://sandbox", timeout=30
        )


def start_agent(tmp_path: Path, extra_env: dict | None = None) -> RunningAgent:
    home = tmp_path / "home"
    home.mkdir()
    sock = tmp_path / "agent.sock"
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(extra_env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "hutch.agent", "--socket", str(sock), "--home", str(home)], env=env)
    running = RunningAgent(sock, home, proc)
    deadline = time.monotonic() + 10
    while True:
        try:
            if running.client.get("/health").status_code == 204:
                return running
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError("agent did not start")
        time.sleep(0.01)


@pytest.fixture
def agent(tmp_path):
    running = start_agent(tmp_path)
    try:
        yield running
    finally:
        running.client.close()
        running.proc.terminate()
        try:
            running.proc.wait(5)
        except subprocess.TimeoutExpired:
            running.proc.kill()
