"""Freezing a real instance (a sleeping session): no CPU, memory and processes kept, requests
held until the thaw; a frozen instance still stops cleanly."""

from __future__ import annotations

import concurrent.futures
import time

import pytest

from hutch.runtime.cgroups import Cgroup
from tests.runtime.hostprocs import is_alive

pytestmark = pytest.mark.sandbox

COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.05; done"


def _count(sandbox) -> int:
    # The loop's `echo > /tmp/count` truncates before it writes: a read between the two is
    # empty, so an empty read is read again.
    for _ in range(20):
        text = sandbox.run("cat /tmp/count").text.strip()
        if text:
            return int(text)
        time.sleep(0.01)
    return 0


def test_a_frozen_instance_uses_no_cpu_keeps_its_processes_and_answers_after_the_thaw(sandbox, loop, runtime):
    sandbox.loop.run(sandbox.channel.spawn(["/bin/bash", "-c", COUNTER]))
    deadline = time.monotonic() + 10
    while _count(sandbox) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    pids_before = sandbox.stats().pids
    loop.run(runtime.freeze(sandbox.id))
    assert runtime.frozen(sandbox.id)
    cgroup = Cgroup.from_dict(sandbox.instance.detail["cgroup"])
    cpu_at_freeze = cgroup.stats()[0]
    time.sleep(1.0)
    assert cgroup.stats()[0] == cpu_at_freeze  # not one tick while frozen
    assert sandbox.stats().pids == pids_before  # every process is kept
    # A request sent while frozen is held, then answered once thawed.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_count, sandbox)
        time.sleep(0.5)
        assert not pending.done()
        loop.run(runtime.thaw(sandbox.id))
        counted = pending.result(timeout=30)
    assert not runtime.frozen(sandbox.id)
    later = time.monotonic() + 10
    now = _count(sandbox)
    while now <= counted and time.monotonic() < later:
        time.sleep(0.05)
        now = _count(sandbox)
    assert now > counted  # the background loop runs on


def test_a_frozen_instance_stops_and_leaves_nothing(sandbox, loop, runtime):
    sandbox.run("sleep 300 & echo spawned")
    cgroup = Cgroup.from_dict(sandbox.instance.detail["cgroup"])
    host_pids = cgroup.procs()
    loop.run(runtime.freeze(sandbox.id))
    sandbox.stop()
    assert [pid for pid in host_pids if is_alive(pid)] == []
    assert not any(d.exists() for d in cgroup.dirs.values())
