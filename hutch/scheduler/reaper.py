"""Reaping: the sessions past their TTL or idle timeout end (this host's, and a dead node's), and
the activity that the idle timeout counts from is written to MetaDB in batches.
"""

from __future__ import annotations

import logging

from hutch.errors import HutchError
from hutch.metadb.records import EndReason, SessionRecord
from hutch.scheduler.snapshots import SessionSnapshots

log = logging.getLogger(__name__)


class SessionReaper(SessionSnapshots):
    """Ends sessions at TTL or idle (or puts them to sleep: `SessionSleep`), and flushes their activity."""

    async def reap_once(self) -> list[SessionRecord]:
        """End the sessions past their TTL or idle timeout (unless they pause then), and put to
        sleep those idle for their function's freeze time."""
        now = self.clock()
        ended = []
        for session in list(self._active.values()):
            if await self.sleep_or_pause_due(session, now):
                continue
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
