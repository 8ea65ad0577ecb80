"""The OCI bundle of a gVisor instance: a root of empty mount points, and `config.json`.

- The root file system is one directory per runtime, `<data>/gvisor/rootfs/`, shared read-only
  by every instance: empty directories and files where something is mounted, and the merged-usr
  symlinks (`/bin` -> `usr/bin`...). Everything with content comes from a mount.
- `config.json` (one per instance, in `<data>/instances/<id>/`) mounts the same host view as bwrap
  gives (`HostView.entries()`, staged paths included), read-only; the workspace read-write at
  `/home/user`; the instance's run directory read-write at `/run/hutch`; a size-limited tmpfs at
  `/tmp`; gVisor's own `/proc`. It names the process, its user, capabilities, rlimits,
  no-new-privileges and seccomp policy, the namespaces, and the user namespace mapping of the
  instance's uid slot.

This module writes files and builds dictionaries; it runs nothing (`hutch.runtime.gvisor` does).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from hutch.runtime.hostfs import SANDBOX_HOME, HostEntry
from hutch.runtime.userns import RANGE

READ_ONLY = ["rbind", "ro", "nosuid", "nodev"]
READ_WRITE = ["rbind", "rw", "nosuid", "nodev"]


@dataclass(frozen=True)
class Bind:
    """A host path mounted in the sandbox."""

    source: str
    target: str
    options: tuple[str, ...] = tuple(READ_ONLY)


def ensure_rootfs(root: Path, entries: list[HostEntry], binds: list[Bind], dirs: list[str]) -> None:
    """Make `root` hold a mount point for every bind and host entry, every directory in `dirs`,
    and the host entries' symlinks. Idempotent: what exists is kept (running sandboxes use it)."""
    root.mkdir(mode=0o755, parents=True, exist_ok=True)
    points = [(e.target, e.source) for e in entries if not e.symlink] + [(b.target, b.source) for b in binds]
    for target, source in points:
        path = root / target.lstrip("/")
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        if os.path.isdir(source):
            path.mkdir(mode=0o755, exist_ok=True)
        elif not path.exists():
            path.touch(mode=0o644)
    for directory in dirs:
        (root / directory.lstrip("/")).mkdir(mode=0o755, parents=True, exist_ok=True)
    for entry in entries:
        if entry.symlink:
            link = root / entry.target.lstrip("/")
            if not link.is_symlink():
                link.symlink_to(entry.source)


def mounts(entries: list[HostEntry], binds: list[Bind], tmp_mb: int) -> list[dict]:
    """The OCI mounts, in order: kernel file systems and /tmp first (host paths bound later may
    live below /tmp), then the host view, then the instance's own binds."""
    result: list[dict] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/tmp",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": [f"size={tmp_mb}m", "mode=1777", "nosuid", "nodev"],
        },
    ]
    every = [Bind(e.source, e.target) for e in entries if not e.symlink] + binds
    result += [{"destination": b.target, "type": "bind", "source": b.source, "options": list(b.options)} for b in every]
    return result


def config(
    *,
    root: Path,
    args: list[str],
    env: dict[str, str],
    mounts: list[dict],
    uid_base: int,
    rlimits: dict[str, int],
    seccomp: dict,
    capabilities: list[str],
    bounding: list[str] | None = None,
    writable_root: bool = False,
    cwd: str = SANDBOX_HOME,
) -> dict:
    """The whole `config.json`. The process starts as root inside, with only `capabilities`
    (permitted and effective; the bounding set is empty unless given), and drops to its user
    itself, or stays root (a template's root file system: `writable_root`, `bounding`)."""
    no_caps: list[str] = []
    return {
        "ociVersion": "1.0.2",
        "root": {"path": str(root), "readonly": not writable_root},
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": [f"{key}={value}" for key, value in env.items()],
            "cwd": cwd,
            "noNewPrivileges": True,
            "capabilities": {
                "bounding": bounding or no_caps,
                "effective": capabilities,
                "permitted": capabilities,
                "inheritable": no_caps,
                "ambient": no_caps,
            },
            "rlimits": [
                {"type": f"RLIMIT_{name.upper()}", "hard": value, "soft": value} for name, value in rlimits.items()
            ],
        },
        "hostname": "sandbox",
        "mounts": mounts,
        "linux": {
            "namespaces": [{"type": kind} for kind in ("pid", "mount", "uts", "ipc", "network", "user")],
            # The gofer, the only process that touches host files, runs in this namespace: as the
            # slot's base uid, and files the sandbox user (1000) makes belong to base+1000.
            "uidMappings": [{"containerID": 0, "hostID": uid_base, "size": RANGE}],
            "gidMappings": [{"containerID": 0, "hostID": uid_base, "size": RANGE}],
            "seccomp": seccomp,
        },
    }


def write_config(bundle: Path, data: dict) -> Path:
    path = bundle / "config.json"
    path.write_text(json.dumps(data))
    return path
