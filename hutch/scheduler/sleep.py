"""Sleeping sessions: an idle session's instance is frozen (no CPU, its memory and processes
kept) and woken by the next request, or paused on demand (E2B's `pause`, or its timeout with
`lifecycle.on_timeout: pause`) and resumed when asked.

Two kinds of sleep:
- **idle**: a function's `sessionFreezeAfterIdleInSeconds`; any request wakes the session
  transparently (the client sees a few milliseconds more, never an error). Its TTL and idle
  timeout keep counting: a sleeping session still ends at them.
- **paused**: E2B's pause. Traffic wakes it only when its lifecycle says `auto_resume` (its
  timeout then starts again from the wake); otherwise its traffic is refused (`Paused`: 409; E2B
  traffic gets E2B's 502, "not running") until `connect`/`resume`.
  While paused it is kept for `paused_retention_s` from the pause, then ended.

Three ways to sleep: **frozen** (`Runtime.freeze`: RAM held, no CPU, the wake takes
milliseconds), **hibernated** (`Runtime.hibernate`: memory and processes written to disk, no RAM
and no process; the wake restores them, same `epoch`, in a few hundred milliseconds; where the
runtime can: CRIU, a bwrap template instance; else such a sleep freezes), or
**stopped** (E2B's filesystem-only pause: the instance ends and its files stay; the wake boots a
new instance on them, `epoch` + 1, as after a crash).

A pause with memory hibernates where it can. An idle session freezes after its function's
`sessionFreezeAfterIdleInSeconds` and hibernates after `sessionHibernateAfterIdleInSeconds`
(either may be 0: that tier is skipped). Before a hibernation hutch closes its own connections to
the instance (`on_quiesce`). A failed hibernation leaves the session frozen or running, as it
was; a failed restore replaces the instance on the session's files (`epoch` + 1): the client
never sees an error.

The state is the session's `sleep` in MetaDB, so a restart keeps it (with `live_restore` the
frozen instance is adopted as it is; otherwise the instance is gone and the wake starts a new one
on the session's files). Metering: a frozen instance burns no CPU and serves no request, so it is billed at the idle
rate; a hibernated or stopped one is down (disk only).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from hutch.errors import FailedPrecondition, HutchError, Paused
from hutch.metadb.records import SessionRecord
from hutch.runtime.base import moved_image
from hutch.scheduler.interface import Route
from hutch.scheduler.lifecycle import SessionLifecycle
from hutch.types import InstanceId

log = logging.getLogger(__name__)

PAUSED_RETENTION_S = 86400.0  # how long a paused session is kept (`paused_retention` in the config)
FROZEN = "frozen"  # the instance's processes stopped where they stood, memory kept
HIBERNATED = "hibernated"  # the instance's memory and processes on disk, nothing of it running
STOPPED = "stopped"  # the instance gone, the session's files kept


class SessionSleep(SessionLifecycle):
    """Puts sessions to sleep and wakes them (see the module docstring)."""

    paused_retention_s: float = PAUSED_RETENTION_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cannot_sleep: set[str] = set()  # row ids whose idle freeze failed: not tried again
        self._cannot_hibernate: set[str] = set()  # row ids whose idle hibernation failed: not tried again
        # Sessions whose instance is being dumped (hibernation, checkpoint), hutch's connections
        # to it cut (`_quiesce`): their requests wait for the dump instead of reaching it.
        self._quiesced: set[str] = set()

    async def route(self, session: SessionRecord) -> Route:
        """`SessionLifecycle.route`, waking a sleeping session first. The request counts as
        activity from here, so the reaper cannot put the session to sleep between its route and
        its forwarding."""
        current = self._active.get(session.internal_id)
        if current is not None:
            self.activity.touch(current.row_id)
            if current.internal_id in self._quiesced:
                async with self._lock(current.internal_id):  # the dump holds it: asleep after, or not
                    pass
                current = self._active.get(session.internal_id) or current
            if current.sleep is not None:
                if current.paused and not (current.lifecycle or {}).get("auto_resume"):
                    raise Paused(
                        f"sandbox {current.session_id} is paused: resume it first (Sandbox.connect), "
                        "or create it with lifecycle auto_resume"
                    )
                current, _ = await self.wake(current)
                session = current
        return await super().route(session)

    async def sleep(
        self, session: SessionRecord, paused: bool = True, memory: bool = True, hibernate: bool | None = None
    ) -> tuple[SessionRecord, bool]:
        """Put the session to sleep. `paused`: E2B's pause (woken only when asked, kept
        `paused_retention_s`); else idle sleep (any request wakes it). `memory`: keep its
        processes and memory, hibernated to disk where the runtime can and `hibernate` (default:
        `paused`) says so, else frozen; False: stop it and keep only its files (E2B's
        filesystem-only pause: no RAM held; the wake boots a new instance, `epoch` + 1).
        Returns (the session, whether it fell asleep now: False if it already slept).

        Raises:
            FailedPrecondition: the session has ended, or has no live instance.
            Unimplemented: this backend cannot freeze.
            IsolationError: the freeze failed (the session runs on).
        """
        async with self._lock(session.internal_id):
            current = self._current(session)
            if current.sleep is not None:
                if paused and not current.paused:  # an idly frozen session paused by its owner
                    kept = current.sleep
                    return await self._record_sleep(
                        current, paused, kept["state"], kept.get("image_bytes"), kept.get("image_of")
                    ), True
                return current, False
            instance_id = current.instance_id
            if instance_id is None or not self.scheduler.is_live(instance_id):
                raise FailedPrecondition(f"session {current.session_id} has no running instance to pause")
            if not memory:
                await self.meter.instance_down(current.row_id, instance_id)
                await self.scheduler.release(instance_id, keep_workspace=True)
                updated = await self._record_sleep(current, paused, STOPPED, instance_id=None)
            else:
                hibernated = None
                if (paused if hibernate is None else hibernate) and self.scheduler.can_hibernate(instance_id):
                    hibernated = await self._hibernate(current, paused)
                if hibernated is not None:
                    updated = hibernated
                else:
                    await self.scheduler.freeze(instance_id)
                    try:
                        updated = await self._record_sleep(current, paused, FROZEN)
                    except BaseException:
                        await self.scheduler.thaw(instance_id)  # MetaDB did not take it: awake
                        raise
        how = f"{(updated.sleep or {}).get('state')}, memory kept" if memory else "stopped, files kept"
        self.log.add(updated, "info", f"paused: {how}" if paused else f"asleep while idle: {how}")
        return updated, True

    async def _hibernate(self, session: SessionRecord, paused: bool) -> SessionRecord | None:
        """Hibernate the session's instance (frozen or not) and record it; None if the dump
        failed (logged; the instance is as it was). Called under the session's lock."""
        instance_id = session.instance_id
        assert instance_id is not None
        over = await self.image_quota_left(session.tenant_id, await self._memory_of(instance_id))
        if over is not None:
            log.info("session %s is not hibernated: %s", session.session_id, over)
            self.log.add(session, "warn", f"not hibernated: {over}")
            return None
        await self._quiesce(session)
        try:
            # Accounted up to now while its cgroups still exist; down (disk only) from here.
            await self.meter.instance_down(session.row_id, instance_id)
            try:
                image = await self.scheduler.hibernate(instance_id)
            except HutchError as exc:
                log.warning("session %s could not hibernate (it stays as it was): %s", session.session_id, exc.message)
                self.log.add(session, "warn", f"hibernation failed: {exc.message}")
                await self.meter.instance_up(session)
                self._unquiesce(session)
                return None
            try:
                # A movable image (on a shared store) is named in MetaDB for the node that may
                # take the session over should this one die (`SessionRecovery.adopt`).
                moves = instance_id if image.movable else None
                return await self._record_sleep(session, paused, HIBERNATED, image.size_bytes, image_of=moves)
            except BaseException:
                await self.scheduler.restore(instance_id)  # MetaDB did not take it: awake
                await self.meter.instance_up(session)
                self._unquiesce(session)
                raise
        finally:
            self._quiesced.discard(session.internal_id)

    async def _memory_of(self, instance_id: InstanceId) -> int:
        """What an image of the instance may take: its memory now (compression only shrinks it)."""
        try:
            return (await self.scheduler.runtime.stats(instance_id)).memory_bytes
        except HutchError:
            return 0

    async def image_disk_used(self, tenant_id: str) -> int:
        """The disk a tenant's images take here: its hibernated sessions' and its memory
        snapshots' checkpoints (bytes)."""
        used = sum(
            int((s.sleep or {}).get("image_bytes", 0))
            for s in self.active_sessions()
            if s.tenant_id == tenant_id and (s.sleep or {}).get("state") == HIBERNATED
        )
        templates = self.scheduler.templates
        if templates is not None:
            store = templates.store
            snapshots = [t.layers[-1] for t in store.templates() if t.owner == tenant_id and t.memory]
            used += sum(await asyncio.to_thread(lambda: [store.memory_bytes(layer) for layer in snapshots]))
        return used

    async def image_quota_left(self, tenant_id: str, more_bytes: int) -> str | None:
        """None if `more_bytes` of images fit in the tenant's `max_image_disk_mb`; else why not."""
        quota = (await self.metadb.get_tenant(tenant_id)).max_image_disk_mb
        if quota is None:
            return None
        used = await self.image_disk_used(tenant_id)
        if used + more_bytes <= quota << 20:
            return None
        return (
            f"the tenant's images would take more than its maxImageDiskMB {quota} "
            f"({used >> 20} MB used, about {more_bytes >> 20} MB more)"
        )

    async def _quiesce(self, session: SessionRecord) -> None:
        """Close every connection hutch holds to the session's instance, which CRIU cannot dump
        one end of, and hold its new requests until the caller is done (`_unquiesce` if the
        instance runs on; the caller holds the session's lock throughout)."""
        assert session.instance_id is not None
        self._quiesced.add(session.internal_id)
        for callback in self.on_quiesce:
            callback(session.instance_id)
        # The log of its user server follows the agent over a connection of its own.
        follower = self._followers.pop(session.row_id, None)
        if follower is not None:
            follower.cancel()
            await asyncio.wait({follower}, timeout=1)

    def _unquiesce(self, session: SessionRecord) -> None:
        """The instance runs on after `_quiesce`: its requests and its user server's log go on."""
        self._quiesced.discard(session.internal_id)
        self._follow_user_server(session, self._spec_of(session))

    async def hibernate_frozen(self, session: SessionRecord) -> bool:
        """The second tier of an idle sleep: a frozen session goes to disk. True if it did."""
        async with self._lock(session.internal_id):
            current = self._current(session)
            if (current.sleep or {}).get("state") != FROZEN or current.instance_id is None:
                return False
            if not self.scheduler.can_hibernate(current.instance_id):
                return False
            updated = await self._hibernate(current, current.paused)
        if updated is None:
            return False
        self.log.add(updated, "info", "asleep while idle: hibernated, memory kept")
        return True

    async def _record_sleep(
        self,
        session: SessionRecord,
        paused: bool,
        state: str,
        image_bytes: int | None = None,
        image_of: str | None = None,
        **more: Any,
    ) -> SessionRecord:
        now = self.clock()
        sleep: dict[str, Any] = {"state": state, "since": now, "paused": paused}
        if image_bytes is not None:
            sleep["image_bytes"] = image_bytes  # counted against the tenant's `max_image_disk_mb`
        if image_of is not None:
            sleep["image_of"] = image_of
        changes: dict[str, Any] = {"sleep": sleep, "last_modified": now}
        if paused:
            changes["expires_at"] = now + self.paused_retention_s
        updated = await self.metadb.update_session(session.row_id, **changes, **more)
        self._remember(updated)
        await self._announce(updated)
        return updated

    async def wake(self, session: SessionRecord, ttl_s: int | None = None) -> tuple[SessionRecord, bool]:
        """Wake a sleeping session (thaw its instance, or start a new one on its files if the
        instance is gone). A paused one gets a fresh timeout: `ttl_s`, else its own TTL. Returns
        (the session, whether it slept).

        Raises:
            FailedPrecondition: the session has ended.
        """
        async with self._lock(session.internal_id):
            current = self._current(session)
            if current.sleep is None:
                return current, False
            now = self.clock()
            changes: dict[str, Any] = {"sleep": None, "last_modified": now}
            if current.paused or ttl_s is not None:
                ttl = ttl_s if ttl_s is not None else current.ttl_s
                changes.update(ttl_s=ttl, expires_at=now + ttl)
            if current.sleep.get("state") == HIBERNATED and self.scheduler.hibernated(current.instance_id):
                updated = await self._restore(current, changes)
            elif current.instance_id is not None and self.scheduler.is_live(current.instance_id):
                await self.scheduler.thaw(current.instance_id)
                updated = await self.metadb.update_session(current.row_id, **changes)
                self._remember(updated)
            else:  # its instance ended while it slept (a restart without live_restore): files kept
                self._remember(await self.metadb.update_session(current.row_id, **changes))
                updated = await self._recover(self._current(current))
            await self._announce(updated)
        self.log.add(updated, "info", "resumed" if current.paused else "woken by a request")
        return updated, True

    async def _restore(self, session: SessionRecord, changes: dict[str, Any]) -> SessionRecord:
        """Bring a hibernated session's instance back; if it cannot be, a new instance on the
        session's files (`epoch` + 1), as after a crash. Called under the session's lock."""
        assert session.instance_id is not None
        try:
            await self.scheduler.restore(session.instance_id)
        except HutchError as exc:
            log.error("session %s: restore failed, recovering on its files: %s", session.session_id, exc.message)
            self._remember(await self.metadb.update_session(session.row_id, **changes))
            return await self._recover(self._current(session))
        try:
            updated = await self.metadb.update_session(session.row_id, **changes)
        except BaseException:
            # MetaDB still says hibernated: back to disk, or the next wake finds it running.
            with contextlib.suppress(HutchError):
                await self.scheduler.hibernate(session.instance_id)
            raise
        self._remember(updated)
        await self.meter.instance_up(updated)
        self._follow_user_server(updated, self._spec_of(updated))
        return updated

    async def _take_over(self, moved: SessionRecord) -> SessionRecord:
        """A session hibernated on a node that died, its image on the shared store: its instance
        here starts from that image, with its memory and processes, on its files (`epoch` as it
        was: nothing was lost); a paused one stays paused (frozen here). Without such an image,
        or if it cannot be restored (then it is gone), a new instance on its files."""
        image_of = (moved.sleep or {}).get("image_of")
        if (moved.sleep or {}).get("state") != HIBERNATED or not image_of:
            return await super()._take_over(moved)
        pool_key, spec = await self.function(moved.tenant_id, moved.function)
        try:
            instance = await self._allocate(moved, pool_key, spec, memory_image=moved_image(image_of))
        except HutchError as exc:
            log.error("session %s: its hibernation image could not be restored here: %s", moved.session_id, exc.message)
            self.log.add(moved, "warn", f"its hibernation image could not be restored here: {exc.message}")
            return await super()._take_over(moved)
        sleep = {"state": FROZEN, "since": self.clock(), "paused": True} if moved.paused else None
        if sleep is not None:
            try:
                await self.scheduler.freeze(instance.instance_id)
            except BaseException:
                await self.scheduler.release(instance.instance_id, keep_workspace=True)
                raise
        # The move counted a loss (`epoch` + 1); the memory came along.
        message = "restored here from its hibernation image, memory kept"
        return await self._bind(moved, instance, spec, moved.epoch - 1, sleep, "info", message)

    def _forget(self, session: SessionRecord) -> None:
        super()._forget(session)
        self._cannot_sleep.discard(session.row_id)
        self._cannot_hibernate.discard(session.row_id)

    def _current(self, session: SessionRecord) -> SessionRecord:
        current = self._active.get(session.internal_id)
        if current is None or current.row_id != session.row_id:
            raise FailedPrecondition(f"session {session.session_id} is not active")
        return current

    # -- the reaper's part ----------------------------------------------------------------------

    async def sleep_or_pause_due(self, session: SessionRecord, now: float) -> bool:
        """What the reaper does first for each session: at its timeout, a session whose lifecycle
        says `on_timeout: pause` is paused instead of ended; an idle one whose function sleeps
        when idle is frozen or hibernated (a frozen one hibernated later). True if the session
        was put to sleep here (the reaper is done with it)."""
        try:
            if now >= session.expires_at:
                if session.paused or (session.lifecycle or {}).get("on_timeout") != "pause":
                    return False
                await self.sleep(session, paused=True, memory=bool((session.lifecycle or {}).get("memory", True)))
                log.info("session %s paused at its timeout", session.session_id)
                return True
            if self.activity.busy(session.row_id):
                return False
            spec = self._spec_of(session)
            freeze_after = spec.affinity_config.session_freeze_after_idle_s if spec is not None else 0
            hibernate_after = spec.affinity_config.session_hibernate_after_idle_s if spec is not None else 0
            idle = now - self.activity.last(session.row_id, session.last_activity)
            if session.sleep is not None:
                # The second tier: a frozen idle session goes to disk.
                if (
                    session.paused
                    or session.sleep.get("state") != FROZEN
                    or hibernate_after <= 0
                    or idle < hibernate_after
                    or session.row_id in self._cannot_hibernate
                ):
                    return False
                if not await self.hibernate_frozen(session):
                    self._cannot_hibernate.add(session.row_id)
                    return False
                return True
            if session.row_id in self._cannot_sleep:
                return False
            if hibernate_after > 0 and idle >= hibernate_after:
                hibernate = True  # the deeper tier (where the runtime cannot, this freezes)
            elif freeze_after > 0 and idle >= freeze_after:
                hibernate = False
            else:
                return False
            try:
                await self.sleep(session, paused=False, hibernate=hibernate)
            except HutchError:
                self._cannot_sleep.add(session.row_id)
                raise
            return True
        except HutchError as exc:
            log.warning("session %s could not sleep: %s", session.session_id, exc.message)
            return False
