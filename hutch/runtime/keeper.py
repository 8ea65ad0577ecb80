"""The deadline keeper: every instance of a data directory ends at its deadline, hutch alive or not.

Each instance directory `<data>/instances/<id>/` (root's, 0755; the sandbox sees only its `run/`
below) holds a file `deadline`, root's and 0600, that the runtime writes before the sandbox runs
and rewrites on every renewal:

- a number: the unix time at which the instance ends (its session's TTL or E2B timeout);
- `warm <lease>`: an instance no session holds (a warm pool's), or one being bound: it lives
  while a hutch serves the data directory and `<lease>` seconds after the keeper last saw one
  (`warm_lease`, 60 s by default), long enough for a restart to adopt it.

One keeper process per data directory (`python -m hutch.runtime.keeper DIR`, started by the
runtime with the first instance, in a session of its own, as root, outside every sandbox's
namespaces and cgroups) reads those files every `POLL_S` and SIGKILLs the cgroup and pid 1 of
every instance past its deadline (plus `GRACE_S`, so that a running hutch's reaper, which ends
the session at the deadline itself, comes first). Nothing in a sandbox can reach the file or
signal the keeper: the keeper is host root, the sandbox's uids are an unprivileged range.

`serve.lock` is held by every process that runs instances on the directory (`hutch serve`,
`hutch node`, any in-process runtime: `hold_serve_lock`, taken by `LocalRuntime`) and by
`hutch cleanup`. While no process holds it, the keeper also removes what
the dead instances left (`hutch.runtime.cleanup.clean_host`), and once none is left, everything
hutch made on the host for that directory; then it exits. `keeper.lock` (flock, holding the
keeper's pid) makes it one per directory.
"""

from __future__ import annotations

import contextlib
import faulthandler
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from hutch.errors import FailedPrecondition

log = logging.getLogger(__name__)

DEADLINE_FILE = "deadline"
KEEPER_LOCK = "keeper.lock"
KEEPER_LOG = "keeper.log"
SERVE_LOCK = "serve.lock"
WARM = "warm"
WARM_LEASE_S = 60.0  # a warm instance outlives the last hutch serving its directory by this much
POLL_S = 1.0  # a round with 300 instances took ~30 ms of CPU on a loaded 2-core machine
KILL_WAIT_S = 2.0  # for a killed instance's pid 1 to be reaped
GRACE_S = 2.0  # after a deadline, before the keeper kills: hutch's reaper (every 0.5 s) ends it first


# -- deadline files -------------------------------------------------------------------------------


def write_deadline(instance_dir: Path, at: float | None, warm_lease_s: float = WARM_LEASE_S) -> None:
    """Set an instance's deadline (`None`: warm, with that lease), atomically, in a file only
    root can read or write."""
    tmp = instance_dir / f"{DEADLINE_FILE}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, (f"{WARM} {float(warm_lease_s)!r}" if at is None else repr(float(at))).encode())
    finally:
        os.close(fd)
    os.replace(tmp, instance_dir / DEADLINE_FILE)


def read_deadline(instance_dir: Path) -> tuple[float | None, float]:
    """(deadline, warm lease): deadline None for a warm instance (or one from before deadlines)."""
    try:
        words = (instance_dir / DEADLINE_FILE).read_text().split()
    except OSError:
        return None, WARM_LEASE_S
    try:
        if words[0] == WARM:
            return None, float(words[1]) if len(words) > 1 else WARM_LEASE_S
        return float(words[0]), WARM_LEASE_S
    except (IndexError, ValueError):
        return None, WARM_LEASE_S


# -- locks ----------------------------------------------------------------------------------------


def held_by(lock_path: Path) -> int | None:
    """The pid written in a lock file some process holds (0 if unreadable), or None if free."""
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            with contextlib.suppress(OSError, ValueError):
                return int(os.pread(fd, 32, 0).decode().strip() or 0)
            return 0
        return None
    finally:
        os.close(fd)  # drops our shared lock, if we got it


