"""Remove what hutch made on this host for one data directory, with no hutch running on it.

`clean_host(data_dir)` undoes, for every instance recorded under `<data>/instances/` and for
whatever a crash can leave without a record: processes (pid 1, the cgroup's, and any process whose
command line names an instance directory), cgroups (`hutch-<hash of the data dir>`), workspace
mounts and the loop devices under them, unclaimed warm-pool workspaces, network namespaces
(`hutch-<tag>-<slot>`) and their veths (`hv<tag>x<slot>`), and the instance directories. With
nothing left alive it also removes what all instances shared: the nftables table `hutch_<tag>`,
the read-only binds of the host's Python under `<data>/host/`, any other mount or loop device
below the data directory, and hutch's (empty) cgroup parents. `keep_live` spares the instances
still running (the keeper's use while they wait for their deadlines).

It needs no configuration: every name derives from the data directory (`network_tag`,
`short_hash`) or is read from the instances' records. It does not take the serve lock itself:
`cleanup` (the `hutch cleanup` command) does, and refuses while a hutch serves the directory.
Idempotent: a second run finds nothing and says so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
from pathlib import Path

from hutch.errors import BackendUnavailable, IsolationError
from hutch.runtime.keeper import kill_instance, stop_keeper, take_serve_lock
from hutch.runtime.local import INSTANCE_WORKSPACE_PREFIX, short_hash, still_running, stray_processes
from hutch.runtime.network import DEFAULT_SUBNET, HostNetwork, InstanceNetwork, NetworkLayout, network_tag

log = logging.getLogger(__name__)


def _mounts_below(directory: Path) -> list[str]:
    prefix = str(directory.resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].encode().decode("unicode_escape") for line in f]
    return sorted((p for p in points if p.startswith(prefix)), reverse=True)  # deepest first


def _unmount(point: str) -> bool:
    if subprocess.run(["umount", point], capture_output=True).returncode == 0:
        return True
    return subprocess.run(["umount", "--lazy", point], capture_output=True).returncode == 0


def _loops_below(directory: Path) -> list[tuple[str, str]]:
    """(device, backing file) of the loop devices whose file lies below `directory`."""
    try:
        out = subprocess.run(["losetup", "-l", "-n", "-O", "NAME,BACK-FILE"], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return []
    prefix = str(directory.resolve()) + "/"
    found = []
    for line in out.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[1].strip().removesuffix(" (deleted)").startswith(prefix):
            found.append((parts[0], parts[1].strip()))
    return found


def _host_links(prefix: str) -> list[str]:
    try:
        out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return []
    names = [line.split(":", 2)[1].strip().split("@", 1)[0] for line in out.splitlines() if line.count(":") >= 2]
    return [name for name in names if name.startswith(prefix)]


def _nft_table_exists(table: str) -> bool:
    try:
        return subprocess.run(["nft", "list", "table", "inet", table], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


def clean_host(data_dir: Path, keep_live: bool = False) -> list[str]:
    """Remove hutch's things on this host for `data_dir` (see the module docstring); returns what
    was removed, one phrase each."""
    data_dir = Path(data_dir).resolve()
    instances_dir = data_dir / "instances"
    workspaces = data_dir / "workspaces"
    layout = NetworkLayout.make(network_tag(data_dir), DEFAULT_SUBNET)  # names only: no address is used
    removed: list[str] = []
    live: set[str] = set()
    live_slots: set[int] = set()
    live_paths: set[str] = set()

    # 1. Recorded instances: the live ones kept if asked, every other one killed and undone.
    for record_path in sorted(instances_dir.glob("*/instance.json")) if instances_dir.is_dir() else []:
        directory = record_path.parent
        try:
            record = json.loads(record_path.read_text())
            alive = still_running(int(record["pid"]), int(record["pid_start_time"]))
            # A hibernated instance runs nothing, and is kept all the same: its image and mounts
            # wait for the next hutch to restore it.
            alive = alive or record.get("state") == "hibernated"
        except (OSError, ValueError, KeyError, TypeError):
            record, alive = None, False
        if record is not None and alive and keep_live:
            live.add(directory.name)
            live_slots.add(int(record["detail"]["slot"]))
            live_paths.add(str(record["workspace_path"]))
            continue
        killed = kill_instance(record_path)
        if record is not None:
            _undo_instance(data_dir, record, layout)
        for point in _mounts_below(directory):
            _unmount(point)
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(f"instance {directory.name}" + (" (killed)" if killed else ""))

    # 2. What a crash in the middle of a start or stop leaves without a record.
    if instances_dir.is_dir():
        for pid, instance_id in stray_processes(instances_dir, live):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                removed.append(f"process {pid} of {instance_id}")
        for directory in sorted(instances_dir.iterdir()):
            if directory.name in live or not directory.is_dir():
                continue
            for point in _mounts_below(directory):
                _unmount(point)
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(f"instance directory {directory.name}")
    cgroups = _cgroups(data_dir)
    # Opening hutch's cgroups makes their parent directories: they go again at the end, whatever
    # fails on the way (a data directory removed while this runs, say).
    try:
        if cgroups is not None:
            for name in cgroups.children():
                if name in live:
                    continue
                cgroup = cgroups.open(name)
                cgroup.kill_all()
                try:
                    cgroup.remove()
                    removed.append(f"cgroups of {name}")
                except IsolationError as exc:
                    log.error("cgroups of %s: %s", name, exc)
        for slot in layout.leftover_slots():
            if slot not in live_slots:
                InstanceNetwork(layout.addresses(slot)).destroy()
                removed.append(f"network namespace hutch-{layout.tag}-{slot}")
        for name in _host_links(layout.interface_prefix):
            suffix = name.removeprefix(f"{layout.interface_prefix}x")
            if not (suffix.isdigit() and int(suffix) in live_slots):
                subprocess.run(["ip", "link", "delete", name], capture_output=True)
                removed.append(f"link {name}")
        mounts = workspaces / ".mnt"
        if mounts.is_dir():
            for mount_point in sorted(mounts.iterdir()):
                if str(mount_point) in live_paths:
                    continue
                if str(mount_point) in _mounts_below(mounts):
                    _unmount(str(mount_point))
                    removed.append(f"workspace mount {mount_point.name}")
                with contextlib.suppress(OSError):
                    mount_point.rmdir()
        unclaimed = workspaces / INSTANCE_WORKSPACE_PREFIX.rstrip("/")
        if unclaimed.is_dir():
            for entry in sorted(unclaimed.iterdir()):
                if entry.name.removesuffix(".img") in live:
                    continue
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(f"unclaimed workspace {entry.name}")

        # 3. With no instance left: what they all shared.
        if not live:
            table = HostNetwork(layout, 0, 0).table
            if _nft_table_exists(table):
                HostNetwork(layout, 0, 0).remove()
                removed.append(f"nftables table inet {table}")
            for point in _mounts_below(data_dir):
                if _unmount(point):
                    removed.append(f"mount {point}")
            for device, backing in _loops_below(data_dir):
                if subprocess.run(["losetup", "-d", device], capture_output=True).returncode == 0:
                    removed.append(f"loop device {device} ({backing})")
            stage = data_dir / "host"
            if stage.is_dir():
                for entry in stage.iterdir():
                    with contextlib.suppress(OSError):
                        entry.rmdir()
    finally:
        if cgroups is not None and not live:
            cgroups.remove_parents()
    return removed


def _undo_instance(data_dir: Path, record: dict, layout) -> None:
    """Undo one dead instance: cgroups, workspace mount, unclaimed workspace, network namespace."""
    from hutch.runtime.cgroups import Cgroup

    with contextlib.suppress(KeyError, TypeError, IsolationError):
        Cgroup.from_dict(record["detail"]["cgroup"]).remove()
    with contextlib.suppress(KeyError, TypeError, ValueError):
        path = Path(record["workspace_path"])
        if path.is_relative_to(data_dir / "workspaces" / ".mnt"):
            if str(path) in _mounts_below(path.parent):
                _unmount(str(path))
            with contextlib.suppress(OSError):
                path.rmdir()
    with contextlib.suppress(KeyError, TypeError, ValueError):
        key = str(record["workspace"])
        if key.startswith(INSTANCE_WORKSPACE_PREFIX) and ".." not in key:
            base = data_dir / "workspaces" / key
            Path(f"{base}.img").unlink(missing_ok=True)
            shutil.rmtree(base, ignore_errors=True)
    with contextlib.suppress(KeyError, TypeError, ValueError, IsolationError):
        if record["spec"].get("network") is not None:
            InstanceNetwork(layout.addresses(int(record["detail"]["slot"]))).destroy()


def _cgroups(data_dir: Path):
    from hutch.runtime.cgroups import CgroupManager

    try:
        return CgroupManager(group_name=f"hutch-{short_hash(data_dir)}")
    except (BackendUnavailable, OSError) as exc:
        log.warning("cgroups not checked: %s", exc)
        return None


def cleanup(data_dir: Path, wait_s: float = 0.0) -> list[str]:
    """`hutch cleanup`: take the data directory (refused while a hutch serves it), stop its keeper
    and remove everything (`clean_host`). `wait_s`: how long to wait for a hutch that is stopping.

    Raises:
        FailedPrecondition: a hutch serves the directory.
    """
    lock = take_serve_lock(Path(data_dir), wait_s=wait_s)
    try:
        removed = []
        if stop_keeper(data_dir):
            removed.append("its deadline keeper")
        return removed + clean_host(data_dir)
    finally:
        lock.release()
