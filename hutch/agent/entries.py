"""What the agent says about a file: envd's `EntryInfo` in protobuf's JSON mapping, and the user
metadata kept in the file's extended attributes.

An entry (JSON names of `filesystem.EntryInfo`):
    name, path, type ("FILE_TYPE_FILE" | "FILE_TYPE_DIRECTORY" | "FILE_TYPE_SYMLINK" | ...),
    size (int64, so a string; as `lstat`: a directory's own size, e.g. 4096 on ext4), mode (the
    permission bits), permissions (Go's `FileMode.String()`,
    e.g. "-rw-r--r--", "drwxr-xr-x", "Lrwxrwxrwx"), owner, group (names), modifiedTime
    (RFC 3339, UTC), isSymlink, symlinkTarget (symlinks only), metadata (only when there is some).

As in envd 0.6.4, a symlink is reported with `isSymlink: true` and the *target's* type and
permission bits in `type` and `mode`; a dangling one keeps `FILE_TYPE_SYMLINK` so that it is still
listed. Metadata lives in `user.e2b.<key>` xattrs; filesystems without xattrs simply have none.
"""

from __future__ import annotations

import os
import stat
import time

FILE = "FILE_TYPE_FILE"
DIRECTORY = "FILE_TYPE_DIRECTORY"
SYMLINK = "FILE_TYPE_SYMLINK"
UNSPECIFIED = "FILE_TYPE_UNSPECIFIED"

METADATA_PREFIX = "user.e2b."
# Uploads that replace a file are written beside it under this prefix and renamed over it;
# watchers hide these names (see `hutch.agent.watch`).
UPLOAD_TEMP_PREFIX = ".hutch-upload-"

_owners: dict[int, str] = {}
_groups: dict[int, str] = {}


def owner_name(uid: int) -> str:
    name = _owners.get(uid)
    if name is None:
        import pwd

        try:
            name = _owners[uid] = pwd.getpwuid(uid).pw_name
        except KeyError:
            return str(uid)  # not cached: the user may be created later
    return name


def group_name(gid: int) -> str:
    name = _groups.get(gid)
    if name is None:
        import grp

        try:
            name = _groups[gid] = grp.getgrgid(gid).gr_name
        except KeyError:
            return str(gid)
    return name


def file_type(mode: int) -> str:
    if stat.S_ISREG(mode):
        return FILE
    if stat.S_ISDIR(mode):
        return DIRECTORY
    if stat.S_ISLNK(mode):
        return SYMLINK
    return UNSPECIFIED


def go_mode_string(mode: int) -> str:
    """`mode` (an st_mode) as Go's `FileMode.String()` writes it, which is what envd reports.

    Go's type letters come in the order "dalTLDpSugct?"; of those, Linux stat yields d, L, D
    (block and character devices), p, S, u, g, c (character devices) and t.
    """
    fmt = stat.S_IFMT(mode)
    letters = ""
    if fmt == stat.S_IFDIR:
        letters += "d"
    elif fmt == stat.S_IFLNK:
        letters += "L"
    elif fmt == stat.S_IFBLK or fmt == stat.S_IFCHR:
        letters += "D"
    elif fmt == stat.S_IFIFO:
        letters += "p"
    elif fmt == stat.S_IFSOCK:
        letters += "S"
    if mode & stat.S_ISUID:
        letters += "u"
    if mode & stat.S_ISGID:
        letters += "g"
    if fmt == stat.S_IFCHR:
        letters += "c"
    if mode & stat.S_ISVTX:
        letters += "t"
    perms = "".join(c if mode & (1 << (8 - i)) else "-" for i, c in enumerate("rwxrwxrwx"))
    return (letters or "-") + perms


def timestamp(ns: int) -> str:
    """A protobuf JSON Timestamp: RFC 3339 in UTC with 0, 3, 6 or 9 fractional digits."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    if nanos:
        if nanos % 1_000_000 == 0:
            text += f".{nanos // 1_000_000:03d}"
        elif nanos % 1000 == 0:
            text += f".{nanos // 1000:06d}"
        else:
            text += f".{nanos:09d}"
    return text + "Z"


def display(text: str) -> str:
    """A file name fit for JSON: bytes that are not UTF-8 become U+FFFD, as Go's encoder does."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def read_metadata(path) -> dict[str, str]:
    """The `user.e2b.*` xattrs of `path` (a path, following symlinks, or an fd), prefix stripped."""
    try:
        names = os.listxattr(path)
    except OSError:
        return {}
    metadata = {}
    for name in names:
        if name.startswith(METADATA_PREFIX):
            try:
                value = os.getxattr(path, name)
            except OSError:
                continue
            metadata[name[len(METADATA_PREFIX) :]] = value.decode("utf-8", "replace")
    return metadata


def replace_metadata(fd: int, metadata: dict[str, str]) -> None:
    """Make `metadata` the whole `user.e2b.*` set of the open file `fd`.

    A filesystem without xattr support keeps no metadata (and says so by not returning any);
    other errors (no space, value too large) are raised.
    """
    import errno

    unsupported = (errno.ENOTSUP, errno.EOPNOTSUPP)
    try:
        for name in os.listxattr(fd):
            if name.startswith(METADATA_PREFIX) and name[len(METADATA_PREFIX) :] not in metadata:
                os.removexattr(fd, name)
        for key, value in metadata.items():
            os.setxattr(fd, METADATA_PREFIX + key, value.encode())
    except OSError as exc:
        if exc.errno not in unsupported:
            raise


def entry_info(path: str, lst: os.stat_result | None = None) -> dict:
    """The EntryInfo of `path`, not following a final symlink. Raises OSError."""
    if lst is None:
        lst = os.lstat(path)
    mode = lst.st_mode
    entry: dict[str, object] = {"name": display(os.path.basename(path) or path), "path": display(path)}
    if stat.S_ISLNK(mode):
        try:
            target = os.path.realpath(path, strict=True)
        except (OSError, RuntimeError):
            target = None
        try:
            target_mode = os.stat(path).st_mode
        except OSError:
            entry["type"] = SYMLINK  # dangling: keep it visible as a link
            perm = 0
        else:
            entry["type"] = file_type(target_mode)
            perm = target_mode & 0o777
        if target is None:
            try:
                target = os.readlink(path)
            except OSError:
                target = path
        entry["symlinkTarget"] = display(target)
        is_symlink = True
    else:
        entry["type"] = file_type(mode)
        perm = mode & 0o777
        is_symlink = False
    entry.update(
        size=str(lst.st_size),  # envd: Go's Lstat Size(), a directory's own size included
        mode=perm,
        permissions=go_mode_string(mode),
        owner=owner_name(lst.st_uid),
        group=group_name(lst.st_gid),
        modifiedTime=timestamp(lst.st_mtime_ns),
        isSymlink=is_symlink,
    )
    metadata = read_metadata(path)
    if metadata:
        entry["metadata"] = metadata
    return entry
