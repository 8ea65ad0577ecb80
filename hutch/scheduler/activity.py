"""Request activity per session: what the idle timeout and metering are computed from.

The gateway calls `begin`/`end` around every forwarded request, so an open stream keeps a session
busy for as long as it is open. Times are kept in memory and written to MetaDB in batches
(`drain`), never on the request path. `on_change(row_id, busy, at)` is told the exact moment a
session goes from no request in flight to one (busy) and back (`hutch.scheduler.metering`).
"""

from __future__ import annotations

import time
from collections.abc import Callable


class ActivityTracker:
    def __init__(
        self, clock: Callable[[], float] = time.time, on_change: Callable[[str, bool, float], None] | None = None
    ) -> None:
        self.clock = clock
        self.on_change = on_change
        self._inflight: dict[str, int] = {}
        self._last: dict[str, float] = {}
        self._dirty: dict[str, float] = {}

    def begin(self, row_id: str) -> None:
        now = self.clock()
        count = self._inflight.get(row_id, 0)
        self._inflight[row_id] = count + 1
        self._last[row_id] = now
        self._dirty[row_id] = now
        if count == 0 and self.on_change is not None:
            self.on_change(row_id, True, now)

    def end(self, row_id: str) -> None:
        now = self.clock()
        count = self._inflight.get(row_id, 0) - 1
        if count > 0:
            self._inflight[row_id] = count
        elif self._inflight.pop(row_id, None) is not None and self.on_change is not None:
            self.on_change(row_id, False, now)
        self._last[row_id] = now
        self._dirty[row_id] = now

    def touch(self, row_id: str) -> None:
        now = self.clock()
        self._last[row_id] = now
        self._dirty[row_id] = now

    def busy(self, row_id: str) -> bool:
        return row_id in self._inflight

    def last(self, row_id: str, default: float) -> float:
        return max(self._last.get(row_id, default), default)

    def forget(self, row_id: str) -> None:
        self._inflight.pop(row_id, None)
        self._last.pop(row_id, None)
        self._dirty.pop(row_id, None)

    def drain(self) -> dict[str, float]:
        dirty, self._dirty = self._dirty, {}
        return dirty

    def requeue(self, dirty: dict[str, float]) -> None:
        """Activity `drain` gave out that could not be written: drained again next time."""
        for row_id, at in dirty.items():
            if row_id in self._last and at > self._dirty.get(row_id, 0.0):
                self._dirty[row_id] = at
