"""Hibernation of gVisor instances (`runsc checkpoint` / `runsc restore`): memory, processes and
files come back as they were, nothing of a hibernated instance runs or holds memory, a refused
or failed hibernation or restore loses nothing. Skipped where runsc is missing."""

from __future__ import annotations

import json
import random
import shutil
import stat
import tempfile
import uuid
from pathlib import Path

import pytest

from hutch.errors import IsolationError
from hutch.runtime import make_runtime
from hutch.runtime.base import InstanceSpec, InstanceState
from hutch.runtime.cgroups import Cgroup
from hutch.runtime.channel import AgentChannel
from hutch.runtime.userns import RANGE, UidSlots
from hutch.storage.local import DirectoryStore, ImageStore
from tests.conftest import TEST_TEMPLATE
from tests.runtime.conftest import Sandbox
from tests.runtime.hostprocs import is_alive
from tests.runtime.test_hibernate import CHECK, HEAP_MB, SETUP, _hibernate, _host_pids, _mounts_under, _python, _restore

pytestmark = pytest.mark.sandbox


@pytest.fixture(scope="module")
def runtime(loop):
    if shutil.which("runsc") is None:
        pytest.skip("gVisor (runsc) is not installed")
    root = Path(tempfile.mkdtemp(prefix="hutch-test-gvhib-", dir="/var/tmp"))
    root.chmod(0o755)
    store = ImageStore(root / "workspaces") if ImageStore.available() else DirectoryStore(root / "workspaces")
    slots = UidSlots(first_uid=2_000_000_000 + random.randrange(256) * 64 * RANGE, count=64)

    async def make():
        return make_runtime("gvisor", root, store, slots)

    runtime = loop.run(make())
    try:
        yield runtime
    finally:
        for instance in runtime.instances():
            loop.run(runtime.stop(instance.instance_id))
        loop.run(runtime.close(unstage=True))
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["template", "host"])
def boot(request, loop, runtime):
    """Starts instances of the test template, or of the host's view (no root file system)."""
    rootfs = request.getfixturevalue("template_store").rootfs(TEST_TEMPLATE) if request.param == "template" else None
    started: list[Sandbox] = []

    def make() -> Sandbox:
        spec = InstanceSpec(instance_id=f"g-{uuid.uuid4().hex[:10]}", backend="gvisor", rootfs=rootfs)
        sandbox = Sandbox(loop, runtime, loop.run(runtime.start(spec)))
        started.append(sandbox)
        return sandbox

    yield make
    for sandbox in started:
        sandbox.stop()


def test_memory_files_and_processes_survive_two_hibernations(boot, runtime):
    sandbox = boot()
    assert runtime.can_hibernate(sandbox.id)
    _python(sandbox, SETUP)
    sandbox.run("echo kept > ~/kept.txt")
    background = int(sandbox.run("sleep 100000 >/dev/null 2>&1 & echo $!").text.strip())
    assert sandbox.stats().memory_bytes > HEAP_MB << 20
    instance_dir = runtime.instances_dir / sandbox.id
    for _ in range(2):
        cgroup = Cgroup.from_dict(sandbox.instance.detail["cgroup"])
        hosts = _host_pids(runtime, sandbox) + cgroup.procs()
        image = _hibernate(sandbox)
        assert sandbox.instance.state == InstanceState.HIBERNATED
        # Nothing of it runs and nothing holds its memory: no process (sentry, gofer, stubs), no cgroup.
        assert [pid for pid in hosts if is_alive(pid)] == []
        assert _host_pids(runtime, sandbox) == []
        assert not any(d.exists() for d in cgroup.dirs.values())
        guard = image.path.parent.stat()  # the image holds its memory: root's alone
        assert (stat.S_IMODE(guard.st_mode), guard.st_uid) == (0o700, 0)
        assert image.path.is_relative_to(instance_dir)  # removed with it
        assert image.size_bytes > 0
        _restore(sandbox)
        assert sandbox.instance.state == InstanceState.RUNNING
        assert _python(sandbox, CHECK) == f"42 {HEAP_MB} 7 7"
        assert sandbox.run("cat ~/kept.txt").text.strip() == "kept"
        assert sandbox.run(f"tr '\\0' ' ' < /proc/{background}/cmdline").text.strip() == "sleep 100000"
        assert not image.path.parent.exists()  # a restored image is stale: removed
        # The run directory is sealed again, the agent's socket in it.
        run_dir = sandbox.instance.socket_path.parent.stat()
        assert (stat.S_IMODE(run_dir.st_mode), run_dir.st_uid) == (0o755, 0)
        assert stat.S_ISSOCK(sandbox.instance.socket_path.lstat().st_mode)
    hosts = _host_pids(runtime, sandbox)
    sandbox.stop()
    assert [pid for pid in hosts if is_alive(pid)] == []
    assert not instance_dir.exists()
    assert _mounts_under(instance_dir) == []


