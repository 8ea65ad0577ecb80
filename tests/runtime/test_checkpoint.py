"""Checkpoints of template instances (CRIU, bwrap backend) and new instances started from them:
each copy has the source's memory, processes and files at that moment and an identity of its own
(uid slot, cgroups, network, upper layer), and the checkpoint is only read. Skipped where no
usable CRIU is installed (scripts/install-criu.sh builds one); the userns codec's tests run
everywhere."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest

from hutch.errors import FailedPrecondition, IsolationError
from hutch.runtime import make_runtime
from hutch.runtime.base import InstanceSpec, InstanceState, RootFS
from hutch.runtime.cgroups import Cgroup
from hutch.runtime.channel import AgentChannel
from hutch.runtime.criu import Extent, decode_userns, encode_userns, rebase_userns
from hutch.runtime.network import NETNS_DIR, Networking
from hutch.runtime.userns import RANGE, UidSlots
from hutch.storage.local import DirectoryStore
from tests.conftest import TEST_TEMPLATE
from tests.runtime import test_hibernate
from tests.runtime.conftest import Sandbox
from tests.runtime.test_hibernate import (
    CHECK,
    FETCH,
    HEAP_MB,
    SETUP,
    _hibernate,
    _host_pids,
    _mounts_under,
    _python,
    _restore,
)

# A bwrap runtime that can hibernate, else the module skips.
runtime = test_hibernate.runtime

# -- the codec of CRIU's userns image (no CRIU needed) -------------------------------------------


def test_a_userns_image_round_trips_and_moves_to_another_slot():
    uid_map = [Extent(0, 2_000_000_000, RANGE)]
    gid_map = [Extent(0, 2_000_000_000, 1000), Extent(1000, 2_000_001_000, RANGE - 1000)]
    data = encode_userns(uid_map, gid_map)
    assert decode_userns(data) == (uid_map, gid_map)
    moved = rebase_userns(data, 2_000_000_000, 3_000_065_536, RANGE)
    assert decode_userns(moved) == (
        [Extent(0, 3_000_065_536, RANGE)],
        [Extent(0, 3_000_065_536, 1000), Extent(1000, 3_000_066_536, RANGE - 1000)],
    )


def test_a_userns_image_with_ids_outside_the_slot_or_malformed_is_refused():
    data = encode_userns([Extent(0, 0, 1)], [])  # host root: never moved to a slot
    with pytest.raises(ValueError, match="outside its slot"):
        rebase_userns(data, 2_000_000_000, 3_000_000_000, RANGE)
    with pytest.raises(ValueError):
        decode_userns(b"\x00" * 16)
    with pytest.raises(ValueError):
        decode_userns(data[:-1])


# -- checkpoints and copies --------------------------------------------------------------------


@pytest.fixture
def boot(loop, runtime, template_store):
    started: list[Sandbox] = []

    def make(network: dict | None = None, rootfs: RootFS | None = None) -> Sandbox:
        spec = InstanceSpec(
            instance_id=f"t-{uuid.uuid4().hex[:10]}",
            backend="bwrap",
            rootfs=rootfs or template_store.rootfs(TEST_TEMPLATE),
            network=network,
        )
        sandbox = Sandbox(loop, runtime, loop.run(runtime.start(spec)))
        started.append(sandbox)
        return sandbox

    def copies(rootfs: RootFS, count: int, network: dict | None = None) -> list[Sandbox]:
        """`count` instances started from `rootfs` at once."""
        specs = [
            InstanceSpec(instance_id=f"c-{uuid.uuid4().hex[:10]}", backend="bwrap", rootfs=rootfs, network=network)
            for _ in range(count)
        ]

        async def start_all() -> list:
            return await asyncio.gather(*(runtime.start(spec) for spec in specs), return_exceptions=True)

        results = loop.run(start_all())
        made = [Sandbox(loop, runtime, result) for result in results if not isinstance(result, BaseException)]
        started.extend(made)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return made

    make.copies = copies  # type: ignore[attr-defined]
    yield make
    for sandbox in started:
        sandbox.stop()


def _checkpoint(sandbox: Sandbox, into: Path) -> RootFS:
    """What the layer above does: freeze, the upper layer copied into a new top layer, the
    checkpoint, thaw; the root file system new instances start from."""
    loop, backend = sandbox.loop, sandbox.runtime
    loop.run(sandbox.channel.aclose())  # hutch's own connections into the agent go first
    loop.run(backend.freeze(sandbox.id))
    try:
        layer = into.parent.with_name(f"{into.parent.name}-layer")
        layer.mkdir(mode=0o755, parents=True)
        upper = sandbox.instance.workspace_path / "upper"
        subprocess.run(["cp", "-a", f"{upper}/.", f"{layer}/"], check=True)
        image = loop.run(backend.checkpoint(sandbox.id, into))
        assert backend.frozen(sandbox.id)  # as it was
    finally:
        loop.run(backend.thaw(sandbox.id))
        sandbox.channel = AgentChannel(sandbox.instance.socket_path)
    rootfs = sandbox.instance.spec.rootfs
    assert rootfs is not None
    return dataclasses.replace(rootfs, layer_paths=(*rootfs.layer_paths, str(layer)), memory_image=str(image.path))


def _digest(directory: Path) -> dict[str, tuple[str, int, int, int]]:
    """Each file's content hash, mode, owner and modification time."""
    found = {}
    for entry in sorted(directory.iterdir()):
        st = entry.stat()
        found[entry.name] = (hashlib.sha256(entry.read_bytes()).hexdigest(), st.st_mode, st.st_uid, st.st_mtime_ns)
    return found


def _uids(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(part) for part in line.split()[1:]]
    raise AssertionError(f"no Uid line for {pid}")


def _leftovers(runtime, sandboxes: list[Sandbox], netns: list[Path] = ()) -> list[str]:
    """What stopped instances left on the host: processes, cgroups, mounts, namespaces, dirs."""
    left = []
    for sandbox in sandboxes:
        left += [f"process {pid}" for pid in _host_pids(runtime, sandbox)]
        cgroup = Cgroup.from_dict(sandbox.instance.detail["cgroup"])
        left += [f"cgroup {d}" for d in cgroup.dirs.values() if d.exists()]
        instance_dir = runtime.instances_dir / sandbox.id
        left += [f"mount {m}" for m in _mounts_under(instance_dir)]
        left += [f"directory {instance_dir}"] if instance_dir.exists() else []
    left += [f"netns {path}" for path in netns if path.exists()]
    return left


def test_copies_start_with_the_sources_memory_processes_and_files_each_its_own(boot, runtime, tmp_path):
    source = boot()
    _python(source, SETUP)
    source.run("echo kept > /home/user/kept.txt")
    background = int(source.run("sleep 100000 >/dev/null 2>&1 & echo $!").text.strip())
    into = tmp_path / "checkpoints" / "one" / "image"
    rootfs = _checkpoint(source, into)
    guard = into.parent.stat()  # the image holds the session's memory: root's alone
    assert (stat.S_IMODE(guard.st_mode), guard.st_uid) == (0o700, 0)
    assert runtime.get(source.id).state == InstanceState.RUNNING and not runtime.frozen(source.id)
    before = _digest(into)

    copies = boot.copies(rootfs, 2)
    for copy in copies:
        assert _python(copy, CHECK) == f"42 {HEAP_MB} 7 7"
        assert copy.run("cat /home/user/kept.txt").text.strip() == "kept"
        alive = copy.run(f"tr '\\0' ' ' < /proc/{background}/cmdline")
        assert alive.text.strip() == "sleep 100000"
        # Its processes run as its own slot's host uids, none as the source's.
        base = runtime.uid_slots.base(copy.instance.detail["slot"])
        pids = _host_pids(runtime, copy)
        assert len(pids) >= 3  # the agent, the kernel, the sleeper
        for pid in pids:
            assert all(base <= uid < base + RANGE for uid in _uids(pid)), (pid, _uids(pid))
        assert copy.run("cat /proc/self/uid_map").text.split() == ["0", str(base), str(RANGE)]
        assert copy.id not in copy.run("cat /proc/self/cgroup").text  # its own cgroup namespace
    slots = {sandbox.instance.detail["slot"] for sandbox in (source, *copies)}
    assert len(slots) == 3
    assert _digest(into) == before  # only read

    # Each goes its own way: memory, files, writes through its own upper layer.
    for index, sandbox in enumerate((source, *copies)):
        _python(sandbox, f"x = {index}")
        sandbox.run(f"echo {index} > /home/user/own-{index}.txt", user="root")
    for index, sandbox in enumerate((source, *copies)):
        assert _python(sandbox, "print(x)") == str(index)
        listing = sandbox.run("ls /home/user").text.split()
        assert [name for name in listing if name.startswith("own-")] == [f"own-{index}.txt"]
    assert _python(copies[0], "print(len(heap) >> 20)") == str(HEAP_MB)

    # Stopped, none leaves anything behind; the checkpoint stays as it was.
    for sandbox in (*copies, source):
        sandbox.stop()
    assert _leftovers(runtime, [source, *copies]) == []
    assert _digest(into) == before


def test_a_checkpoint_of_a_frozen_instance_leaves_it_frozen(boot, runtime, loop, tmp_path):
    sandbox = boot()
    _python(sandbox, "y = 'frozen'")
    loop.run(sandbox.channel.aclose())
    loop.run(runtime.freeze(sandbox.id))
    image = loop.run(runtime.checkpoint(sandbox.id, tmp_path / "c" / "image"))
    assert runtime.frozen(sandbox.id)
    assert (image.path / "inventory.img").is_file() and image.size_bytes > 0
    with pytest.raises(Exception, match="exists"):
        loop.run(runtime.checkpoint(sandbox.id, tmp_path / "c" / "image"))
    loop.run(runtime.thaw(sandbox.id))
    sandbox.channel = AgentChannel(sandbox.instance.socket_path)
    assert _python(sandbox, "print(y)") == "frozen"


def test_networked_copies_each_get_their_own_address(boot, runtime, internet, tmp_path):
    if runtime.networking is None:
        runtime.networking = Networking(runtime.default_layout())
    source = boot(network={"internet": True})
    _python(source, FETCH.format(internet=internet) + "w = 'kept'; print(fetch(8080))")
    rootfs = _checkpoint(source, tmp_path / "net" / "image")
    # Its tree had the network namespace hutch made: never restored without one (the host's).
    with pytest.raises(FailedPrecondition, match="with a network"):
        boot.copies(rootfs, 1)
    copies = boot.copies(rootfs, 2, network={"internet": True})
    addresses = {source.run("hostname -I").text.strip()}
    for copy in copies:
        assert _python(copy, "print(w, fetch(8080))") == "kept HTTP/1.0 200"
        addresses.add(copy.run("hostname -I").text.strip())
        assert copy.run("cat /etc/resolv.conf").text.startswith("nameserver ")
    assert len(addresses) == 3
    namespaces = [NETNS_DIR / runtime.networking.layout.addresses(s.instance.detail["slot"]).netns for s in copies]
    assert all(path.exists() for path in namespaces)
    for sandbox in (*copies, source):
        sandbox.stop()
    assert _leftovers(runtime, [source, *copies], namespaces) == []


def test_a_copy_hibernates_comes_back_and_has_copies_of_its_own(boot, runtime, tmp_path):
    source = boot()
    _python(source, "z = 'from the source'")
    rootfs = _checkpoint(source, tmp_path / "h" / "image")
    (copy,) = boot.copies(rootfs, 1)
    _python(copy, "z += ', then the copy'")
    copy.run("echo mine > /home/user/mine.txt", user="root")
    for _ in range(2):
        _hibernate(copy)
        assert _host_pids(runtime, copy) == []
        _restore(copy)
        assert _python(copy, "print(z)") == "from the source, then the copy"
        assert copy.run("cat /home/user/mine.txt").text.strip() == "mine"
    assert copy.run("touch /etc/still-writable", user="root").exit_code == 0
    # A copy's checkpoint (its user namespace is root's, its map its own slot's) starts copies too.
    (grandchild,) = boot.copies(_checkpoint(copy, tmp_path / "h2" / "image"), 1)
    assert _python(grandchild, "print(z)") == "from the source, then the copy"
    assert grandchild.run("cat /home/user/mine.txt /etc/still-writable").text.strip() == "mine"
    for sandbox in (grandchild, copy):
        sandbox.stop()
    assert _leftovers(runtime, [copy, grandchild]) == []


def test_a_missing_or_corrupt_checkpoint_fails_the_start_and_leaves_nothing(
    boot,
    runtime,
    loop,
    tmp_path,
    template_store,
):
    source = boot()
    rootfs = _checkpoint(source, tmp_path / "bad" / "image")
    image = Path(rootfs.memory_image or "")
    before = set(runtime.instances_dir.iterdir())
    cgroups_before = set(runtime.cgroups.children())
    missing = dataclasses.replace(rootfs, memory_image=str(tmp_path / "nowhere"))
    with pytest.raises(FailedPrecondition, match="without a network"):
        boot.copies(rootfs, 1, network={"internet": False})
    for broken in ("missing", "corrupt"):
        if broken == "corrupt":
            pages = max(image.glob("pages-*.img*"), key=lambda path: path.stat().st_size)  # zstd or not
            pages.write_bytes(b"")  # the memory is gone
            target = rootfs
        else:
            target = missing
        spec = InstanceSpec(instance_id=f"c-{uuid.uuid4().hex[:10]}", backend="bwrap", rootfs=target)
        failed = "restore .* failed|cannot be read|cut short"  # CRIU's, or the compressed pages'
        with pytest.raises(IsolationError, match="holds no checkpoint" if broken == "missing" else failed):
            loop.run(runtime.start(spec))
        assert not runtime.has(spec.instance_id)
        assert set(runtime.instances_dir.iterdir()) == before
        assert set(runtime.cgroups.children()) == cgroups_before
        assert _mounts_under(runtime.instances_dir / spec.instance_id) == []
        assert len(runtime.uid_slots._used) == len(runtime.instances())
    assert _python(source, "print('the source runs on')") == "the source runs on"


