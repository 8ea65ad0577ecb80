"""The MetaDB contract. Backends: `hutch.metadb.sqlite` (embedded default, one process) and
`hutch.metadb.postgres` (shared by many gateways and nodes).

Methods are async so that a networked backend fits the same interface; the SQLite backend
answers in microseconds and calls sqlite3 directly on the event loop.

Errors: `NotFound` for a missing record, `AlreadyExists` when a write would break a uniqueness
rule (notably: two Active sessions with the same internal id — the rule that makes two racing
first requests end on one instance).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from hutch.metadb.records import (
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

# (tenant id, function, time) of a usage sum; None where that key was not grouped by.
UsageKey = tuple[str | None, str | None, float | None]


class MetaDB(Protocol):
    async def open(self) -> None:
        """Connect and apply pending migrations."""
        ...

    async def close(self) -> None: ...

    # settings ---------------------------------------------------------------------------------
    async def get_setting(self, key: str) -> str | None: ...
    async def set_setting_if_absent(self, key: str, value: str) -> str:
        """Store `value` unless the key has one; return the stored value."""
        ...

    # tenants and API keys -----------------------------------------------------------------------
    async def create_tenant(self, tenant: Tenant) -> None: ...
    async def get_tenant(self, tenant_id: str) -> Tenant: ...
    async def list_tenants(self) -> list[Tenant]: ...
    async def update_tenant(self, tenant_id: str, **fields: Any) -> Tenant: ...
    async def add_api_key(self, tenant_id: str, key_hash: str, label: str) -> None: ...
    async def tenant_for_key(self, key_hash: str) -> Tenant | None: ...

    # functions --------------------------------------------------------------------------------
    async def put_function(self, record: FunctionRecord) -> None: ...
    async def get_function(self, tenant_id: str, name: str) -> FunctionRecord:
        """The tenant's function, or the built-in of that name."""
        ...

    async def list_functions(self, tenant_id: str) -> list[FunctionRecord]: ...
    async def delete_function(self, tenant_id: str, name: str) -> None: ...

    # sessions ---------------------------------------------------------------------------------
    async def insert_session(
        self,
        record: SessionRecord,
        max_active: int | None = None,
        max_vcpu: float | None = None,
        max_memory_mb: int | None = None,
    ) -> None:
        """Insert an Active session; `AlreadyExists` if its internal id is active already,
        `QuotaExceeded` (naming every quota broken) if the tenant's Active sessions, this one
        included, would be more than `max_active`, or use more than `max_vcpu` vCPUs or
        `max_memory_mb` of memory. Checked and inserted in one transaction."""
        ...

    async def get_session(self, row_id: str) -> SessionRecord: ...
    async def active_session(self, internal_id: str) -> SessionRecord | None: ...
    async def find_session(self, tenant_id: str, session_id: str, function: str | None = None) -> SessionRecord:
        """The newest session of the tenant with that public id (Active ones first)."""
        ...

    async def active_session_by_public_id(self, session_id: str) -> SessionRecord | None:
        """For E2B traffic, which names a sandbox but no tenant: only sessions with an access token."""
        ...

    async def active_session_by_metadata(
        self, tenant_id: str, function: str, key: str, value: str
    ) -> SessionRecord | None:
        """The tenant's Active session of `function` whose metadata maps `key` to `value` (an MCP
        session id another gateway bound); None if there is none."""
        ...

    async def internal_id_used(self, internal_id: str) -> bool:
        """Whether any session, ended or not, ever had this internal id."""
        ...

    async def list_sessions(
        self,
        tenant_id: str,
        status: SessionStatus | None = None,
        function: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> tuple[list[SessionRecord], str | None]:
        """A page of sessions, newest first, and the token of the next page."""
        ...

    async def update_session(self, row_id: str, **fields: Any) -> SessionRecord: ...
    async def end_session(self, row_id: str, reason: str, at: float) -> SessionRecord | None:
        """Mark an Active session Expired; None if it had already ended."""
        ...

    async def rehome_session(
        self, row_id: str, from_scheduler: str, to_scheduler: str, at: float
    ) -> SessionRecord | None:
        """Move an Active session from one scheduler (a dead node) to another, in one compare-and-set:
        its instance is cleared and its epoch goes up by one. None if the session has ended or is
        no longer on `from_scheduler` (another node took it first)."""
        ...

    async def active_sessions(self, scheduler_id: str | None = None) -> list[SessionRecord]: ...
    async def count_active(self, tenant_id: str) -> int: ...
    async def touch_sessions(self, activity: dict[str, float]) -> None:
        """Record last-activity times (row id -> time) in one write."""
        ...

    # idempotent creates -----------------------------------------------------------------------
    async def claim_idempotency_key(
        self, record: IdempotencyRecord, keep_s: float, abandoned_s: float
    ) -> IdempotencyRecord | None:
        """Claim `(record.tenant_id, record.key)` for a create about to run, in one transaction:
        None if this call claimed it (it was free, older than `keep_s`, or claimed more than
        `abandoned_s` ago by a create that never settled), else the record that holds it.
        Records older than `keep_s` are deleted on the way."""
        ...

    async def settle_idempotency_key(self, tenant_id: str, key: str, session_row_id: str) -> None:
        """Record the session the claimed key's create made."""
        ...

    async def release_idempotency_key(self, tenant_id: str, key: str) -> None:
        """Drop an unsettled claim (its create failed), so a retry runs the create again."""
        ...

    # usage ------------------------------------------------------------------------------------
    async def save_usage(
        self, records: list[SessionUsage], buckets: list[UsageBucket], samples: list[MetricSample] | None = None
    ) -> None:
        """In one transaction: write these session usage records (insert or replace), add
        these amounts to their buckets (a bucket's amounts are sums, never replaced) and keep
        these metric samples."""
        ...

    async def metric_samples(self, row_id: str, start: float, end: float) -> list[MetricSample]:
        """The session's metric samples taken in `[start, end]`, oldest first."""
        ...

    async def latest_metric_samples(self, row_ids: list[str]) -> dict[str, MetricSample]:
        """The newest metric sample of each of these sessions (sessions without one left out)."""
        ...

    async def forget_metric_samples(self, before: float) -> None:
        """Delete the metric samples taken before `before`."""
        ...

    # session logs -----------------------------------------------------------------------------
    async def add_logs(self, entries: list[LogEntry], keep: int) -> None:
        """Append these entries; each session keeps only its newest `keep`."""
        ...

    async def session_logs(
        self,
        row_id: str,
        start: float | None = None,
        limit: int = 1000,
        forward: bool = True,
        levels: tuple[str, ...] | None = None,
        search: str | None = None,
    ) -> list[LogEntry]:
        """The session's entries from `start` on (forward, oldest first) or up to it (backward,
        newest first), of these levels, whose message contains `search` (case-insensitive)."""
        ...

    async def forget_logs(self, before: float) -> None:
        """Delete the entries written before `before`."""
        ...

    async def get_usage(self, row_id: str) -> SessionUsage:
        """The usage record of a session row, or `NotFound`."""
        ...

    async def usage_of(self, row_ids: list[str]) -> dict[str, SessionUsage]:
        """The usage records of these session rows (rows without one are left out)."""
        ...

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
        """A page of the tenant's session usage records whose lifetime overlaps `[start, end)`,
        newest first, and the token of the next page. `active`: only live (True) or ended (False)."""
        ...

    async def usage_totals(
        self,
        start: float,
        end: float,
        tenant_id: str | None = None,
        function: str | None = None,
        by_tenant: bool = False,
        by_function: bool = False,
        step: float | None = None,
    ) -> list[tuple[UsageKey, UsageAmounts]]:
        """Sums of the buckets starting in `[start, end)`, grouped by tenant, function and/or time
        (`step` seconds, counted from the epoch), sorted by key."""
        ...

    # instances and schedulers -----------------------------------------------------------------
    async def put_instance(self, record: InstanceRecord) -> None: ...
    async def delete_instance(self, instance_id: str) -> None: ...
    async def list_instances(self, scheduler_id: str) -> list[InstanceRecord]: ...
    async def upsert_scheduler(self, record: SchedulerRecord) -> None: ...
    async def list_schedulers(self) -> list[SchedulerRecord]: ...

    # change notices between processes ---------------------------------------------------------
    async def announce(self, internal_id: str) -> None:
        """Tell every process watching that this session changed (ended, moved, renewed)."""
        ...

    async def watch(self, callback: Callable[[str | None], None]) -> None:
        """Call `callback(internal_id)` for every announcement, from any process, until `close`;
        `callback(None)` when some may have been missed (a lost connection): drop every cache."""
        ...


# Re-exported for backends' convenience.
__all__ = ["MetaDB", "SessionStatus", "UsageKey"]
