"""What the host sees of an instance's processes, for tests that check none is left or privileged."""

from __future__ import annotations

from pathlib import Path

NOBODY = 65534


def uid_of(pid: int | str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def is_alive(pid: int | str) -> bool:
    """True while the process exists and is not a zombie (an exited child its parent has not
    reaped yet, like gVisor's sentry, whose parent is the host's init)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return line.split()[1] != "Z"
    except OSError:
        return False
    return False
