"""MetaDB on SQLite: the embedded default of `hutch serve` (one file, WAL mode).

sqlite3 is called directly on the event loop: a point read costs ~4 µs and a write ~12 µs here,
less than a thread hop (aiosqlite adds ~175 µs per call). `synchronous=NORMAL` in
WAL mode survives a crash of hutch (not a power cut of the host) without an fsync per commit.

So SQLite must never wait for a lock itself (`busy_timeout` 0): that would stop the event loop,
every session's traffic with it, for as long as another process holds the database. A call that
finds it locked is undone and tried again after an asynchronous sleep, for up to `busy_wait`
seconds, then fails with `Unavailable` (503). A full disk or an I/O error is `Unavailable` too,
with its cause named; a failed transaction is always rolled back, so the connection never stays
inside one.

The schema is versioned: `MIGRATIONS[n]` takes version n to n+1, applied in one transaction each.
A released migration is never edited: a change of schema is a new entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict
from operator import attrgetter
from pathlib import Path
from typing import Any

from hutch.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from hutch.metadb.records import (
    USAGE_AMOUNT_FIELDS,
    FunctionRecord,
    IdempotencyRecord,
    InstanceRecord,
    LogEntry,
    MetricSample,
    SchedulerRecord,
    SessionRecord,
    SessionStatus,
    SessionUsage,
    Tenant,
    UsageAmounts,
    UsageBucket,
)
from hutch.metadb.rows import (
    SESSION_COLUMNS,
    USAGE_COLUMNS,
    check_quota,
    check_session_changes,
    check_tenant_changes,
    cut_page,
    function_from_row,
    idempotency_claim_abandoned,
    instance_from_row,
    log_filter,
    log_from_row,
    parse_page_token,
    quota_checked,
    scheduler_from_row,
    session_from_row,
    session_values,
    tenant_from_row,
    usage_from_row,
    usage_values,
)

MIGRATIONS = [
    # 0 -> 1: the first schema
    """
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE tenants (
        tenant_id TEXT PRIMARY KEY, name TEXT NOT NULL, created_at REAL NOT NULL,
        is_admin INTEGER NOT NULL DEFAULT 0, max_sessions INTEGER NOT NULL
    );
    CREATE TABLE api_keys (
        key_hash TEXT PRIMARY KEY, tenant_id TEXT NOT NULL REFERENCES tenants(tenant_id),
        label TEXT NOT NULL, created_at REAL NOT NULL
    );
    CREATE TABLE functions (
        tenant_id TEXT NOT NULL, name TEXT NOT NULL, spec TEXT NOT NULL,
        created_at REAL NOT NULL, updated_at REAL NOT NULL, PRIMARY KEY (tenant_id, name)
    );
    CREATE TABLE sessions (
        row_id TEXT PRIMARY KEY, internal_id TEXT NOT NULL, session_id TEXT NOT NULL,
        tenant_id TEXT NOT NULL, function TEXT NOT NULL, affinity TEXT NOT NULL, status TEXT NOT NULL,
        created_at REAL NOT NULL, last_modified REAL NOT NULL, last_activity REAL NOT NULL,
        expires_at REAL NOT NULL, ttl_s INTEGER NOT NULL, idle_timeout_s INTEGER NOT NULL,
        instance_id TEXT, scheduler_id TEXT, epoch INTEGER NOT NULL, disable_reuse INTEGER NOT NULL,
        persist_workspace INTEGER NOT NULL, workspace_key TEXT NOT NULL, cpu REAL NOT NULL,
        memory_mb INTEGER NOT NULL, metadata TEXT NOT NULL, env TEXT NOT NULL, access_token TEXT,
        ended_at REAL, end_reason TEXT
    );
    -- one Active session per internal id: the rule that makes racing first requests share one instance
    CREATE UNIQUE INDEX sessions_active_internal ON sessions(internal_id) WHERE status = 'Active';
    CREATE INDEX sessions_internal ON sessions(internal_id);
    CREATE INDEX sessions_tenant ON sessions(tenant_id, created_at);
    CREATE INDEX sessions_public ON sessions(session_id, status);
    CREATE TABLE instances (
        instance_id TEXT PRIMARY KEY, scheduler_id TEXT NOT NULL, pool_key TEXT NOT NULL,
        role TEXT NOT NULL, created_at REAL NOT NULL, session_row_id TEXT
    );
    CREATE TABLE schedulers (
        scheduler_id TEXT PRIMARY KEY, address TEXT NOT NULL, heartbeat_at REAL NOT NULL,
        capacity TEXT NOT NULL
    );
    """,
    # 1 -> 2: metering (usage per session, usage per tenant/function/time bucket) and resource quotas
    """
    ALTER TABLE tenants ADD COLUMN max_vcpu REAL;
    ALTER TABLE tenants ADD COLUMN max_memory_mb INTEGER;
    CREATE TABLE usage (
        row_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, function TEXT NOT NULL, session_id TEXT NOT NULL,
        vcpu REAL NOT NULL, memory_mb INTEGER NOT NULL, started_at REAL NOT NULL, accounted_to REAL NOT NULL,
        ended_at REAL, end_reason TEXT, memory_bytes INTEGER NOT NULL, memory_peak_bytes INTEGER NOT NULL,
        disk_bytes INTEGER NOT NULL, disk_peak_bytes INTEGER NOT NULL, samples INTEGER NOT NULL,
        instance_id TEXT, cpu_base REAL,
        active_s REAL NOT NULL, idle_s REAL NOT NULL, down_s REAL NOT NULL, cpu_s REAL NOT NULL,
        cpu_active_s REAL NOT NULL, memory_gib_s REAL NOT NULL, memory_active_gib_s REAL NOT NULL,
        vcpu_active_s REAL NOT NULL, vcpu_idle_s REAL NOT NULL, memory_alloc_active_gib_s REAL NOT NULL,
        memory_alloc_idle_gib_s REAL NOT NULL, disk_gib_s REAL NOT NULL
    );
    CREATE INDEX usage_tenant ON usage(tenant_id, started_at);
    CREATE TABLE usage_buckets (
        tenant_id TEXT NOT NULL, function TEXT NOT NULL, start REAL NOT NULL,
        active_s REAL NOT NULL, idle_s REAL NOT NULL, down_s REAL NOT NULL, cpu_s REAL NOT NULL,
        cpu_active_s REAL NOT NULL, memory_gib_s REAL NOT NULL, memory_active_gib_s REAL NOT NULL,
        vcpu_active_s REAL NOT NULL, vcpu_idle_s REAL NOT NULL, memory_alloc_active_gib_s REAL NOT NULL,
        memory_alloc_idle_gib_s REAL NOT NULL, disk_gib_s REAL NOT NULL,
        PRIMARY KEY (tenant_id, function, start)
    );
    CREATE INDEX usage_buckets_start ON usage_buckets(start)
    """,
    # 2 -> 3: a session's own network policy (NULL: its function's)
    """
    ALTER TABLE sessions ADD COLUMN network TEXT
    """,
    # 3 -> 4: creates that carried an Idempotency-Key (the key's claim, then the session it made);
    # the metric samples of sessions' instances; a session's own rules for host-named traffic;
    # sessions' logs
    """
    CREATE TABLE idempotency_keys (
        tenant_id TEXT NOT NULL, key TEXT NOT NULL, request_hash TEXT NOT NULL, created_at REAL NOT NULL,
        session_row_id TEXT, PRIMARY KEY (tenant_id, key)
    );
    CREATE INDEX idempotency_keys_created ON idempotency_keys(created_at);
    -- what each sample of a session's instance measured (E2B's sandbox metrics)
    CREATE TABLE metric_samples (
        row_id TEXT NOT NULL, at REAL NOT NULL, cpu_used_pct REAL NOT NULL, memory_bytes INTEGER NOT NULL,
        disk_bytes INTEGER NOT NULL, PRIMARY KEY (row_id, at)
    );
    CREATE INDEX metric_samples_at ON metric_samples(at);
    CREATE TABLE session_logs (
        id INTEGER PRIMARY KEY AUTOINCREMENT, row_id TEXT NOT NULL, at REAL NOT NULL, level TEXT NOT NULL,
        message TEXT NOT NULL, fields TEXT NOT NULL
    );
    CREATE INDEX session_logs_row ON session_logs(row_id, at);
    CREATE INDEX session_logs_at ON session_logs(at);
    ALTER TABLE sessions ADD COLUMN traffic TEXT
    """,
    # 4 -> 5: a sleeping session's state ({"state", "since", "paused"}; NULL: running) and its
    # E2B lifecycle ({"on_timeout", "auto_resume"}; NULL: ends at its TTL)
    """
    ALTER TABLE sessions ADD COLUMN sleep TEXT;
    ALTER TABLE sessions ADD COLUMN lifecycle TEXT
    """,
    # 5 -> 6: the quota on the disk of a tenant's hibernation images and memory snapshots
    """
    ALTER TABLE tenants ADD COLUMN max_image_disk_mb INTEGER
    """,
]


BUSY_WAIT_S = 5.0  # how long a call waits for a lock another process holds
# SQLite's primary result codes (the low byte of an extended code) that are not the caller's fault.
SQLITE_BUSY, SQLITE_LOCKED, SQLITE_READONLY, SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN = 5, 6, 8, 10, 13, 14
UNAVAILABLE_BECAUSE = {
    SQLITE_FULL: "its disk is full",
    SQLITE_IOERR: "an I/O error on its file",
    SQLITE_READONLY: "its file is read-only",
    SQLITE_CANTOPEN: "its file cannot be opened",
}


def _unavailable(exc: sqlite3.OperationalError) -> Unavailable | None:
    """The error a caller sees for a failure of the database itself (None: a bug, raised as is)."""
    reason = UNAVAILABLE_BECAUSE.get(getattr(exc, "sqlite_errorcode", 0) & 0xFF)
    if reason is None:
        return None
    return Unavailable(f"MetaDB cannot answer: {reason} ({exc})")


def _retried_when_busy(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a MetaDB call again, after an asynchronous sleep, while another process holds the lock."""

    @functools.wraps(method)
    async def call(self: SQLiteMetaDB, *args: Any, **kwargs: Any) -> Any:
        deadline = 0.0
        delay = 0.001
        while True:
            try:
                return await method(self, *args, **kwargs)
            except sqlite3.OperationalError as exc:
                self._rollback()
                if getattr(exc, "sqlite_errorcode", 0) & 0xFF not in (SQLITE_BUSY, SQLITE_LOCKED):
                    translated = _unavailable(exc)
                    if translated is None:
                        raise
                    raise translated from exc
                now = time.monotonic()
                deadline = deadline or now + self.busy_wait
                if now >= deadline:
                    raise Unavailable(
                        f"MetaDB is locked by another process (waited {self.busy_wait:g} s); try again"
                    ) from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)

    return call


