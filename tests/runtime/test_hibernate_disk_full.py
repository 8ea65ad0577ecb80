"""The disk fills up while an instance hibernates: CRIU's dump fails for want of space, and the
instance goes on as it was (running, or frozen if it was), its memory intact, its partial image
gone; once there is room again it hibernates and comes back. The instances' directory (where
images are written) is a small tmpfs the test mounts, far smaller than the instance's memory.
Skipped where no usable CRIU is installed (scripts/install-criu.sh)."""

from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from hutch.errors import IsolationError
from hutch.runtime import make_runtime
from hutch.runtime.base import InstanceSpec, InstanceState
from hutch.runtime.channel import AgentChannel
from hutch.runtime.userns import RANGE, UidSlots
from hutch.storage.local import DirectoryStore
from tests.conftest import TEST_TEMPLATE
from tests.runtime.conftest import Sandbox
from tests.runtime.test_hibernate import CHECK, HEAP_MB, SETUP, _hibernate, _python, _restore

pytestmark = pytest.mark.sandbox

SMALL_MB = 48  # an image of the instance needs more than twice this


@pytest.fixture(scope="module")
def small(loop):
    """A runtime whose instances' directory is a SMALL_MB tmpfs; yields (runtime, its mount)."""
    root = Path(tempfile.mkdtemp(prefix="hutch-test-hibfull-", dir="/var/tmp"))
    root.chmod(0o755)
    instances = root / "instances"
    instances.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_MB}m,mode=0711", "tmpfs", str(instances)], check=True)
    slots = UidSlots(first_uid=2_000_000_000 + random.randrange(256) * 64 * RANGE, count=8)
    runtime = loop.run(_make(root, slots))
    try:
        if not runtime.can_hibernate():
            pytest.skip(f"no usable CRIU: {runtime.hibernation_off_reason}")
        yield runtime, instances
    finally:
        for instance in runtime.instances():
            loop.run(runtime.stop(instance.instance_id))
        loop.run(runtime.close(unstage=True))
        if subprocess.run(["umount", str(instances)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(instances)], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


async def _make(root: Path, slots: UidSlots):
    return make_runtime("bwrap", root, DirectoryStore(root / "workspaces"), slots)


def _resize(mount: Path, mb: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={mb}m", str(mount)], check=True)


@pytest.mark.parametrize("frozen", [False, True], ids=["running", "frozen"])
def test_a_dump_that_fills_the_disk_leaves_the_instance_as_it_was(loop, small, template_store, frozen):
    runtime, mount = small
    _resize(mount, SMALL_MB)
    spec = InstanceSpec(
        instance_id=f"t-{uuid.uuid4().hex[:10]}", backend="bwrap", rootfs=template_store.rootfs(TEST_TEMPLATE)
    )
    sandbox = Sandbox(loop, runtime, loop.run(runtime.start(spec)))
    try:
        _python(sandbox, SETUP)
        if frozen:
            loop.run(runtime.freeze(sandbox.id))
        with pytest.raises(IsolationError, match="runs on") as failed:
            _hibernate(sandbox)
        assert "space" in str(failed.value).lower(), failed.value
        sandbox.channel = AgentChannel(sandbox.instance.socket_path)  # `_hibernate` closed ours
        assert sandbox.instance.state == InstanceState.RUNNING
        images = runtime.instances_dir / sandbox.id / "hibernation"
        assert not images.exists()  # the partial image is gone: the disk has its room back
        if frozen:
            assert runtime.frozen(sandbox.id)
            loop.run(runtime.thaw(sandbox.id))
        assert _python(sandbox, CHECK) == f"42 {HEAP_MB} 7 7"

        _resize(mount, 1024)  # room again: the same instance hibernates and comes back
        _hibernate(sandbox)
        assert sandbox.instance.state == InstanceState.HIBERNATED
        _restore(sandbox)
        assert _python(sandbox, CHECK) == f"42 {HEAP_MB} 7 7"
    finally:
        sandbox.stop()
