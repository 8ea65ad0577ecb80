"""Directory watching with inotify (through ctypes), reporting events as envd does.

envd watches with fsnotify; this maps inotify events the same way:

    IN_CREATE, IN_MOVED_TO       -> EVENT_TYPE_CREATE
    IN_MOVED_FROM, IN_MOVE_SELF  -> EVENT_TYPE_RENAME
    IN_ATTRIB                    -> EVENT_TYPE_CHMOD
    IN_MODIFY                    -> EVENT_TYPE_WRITE
    IN_DELETE, IN_DELETE_SELF    -> EVENT_TYPE_REMOVE

Event names are relative to the watched directory ("." for the directory itself). A recursive
watch also watches every subdirectory, including ones created or moved in later; the contents a
new subdirectory already has when its watch is added are reported as created (and written, when
not empty), so a `mkdir -p a/b && echo x > a/b/f` racing the watch is not lost.

Files an upload writes beside its target before renaming them over it (`UPLOAD_TEMP_PREFIX`) are
hidden: the rename shows as a write of the target, which is what happened to it.

Nothing here blocks for long: `wait(timeout)` polls the inotify fd, `read_events()` never blocks.
"""

from __future__ import annotations

import errno
import os
import select
import struct

from hutch.agent import paths
from hutch.agent.entries import UPLOAD_TEMP_PREFIX, entry_info
from hutch.errors import HutchError, InvalidArgument, ResourceExhausted

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_ISDIR = 0x40000000
MASK = IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF

CREATE = "EVENT_TYPE_CREATE"
WRITE = "EVENT_TYPE_WRITE"
REMOVE = "EVENT_TYPE_REMOVE"
RENAME = "EVENT_TYPE_RENAME"
CHMOD = "EVENT_TYPE_CHMOD"

EVENT_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len
READ_SIZE = 256 * 1024

# statfs f_type of the network filesystems envd refuses to watch unless asked to.
NETWORK_FILESYSTEMS = {
    0x6969: "nfs",
    0xFF534D42: "cifs",
    0x517B: "smb",
    0xFE534D42: "smb2",
    0x65735546: "fuse",
}

_libc = None


def _lib():
    global _libc
    if _libc is None:
        import ctypes

        lib = ctypes.CDLL(None, use_errno=True)
        lib.inotify_init1.argtypes = [ctypes.c_int]
        lib.inotify_init1.restype = ctypes.c_int
        lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        lib.inotify_add_watch.restype = ctypes.c_int
        lib.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.inotify_rm_watch.restype = ctypes.c_int
        lib.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
        lib.statfs.restype = ctypes.c_int
        _libc = (lib, ctypes)
    return _libc


def network_filesystem(path: str) -> str | None:
    """The name of the network filesystem `path` is on, or None (also when it cannot be told)."""
    lib, ctypes = _lib()
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes; f_type comes first
    if lib.statfs(os.fsencode(path), buf) != 0:
        return None
    f_type = struct.unpack_from("l", buf.raw)[0] & 0xFFFFFFFF
    return NETWORK_FILESYSTEMS.get(f_type)


class Inotify:
    """One inotify instance: a non-blocking fd, watches on it, and its parsed events."""

    def __init__(self) -> None:
        lib, ctypes = _lib()
        fd = lib.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            if code in (errno.EMFILE, errno.ENFILE):
                raise ResourceExhausted("too many directory watches: the inotify instance limit is reached")
            raise HutchError(f"cannot create a directory watch: {os.strerror(code)}")
        self.fd = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def add(self, path: str, mask: int) -> int:
        lib, ctypes = _lib()
        wd = lib.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), path)
        return wd

    def remove(self, wd: int) -> None:
        lib, _ = _lib()
        lib.inotify_rm_watch(self.fd, wd)  # EINVAL when the kernel already dropped it: fine

    def wait(self, timeout: float) -> bool:
        """True when events are ready to read, after waiting at most `timeout` seconds."""
        try:
            return bool(self._poll.poll(max(0, int(timeout * 1000))))
        except InterruptedError:
            return False

    def read(self) -> list[tuple[int, int, int, str]]:
        """The (wd, mask, cookie, name) events queued now; [] when there are none."""
        try:
            data = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return []
        events = []
        offset = 0
        size = EVENT_HEADER.size
        while offset + size <= len(data):
            wd, mask, cookie, length = EVENT_HEADER.unpack_from(data, offset)
            raw = data[offset + size : offset + size + length].split(b"\0", 1)[0]
            events.append((wd, mask, cookie, os.fsdecode(raw)))
            offset += size + length
        return events

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def _join(directory: str, name: str) -> str:
    return f"{directory}/{name}" if directory else name