def _retrying(cls: type) -> type:
    """Every public coroutine method of the class but `open` and `close`, `_retried_when_busy`."""
    for name, member in list(vars(cls).items()):
        if not name.startswith("_") and name not in ("open", "close") and inspect.iscoroutinefunction(member):
            setattr(cls, name, _retried_when_busy(member))
    return cls


@_retrying
class SQLiteMetaDB:
    def __init__(self, path: Path | str, busy_wait: float = BUSY_WAIT_S) -> None:
        self.path = str(path)
        self.busy_wait = busy_wait
        self._db: sqlite3.Connection | None = None
        self._watchers: list[Callable[[str | None], None]] = []

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("MetaDB is not open")
        return self._db

    async def open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")  # at start-up nothing else waits on the event loop
        db.execute("PRAGMA foreign_keys=ON")
        self._db = db
        self._migrate()
        db.execute("PRAGMA busy_timeout=0")  # from now on never block the loop: see the module docstring

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        for number in range(version, len(MIGRATIONS)):
            self.db.execute("BEGIN IMMEDIATE")
            try:
                # statement by statement: executescript() would commit the open transaction
                for statement in MIGRATIONS[number].split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version = {number + 1}")
                self.db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    def _rollback(self) -> None:
        """End a failed transaction (SQLite may have rolled it back already, e.g. on a full disk)."""
        if self._db is not None and self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")

    async def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def schema_version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    # settings ---------------------------------------------------------------------------------

    async def get_setting(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    async def set_setting_if_absent(self, key: str, value: str) -> str:
        self.db.execute("INSERT OR IGNORE INTO settings (key, value) VALUES (?, ?)", (key, value))
        return str(self.db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()[0])

    # tenants ----------------------------------------------------------------------------------

    async def create_tenant(self, tenant: Tenant) -> None:
        try:
            self.db.execute(
                "INSERT INTO tenants (tenant_id, name, created_at, is_admin, max_sessions, max_vcpu, max_memory_mb, "
                "max_image_disk_mb) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    tenant.tenant_id,
                    tenant.name,
                    tenant.created_at,
                    int(tenant.is_admin),
                    tenant.max_sessions,
                    tenant.max_vcpu,
                    tenant.max_memory_mb,
                    tenant.max_image_disk_mb,
                ),
            )
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"tenant {tenant.tenant_id} already exists") from None

    async def get_tenant(self, tenant_id: str) -> Tenant:
        row = self.db.execute("SELECT * FROM tenants WHERE tenant_id = ?", (tenant_id,)).fetchone()
        if row is None:
            raise NotFound(f"tenant {tenant_id} not found")
        return tenant_from_row(row)

    async def list_tenants(self) -> list[Tenant]:
        return [tenant_from_row(r) for r in self.db.execute("SELECT * FROM tenants ORDER BY created_at")]

    async def update_tenant(self, tenant_id: str, **changes: Any) -> Tenant:
        check_tenant_changes(changes)
        assignments = ", ".join(f"{k} = ?" for k in changes)
        cursor = self.db.execute(
            f"UPDATE tenants SET {assignments} WHERE tenant_id = ?", (*changes.values(), tenant_id)
        )
        if cursor.rowcount == 0:
            raise NotFound(f"tenant {tenant_id} not found")
        return await self.get_tenant(tenant_id)

    async def add_api_key(self, tenant_id: str, key_hash: str, label: str) -> None:
        try:
            self.db.execute(
                "INSERT INTO api_keys (key_hash, tenant_id, label, created_at) VALUES (?, ?, ?, ?)",
                (key_hash, tenant_id, label, time.time()),
            )
        except sqlite3.IntegrityError:
            raise AlreadyExists("that API key is registered already") from None

    async def tenant_for_key(self, key_hash: str) -> Tenant | None:
        row = self.db.execute(
            "SELECT t.* FROM api_keys k JOIN tenants t ON t.tenant_id = k.tenant_id WHERE k.key_hash = ?",
            (key_hash,),
        ).fetchone()
        return tenant_from_row(row) if row else None

    # functions --------------------------------------------------------------------------------

    async def put_function(self, record: FunctionRecord) -> None:
        self.db.execute(
            "INSERT INTO functions (tenant_id, name, spec, created_at, updated_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (tenant_id, name) DO UPDATE SET spec = excluded.spec, updated_at = excluded.updated_at",
            (record.tenant_id, record.name, json.dumps(record.spec), record.created_at, record.updated_at),
        )

    async def get_function(self, tenant_id: str, name: str) -> FunctionRecord:
        row = self.db.execute(
            "SELECT * FROM functions WHERE name = ? AND tenant_id IN (?, '*') ORDER BY tenant_id = '*' LIMIT 1",
            (name, tenant_id),
        ).fetchone()
        if row is None:
            raise NotFound(f"function {name} not found")
        return function_from_row(row)

    async def list_functions(self, tenant_id: str) -> list[FunctionRecord]:
        rows = self.db.execute(
            "SELECT * FROM functions WHERE tenant_id IN (?, '*') ORDER BY name, tenant_id = '*'", (tenant_id,)
        ).fetchall()
        seen: dict[str, FunctionRecord] = {}
        for row in rows:
            seen.setdefault(row["name"], function_from_row(row))  # the tenant's own shadows a built-in
        return list(seen.values())

    async def delete_function(self, tenant_id: str, name: str) -> None:
        cursor = self.db.execute("DELETE FROM functions WHERE tenant_id = ? AND name = ?", (tenant_id, name))
        if cursor.rowcount == 0:
            raise NotFound(f"function {name} not found")

    # sessions ---------------------------------------------------------------------------------

    async def insert_session(
        self,
        record: SessionRecord,
        max_active: int | None = None,
        max_vcpu: float | None = None,
        max_memory_mb: int | None = None,
    ) -> None:
        values = session_values(record, bools_as_int=True)
        columns = ", ".join(SESSION_COLUMNS)
        placeholders = ", ".join(f":{c}" for c in SESSION_COLUMNS)
        self.db.execute("BEGIN IMMEDIATE")
        try:
            if quota_checked(max_active, max_vcpu, max_memory_mb):
                count, vcpu, memory_mb = self.db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(cpu), 0), COALESCE(SUM(memory_mb), 0) FROM sessions "
                    "WHERE tenant_id = ? AND status = 'Active'",
                    (record.tenant_id,),
                ).fetchone()
                check_quota(record, count, vcpu, memory_mb, max_active, max_vcpu, max_memory_mb)
            self.db.execute(f"INSERT INTO sessions ({columns}) VALUES ({placeholders})", values)
            self.db.execute("COMMIT")
        except sqlite3.IntegrityError:
            self._rollback()
            raise AlreadyExists(f"an active session with internal id {record.internal_id} exists") from None
        except BaseException:
            self._rollback()
            raise

    async def get_session(self, row_id: str) -> SessionRecord:
        row = self.db.execute("SELECT * FROM sessions WHERE row_id = ?", (row_id,)).fetchone()
        if row is None:
            raise NotFound(f"session {row_id} not found")
        return session_from_row(row)

    async def active_session(self, internal_id: str) -> SessionRecord | None:
        row = self.db.execute(
            "SELECT * FROM sessions WHERE internal_id = ? AND status = 'Active'", (internal_id,)
        ).fetchone()
        return session_from_row(row) if row else None

    async def find_session(self, tenant_id: str, session_id: str, function: str | None = None) -> SessionRecord:
        query = "SELECT * FROM sessions WHERE tenant_id = ? AND session_id = ?"
        params: list[Any] = [tenant_id, session_id]
        if function is not None:
            query += " AND function = ?"
            params.append(function)
        query += " ORDER BY status = 'Active' DESC, created_at DESC LIMIT 1"
        row = self.db.execute(query, params).fetchone()
        if row is None:
            raise NotFound(f"session {session_id} not found")
        return session_from_row(row)

    async def active_session_by_public_id(self, session_id: str) -> SessionRecord | None:
        row = self.db.execute(
            "SELECT * FROM sessions WHERE session_id = ? AND status = 'Active' AND access_token IS NOT NULL",
            (session_id,),
        ).fetchone()
        return session_from_row(row) if row else None

    async def active_session_by_metadata(
        self, tenant_id: str, function: str, key: str, value: str
    ) -> SessionRecord | None:
        row = self.db.execute(
            "SELECT * FROM sessions WHERE tenant_id = ? AND function = ? AND status = 'Active' "
            "AND json_extract(metadata, ?) = ? LIMIT 1",
            (tenant_id, function, "$." + json.dumps(key), value),
        ).fetchone()
        return session_from_row(row) if row else None

    async def internal_id_used(self, internal_id: str) -> bool:
        return (
            self.db.execute("SELECT 1 FROM sessions WHERE internal_id = ? LIMIT 1", (internal_id,)).fetchone()
            is not None
        )

    async def list_sessions(
        self,
        tenant_id: str,
        status: SessionStatus | None = None,
        function: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> tuple[list[SessionRecord], str | None]:
        query = "SELECT * FROM sessions WHERE tenant_id = ?"
        params: list[Any] = [tenant_id]
        if status is not None:
            query += " AND status = ?"
            params.append(SessionStatus(status).value)
        if function is not None:
            query += " AND function = ?"
            params.append(function)
        if after:
            created, row_id = parse_page_token(after)
            query += " AND (created_at < ? OR (created_at = ? AND row_id < ?))"
            params += [created, created, row_id]
        query += " ORDER BY created_at DESC, row_id DESC LIMIT ?"
        params.append(limit + 1)
        return cut_page([session_from_row(r) for r in self.db.execute(query, params)], limit, attrgetter("created_at"))

    async def update_session(self, row_id: str, **changes: Any) -> SessionRecord:
        check_session_changes(changes)
        values = session_values(
            SessionRecord(**{**asdict(await self.get_session(row_id)), **changes}), bools_as_int=True
        )
        assignments = ", ".join(f"{k} = :{k}" for k in changes)
        self.db.execute(f"UPDATE sessions SET {assignments} WHERE row_id = :row_id", values)
        return await self.get_session(row_id)

    async def end_session(self, row_id: str, reason: str, at: float) -> SessionRecord | None:
        cursor = self.db.execute(
            "UPDATE sessions SET status = 'Expired', ended_at = ?, end_reason = ?, last_modified = ? "
            "WHERE row_id = ? AND status = 'Active'",
            (at, reason, at, row_id),
        )
        if cursor.rowcount == 0:
            return None
        return await self.get_session(row_id)

    async def rehome_session(
        self, row_id: str, from_scheduler: str, to_scheduler: str, at: float
    ) -> SessionRecord | None:
        cursor = self.db.execute(
            "UPDATE sessions SET scheduler_id = ?, instance_id = NULL, epoch = epoch + 1, last_modified = ? "
            "WHERE row_id = ? AND status = 'Active' AND scheduler_id = ?",
            (to_scheduler, at, row_id, from_scheduler),
        )
        if cursor.rowcount == 0:
            return None
        return await self.get_session(row_id)

    async def active_sessions(self, scheduler_id: str | None = None) -> list[SessionRecord]:
        if scheduler_id is None:
            rows = self.db.execute("SELECT * FROM sessions WHERE status = 'Active'")
        else:
            rows = self.db.execute(
                "SELECT * FROM sessions WHERE status = 'Active' AND scheduler_id = ?", (scheduler_id,)
            )
        return [session_from_row(r) for r in rows]

    async def count_active(self, tenant_id: str) -> int:
        return int(
            self.db.execute(
                "SELECT COUNT(*) FROM sessions WHERE tenant_id = ? AND status = 'Active'", (tenant_id,)
            ).fetchone()[0]
        )

    async def touch_sessions(self, activity: dict[str, float]) -> None:
        if not activity:
            return
        self.db.execute("BEGIN")
        try:
            self.db.executemany(
                "UPDATE sessions SET last_activity = MAX(last_activity, ?) WHERE row_id = ? AND status = 'Active'",
                [(at, row_id) for row_id, at in activity.items()],
            )
            self.db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    # instances and schedulers -----------------------------------------------------------------

    async def put_instance(self, record: InstanceRecord) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO instances (instance_id, scheduler_id, pool_key, role, created_at, session_row_id) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (
                record.instance_id,
                record.scheduler_id,
                record.pool_key,
                record.role.value,
                record.created_at,
                record.session_row_id,
            ),
        )

    async def delete_instance(self, instance_id: str) -> None:
        self.db.execute("DELETE FROM instances WHERE instance_id = ?", (instance_id,))

    async def list_instances(self, scheduler_id: str) -> list[InstanceRecord]:
        rows = self.db.execute("SELECT * FROM instances WHERE scheduler_id = ?", (scheduler_id,))
        return [instance_from_row(row) for row in rows]

    async def upsert_scheduler(self, record: SchedulerRecord) -> None:
        self.db.execute(
            "INSERT INTO schedulers (scheduler_id, address, heartbeat_at, capacity) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (scheduler_id) DO UPDATE SET address = excluded.address, "
            "heartbeat_at = excluded.heartbeat_at, capacity = excluded.capacity",
            (record.scheduler_id, record.address, record.heartbeat_at, json.dumps(record.capacity)),
        )

    async def list_schedulers(self) -> list[SchedulerRecord]:
        return [scheduler_from_row(row) for row in self.db.execute("SELECT * FROM schedulers")]

    # change notices: one process owns an SQLite MetaDB, so they stay in it ----------------------

    async def announce(self, internal_id: str) -> None:
        for callback in self._watchers:
            callback(internal_id)

    async def watch(self, callback: Callable[[str | None], None]) -> None:
        self._watchers.append(callback)

    # idempotent creates -----------------------------------------------------------------------

    async def claim_idempotency_key(
        self, record: IdempotencyRecord, keep_s: float, abandoned_s: float
    ) -> IdempotencyRecord | None:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute("DELETE FROM idempotency_keys WHERE created_at < ?", (record.created_at - keep_s,))
            row = self.db.execute(
                "SELECT * FROM idempotency_keys WHERE tenant_id = ? AND key = ?", (record.tenant_id, record.key)
            ).fetchone()
            if row is not None and not idempotency_claim_abandoned(row, record.created_at, abandoned_s):
                self.db.execute("COMMIT")
                return IdempotencyRecord(**dict(row))
            self.db.execute(
                "INSERT OR REPLACE INTO idempotency_keys (tenant_id, key, request_hash, created_at, session_row_id) "
                "VALUES (?, ?, ?, ?, NULL)",
                (record.tenant_id, record.key, record.request_hash, record.created_at),
            )
            self.db.execute("COMMIT")
            return None
        except BaseException:
            self._rollback()
            raise

    async def settle_idempotency_key(self, tenant_id: str, key: str, session_row_id: str) -> None:
        self.db.execute(
            "UPDATE idempotency_keys SET session_row_id = ? WHERE tenant_id = ? AND key = ?",
            (session_row_id, tenant_id, key),
        )

    async def release_idempotency_key(self, tenant_id: str, key: str) -> None:
        self.db.execute(
            "DELETE FROM idempotency_keys WHERE tenant_id = ? AND key = ? AND session_row_id IS NULL",
            (tenant_id, key),
        )

    # usage ------------------------------------------------------------------------------------

    async def save_usage(
        self, records: list[SessionUsage], buckets: list[UsageBucket], samples: list[MetricSample] | None = None
    ) -> None:
        if not records and not buckets and not samples:
            return
        columns = ", ".join(USAGE_COLUMNS)
        placeholders = ", ".join(f":{c}" for c in USAGE_COLUMNS)
        updates = ", ".join(f"{c} = excluded.{c}" for c in USAGE_COLUMNS if c != "row_id")
        amounts = ", ".join(USAGE_AMOUNT_FIELDS)
        additions = ", ".join(f"{c} = {c} + excluded.{c}" for c in USAGE_AMOUNT_FIELDS)
        self.db.execute("BEGIN")
        try:
            self.db.executemany(
                f"INSERT INTO usage ({columns}) VALUES ({placeholders}) ON CONFLICT (row_id) DO UPDATE SET {updates}",
                [usage_values(r) for r in records],
            )
            self.db.executemany(
                f"INSERT INTO usage_buckets (tenant_id, function, start, {amounts}) "
                f"VALUES (?, ?, ?, {', '.join('?' for _ in USAGE_AMOUNT_FIELDS)}) "
                f"ON CONFLICT (tenant_id, function, start) DO UPDATE SET {additions}",
                [
                    (b.tenant_id, b.function, b.start, *(getattr(b.amounts, n) for n in USAGE_AMOUNT_FIELDS))
                    for b in buckets
                ],
            )
            self.db.executemany(
                "INSERT OR REPLACE INTO metric_samples (row_id, at, cpu_used_pct, memory_bytes, disk_bytes) "
                "VALUES (?, ?, ?, ?, ?)",
                [(m.row_id, m.at, m.cpu_used_pct, m.memory_bytes, m.disk_bytes) for m in samples or []],
            )
            self.db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    async def metric_samples(self, row_id: str, start: float, end: float) -> list[MetricSample]:
        rows = self.db.execute(
            "SELECT * FROM metric_samples WHERE row_id = ? AND at >= ? AND at <= ? ORDER BY at", (row_id, start, end)
        )
        return [MetricSample(**dict(r)) for r in rows]

    async def latest_metric_samples(self, row_ids: list[str]) -> dict[str, MetricSample]:
        found: dict[str, MetricSample] = {}
        for row_id in dict.fromkeys(row_ids):
            row = self.db.execute(
                "SELECT * FROM metric_samples WHERE row_id = ? ORDER BY at DESC LIMIT 1", (row_id,)
            ).fetchone()
            if row is not None:
                found[row_id] = MetricSample(**dict(row))
        return found

    async def forget_metric_samples(self, before: float) -> None:
        self.db.execute("DELETE FROM metric_samples WHERE at < ?", (before,))

    # session logs -----------------------------------------------------------------------------

    async def add_logs(self, entries: list[LogEntry], keep: int) -> None:
        if not entries:
            return
        self.db.execute("BEGIN")
        try:
            self.db.executemany(
                "INSERT INTO session_logs (row_id, at, level, message, fields) VALUES (?, ?, ?, ?, ?)",
                [(e.row_id, e.at, e.level, e.message, json.dumps(e.fields)) for e in entries],
            )
            for row_id in {e.row_id for e in entries}:
                self.db.execute(
                    "DELETE FROM session_logs WHERE row_id = ? AND id NOT IN "
                    "(SELECT id FROM session_logs WHERE row_id = ? ORDER BY id DESC LIMIT ?)",
                    (row_id, row_id, keep),
                )
            self.db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    async def session_logs(
        self,
        row_id: str,
        start: float | None = None,
        limit: int = 1000,
        forward: bool = True,
        levels: tuple[str, ...] | None = None,
        search: str | None = None,
    ) -> list[LogEntry]:
        where, args = log_filter(row_id, start, forward, levels, search, "?")
        order = "ASC" if forward else "DESC"
        rows = self.db.execute(
            f"SELECT * FROM session_logs WHERE {where} ORDER BY at {order}, id {order} LIMIT ?", (*args, limit)
        )
        return [log_from_row(r) for r in rows]

    async def forget_logs(self, before: float) -> None:
        self.db.execute("DELETE FROM session_logs WHERE at < ?", (before,))

    async def get_usage(self, row_id: str) -> SessionUsage:
        row = self.db.execute("SELECT * FROM usage WHERE row_id = ?", (row_id,)).fetchone()
        if row is None:
            raise NotFound(f"no usage recorded for session {row_id}")
        return usage_from_row(row)

    async def usage_of(self, row_ids: list[str]) -> dict[str, SessionUsage]:
        out: dict[str, SessionUsage] = {}
        for start in range(0, len(row_ids), 500):
            chunk = row_ids[start : start + 500]
            query = f"SELECT * FROM usage WHERE row_id IN ({', '.join('?' for _ in chunk)})"
            for row in self.db.execute(query, chunk):
                record = usage_from_row(row)
                out[record.row_id] = record
        return out

    async def list_usage(
        self,
        tenant_id: str,
        start: float | None = None,
        end: float | None = None,
        function: str | None = None,
        active: bool | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> tuple[list[SessionUsage], str | None]:
        query = "SELECT * FROM usage WHERE tenant_id = ?"
        params: list[Any] = [tenant_id]
        if start is not None:
            query += " AND (ended_at IS NULL OR ended_at >= ?)"
            params.append(start)
        if end is not None:
            query += " AND started_at < ?"
            params.append(end)
        if function is not None:
            query += " AND function = ?"
            params.append(function)
        if active is not None:
            query += " AND ended_at IS NULL" if active else " AND ended_at IS NOT NULL"
        if after:
            started, row_id = parse_page_token(after)
            query += " AND (started_at < ? OR (started_at = ? AND row_id < ?))"
            params += [started, started, row_id]
        query += " ORDER BY started_at DESC, row_id DESC LIMIT ?"
        params.append(limit + 1)
        return cut_page([usage_from_row(r) for r in self.db.execute(query, params)], limit, attrgetter("started_at"))

    async def usage_totals(
        self,
        start: float,
        end: float,
        tenant_id: str | None = None,
        function: str | None = None,
        by_tenant: bool = False,
        by_function: bool = False,
        step: float | None = None,
    ) -> list[tuple[tuple[str | None, str | None, float | None], UsageAmounts]]:
        if step is not None and step <= 0:
            raise InvalidArgument("step must be positive")
        keys = [
            "tenant_id" if by_tenant else "NULL",
            "function" if by_function else "NULL",
            "CAST(start / :step AS INTEGER) * :step" if step else "NULL",
        ]
        sums = ", ".join(f"SUM({n})" for n in USAGE_AMOUNT_FIELDS)
        query = (
            f"SELECT {keys[0]} AS k0, {keys[1]} AS k1, {keys[2]} AS k2, {sums} FROM usage_buckets "
            "WHERE start >= :start AND start < :end"
        )
        params: dict[str, Any] = {"start": start, "end": end, "step": step}
        if tenant_id is not None:
            query += " AND tenant_id = :tenant"
            params["tenant"] = tenant_id
        if function is not None:
            query += " AND function = :function"
            params["function"] = function
        query += " GROUP BY k0, k1, k2 ORDER BY k0, k1, k2"
        out = []
        for row in self.db.execute(query, params):
            values = tuple(row)
            amounts = UsageAmounts(**dict(zip(USAGE_AMOUNT_FIELDS, values[3:], strict=True)))
            out.append(((values[0], values[1], None if values[2] is None else float(values[2])), amounts))
        return out
