"""A log per session of what hutch saw happen to it: created, renewed, its instance crashed and
was replaced, moved to another node, ended and why, and what its user server prints (followed by
`SessionManager` over envd's `Connect`, by the server's tag). E2B's sandbox logs (`GET
/v2/sandboxes/{id}/logs`) and `hutch session logs` read it.

Entries are buffered in memory and written to MetaDB in one batch with every activity flush (one
second), so a log line never costs a request a database write; each session keeps its newest
`keep` entries, and entries older than `keep_s` are deleted whatever their session (checked once
a minute). It knows nothing of HTTP; `hutch.scheduler.sessions` writes to it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from hutch.metadb.base import MetaDB
from hutch.metadb.records import LOG_LEVELS, LogEntry, SessionRecord

KEEP_ENTRIES = 1000
KEEP_S = 86400.0
FORGET_EVERY_S = 60.0


class SessionLog:
    def __init__(
        self,
        metadb: MetaDB,
        clock: Callable[[], float] = time.time,
        keep: int = KEEP_ENTRIES,
        keep_s: float = KEEP_S,
    ) -> None:
        if keep < 1 or keep_s <= 0:
            raise ValueError("keep and keep_s must be positive")
        self.metadb = metadb
        self.clock = clock
        self.keep = keep
        self.keep_s = keep_s
        self._pending: list[LogEntry] = []
        self._forgotten_at = 0.0

    def add(self, session: SessionRecord, level: str, message: str, **fields: Any) -> None:
        """Log one line for the session (written with the next `flush`)."""
        if level not in LOG_LEVELS:
            raise ValueError(f"unknown log level {level!r}")
        base = {"sessionId": session.session_id, "function": session.function}
        self._pending.append(LogEntry(session.row_id, self.clock(), level, message, {**base, **fields}))
        if len(self._pending) > 100 * self.keep:  # MetaDB away for long: drop the oldest, stay bounded
            del self._pending[: len(self._pending) - 100 * self.keep]

    async def flush(self) -> None:
        """Write what was logged since the last flush (kept for the next one if MetaDB fails)."""
        pending, self._pending = self._pending, []
        try:
            await self.metadb.add_logs(pending, self.keep)
        except BaseException:
            self._pending = pending + self._pending
            raise
        now = self.clock()
        if now - self._forgotten_at >= FORGET_EVERY_S:
            self._forgotten_at = now
            await self.metadb.forget_logs(now - self.keep_s)
