"""The Active sessions of this host in memory: the table every part of `SessionManager` shares.

`SessionTable` holds what the lifecycle (`hutch.scheduler.lifecycle`), the recovery at start and
the adoption (`hutch.scheduler.recovery`) and the reaper (`hutch.scheduler.reaper`) read and
change: the Active sessions by internal id, row id and public id (the gateway's route cache), one
lock per key, the functions' specs, and the tasks that follow user servers' output. Lookups are
here too: they read the table alone (and MetaDB for ended sessions).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import secrets
import time
import weakref
from collections.abc import Callable, Coroutine
from typing import Any

import httpx

from hutch.errors import HutchError, InvalidArgument, NotFound
from hutch.functions import BUILTIN_TENANT, FunctionSpec
from hutch.metadb.base import MetaDB
from hutch.metadb.records import SessionRecord
from hutch.runtime.channel import AgentChannel
from hutch.scheduler import interface
from hutch.scheduler.activity import ActivityTracker
from hutch.scheduler.metering import Meter
from hutch.scheduler.scheduler import USER_SERVER_TAG, Scheduler
from hutch.scheduler.session_log import SessionLog
from hutch.types import InstanceId

log = logging.getLogger(__name__)

MAX_LOG_LINE = 4096  # bytes of one line of a user server's output kept in the session's log

SESSION_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$")
MAX_E2B_TIMEOUT_S = 86400


def new_session_id() -> str:
    """20 characters, ~100 random bits: sandbox ids double as capabilities, so they must not be guessed."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return "i" + "".join(secrets.choice(alphabet) for _ in range(19))


def check_session_id(value: str) -> str:
    if not isinstance(value, str) or not SESSION_ID.fullmatch(value):
        raise InvalidArgument("invalid session id: 1-64 characters from [A-Za-z0-9_-], not starting with '-'")
    return value


