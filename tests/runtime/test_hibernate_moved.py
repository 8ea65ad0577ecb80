"""A hibernated instance's image on a shared store, taken over by another node (bwrap + CRIU):
two runtimes with data directories and uid slots of their own share one workspace store, as two
nodes of a cluster do. The one that takes the session over restores its memory, processes and
files in an instance of its own; the image is taken once (the other node can never restore it
again); nothing is left behind. Skipped where no usable CRIU is installed."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from hutch.errors import HutchError, IsolationError
from hutch.runtime import make_runtime
from hutch.runtime.base import InstanceSpec, InstanceState, moved_image
from hutch.runtime.userns import RANGE, UidSlots
from hutch.storage.shared import SharedStore
from tests.conftest import TEST_TEMPLATE
from tests.runtime.conftest import Sandbox
from tests.runtime.test_checkpoint import _leftovers
from tests.runtime.test_hibernate import CHECK, HEAP_MB, SETUP, _hibernate, _host_pids, _python, _restore

pytestmark = pytest.mark.sandbox

WORKSPACE = "tenant/moving-session"


@pytest.fixture
def nodes(loop):
    """make(i): a bwrap runtime as node i of a cluster (its own data directory and uid slots) on
    the store both share; stopped and removed at the end."""
    root = Path(tempfile.mkdtemp(prefix="hutch-test-moved-", dir="/var/tmp"))
    root.chmod(0o755)
    (root / "shared").mkdir()
    first = 2_000_000_000 + random.randrange(128) * 128 * RANGE
    made: list = []

    def make(node: int):
        store = SharedStore(root / "shared" / "workspaces", f"node-{node}")
        slots = UidSlots(first_uid=first + node * 64 * RANGE, count=64)

        async def start():
            return make_runtime("bwrap", root / f"node-{node}", store, slots)

        runtime = loop.run(start())
        made.append(runtime)
        if not runtime.can_hibernate():
            pytest.skip(f"no usable CRIU: {runtime.hibernation_off_reason}")
        return runtime

    yield make
    for runtime in made:
        for instance in runtime.instances():
            with contextlib.suppress(HutchError):  # a node that died: its instances are stopped by the next
                loop.run(runtime.stop(instance.instance_id, keep_workspace=True))
        loop.run(runtime.close(unstage=True))
    shutil.rmtree(root, ignore_errors=True)


def test_a_hibernated_session_moves_to_another_node_with_its_memory_once(loop, nodes, template_store):
    rootfs = template_store.rootfs(TEST_TEMPLATE)
    node_a = nodes(0)
    spec = InstanceSpec(instance_id="moving-a", backend="bwrap", rootfs=rootfs, workspace=WORKSPACE)
    source = Sandbox(loop, node_a, loop.run(node_a.start(spec)))
    _python(source, SETUP)
    source.run("echo kept > /home/user/kept.txt; echo root-file > /etc/moved", user="root")
    sleeper = int(source.run("sleep 100000 >/dev/null 2>&1 & echo $!").text.strip())
    a_uids = {node_a.uid_slots.base(source.instance.detail["slot"])}

    image = _hibernate(source)
    workspace = source.instance.workspace_path
    assert image.movable and image.path == workspace / "hibernation" / "moving-a" / "image"
    for guarded in (workspace, image.path.parent):  # the session's memory: root's alone
        assert (stat.S_IMODE(guarded.stat().st_mode), guarded.stat().st_uid) == (0o700, 0)
    loop.run(node_a.close())  # node A dies: its record says hibernated, its image is on the store

    node_b = nodes(1)
    moved_spec = InstanceSpec(
        instance_id="moving-b",
        backend="bwrap",
        rootfs=dataclasses.replace(rootfs, memory_image=moved_image("moving-a")),
        workspace=WORKSPACE,
    )
    moved = Sandbox(loop, node_b, loop.run(node_b.start(moved_spec)))
    assert _python(moved, CHECK) == f"42 {HEAP_MB} 7 7"
    assert moved.run("cat /home/user/kept.txt /etc/moved").text.split() == ["kept", "root-file"]
    assert moved.run(f"tr '\\0' ' ' < /proc/{sleeper}/cmdline").text.strip() == "sleep 100000"
    b_base = node_b.uid_slots.base(moved.instance.detail["slot"])
    assert b_base not in a_uids and _host_pids(node_b, moved), "its processes run in node B's own uids"
    assert not (workspace / "hibernation" / "moving-a").exists(), "the image was taken"
    assert list((workspace / "hibernation").iterdir()) == [], "and deleted once restored"

    # Taken once: another start from it fails and leaves nothing.
    again = dataclasses.replace(moved_spec, instance_id="moving-c")
    with pytest.raises(IsolationError, match="not there"):
        loop.run(node_b.start(again))
    assert not (node_b.instances_dir / "moving-c").exists()

    # Node A comes back: its hibernated instance cannot be restored (the image moved on), stays
    # hibernated, and stops without touching the session's files or node B's instance.
    node_a2 = nodes(0)
    adopted = {i.instance_id: i for i in loop.run(node_a2.adopt_running())}
    assert adopted["moving-a"].state == InstanceState.HIBERNATED
    with pytest.raises(IsolationError, match="no hibernation image"):
        loop.run(node_a2.restore("moving-a"))
    loop.run(node_a2.stop("moving-a", keep_workspace=True))
    _python(moved, "x += 1")
    assert _python(moved, CHECK) == f"43 {HEAP_MB} 7 7"

    # On node B the session hibernates and comes back again, its image on the store once more.
    image = _hibernate(moved)
    assert image.movable and image.path == workspace / "hibernation" / "moving-b" / "image"
    _restore(moved)
    assert _python(moved, CHECK) == f"43 {HEAP_MB} 7 7"
    moved.stop(keep_workspace=True)
    assert _leftovers(node_b, [moved]) == []
    assert list((workspace / "hibernation").iterdir()) == []
    assert (workspace / "upper" / "etc" / "moved").is_file(), "the session's files stay"
