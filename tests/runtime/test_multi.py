"""Backends chosen by name: the registry, a function's `runtime` field, and `MultiRuntime` holding
a bwrap and a gVisor instance side by side on one data directory."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from hutch.functions import FunctionSpec
from hutch.runtime import BACKENDS, make_runtime
from hutch.runtime.base import InstanceSpec, Resources
from hutch.runtime.channel import AgentChannel
from hutch.runtime.multi import MultiRuntime
from hutch.runtime.userns import UidSlots
from hutch.storage.base import is_mount_point
from hutch.storage.local import DirectoryStore, ImageStore


def test_a_function_names_its_backend_and_unknown_names_are_refused(tmp_path):
    assert FunctionSpec(name="strong", runtime="gvisor").runtime == "gvisor"
    assert FunctionSpec(name="plain").runtime == "bwrap"
    with pytest.raises(ValidationError, match="unknown runtime 'firecracker'"):
        FunctionSpec(name="vm", runtime="firecracker")
    with pytest.raises(ValueError, match="available: bwrap, gvisor"):
        make_runtime("firecracker", tmp_path, DirectoryStore(tmp_path / "workspaces"))
    assert set(BACKENDS) == {"bwrap", "gvisor", "kubernetes"}


@pytest.mark.sandbox
def test_one_multi_runtime_runs_both_backends_and_a_successor_adopts_both(loop):
    if os.geteuid() != 0:
        pytest.skip("sandboxes need root")
    if shutil.which("runsc") is None:
        pytest.skip("gVisor (runsc) is not installed")
    data_dir = Path(tempfile.mkdtemp(prefix="hutch-multi-", dir="/var/tmp"))
    data_dir.chmod(0o755)
    store = DirectoryStore(data_dir / "workspaces")
    slots = UidSlots(first_uid=3_500_000_000, count=16)
    multi = MultiRuntime(data_dir, store, slots)
    successor = None
    try:
        assert set(multi.runtimes) == {"bwrap"}  # gVisor's runtime is made on first use
        started = {}
        for backend in ("bwrap", "gvisor"):
            spec = InstanceSpec(f"m-{uuid.uuid4().hex[:8]}", backend=backend, resources=Resources(disk_mb=0))
            started[backend] = loop.run(multi.start(spec))
        assert set(multi.runtimes) == {"bwrap", "gvisor"}
        assert started["bwrap"].host_uid != started["gvisor"].host_uid  # the uid slots are shared
        for backend, instance in started.items():
            assert instance.backend == backend
            assert multi.get(instance.instance_id) is instance and multi.is_running(instance.instance_id)

        async def uname(instance) -> str:
            async with AgentChannel(instance.socket_path) as channel:
                return (await channel.run("uname -r")).text.strip()

        kernels = {backend: loop.run(uname(instance)) for backend, instance in started.items()}
        assert kernels["bwrap"] == os.uname().release
        assert kernels["gvisor"] != os.uname().release  # gVisor's own kernel answers

        async def restart() -> MultiRuntime:
            await multi.close()
            return MultiRuntime(data_dir, store, UidSlots(first_uid=3_500_000_000, count=16))

        successor = loop.run(restart())
        adopted = loop.run(successor.adopt_running())
        assert {i.instance_id: i.backend for i in adopted} == {i.instance_id: b for b, i in started.items()}
        for instance in started.values():
            loop.run(successor.stop(instance.instance_id))
        assert successor.instances() == []
        assert not any((data_dir / "instances").iterdir())
    finally:
        for runtime in (successor, multi):
            if runtime is None:
                continue
            for instance in runtime.instances():
                loop.run(runtime.stop(instance.instance_id))
        for runtime in (successor or multi).runtimes.values():
            loop.run(runtime.close(unstage=True))
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.mark.sandbox
def test_a_successor_adopting_both_backends_unmounts_no_live_workspace(loop):
    """Each backend's sweep after a restart must count the other backend's instances as live: the
    store is shared, and unmounting a running instance's workspace image from under it would let
    the image be mounted a second time later."""
    if os.geteuid() != 0:
        pytest.skip("sandboxes need root")
    if shutil.which("runsc") is None or not ImageStore.available():
        pytest.skip("needs gVisor (runsc) and loop devices")
    data_dir = Path(tempfile.mkdtemp(prefix="hutch-multi-", dir="/var/tmp"))
    data_dir.chmod(0o755)
    store = ImageStore(data_dir / "workspaces")
    first_uid = 3_520_000_000
    multi = MultiRuntime(data_dir, store, UidSlots(first_uid=first_uid, count=16))
    successor = None
    try:
        started = [
            loop.run(multi.start(InstanceSpec(f"m-{uuid.uuid4().hex[:8]}", backend=backend)))
            for backend in ("bwrap", "gvisor")
        ]
        assert all(is_mount_point(instance.workspace_path) for instance in started)

        async def restart() -> MultiRuntime:
            await multi.close()
            return MultiRuntime(data_dir, store, UidSlots(first_uid=first_uid, count=16))

        successor = loop.run(restart())
        adopted = loop.run(successor.adopt_running())
        assert len(adopted) == 2
        assert [is_mount_point(instance.workspace_path) for instance in started] == [True, True]
        assert loop.run(asyncio.to_thread(successor.sweep_orphans, {i.instance_id for i in started})) == []
    finally:
        for runtime in (successor, multi):
            if runtime is not None:
                for instance in runtime.instances():
                    loop.run(runtime.stop(instance.instance_id))
        for runtime in (successor or multi).runtimes.values():
            loop.run(runtime.close(unstage=True))
        shutil.rmtree(data_dir, ignore_errors=True)
