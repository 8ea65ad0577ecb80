"""One suite for every MetaDB backend: SQLite (a file and in memory) and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from hutch.errors import AlreadyExists, InvalidArgument, NotFound, QuotaExceeded
from hutch.metadb import postgres, sqlite
from hutch.metadb.postgres import PostgresMetaDB
from hutch.metadb.records import (
    FunctionRecord,
    IdempotencyRecord,
    InstanceRecord,
    InstanceRole,
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
from hutch.metadb.sqlite import SQLiteMetaDB
from tests.postgres import create_database


class Sync:
    """Drive an async MetaDB from plain tests."""

    def __init__(self, db) -> None:
        self._db = db
        self._loop = asyncio.new_event_loop()

    def __getattr__(self, name):
        method = getattr(self._db, name)
        if not asyncio.iscoroutinefunction(method):
            return method
        return lambda *a, **k: self._loop.run_until_complete(method(*a, **k))

    def close(self) -> None:
        self._loop.run_until_complete(self._db.close())
        self._loop.close()


def open_backend(kind: str, request, tmp_path) -> Sync:
    if kind == "postgres":
        server = request.getfixturevalue("postgres_server")
        loop = asyncio.new_event_loop()
        url = loop.run_until_complete(create_database(server))
        loop.close()
        sync = Sync(PostgresMetaDB(url))
    else:
        sync = Sync(SQLiteMetaDB(tmp_path / "meta.sqlite3" if kind == "sqlite-file" else ":memory:"))
    sync.open()
    return sync


@pytest.fixture(params=["sqlite-file", "sqlite-memory", "postgres"])
def db(request, tmp_path):
    sync = open_backend(request.param, request, tmp_path)
    sync.create_tenant(Tenant("t1", "one", time.time(), max_sessions=3))
    sync.create_tenant(Tenant("t2", "two", time.time()))
    yield sync
    sync.close()


def session(tenant="t1", internal=None, session_id=None, **overrides) -> SessionRecord:
    now = time.time()
    values = dict(
        row_id=uuid.uuid4().hex,
        internal_id=internal or uuid.uuid4().hex,
        session_id=session_id or uuid.uuid4().hex[:8],
        tenant_id=tenant,
        function="base",
        affinity="HEADER_FIELD",
        status=SessionStatus.ACTIVE,
        created_at=now,
        last_modified=now,
        last_activity=now,
        expires_at=now + 60,
        ttl_s=60,
        idle_timeout_s=30,
        metadata={"k": "v"},
        env={"A": "1"},
    )
    values.update(overrides)
    return SessionRecord(**values)


def test_the_schema_is_migrated_to_the_latest_version(db):
    assert db.schema_version() == len(sqlite.MIGRATIONS) == len(postgres.MIGRATIONS)


@pytest.mark.parametrize("kind", ["sqlite-file", "postgres"])
def test_a_reopened_database_keeps_its_records(kind, request, tmp_path):
    first = open_backend(kind, request, tmp_path)
    first.create_tenant(Tenant("t9", "nine", 1.0))
    first.insert_session(session("t9", internal="abc"))
    first.close()
    reopen = PostgresMetaDB(first._db.url) if kind == "postgres" else SQLiteMetaDB(first._db.path)
    second = Sync(reopen)
    second.open()
    assert second.schema_version() == len(sqlite.MIGRATIONS)  # nothing applied twice
    assert second.get_tenant("t9").name == "nine"
    assert second.active_session("abc").tenant_id == "t9"
    second.close()


def test_settings_keep_their_first_value(db):
    assert db.set_setting_if_absent("secret", "first") == "first"
    assert db.set_setting_if_absent("secret", "second") == "first"
    assert db.get_setting("missing") is None


def test_tenants_and_keys(db):
    assert db.get_tenant("t1").max_sessions == 3
    with pytest.raises(AlreadyExists):
        db.create_tenant(Tenant("t1", "again", 0.0))
    with pytest.raises(NotFound):
        db.get_tenant("nobody")
    db.add_api_key("t1", "hash1", "label")
    with pytest.raises(AlreadyExists):
        db.add_api_key("t2", "hash1", "label")
    assert db.tenant_for_key("hash1").tenant_id == "t1"
    assert db.tenant_for_key("nope") is None
    assert db.update_tenant("t1", max_sessions=9).max_sessions == 9
    with pytest.raises(InvalidArgument):
        db.update_tenant("t1", created_at=5.0)


def test_a_tenants_function_shadows_the_builtin_of_the_same_name(db):
    db.put_function(FunctionRecord("*", "base", {"name": "base", "v": "builtin"}, 1.0, 1.0))
    assert db.get_function("t1", "base").spec["v"] == "builtin"
    db.put_function(FunctionRecord("t1", "base", {"name": "base", "v": "mine"}, 2.0, 2.0))
    assert db.get_function("t1", "base").spec["v"] == "mine"
    assert db.get_function("t2", "base").spec["v"] == "builtin"
    assert [f.spec["v"] for f in db.list_functions("t1")] == ["mine"]
    db.delete_function("t1", "base")
    assert db.get_function("t1", "base").spec["v"] == "builtin"
    with pytest.raises(NotFound):
        db.delete_function("t1", "base")
    with pytest.raises(NotFound):
        db.get_function("t1", "nothing")


def test_only_one_active_session_per_internal_id(db):
    db.insert_session(session(internal="same"))
    with pytest.raises(AlreadyExists):
        db.insert_session(session(internal="same"))
    first = db.active_session("same")
    db.end_session(first.row_id, "ttl", time.time())
    db.insert_session(session(internal="same"))  # a reused key after expiry is a new session
    assert db.internal_id_used("same") and not db.internal_id_used("other")


def test_the_live_session_quota_is_checked_in_the_insert(db):
    for _ in range(3):
        db.insert_session(session(), max_active=3)
    with pytest.raises(QuotaExceeded):
        db.insert_session(session(), max_active=3)
    assert db.count_active("t1") == 3
    db.insert_session(session("t2"), max_active=3)  # another tenant's count is its own


def test_vcpu_and_memory_quotas_are_checked_in_the_insert_and_name_what_was_exceeded(db):
    db.insert_session(session(cpu=2.0, memory_mb=1024), max_vcpu=3, max_memory_mb=2048)
    db.insert_session(session(cpu=1.0, memory_mb=512), max_vcpu=3, max_memory_mb=2048)  # exactly at the quota
    with pytest.raises(QuotaExceeded, match=r"maxVcpu 3 \(live sessions use 3 vCPUs, this one asks 0.5\)"):
        db.insert_session(session(cpu=0.5, memory_mb=64), max_vcpu=3, max_memory_mb=2048)
    with pytest.raises(QuotaExceeded, match="maxMemoryMB 2048") as refused:
        db.insert_session(session(cpu=1.0, memory_mb=1024), max_vcpu=3.5, max_memory_mb=2048)
    assert "maxVcpu" in str(refused.value)  # both are named
    assert db.count_active("t1") == 2
    db.end_session(db.list_sessions("t1")[0][0].row_id, "deleted", time.time())
    db.insert_session(session(cpu=1.0, memory_mb=512), max_vcpu=3, max_memory_mb=2048)  # ended ones free it


def test_tenant_resource_quotas_are_stored_and_changed(db):
    db.create_tenant(Tenant("t3", "three", 1.0, max_vcpu=4.0, max_memory_mb=8192))
    assert (db.get_tenant("t3").max_vcpu, db.get_tenant("t3").max_memory_mb) == (4.0, 8192)
    assert db.get_tenant("t1").max_vcpu is None
    updated = db.update_tenant("t3", max_vcpu=None, max_memory_mb=1024)
    assert (updated.max_vcpu, updated.max_memory_mb) == (None, 1024)
    assert updated.max_image_disk_mb is None
    assert db.update_tenant("t3", max_image_disk_mb=300).max_image_disk_mb == 300
    assert db.get_tenant("t3").max_image_disk_mb == 300


def test_session_updates_end_and_activity(db):
    record = session(session_id="pub")
    db.insert_session(record)
    updated = db.update_session(record.row_id, instance_id="i-1", epoch=2)
    assert (updated.instance_id, updated.epoch, updated.metadata) == ("i-1", 2, {"k": "v"})
    with pytest.raises(InvalidArgument):
        db.update_session(record.row_id, no_such_field=1)
    db.touch_sessions({record.row_id: record.last_activity + 5})
    assert db.get_session(record.row_id).last_activity == record.last_activity + 5
    ended = db.end_session(record.row_id, "deleted", time.time())
    assert ended.status == SessionStatus.EXPIRED and ended.end_reason == "deleted"
    assert db.end_session(record.row_id, "deleted", time.time()) is None
    assert db.find_session("t1", "pub").status == SessionStatus.EXPIRED
    with pytest.raises(NotFound):
        db.find_session("t2", "pub")


def test_public_id_lookup_only_finds_sessions_with_a_token(db):
    db.insert_session(session(session_id="sbx1", access_token="tok"))
    db.insert_session(session(session_id="plain"))
    assert db.active_session_by_public_id("sbx1").access_token == "tok"
    assert db.active_session_by_public_id("plain") is None


def test_a_session_is_found_by_a_binding_in_its_metadata_for_its_tenant_and_function_only(db):
    bound = session(metadata={"mcpSessionId": "m-1", "k": "v"})
    db.insert_session(bound)
    db.insert_session(session(metadata={"mcpSessionId": "m-2"}))
    assert db.active_session_by_metadata("t1", "base", "mcpSessionId", "m-1").row_id == bound.row_id
    assert db.active_session_by_metadata("t2", "base", "mcpSessionId", "m-1") is None  # another tenant
    assert db.active_session_by_metadata("t1", "other", "mcpSessionId", "m-1") is None
    assert db.active_session_by_metadata("t1", "base", "mcpSessionId", "m-3") is None
    assert db.active_session_by_metadata("t1", "base", "k", "v").row_id == bound.row_id
    db.end_session(bound.row_id, "mcp_closed", time.time())
    assert db.active_session_by_metadata("t1", "base", "mcpSessionId", "m-1") is None  # ended


def test_sessions_are_listed_newest_first_in_pages(db):
    made = []
    for index in range(5):
        record = session(created_at=1000.0 + index)
        db.insert_session(record)
        made.append(record.row_id)
    seen, token = [], None
    while True:
        page, token = db.list_sessions("t1", limit=2, after=token)
        seen += [r.row_id for r in page]
        if token is None:
            break
    assert seen == list(reversed(made))
    db.end_session(made[0], "ttl", 2000.0)
    active, _ = db.list_sessions("t1", status=SessionStatus.ACTIVE)
    assert made[0] not in [r.row_id for r in active]
    assert db.list_sessions("t2")[0] == []
    with pytest.raises(InvalidArgument):
        db.list_sessions("t1", after="not-a-token")


def test_instances_and_schedulers(db):
    db.put_instance(InstanceRecord("i-1", "s1", "*/base", InstanceRole.WARM, 1.0))
    db.put_instance(InstanceRecord("i-1", "s1", "*/base", InstanceRole.BOUND, 1.0, "row"))
    db.put_instance(InstanceRecord("i-2", "s2", "*/base", InstanceRole.WARM, 1.0))
    assert [(i.instance_id, i.role) for i in db.list_instances("s1")] == [("i-1", InstanceRole.BOUND)]
    db.delete_instance("i-1")
    assert db.list_instances("s1") == []
    db.upsert_scheduler(SchedulerRecord("s1", "local", 5.0, {"max": 2}))
    db.upsert_scheduler(SchedulerRecord("s1", "local", 6.0, {"max": 3}))
    assert [(s.heartbeat_at, s.capacity) for s in db.list_schedulers()] == [(6.0, {"max": 3})]


def usage(tenant="t1", function="base", started_at=1000.0, **overrides) -> SessionUsage:
    values = dict(
        row_id=uuid.uuid4().hex,
        tenant_id=tenant,
        function=function,
        session_id=uuid.uuid4().hex[:8],
        vcpu=1.0,
        memory_mb=512,
        started_at=started_at,
        accounted_to=started_at,
    )
    values.update(overrides)
    return SessionUsage(**values)


def test_usage_records_are_written_replaced_and_read_back(db):
    record = usage(amounts=UsageAmounts(active_s=3.0, idle_s=7.0, cpu_s=2.5), instance_id="i-1", cpu_base=12.5)
    db.save_usage([record], [])
    assert db.get_usage(record.row_id) == record
    record.amounts.add(UsageAmounts(idle_s=5.0))
    record.accounted_to, record.ended_at, record.end_reason, record.memory_peak_bytes = 1015.0, 1015.0, "idle", 1 << 20
    db.save_usage([record], [])
    again = db.get_usage(record.row_id)
    assert again.amounts.idle_s == 12.0 and again.ended_at == 1015.0 and again.memory_peak_bytes == 1 << 20
    assert db.usage_of([record.row_id, "missing"]) == {record.row_id: again}
    with pytest.raises(NotFound):
        db.get_usage("missing")


def test_usage_records_are_listed_by_overlap_with_a_range_newest_first_in_pages(db):
    early = usage(started_at=100.0, ended_at=200.0)
    middle = usage(started_at=300.0, ended_at=400.0, function="other")
    live = usage(started_at=500.0)
    elsewhere = usage("t2", started_at=500.0)
    db.save_usage([early, middle, live, elsewhere], [])

    def ids(**query):
        return [r.row_id for r in db.list_usage("t1", **query)[0]]

    assert ids() == [live.row_id, middle.row_id, early.row_id]
    assert ids(start=350.0) == [live.row_id, middle.row_id]  # still alive at 350
    assert ids(start=150.0, end=300.0) == [early.row_id]  # started before 300
    assert ids(function="other") == [middle.row_id]
    assert ids(active=True) == [live.row_id] and ids(active=False) == [middle.row_id, early.row_id]
    first, token = db.list_usage("t1", limit=2)
    rest, last = db.list_usage("t1", limit=2, after=token)
    assert [r.row_id for r in first + rest] == [live.row_id, middle.row_id, early.row_id] and last is None


def test_bucket_amounts_add_up_and_are_summed_by_tenant_function_and_time(db):
    db.save_usage(
        [],
        [
            UsageBucket("t1", "base", 0.0, UsageAmounts(active_s=1.0, cpu_s=0.5)),
            UsageBucket("t1", "base", 60.0, UsageAmounts(idle_s=60.0)),
            UsageBucket("t1", "web", 60.0, UsageAmounts(active_s=10.0)),
            UsageBucket("t2", "base", 60.0, UsageAmounts(active_s=100.0)),
        ],
    )
    db.save_usage([], [UsageBucket("t1", "base", 0.0, UsageAmounts(active_s=2.0))])  # adds, never replaces

    def sums(**query):
        return {key: (a.active_s, a.idle_s) for key, a in db.usage_totals(**query)}

    assert sums(start=0, end=120, tenant_id="t1") == {(None, None, None): (13.0, 60.0)}
    assert sums(start=0, end=120, tenant_id="t1", by_function=True) == {
        (None, "base", None): (3.0, 60.0),
        (None, "web", None): (10.0, 0.0),
    }
    assert sums(start=0, end=120, by_tenant=True) == {
        ("t1", None, None): (13.0, 60.0),
        ("t2", None, None): (100.0, 0.0),
    }
    assert sums(start=0, end=120, tenant_id="t1", step=60) == {
        (None, None, 0.0): (3.0, 0.0),
        (None, None, 60.0): (10.0, 60.0),
    }
    assert sums(start=60, end=120, tenant_id="t1", function="base") == {(None, None, None): (0.0, 60.0)}
    assert sums(start=0, end=60, tenant_id="t1")[(None, None, None)] == (3.0, 0.0)  # buckets starting in the range
    assert db.usage_totals(start=500, end=600, tenant_id="t1") == []


def test_a_session_s_own_network_and_traffic_rules_round_trip(db):
    record = session(
        network={"internet": False, "allow": ["pypi.org"], "deny": []},
        traffic={"token": "t0k3n", "mask": "${PORT}-app.example.com"},
    )
    db.insert_session(record)
    again = db.get_session(record.row_id)
    assert (again.network, again.traffic) == (record.network, record.traffic)
    plain = session()
    db.insert_session(plain)
    assert db.get_session(plain.row_id).traffic is None


def test_metric_samples_are_kept_read_by_range_and_forgotten_by_age(db):
    samples = [MetricSample("r1", float(at), at / 10, at * 1000, 7) for at in (10, 15, 20)]
    db.save_usage([], [], [*samples, MetricSample("r2", 12.0, 50.0, 1, 2)])
    db.save_usage([], [], [MetricSample("r1", 20.0, 3.0, 4, 5)])  # the same instant again: replaced
    assert db.metric_samples("r1", 0, 100) == [*samples[:2], MetricSample("r1", 20.0, 3.0, 4, 5)]
    assert [m.at for m in db.metric_samples("r1", 12, 15)] == [15.0]
    assert db.latest_metric_samples(["r1", "r2", "r3", "r1"]) == {
        "r1": MetricSample("r1", 20.0, 3.0, 4, 5),
        "r2": MetricSample("r2", 12.0, 50.0, 1, 2),
    }
    db.forget_metric_samples(15.0)
    assert [m.at for m in db.metric_samples("r1", 0, 100)] == [15.0, 20.0]
    assert db.latest_metric_samples(["r2"]) == {}


def test_session_logs_are_kept_bounded_and_read_by_time_level_and_text(db):
    entries = [LogEntry("r1", float(at), level, f"event {at} 50%_done", {"n": at}) for at, level in
               [(10, "info"), (20, "warn"), (30, "error"), (40, "info")]]  # fmt: skip
    db.add_logs(entries, keep=10)
    db.add_logs([LogEntry("r2", 15.0, "info", "other session")], keep=10)
    assert db.session_logs("r1") == entries
    assert db.session_logs("r1", start=20, limit=2) == entries[1:3]
    assert db.session_logs("r1", start=30, forward=False) == [entries[2], entries[1], entries[0]]
    assert db.session_logs("r1", levels=("warn", "error")) == entries[1:3]
    assert db.session_logs("r1", search="EVENT 4") == [entries[3]]
    assert db.session_logs("r1", search="0%_d") == entries and db.session_logs("r1", search="0%x") == []
    db.add_logs([LogEntry("r1", 50.0, "info", "newest")], keep=3)  # the oldest go
    assert [e.at for e in db.session_logs("r1")] == [30.0, 40.0, 50.0]
    db.forget_logs(before=45.0)
    assert [e.message for e in db.session_logs("r1")] == ["newest"] and db.session_logs("r2") == []


def test_a_session_moves_to_another_scheduler_once(db):
    record = session(scheduler_id="node-a", instance_id="i-1", epoch=3)
    db.insert_session(record)
    moved = db.rehome_session(record.row_id, "node-a", "node-b", 2000.0)
    assert (moved.scheduler_id, moved.instance_id, moved.epoch, moved.last_modified) == ("node-b", None, 4, 2000.0)
    assert db.rehome_session(record.row_id, "node-a", "node-c", 2001.0) is None  # the loser of a race
    assert db.get_session(record.row_id).scheduler_id == "node-b"
    db.end_session(record.row_id, "ttl", 2002.0)
    assert db.rehome_session(record.row_id, "node-b", "node-c", 2003.0) is None  # ended: stays ended
    assert [s.row_id for s in db.active_sessions("node-b")] == []


def test_an_idempotency_key_is_claimed_once_settled_and_kept_for_a_while(db):
    claim = IdempotencyRecord("t1", "k", "hash-a", 1000.0)
    assert db.claim_idempotency_key(claim, 3600, 60) is None  # claimed by this call
    held = db.claim_idempotency_key(IdempotencyRecord("t1", "k", "hash-b", 1001.0), 3600, 60)
    assert (held.request_hash, held.created_at, held.session_row_id) == ("hash-a", 1000.0, None)  # still running
    assert db.claim_idempotency_key(IdempotencyRecord("t2", "k", "hash-b", 1001.0), 3600, 60) is None  # per tenant
    db.settle_idempotency_key("t1", "k", "row-1")
    db.release_idempotency_key("t1", "k")  # a settled claim stays
    assert db.claim_idempotency_key(claim, 3600, 60).session_row_id == "row-1"
    assert db.claim_idempotency_key(IdempotencyRecord("t1", "k", "hash-c", 4601.0), 3600, 60) is None  # expired


def test_an_idempotency_claim_that_never_settles_is_released_or_taken_over(db):
    assert db.claim_idempotency_key(IdempotencyRecord("t1", "k", "h", 1000.0), 3600, 60) is None
    db.release_idempotency_key("t1", "k")  # its create failed
    assert db.claim_idempotency_key(IdempotencyRecord("t1", "k", "h", 1001.0), 3600, 60) is None
    assert db.claim_idempotency_key(IdempotencyRecord("t1", "k", "h", 1050.0), 3600, 60) is not None
    assert db.claim_idempotency_key(IdempotencyRecord("t1", "k", "h", 1062.0), 3600, 60) is None  # abandoned


def test_announcements_reach_watchers(db):
    seen: list = []
    db.watch(seen.append)
    db.announce("abc")
    deadline = time.monotonic() + 5
    while "abc" not in seen and time.monotonic() < deadline:
        db._loop.run_until_complete(asyncio.sleep(0.01))  # PostgreSQL delivers on the loop
    assert seen == ["abc"]
