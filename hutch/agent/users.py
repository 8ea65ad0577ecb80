"""Who a request acts as, in an instance whose agent runs as root (a template's root file system).

E2B names the user of an in-sandbox call in `Authorization: Basic base64("<user>:")` (or a
`username` query parameter on `/files`); without one, the template's default user. The agent
looks the name up in the instance's own `/etc/passwd` and acts as that user: commands start with
its uid, gids and home; file operations of the request's thread run with its file-system ids
(`setfsuid(2)` is per thread), so the kernel checks permissions and sets owners as for that user.

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
    _libc.setfsgid(user.gid)
    _libc.setfsuid(user.uid)
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
            _libc.setfsuid(os.getuid())
            _libc.setfsgid(os.getgid())
            _local.user = None


def current() -> User | None:
    """The user this thread acts as, in a root instance; None elsewhere."""
    return getattr(_local, "user", None)