class DirLock:
    """An exclusive flock on a file of the data directory, holding the holder's pid."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd

    @classmethod
    def take(cls, path: Path, wait_s: float = 0.0) -> DirLock | None:
        """The lock, waiting up to `wait_s` for its holder; None if still held."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)  # unlocks
            self.fd = -1


def take_serve_lock(data_dir: Path, wait_s: float = 10.0) -> DirLock:
    """Mark `data_dir` as served by this process (`hutch serve`/`node`, `hutch cleanup`). Waits a
    little for a keeper that is cleaning up.

    Raises:
        FailedPrecondition: another process serves the directory.
    """
    lock = DirLock.take(Path(data_dir) / SERVE_LOCK, wait_s)
    if lock is None:
        pid = held_by(Path(data_dir) / SERVE_LOCK)
        raise FailedPrecondition(f"a hutch (pid {pid or '?'}) is serving {data_dir}: stop it first")
    return lock


_holds: dict[str, tuple[DirLock, int]] = {}  # data dir -> (its serve lock, users in this process)
_holds_guard = threading.Lock()


def hold_serve_lock(data_dir: Path, wait_s: float = 10.0) -> None:
    """Take the serve lock for one more user in this process (a `Hutch`, each runtime of it);
    `release_serve_lock` gives it back when the last one is done.

    Raises:
        FailedPrecondition: another process serves the directory.
    """
    key = str(Path(data_dir).resolve())
    with _holds_guard:
        if key in _holds:
            lock, users = _holds[key]
            _holds[key] = (lock, users + 1)
        else:
            _holds[key] = (take_serve_lock(Path(key), wait_s), 1)


def release_serve_lock(data_dir: Path) -> None:
    key = str(Path(data_dir).resolve())
    with _holds_guard:
        if key not in _holds:
            return
        lock, users = _holds.pop(key)
        if users > 1:
            _holds[key] = (lock, users - 1)
        else:
            lock.release()


# -- the keeper process, seen from hutch ----------------------------------------------------------

_spawned: list[subprocess.Popen] = []  # keepers this process started (reaped when they exit)


