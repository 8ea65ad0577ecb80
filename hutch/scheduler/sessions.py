"""Sessions: create (prewarm + attach), route, recover, renew, end, and reap at TTL or idle.

This is where MetaDB and the scheduler meet. Every change of a session goes through
`SessionManager`, which keeps the Active sessions in memory too (the gateway's route cache), so
the hot path of a request is: keyed hash -> dict lookup -> "is the instance live" (another dict
lookup) -> forward. MetaDB is written when a session is created, re-bound or ended, and in
batches for activity.

`SessionManager` is composed of one class per concern, each in its own module:
- `hutch.scheduler.session_table.SessionTable`: the Active sessions in memory, their indexes and
  per-key locks, the functions' specs, and the lookups over them;
- `hutch.scheduler.lifecycle.SessionLifecycle`: create, route (a new instance for a session whose
  instance died), renew, set the network, end;
- `hutch.scheduler.recovery.SessionRecovery`: what a restart finds, adoption of a dead node's
  sessions, reconciliation of a node with MetaDB, crashes;
- `hutch.scheduler.sleep.SessionSleep`: idle sessions frozen and woken by their next request,
  E2B's pause and resume;
- `hutch.scheduler.snapshots.SessionSnapshots`: a session's files copied out (snapshots);
- `hutch.scheduler.reaper.SessionReaper`: ends at TTL or idle, activity written in batches.
This module starts and stops them (the background loops) and is the one the rest imports.

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
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from hutch.errors import HutchError
from hutch.metadb.base import MetaDB
from hutch.metadb.records import EndReason
from hutch.scheduler import interface
from hutch.scheduler.metering import Meter
from hutch.scheduler.reaper import SessionReaper
from hutch.scheduler.recovery import SessionRecovery
from hutch.scheduler.scheduler import Scheduler
from hutch.scheduler.session_table import MAX_E2B_TIMEOUT_S, SESSION_ID, check_session_id, new_session_id

__all__ = ["MAX_E2B_TIMEOUT_S", "SESSION_ID", "SessionManager", "check_session_id", "new_session_id"]

log = logging.getLogger(__name__)


class SessionManager(SessionRecovery, SessionReaper):
    """The sessions of this host (`hutch.scheduler.interface.Sessions`, and what a node adds:
    adoption, reconciliation, reaping of dead nodes' sessions). The state and lookups are
    `SessionTable`'s; each concern is a class of its own, composed here:
    `SessionLifecycle` (create, route, renew, end), `SessionRecovery` (restart, adoption) and
    `SessionReaper` (TTL, idle, activity)."""

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
        super().__init__(metadb, scheduler, secret, clock, reap_interval, flush_interval, meter, cluster)
        scheduler.on_crash = self._on_crash

    # -- start and stop ------------------------------------------------------------------------

    async def start(self) -> None:
        """Load functions and Active sessions, adopt surviving instances, start the background loops."""
        await self.restore()
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


if TYPE_CHECKING:

    def _implements(manager: SessionManager) -> interface.Sessions:  # mypy checks the seam here
        return manager
