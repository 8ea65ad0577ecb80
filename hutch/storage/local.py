"""Workspaces on this host's disk: plain directories, or size-limited ext4 images.

`ImageStore` keeps `<root>/<key>.img`, a sparse ext4 file system per workspace, and loop-mounts it
under `<root>/.mnt/` while attached. The image's size is the workspace's disk limit and its
inode table the inode limit, so a sandbox that fills its home fills its own file system, never
the host's. New images are sparse copies of a template made once per size with mkfs (a copy
takes ~3 ms, mkfs ~17 ms).

Sparse images promise more than the host's disk may hold. When that disk is full, a write into a
workspace that needs a new block of its image fails under ext4, which then turns the workspace
read-only (its journal aborted) and counts the error. So: images are mounted with
`noinit_itable` (an idle workspace never writes: no background zeroing of inode tables, which a
sparse image reads as zeros anyway); `failed` tells the runtime that a mounted workspace hit such
an error, so that its instance is replaced once there is room again; and an image whose
superblock records errors is repaired (`e2fsck -fy`, ~10 ms) before it is mounted again.

`DirectoryStore` keeps `<root>/<key>/` as a plain directory: no limit, for hosts without loop
devices and for tests.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import uuid
from pathlib import Path

from hutch.errors import AlreadyExists, BackendUnavailable, IsolationError, NotFound
from hutch.storage.base import check_key, chown_tree, is_mount_point, tree_bytes

log = logging.getLogger(__name__)

MOUNT_OPTIONS = "loop,nosuid,nodev,noinit_itable"
EXT4_ERROR_FS = 0x0002  # s_state: errors detected


def has_errors(image: Path) -> bool:
    """Whether an (unmounted) ext4 image's superblock records errors: its state says so, or its
    error count is not zero."""
    with open(image, "rb") as f:
        f.seek(1024)
        superblock = f.read(0x198)
    if len(superblock) < 0x198:
        return False
    state = int.from_bytes(superblock[0x3A:0x3C], "little")
    count = int.from_bytes(superblock[0x194:0x198], "little")
    return bool(state & EXT4_ERROR_FS) or count > 0


def mounted_fs_errors(path: Path) -> int:
    """How many errors the ext4 file system mounted at `path` (from a loop device) counts; 0 when
    it is not one."""
    try:
        device = os.stat(path).st_dev
        name = os.path.basename(os.readlink(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}"))
        if not name.startswith("loop"):
            return 0
        with open(f"/sys/fs/ext4/{name}/errors_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise IsolationError(f"{argv[0]} failed: {result.stderr.strip() or result.stdout.strip()}")


class DirectoryStore:
    name = "directory"
    shared = False

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def attach(self, key: str, owner_uid: int, size_mb: int) -> Path:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.mkdir(mode=0o755)
        chown_tree(path, owner_uid, owner_uid)
        return path

    def detach(self, key: str, path: Path) -> None:
        pass

    def sweep(self, attached: set[str], claimed_keys: set[str]) -> list[str]:
        """Delete unclaimed instance workspaces (`_instances/<id>`) whose instance is gone."""
        removed = []
        unclaimed = self.root / "_instances"
        if unclaimed.is_dir():
            for directory in unclaimed.iterdir():
                key = f"_instances/{directory.name}"
                if key not in claimed_keys and str(directory) not in attached:
                    shutil.rmtree(directory, ignore_errors=True)
                    removed.append(f"workspace {key}")
        return removed

    def delete(self, key: str) -> None:
        shutil.rmtree(self._path(key), ignore_errors=True)

    def rename(self, key: str, new_key: str, attached: Path | None = None) -> Path | None:
        target = self._path(new_key)
        if target.exists():
            raise AlreadyExists(f"workspace {new_key} already exists")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._path(key).rename(target)
        except FileNotFoundError:
            raise NotFound(f"workspace {key} does not exist") from None
        return target if attached is not None else None

    def exists(self, key: str) -> bool:
        return self._path(key).is_dir()

    def usage_bytes(self, key: str, path: Path | None) -> int:
        return tree_bytes(path or self._path(key))


class ImageStore:
    name = "image"
    shared = False

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.mounts = self.root / ".mnt"
        self.templates = self.root / ".templates"
        for directory in (self.root, self.mounts, self.templates):
            directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        if not Path("/dev/loop-control").exists() or shutil.which("mkfs.ext4") is None:
            raise BackendUnavailable("loop devices or mkfs.ext4 are missing: use the directory store")

    @staticmethod
    def available() -> bool:
        return Path("/dev/loop-control").exists() and shutil.which("mkfs.ext4") is not None

    def _image(self, key: str) -> Path:
        return self.root / f"{check_key(key)}.img"

    def _template(self, size_mb: int) -> Path:
        template = self.templates / f"{size_mb}M.img"
        with self._lock:
            if not template.exists():
                scratch = template.with_suffix(f".{uuid.uuid4().hex}.tmp")
                with open(scratch, "wb") as f:
                    f.truncate(size_mb * 1024 * 1024)
                _run(
                    ["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
                     str(scratch)]
                )  # fmt: skip
                # A home without lost+found, as users expect.
                mount_point = self.mounts / f"template-{uuid.uuid4().hex}"
                mount_point.mkdir()
                try:
                    _run(["mount", "-o", "loop", str(scratch), str(mount_point)])
                    (mount_point / "lost+found").rmdir()
                finally:
                    subprocess.run(["umount", str(mount_point)], capture_output=True)
                    mount_point.rmdir()
                scratch.rename(template)
        return template

    def attach(self, key: str, owner_uid: int, size_mb: int) -> Path:
        image = self._image(key)
        image.parent.mkdir(parents=True, exist_ok=True)
        if not image.exists():
            if size_mb <= 0:
                raise IsolationError("an image workspace needs a size")
            scratch = image.with_suffix(f".{uuid.uuid4().hex}.tmp")
            _run(["cp", "--sparse=always", str(self._template(size_mb)), str(scratch)])
            scratch.rename(image)
        elif has_errors(image):
            self._repair(key, image)
        mount_point = self.mounts / uuid.uuid4().hex
        mount_point.mkdir()
        try:
            _run(["mount", "-o", MOUNT_OPTIONS, str(image), str(mount_point)])
        except IsolationError:
            mount_point.rmdir()
            raise
        chown_tree(mount_point, owner_uid, owner_uid)
        return mount_point

    @staticmethod
    def _repair(key: str, image: Path) -> None:
        log.warning("workspace %s recorded file system errors: repairing it (e2fsck)", key)
        result = subprocess.run(["e2fsck", "-f", "-y", str(image)], capture_output=True, text=True)
        if result.returncode & ~3:  # 1: errors corrected, 2: corrected (reboot advised); more: not
            raise IsolationError(f"workspace {key} cannot be repaired: {result.stdout.strip()[-500:]}")

    def failed(self, path: Path) -> bool:
        """The attached workspace's file system hit an error since it was mounted (ext4 has then
        turned it read-only; the host's disk was probably full under its image)."""
        return path.is_relative_to(self.mounts) and mounted_fs_errors(path) > 0

    def detach(self, key: str, path: Path) -> None:
        if not path.is_relative_to(self.mounts):
            raise IsolationError(f"{path} is not a mount of this store")
        result = subprocess.run(["umount", str(path)], capture_output=True, text=True)
        if result.returncode != 0 and is_mount_point(path):
            # Still busy (a process of a dying sandbox): detach lazily, the loop device frees itself.
            _run(["umount", "--lazy", str(path)])
        try:
            path.rmdir()
        except OSError:
            pass

    def sweep(self, attached: set[str], claimed_keys: set[str]) -> list[str]:
        """Unmount what no live instance has attached, and delete unclaimed instance workspaces
        (`_instances/<id>`) whose instance is gone (`claimed_keys`: those still live)."""
        removed = []
        for mount_point in sorted(self.mounts.iterdir()):
            if str(mount_point) in attached or mount_point.name.startswith("template-"):
                continue
            if is_mount_point(mount_point):
                subprocess.run(["umount", "--lazy", str(mount_point)], capture_output=True)
            try:
                mount_point.rmdir()
                removed.append(f"workspace mount {mount_point.name}")
            except OSError:
                pass
        unclaimed = self.root / "_instances"
        if unclaimed.is_dir():
            for image in unclaimed.glob("*.img"):
                key = f"_instances/{image.stem}"
                if key not in claimed_keys:
                    image.unlink(missing_ok=True)
                    removed.append(f"workspace {key}")
        return removed

    def delete(self, key: str) -> None:
        try:
            self._image(key).unlink()
        except FileNotFoundError:
            pass

    def rename(self, key: str, new_key: str, attached: Path | None = None) -> Path | None:
        target = self._image(new_key)
        if target.exists():
            raise AlreadyExists(f"workspace {new_key} already exists")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._image(key).rename(target)  # the loop device holds the file open: mounts carry on
        except FileNotFoundError:
            raise NotFound(f"workspace {key} does not exist") from None
        return attached

    def exists(self, key: str) -> bool:
        return self._image(key).exists()

    def usage_bytes(self, key: str, path: Path | None) -> int:
        if path is not None and is_mount_point(path):
            st = os.statvfs(path)
            return (st.f_blocks - st.f_bfree) * st.f_frsize
        try:
            return self._image(key).stat().st_blocks * 512
        except FileNotFoundError:
            return 0
