"""Start, stop, crash, re-adoption and port forwarding of real instances."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from pathlib import Path

import httpx
import pytest

from hutch.runtime import make_runtime
from hutch.runtime.base import InstanceSpec, InstanceState, Resources, Runtime
from hutch.runtime.cgroups import Cgroup
from hutch.runtime.channel import AgentChannel
from hutch.runtime.local import LocalRuntime
from hutch.runtime.userns import UidSlots
from tests.runtime.hostprocs import is_alive

pytestmark = pytest.mark.sandbox


def test_stop_leaves_nothing_of_the_instance_behind(sandbox, runtime):
    sandbox.run("sleep 60 & sleep 60 & echo spawned")
    instance = sandbox.instance
    cgroup = Cgroup.from_dict(instance.detail["cgroup"])
    cgroup_dirs = list(cgroup.dirs.values())
    assert all(d.is_dir() for d in cgroup_dirs)
    host_pids = cgroup.procs()
    assert instance.pid in host_pids
    sandbox.stop()
    assert [pid for pid in host_pids if is_alive(pid)] == []
    assert not any(d.exists() for d in cgroup_dirs)
    assert str(runtime.instances_dir / instance.instance_id) not in Path("/proc/self/mountinfo").read_text()
    assert not (runtime.instances_dir / instance.instance_id).exists()
    assert not runtime.store.exists(instance.workspace)
    assert instance.instance_id not in {i.instance_id for i in runtime.instances()}


def test_a_kept_workspace_comes_back_in_the_next_instance(make_sandbox, runtime):
    key = f"tenant-a/session-{uuid.uuid4().hex[:8]}"
    first = make_sandbox(workspace=key)
    first.run("mkdir -p notes && echo remembered > notes/today.txt")
    first.stop(keep_workspace=True)
    assert runtime.store.exists(key)
    second = make_sandbox(workspace=key)
    assert second.run("cat notes/today.txt").text.strip() == "remembered"
    assert second.run("touch notes/again && echo writable").text.strip() == "writable"
    second.stop()
    runtime.store.delete(key)


def test_an_instance_that_dies_is_reported_crashed(sandbox, loop, runtime):
    exits = []
    runtime.on_exit = exits.append
    try:
        os.kill(sandbox.instance.pid, 9)
        deadline = time.monotonic() + 5
        while loop.run(runtime.status(sandbox.id)) != InstanceState.CRASHED:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert [i.instance_id for i in exits] == [sandbox.id]
    finally:
        runtime.on_exit = None


def test_a_restarted_runtime_adopts_running_instances_and_cleans_up_dead_ones(loop, runtime, make_sandbox):
    alive = make_sandbox()
    alive.run("echo state > state.txt")
    dead = make_sandbox()
    dead_instance = dead.instance
    # A second runtime on the same data directory plays the restarted hutch.
    successor = loop.run(_new_runtime(runtime))
    loop.run(dead.channel.aclose())
    os.kill(dead_instance.pid, 9)
    time.sleep(0.2)
    adopted = loop.run(successor.adopt_running())
    assert alive.id in {i.instance_id for i in adopted}
    assert dead_instance.instance_id not in {i.instance_id for i in adopted}
    assert not (runtime.instances_dir / dead_instance.instance_id).exists()
    channel = AgentChannel(successor.get(alive.id).socket_path)
    result = loop.run(channel.run("cat state.txt"))
    loop.run(channel.aclose())
    assert result.text.strip() == "state"
    loop.run(successor.close())


async def _new_runtime(runtime: LocalRuntime) -> Runtime:
    return make_runtime(runtime.name, runtime.data_dir, runtime.store, UidSlots(runtime.uid_slots.first_uid, 64))


def test_user_servers_inside_are_reached_through_the_agent(sandbox, loop):
    sandbox.run(
        "nohup python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 &"
        " for i in $(seq 100); do (echo > /dev/tcp/127.0.0.1/8000) 2>/dev/null && break; sleep 0.05; done",
    )
    sandbox.run("echo served-from-the-sandbox > index.txt")

    async def fetch():
        async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(sandbox.instance.socket_path))) as c:
            forwarded = await c.get("http://sandbox/index.txt", headers={"E2b-Sandbox-Port": "8000"})
            closed = await c.get("http://sandbox/", headers={"E2b-Sandbox-Port": "8001"})
            return forwarded, closed

    forwarded, closed = loop.run(fetch())
    assert forwarded.status_code == 200
    assert forwarded.text.strip() == "served-from-the-sandbox"
    assert closed.status_code == 503
    assert "8001" in closed.json()["message"]


def test_an_invalid_spec_is_refused_before_anything_starts():
    with pytest.raises(ValueError):
        Resources(memory_mb=1)
    with pytest.raises(ValueError):
        InstanceSpec(instance_id="x", resources=Resources(cpu=0))


def test_a_start_cancelled_mid_spawn_leaves_no_instance_behind(loop, runtime):
    import asyncio

    async def start_then_cancel():
        spec = InstanceSpec(
            instance_id=f"cancel-{uuid.uuid4().hex[:8]}", resources=Resources(disk_mb=64), backend=runtime.name
        )
        task = asyncio.ensure_future(runtime.start(spec))
        await asyncio.sleep(0.01)  # the spawn is running in its worker thread by now
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # what close() does first: let the spawn finish and the cancelled instance be stopped
        await asyncio.gather(*runtime._spawning, return_exceptions=True)
        await asyncio.gather(*runtime._discarding, return_exceptions=True)
        return spec.instance_id

    instance_id = loop.run(start_then_cancel())
    assert not runtime.has(instance_id)
    assert not (runtime.instances_dir / instance_id).exists()
    assert instance_id not in runtime.cgroups.children()


def _restart(loop, runtime: LocalRuntime) -> list:
    """What the next start of hutch does with this data directory: a new runtime adopts what
    runs and sweeps the rest. Returns the instances it adopted."""
    from hutch.runtime.multi import MultiRuntime

    async def restart():
        successor = MultiRuntime(runtime.data_dir, runtime.store, runtime.uid_slots)
        adopted = await successor.adopt_running()
        for backend in successor.runtimes.values():
            await backend.close()
        return adopted

    return loop.run(restart())


def test_leftovers_of_a_crash_mid_start_are_swept_at_the_next_start(loop, runtime, make_sandbox):
    victim = make_sandbox()
    instance = victim.instance
    loop.run(victim.channel.aclose())
    # hutch died after the sandbox was made but before its record was written
    (runtime.instances_dir / instance.instance_id / "instance.json").unlink()
    os.kill(instance.pid, 9)
    time.sleep(0.2)

    adopted = _restart(loop, runtime)
    assert instance.instance_id not in {i.instance_id for i in adopted}
    assert not (runtime.instances_dir / instance.instance_id).exists()
    assert instance.instance_id not in runtime.cgroups.children()
    assert not runtime.store.exists(instance.workspace)
    assert not any(
        str(instance.workspace_path) in line for line in Path("/proc/self/mountinfo").read_text().splitlines()
    )
    runtime._instances.pop(instance.instance_id, None)  # the first runtime's view of it is stale
    runtime._watches.pop(instance.instance_id, None)


def test_a_stray_process_of_an_instance_nobody_recorded_is_killed_at_the_next_start(loop, runtime, make_sandbox):
    """A sandbox whose start a crash of hutch cut before it joined its cgroups is found by its
    command line (bwrap names the instance's directory in its binds) and killed; the processes
    of live instances, which name theirs too, are left alone."""
    import subprocess
    import sys

    alive = make_sandbox()
    stray = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", str(runtime.instances_dir / "i-gone" / "run")]
    )
    try:
        adopted = _restart(loop, runtime)
        assert stray.wait(10) == -9
        assert alive.instance.instance_id in {i.instance_id for i in adopted}
        assert is_alive(alive.instance.pid)
    finally:
        stray.kill()
        stray.wait()
