"""The agent's `go_fd`: it serves only once the runtime said so (the instance is recorded).

A runtime that dies between starting a sandbox and recording it closes the pipe unwritten; the
agent must then exit instead of running a sandbox nobody knows of (`hutch.agent.main`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.agent.conftest import ROOT, RunningAgent


def _agent_with_go_fd(tmp_path: Path, go_r: int) -> subprocess.Popen:
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HUTCH_AGENT": json.dumps({"go_fd": go_r})}
    argv = [sys.executable, "-m", "hutch.agent", "--socket", str(tmp_path / "agent.sock"), "--home", str(home)]
    return subprocess.Popen(argv, env=env, pass_fds=(go_r,))


def test_an_agent_whose_go_pipe_closes_unwritten_exits_without_serving(tmp_path):
    go_r, go_w = os.pipe()
    proc = _agent_with_go_fd(tmp_path, go_r)
    os.close(go_r)
    os.close(go_w)  # the runtime died before recording the instance
    assert proc.wait(10) == 1
    assert not (tmp_path / "agent.sock").exists()


def test_an_agent_serves_once_it_reads_the_go_byte(tmp_path):
    go_r, go_w = os.pipe()
    proc = _agent_with_go_fd(tmp_path, go_r)
    os.close(go_r)
    try:
        os.write(go_w, b"1")
        os.close(go_w)
        agent = RunningAgent(tmp_path / "agent.sock", tmp_path / "home", proc)
        deadline = time.monotonic() + 10
        while True:
            try:
                if agent.client.get("/health").status_code == 204:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the agent did not start serving"
            time.sleep(0.01)
        agent.client.close()
    finally:
        proc.terminate()
        proc.wait(10)