class DirWatcher:
    """Watch `root` (a directory), optionally recursively; produce envd FilesystemEvent dicts."""

    def __init__(self, root: str, recursive: bool = False, include_entry: bool = False) -> None:
        self.root = root
        self.recursive = recursive
        self.include_entry = include_entry
        self._dirs: dict[int, str] = {}  # watch descriptor -> directory relative to root
        self._upload_moves: set[int] = set()  # cookies of renames away from an upload temp file
        self._ino = Inotify()
        try:
            try:
                self._root_wd = self._ino.add(root, MASK | IN_ONLYDIR)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise ResourceExhausted("the inotify watch limit is reached") from None
                if exc.errno == errno.ENOTDIR:
                    raise InvalidArgument(f"path '{root}' is not a directory") from None
                raise paths.os_error(exc, root) from None
            self._dirs[self._root_wd] = ""
            if recursive:
                self._watch_tree("", None, strict=True)
        except BaseException:
            self._ino.close()
            raise

    # -- watches -------------------------------------------------------------------------------

    def _watch(self, rel: str, strict: bool) -> bool:
        try:
            wd = self._ino.add(os.path.join(self.root, rel), MASK | IN_ONLYDIR | IN_DONT_FOLLOW)
        except OSError as exc:
            if strict and exc.errno == errno.ENOSPC:
                raise ResourceExhausted(
                    f"the inotify watch limit is reached while watching '{self.root}' recursively"
                ) from None
            return False  # gone already, not a directory any more, or no room: skip it
        known = self._dirs.get(wd)
        if known is not None and known != rel:
            return False  # the same directory seen twice (a bind mount): do not loop
        self._dirs[wd] = rel
        return True

    def _watch_tree(self, rel: str, report: list | None, strict: bool = False) -> None:
        """Watch the subdirectories under `rel` (itself already watched); report what is there."""
        stack = [rel]
        while stack:
            directory = stack.pop()
            try:
                with os.scandir(os.path.join(self.root, directory)) as it:
                    items = sorted(it, key=lambda e: e.name)
            except OSError:
                continue
            for item in items:
                child = _join(directory, item.name)
                try:
                    is_dir = item.is_dir(follow_symlinks=False)
                except OSError:
                    continue
                if report is not None and not item.name.startswith(UPLOAD_TEMP_PREFIX):
                    report.append(self._event(child, CREATE))
                    try:
                        if item.is_file(follow_symlinks=False) and item.stat(follow_symlinks=False).st_size:
                            report.append(self._event(child, WRITE))
                    except OSError:
                        pass
                if is_dir and self._watch(child, strict):
                    stack.append(child)

    def _unwatch_tree(self, rel: str) -> None:
        prefix = rel + "/"
        for wd, directory in list(self._dirs.items()):
            if directory == rel or directory.startswith(prefix):
                del self._dirs[wd]
                self._ino.remove(wd)

    # -- events --------------------------------------------------------------------------------

    def _event(self, rel: str, kind: str) -> dict:
        event: dict[str, object] = {"name": rel, "type": kind}
        if self.include_entry:
            path = self.root if rel == "." else os.path.join(self.root, rel)
            try:
                event["entry"] = entry_info(path)
            except OSError:
                pass  # gone (removed or renamed away): no entry, as in envd
        return event

    def wait(self, timeout: float) -> bool:
        return self._ino.wait(timeout)

    def read_events(self) -> list[dict]:
        """The events that are ready now, translated; never blocks."""
        out: list[dict] = []
        for wd, mask, cookie, name in self._ino.read():
            if mask & IN_Q_OVERFLOW:
                raise ResourceExhausted("too many filesystem events at once: the watch lost some")
            if mask & IN_IGNORED:
                self._dirs.pop(wd, None)
                continue
            directory = self._dirs.get(wd)
            if directory is None:
                continue
            if not name:
                # About a watched directory itself. A subdirectory's parent reports it already.
                if wd == self._root_wd:
                    if mask & IN_MOVE_SELF:
                        out.append(self._event(".", RENAME))
                    if mask & IN_ATTRIB:
                        out.append(self._event(".", CHMOD))
                    if mask & IN_DELETE_SELF:
                        out.append(self._event(".", REMOVE))
                continue
            rel = _join(directory, name)
            if name.startswith(UPLOAD_TEMP_PREFIX):
                if mask & IN_MOVED_FROM:
                    self._upload_moves.add(cookie)
                continue
            if mask & (IN_CREATE | IN_MOVED_TO):
                if mask & IN_MOVED_TO and cookie in self._upload_moves:
                    self._upload_moves.discard(cookie)
                    out.append(self._event(rel, WRITE))  # an upload replaced the file
                else:
                    out.append(self._event(rel, CREATE))
            if mask & IN_MOVED_FROM:
                out.append(self._event(rel, RENAME))
            if mask & IN_ATTRIB:
                out.append(self._event(rel, CHMOD))
            if mask & IN_MODIFY:
                out.append(self._event(rel, WRITE))
            if mask & IN_DELETE:
                out.append(self._event(rel, REMOVE))
            if self.recursive and mask & IN_ISDIR:
                if mask & (IN_CREATE | IN_MOVED_TO):
                    if self._watch(rel, strict=False):
                        self._watch_tree(rel, out if mask & IN_CREATE else None)
                elif mask & (IN_MOVED_FROM | IN_DELETE):
                    self._unwatch_tree(rel)
        if len(self._upload_moves) > 1024:
            self._upload_moves.clear()  # renames whose other half never came (moved out of view)
        return out

    def close(self) -> None:
        self._ino.close()
