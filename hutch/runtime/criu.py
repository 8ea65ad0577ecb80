"""CRIU (checkpoint/restore in user space): hibernation of bwrap instances to disk.

Hibernation is optional. At start the bwrap runtime looks for a CRIU it can use (`find_criu`):
version 4.2 or later (earlier ones cannot run on kernels from 6.13 on, or cannot dump TCP sockets
on 6.16 and later) and `criu check` passing. Without one, hutch runs as before and only freezes
idle sessions. `scripts/install-criu.sh` builds a suitable CRIU into `INSTALL_PREFIX`.

How hutch runs it:
- As the owner of the instance's user namespace (the slot's base uid, `hutch.runtime.userns`),
  with every capability hutch has made ambient and `--unprivileged`. The owner holds every
  capability inside the namespace it owns, which CRIU needs to read and set the sandbox's
  rlimits; host root may lack CAP_SYS_RESOURCE (a hardened host) and then cannot.
- The instance's mounts that come from the host (hutch's interpreter, `/dev` nodes, the run
  directory) are external (`--external mnt[]`): on restore they are bound from the same host
  paths again, and the root is the instance's overlay, mounted again by hutch (`--root`).
- TCP connections inside the sandbox (loopback only) are closed on dump and restore
  (`--tcp-close`): Jupyter's ZMQ reconnects by itself.
- Cgroups are hutch's (`--manage-cgroups=ignore`): a restore runs inside the instance's new
  cgroups, and the restored tree stays in them.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MIN_VERSION = (4, 2)
OFF = "off"  # `criu = "off"`: no hibernation (sessions freeze), whatever is installed
INSTALL_PREFIX = Path("/usr/local/lib/hutch/criu")  # where scripts/install-criu.sh puts it
CHECK_TIMEOUT = 20.0

# Linux capability numbers to names (setpriv's spelling), for the ambient set CRIU runs with.
_CAPS = (
    "chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid", "setuid",
    "setpcap", "linux_immutable", "net_bind_service", "net_broadcast", "net_admin", "net_raw",
    "ipc_lock", "ipc_owner", "sys_module", "sys_rawio", "sys_chroot", "sys_ptrace", "sys_pacct",
    "sys_admin", "sys_boot", "sys_nice", "sys_resource", "sys_time", "sys_tty_config", "mknod",
    "lease", "audit_write", "audit_control", "setfcap", "mac_override", "mac_admin", "syslog",
    "wake_alarm", "block_suspend", "audit_read", "perfmon", "bpf", "checkpoint_restore",
)  # fmt: skip


def _version(path: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=CHECK_TIMEOUT).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(part) for part in found.groups() if part is not None) if found else None


def candidates(configured: str | None, data_dir: Path) -> list[str]:
    """Where to look, first match wins: the configured path, `HUTCH_CRIU`, the data directory's
    `bin/criu`, the install script's prefix, then `PATH`."""
    found = [configured, os.environ.get("HUTCH_CRIU"), str(data_dir / "bin" / "criu")]
    return [path for path in (*found, str(INSTALL_PREFIX / "sbin" / "criu"), shutil.which("criu")) if path]


@dataclass(frozen=True)
class Criu:
    """A CRIU hutch checked it can use."""

    path: str
    version: str

    def __str__(self) -> str:
        return f"criu {self.version}"

    def command(self, action: str, owner_uid: int = 0) -> list[str]:
        """`criu <action>` run as host uid `owner_uid`: the owner of the user namespace of the
        tree it works on, who holds every capability in it (root needs no prefix); with every
        capability hutch has made ambient, which CRIU accepts with `--unprivileged`."""
        if owner_uid == 0:
            return [self.path, action]
        caps = ",".join(f"+{name}" for name in _held_caps())
        return [
            "setpriv", f"--reuid={owner_uid}", f"--regid={owner_uid}", "--clear-groups",
            f"--inh-caps={caps}", f"--ambient-caps={caps}", "--", self.path, action, "--unprivileged",
        ]  # fmt: skip


