"""The fault battery's tools: real `hutch serve` processes, what a test does to them, what is left.

Every test here injects a real fault into a real server (kill -9, a full disk, a lock held by
another process, a frozen cgroup, SIGSTOP) and checks what clients see during it and after it.
Each records what it injected and observed with the `fault` fixture; with `HUTCH_FAULT_REPORT`
set to a path, the session writes those records (and each test's outcome) there as JSON, which
`bench/reliability.py` turns into docs/reliability-faults.md.

Each server gets a uid range of its own (`uid_base`), so that the processes of one test's
sandboxes can be told from every other's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.connect_wire import envelope, stdout_of
from tests.e2e.conftest import Server, _cleanup

HEADER = "x-fc-session-id"
UID_SPAN = 100_000_000  # the uids one server's sandboxes can have: base .. base + span
CONNECT = "application/connect+json"

# -- driving a server ----------------------------------------------------------------------------


def config(uid_base: int, base_pool: int = 0, extra: str = "") -> str:
    return (
        f'uid_base = {uid_base}\n{extra}\n[warm_pools]\nbase = {base_pool}\n"code-interpreter-v1" = 0\n'
        "[metering]\nsample_interval = 0.5\nbucket_seconds = 10\n"
    )


@pytest.fixture
def make_server() -> Iterator[Callable[..., Server]]:
    """`make_server(config_text, data_dir=None)`: a started `hutch serve` of the test's own."""
    root = Path(tempfile.mkdtemp(prefix="hutch-faults-", dir="/var/tmp"))
    root.chmod(0o755)
    made: list[Server] = []

    def make(text: str, data_dir: Path | None = None) -> Server:
        server = Server(data_dir or root / f"data{len(made)}", text)
        server.config = root / f"data{len(made)}.toml"  # outside a data dir the test may fill
        server.config.write_text(text)
        server.log = root / f"data{len(made)}.log"
        server.start()
        made.append(server)
        return server

    yield make
    for server in made:
        _cleanup(server)
    shutil.rmtree(root, ignore_errors=True)


def connect_request(command: str, envs: dict[str, str] | None = None) -> bytes:
    return envelope({"process": {"cmd": "/bin/bash", "args": ["-l", "-c", command], "envs": envs or {}}})


def run(client: httpx.Client, key: str, command: str, function: str = "base", timeout: float = 30) -> str:
    """A command's stdout, through the gateway (envd's process.Start, header affinity)."""
    response = client.post(
        f"/functions/{function}/invoke/process.Process/Start",
        content=connect_request(command),
        headers={HEADER: key, "content-type": CONNECT},
        timeout=timeout,
    )
    assert response.status_code == 200, response.text
    return stdout_of(response.content)


def session(client: httpx.Client, key: str, function: str = "base") -> dict:
    response = client.get(f"/v1/functions/{function}/sessions/{key}")
    assert response.status_code == 200, response.text
    return response.json()


def instance_record(server: Server, container_id: str) -> dict:
    return json.loads((server.data_dir / "instances" / container_id / "instance.json").read_text())


def agent_pid(server: Server, container_id: str) -> int:
    """The host pid of an instance's agent (pid 2 of its sandbox: the only child of its pid 1)."""
    pid1 = instance_record(server, container_id)["pid"]
    children = Path(f"/proc/{pid1}/task/{pid1}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def wait_gone(pid: int, timeout: float = 10) -> None:
    """Until the process has exited, every thread of it (gone, or a zombie nobody reaped yet: a
    leader thread is a zombie while its other threads still exit, holding its files open)."""

    def gone() -> bool:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return True
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        return fields.get("State", "").startswith(("Z", "X")) and fields.get("Threads", "1").strip() == "1"

    wait_for(gone, timeout, f"process {pid} to exit")


def cgroup_dir(server: Server, container_id: str, controller: str) -> Path:
    return Path(instance_record(server, container_id)["detail"]["cgroup"]["dirs"][controller])


def wait_for(condition: Callable[[], object], timeout: float = 20, what: str = "the condition") -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- what a server leaves on the host -------------------------------------------------------------


def _hash(path: Path, length: int) -> str:
    return hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:length]