def test_a_tcp_socket_refuses_hibernation_and_the_instance_runs_on_frozen_or_not(boot, runtime, loop):
    """This runsc cannot save a TCP socket a process polls, and its failed checkpoint ends the
    sandbox: the agent refuses to let go of its socket instead."""
    sandbox = boot()
    _python(sandbox, "import socket\nserver = socket.create_server(('127.0.0.1', 0))\ny = 7")
    for frozen in (False, True):
        if frozen:
            loop.run(runtime.freeze(sandbox.id))
        loop.run(sandbox.channel.aclose())
        with pytest.raises(IsolationError, match="TCP socket"):
            loop.run(runtime.hibernate(sandbox.id))
        sandbox.channel = AgentChannel(sandbox.instance.socket_path)
        assert sandbox.instance.state == InstanceState.RUNNING
        assert runtime.frozen(sandbox.id) == frozen  # as it was
        assert not (runtime.instances_dir / sandbox.id / "hibernation").exists()
        if frozen:
            loop.run(runtime.thaw(sandbox.id))
        assert _python(sandbox, "print(y)") == "7"
    _python(sandbox, "server.close()")
    loop.run(runtime.freeze(sandbox.id))
    _hibernate(sandbox)  # frozen: thawed for the agent to let go of its socket
    _restore(sandbox)
    assert not runtime.frozen(sandbox.id)
    assert _python(sandbox, "print(y)") == "7"


def test_a_failed_restore_keeps_the_image_and_a_later_one_works(boot, runtime, loop):
    sandbox = boot()
    _python(sandbox, "z = 'still here'")
    image = _hibernate(sandbox)
    # A bundle runsc cannot read: the restore fails in runsc itself.
    config = runtime.instances_dir / sandbox.id / "config.json"
    saved = config.read_text()
    config.write_text(json.dumps({"ociVersion": "1.0.2", "process": "broken"}))
    with pytest.raises(IsolationError, match="stays hibernated"):
        loop.run(runtime.restore(sandbox.id))
    assert sandbox.instance.state == InstanceState.HIBERNATED
    assert (image.path / "checkpoint.img").exists()
    assert _host_pids(runtime, sandbox) == []
    assert sandbox.id not in runtime.cgroups.children()
    config.write_text(saved)
    _restore(sandbox)
    assert _python(sandbox, "print(z)") == "still here"


def test_a_hibernated_instance_stops_and_leaves_nothing(boot, runtime):
    sandbox = boot()
    _python(sandbox, SETUP)
    instance_dir = runtime.instances_dir / sandbox.id
    image = _hibernate(sandbox)
    assert image.path.is_dir()
    sandbox.stop()
    assert not runtime.has(sandbox.id)
    assert _host_pids(runtime, sandbox) == []
    assert sandbox.id not in runtime.cgroups.children()
    assert not instance_dir.exists()  # the image with it
    assert _mounts_under(instance_dir) == []


def test_a_restarted_hutch_adopts_a_hibernated_instance_and_restores_it(boot, runtime, loop):
    sandbox = boot()
    _python(sandbox, "w = 'kept while hutch is away'")
    image = _hibernate(sandbox)
    # A second runtime on the same data directory plays the restarted hutch.
    successor = loop.run(_new_runtime(runtime))
    try:
        adopted = loop.run(successor.adopt_running())
        assert sandbox.id in {i.instance_id for i in adopted}
        runtime._instances.pop(sandbox.id)  # the successor's now
        sandbox.runtime, sandbox.instance = successor, successor.get(sandbox.id)
        assert sandbox.instance.state == InstanceState.HIBERNATED
        assert (image.path / "checkpoint.img").exists()
        _restore(sandbox)
        assert _python(sandbox, "print(w)") == "kept while hutch is away"
        sandbox.stop()
    finally:
        loop.run(successor.close())


async def _new_runtime(runtime):
    return make_runtime("gvisor", runtime.data_dir, runtime.store, UidSlots(runtime.uid_slots.first_uid, 64))
