"""Every instance's deadline, kept by the data dir's keeper process (`hutch.runtime.keeper`)."""

from __future__ import annotations

import os
import stat
import time

import pytest

from hutch.runtime.base import InstanceState
from hutch.runtime.keeper import GRACE_S, KEEPER_LOCK, POLL_S, held_by, read_deadline
from hutch.runtime.local import still_running

pytestmark = pytest.mark.sandbox


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_an_instance_is_warm_until_bound_and_the_keeper_ends_it_at_its_deadline(sandbox, runtime):
    instance = sandbox.instance
    directory = runtime.instances_dir / instance.instance_id
    assert read_deadline(directory) == (None, runtime.warm_lease_s)  # warm: lives while its runtime does
    assert _wait(lambda: held_by(runtime.data_dir / KEEPER_LOCK), 5), "the first instance starts the keeper"

    runtime.set_deadline(instance.instance_id, time.time() + 1)
    assert read_deadline(directory)[0] == pytest.approx(time.time() + 1, abs=0.5)
    assert sandbox.run("echo alive").stdout.strip() == b"alive"
    assert _wait(lambda: not still_running(instance.pid, instance.pid_start_time), 1 + GRACE_S + POLL_S + 3)
    assert _wait(lambda: instance.state == InstanceState.CRASHED, 2)  # hutch sees it as a death


def test_a_renewal_moves_the_deadline(sandbox, runtime):
    instance = sandbox.instance
    runtime.set_deadline(instance.instance_id, time.time() + 1)
    runtime.set_deadline(instance.instance_id, time.time() + 3600)
    time.sleep(1 + GRACE_S + 2 * POLL_S)
    assert still_running(instance.pid, instance.pid_start_time)
    assert sandbox.run("echo alive").stdout.strip() == b"alive"


def test_user_code_can_neither_reach_the_deadline_nor_signal_the_keeper(sandbox, runtime):
    instance = sandbox.instance
    directory = runtime.instances_dir / instance.instance_id
    deadline = os.lstat(directory / "deadline")
    assert deadline.st_uid == 0 and stat.S_IMODE(deadline.st_mode) == 0o600
    assert os.lstat(directory).st_uid == 0 and stat.S_IMODE(os.lstat(directory).st_mode) == 0o755
    assert _wait(lambda: held_by(runtime.data_dir / KEEPER_LOCK), 5)
    keeper = held_by(runtime.data_dir / KEEPER_LOCK)
    # Inside: the host directory is seen only through its `run/` (the agent's socket), and the
    # keeper is in no namespace the sandbox can name or signal.
    inside = sandbox.run(f"ls -A /run/hutch; kill -9 {keeper} 2>&1; echo done")
    assert inside.stdout.split()[0] == b"agent.sock"
    assert b"deadline" not in inside.stdout
    assert held_by(runtime.data_dir / KEEPER_LOCK) == keeper  # still there, the same one
    runtime.set_deadline(instance.instance_id, time.time() + 3600)
