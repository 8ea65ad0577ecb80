"""Who a request acts as, in an instance whose agent runs as root (a template's root file system).

E2B names the user of an in-sandbox call in `Authorization: Basic base64("<user>:")` (or a
`username` query parameter on `/files`); without one, the template's default user. The agent
looks the name up in the instance's own `/etc/passwd` and acts as that user: commands start with
its uid, gids and home; file operations of the request's thread run with its file-system ids
(`setfsuid(2)` is per thread), so the kernel checks permissions and sets owners as for that user.

gVisor has no `setfsuid` (ENOSYS): there the thread's effective uid and gid take their place,
set with raw system calls (glibc's `setresuid` would change every thread), which Linux and gVisor
keep per thread. The real and saved ids stay root's, so the thread can always return to root; a
process is started as someone with root's ids (`spawning`), since dropping supplementary groups
needs CAP_SETGID.

Where the agent does not run as root (the `host` template) every request acts as the sandbox
user, and asking for root is an error: that instance has no root to give.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from hutch.errors import Unauthenticated

_libc = ctypes.CDLL(None, use_errno=True)
_local = threading.local()
# setfsuid(-1) changes nothing and answers the current fsuid; -1 where it does not exist (gVisor).
_HAS_FSUID = _libc.setfsuid(-1) != -1
# Raw system call numbers: glibc's wrappers set the ids of every thread of the process.
_SETRESUID, _SETRESGID = {"aarch64": (147, 149)}.get(os.uname().machine, (117, 119))


def _thread_ids(uid: int, gid: int) -> None:
    """This thread's effective ids: back to root first (real and saved ids are root's, so that is
    always allowed), then `gid`, then `uid` (the kernel drops the effective capabilities with it)."""
    for number, value in ((_SETRESUID, 0), (_SETRESGID, gid), *([(_SETRESUID, uid)] if uid else [])):
        if _libc.syscall(number, -1, value, -1) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"cannot act as uid {uid}: {os.strerror(code)}")


def _set_ids(uid: int, gid: int) -> None:
    if _HAS_FSUID:
        _libc.setfsgid(gid)
        _libc.setfsuid(uid)
    else:
        _thread_ids(uid, gid)


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: str
    shell: str
    groups: tuple[int, ...]


def lookup(name: str) -> User:
    """The instance's user `name`.

    Raises:
        Unauthenticated: no such user (E2B's answer to an unknown user).
    """
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise Unauthenticated(f"error looking up user '{name}': no such user in this sandbox") from None
    try:
        groups = tuple(os.getgrouplist(name, entry.pw_gid))
    except OSError:
        groups = (entry.pw_gid,)
    return User(name, entry.pw_uid, entry.pw_gid, entry.pw_dir or "/", entry.pw_shell or "/bin/sh", groups)


def enter(user: User) -> None:
    """Make `user` the identity of this thread's work (file-system ids and `current()`)."""
    _set_ids(user.uid, user.gid)
    _local.user = user


@contextlib.contextmanager
def acting_as(user: User) -> Iterator[None]:
    """`enter(user)` for the block, then back to the identity before it."""
    before = current()
    enter(user)
    try:
        yield
    finally:
        if before is not None:
            enter(before)
        else:
            _set_ids(os.getuid(), os.getgid())
            _local.user = None


@contextlib.contextmanager
def spawning() -> Iterator[None]:
    """Around starting a process as some user (Popen's `user`, `group`, `extra_groups`): where the
    identity is the thread's effective ids (gVisor), the child needs root's to switch."""
    user = current()
    if _HAS_FSUID or user is None or user.uid == 0:
        yield
        return
    _thread_ids(0, 0)
    try:
        yield
    finally:
        _thread_ids(user.uid, user.gid)


def current() -> User | None:
    """The user this thread acts as, in a root instance; None elsewhere."""
    return getattr(_local, "user", None)
