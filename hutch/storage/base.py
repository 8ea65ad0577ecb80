"""Where persistent workspaces live: the contract every store implements.

A workspace is the sandbox user's home (`/home/user`), kept outside the instance so that it
survives the instance's crash. A store maps a key (`<tenant>/<session>`, or an instance id for
a workspace not yet claimed by a session) to data on the host, and *attaches* it as a directory
the runtime can bind into a sandbox.

Implementations: `DirectoryStore` (plain directories; no size limit), `ImageStore` (a sparse
ext4 image per workspace, loop-mounted: the size limit and the inode limit are the
filesystem's). Shared stores for several hosts come later behind the same interface.
"""

from __future__ import annotations

import re
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


def chown_tree(root: Path, uid: int, gid: int) -> None:
    """Give a whole tree to another owner (a workspace re-attached under a different host uid)."""
    import os

    if root.stat().st_uid == uid:
        return
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            try:
                os.lchown(os.path.join(dirpath, name), uid, gid)
            except FileNotFoundError:
                pass
