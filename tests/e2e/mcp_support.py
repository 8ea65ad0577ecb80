"""What the MCP end-to-end tests share: the example function, the Node clients, the mcp 1.x venv.

- The example function is deployed from `examples/mcp-counter/*.json`, as a user would, with the
  test's changes on top (a name of its own, no warm pool unless asked, short idle timeouts).
- The Node side (`mcp_node/`: the TypeScript SDK, the conformance suite, and Node 22 from npm,
  which the suite needs) is installed with `npm ci` from its lockfile when it is missing;
  `.ci/run` does the same up front.
- The last 1.x release of the Python SDK lives in a virtualenv of its own under /var/tmp, made
  once like the oldest E2B SDKs' (`old_sdk.ensure_venv`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.old_sdk import ensure_venv

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "mcp-counter"
NODE_DIR = Path(__file__).with_name("mcp_node")
NODE = NODE_DIR / "node_modules" / ".bin" / "node"
MCP1_PINS = ("mcp==1.30.0",)
MCP1_VENV = Path("/var/tmp/mcp1-venv")
MCP1_SCENARIO = Path(__file__).with_name("mcp1_scenario.py")


def deploy(tenant: httpx.Client, name: str, file: str = "function.json", **changes: Any) -> str:
    """Create the example function under `name` (with `changes` merged into its spec); its name."""
    spec = json.loads((EXAMPLE / file).read_text())
    spec.update({"name": name, "warmPoolSize": 0})
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    made = tenant.post("/v1/functions", json=spec)
    assert made.status_code == 201, made.text
    return name


def sessions_of(tenant: httpx.Client, function: str) -> list[dict]:
    answer = tenant.get(f"/v1/functions/{function}/sessions", params={"limit": 1000})
    answer.raise_for_status()
    return answer.json()["sessions"]


def wait_until(check: Callable[[], Any], timeout: float = 30.0, step: float = 0.1) -> Any:
    """The first truthy value of `check()`, polled until `timeout` (then an AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout}s: {check}")
        time.sleep(step)


def ensure_node() -> Path:
    """Node 22 with the TypeScript SDK and the conformance suite, installed from the lockfile."""
    if not NODE.exists():
        done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"npm ci failed:\n{done.stderr[-3000:]}")
    return NODE


def run_node(args: list[str], key: str, timeout: float = 180) -> dict:
    """Run `client.mjs` (or another script of mcp_node/) and return the JSON it printed last."""
    node = ensure_node()
    env = {**os.environ, "HUTCH_API_KEY": key}
    done = subprocess.run([str(node), *args], cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=timeout)
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"node {args[0]} printed nothing (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def run_conformance(url: str, key: str, out_dir: Path, timeout: float = 540) -> dict[str, list[dict]]:
    """The official conformance suite's server scenarios against `url`; {scenario: its checks}.

    The suite has no option for credentials: `api-key.mjs`, preloaded into its Node process,
    adds hutch's API key to every request it makes.
    """
    node = ensure_node()
    env = {**os.environ, "HUTCH_API_KEY": key}
    suite = NODE_DIR / "node_modules" / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
    command = [str(node), "--import", "./api-key.mjs", str(suite), "server", "--url", url, "-o", str(out_dir)]
    done = subprocess.run(command, cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=timeout)
    results: dict[str, list[dict]] = {}
    for checks in sorted(out_dir.glob("server-*/checks.json")):
        scenario = re.sub(r"-\d{4}-\d\d-\d\dT[\d-]+Z$", "", checks.parent.name.removeprefix("server-"))
        results[scenario] = json.loads(checks.read_text())
    if not results:
        raise RuntimeError(f"the conformance suite ran no scenario (exit {done.returncode}):\n{done.stdout[-3000:]}")
    return results


def run_mcp1(streamable_url: str, sse_url: str, key: str, timeout: float = 300) -> dict:
    python = ensure_venv(MCP1_VENV, MCP1_PINS)
    env = {**os.environ, "HUTCH_API_KEY": key}
    done = subprocess.run(
        [str(python), str(MCP1_SCENARIO), streamable_url, sse_url],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"the mcp 1.x scenario printed nothing (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])