def sandbox_processes(uid_base: int) -> set[int]:
    """Every process on the host running as one of the server's sandbox uids."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        uid = int(fields["Uid"].split()[0])
        # A zombie of the host's init: a sandbox process whose parent died with a killed hutch,
        # dead already, for init (not hutch) to reap.
        orphaned_zombie = fields.get("State", "").startswith("Z") and fields.get("PPid", "").strip() == "1"
        if uid_base <= uid < uid_base + UID_SPAN and not orphaned_zombie:
            found.add(int(entry))
    return found


def host_state(server: Server, uid_base: int) -> dict[str, set]:
    """What of the server's sandboxes exists on the host: instances recorded in its data dir,
    sandbox processes, instance cgroups, workspace mounts, network namespaces, nftables tables."""
    data = server.data_dir.resolve()
    group = f"hutch-{_hash(data, 8)}"
    tag = _hash(data, 4)
    records = {}
    for path in (data / "instances").glob("*/instance.json"):
        records[path.parent.name] = json.loads(path.read_text())
    cgroups = set()
    for controller in Path("/sys/fs/cgroup").iterdir():
        for parent in controller.glob(f"**/{group}"):
            cgroups |= {(controller.name, child.name) for child in parent.iterdir() if child.is_dir()}
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].encode().decode("unicode_escape") for line in f]
    mounts = {p for p in points if p.startswith(str(data / "workspaces") + "/")}
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout.splitlines()
    awake = {i: r for i, r in records.items() if r.get("state") != "hibernated"}  # a hibernated one has no cgroups
    return {
        "instances": set(records),
        "awake": set(awake),
        "processes": sandbox_processes(uid_base),
        "cgroups": cgroups,
        "mounts": mounts,
        "workspaces_attached": {r["workspace_path"] for r in records.values()},
        "netns": {line.split()[0] for line in netns if line.startswith(f"hutch-{tag}-")},
        "netns_expected": {f"hutch-{tag}-{r['detail']['slot']}" for r in records.values() if r["spec"]["network"]},
        "nft": {line for line in tables if f"hutch_{tag}" in line},
        "cgroup_procs": {
            int(pid)
            for r in awake.values()
            for pid in Path(r["detail"]["cgroup"]["dirs"]["pids"], "cgroup.procs").read_text().split()
        }
        # bwrap itself, outside the cgroups: as the slot's base uid for a template's instance
        | {r["detail"]["bwrap_pid"] for r in awake.values() if r["detail"].get("bwrap_pid")},
    }


def _describe(server: Server, instance_ids: set[str]) -> dict[str, list[str]]:
    """The processes in these instances' cgroups (pid, state, command), to say what a leak is."""
    group = f"hutch-{_hash(server.data_dir.resolve(), 8)}"
    out: dict[str, list[str]] = {}
    for instance_id in instance_ids:
        for procs in Path("/sys/fs/cgroup/pids").glob(f"**/{group}/{instance_id}/cgroup.procs"):
            for pid in procs.read_text().split():
                try:
                    stat = Path(f"/proc/{pid}/stat").read_text()
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:100]
                except OSError:
                    continue
                out.setdefault(instance_id, []).append(f"{pid} {stat.split(')')[1].split()[0]} {cmdline!r}")
    return out


def assert_nothing_orphaned(server: Server, uid_base: int) -> dict[str, set]:
    """While the server runs: everything on the host belongs to an instance it has a record of."""
    state = host_state(server, uid_base)
    controllers = {c for c, _ in state["cgroups"]}
    stray = {i for _, i in state["cgroups"]} - state["awake"]
    assert not stray, f"stray cgroups: {_describe(server, stray)}"
    assert state["cgroups"] == {(c, i) for c in controllers for i in state["awake"]}, "missing cgroups"
    assert state["processes"] <= state["cgroup_procs"], "sandbox processes outside every live instance"
    assert state["mounts"] == state["workspaces_attached"], "workspace mounts of no live instance"
    assert state["netns"] == state["netns_expected"], "network namespaces of no live instance"
    return state


def assert_nothing_left(server: Server, uid_base: int) -> None:
    """After the server and every instance are gone: nothing of them on the host."""
    state = host_state(server, uid_base)
    for name in ("instances", "processes", "cgroups", "mounts", "netns", "nft"):
        assert not state[name], f"{name} left behind: {state[name]}"


# -- the report ------------------------------------------------------------------------------------

_RECORDS: list[dict] = []


class FaultRecord:
    """What one test injected and what clients saw, for the reliability report."""

    def __init__(self, test: str) -> None:
        self.entry: dict = {"test": test, "fault": "", "injected": "", "observed": {}, "outcome": "not run"}
        _RECORDS.append(self.entry)

    def injected(self, fault: str, how: str) -> None:
        self.entry["fault"], self.entry["injected"] = fault, how

    def observed(self, **values: object) -> None:
        self.entry["observed"].update(values)


@pytest.fixture
def fault(request: pytest.FixtureRequest) -> FaultRecord:
    record = FaultRecord(request.node.name)
    request.node.fault_record = record
    return record


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    record = getattr(item, "fault_record", None)
    if record is not None and report.when == "call":
        record.entry["outcome"] = report.outcome
        record.entry["seconds"] = round(report.duration, 2)
    return report


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get("HUTCH_FAULT_REPORT")
    if path and _RECORDS:
        Path(path).write_text(json.dumps(_RECORDS, indent=1, default=str))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="the fault battery starts sandboxes and injects host faults: root only")
        for item in items:
            if "/faults/" in str(item.fspath):
                item.add_marker(skip)


# Faults that stop processes must never leave one stopped behind a failed assertion.
def resume(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass
