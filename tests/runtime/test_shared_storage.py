"""The shared store as two nodes use it: one JuiceFS volume mounted twice (tests/sharedfs.py),
a `SharedStore` with its own node id on each mount, and real sandboxes that move from one node to
the other."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from hutch.config import ServerConfig
from hutch.errors import BackendUnavailable
from hutch.runtime import make_runtime
from hutch.runtime.base import InstanceSpec, InstanceState, Resources
from hutch.runtime.userns import RANGE, UidSlots
from hutch.server import Hutch
from hutch.storage.shared import JuiceFSMount, SharedStore
from tests.runtime.conftest import Sandbox

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="FUSE mounts and chown to sandbox uids: root only")

OWNER = 1_000_001_000
# Sandbox uids of their own (the other tests': 1.0e9, 1.5e9-2.07e9, 2.0e9-3.1e9, 3.5e9 and up),
# below 2^31: JuiceFS on PostgreSQL keeps uids in a signed 32-bit column.
FIRST_UID = 1_400_000_000


@pytest.fixture
def nodes(shared_volume):
    """Node A's and node B's stores over the same directory of the volume."""
    name = f"nodes-{uuid.uuid4().hex[:8]}"
    a = SharedStore(shared_volume.a.mount_point / name, "node-a", shared_volume.a)
    b = SharedStore(shared_volume.b.mount_point / name, "node-b", shared_volume.b)
    yield a, b
    shutil.rmtree(a.root, ignore_errors=True)


def test_a_workspace_written_on_one_node_is_read_on_the_other(nodes):
    a, b = nodes
    path = a.attach("t1/s1", OWNER, 32)
    (path / "notes.txt").write_text("written on A")
    a.detach("t1/s1", path)
    again = b.attach("t1/s1", OWNER + 1, 32)
    assert again != path and (again / "notes.txt").read_text() == "written on A"
    assert (again / "notes.txt").stat().st_uid == OWNER + 1
    assert a.owner_uid("t1/s1") == OWNER + 1


def test_sweep_deletes_only_this_nodes_unclaimed_workspaces(nodes):
    a, b = nodes
    for store, key in ((a, "_instances/i1"), (a, "_instances/i2"), (b, "_instances/i1"), (a, "t2/session")):
        store.detach(key, store.attach(key, OWNER, 32))
    assert a._path("_instances/i1") != b._path("_instances/i1")  # same instance id, two nodes

    removed = a.sweep(attached=set(), claimed_keys={"_instances/i2"})

    assert removed == ["workspace _instances/i1"]
    assert not a.exists("_instances/i1") and a.exists("_instances/i2")
    assert b.exists("_instances/i1"), "node A swept node B's unclaimed workspace"
    assert a.exists("t2/session") and b.exists("t2/session")
    assert b.sweep(attached={str(b._path("_instances/i1"))}, claimed_keys=set()) == []


def test_a_bind_of_a_workspace_follows_it_through_the_claim(nodes, tmp_path):
    a, b = nodes
    path = a.attach("_instances/i3", OWNER, 32)
    bind = tmp_path / "home"
    bind.mkdir()
    subprocess.run(["mount", "--bind", str(path), str(bind)], check=True)
    try:
        moved = a.rename("_instances/i3", "t3/claimed", path)
        (bind / "after-claim.txt").write_text("through the bind")
        assert moved == a.root / "t3/claimed"
        assert (b.root / "t3/claimed/after-claim.txt").read_text() == "through the bind"
    finally:
        subprocess.run(["umount", str(bind)], check=True)


def test_a_quota_set_by_one_node_stops_writes_on_the_other(nodes):
    a, b = nodes
    a.attach("t4/q", OWNER, 8)
    path = b.attach("t4/q", OWNER, 8)  # exists: B neither makes it nor sets a quota again
    # JuiceFS clients load quotas at their heartbeat (1 s in tests/sharedfs.py).
    deadline = time.monotonic() + 30
    while os.statvfs(path).f_blocks * os.statvfs(path).f_frsize != 8 << 20:
        assert time.monotonic() < deadline, "node B never learned the quota"
        time.sleep(0.2)
    written = 0
    with pytest.raises(OSError) as failed, open(path / "fill", "wb") as f:
        for _ in range(32):
            f.write(os.urandom(1 << 20))
            f.flush()
            os.fsync(f.fileno())
            written += 1 << 20
    assert failed.value.errno == errno.EDQUOT
    assert written <= 8 << 20
    assert b.usage_bytes("t4/q", path) <= 8 << 20


def test_a_dead_client_is_reported_and_mounted_again_by_the_next_attach(shared_volume):
    mount = shared_volume.mount(f"c-{uuid.uuid4().hex[:6]}")
    store = SharedStore(mount.mount_point / "dead-client", "node-c", mount)
    path = store.attach("t6/s", OWNER, 32)
    (path / "kept").write_text("still here")
    assert not store.failed(path)
    shared_volume.kill_client(mount)
    deadline = time.monotonic() + 10
    while not store.failed(path):  # once the kernel's attribute cache (1 s) runs out
        assert time.monotonic() < deadline, "the dead mount was not reported"
        time.sleep(0.1)
    assert not mount.healthy()
    again = store.attach("t6/s", OWNER, 32)
    assert mount.healthy() and (again / "kept").read_text() == "still here"
    store.delete("t6/s")


def _runtime(loop, store: SharedStore, first_uid: int):
    data_dir = Path(tempfile.mkdtemp(prefix="hutch-node-", dir="/var/tmp"))
    data_dir.chmod(0o755)

    async def make():
        return make_runtime("bwrap", data_dir, store, UidSlots(first_uid=first_uid, count=4))

    return loop.run(make())


def _close(loop, runtime) -> None:
    for instance in runtime.instances():
        loop.run(runtime.stop(instance.instance_id, keep_workspace=True))
    loop.run(runtime.close(unstage=True))
    shutil.rmtree(runtime.data_dir, ignore_errors=True)


def _start(loop, runtime, workspace: str | None) -> Sandbox:
    spec = InstanceSpec(
        instance_id=f"t-{uuid.uuid4().hex[:10]}", resources=Resources(), backend="bwrap", workspace=workspace
    )
    return Sandbox(loop, runtime, loop.run(runtime.start(spec)))


SEES = """
import json, os
mounts = [line.split() for line in open("/proc/self/mountinfo")]
fuse = [(m[4], m[3]) for m in mounts if m[m.index("-") + 1].startswith("fuse")]
print(json.dumps({"fuse": fuse, "home": sorted(os.listdir("/home")), "other": os.path.exists(%r)}))
"""


def test_a_session_moves_to_another_node_with_its_files(nodes, loop):
    a, b = nodes
    runtime_a = _runtime(loop, a, FIRST_UID)
    runtime_b = _runtime(loop, b, FIRST_UID + 4 * RANGE)  # other uids: B must chown the tree
    try:
        # A warm instance on node A, with a fresh workspace, claimed by a session while it runs.
        first = _start(loop, runtime_a, None)
        assert first.run("echo before > ~/before.txt && head -c 4096 /dev/urandom > ~/blob").exit_code == 0
        loop.run(runtime_a.claim_workspace(first.id, "t5/session"))
        assert runtime_a.get(first.id).workspace_path == a.root / "t5/session"
        assert first.run("echo after > ~/after.txt").exit_code == 0
        assert (b.root / "t5/session/after.txt").read_text() == "after\n"

        # It sees its own workspace only: not the volume, not another session's.
        other = b.attach("t5/other", OWNER, 32)
        (other / "secret").write_text("not yours")
        result = first.python(SEES % str(other / "secret"))
        seen = json.loads(result.stdout)
        mount_root = "/" + str((a.root / "t5/session").relative_to(a.juicefs.mount_point))
        assert seen == {"fuse": [["/home/user", mount_root]], "home": ["user"], "other": False}

        # Node A dies under it: the session's next instance starts on node B.
        os.kill(runtime_a.get(first.id).pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while runtime_a.get(first.id).state != InstanceState.CRASHED:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        second = _start(loop, runtime_b, "t5/session")
        result = second.run("cat ~/before.txt ~/after.txt && stat -c %u ~/blob && wc -c < ~/blob")
        assert result.stdout.split() == [b"before", b"after", b"1000", b"4096"]
        assert (b.root / "t5/session/blob").stat().st_uid == runtime_b.uid_slots.sandbox_uid(0)
        assert second.run("echo on-b > ~/b.txt").exit_code == 0
        assert (a.root / "t5/session/b.txt").read_text() == "on-b\n"
        second.stop()
        assert not b.exists("t5/session")
    finally:
        _close(loop, runtime_a)
        _close(loop, runtime_b)


def test_hutch_serve_reuses_the_mount_it_finds_and_refuses_bad_settings(shared_volume, tmp_path):
    mount = shared_volume.a.mount_point
    config = ServerConfig.model_validate(
        {
            "data_dir": tmp_path,
            "workspace_store": "shared",
            "shared_storage": {"path": mount, "juicefs_meta_url": shared_volume.meta_url, "node_id": "n1"},
        }
    )
    store = Hutch(config)._store("local-1234")
    assert (store.root, store.node_id, store.juicefs.healthy()) == (mount / "workspaces", "n1", True)
    settings = config.shared_storage.model_copy(update={"path": tmp_path, "juicefs_meta_url": "", "node_id": ""})
    operator = Hutch(config.model_copy(update={"shared_storage": settings}))._store("local-1234")
    assert operator.juicefs is None and operator.node_id.endswith("-local-1234")

    with pytest.raises(ValidationError, match=r"needs \[shared_storage\] path"):
        ServerConfig.model_validate({"workspace_store": "shared"})
    with pytest.raises(ValidationError, match="node_id"):
        ServerConfig.model_validate({"shared_storage": {"node_id": "../x"}})
    with pytest.raises(BackendUnavailable, match="does not exist"):
        SharedStore(tmp_path / "not-mounted" / "workspaces", "n1")
    unreachable = JuiceFSMount(
        "postgres://postgres@127.0.0.1:1/none?sslmode=disable", tmp_path / "m", tmp_path / "c", tmp_path / "log"
    )
    with pytest.raises(BackendUnavailable, match=r"cannot mount JuiceFS volume .*connection refused"):
        unreachable.mount()
