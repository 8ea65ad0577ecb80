"""envd's `filesystem.Filesystem` Connect service: stat, list, make, move and remove paths, and
watch directories.

Messages are protobuf's JSON mapping (see `hutch.agent.entries` for EntryInfo). Requests may use
the JSON (camelCase) or the proto (snake_case) field names, and int fields as numbers or strings.

Watching comes in two forms, as the two E2B SDKs use them:
- `WatchDir` (async SDK): a server stream of `{"start": {}}`, then `{"filesystem": event}` as
  things happen and `{"keepalive": {}}` every `Keepalive-Ping-Interval` seconds of quiet.
- `CreateWatcher` / `GetWatcherEvents` / `RemoveWatcher` (sync SDK): a watch that collects events
  in the agent until they are polled. A poll also reads what the kernel has queued at that moment,
  so it sees every change made before it was sent.
"""

from __future__ import annotations

import errno
import os
import stat
import threading

from hutch.agent import connect, paths
from hutch.agent.config import AgentConfig
from hutch.agent.entries import DIRECTORY, entry_info
from hutch.agent.http import Request
from hutch.errors import AlreadyExists, HutchError, InvalidArgument, NotFound, ResourceExhausted

TICK = 0.25  # seconds between checks that a streaming client is still there
MAX_UNREAD_EVENTS = 20_000  # per polling watcher; past that it stops and reports the overflow
KEEPALIVE: dict[str, object] = {"keepalive": {}}


def _field(request: dict, json_name: str, proto_name: str | None = None):
    value = request.get(json_name)
    if value is None and proto_name is not None:
        value = request.get(proto_name)
    return value


