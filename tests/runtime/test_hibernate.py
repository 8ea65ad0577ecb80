"""Hibernation of template instances to disk with CRIU (bwrap backend): memory, processes and
files come back as they were, nothing of a hibernated instance runs or holds memory, and a
failed dump or restore loses nothing. Skipped where no usable CRIU is installed
(scripts/install-criu.sh builds one)."""

from __future__ import annotations

import os
import random
import shutil
import socket
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
from hutch.runtime.network import NETNS_DIR, Networking
from hutch.runtime.pages import PageCompression
from hutch.runtime.userns import RANGE, UidSlots
from hutch.storage.local import DirectoryStore, ImageStore
from tests.conftest import TEST_TEMPLATE
from tests.runtime.conftest import Sandbox
from tests.runtime.hostprocs import is_alive

pytestmark = pytest.mark.sandbox

HEAP_MB = 80
SETUP = f"x = 42\nheap = bytearray(b'\\x07') * ({HEAP_MB} << 20)"  # every page written: resident
CHECK = "print(x, len(heap) >> 20, heap[12345], heap[-1])"


@pytest.fixture(scope="module")
def runtime(loop):
    root = Path(tempfile.mkdtemp(prefix="hutch-test-hib-", dir="/var/tmp"))
    root.chmod(0o755)
    store = ImageStore(root / "workspaces") if ImageStore.available() else DirectoryStore(root / "workspaces")
    slots = UidSlots(first_uid=2_000_000_000 + random.randrange(256) * 64 * RANGE, count=64)

    async def make():
        return make_runtime("bwrap", root, store, slots)

    runtime = loop.run(make())
    try:
        if not runtime.can_hibernate():
            pytest.skip(f"no usable CRIU: {runtime.hibernation_off_reason}")
        yield runtime
    finally:
        for instance in runtime.instances():
            loop.run(runtime.stop(instance.instance_id))
        loop.run(runtime.close(unstage=True))
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def boot(loop, runtime, template_store):
    started: list[Sandbox] = []

    def make(network: dict | None = None) -> Sandbox:
        spec = InstanceSpec(
            instance_id=f"t-{uuid.uuid4().hex[:10]}",
            backend="bwrap",
            rootfs=template_store.rootfs(TEST_TEMPLATE),
            network=network,
        )
        sandbox = Sandbox(loop, runtime, loop.run(runtime.start(spec)))
        started.append(sandbox)
        return sandbox

    yield make
    for sandbox in started:
        sandbox.stop()


def _host_pids(runtime, sandbox: Sandbox) -> list[int]:
    """Every live host process running as one of the instance's uids (its slot's range)."""
    base = runtime.uid_slots.base(sandbox.instance.detail["slot"])
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                uid = os.stat(entry.path).st_uid
            except OSError:
                continue
            if base <= uid < base + RANGE and is_alive(entry.name):
                found.append(int(entry.name))
    return found


def _python(sandbox: Sandbox, code: str) -> str:
    lines = sandbox.loop.run(sandbox.channel.execute(code))
    errors = [line for line in lines if line.get("type") == "error"]
    assert not errors, errors
    return "".join(line.get("text", "") for line in lines if line.get("type") == "stdout").strip()


def _hibernate(sandbox: Sandbox):
    # hutch's own connections into the agent go first (CRIU cannot dump one end of them).
    sandbox.loop.run(sandbox.channel.aclose())
    return sandbox.loop.run(sandbox.runtime.hibernate(sandbox.id))


def _restore(sandbox: Sandbox) -> None:
    sandbox.loop.run(sandbox.runtime.restore(sandbox.id))
    sandbox.channel = AgentChannel(sandbox.instance.socket_path)


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(path))]


