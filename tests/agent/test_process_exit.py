"""How the agent learns that a process exited where the kernel has no pidfd_open (gVisor; the
whole path runs for real in the gVisor runtime suite, e.g. a stream ending while `sleep &` holds
its pipes in tests/runtime/test_lifecycle.py)."""

from __future__ import annotations

import errno
import os
import select
import subprocess

import pytest

from hutch.agent import process


@pytest.fixture
def no_pidfd(monkeypatch):
    """A kernel like gVisor's: pidfd_open answers ENOSYS."""

    def pidfd_open(pid: int, flags: int = 0) -> int:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(process.os, "pidfd_open", pidfd_open)


def test_without_pidfd_the_exit_fd_becomes_readable_at_exit_and_leaves_the_status(no_pidfd):
    child = subprocess.Popen(["sh", "-c", "read line; exit 7"], stdin=subprocess.PIPE)
    fd = process._exit_fd(child.pid)
    assert fd is not None
    try:
        assert select.select([fd], [], [], 0.2)[0] == []  # still running
        child.stdin.close()
        assert select.select([fd], [], [], 10)[0] == [fd]
        assert child.wait(timeout=5) == 7  # not reaped by the waiter: Popen gets the status
    finally:
        os.close(fd)