def _bool(request: dict, json_name: str, proto_name: str) -> bool:
    value = _field(request, json_name, proto_name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidArgument(f"{json_name} must be true or false")
    return value


def _uint(request: dict, name: str) -> int:
    value = request.get(name)
    if value is None or value == "":
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidArgument(f"{name} must be a non-negative integer")
    try:
        number = int(value)
    except ValueError:
        raise InvalidArgument(f"{name} must be a non-negative integer") from None
    if number < 0 or number > 0xFFFFFFFF:
        raise InvalidArgument(f"{name} must be a non-negative 32-bit integer")
    return number


class PollingWatcher:
    """A watch whose events wait in the agent until `drain()` (GetWatcherEvents) takes them."""

    def __init__(self, watcher, watcher_id: str) -> None:
        from hutch.agent.watch import DirWatcher

        self.watcher: DirWatcher = watcher
        self.events: list[dict] = []
        self.error: HutchError | None = None
        self.lock = threading.Lock()
        self.stopping = False
        self.closed = False
        threading.Thread(target=self._run, name=f"watch-{watcher_id}", daemon=True).start()

    def _run(self) -> None:
        try:
            while not self.stopping:
                if self.watcher.wait(TICK):
                    with self.lock:
                        if self.stopping or self.error is not None:
                            break
                        self._collect()
        finally:
            with self.lock:
                self.closed = True
                self.watcher.close()

    def _collect(self) -> None:
        """Move the kernel's queued events into `self.events` (lock held)."""
        try:
            batch = self.watcher.read_events()
        except HutchError as exc:
            self.error = exc
            self.stopping = True
            return
        except Exception as exc:  # never leave a poller waiting on a watch that silently died
            self.error = HutchError(f"the watch failed: {exc.__class__.__name__}: {exc}")
            self.stopping = True
            return
        events = self.events
        for event in batch:
            last = events[-1] if events else None
            if last is not None and last["name"] == event["name"] and last["type"] == event["type"]:
                events[-1] = event  # a run of writes to one file is one write to whoever polls
            else:
                events.append(event)
        if len(events) > MAX_UNREAD_EVENTS:
            self.error = ResourceExhausted(
                f"more than {MAX_UNREAD_EVENTS} unread events: the watcher stopped; poll it more often"
            )
            self.stopping = True

    def drain(self) -> list[dict]:
        with self.lock:
            if not self.closed and self.error is None:
                self._collect()
            events, self.events = self.events, []
            if not events and self.error is not None:
                raise self.error
            return events

    def stop(self) -> None:
        self.stopping = True  # the thread closes the watch within a tick


class FilesystemService:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.watchers: dict[str, PollingWatcher] = {}
        self.lock = threading.Lock()
        rpc = connect.Service("filesystem.Filesystem")
        rpc.unary("Stat")(self.stat)
        rpc.unary("MakeDir")(self.make_dir)
        rpc.unary("Move")(self.move)
        rpc.unary("ListDir")(self.list_dir)
        rpc.unary("Remove")(self.remove)
        rpc.server_stream("WatchDir")(self.watch_dir)
        rpc.unary("CreateWatcher")(self.create_watcher)
        rpc.unary("GetWatcherEvents")(self.get_watcher_events)
        rpc.unary("RemoveWatcher")(self.remove_watcher)
        self.rpc = rpc

    def _path(self, request: dict, name: str = "path", required: bool = False) -> str:
        value = request.get(name)
        if required and not value:
            raise InvalidArgument(f"{name} is required")
        return paths.resolve(value, self.config.user_home())

    @staticmethod
    def _entry(path: str) -> dict:
        try:
            return entry_info(path)
        except OSError as exc:
            raise paths.os_error(exc, path) from None

    # -- unary ---------------------------------------------------------------------------------

    def stat(self, request: dict, req: Request) -> dict:
        return {"entry": self._entry(self._path(request))}

    def make_dir(self, request: dict, req: Request) -> dict:
        path = self._path(request)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise paths.os_error(exc, path) from None
        if st is not None:
            if stat.S_ISDIR(st.st_mode):
                raise AlreadyExists(f"directory '{path}' already exists")
            raise InvalidArgument(f"path '{path}' already exists and is not a directory")
        try:
            os.makedirs(path)
        except FileExistsError:
            if os.path.isdir(path):
                raise AlreadyExists(f"directory '{path}' already exists") from None
            raise InvalidArgument(f"path '{path}' already exists and is not a directory") from None
        except OSError as exc:
            raise paths.os_error(exc, path) from None
        return {"entry": self._entry(path)}

    def move(self, request: dict, req: Request) -> dict:
        source = self._path(request, "source", required=True)
        destination = self._path(request, "destination", required=True)
        if not os.path.lexists(source):
            raise NotFound(f"path '{source}' does not exist")
        parent = os.path.dirname(destination)
        try:
            os.makedirs(parent, exist_ok=True)
        except FileExistsError:
            raise InvalidArgument(f"'{parent}' exists and is not a directory") from None
        except OSError as exc:
            raise paths.os_error(exc, parent) from None
        try:
            os.rename(source, destination)
        except OSError as exc:
            raise paths.os_error(exc, source if exc.errno == errno.ENOENT else destination) from None
        return {"entry": self._entry(destination)}

    def list_dir(self, request: dict, req: Request) -> dict:
        path = self._path(request)
        depth = _uint(request, "depth") or 1
        try:
            st = os.stat(path)  # follows a symlink to a directory, as envd does
        except OSError as exc:
            raise paths.os_error(exc, path) from None
        if not stat.S_ISDIR(st.st_mode):
            raise InvalidArgument(f"path '{path}' is not a directory")
        entries: list[dict] = []
        self._walk(path, depth, entries, top=True)
        return {"entries": entries}

    def _walk(self, directory: str, depth: int, out: list, top: bool = False) -> None:
        """Entries under `directory`, name order, each directory followed by its contents
        (as Go's filepath.WalkDir), down to `depth` levels; symlinks are not followed."""
        try:
            with os.scandir(directory) as it:
                items = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            if top:
                raise paths.os_error(exc, directory) from None
            return  # an unreadable subdirectory: list what can be listed
        for item in items:
            try:
                entry = entry_info(item.path, item.stat(follow_symlinks=False))
            except OSError:
                continue  # removed while listing
            out.append(entry)
            if depth > 1 and entry["type"] == DIRECTORY and not entry["isSymlink"]:
                self._walk(item.path, depth - 1, out)

    def remove(self, request: dict, req: Request) -> dict:
        path = self._path(request, required=True)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return {}  # already gone: removing is idempotent, as envd's os.RemoveAll
        except OSError as exc:
            raise paths.os_error(exc, path) from None
        try:
            if stat.S_ISDIR(st.st_mode):
                import shutil

                failed: list = []
                shutil.rmtree(path, onerror=lambda func, p, info: failed.append((p, info[1])))
                for failed_path, error in failed:
                    if not isinstance(error, FileNotFoundError):
                        raise paths.os_error(error, failed_path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise paths.os_error(exc, path) from None
        return {}

    # -- watching ------------------------------------------------------------------------------

    def _open_watch(self, request: dict):
        from hutch.agent.watch import DirWatcher, network_filesystem

        path = self._path(request)
        try:
            st = os.stat(path)
        except OSError as exc:
            raise paths.os_error(exc, path) from None
        if not stat.S_ISDIR(st.st_mode):
            raise InvalidArgument(f"path '{path}' is not a directory")
        if not _bool(request, "allowNetworkMounts", "allow_network_mounts"):
            fs = network_filesystem(path)
            if fs is not None:
                raise InvalidArgument(
                    f"cannot watch '{path}': it is on a network filesystem ({fs}), where events may be "
                    "lost; allow network mounts to watch it anyway"
                )
        return DirWatcher(
            path,
            recursive=_bool(request, "recursive", "recursive"),
            include_entry=_bool(request, "includeEntry", "include_entry"),
        )

    def watch_dir(self, request: dict, req: Request):
        watcher = self._open_watch(request)
        try:
            yield {"start": {}}

            def events():
                while True:
                    if watcher.wait(TICK):
                        batch = watcher.read_events()
                        if batch:
                            for event in batch:
                                yield {"filesystem": event}
                            continue
                    yield None

            yield from connect.with_keepalive(events(), connect.keepalive_interval(req), KEEPALIVE)
        finally:
            watcher.close()

    def create_watcher(self, request: dict, req: Request) -> dict:
        watcher = self._open_watch(request)
        watcher_id = "w" + os.urandom(8).hex()
        with self.lock:
            self.watchers[watcher_id] = PollingWatcher(watcher, watcher_id)
        return {"watcherId": watcher_id}

    def _watcher(self, request: dict) -> tuple[str, PollingWatcher]:
        watcher_id = _field(request, "watcherId", "watcher_id")
        if not watcher_id or not isinstance(watcher_id, str):
            raise InvalidArgument("watcherId is required")
        with self.lock:
            watcher = self.watchers.get(watcher_id)
        if watcher is None:
            raise NotFound(f"watcher with id '{watcher_id}' not found")
        return watcher_id, watcher

    def get_watcher_events(self, request: dict, req: Request) -> dict:
        _, watcher = self._watcher(request)
        return {"events": watcher.drain()}

    def remove_watcher(self, request: dict, req: Request) -> dict:
        watcher_id, watcher = self._watcher(request)
        with self.lock:
            self.watchers.pop(watcher_id, None)
        watcher.stop()
        return {}