class SessionTable:
    """The state of `hutch.scheduler.sessions.SessionManager` and the lookups over it."""

    def __init__(
        self,
        metadb: MetaDB,
        scheduler: Scheduler,
        secret: bytes,
        clock: Callable[[], float] = time.time,
        reap_interval: float = 0.5,
        flush_interval: float = 1.0,
        meter: Meter | None = None,
        cluster: bool = False,
    ) -> None:
        """`cluster`: this is one node of a cluster (`hutch node`): it holds only the sessions
        MetaDB binds to its scheduler, and tells the gateways' route caches of every end, move
        and renewal through MetaDB's change notices."""
        if reap_interval <= 0 or flush_interval <= 0:
            raise ValueError("intervals must be positive")
        self.metadb = metadb
        self.scheduler = scheduler
        self.secret = secret
        self.clock = clock
        self.reap_interval = reap_interval
        self.flush_interval = flush_interval
        self.meter = meter or Meter(metadb, scheduler, clock)
        self.activity = ActivityTracker(clock, on_change=self.meter.request_state)
        self.log = SessionLog(metadb, clock)
        self.cluster = cluster
        self._active: dict[str, SessionRecord] = {}  # internal id -> Active session
        self._by_row: dict[str, str] = {}  # row id -> internal id
        self._by_public: dict[str, str] = {}  # E2B sandbox id -> internal id (sessions with a token)
        # One lock per key while anyone holds or awaits it (weak: unused ones go by themselves, and
        # one is never dropped while a create waits on it for an end to finish).
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._specs: dict[str, FunctionSpec] = {}  # pool key -> spec
        self._resolved: dict[tuple[str, str], str] = {}  # (tenant, name) -> pool key: no MetaDB per request
        self._tasks: list[asyncio.Task[Any]] = []
        self._background: set[asyncio.Task[Any]] = set()  # fire-and-forget work, referenced until done
        self._followers: dict[str, asyncio.Task[Any]] = {}  # row id -> the task logging its user server's output
        self.on_end: list[Callable[[SessionRecord], None]] = []
        # Called with an instance about to hibernate: close every connection hutch holds to it
        # (CRIU cannot dump a socket whose other end is outside the sandbox).
        self.on_quiesce: list[Callable[[str | None], None]] = []
        self.on_created: list[Callable[[SessionRecord, float], None]] = []  # (session, seconds it took)

    # -- functions -----------------------------------------------------------------------------

    @staticmethod
    def pool_key(tenant_id: str, function: str) -> str:
        return f"{tenant_id}/{function}"

    async def function(self, tenant_id: str, name: str) -> tuple[str, FunctionSpec]:
        """(pool key, spec) of the function a tenant means by `name`."""
        key = self._resolved.get((tenant_id, name))
        if key is not None:
            spec = self._specs.get(key)
            if spec is not None:
                return key, spec
        record = await self.metadb.get_function(tenant_id, name)
        key = self.pool_key(record.tenant_id, record.name)
        spec = self._specs.get(key)
        if spec is None:
            spec = FunctionSpec.model_validate(record.spec)
            self._specs[key] = spec
        self._resolved[(tenant_id, name)] = key
        return key, spec

    def _spec_of(self, session: SessionRecord) -> FunctionSpec | None:
        """The spec of a session's function: the tenant's own, else the built-in of that name."""
        return self._specs.get(self.pool_key(session.tenant_id, session.function)) or self._specs.get(
            self.pool_key(BUILTIN_TENANT, session.function)
        )

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- ids -----------------------------------------------------------------------------------

    def internal_id(self, tenant_id: str, function: str, key: str) -> str:
        return interface.internal_id(self.secret, tenant_id, function, key)

    def _lock(self, internal_id: str) -> asyncio.Lock:
        lock = self._locks.get(internal_id)
        if lock is None:
            lock = self._locks[internal_id] = asyncio.Lock()
        return lock

    def _remember(self, session: SessionRecord) -> None:
        previous = self._active.get(session.internal_id)
        if session.instance_id is not None and (
            previous is None or previous.instance_id != session.instance_id or previous.expires_at != session.expires_at
        ):
            # The instance ends at the session's TTL even if hutch is gone by then (the keeper).
            self.scheduler.set_deadline(InstanceId(session.instance_id), session.expires_at)
        self._active[session.internal_id] = session
        self._by_row[session.row_id] = session.internal_id
        if session.access_token:
            self._by_public[session.session_id] = session.internal_id

    def _forget(self, session: SessionRecord) -> None:
        self._active.pop(session.internal_id, None)
        self._by_row.pop(session.row_id, None)
        if self._by_public.get(session.session_id) == session.internal_id:
            del self._by_public[session.session_id]
        self.activity.forget(session.row_id)
        follower = self._followers.pop(session.row_id, None)
        if follower is not None:
            follower.cancel()

    # -- the output of user servers --------------------------------------------------------------

    def _follow_user_server(self, session: SessionRecord, spec: FunctionSpec | None) -> None:
        """Log what the session's user server prints from now on (its function's `startCommand`)."""
        if spec is None or not spec.start_command or session.instance_id is None:
            return
        previous = self._followers.pop(session.row_id, None)
        if previous is not None:
            previous.cancel()
        task = asyncio.get_running_loop().create_task(
            self._user_server_output(session, session.instance_id), name="user-server-log"
        )
        self._followers[session.row_id] = task

    async def _user_server_output(self, session: SessionRecord, instance_id: InstanceId) -> None:
        try:
            await self._log_user_server(session, instance_id)
        finally:
            if self._followers.get(session.row_id) is asyncio.current_task():
                del self._followers[session.row_id]

    async def _log_user_server(self, session: SessionRecord, instance_id: InstanceId) -> None:
        partial = {"stdout": b"", "stderr": b""}
        try:
            path = self.scheduler.socket_path(instance_id)
            async with AgentChannel(path) as channel:
                async for event in channel.follow(USER_SERVER_TAG):
                    for stream, data in (event.get("data") or {}).items():
                        if stream not in partial:
                            continue
                        *lines, partial[stream] = (partial[stream] + base64.b64decode(data)).split(b"\n")
                        if len(partial[stream]) > MAX_LOG_LINE:
                            lines.append(partial[stream])
                            partial[stream] = b""
                        for line in lines:
                            text = line[:MAX_LOG_LINE].decode(errors="replace").rstrip("\r")
                            self.log.add(session, "info", text, source="user-server", stream=stream)
                    end = event.get("end")
                    if end is not None:
                        status = end.get("status") or f"exit code {end.get('exitCode')}"
                        self.log.add(session, "error", f"user server exited: {status}", source="user-server")
                        return
        except asyncio.CancelledError:
            raise
        except (HutchError, httpx.HTTPError, OSError, KeyError, ValueError) as exc:
            log.debug("session %s: user server output no longer followed: %s", session.session_id, exc)

    # -- lookup ----------------------------------------------------------------------------------

    def active(self, internal_id: str) -> SessionRecord | None:
        return self._active.get(internal_id)

    def active_by_public_id(self, session_id: str) -> SessionRecord | None:
        internal = self._by_public.get(session_id)
        return self._active.get(internal) if internal else None

    def active_by_row(self, row_id: str) -> SessionRecord | None:
        internal = self._by_row.get(row_id)
        return self._active.get(internal) if internal else None

    async def held(self, row_id: str) -> SessionRecord | None:
        """This node's Active session with that row id, also one whose creation or adoption is
        still under way here (a racing gateway may learn of it from MetaDB first)."""
        session = self.active_by_row(row_id)
        if session is not None:
            return session
        try:
            record = await self.metadb.get_session(row_id)
        except NotFound:
            return None
        if not record.active or record.scheduler_id != self.scheduler.scheduler_id:
            return None
        async with self._lock(record.internal_id):  # the create or adoption holds it until done
            return self.active_by_row(row_id)

    async def bound_session(self, tenant_id: str, function: str, key: str, value: str) -> SessionRecord | None:
        """A session by a binding recorded in its metadata (an MCP session id) that this process's
        gateway does not know: none, as every binding of `hutch serve` is in its memory (restored
        from MetaDB at start)."""
        return None

    async def find_by_public_id(self, session_id: str) -> SessionRecord | None:
        """As `active_by_public_id` (all of this process's sessions are in memory)."""
        return self.active_by_public_id(session_id)

    async def find_by_row(self, row_id: str) -> SessionRecord | None:
        """As `active_by_row` (a native session's host-named traffic names its row id)."""
        return self.active_by_row(row_id)

    def active_sessions(self) -> list[SessionRecord]:
        return list(self._active.values())

    async def tenant_sessions(self, tenant_id: str) -> list[SessionRecord]:
        """The tenant's Active sessions."""
        return [s for s in self._active.values() if s.tenant_id == tenant_id]

    async def get(self, tenant_id: str, session_id: str, function: str | None = None) -> SessionRecord:
        """The tenant's session by public id: the live record if Active, else the newest ended one."""
        record = await self.metadb.find_session(tenant_id, session_id, function)
        return self._active.get(record.internal_id, record) if record.active else record

    # -- network -------------------------------------------------------------------------------

    @staticmethod
    def network_of(session: SessionRecord, spec: FunctionSpec) -> dict[str, Any] | None:
        """The egress policy a session's instance runs with: its own, or its function's."""
        if session.network is not None:
            return session.network
        return spec.network.to_runtime() if spec.network is not None else None