def test_memory_files_and_processes_survive_three_hibernations(boot, runtime):
    sandbox = boot()
    _python(sandbox, SETUP)
    sandbox.run("echo kept > /home/user/kept.txt")
    background = int(sandbox.run("sleep 100000 >/dev/null 2>&1 & echo $!").text.strip())
    assert sandbox.stats().memory_bytes > HEAP_MB << 20
    instance_dir = runtime.instances_dir / sandbox.id
    for _ in range(3):
        cgroup = Cgroup.from_dict(sandbox.instance.detail["cgroup"])
        assert _host_pids(runtime, sandbox)
        image = _hibernate(sandbox)
        assert sandbox.instance.state == InstanceState.HIBERNATED
        # Nothing of it runs and nothing holds its memory: no process, no cgroup.
        assert _host_pids(runtime, sandbox) == []
        assert not any(d.exists() for d in cgroup.dirs.values())
        assert 0 < image.size_bytes < HEAP_MB << 20  # its memory, compressed (below)
        guard = image.path.parent.stat()  # the images hold its memory: root's alone
        assert (stat.S_IMODE(guard.st_mode), guard.st_uid) == (0o700, 0)
        assert image.path.is_relative_to(runtime.instances_dir / sandbox.id)  # removed with it
        _restore(sandbox)
        assert sandbox.instance.state == InstanceState.RUNNING
        assert _python(sandbox, CHECK) == f"42 {HEAP_MB} 7 7"
        assert sandbox.run("cat /home/user/kept.txt").text.strip() == "kept"
        alive = sandbox.run(f"tr '\\0' ' ' < /proc/{background}/cmdline")
        assert alive.text.strip() == "sleep 100000"
        assert not image.path.parent.exists()  # a restored image is stale: removed
        assert sandbox.id not in sandbox.run("cat /proc/self/cgroup").text  # the host's paths stay hidden
    # It works on as usual, its root writable as before (new files and old ones alike).
    assert sandbox.run("echo more >> /home/user/kept.txt && touch /etc/new", user="root").exit_code == 0
    hosts = _host_pids(runtime, sandbox)
    cgroup = Cgroup.from_dict(sandbox.instance.detail["cgroup"])
    sandbox.stop()
    assert [pid for pid in hosts if is_alive(pid)] == []
    assert _host_pids(runtime, sandbox) == []
    assert not any(d.exists() for d in cgroup.dirs.values())
    assert not instance_dir.exists()
    assert _mounts_under(instance_dir) == []


FETCH = """
import socket
def fetch(port):
    with socket.create_connection(({internet!r}, port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
        return s.recv(12).decode()
"""


def test_an_instance_with_a_network_hibernates_and_comes_back_in_its_namespace(boot, runtime, internet):
    if runtime.networking is None:
        runtime.networking = Networking(runtime.default_layout())
    sandbox = boot(network={"internet": True})
    netns = NETNS_DIR / runtime.networking.layout.addresses(sandbox.instance.detail["slot"]).netns
    _python(sandbox, FETCH.format(internet=internet) + "w = 'kept'; print(fetch(8080))")
    address = sandbox.run("hostname -I").text.strip()
    # A connection open to the outside while it hibernates is closed on the way (its peer sees
    # it end; ZMQ-like clients reconnect).
    _python(sandbox, f"held = socket.create_connection(({internet!r}, 8081))")
    for _ in range(2):
        _hibernate(sandbox)
        assert _host_pids(runtime, sandbox) == []
        assert netns.exists()  # its namespace, veth and rules wait for it
        _restore(sandbox)
        assert _python(sandbox, "print(w, fetch(8080), fetch(8081))") == "kept HTTP/1.0 200 HTTP/1.0 200"
        assert sandbox.run("hostname -I").text.strip() == address
        assert sandbox.run("cat /etc/resolv.conf").text.startswith("nameserver ")
    sandbox.stop()
    assert not netns.exists()


def test_a_failed_dump_leaves_the_instance_running_frozen_or_not(boot, runtime, loop):
    sandbox = boot()
    _python(sandbox, "y = 7")
    # A connection from the host the agent holds: CRIU cannot dump its other end, a real failure.
    held = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    held.connect(str(sandbox.instance.socket_path))
    try:
        with pytest.raises(IsolationError, match="failed \\(it runs on\\)"):
            loop.run(runtime.hibernate(sandbox.id))
        assert sandbox.instance.state == InstanceState.RUNNING
        assert not (runtime.instances_dir / sandbox.id / "hibernation").exists()
        assert _python(sandbox, "print(y)") == "7"
        loop.run(runtime.freeze(sandbox.id))
        with pytest.raises(IsolationError, match="failed \\(it runs on\\)"):
            loop.run(runtime.hibernate(sandbox.id))
        assert runtime.frozen(sandbox.id)  # as it was
        loop.run(runtime.thaw(sandbox.id))
        assert _python(sandbox, "print(y)") == "7"
    finally:
        held.close()
    # Frozen and idle, hutch's connections closed after the freeze (the agent could not close
    # its ends): it hibernates all the same, and comes back running.
    loop.run(runtime.freeze(sandbox.id))
    _hibernate(sandbox)
    _restore(sandbox)
    assert not runtime.frozen(sandbox.id)
    assert _python(sandbox, "print(y)") == "7"


