"""The target of the battery: a throwaway `hutch serve` on a data directory of its own, driven
over HTTP as real clients drive it, and what the host can see of it.

What it owns:
- the server process (`hutch serve` on a free port, its own uid range so it never shares host
  uids with another hutch on the machine), and its teardown: the server stopped, every instance
  it left stopped, host bindings and cgroup parents removed, the directory deleted;
- tenants, functions and sessions made through the public API (`Tenant`, `Session`);
- running commands in a session through the gateway (envd's `process.Process/Start`), with the
  output kept up to a cap so that an attack cannot make the battery itself balloon;
- host-side evidence: an instance's record (pid, cgroup, workspace), the server's resident
  memory, how long `/health` takes to answer.

It knows nothing of attacks (`hutch.selftest.attacks`, `abuse`, `api_abuse` do).
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from hutch.agent import envelope
from hutch.runtime.userns import RANGE

STREAM = "application/connect+json"
OUTPUT_CAP = 4 * 1024 * 1024  # bytes of a command's stdout/stderr kept by the battery
# The battery's servers take their uids from 3.6e9 up (tests' runtimes: 2e9-3.07e9 and 3.5e9,
# hutch serve's default: 1e9), in steps of 64 ranges; 4096 slots of a server stay below 2^32 - 2.
UID_FIRST = 3_600_000_000
UID_STEPS = 100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a host process, in MiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def wait_healthy(proc: subprocess.Popen, health_url: str, log_path: Path, timeout: float = 60.0) -> None:
    """Wait until a hutch process just started answers 200 on its health URL; its log's tail is
    the error if it exits or never gets there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{health_url}: the process exited: {log_path.read_text()[-3000:]}")
        try:
            if httpx.get(health_url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{health_url} not healthy in {timeout} s: {log_path.read_text()[-3000:]}")


@dataclass
class Result:
    """A command run through the gateway, as the client saw it."""

    exit_code: int | None = None
    status: str = ""
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_bytes: int = 0  # all of it, also beyond the cap
    error: dict | None = None  # the end-of-stream error, if any
    http_status: int = 200
    pid: int = 0

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")

    def describe(self) -> str:
        end = f"exit {self.exit_code} ({self.status})" if self.exit_code is not None else f"error {self.error}"
        return f"{end}; stderr: {self.stderr.decode(errors='replace').strip()[-300:]!r}"


@dataclass
class Session:
    """A live session of a tenant, named by its key (the path-affinity route reaches it)."""

    tenant: Tenant
    function: str
    key: str
    info: dict = field(default_factory=dict)
    # Who the session's commands and file calls act as inside: None is the template's default
    # user; a name goes to the agent as E2B's SDK sends it (`user="root"`).
    user: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        """E2B's `Authorization: Basic base64("<user>:")` when the session acts as a named user."""
        if self.user is None:
            return {}
        return {"authorization": "Basic " + base64.b64encode(f"{self.user}:".encode()).decode()}

    @property
    def base(self) -> str:
        return f"/functions/{self.function}/sessions/{self.key}"

    @property
    def http(self) -> httpx.Client:
        return self.tenant.http

    def refresh(self) -> dict:
        self.info = self.tenant.api("GET", f"/v1/functions/{self.function}/sessions/{self.key}").json()
        return self.info

    def instance(self) -> dict:
        """The host's record of the session's current instance (pid, cgroup, workspace, uid)."""
        container = self.refresh()["containerId"]
        return json.loads((self.tenant.target.data_dir / "instances" / container / "instance.json").read_text())

    def run(
        self,
        argv: list[str],
        timeout: float = 60,
        cap: int = OUTPUT_CAP,
        env: dict[str, str] | None = None,
        on_start=None,
    ) -> Result:
        """Run a command to its end through the gateway (envd's Process/Start)."""
        process: dict[str, Any] = {"cmd": argv[0], "args": argv[1:]}
        if env:
            process["envs"] = env
        result = Result()
        with self.http.stream(
            "POST",
            f"{self.base}/process.Process/Start",
            content=envelope.encode({"process": process}),
            headers={"content-type": STREAM, **self.headers},
            timeout=httpx.Timeout(timeout, connect=10),
        ) as response:
            result.http_status = response.status_code
            if response.status_code != 200:
                response.read()
                result.error = {"http": response.status_code, "body": response.text[:500]}
                return result
            decoder = envelope.Decoder()
            for chunk in response.iter_raw():
                for flags, message in decoder.feed(chunk):
                    if flags & envelope.FLAG_END_STREAM:
                        result.error = message.get("error")
                        return result
                    _apply(result, message.get("event", {}), cap)
                    if on_start is not None and result.pid and "start" in message.get("event", {}):
                        on_start(result.pid)
        return result

    def spawn(self, argv: list[str], timeout: float = 60) -> int:
        """Start a process and return its pid as soon as it runs; it outlives the request."""
        message = envelope.encode({"process": {"cmd": argv[0], "args": argv[1:]}})
        with self.http.stream(
            "POST",
            f"{self.base}/process.Process/Start",
            content=message,
            headers={"content-type": STREAM, **self.headers},
            timeout=timeout,
        ) as response:
            decoder = envelope.Decoder()
            for chunk in response.iter_raw():
                for _, message in decoder.feed(chunk):
                    event = message.get("event", {})
                    if "start" in event:
                        return int(event["start"]["pid"])
                    raise RuntimeError(f"process did not start: {message!r:.300}")
        raise RuntimeError("the stream ended before the process started")

    def sh(self, command: str, timeout: float = 60, **kwargs) -> Result:
        return self.run(["/bin/bash", "-c", command], timeout, **kwargs)

    def python(self, code: str, timeout: float = 60, **kwargs) -> Result:
        return self.run(["python3", "-c", code], timeout, **kwargs)

    def rpc(self, method: str, message: dict, timeout: float = 30) -> httpx.Response:
        """A unary Connect call to the agent (e.g. `filesystem.Filesystem/Stat`)."""
        return self.http.post(f"{self.base}/{method}", json=message, headers=self.headers, timeout=timeout)

    def download(self, path: str, timeout: float = 30) -> httpx.Response:
        return self.http.get(f"{self.base}/files", params={"path": path}, headers=self.headers, timeout=timeout)

    def upload(self, path: str, data: bytes, timeout: float = 30) -> httpx.Response:
        headers = {"content-type": "application/octet-stream", **self.headers}
        params = {"path": path}
        return self.http.post(f"{self.base}/files", params=params, content=data, headers=headers, timeout=timeout)

    def delete(self) -> int:
        response = self.tenant.http.delete(f"/v1/functions/{self.function}/sessions/{self.key}", timeout=60)
        return response.status_code


def _apply(result: Result, event: dict, cap: int) -> None:
    if "start" in event:
        result.pid = event["start"].get("pid", 0)
    elif "data" in event:
        for stream in ("stdout", "stderr", "pty"):
            if stream in event["data"]:
                data = base64.b64decode(event["data"][stream])
                if stream == "stderr":
                    result.stderr = (result.stderr + data)[:cap]
                else:
                    result.stdout_bytes += len(data)
                    if len(result.stdout) < cap:
                        result.stdout = (result.stdout + data)[:cap]
    elif "end" in event:
        result.exit_code = event["end"].get("exitCode")
        result.status = event["end"].get("status", "")


@dataclass
class Tenant:
    target: Target
    name: str
    tenant_id: str
    api_key: str
    http: httpx.Client

    def api(self, method: str, path: str, **kwargs) -> httpx.Response:
        """A control-plane call that must succeed."""
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise RuntimeError(f"{method} {path} as {self.name}: {response.status_code} {response.text[:300]}")
        return response

    def function(self, spec: dict) -> None:
        self.api("POST", "/v1/functions", json=spec)

    def session(self, function: str, key: str | None = None, user: str | None = None, **body) -> Session:
        key = key or f"s-{uuid.uuid4().hex[:12]}"
        info = self.api("POST", f"/v1/functions/{function}/sessions", json={"sessionId": key, **body}, timeout=120)
        return Session(self, function, key, info.json(), user)


class Target:
    """A `hutch serve` of the battery's own (see the module docstring)."""

    def __init__(
        self,
        root: Path | None = None,
        log_level: str = "warning",
        config: str = "",
        request_timeout: float = 3.0,
        templates_dir: Path | None = None,
    ) -> None:
        self.root = Path(root or tempfile.mkdtemp(prefix="hutch-selftest-", dir="/var/tmp"))
        self.root.chmod(0o755)
        self.data_dir = self.root / "data"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_key = "e2b_" + uuid.uuid4().hex + uuid.uuid4().hex[:8]
        # An environment variable of the server that no sandbox may ever see.
        self.env_canary = "hutch-env-canary-" + uuid.uuid4().hex
        self.uid_base = UID_FIRST + random.randrange(UID_STEPS) * 64 * RANGE
        self.log_path = self.root / "serve.log"
        self.config_path = self.root / "serve.toml"
        # A short deadline for request heads and bodies, so that slow-loris clients are cut in seconds.
        self.request_timeout = request_timeout
        # Templates: never built here (a throwaway server); `templates_dir`, a store whose templates
        # the root cast boots (read, never changed).
        templates = "[templates]\nprepare = []\n" + (f'dir = "{templates_dir}"\n' if templates_dir else "")
        self.config_path.write_text(
            f"uid_base = {self.uid_base}\nrequest_timeout = {request_timeout}\n"
            f'[warm_pools]\nbase = 0\n"code-interpreter-v1" = 0\n{templates}{config}'
        )
        self.log_level = log_level
        self.proc: subprocess.Popen | None = None
        self.admin = httpx.Client(base_url=self.url, headers={"X-API-Key": self.admin_key}, timeout=60)
        self.tenants: list[Tenant] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60) -> None:
        env = {**os.environ, "HUTCH_API_KEY": self.admin_key, "HUTCH_SELFTEST_CANARY": self.env_canary}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hutch", "serve", "--port", str(self.port), "--data-dir", str(self.data_dir),
                 "--config", str(self.config_path), "--log-level", self.log_level],
                env=env, stdout=log, stderr=log,
            )  # fmt: skip
        wait_healthy(self.proc, f"{self.url}/health", self.log_path, timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tenant(self, name: str, max_sessions: int = 50) -> Tenant:
        made = self.admin.post("/v1/tenants", json={"name": name, "maxSessions": max_sessions})
        made.raise_for_status()
        body = made.json()
        key = body["apiKey"]
        tenant_id = body.get("tenantId") or body.get("tenant", {}).get("tenantId", "")
        http = httpx.Client(base_url=self.url, headers={"X-API-Key": key}, timeout=60)
        tenant = Tenant(self, name, tenant_id, key, http)
        self.tenants.append(tenant)
        return tenant

    def health_ms(self, timeout: float = 30) -> float:
        """How long `/health` takes to answer 200 (raises if it does not)."""
        started = time.perf_counter()
        response = httpx.get(f"{self.url}/health", timeout=timeout)
        response.raise_for_status()
        return (time.perf_counter() - started) * 1000

    def rss_mb(self) -> float:
        return rss_mb(self.pid) if self.alive() else 0.0

    def close(self) -> None:
        """Stop the server, then everything it left on the host, and remove the directory."""
        for tenant in self.tenants:
            tenant.http.close()
        self.admin.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        stop_leftovers(self.data_dir)
        shutil.rmtree(self.root, ignore_errors=True)


def stop_leftovers(data_dir: Path) -> None:
    """Stop every instance a server left on `data_dir` (they outlive it by design) and undo its
    host-wide state (network rules, staged binds, cgroup parents)."""
    if not data_dir.exists():
        return
    import asyncio

    from hutch.runtime.multi import MultiRuntime
    from hutch.runtime.network import HostNetwork, layout_for
    from hutch.storage.local import DirectoryStore, ImageStore

    async def run() -> None:
        root = data_dir / "workspaces"
        store = ImageStore(root) if ImageStore.available() else DirectoryStore(root)
        runtime = MultiRuntime(data_dir, store)
        for instance in await runtime.adopt_running():
            await runtime.stop(instance.instance_id)
        gvisor_dir = data_dir / "gvisor"
        if gvisor_dir.exists():
            runtime.runtime("gvisor")  # its cgroup parent and staged binds go too
        for backend in runtime.runtimes.values():
            await backend.close(unstage=True)
        HostNetwork(layout_for(data_dir), 0, 0).remove()  # the server's table, which outlives it too

    asyncio.run(run())
