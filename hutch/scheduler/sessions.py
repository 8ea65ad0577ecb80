"""Sessions: create (prewarm + attach), route, recover, renew, end, and reap at TTL or idle.

This is where MetaDB and the scheduler meet. Every change of a session goes through
`SessionManager`, which keeps the Active sessions in memory too (the gateway's route cache), so
the hot path of a request is: keyed hash -> dict lookup -> "is the instance live" (another dict
lookup) -> forward. MetaDB is written when a session is created, re-bound or ended, and in
batches for activity.

Invariants:
- One Active session per internal id (MetaDB enforces it; a per-id lock keeps this process from
  even trying twice), so racing first requests with one key end on one instance.
- An instance serves one session and is destroyed with it.
- A session whose instance died keeps its id and workspace; the next request gets a new instance
  and `epoch` + 1.
- Every Active session is metered (`self.meter`, `hutch.scheduler.metering`) from its creation to
  its end; the meter is told of each bind, crash, recovery and end before the instance goes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import secrets
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

import httpx

from hutch.errors import AlreadyExists, FailedPrecondition, HutchError, InvalidArgument, NotFound
from hutch.functions import BUILTIN_TENANT, FunctionSpec
from hutch.metadb.base import MetaDB
from hutch.metadb.records import EndReason, InstanceRole, SessionRecord, SessionStatus, Tenant
from hutch.runtime.channel import AgentChannel
from hutch.scheduler import interface
from hutch.scheduler.activity import ActivityTracker
from hutch.scheduler.interface import Route
from hutch.scheduler.metering import Meter
from hutch.scheduler.scheduler import USER_SERVER_TAG, Scheduler
from hutch.scheduler.session_log import SessionLog
from hutch.storage.base import check_key
from hutch.types import InstanceId

log = logging.getLogger(__name__)

MAX_LOG_LINE = 4096  # bytes of one line of a user server's output kept in the session's log

# How a session's log says why it ended (E2B's "reaped and why").
ENDED_BECAUSE = {
    EndReason.TTL.value: "its time to live (timeout) ran out",
    EndReason.IDLE.value: "idle for longer than its idle timeout",
    EndReason.DELETED.value: "deleted (killed) by its owner",
    EndReason.FUNCTION_DELETED.value: "its function was deleted",
    EndReason.START_FAILED.value: "its instance could not start",
}

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


class SessionManager:
    """The sessions of this host (`hutch.scheduler.interface.Sessions`, and what a node adds:
    adoption, reconciliation, reaping of dead nodes' sessions)."""

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
        self.on_created: list[Callable[[SessionRecord, float], None]] = []  # (session, seconds it took)
        scheduler.on_crash = self._on_crash

    # -- start and stop ------------------------------------------------------------------------

    async def start(self) -> None:
        """Load functions and Active sessions, adopt surviving instances, start the background loops."""
        for tenant in [BUILTIN_TENANT, *[t.tenant_id for t in await self.metadb.list_tenants()]]:
            for record in await self.metadb.list_functions(tenant):
                spec = FunctionSpec.model_validate(record.spec)
                key = self.pool_key(record.tenant_id, spec.name)
                self._specs[key] = spec
                if spec.warm_pool_size:
                    self.scheduler.set_pool(key, spec)
        adopted = {i.instance_id: i for i in await self.scheduler.start()}
        # `hutch serve` takes every Active session (its scheduler id may have changed with the data
        # dir); a node of a cluster only its own: the others are other nodes'.
        mine = self.scheduler.scheduler_id if self.cluster else None
        for session in await self.metadb.active_sessions(mine):
            self._remember(session)
        bound = {s.instance_id for s in self._active.values() if s.instance_id}
        records = {r.instance_id: r for r in await self.metadb.list_instances(self.scheduler.scheduler_id)}
        for instance_id, instance in adopted.items():
            if instance_id in bound:
                continue
            role = records.get(instance_id)
            if (
                role is not None
                and role.role == InstanceRole.WARM
                and await self.scheduler.adopt_warm(instance, role.pool_key)
            ):
                continue
            keep = not instance.workspace.startswith("_instances/")
            await self.scheduler.release(instance_id, keep_workspace=keep)
        log.info("sessions: %d active, %d instances adopted", len(self._active), len(adopted))
        await self.meter.restore(self._active.values())
        for session in self._active.values():
            self._follow_user_server(session, self._specs.get(self.pool_key(session.tenant_id, session.function)))
        self.scheduler.start_pools()
        self._tasks = [
            asyncio.create_task(self._loop(self.reap_once, self.reap_interval), name="reaper"),
            asyncio.create_task(self._loop(self.flush_activity, self.flush_interval), name="activity-flush"),
            asyncio.create_task(self._loop(self.meter.sample_once, self.meter.sample_interval), name="metering"),
        ]

    async def close(self, end_sessions: bool = False) -> None:
        """Stop the loops and write what is pending. `end_sessions`: also end every Active
        session (reason `shutdown`: usage finished, instance stopped, workspace wiped unless
        kept), for a hutch that stops for good; otherwise they stay for the next start."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for follower in list(self._followers.values()):
            follower.cancel()
        self._followers.clear()
        await self.flush_activity()
        if end_sessions:
            ends = await asyncio.gather(
                *(self.end(s, EndReason.SHUTDOWN) for s in list(self._active.values())), return_exceptions=True
            )
            for failed in (e for e in ends if isinstance(e, BaseException)):
                log.error("ending a session at shutdown: %s", failed)
        await self.meter.sample_once()
        await self.log.flush()

    async def _loop(self, step: Callable[[], Awaitable[object]], interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except HutchError as exc:  # MetaDB locked or full: the next round tries again
                log.warning("background step %s failed: %s", step.__name__, exc.message)
            except Exception:
                log.exception("background step %s failed", step.__name__)

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

    def function_changed(self, tenant_id: str, spec: FunctionSpec | None, name: str) -> None:
        """Called after a function is created, updated (spec) or deleted (None)."""
        key = self.pool_key(tenant_id, name)
        self._resolved.pop((tenant_id, name), None)  # a tenant's function shadows (or unshadows) a built-in
        if spec is None:
            self._specs.pop(key, None)
            self._spawn(self.scheduler.drop_pool(key))
            for session in list(self._active.values()):
                if session.tenant_id == tenant_id and session.function == name:
                    self._spawn(self.end(session, EndReason.FUNCTION_DELETED))
            return
        self._specs[key] = spec
        self.scheduler.set_pool(key, spec)

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
        task = asyncio.get_running_loop().create_task(self._user_server_output(session), name="user-server-log")
        self._followers[session.row_id] = task

    async def _user_server_output(self, session: SessionRecord) -> None:
        try:
            await self._log_user_server(session)
        finally:
            if self._followers.get(session.row_id) is asyncio.current_task():
                del self._followers[session.row_id]

    async def _log_user_server(self, session: SessionRecord) -> None:
        partial = {"stdout": b"", "stderr": b""}
        try:
            path = self.scheduler.socket_path(session.instance_id)  # type: ignore[arg-type]
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

    # -- create --------------------------------------------------------------------------------

    async def create(
        self,
        tenant: Tenant,
        function: str,
        *,
        session_id: str | None = None,
        affinity: str = "API",
        ttl_s: int | None = None,
        idle_timeout_s: int | None = None,
        env: dict[str, str] | None = None,
        metadata: dict[str, Any] | None = None,
        with_token: bool = False,
        existing_ok: bool = False,
        network: dict[str, Any] | None = None,
        traffic: dict[str, Any] | None = None,
    ) -> tuple[SessionRecord, bool]:
        """A new session with its instance (prewarm + attach). Returns (session, created).
        `network`: the session's own egress policy (`NetworkSpec.to_runtime()`), instead of the
        function's; `traffic`: its rules for host-named traffic (`SessionRecord.traffic`).

        Raises:
            InvalidArgument: a malformed session id.
            AlreadyExists: that id is live (unless `existing_ok`, which returns it instead).
            FailedPrecondition: the id was used before and the function disables reuse.
            QuotaExceeded: the tenant is at its quota of live sessions, vCPUs or memory.
        """
        started = time.perf_counter()
        pool_key, spec = await self.function(tenant.tenant_id, function)
        key = check_session_id(session_id) if session_id is not None else new_session_id()
        internal = self.internal_id(tenant.tenant_id, function, key)
        async with self._lock(internal):
            existing = self._active.get(internal)
            if existing is not None:
                if existing_ok:
                    return existing, False
                raise AlreadyExists(f"session {key} is active already")
            if (
                session_id is not None
                and spec.affinity_config.disable_session_id_reuse
                and await self.metadb.internal_id_used(internal)
            ):
                raise FailedPrecondition(f"session id {key} was used before and this function disables reuse")
            now = self.clock()
            ttl = ttl_s if ttl_s is not None else spec.affinity_config.session_ttl_s
            idle = idle_timeout_s if idle_timeout_s is not None else spec.affinity_config.session_idle_timeout_s
            record = SessionRecord(
                row_id=uuid.uuid4().hex,
                internal_id=internal,
                session_id=key,
                tenant_id=tenant.tenant_id,
                function=function,
                affinity=affinity,
                status=SessionStatus.ACTIVE,
                created_at=now,
                last_modified=now,
                last_activity=now,
                expires_at=now + ttl,
                ttl_s=ttl,
                idle_timeout_s=idle,
                scheduler_id=self.scheduler.scheduler_id,
                disable_reuse=spec.affinity_config.disable_session_id_reuse,
                persist_workspace=spec.persist_workspace,
                workspace_key=check_key(f"{tenant.tenant_id}/{internal}"),
                cpu=spec.resources.cpu,
                memory_mb=spec.resources.memory_mb,
                metadata=dict(metadata or {}),
                env=dict(env or {}),
                access_token=secrets.token_urlsafe(24) if with_token else None,
                network=dict(network) if network is not None else None,
                traffic=dict(traffic) if traffic is not None else None,
            )
            try:
                await self.metadb.insert_session(
                    record,
                    max_active=tenant.max_sessions,
                    max_vcpu=tenant.max_vcpu,
                    max_memory_mb=tenant.max_memory_mb,
                )
            except AlreadyExists:
                # Active in MetaDB but not here: a create whose end could not be written (MetaDB was
                # locked or full). It is this session: take it back; `route` gives it an instance.
                stray = await self.metadb.active_session(internal)
                if stray is None or not existing_ok:
                    raise
                if stray.scheduler_id != self.scheduler.scheduler_id:
                    return stray, False  # another node won the race for this key: the gateway goes there
                log.warning("session %s was active in MetaDB only: taking it back", stray.session_id)
                self._remember(stray)
                await self.meter.open(stray)
                return stray, False
            instance = None
            try:
                fresh = not await asyncio.to_thread(self.scheduler.runtime.store.exists, record.workspace_key)
                instance = await self.scheduler.allocate(
                    pool_key,
                    spec,
                    record.workspace_key,
                    record.row_id,
                    env=record.env,
                    fresh_workspace=fresh,
                    network=self.network_of(record, spec),
                )
                record = await self.metadb.update_session(record.row_id, instance_id=instance.instance_id)
            except BaseException:
                if instance is not None:
                    await self.scheduler.release(instance.instance_id, keep_workspace=False)
                with contextlib.suppress(HutchError):
                    await self.metadb.end_session(record.row_id, EndReason.START_FAILED.value, self.clock())
                raise
            self._remember(record)
            await self.meter.open(record)
        self.log.add(record, "info", "created", instance=record.instance_id, ttlSeconds=record.ttl_s)
        self._follow_user_server(record, spec)
        elapsed = time.perf_counter() - started
        for callback in self.on_created:
            callback(record, elapsed)
        return record, True

    # -- lookup and routing --------------------------------------------------------------------

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

    async def route(self, session: SessionRecord) -> Route:
        """Where to send a request for this session; replaces a dead instance first."""
        if self.scheduler.is_live(session.instance_id):
            return self._route(session)
        async with self._lock(session.internal_id):
            current = self._active.get(session.internal_id)
            if current is None or current.row_id != session.row_id:
                raise NotFound(f"session {session.session_id} has ended")
            if not self.scheduler.is_live(current.instance_id):
                current = await self._recover(current)
            return self._route(current)

    def _route(self, session: SessionRecord) -> Route:
        spec = self._specs.get(self.pool_key(session.tenant_id, session.function)) or self._specs.get(
            self.pool_key(BUILTIN_TENANT, session.function)
        )
        assert session.instance_id is not None  # routed only once it has a live instance
        return Route(session, self.scheduler.socket_path(session.instance_id), spec.port if spec else None)

    async def misdirected(self, session: SessionRecord) -> None:
        """Never: a route of this host names no node."""

    async def reroute(self, session: SessionRecord) -> Route:
        """Where to send a request whose instance took no connection (its agent is dead, before
        hutch saw its exit): that instance ends as a crash and the session is recovered.

        Raises:
            NotFound: the session has ended meanwhile.
        """
        await self.scheduler.instance_gone(session.instance_id)
        return await self.route(session)

    async def _recover(self, session: SessionRecord, next_epoch: bool = True) -> SessionRecord:
        """A new instance for a session whose instance is gone, on its workspace; `epoch` + 1
        unless the caller counted it already (an adoption does, in the same write as the move)."""
        pool_key, spec = await self.function(session.tenant_id, session.function)
        log.warning("session %s lost its instance %s: recovering", session.session_id, session.instance_id)
        if session.instance_id is not None:
            await self.meter.instance_down(session.row_id, session.instance_id)
            await self.scheduler.release(session.instance_id, keep_workspace=True)
        instance = await self.scheduler.allocate(
            pool_key,
            spec,
            session.workspace_key,
            session.row_id,
            env=session.env,
            fresh_workspace=False,
            network=self.network_of(session, spec),
        )
        try:
            updated = await self.metadb.update_session(
                session.row_id,
                instance_id=instance.instance_id,
                epoch=session.epoch + 1 if next_epoch else session.epoch,
                last_modified=self.clock(),
                scheduler_id=self.scheduler.scheduler_id,
            )
        except BaseException:
            # MetaDB did not take the new binding: no instance may run for nobody (the next request
            # recovers again).
            await self.scheduler.release(instance.instance_id, keep_workspace=True)
            raise
        self._remember(updated)
        await self.meter.instance_up(updated)
        self.log.add(
            updated,
            "warn",
            "instance replaced: processes and memory were lost, files kept",
            lost=session.instance_id,
            instance=updated.instance_id,
            epoch=updated.epoch,
        )
        self._follow_user_server(updated, spec)
        return updated

    # -- a cluster's nodes ---------------------------------------------------------------------

    async def adopt(self, row_id: str, dead_node: str) -> SessionRecord:
        """Take over a session of a dead node (a gateway saw its lease run out): move it here in
        MetaDB (one compare-and-set, `epoch` + 1) and give it an instance on its workspace, which
        a shared store lets this host attach. If another node took it first, that node's record
        is returned and nothing happens here.

        Raises:
            NotFound: the session has ended.
        """
        moved = await self.metadb.rehome_session(row_id, dead_node, self.scheduler.scheduler_id, self.clock())
        if moved is None:
            current = await self.metadb.get_session(row_id)
            if not current.active:
                raise NotFound(f"session {current.session_id} has ended")
            return current  # taken by another node (or by us, a moment ago)
        log.warning("session %s: adopted from dead node %s", moved.session_id, dead_node)
        self.log.add(moved, "warn", "moved to this node: its node stopped answering", fromNode=dead_node)
        self._remember(moved)
        await self.meter.restore([moved])
        await self._announce(moved)
        async with self._lock(moved.internal_id):
            return await self._recover(moved, next_epoch=False)

    async def reconcile(self) -> None:
        """Make this node's sessions MetaDB's: drop those that moved away or ended while this node
        could not see MetaDB (stopping their instances, keeping workspaces another node may use
        now), and take renewals and network changes made meanwhile."""
        held = {s.row_id: s for s in await self.metadb.active_sessions(self.scheduler.scheduler_id)}
        for session in list(self._active.values()):
            current = held.get(session.row_id)
            if current is not None:
                if current.instance_id == session.instance_id:
                    self._remember(current)
                continue
            async with self._lock(session.internal_id):
                if self._active.get(session.internal_id) is not session:
                    continue
                self._forget(session)
            log.warning("session %s is no longer on this node: its instance stops", session.session_id)
            record = await self.metadb.get_session(session.row_id)
            ours = record.scheduler_id == session.scheduler_id  # ended while still bound here
            if ours and not record.active:
                await self.meter.finish(record)
            else:
                self.meter.drop(record.row_id)  # the node it moved to meters it (and ended it, if so)
            if session.instance_id is not None:
                await self.scheduler.release(session.instance_id, keep_workspace=True)
            if ours and not record.active and not record.persist_workspace:
                await self.scheduler.forget_workspace(record.workspace_key)
            for callback in self.on_end:
                callback(record)

    def _on_crash(self, instance_id: InstanceId) -> None:
        for session in self._active.values():
            if session.instance_id == instance_id:
                log.warning("instance %s of session %s crashed", instance_id, session.session_id)
                self.log.add(session, "error", "instance crashed", instance=instance_id)
                self._spawn(self.meter.instance_down(session.row_id, instance_id))

    # -- network -------------------------------------------------------------------------------

    @staticmethod
    def network_of(session: SessionRecord, spec: FunctionSpec) -> dict[str, Any] | None:
        """The egress policy a session's instance runs with: its own, or its function's."""
        if session.network is not None:
            return session.network
        return spec.network.to_runtime() if spec.network is not None else None

    async def set_network(self, session: SessionRecord, policy: dict[str, Any]) -> SessionRecord:
        """Change a live session's egress policy now (and for any instance that replaces it).

        Raises:
            FailedPrecondition: the session has ended, or its instance has no network at all.
        """
        async with self._lock(session.internal_id):
            current = self._active.get(session.internal_id)
            if current is None or current.row_id != session.row_id:
                raise FailedPrecondition(f"session {session.session_id} is not active")
            if current.instance_id is not None and self.scheduler.is_live(current.instance_id):
                await self.scheduler.runtime.set_network(current.instance_id, policy)
            updated = await self.metadb.update_session(current.row_id, network=dict(policy), last_modified=self.clock())
            self._remember(updated)
            return updated

    # -- renew and end -------------------------------------------------------------------------

    async def renew(
        self, session: SessionRecord, ttl_s: int | None = None, idle_timeout_s: int | None = None
    ) -> SessionRecord:
        """Extend an Active session: TTL counted again from now, and/or a new idle timeout."""
        async with self._lock(session.internal_id):
            current = self._active.get(session.internal_id)
            if current is None or current.row_id != session.row_id:
                raise FailedPrecondition(f"session {session.session_id} is not active")
            now = self.clock()
            changes: dict[str, Any] = {"last_modified": now}
            if ttl_s is not None:
                changes.update(ttl_s=ttl_s, expires_at=now + ttl_s)
            if idle_timeout_s is not None:
                changes["idle_timeout_s"] = idle_timeout_s
            updated = await self.metadb.update_session(current.row_id, **changes)
            self._remember(updated)
        self.log.add(updated, "info", "renewed", ttlSeconds=ttl_s, idleTimeoutSeconds=idle_timeout_s)
        await self._announce(updated)
        return updated

    async def _announce(self, session: SessionRecord) -> None:
        """Tell the gateways of a cluster that their cached route of this session is stale."""
        if self.cluster:
            try:
                await self.metadb.announce(session.internal_id)
            except HutchError as exc:  # their next request is answered "misdirected" and re-read
                log.warning("session %s: change notice not sent: %s", session.session_id, exc.message)

    async def end(self, session: SessionRecord, reason: EndReason | str) -> SessionRecord | None:
        """End a session now: instance destroyed, workspace wiped unless the function keeps it."""
        reason_value = reason.value if isinstance(reason, EndReason) else reason
        # The whole end holds the key's lock: a new session of the same key (same workspace key)
        # must not start until the old instance is gone and its workspace wiped, or it would
        # find the old files, or lose its own to the wipe.
        async with self._lock(session.internal_id):
            ended = await self.metadb.end_session(session.row_id, reason_value, self.clock())
            if ended is None:
                return None
            self.log.add(ended, "info", f"ended: {ENDED_BECAUSE.get(reason_value, reason_value)}", reason=reason_value)
            current = self._active.get(session.internal_id)
            if current is not None and current.row_id == session.row_id:
                self._forget(current)
            await self._announce(ended)
            await self.meter.finish(ended)
            keep = ended.persist_workspace
            stopped = False
            if ended.instance_id is not None:
                stopped = await self.scheduler.release(ended.instance_id, keep_workspace=keep)
            if not stopped and not keep:
                await self.scheduler.forget_workspace(ended.workspace_key)
        for callback in self.on_end:
            try:
                callback(ended)
            except Exception:
                log.exception("session end callback")
        return ended

    async def reap_once(self) -> list[SessionRecord]:
        """End the sessions past their TTL or idle timeout."""
        now = self.clock()
        ended = []
        for session in list(self._active.values()):
            if now >= session.expires_at:
                reason = EndReason.TTL
            elif (
                session.idle_timeout_s > 0
                and not self.activity.busy(session.row_id)
                and now - self.activity.last(session.row_id, session.last_activity) >= session.idle_timeout_s
            ):
                reason = EndReason.IDLE
            else:
                continue
            try:
                record = await self.end(session, reason)
            except HutchError:
                log.exception("reaping session %s", session.session_id)
                continue
            if record is not None:
                log.info("session %s ended: %s", session.session_id, reason.value)
                ended.append(record)
        return ended

    async def reap_orphans(self, live_nodes: set[str]) -> list[SessionRecord]:
        """End the sessions of dead nodes that are past their TTL or idle timeout. Nobody else
        would: they move to a live node only on their next request, which may never come. Each
        is moved here first (the compare-and-set of `adopt`, so a racing adoption wins or loses
        whole), then ended as if it had been reaped here: usage closed, workspace wiped unless
        kept. A cluster node's job (`hutch.cluster.node.Lease`)."""
        now = self.clock()
        ended = []
        for session in await self.metadb.active_sessions():
            dead = session.scheduler_id or ""
            if dead in live_nodes or dead == self.scheduler.scheduler_id:
                continue
            if now >= session.expires_at:
                reason = EndReason.TTL
            elif session.idle_timeout_s > 0 and now - session.last_activity >= session.idle_timeout_s:
                reason = EndReason.IDLE
            else:
                continue
            moved = await self.metadb.rehome_session(session.row_id, dead, self.scheduler.scheduler_id, now)
            if moved is None:
                continue  # adopted or ended meanwhile
            self._remember(moved)
            await self.meter.restore([moved])
            record = await self.end(moved, reason)
            if record is not None:
                log.info("session %s of dead node %s ended: %s", session.session_id, dead, reason.value)
                ended.append(record)
        return ended

    async def flush_activity(self) -> None:
        await self.log.flush()
        dirty = self.activity.drain()
        if not dirty:
            return
        for row_id, at in dirty.items():
            for session in self._active.values():
                if session.row_id == row_id and at > session.last_activity:
                    session.last_activity = at
                    break
        try:
            await self.metadb.touch_sessions(dirty)
        except BaseException:
            self.activity.requeue(dirty)  # written with the next flush
            raise


if TYPE_CHECKING:

    def _implements(manager: SessionManager) -> interface.Sessions:  # mypy checks the seam here
        return manager