def _held_caps() -> list[str]:
    """The capabilities this process has (permitted and bounding), by name."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    held = int(fields["CapPrm"], 16) & int(fields["CapBnd"], 16)
    return [name for bit, name in enumerate(_CAPS) if held >> bit & 1]


def find_criu(configured: str | None, data_dir: Path) -> tuple[Criu | None, str]:
    """The first usable CRIU, or None and why there is none (for the start-up log)."""
    if configured == OFF:
        return None, f'turned off (criu = "{OFF}")'
    if shutil.which("setpriv") is None:
        return None, "setpriv (util-linux) is not installed"
    reasons = []
    for path in dict.fromkeys(candidates(configured, data_dir)):
        if not os.access(path, os.X_OK):
            if path == configured:
                reasons.append(f"{path} is not an executable")
            continue
        version = _version(path)
        if version is None:
            reasons.append(f"{path} does not run")
            continue
        shown = ".".join(map(str, version))
        if version[:2] < MIN_VERSION:
            reasons.append(f"{path} is criu {shown}, older than 4.2")
            continue
        try:
            check = subprocess.run([path, "check"], capture_output=True, text=True, timeout=CHECK_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as exc:
            reasons.append(f"{path} check: {exc}")
            continue
        if check.returncode != 0:
            last = (check.stdout + check.stderr).strip().splitlines()[-1:] or ["failed"]
            reasons.append(f"{path} check: {last[0]}")
            continue
        return Criu(path, shown), ""
    return None, "; ".join(reasons) or "no criu found (scripts/install-criu.sh builds one)"


# -- the user namespace's id maps in an image ----------------------------------------------------
#
# CRIU restores a user namespace with the uid and gid maps it recorded at dump time
# (`userns-<id>.img`): host ids of the dumped instance's slot. A new instance started from the
# image must run as its own slot's ids, so it restores from a copy of that file whose maps point
# at its slot. The file: two little-endian u32 magics, then one entry (u32 length + the protobuf
# message `userns_entry` of CRIU's images/userns.proto):
#     message uid_gid_extent { required uint32 first = 1; required uint32 lower_first = 2;
#                              required uint32 count = 3; }
#     message userns_entry { repeated uid_gid_extent uid_map = 1; repeated uid_gid_extent gid_map = 2; }

IMG_COMMON_MAGIC = 0x54564319
USERNS_MAGIC = 0x55474906


@dataclass(frozen=True)
class Extent:
    """One line of a uid_map or gid_map: ids `first`.. inside are `lower_first`.. outside."""

    first: int
    lower_first: int
    count: int


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) of a protobuf message holding varints and length-delimited fields
    only (all that `userns_entry` has)."""

    def varint(pos: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            if pos >= len(data) or shift > 63:
                raise ValueError("truncated varint")
            byte = data[pos]
            value |= (byte & 0x7F) << shift
            pos, shift = pos + 1, shift + 7
            if not byte & 0x80:
                return value, pos

    fields: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = varint(pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = varint(pos)
            fields.append((number, value))
        elif wire == 2:
            length, pos = varint(pos)
            if pos + length > len(data):
                raise ValueError("truncated field")
            fields.append((number, data[pos : pos + length]))
            pos += length
        else:
            raise ValueError(f"unexpected wire type {wire}")
    return fields


def decode_userns(data: bytes) -> tuple[list[Extent], list[Extent]]:
    """The uid and gid maps of a `userns-<id>.img` file's contents."""
    if len(data) < 12 or struct.unpack_from("<II", data) != (IMG_COMMON_MAGIC, USERNS_MAGIC):
        raise ValueError("not a CRIU userns image")
    (size,) = struct.unpack_from("<I", data, 8)
    if len(data) != 12 + size:
        raise ValueError("a userns image holds one entry")
    maps: tuple[list[Extent], list[Extent]] = ([], [])
    for number, value in _fields(data[12:]):
        if number in (1, 2) and isinstance(value, bytes):
            parts = {n: v for n, v in _fields(value) if isinstance(v, int)}
            if set(parts) != {1, 2, 3}:
                raise ValueError("an extent without first, lower_first or count")
            maps[number - 1].append(Extent(parts[1], parts[2], parts[3]))
    return maps


def encode_userns(uid_map: list[Extent], gid_map: list[Extent]) -> bytes:
    """A `userns-<id>.img` file's contents (the inverse of `decode_userns`)."""
    entry = bytearray()
    for number, extents in ((1, uid_map), (2, gid_map)):
        for extent in extents:
            body = b"".join(_varint(key) + _varint(value) for key, value in
                            ((0x08, extent.first), (0x10, extent.lower_first), (0x18, extent.count)))  # fmt: skip
            entry += _varint(number << 3 | 2) + _varint(len(body)) + body
    return struct.pack("<III", IMG_COMMON_MAGIC, USERNS_MAGIC, len(entry)) + bytes(entry)


def rebase_userns(data: bytes, old_base: int, new_base: int, span: int) -> bytes:
    """A userns image's contents with every host id in `old_base`..+`span` moved to the same
    place in `new_base`..: the maps of another uid slot. An id outside that range is refused
    (ValueError): the image would give the new instance ids that are not its own."""

    def moved(extents: list[Extent]) -> list[Extent]:
        out = []
        for extent in extents:
            if not (old_base <= extent.lower_first and extent.lower_first + extent.count <= old_base + span):
                raise ValueError(f"the image maps host ids {extent.lower_first}+{extent.count}, outside its slot")
            out.append(Extent(extent.first, extent.lower_first - old_base + new_base, extent.count))
        return out

    uid_map, gid_map = decode_userns(data)
    return encode_userns(moved(uid_map), moved(gid_map))
