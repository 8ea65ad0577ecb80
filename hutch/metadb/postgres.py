"""MetaDB on PostgreSQL (asyncpg): the shared MetaDB of many gateways and nodes.

Selected by a `postgresql://user@host:port/db` URL. Same records and rules as the SQLite backend
(`hutch.metadb.rows` holds what they share); what PostgreSQL adds is that many processes on many
hosts write at once, so every rule that SQLite gets from its single writer is made explicit here:

- one Active session per internal id is a partial unique index, so two gateways racing on the
  first request of a key end with one row (the loser gets `AlreadyExists` and routes to the winner);
- the quota check and the insert run in one transaction holding a per-tenant advisory lock, so two
  gateways cannot both take the last slot;
- migrations run under an advisory lock, so processes starting together migrate once.

A lost connection (PostgreSQL restarting, the network) is `Unavailable` (503) to callers; the pool
replaces broken connections, so the next call after PostgreSQL is back succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from operator import attrgetter
from typing import Any, TypeVar

import asyncpg

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
    TENANT_COLUMNS,
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

# Same history as the SQLite schema (`hutch.metadb.sqlite.MIGRATIONS`), in PostgreSQL's types:
# DOUBLE PRECISION for times and amounts (REAL would be 4 bytes), BIGINT for byte counts.
MIGRATIONS = [
    # 0 -> 1: the first schema
    """
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE tenants (
        tenant_id TEXT PRIMARY KEY, name TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
        is_admin BOOLEAN NOT NULL DEFAULT FALSE, max_sessions INTEGER NOT NULL
    );
    CREATE TABLE api_keys (
        key_hash TEXT PRIMARY KEY, tenant_id TEXT NOT NULL REFERENCES tenants(tenant_id),
        label TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE functions (
        tenant_id TEXT NOT NULL, name TEXT NOT NULL, spec TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (tenant_id, name)
    );
    CREATE TABLE sessions (
        row_id TEXT PRIMARY KEY, internal_id TEXT NOT NULL, session_id TEXT NOT NULL,
        tenant_id TEXT NOT NULL, function TEXT NOT NULL, affinity TEXT NOT NULL, status TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL, last_modified DOUBLE PRECISION NOT NULL,
        last_activity DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION NOT NULL,
        ttl_s BIGINT NOT NULL, idle_timeout_s BIGINT NOT NULL, instance_id TEXT, scheduler_id TEXT,
        epoch INTEGER NOT NULL, disable_reuse BOOLEAN NOT NULL, persist_workspace BOOLEAN NOT NULL,
        workspace_key TEXT NOT NULL, cpu DOUBLE PRECISION NOT NULL, memory_mb INTEGER NOT NULL,
        metadata TEXT NOT NULL, env TEXT NOT NULL, access_token TEXT,
        ended_at DOUBLE PRECISION, end_reason TEXT
    );
    -- one Active session per internal id: the rule that makes racing first requests share one instance
    CREATE UNIQUE INDEX sessions_active_internal ON sessions(internal_id) WHERE status = 'Active';
    CREATE INDEX sessions_internal ON sessions(internal_id);
    CREATE INDEX sessions_tenant ON sessions(tenant_id, created_at);
    CREATE INDEX sessions_public ON sessions(session_id, status);
    CREATE TABLE instances (
        instance_id TEXT PRIMARY KEY, scheduler_id TEXT NOT NULL, pool_key TEXT NOT NULL,
        role TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, session_row_id TEXT
    );
    CREATE TABLE schedulers (
        scheduler_id TEXT PRIMARY KEY, address TEXT NOT NULL, heartbeat_at DOUBLE PRECISION NOT NULL,
        capacity TEXT NOT NULL
    );
    """,
    # 1 -> 2: metering (usage per session, usage per tenant/function/time bucket) and resource quotas
    """
    ALTER TABLE tenants ADD COLUMN max_vcpu DOUBLE PRECISION;
    ALTER TABLE tenants ADD COLUMN max_memory_mb INTEGER;
    CREATE TABLE usage (
        row_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, function TEXT NOT NULL, session_id TEXT NOT NULL,
        vcpu DOUBLE PRECISION NOT NULL, memory_mb INTEGER NOT NULL, started_at DOUBLE PRECISION NOT NULL,
        accounted_to DOUBLE PRECISION NOT NULL, ended_at DOUBLE PRECISION, end_reason TEXT,
        memory_bytes BIGINT NOT NULL, memory_peak_bytes BIGINT NOT NULL,
        disk_bytes BIGINT NOT NULL, disk_peak_bytes BIGINT NOT NULL, samples BIGINT NOT NULL,
        instance_id TEXT, cpu_base DOUBLE PRECISION,
        active_s DOUBLE PRECISION NOT NULL, idle_s DOUBLE PRECISION NOT NULL, down_s DOUBLE PRECISION NOT NULL,
        cpu_s DOUBLE PRECISION NOT NULL, cpu_active_s DOUBLE PRECISION NOT NULL,
        memory_gib_s DOUBLE PRECISION NOT NULL, memory_active_gib_s DOUBLE PRECISION NOT NULL,
        vcpu_active_s DOUBLE PRECISION NOT NULL, vcpu_idle_s DOUBLE PRECISION NOT NULL,
        memory_alloc_active_gib_s DOUBLE PRECISION NOT NULL, memory_alloc_idle_gib_s DOUBLE PRECISION NOT NULL,
        disk_gib_s DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX usage_tenant ON usage(tenant_id, started_at);
    CREATE TABLE usage_buckets (
        tenant_id TEXT NOT NULL, function TEXT NOT NULL, start DOUBLE PRECISION NOT NULL,
        active_s DOUBLE PRECISION NOT NULL, idle_s DOUBLE PRECISION NOT NULL, down_s DOUBLE PRECISION NOT NULL,
        cpu_s DOUBLE PRECISION NOT NULL, cpu_active_s DOUBLE PRECISION NOT NULL,
        memory_gib_s DOUBLE PRECISION NOT NULL, memory_active_gib_s DOUBLE PRECISION NOT NULL,
        vcpu_active_s DOUBLE PRECISION NOT NULL, vcpu_idle_s DOUBLE PRECISION NOT NULL,
        memory_alloc_active_gib_s DOUBLE PRECISION NOT NULL, memory_alloc_idle_gib_s DOUBLE PRECISION NOT NULL,
        disk_gib_s DOUBLE PRECISION NOT NULL,
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
        tenant_id TEXT NOT NULL, key TEXT NOT NULL, request_hash TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL, session_row_id TEXT, PRIMARY KEY (tenant_id, key)
    );
    CREATE INDEX idempotency_keys_created ON idempotency_keys(created_at);
    CREATE TABLE metric_samples (
        row_id TEXT NOT NULL, at DOUBLE PRECISION NOT NULL, cpu_used_pct DOUBLE PRECISION NOT NULL,
        memory_bytes BIGINT NOT NULL, disk_bytes BIGINT NOT NULL, PRIMARY KEY (row_id, at)
    );
    CREATE INDEX metric_samples_at ON metric_samples(at);
    CREATE TABLE session_logs (
        id BIGSERIAL PRIMARY KEY, row_id TEXT NOT NULL, at DOUBLE PRECISION NOT NULL, level TEXT NOT NULL,
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

# Where sessions' change notices go (`announce`, `watch`).
NOTICE_CHANNEL = "hutch_sessions"

# Any number that identifies hutch's migration lock among other users of the same database.
MIGRATION_LOCK = 0x68757463  # "hutc"

# Columns whose values must reach asyncpg as floats (it refuses an int for DOUBLE PRECISION).
FLOAT_COLUMNS = {
    "created_at",
    "last_modified",
    "last_activity",
    "expires_at",
    "cpu",
    "ended_at",
    "vcpu",
    "started_at",
    "accounted_to",
    "cpu_base",
    "heartbeat_at",
    "updated_at",
    "start",
    "max_vcpu",
    *USAGE_AMOUNT_FIELDS,
}

# Errors that mean "PostgreSQL cannot be reached right now", not "this query is wrong".
CONNECTION_ERRORS = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.InternalClientError,  # a pooled connection the server closed under it
)

T = TypeVar("T")


def _floats(values: dict[str, Any]) -> dict[str, Any]:
    for name, value in values.items():
        if name in FLOAT_COLUMNS and isinstance(value, int) and not isinstance(value, bool):
            values[name] = float(value)
    return values


def _amounts(amounts: UsageAmounts) -> list[float]:
    return [float(getattr(amounts, name)) for name in USAGE_AMOUNT_FIELDS]


def _insert(table: str, columns: list[str]) -> str:
    placeholders = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({placeholders})"


class PostgresMetaDB:
    def __init__(self, url: str, min_connections: int = 1, max_connections: int = 10) -> None:
        self.url = url
        self.min_connections = min_connections
        self.max_connections = max_connections
        self._pool: asyncpg.Pool | None = None
        self._watchers: list[Callable[[str | None], None]] = []
        self._listener_task: asyncio.Task[Any] | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("MetaDB is not open")
        return self._pool

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.url, min_size=self.min_connections, max_size=self.max_connections, command_timeout=30
            )
        except CONNECTION_ERRORS as error:
            raise Unavailable(f"cannot reach the MetaDB at {_safe_url(self.url)}: {error}") from None
        except asyncpg.PostgresError as error:  # e.g. the database or role does not exist
            raise InvalidArgument(f"cannot open the MetaDB at {_safe_url(self.url)}: {error}") from None
        await self._migrate()

    async def _migrate(self) -> None:
        async with self._transaction() as db:
            await db.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await db.execute("CREATE TABLE IF NOT EXISTS hutch_schema (version INTEGER NOT NULL)")
            version = await db.fetchval("SELECT version FROM hutch_schema")
            if version is None:
                await db.execute("INSERT INTO hutch_schema (version) VALUES (0)")
                version = 0
            for number in range(version, len(MIGRATIONS)):
                await db.execute(MIGRATIONS[number])  # DDL is transactional in PostgreSQL
            await db.execute("UPDATE hutch_schema SET version = $1", len(MIGRATIONS))

    async def close(self) -> None:
        if self._listener_task is not None:
            self._listener_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener_task
            self._listener_task = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def schema_version(self) -> int:
        return await self._call(lambda db: db.fetchval("SELECT version FROM hutch_schema"))

    # plumbing: every call goes through here, so a lost connection is always `Unavailable` ---------

    async def _call(self, work: Callable[[asyncpg.Connection], Awaitable[T]], idempotent: bool = False) -> T:
        """Run `work` on a pooled connection. A read (`idempotent`) that meets a connection the
        server closed (PostgreSQL restarted) is tried once more on a fresh one; a write is not,
        since it may have committed before the connection broke."""
        for attempt in (1, 2):
            try:
                async with self.pool.acquire() as db:
                    return await work(db)
            except CONNECTION_ERRORS as error:
                if not idempotent or attempt == 2:
                    raise Unavailable(f"the MetaDB is unreachable: {error}") from None
        raise AssertionError("unreachable")

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[asyncpg.Connection]:
        try:
            async with self.pool.acquire() as db, db.transaction():
                yield db
        except CONNECTION_ERRORS as error:
            raise Unavailable(f"the MetaDB is unreachable: {error}") from None

    async def _fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        return await self._call(lambda db: db.fetch(query, *args), idempotent=query.startswith("SELECT"))

    async def _fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        return await self._call(lambda db: db.fetchrow(query, *args), idempotent=query.startswith("SELECT"))

    async def _fetchval(self, query: str, *args: Any) -> Any:
        return await self._call(lambda db: db.fetchval(query, *args), idempotent=query.startswith("SELECT"))

    async def _execute(self, query: str, *args: Any) -> str:
        return await self._call(lambda db: db.execute(query, *args))

    # settings ---------------------------------------------------------------------------------

    async def get_setting(self, key: str) -> str | None:
        row = await self._fetchrow("SELECT value FROM settings WHERE key = $1", key)
        return row["value"] if row else None

    async def set_setting_if_absent(self, key: str, value: str) -> str:
        await self._execute("INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT DO NOTHING", key, value)
        return str(await self._fetchval("SELECT value FROM settings WHERE key = $1", key))

    # tenants ----------------------------------------------------------------------------------

    async def create_tenant(self, tenant: Tenant) -> None:
        values = _floats(asdict(tenant))
        try:
            await self._execute(_insert("tenants", TENANT_COLUMNS), *(values[c] for c in TENANT_COLUMNS))
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(f"tenant {tenant.tenant_id} already exists") from None

    async def get_tenant(self, tenant_id: str) -> Tenant:
        row = await self._fetchrow("SELECT * FROM tenants WHERE tenant_id = $1", tenant_id)
        if row is None:
            raise NotFound(f"tenant {tenant_id} not found")
        return tenant_from_row(row)

    async def list_tenants(self) -> list[Tenant]:
        return [tenant_from_row(r) for r in await self._fetch("SELECT * FROM tenants ORDER BY created_at")]

    async def update_tenant(self, tenant_id: str, **changes: Any) -> Tenant:
        check_tenant_changes(changes)
        changes = _floats(changes)
        assignments = ", ".join(f"{name} = ${i}" for i, name in enumerate(changes, start=2))
        status = await self._execute(
            f"UPDATE tenants SET {assignments} WHERE tenant_id = $1", tenant_id, *changes.values()
        )
        if status == "UPDATE 0":
            raise NotFound(f"tenant {tenant_id} not found")
        return await self.get_tenant(tenant_id)

    async def add_api_key(self, tenant_id: str, key_hash: str, label: str) -> None:
        try:
            await self._execute(
                "INSERT INTO api_keys (key_hash, tenant_id, label, created_at) VALUES ($1, $2, $3, $4)",
                key_hash,
                tenant_id,
                label,
                time.time(),
            )
        except asyncpg.UniqueViolationError:
            raise AlreadyExists("that API key is registered already") from None
        except asyncpg.ForeignKeyViolationError:
            raise NotFound(f"tenant {tenant_id} not found") from None

    async def tenant_for_key(self, key_hash: str) -> Tenant | None:
        row = await self._fetchrow(
            "SELECT t.* FROM api_keys k JOIN tenants t ON t.tenant_id = k.tenant_id WHERE k.key_hash = $1", key_hash
        )
        return tenant_from_row(row) if row else None

    # functions --------------------------------------------------------------------------------

    async def put_function(self, record: FunctionRecord) -> None:
        await self._execute(
            "INSERT INTO functions (tenant_id, name, spec, created_at, updated_at) VALUES ($1, $2, $3, $4, $5) "
            "ON CONFLICT (tenant_id, name) DO UPDATE SET spec = excluded.spec, updated_at = excluded.updated_at",
            record.tenant_id,
            record.name,
            json.dumps(record.spec),
            float(record.created_at),
            float(record.updated_at),
        )

    async def get_function(self, tenant_id: str, name: str) -> FunctionRecord:
        row = await self._fetchrow(
            "SELECT * FROM functions WHERE name = $1 AND tenant_id IN ($2, '*') ORDER BY tenant_id = '*' LIMIT 1",
            name,
            tenant_id,
        )
        if row is None:
            raise NotFound(f"function {name} not found")
        return function_from_row(row)

    async def list_functions(self, tenant_id: str) -> list[FunctionRecord]:
        rows = await self._fetch(
            "SELECT * FROM functions WHERE tenant_id IN ($1, '*') ORDER BY name, tenant_id = '*'", tenant_id
        )
        seen: dict[str, FunctionRecord] = {}
        for row in rows:
            seen.setdefault(row["name"], function_from_row(row))  # the tenant's own shadows a built-in
        return list(seen.values())

    async def delete_function(self, tenant_id: str, name: str) -> None:
        status = await self._execute("DELETE FROM functions WHERE tenant_id = $1 AND name = $2", tenant_id, name)
        if status == "DELETE 0":
            raise NotFound(f"function {name} not found")

    # sessions ---------------------------------------------------------------------------------

    async def insert_session(
        self,
        record: SessionRecord,
        max_active: int | None = None,
        max_vcpu: float | None = None,
        max_memory_mb: int | None = None,
    ) -> None:
        values = _floats(session_values(record, bools_as_int=False))
        try:
            async with self._transaction() as db:
                if quota_checked(max_active, max_vcpu, max_memory_mb):
                    # Serialises the check-then-insert of one tenant across every gateway.
                    await db.execute("SELECT pg_advisory_xact_lock(hashtext($1))", "quota:" + record.tenant_id)
                    count, vcpu, memory_mb = await db.fetchrow(
                        "SELECT COUNT(*), COALESCE(SUM(cpu), 0), COALESCE(SUM(memory_mb), 0) FROM sessions "
                        "WHERE tenant_id = $1 AND status = 'Active'",
                        record.tenant_id,
                    )
                    check_quota(record, count, vcpu, memory_mb, max_active, max_vcpu, max_memory_mb)
                await db.execute(_insert("sessions", SESSION_COLUMNS), *(values[c] for c in SESSION_COLUMNS))
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(f"an active session with internal id {record.internal_id} exists") from None

    async def get_session(self, row_id: str) -> SessionRecord:
        row = await self._fetchrow("SELECT * FROM sessions WHERE row_id = $1", row_id)
        if row is None:
            raise NotFound(f"session {row_id} not found")
        return session_from_row(row)

    async def active_session(self, internal_id: str) -> SessionRecord | None:
        row = await self._fetchrow("SELECT * FROM sessions WHERE internal_id = $1 AND status = 'Active'", internal_id)
        return session_from_row(row) if row else None

    async def find_session(self, tenant_id: str, session_id: str, function: str | None = None) -> SessionRecord:
        query = "SELECT * FROM sessions WHERE tenant_id = $1 AND session_id = $2"
        args: list[Any] = [tenant_id, session_id]
        if function is not None:
            query += " AND function = $3"
            args.append(function)
        query += " ORDER BY status = 'Active' DESC, created_at DESC LIMIT 1"
        row = await self._fetchrow(query, *args)
        if row is None:
            raise NotFound(f"session {session_id} not found")
        return session_from_row(row)

    async def active_session_by_public_id(self, session_id: str) -> SessionRecord | None:
        row = await self._fetchrow(
            "SELECT * FROM sessions WHERE session_id = $1 AND status = 'Active' AND access_token IS NOT NULL",
            session_id,
        )
        return session_from_row(row) if row else None

    async def active_session_by_metadata(
        self, tenant_id: str, function: str, key: str, value: str
    ) -> SessionRecord | None:
        row = await self._fetchrow(
            "SELECT * FROM sessions WHERE tenant_id = $1 AND function = $2 AND status = 'Active' "
            "AND metadata::jsonb ->> $3 = $4 LIMIT 1",
            tenant_id,
            function,
            key,
            value,
        )
        return session_from_row(row) if row else None

    async def internal_id_used(self, internal_id: str) -> bool:
        return await self._fetchrow("SELECT 1 FROM sessions WHERE internal_id = $1 LIMIT 1", internal_id) is not None

    async def list_sessions(
        self,
        tenant_id: str,
        status: SessionStatus | None = None,
        function: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> tuple[list[SessionRecord], str | None]:
        conditions, args = ["tenant_id = $1"], list[Any]([tenant_id])
        if status is not None:
            args.append(SessionStatus(status).value)
            conditions.append(f"status = ${len(args)}")
        if function is not None:
            args.append(function)
            conditions.append(f"function = ${len(args)}")
        if after:
            created, row_id = parse_page_token(after)
            args += [created, row_id]
            conditions.append(f"(created_at, row_id) < (${len(args) - 1}, ${len(args)})")
        args.append(limit + 1)
        query = (
            f"SELECT * FROM sessions WHERE {' AND '.join(conditions)} "
            f"ORDER BY created_at DESC, row_id DESC LIMIT ${len(args)}"
        )
        return cut_page([session_from_row(r) for r in await self._fetch(query, *args)], limit, attrgetter("created_at"))

    async def update_session(self, row_id: str, **changes: Any) -> SessionRecord:
        check_session_changes(changes)
        merged = SessionRecord(**{**asdict(await self.get_session(row_id)), **changes})
        values = _floats(session_values(merged, bools_as_int=False))
        assignments = ", ".join(f"{name} = ${i}" for i, name in enumerate(changes, start=2))
        row = await self._fetchrow(
            f"UPDATE sessions SET {assignments} WHERE row_id = $1 RETURNING *", row_id, *(values[c] for c in changes)
        )
        if row is None:
            raise NotFound(f"session {row_id} not found")
        return session_from_row(row)

    async def end_session(self, row_id: str, reason: str, at: float) -> SessionRecord | None:
        row = await self._fetchrow(
            "UPDATE sessions SET status = 'Expired', ended_at = $2, end_reason = $3, last_modified = $2 "
            "WHERE row_id = $1 AND status = 'Active' RETURNING *",
            row_id,
            float(at),
            reason,
        )
        return session_from_row(row) if row else None

    async def rehome_session(
        self, row_id: str, from_scheduler: str, to_scheduler: str, at: float
    ) -> SessionRecord | None:
        row = await self._fetchrow(
            "UPDATE sessions SET scheduler_id = $3, instance_id = NULL, epoch = epoch + 1, last_modified = $4 "
            "WHERE row_id = $1 AND status = 'Active' AND scheduler_id = $2 RETURNING *",
            row_id,
            from_scheduler,
            to_scheduler,
            float(at),
        )
        return session_from_row(row) if row else None

    async def active_sessions(self, scheduler_id: str | None = None) -> list[SessionRecord]:
        if scheduler_id is None:
            rows = await self._fetch("SELECT * FROM sessions WHERE status = 'Active'")
        else:
            rows = await self._fetch(
                "SELECT * FROM sessions WHERE status = 'Active' AND scheduler_id = $1", scheduler_id
            )
        return [session_from_row(r) for r in rows]

    async def count_active(self, tenant_id: str) -> int:
        count = await self._fetchval(
            "SELECT COUNT(*) FROM sessions WHERE tenant_id = $1 AND status = 'Active'", tenant_id
        )
        return int(count)

    async def touch_sessions(self, activity: dict[str, float]) -> None:
        if not activity:
            return
        # One statement for the whole batch: unnest pairs the two arrays row by row.
        await self._execute(
            "UPDATE sessions AS s SET last_activity = GREATEST(s.last_activity, t.at) "
            "FROM unnest($1::text[], $2::float8[]) AS t(row_id, at) "
            "WHERE s.row_id = t.row_id AND s.status = 'Active'",
            list(activity),
            [float(at) for at in activity.values()],
        )

    # instances and schedulers -----------------------------------------------------------------

    async def put_instance(self, record: InstanceRecord) -> None:
        await self._execute(
            "INSERT INTO instances (instance_id, scheduler_id, pool_key, role, created_at, session_row_id) "
            "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (instance_id) DO UPDATE SET "
            "scheduler_id = excluded.scheduler_id, pool_key = excluded.pool_key, role = excluded.role, "
            "created_at = excluded.created_at, session_row_id = excluded.session_row_id",
            record.instance_id,
            record.scheduler_id,
            record.pool_key,
            record.role.value,
            float(record.created_at),
            record.session_row_id,
        )

    async def delete_instance(self, instance_id: str) -> None:
        await self._execute("DELETE FROM instances WHERE instance_id = $1", instance_id)

    async def list_instances(self, scheduler_id: str) -> list[InstanceRecord]:
        rows = await self._fetch("SELECT * FROM instances WHERE scheduler_id = $1", scheduler_id)
        return [instance_from_row(row) for row in rows]

    async def upsert_scheduler(self, record: SchedulerRecord) -> None:
        await self._execute(
            "INSERT INTO schedulers (scheduler_id, address, heartbeat_at, capacity) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (scheduler_id) DO UPDATE SET address = excluded.address, "
            "heartbeat_at = excluded.heartbeat_at, capacity = excluded.capacity",
            record.scheduler_id,
            record.address,
            float(record.heartbeat_at),
            json.dumps(record.capacity),
        )

    async def list_schedulers(self) -> list[SchedulerRecord]:
        return [scheduler_from_row(row) for row in await self._fetch("SELECT * FROM schedulers")]

    # change notices: LISTEN/NOTIFY on one channel ----------------------------------------------

    async def announce(self, internal_id: str) -> None:
        await self._execute("SELECT pg_notify($1, $2)", NOTICE_CHANNEL, internal_id)

    async def watch(self, callback: Callable[[str | None], None]) -> None:
        self._watchers.append(callback)
        if self._listener_task is None:
            connected = asyncio.get_running_loop().create_future()
            self._listener_task = asyncio.create_task(self._listen(connected), name="metadb-listen")
            await connected  # notices announced from now on reach the callback

    async def _listen(self, connected: asyncio.Future[Any]) -> None:
        """Hold a LISTEN connection; after losing it, reconnect and tell watchers they missed notices."""

        def deliver(_connection: object, _pid: int, _channel: str, payload: str) -> None:
            for callback in self._watchers:
                callback(payload)

        first = True
        while True:
            lost = asyncio.Event()
            try:
                connection = await asyncpg.connect(self.url)
                connection.add_termination_listener(lambda _c, lost=lost: lost.set())
                await connection.add_listener(NOTICE_CHANNEL, deliver)
            except (*CONNECTION_ERRORS, asyncpg.PostgresError) as error:
                if first and not connected.done():
                    connected.set_exception(Unavailable(f"cannot listen for MetaDB notices: {error}"))
                    return
                await asyncio.sleep(1.0)
                continue
            if first:
                connected.set_result(None)
                first = False
            else:
                for callback in self._watchers:
                    callback(None)  # notices sent while we were away are lost
            try:
                await lost.wait()
            finally:
                if not connection.is_closed():
                    connection.terminate()

    # idempotent creates -----------------------------------------------------------------------

    async def claim_idempotency_key(
        self, record: IdempotencyRecord, keep_s: float, abandoned_s: float
    ) -> IdempotencyRecord | None:
        at = float(record.created_at)
        async with self._transaction() as db:
            # Serialises the claims of one key across every gateway (a row lock needs the row).
            await db.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"idem:{record.tenant_id}:{record.key}")
            await db.execute("DELETE FROM idempotency_keys WHERE created_at < $1", at - keep_s)
            row = await db.fetchrow(
                "SELECT * FROM idempotency_keys WHERE tenant_id = $1 AND key = $2", record.tenant_id, record.key
            )
            if row is not None and not idempotency_claim_abandoned(row, at, abandoned_s):
                return IdempotencyRecord(**dict(row))
            await db.execute(
                "INSERT INTO idempotency_keys (tenant_id, key, request_hash, created_at, session_row_id) "
                "VALUES ($1, $2, $3, $4, NULL) ON CONFLICT (tenant_id, key) DO UPDATE SET "
                "request_hash = excluded.request_hash, created_at = excluded.created_at, session_row_id = NULL",
                record.tenant_id,
                record.key,
                record.request_hash,
                at,
            )
            return None

    async def settle_idempotency_key(self, tenant_id: str, key: str, session_row_id: str) -> None:
        await self._execute(
            "UPDATE idempotency_keys SET session_row_id = $1 WHERE tenant_id = $2 AND key = $3",
            session_row_id,
            tenant_id,
            key,
        )

    async def release_idempotency_key(self, tenant_id: str, key: str) -> None:
        await self._execute(
            "DELETE FROM idempotency_keys WHERE tenant_id = $1 AND key = $2 AND session_row_id IS NULL",
            tenant_id,
            key,
        )

    # usage ------------------------------------------------------------------------------------

    async def save_usage(
        self, records: list[SessionUsage], buckets: list[UsageBucket], samples: list[MetricSample] | None = None
    ) -> None:
        if not records and not buckets and not samples:
            return
        updates = ", ".join(f"{c} = excluded.{c}" for c in USAGE_COLUMNS if c != "row_id")
        amounts = ", ".join(USAGE_AMOUNT_FIELDS)
        additions = ", ".join(f"{c} = usage_buckets.{c} + excluded.{c}" for c in USAGE_AMOUNT_FIELDS)
        bucket_placeholders = ", ".join(f"${i}" for i in range(4, 4 + len(USAGE_AMOUNT_FIELDS)))
        async with self._transaction() as db:
            if records:
                await db.executemany(
                    f"{_insert('usage', USAGE_COLUMNS)} ON CONFLICT (row_id) DO UPDATE SET {updates}",
                    [[_floats(usage_values(r))[c] for c in USAGE_COLUMNS] for r in records],
                )
            if buckets:
                await db.executemany(
                    f"INSERT INTO usage_buckets (tenant_id, function, start, {amounts}) "
                    f"VALUES ($1, $2, $3, {bucket_placeholders}) "
                    f"ON CONFLICT (tenant_id, function, start) DO UPDATE SET {additions}",
                    [
                        (
                            b.tenant_id,
                            b.function,
                            float(b.start),
                            *(float(getattr(b.amounts, n)) for n in USAGE_AMOUNT_FIELDS),
                        )
                        for b in buckets
                    ],
                )
            if samples:
                await db.executemany(
                    "INSERT INTO metric_samples (row_id, at, cpu_used_pct, memory_bytes, disk_bytes) "
                    "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (row_id, at) DO UPDATE SET "
                    "cpu_used_pct = excluded.cpu_used_pct, memory_bytes = excluded.memory_bytes, "
                    "disk_bytes = excluded.disk_bytes",
                    [(m.row_id, float(m.at), float(m.cpu_used_pct), m.memory_bytes, m.disk_bytes) for m in samples],
                )

    async def metric_samples(self, row_id: str, start: float, end: float) -> list[MetricSample]:
        rows = await self._fetch(
            "SELECT * FROM metric_samples WHERE row_id = $1 AND at >= $2 AND at <= $3 ORDER BY at",
            row_id,
            float(start),
            float(end),
        )
        return [MetricSample(**dict(r)) for r in rows]

    async def latest_metric_samples(self, row_ids: list[str]) -> dict[str, MetricSample]:
        rows = await self._fetch(
            "SELECT DISTINCT ON (row_id) * FROM metric_samples WHERE row_id = ANY($1::text[]) ORDER BY row_id, at DESC",
            list(dict.fromkeys(row_ids)),
        )
        return {r["row_id"]: MetricSample(**dict(r)) for r in rows}

    async def forget_metric_samples(self, before: float) -> None:
        await self._execute("DELETE FROM metric_samples WHERE at < $1", float(before))

    # session logs -----------------------------------------------------------------------------

    async def add_logs(self, entries: list[LogEntry], keep: int) -> None:
        if not entries:
            return
        async with self._transaction() as db:
            await db.executemany(
                "INSERT INTO session_logs (row_id, at, level, message, fields) VALUES ($1, $2, $3, $4, $5)",
                [(e.row_id, float(e.at), e.level, e.message, json.dumps(e.fields)) for e in entries],
            )
            for row_id in {e.row_id for e in entries}:
                await db.execute(
                    "DELETE FROM session_logs WHERE row_id = $1 AND id NOT IN "
                    "(SELECT id FROM session_logs WHERE row_id = $1 ORDER BY id DESC LIMIT $2)",
                    row_id,
                    keep,
                )

    async def session_logs(
        self,
        row_id: str,
        start: float | None = None,
        limit: int = 1000,
        forward: bool = True,
        levels: tuple[str, ...] | None = None,
        search: str | None = None,
    ) -> list[LogEntry]:
        where, args = log_filter(row_id, start, forward, levels, search, "$")
        order = "ASC" if forward else "DESC"
        rows = await self._fetch(
            f"SELECT * FROM session_logs WHERE {where} ORDER BY at {order}, id {order} LIMIT ${len(args) + 1}",
            *args,
            limit,
        )
        return [log_from_row(r) for r in rows]

    async def forget_logs(self, before: float) -> None:
        await self._execute("DELETE FROM session_logs WHERE at < $1", float(before))

    async def get_usage(self, row_id: str) -> SessionUsage:
        row = await self._fetchrow("SELECT * FROM usage WHERE row_id = $1", row_id)
        if row is None:
            raise NotFound(f"no usage recorded for session {row_id}")
        return usage_from_row(row)

    async def usage_of(self, row_ids: list[str]) -> dict[str, SessionUsage]:
        rows = await self._fetch("SELECT * FROM usage WHERE row_id = ANY($1::text[])", list(row_ids))
        return {row["row_id"]: usage_from_row(row) for row in rows}

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
        conditions, args = ["tenant_id = $1"], list[Any]([tenant_id])
        if start is not None:
            args.append(float(start))
            conditions.append(f"(ended_at IS NULL OR ended_at >= ${len(args)})")
        if end is not None:
            args.append(float(end))
            conditions.append(f"started_at < ${len(args)}")
        if function is not None:
            args.append(function)
            conditions.append(f"function = ${len(args)}")
        if active is not None:
            conditions.append("ended_at IS NULL" if active else "ended_at IS NOT NULL")
        if after:
            started, row_id = parse_page_token(after)
            args += [started, row_id]
            conditions.append(f"(started_at, row_id) < (${len(args) - 1}, ${len(args)})")
        args.append(limit + 1)
        query = (
            f"SELECT * FROM usage WHERE {' AND '.join(conditions)} "
            f"ORDER BY started_at DESC, row_id DESC LIMIT ${len(args)}"
        )
        return cut_page([usage_from_row(r) for r in await self._fetch(query, *args)], limit, attrgetter("started_at"))

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
        args: list[Any] = [float(start), float(end)]
        conditions = ["start >= $1", "start < $2"]
        time_key = "NULL::float8"
        if step:
            args.append(float(step))
            time_key = f"floor(start / ${len(args)}) * ${len(args)}"
        if tenant_id is not None:
            args.append(tenant_id)
            conditions.append(f"tenant_id = ${len(args)}")
        if function is not None:
            args.append(function)
            conditions.append(f"function = ${len(args)}")
        keys = ["tenant_id" if by_tenant else "NULL::text", "function" if by_function else "NULL::text", time_key]
        sums = ", ".join(f"SUM({n}) AS {n}" for n in USAGE_AMOUNT_FIELDS)
        query = (
            f"SELECT {keys[0]} AS k0, {keys[1]} AS k1, {keys[2]} AS k2, {sums} FROM usage_buckets "
            f"WHERE {' AND '.join(conditions)} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
        )
        out = []
        for row in await self._fetch(query, *args):
            amounts = UsageAmounts(**{name: row[name] for name in USAGE_AMOUNT_FIELDS})
            out.append(((row["k0"], row["k1"], None if row["k2"] is None else float(row["k2"])), amounts))
        return out


def _safe_url(url: str) -> str:
    """The URL without its password, for error messages."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))
