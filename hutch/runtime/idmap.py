"""Idmapped bind mounts: a directory seen through an instance's user namespace.

Template layers and the upper layer of an instance's root file system are stored on disk with
the ownership they have inside (root is uid 0, `user` is 1000), the way a container image is.
Every instance runs in a user namespace of its own that maps those ids to a host range of its
own (`hutch.runtime.userns`). An idmapped mount (Linux 5.12+, `mount_setattr(2)` with
`MOUNT_ATTR_IDMAP`) shows a directory with its owners translated through that namespace, so the
same read-only layer is owned by root inside every instance, and files an instance writes land
on disk with their inside ownership, whatever slot the next instance of the session gets.

Python has no binding for the new mount API: the three system calls go through libc's
`syscall(2)`. Their numbers are the same on every architecture (the unified syscall table).
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

from hutch.errors import BackendUnavailable, IsolationError

_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
_OPEN_TREE_CLONE = 1
_OPEN_TREE_CLOEXEC = os.O_CLOEXEC
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_MOUNT_ATTR_NODEV = 0x4
_MOUNT_ATTR_IDMAP = 0x100000
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(result: int, what: str, path: Path) -> int:
    if result < 0:
        code = ctypes.get_errno()
        if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise BackendUnavailable(
                f"cannot make an idmapped mount of {path} ({what}: {os.strerror(code)}): templates need Linux "
                "5.12 or later, and a data directory and workspace store on a file system that supports idmapped "
                "mounts (ext4, xfs, btrfs, tmpfs, CephFS; not JuiceFS's FUSE mount)"
            )
        raise IsolationError(f"idmapped mount of {path}: {what}: {os.strerror(code)}")
    return result


def idmapped_mount(source: Path, target: Path, userns_fd: int, read_only: bool) -> None:
    """Mount `source` at `target` (an existing directory) with its owners mapped through the user
    namespace `userns_fd`; never setuid, never devices."""
    tree = _check(
        _libc.syscall(_SYS_OPEN_TREE, _AT_FDCWD, os.fsencode(source), _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC),
        "open_tree",
        source,
    )
    try:
        attr = _MountAttr(
            _MOUNT_ATTR_IDMAP | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV | (_MOUNT_ATTR_RDONLY if read_only else 0),
            0,
            0,
            userns_fd,
        )
        _check(
            _libc.syscall(_SYS_MOUNT_SETATTR, tree, b"", _AT_EMPTY_PATH, ctypes.byref(attr), ctypes.sizeof(attr)),
            "mount_setattr",
            source,
        )
        _check(
            _libc.syscall(_SYS_MOVE_MOUNT, tree, b"", _AT_FDCWD, os.fsencode(target), _MOVE_MOUNT_F_EMPTY_PATH),
            "move_mount",
            target,
        )
    finally:
        os.close(tree)


def detach(target: Path) -> None:
    """Unmount `target` lazily (instances that still use it keep it until they end)."""
    if _libc.umount2(os.fsencode(target), _MNT_DETACH) < 0:
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOENT):  # not a mount point (any more)
            raise IsolationError(f"cannot unmount {target}: {os.strerror(code)}")