def ensure_keeper(data_dir: Path) -> None:
    """Start the data directory's keeper unless one runs (cheap when one does: one flock)."""
    for popen in list(_spawned):
        if popen.poll() is not None:
            _spawned.remove(popen)
    data_dir = Path(data_dir)
    if held_by(data_dir / KEEPER_LOCK) is not None:
        return
    fd = os.open(data_dir / KEEPER_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    try:
        _spawned.append(
            subprocess.Popen(
                [sys.executable, "-m", "hutch.runtime.keeper", str(data_dir.resolve())],
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=fd,
                start_new_session=True,  # no terminal's Ctrl-C, no kill of hutch's process group
                close_fds=True,
            )
        )
    finally:
        os.close(fd)


def stop_keeper(data_dir: Path, timeout: float = 5.0) -> bool:
    """SIGTERM the data directory's keeper and wait until it let go of its lock; True if one ran."""
    lock_path = Path(data_dir) / KEEPER_LOCK
    pid = held_by(lock_path)
    if not pid:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while held_by(lock_path) is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    for popen in list(_spawned):
        if popen.pid == pid:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(1)
            _spawned.remove(popen)
    return True


# -- the keeper process itself --------------------------------------------------------------------


def kill_instance(record_path: Path) -> bool:
    """SIGKILL the instance a record names (its cgroup, then its pid 1); True if it was running."""
    from hutch.runtime.cgroups import Cgroup
    from hutch.runtime.local import still_running

    try:
        record = json.loads(record_path.read_text())
        pid, start_time = int(record["pid"]), int(record["pid_start_time"])
        cgroup = Cgroup.from_dict(record["detail"]["cgroup"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    running = still_running(pid, start_time)
    cgroup.kill_all()
    if running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        # Dead only once its parent reaped it: until then a cleanup would take it for live.
        deadline = time.monotonic() + KILL_WAIT_S
        while still_running(pid, start_time) and time.monotonic() < deadline:
            time.sleep(0.01)
    return running


_pids: dict[Path, tuple[int, int, int]] = {}  # record -> (its mtime, pid, start time): parsed once


def _alive(record_path: Path) -> bool:
    from hutch.runtime.local import still_running

    try:
        mtime = record_path.stat().st_mtime_ns
        cached = _pids.get(record_path)
        if cached is None or cached[0] != mtime:
            record = json.loads(record_path.read_text())
            cached = _pids[record_path] = (mtime, int(record["pid"]), int(record["pid_start_time"]))
        return still_running(cached[1], cached[2])
    except (OSError, ValueError, KeyError, TypeError):
        _pids.pop(record_path, None)
        return False


_deadlines: dict[Path, tuple[int, float | None, float]] = {}  # instance dir -> (its mtime, deadline, lease)


def _deadline(instance_dir: Path) -> tuple[float | None, float]:
    """`read_deadline`, read again only when the directory changed (`write_deadline` renames
    into it, which moves its mtime)."""
    mtime = instance_dir.stat().st_mtime_ns
    cached = _deadlines.get(instance_dir)
    if cached is None or cached[0] != mtime:
        cached = _deadlines[instance_dir] = (mtime, *read_deadline(instance_dir))
    return cached[1], cached[2]


def keep_once(data_dir: Path, serving: bool, last_served: float, now: float) -> tuple[int, int, list[str]]:
    """One round: kill the instances past their deadline. Returns (live instances left, dead ones
    seen, ids killed)."""
    left = dead = 0
    killed = []
    records = sorted((data_dir / "instances").glob("*/instance.json"))
    for gone in set(_pids) - set(records):
        del _pids[gone]
        _deadlines.pop(gone.parent, None)
    for record in records:
        if not _alive(record):
            dead += 1
            continue
        try:
            at, lease = _deadline(record.parent)
        except OSError:  # removed since the glob (hutch stopped the instance): the next round sees
            continue
        warm_due = float("inf") if serving else last_served + lease
        due = at + GRACE_S if at is not None else warm_due
        if now >= due:
            kill_instance(record)
            killed.append(record.parent.name)
            dead += 1
        else:
            left += 1
    return left, dead, killed


def _instance_dirs(data_dir: Path) -> list[Path]:
    with contextlib.suppress(OSError):
        return list((data_dir / "instances").iterdir())
    return []


def run(data_dir: Path) -> int:
    """The keeper's loop (see the module docstring); returns when nothing is left to keep."""
    from hutch.runtime.cleanup import clean_host

    lock = DirLock.take(data_dir / KEEPER_LOCK)
    if lock is None:
        return 0  # another keeper has the directory
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    last_served = time.time()
    cleaned_since_served = False
    try:
        while (data_dir / "instances").is_dir():
            now = time.time()
            serving = held_by(data_dir / SERVE_LOCK) is not None
            if serving:
                last_served = now
                cleaned_since_served = False
            try:
                left, dead, killed = keep_once(data_dir, serving, last_served, now)
            except Exception:  # never die of one bad round: the instances would outlive their deadlines
                log.exception("keeping the instances of %s", data_dir)
                time.sleep(POLL_S)
                continue
            for instance_id in killed:
                log.warning("instance %s reached its deadline: killed", instance_id)
            if not serving and (dead or left == 0 or not cleaned_since_served):
                serve_lock = DirLock.take(data_dir / SERVE_LOCK)  # no hutch starts while we clean
                if serve_lock is not None:
                    try:
                        removed = clean_host(data_dir, keep_live=True)
                    except Exception:  # the directory going away under us, say: the next round sees
                        log.exception("cleaning up after the hutch of %s", data_dir)
                        removed = []
                    finally:
                        serve_lock.release()
                    cleaned_since_served = True
                    if removed:
                        log.warning("no hutch serves %s: removed %s", data_dir, ", ".join(removed))
                    if left == 0 and not _instance_dirs(data_dir):
                        return 0
            time.sleep(POLL_S)
        return 0
    finally:
        lock.release()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m hutch.runtime.keeper DATA_DIR", file=sys.stderr)
        return 2
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s keeper[%(process)d]: %(message)s")
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1` writes where it is to keeper.log
    return run(Path(args[0]))


if __name__ == "__main__":
    sys.exit(main())
