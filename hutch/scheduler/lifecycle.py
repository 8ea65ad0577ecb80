"""Sessions' lifecycle: create (prewarm + attach), route (bind a new instance to a session whose
instance died), renew, change the network, end.

Invariants (see `hutch.scheduler.sessions`): one Active session per internal id, under the key's
lock; an instance serves one session and is destroyed with it; a session that lost its instance
keeps its id and workspace, and its next request gets a new instance and `epoch` + 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from typing import Any

from hutch.errors import AlreadyExists, FailedPrecondition, HutchError, NotFound
from hutch.functions import FunctionSpec
from hutch.metadb.records import EndReason, SessionRecord, SessionStatus, Tenant
from hutch.runtime.base import Instance
from hutch.scheduler.interface import Route
from hutch.scheduler.session_table import SessionTable, check_session_id, new_session_id
from hutch.storage.base import check_key

log = logging.getLogger(__name__)

# How a session's log says why it ended (E2B's "reaped and why").
ENDED_BECAUSE = {
    EndReason.TTL.value: "its time to live (timeout) ran out",
    EndReason.IDLE.value: "idle for longer than its idle timeout",
    EndReason.DELETED.value: "deleted (killed) by its owner",
    EndReason.FUNCTION_DELETED.value: "its function was deleted",
    EndReason.START_FAILED.value: "its instance could not start",
}


class SessionLifecycle(SessionTable):
    """Every change of one session that a request or the API asks for."""

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
        lifecycle: dict[str, Any] | None = None,
    ) -> tuple[SessionRecord, bool]:
        """A new session with its instance (prewarm + attach). Returns (session, created).
        `network`: the session's own egress policy (`NetworkSpec.to_runtime()`), instead of the
        function's; `traffic`: its rules for host-named traffic (`SessionRecord.traffic`);
        `lifecycle`: what its timeout does (`SessionRecord.lifecycle`).

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
                lifecycle=dict(lifecycle) if lifecycle is not None else None,
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
                instance = await self._allocate(record, pool_key, spec, fresh=fresh)
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

    # -- routing -------------------------------------------------------------------------------

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
        spec = self._spec_of(session)
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

    async def _allocate(
        self, session: SessionRecord, pool_key: str, spec: FunctionSpec, fresh: bool = False, **more: Any
    ) -> Instance:
        """An instance for the session, on its workspace (`fresh`: a new one), with its
        environment and network (`Scheduler.allocate`, which takes `more`)."""
        return await self.scheduler.allocate(
            pool_key,
            spec,
            session.workspace_key,
            session.row_id,
            env=session.env,
            fresh_workspace=fresh,
            network=self.network_of(session, spec),
            **more,
        )

    async def _take_over(self, moved: SessionRecord) -> SessionRecord:
        """An instance here for a session just moved from a dead node (`SessionRecovery.adopt`;
        `epoch` + 1 counted by the move). Called under the session's lock."""
        return await self._recover(moved, next_epoch=False)

    async def _recover(self, session: SessionRecord, next_epoch: bool = True) -> SessionRecord:
        """A new instance for a session whose instance is gone, on its workspace; `epoch` + 1
        unless the caller counted it already (an adoption does, in the same write as the move)."""
        pool_key, spec = await self.function(session.tenant_id, session.function)
        log.warning("session %s lost its instance %s: recovering", session.session_id, session.instance_id)
        if session.instance_id is not None:
            await self.meter.instance_down(session.row_id, session.instance_id)
            await self.scheduler.release(session.instance_id, keep_workspace=True)
        instance = await self._allocate(session, pool_key, spec)
        epoch = session.epoch + 1 if next_epoch else session.epoch
        return await self._bind(
            session,
            instance,
            spec,
            epoch,
            None,  # a new instance runs
            "warn",
            "instance replaced: processes and memory were lost, files kept",
            lost=session.instance_id,
            epoch=epoch,
        )

    async def _bind(
        self,
        session: SessionRecord,
        instance: Instance,
        spec: FunctionSpec,
        new_epoch: int,
        sleep: dict[str, Any] | None,
        level: str,
        message: str,
        **fields: Any,
    ) -> SessionRecord:
        """Record a new instance of this node as the session's (at `new_epoch`, asleep as `sleep`
        says), meter and follow it, and log why. Called under the session's lock."""
        try:
            updated = await self.metadb.update_session(
                session.row_id,
                instance_id=instance.instance_id,
                epoch=new_epoch,
                last_modified=self.clock(),
                scheduler_id=self.scheduler.scheduler_id,
                sleep=sleep,
            )
        except BaseException:
            # MetaDB did not take the new binding: no instance may run for nobody (the next request
            # recovers again).
            await self.scheduler.release(instance.instance_id, keep_workspace=True)
            raise
        self._remember(updated)
        await self.meter.instance_up(updated)
        self.log.add(updated, level, message, instance=instance.instance_id, **fields)
        self._follow_user_server(updated, spec)
        return updated

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
