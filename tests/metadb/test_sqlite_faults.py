"""SQLite MetaDB under faults: another process holding the lock, a full database.

The lock is held by a real second process (`BEGIN EXCLUSIVE` on the same file), as a backup tool
or a stray `sqlite3` shell would; the full disk is SQLite's own SQLITE_FULL, from a page limit.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hutch.errors import Unavailable
from hutch.metadb.records import SessionRecord, SessionStatus
from hutch.metadb.sqlite import SQLiteMetaDB

HOLDER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
db.execute("COMMIT")
"""


class LockHolder:
    """Another process holding an exclusive lock on the database until `release`."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
            self.proc.wait(10)


def _session(row_id: str) -> SessionRecord:
    return SessionRecord(
        row_id=row_id,
        internal_id=f"internal-{row_id}",
        session_id=row_id,
        tenant_id="t",
        function="f",
        affinity="HEADER_FIELD",
        status=SessionStatus.ACTIVE,
        created_at=1.0,
        last_modified=1.0,
        last_activity=1.0,
        expires_at=1e12,
        ttl_s=60,
        idle_timeout_s=60,
    )


async def _open(tmp_path: Path, busy_wait: float) -> SQLiteMetaDB:
    db = SQLiteMetaDB(tmp_path / "metadb.sqlite3", busy_wait=busy_wait)
    await db.open()
    await db.insert_session(_session("a"))
    return db


def test_a_write_waits_for_another_processs_lock_without_stopping_the_event_loop(tmp_path):
    async def main() -> None:
        db = await _open(tmp_path, busy_wait=10)
        holder = LockHolder(tmp_path / "metadb.sqlite3")
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        async def release_later() -> None:
            await asyncio.sleep(0.5)
            await asyncio.to_thread(holder.release)

        beat = asyncio.create_task(ticker())
        releaser = asyncio.create_task(release_later())
        try:
            await db.touch_sessions({"a": 5.0})  # waits for the lock, then writes
        finally:
            beat.cancel()
            await releaser
            holder.release()
        assert (await db.get_session("a")).last_activity == 5.0
        assert ticks >= 5  # the loop ran other work while the write waited (0 if SQLite blocked it)
        await db.close()

    asyncio.run(main())


def test_a_lock_held_past_the_wait_is_unavailable_and_leaves_no_transaction_open(tmp_path):
    async def main() -> None:
        db = await _open(tmp_path, busy_wait=0.3)
        holder = LockHolder(tmp_path / "metadb.sqlite3")
        try:
            started = time.monotonic()
            with pytest.raises(Unavailable) as caught:
                await db.touch_sessions({"a": 5.0})
            assert time.monotonic() - started < 5  # bounded: no hang behind the lock
            assert caught.value.http_status == 503 and "locked by another process" in caught.value.message
            with pytest.raises(Unavailable):
                await db.insert_session(_session("b"))
            assert not db.db.in_transaction
        finally:
            holder.release()
        # The fault is over: writes go through and are committed (another connection sees them).
        await db.touch_sessions({"a": 6.0})
        await db.insert_session(_session("b"))
        other = sqlite3.connect(tmp_path / "metadb.sqlite3")
        rows = dict(other.execute("SELECT row_id, last_activity FROM sessions").fetchall())
        assert rows == {"a": 6.0, "b": 1.0}
        other.close()
        await db.close()

    asyncio.run(main())


def test_a_full_database_is_unavailable_naming_the_full_disk_and_recovers_when_there_is_room(tmp_path):
    async def main() -> None:
        db = await _open(tmp_path, busy_wait=0.3)
        pages = db.db.execute("PRAGMA page_count").fetchone()[0]
        db.db.execute(f"PRAGMA max_page_count = {pages}")  # SQLITE_FULL at the next page it needs
        with pytest.raises(Unavailable) as caught:
            for n in range(200):
                await db.insert_session(_session(f"s{n}" + "x" * 2000))
        assert "its disk is full" in caught.value.message
        assert not db.db.in_transaction
        db.db.execute("PRAGMA max_page_count = 1073741823")
        await db.insert_session(_session("after"))
        assert (await db.get_session("after")).status == SessionStatus.ACTIVE
        await db.close()

    asyncio.run(main())