def test_a_restarted_hutch_adopts_copies_as_any_instance(loop, template_store):
    """A copy runs as any template instance once started: a new hutch on the same data
    directory adopts it, and it stops leaving nothing."""
    root = Path(tempfile.mkdtemp(prefix="hutch-test-ckpt-", dir="/var/tmp"))
    root.chmod(0o755)
    store = DirectoryStore(root / "workspaces")
    slots = UidSlots(first_uid=2_000_000_000 + random.randrange(256) * 64 * RANGE, count=64)

    async def make():
        return make_runtime("bwrap", root, store, slots)

    runtimes = [loop.run(make())]
    try:
        if not runtimes[0].can_hibernate():
            pytest.skip(f"no usable CRIU: {runtimes[0].hibernation_off_reason}")
        spec = InstanceSpec(instance_id="a-source", backend="bwrap", rootfs=template_store.rootfs(TEST_TEMPLATE))
        source = Sandbox(loop, runtimes[0], loop.run(runtimes[0].start(spec)))
        _python(source, "x = 'adopted'")
        rootfs = _checkpoint(source, root / "checkpoint" / "image")
        spec = InstanceSpec(instance_id="a-copy", backend="bwrap", rootfs=rootfs)
        copy = Sandbox(loop, runtimes[0], loop.run(runtimes[0].start(spec)))
        for sandbox in (source, copy):
            loop.run(sandbox.channel.aclose())
        loop.run(runtimes[0].close())  # hutch goes; its instances run on
        runtimes.append(loop.run(make()))
        adopted = loop.run(runtimes[1].adopt_running())
        assert sorted(instance.instance_id for instance in adopted) == ["a-copy", "a-source"]
        copy = Sandbox(loop, runtimes[1], runtimes[1].get("a-copy"))
        assert copy.instance.state == InstanceState.RUNNING
        assert _python(copy, "print(x)") == "adopted"
        for instance_id in ("a-copy", "a-source"):
            loop.run(runtimes[1].stop(instance_id))
        assert _leftovers(runtimes[1], [copy]) == []
    finally:
        for runtime_ in runtimes:
            for instance in runtime_.instances():
                loop.run(runtime_.stop(instance.instance_id))
        loop.run(runtimes[-1].close(unstage=True))
        shutil.rmtree(root, ignore_errors=True)


COUNTER = (
    "import http.server, itertools\n"
    "count = itertools.count(1)\n"
    "class Counter(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        body = str(next(count)).encode()\n"
    "        self.send_response(200)\n"
    "        self.send_header('content-length', str(len(body)))\n"
    "        self.end_headers()\n"
    "        self.wfile.write(body)\n"
    "http.server.ThreadingHTTPServer(('127.0.0.1', 8080), Counter).serve_forever()\n"
)


def _get(sandbox: Sandbox, client: httpx.Client | None = None) -> str:
    """GET the sandbox's server on port 8080 through its agent (E2B's port header)."""
    if client is None:
        transport = httpx.HTTPTransport(uds=str(sandbox.instance.socket_path))
        with httpx.Client(transport=transport, base_url="http://sandbox", timeout=10) as fresh:
            return _get(sandbox, fresh)
    return client.get("/", headers={"E2b-Sandbox-Port": "8080"}).text


@pytest.mark.parametrize("restored", [False, True], ids=["booted", "restored"])
def test_a_checkpoint_leaves_the_sources_server_serving(boot, tmp_path, restored):
    """The source of a checkpoint runs on as it was: its server (reached through the agent, as
    a session's traffic is) answers after the checkpoint with its memory, and so do copies."""
    source = boot()
    source.run(f"python3 -c {shlex.quote(COUNTER)} >/dev/null 2>&1 &")
    deadline = time.monotonic() + 20
    while source.run("python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 8080))'").exit_code != 0:
        assert time.monotonic() < deadline, "the server never listened"
        time.sleep(0.2)
    assert _get(source) == "1"
    transport = httpx.HTTPTransport(uds=str(source.instance.socket_path))
    with httpx.Client(transport=transport, base_url="http://sandbox", timeout=10) as kept:
        assert _get(source, kept) == "2"  # a connection left open across the checkpoint: cut by it
    if restored:
        _hibernate(source)
        _restore(source)
    rootfs = _checkpoint(source, tmp_path / "checkpoints" / "served" / "image")
    assert _get(source) == "3"
    (copy,) = boot.copies(rootfs, 1)
    assert _get(copy) == "3"
    assert _get(source) == "4"
    _hibernate(source)  # and it hibernates and comes back as before
    _restore(source)
    assert _get(source) == "5"