def test_a_hibernated_instance_stops_and_leaves_nothing(boot, runtime):
    sandbox = boot()
    _python(sandbox, SETUP)
    instance_dir = runtime.instances_dir / sandbox.id
    image = _hibernate(sandbox)
    assert image.path.is_dir()
    sandbox.stop()
    assert not runtime.has(sandbox.id)
    assert _host_pids(runtime, sandbox) == []
    assert not instance_dir.exists()  # the image with it
    assert _mounts_under(instance_dir) == []


def test_a_failed_restore_keeps_the_image_and_a_later_one_works(boot, runtime, loop):
    sandbox = boot()
    _python(sandbox, "z = 'still here'")
    # A process holding a file of its workspace open: deleted while hibernated, the restore
    # cannot open it again.
    sandbox.run("echo held > /home/user/held.txt; sleep 100000 < /home/user/held.txt >/dev/null 2>&1 &")
    image = _hibernate(sandbox)
    held = sandbox.instance.workspace_path / "upper" / "home" / "user" / "held.txt"
    moved = held.with_name("held.moved")
    held.rename(moved)
    with pytest.raises(IsolationError, match="stays hibernated"):
        loop.run(runtime.restore(sandbox.id))
    assert sandbox.instance.state == InstanceState.HIBERNATED
    assert (image.path / "inventory.img").exists()
    # The pages CRIU read stay compressed on disk only: no expanded copy is left beside them.
    assert list(image.path.glob("pages-*.img.zst")) and not list(image.path.glob("pages-*.img"))
    assert _host_pids(runtime, sandbox) == []
    moved.rename(held)
    _restore(sandbox)
    assert _python(sandbox, "print(z)") == "still here"


def test_page_images_are_compressed_and_either_kind_restores(boot, runtime):
    sandbox = boot()
    _python(sandbox, SETUP)
    # Written uncompressed (the setting off), restored with it on: both kinds restore.
    kept = runtime.pages
    runtime.pages = PageCompression("none")
    try:
        plain = _hibernate(sandbox)
    finally:
        runtime.pages = kept
    assert plain.size_bytes > HEAP_MB << 20 and not list(plain.path.glob("pages-*.img.zst"))
    _restore(sandbox)
    assert _python(sandbox, CHECK) == f"42 {HEAP_MB} 7 7"
    image = _hibernate(sandbox)
    packed = list(image.path.glob("pages-*.img.zst"))
    assert packed and not list(image.path.glob("pages-*.img"))
    assert image.size_bytes == sum(entry.stat().st_size for entry in image.path.iterdir())
    # The kernel's own memory 4-5x smaller, the heap (one byte repeated) next to nothing.
    assert image.size_bytes < plain.size_bytes / 4
    assert all(stat.S_IMODE(each.stat().st_mode) == 0o644 for each in packed)  # as CRIU's own
    _restore(sandbox)
    assert _python(sandbox, CHECK) == f"42 {HEAP_MB} 7 7"


def test_a_corrupt_page_image_fails_the_restore_and_leaves_nothing_running(boot, runtime, loop):
    sandbox = boot()
    _python(sandbox, SETUP)
    instance_dir = runtime.instances_dir / sandbox.id
    image = _hibernate(sandbox)
    packed = max(image.path.glob("pages-*.img.zst"), key=lambda each: each.stat().st_size)
    data = bytearray(packed.read_bytes())
    data[len(data) // 2] ^= 0xFF
    packed.write_bytes(bytes(data))
    mounts = _mounts_under(instance_dir)  # its layers', kept while it hibernates
    for _ in range(2):  # and again: nothing of the first try is in the way
        with pytest.raises(IsolationError, match="cannot be read"):
            loop.run(runtime.restore(sandbox.id))
        assert sandbox.instance.state == InstanceState.HIBERNATED
        assert _host_pids(runtime, sandbox) == []
        assert sandbox.id not in runtime.cgroups.children()
        assert _mounts_under(instance_dir) == mounts
        assert not list(image.path.glob("pages-*.img"))
    sandbox.stop()
    assert not instance_dir.exists()


def test_the_keepers_cleanup_keeps_a_hibernated_instance_for_the_next_hutch(boot, runtime):
    """With no hutch serving (live restore), the keeper removes dead instances but keeps the
    live ones: a hibernated one counts as live, image and all."""
    from hutch.runtime.cleanup import clean_host

    sandbox = boot()
    _python(sandbox, "w = 'kept while hutch is away'")
    image = _hibernate(sandbox)
    removed = clean_host(runtime.data_dir, keep_live=True)
    assert not any(sandbox.id in phrase for phrase in removed)
    assert (image.path / "inventory.img").exists()
    _restore(sandbox)
    assert _python(sandbox, "print(w)") == "kept while hutch is away"
