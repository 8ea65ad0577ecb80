"""Real sandboxes for tests: one runtime per backend (bwrap, gvisor) and test session, each on a
throwaway data directory. Every test that takes `runtime`, `make_sandbox` or `sandbox` runs once
per backend (`test_x[bwrap]`, `test_x[gvisor]`); gVisor's are skipped where `runsc` is missing."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from hutch.runtime import make_runtime
from hutch.runtime.base import InstanceSpec, Resources
from hutch.runtime.channel import AgentChannel, CommandResult
from hutch.runtime.local import LocalRuntime
from hutch.runtime.userns import RANGE, UidSlots
from hutch.storage.local import DirectoryStore, ImageStore
from tests.loop_thread import LoopThread

pytestmark = pytest.mark.sandbox

BACKENDS = ["bwrap", "gvisor"]


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="sandboxes need root (cgroups, user namespace maps)")
        for item in items:
            if "sandbox" in item.keywords:
                item.add_marker(skip)


class Sandbox:
    """A started instance, driven synchronously from a test."""

    def __init__(self, loop: LoopThread, runtime: LocalRuntime, instance) -> None:
        self.loop = loop
        self.runtime = runtime
        self.instance = instance
        self.channel = AgentChannel(instance.socket_path)

    @property
    def id(self):
        return self.instance.instance_id

    def run(self, cmd: str, timeout: float = 60, **kwargs) -> CommandResult:
        return self.loop.run(self.channel.run(cmd, timeout=timeout, **kwargs), timeout + 10)

    def python(self, code: str, timeout: float = 60) -> CommandResult:
        return self.run("python3", shell=False, args=["-c", code], timeout=timeout)

    def stats(self):
        return self.loop.run(self.runtime.stats(self.id))

    def stop(self, keep_workspace: bool = False) -> None:
        self.loop.run(self.channel.aclose())
        if self.id in {i.instance_id for i in self.runtime.instances()}:
            self.loop.run(self.runtime.stop(self.id, keep_workspace=keep_workspace))


@pytest.fixture(scope="session")
def loop():
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="session")
def data_dir():
    path = Path(tempfile.mkdtemp(prefix="hutch-test-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session", params=BACKENDS)
def runtime(request, loop, data_dir):
    name = request.param
    if name == "gvisor" and shutil.which("runsc") is None:
        pytest.skip("gVisor (runsc) is not installed")
    root = data_dir / name
    root.mkdir(mode=0o755)
    store = ImageStore(root / "workspaces") if ImageStore.available() else DirectoryStore(root / "workspaces")
    # A uid range of its own: other hutch processes on this machine start theirs at 10^9.
    slots = UidSlots(first_uid=2_000_000_000 + random.randrange(256) * 64 * RANGE, count=64)

    async def make():
        return make_runtime(name, root, store, slots)

    rt = loop.run(make())
    yield rt
    for instance in rt.instances():
        loop.run(rt.stop(instance.instance_id))
    loop.run(rt.close(unstage=True))


@pytest.fixture
def make_sandbox(loop, runtime):
    started: list[Sandbox] = []

    def make(workspace: str | None = None, network: dict | None = None, **resources) -> Sandbox:
        spec = InstanceSpec(
            instance_id=f"t-{uuid.uuid4().hex[:10]}",
            resources=Resources(**resources),
            backend=runtime.name,
            workspace=workspace,
            network=network,
        )
        sandbox = Sandbox(loop, runtime, loop.run(runtime.start(spec)))
        started.append(sandbox)
        return sandbox

    yield make
    for sandbox in started:
        sandbox.stop()


@pytest.fixture
def sandbox(make_sandbox) -> Sandbox:
    return make_sandbox()
