"""Where persistent workspaces live: the contract every store implements.

A workspace is the sandbox user's home (`/home/user`), kept outside the instance so that it
survives the instance's crash. A store maps a key (`<tenant>/<session>`, or an instance id for
a workspace not yet claimed by a session) to data on the host, and *attaches* it as a directory
the runtime can bind into a sandbox.

Implementations: `DirectoryStore` (plain directories; no size limit), `ImageStore` (a sparse
ext4 image per workspace, loop-mounted: the size limit and the inode limit are the
filesystem's), `SharedStore` (directories on a file system every node mounts, JuiceFS or the
operator's: another node can attach a session's workspace when its node dies).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from hutch.errors import InvalidArgument

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}(/[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?$")


def check_key(key: str) -> str:
    if not KEY_PATTERN.match(key):
        raise InvalidArgument(f"invalid workspace key {key!r}")
    return key


class WorkspaceStore(Protocol):
    name: str
    # Other nodes attach the same workspaces: what an instance keeps in its workspace (its
    # hibernation image too) is there for the node that takes its session over.
    shared: bool

    def attach(self, key: str, owner_uid: int, size_mb: int) -> Path:
        """Create the workspace if it does not exist, make `owner_uid` own it, and return the host
        directory to bind as the sandbox's home. Attaching twice is an error."""
        ...

    def detach(self, key: str, path: Path) -> None:
        """Undo `attach` (the data stays)."""
        ...

    def delete(self, key: str) -> None:
        """Remove the data for good. Detach first."""
        ...

    def rename(self, key: str, new_key: str, attached: Path | None = None) -> Path | None:
        """Give a workspace a new key, also while it is attached at `attached` (a sandbox keeps
        its bind). Returns where the attached workspace is now on the host (None if detached)."""
        ...

    def exists(self, key: str) -> bool: ...

    def usage_bytes(self, key: str, path: Path | None) -> int:
        """Bytes used by the workspace (`path`: where it is attached, if it is)."""
        ...


def is_mount_point(path: Path) -> bool:
    """True when `path` is a mount point (bind mounts included, which os.path.ismount misses)."""
    target = str(Path(path).resolve())
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")  # octal escapes like \040
            if point == target:
                return True
    return False


DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def walk_no_follow(root: Path) -> Iterator[tuple[int, list[os.DirEntry]]]:
    """Every directory of a workspace tree as (its fd, its entries), never leaving the tree.

    A workspace is written by a sandbox, possibly while the host walks it: any component may be
    swapped for a symlink (to `/`, to another workspace) or a FIFO between two steps. So each
    directory is opened relative to its parent's fd with O_DIRECTORY|O_NOFOLLOW|O_NONBLOCK: a
    symlink fails (ELOOP), anything else than a directory fails (ENOTDIR) without being opened
    (a FIFO would block, a device could act), and no path is ever resolved twice. os.walk
    follows a directory swapped for a symlink between its listing and its descent; os.fwalk
    opens it without O_DIRECTORY first. Entries that vanish or change meanwhile are skipped."""
    try:
        top = os.open(root, DIR_FLAGS)
    except OSError:
        return
    stack = [top]
    try:
        while stack:
            fd = stack.pop()
            try:
                with os.scandir(fd) as listing:
                    entries = list(listing)
                yield fd, entries
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(os.open(entry.name, DIR_FLAGS, dir_fd=fd))
                    except OSError:
                        pass  # gone, or no longer a directory
            except OSError:
                pass
            finally:
                os.close(fd)
    finally:
        for fd in stack:
            os.close(fd)


def chown_tree(root: Path, uid: int, gid: int) -> None:
    """Give a whole tree to another owner (a workspace re-attached under a different host uid),
    links included and never followed (`walk_no_follow`)."""
    if os.lstat(root).st_uid == uid:
        return
    os.chown(root, uid, gid, follow_symlinks=False)
    for fd, entries in walk_no_follow(root):
        for entry in entries:
            try:
                os.chown(entry.name, uid, gid, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                pass


def tree_bytes(root: Path) -> int:
    """Bytes allocated to the files of a tree (`walk_no_follow`: never outside it)."""
    total = 0
    for fd, entries in walk_no_follow(root):
        for entry in entries:
            try:
                if not entry.is_dir(follow_symlinks=False):
                    total += os.stat(entry.name, dir_fd=fd, follow_symlinks=False).st_blocks * 512
            except OSError:
                pass
    return total
