"""User namespaces made by the runtime, one per instance, each mapping to its own host uid range.

bwrap started as root would map the sandbox user to host root. Instead hutch creates the user
namespace itself with the map `0 <base> 65536` (base = a per-instance slot in a high uid range)
and hands it to bwrap with `--userns FD`; the sandbox user (uid 1000 inside) is host uid
base+1000, unprivileged and different for every instance. Mapping uid 0 to the range (rather than
only the sandbox uid) is what CRIU needs to checkpoint such a sandbox later (HIBERNATION.md, V4).

The namespace is created by a short-lived `unshare --user cat`: `cat` echoing a byte back proves
`unshare(2)` has happened; root then writes the maps from outside and opens /proc/PID/ns/user.
No fork of the (threaded) hutch process is involved.
"""

from __future__ import annotations

import os
import subprocess
import threading

from hutch.errors import CapacityError, IsolationError

RANGE = 65536
SANDBOX_UID = 1000  # the sandbox user ("user", as E2B names it) inside every instance


def create_userns(base: int, owned: bool = False) -> int:
    """An fd of a new user namespace whose uids/gids 0..65535 are host base..base+65535.

    `owned`: the namespace belongs to host uid `base` (its root), not to host root, and allows
    `setgroups`. That is the layout of an instance with a root file system of its own: bwrap runs
    as `base` and enters the namespace as its root (`--uid 0`), which bwrap started by host root
    cannot do (it would stay host root, unmapped inside); root inside may then switch users and
    groups as a container's root does (apt drops to `_apt`, `su`, the agent starting commands as
    `user`). Allowing setgroups is safe here: the process that enters holds no supplementary group
    (the launcher clears them), so there is no group whose denial dropping it could escape."""
    try:
        holder = subprocess.Popen(
            ["unshare", "--user", "cat"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            user=base if owned else None,
            group=base if owned else None,
            extra_groups=[] if owned else None,
        )
    except OSError as exc:
        raise IsolationError(f"cannot run unshare: {exc}") from None
    assert holder.stdin is not None and holder.stdout is not None and holder.stderr is not None
    try:
        holder.stdin.write(b"x")
        holder.stdin.flush()
        if holder.stdout.read(1) != b"x":
            raise IsolationError(f"unshare --user failed: {holder.stderr.read().decode().strip()}")
        for name, value in (
            ("uid_map", f"0 {base} {RANGE}\n"),
            *([] if owned else [("setgroups", "deny\n")]),
            ("gid_map", f"0 {base} {RANGE}\n"),
        ):
            with open(f"/proc/{holder.pid}/{name}", "w") as f:
                f.write(value)
        return os.open(f"/proc/{holder.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise IsolationError(f"cannot set up the user namespace: {exc}") from None
    finally:
        holder.stdin.close()
        holder.wait()
        holder.stdout.close()
        holder.stderr.close()


class UidSlots:
    """Hands out disjoint host uid ranges: slot n covers first + n*65536 .. + 65535."""

    def __init__(self, first_uid: int = 1_000_000_000, count: int = 4096) -> None:
        if first_uid < RANGE or first_uid + count * RANGE > 0xFFFFFFFE:
            raise ValueError("uid range out of bounds")
        self.first_uid = first_uid
        self.count = count
        self._used: set[int] = set()
        self._lock = threading.Lock()

    def base(self, slot: int) -> int:
        return self.first_uid + slot * RANGE

    def sandbox_uid(self, slot: int) -> int:
        """The host uid of the sandbox user in that slot."""
        return self.base(slot) + SANDBOX_UID

    def acquire(self, preferred: int | None = None) -> int:
        with self._lock:
            if preferred is not None and 0 <= preferred < self.count and preferred not in self._used:
                self._used.add(preferred)
                return preferred
            for slot in range(self.count):
                if slot not in self._used:
                    self._used.add(slot)
                    return slot
        raise CapacityError(f"all {self.count} uid slots are in use")

    def claim(self, slot: int) -> None:
        """Mark a slot taken by an instance adopted after a restart."""
        with self._lock:
            self._used.add(slot)

    def release(self, slot: int) -> None:
        with self._lock:
            self._used.discard(slot)

    def slot_of_uid(self, host_uid: int) -> int | None:
        slot, offset = divmod(host_uid - self.first_uid, RANGE)
        if host_uid < self.first_uid or slot >= self.count or offset != SANDBOX_UID:
            return None
        return slot
