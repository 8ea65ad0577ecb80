"""Metering with the session manager, the scheduler and real sandboxes, in-process.

A controllable clock makes the time amounts exact (nothing waits for time to pass); CPU seconds
are real, read from the instances' cgroups. The meter samples only when a test says so.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from hutch.errors import AlreadyExists, QuotaExceeded
from hutch.functions import BUILTIN_FUNCTIONS, BUILTIN_TENANT, ResourceSpec
from hutch.metadb.records import FunctionRecord, Tenant, UsageAmounts
from hutch.metadb.sqlite import SQLiteMetaDB
from hutch.pricing import Pricing, cost
from hutch.runtime.bwrap import BwrapRuntime
from hutch.runtime.channel import AgentChannel
from hutch.scheduler.metering import Meter
from hutch.scheduler.scheduler import Scheduler
from hutch.scheduler.sessions import SessionManager
from hutch.storage.local import DirectoryStore
from tests.conftest import throwaway_data_dir
from tests.loop_thread import LoopThread
from tests.scheduler.clock import Clock

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="starts sandboxes: root only")

SMALL = ResourceSpec(memoryMB=256, diskMB=64)
EXACT = 1e-6  # time amounts come from the controllable clock: exact up to float rounding
# A command that burns `seconds` of CPU and prints the CPU its process used, start-up included.
BURN = (
    "python3 -c 'import resource, time\n"
    "while time.process_time() < {seconds}: pass\n"
    "u = resource.getrusage(resource.RUSAGE_SELF)\n"
    "print(u.ru_utime + u.ru_stime)'"
)


class Stack:
    """MetaDB + runtime + scheduler + session manager (+ its meter) on one data directory."""

    def __init__(self, loop: LoopThread, data_dir: Path, clock: Clock, tenant: Tenant | None = None) -> None:
        self.loop = loop
        self.clock = clock
        self.metadb = SQLiteMetaDB(data_dir / "meta.sqlite3")
        self.tenant = tenant or Tenant("t1", "one", clock.now, max_sessions=8)

        async def build():
            await self.metadb.open()
            try:
                await self.metadb.create_tenant(self.tenant)
            except AlreadyExists:
                pass
            spec = BUILTIN_FUNCTIONS[0].model_copy(update={"warm_pool_size": 0, "resources": SMALL})
            await self.metadb.put_function(FunctionRecord(BUILTIN_TENANT, "base", spec.wire(), 0.0, 0.0))
            runtime = BwrapRuntime(data_dir, DirectoryStore(data_dir / "workspaces"))
            self.scheduler = Scheduler("s1", runtime, self.metadb, fill_interval=0.05)
            # Samples only when a test calls `sample()`: its windows are the test's to choose.
            self.meter = Meter(self.metadb, self.scheduler, clock, sample_interval=3600, bucket_seconds=60)
            self.sessions = SessionManager(
                self.metadb, self.scheduler, b"k" * 32, clock=clock, reap_interval=3600, meter=self.meter
            )
            await self.sessions.start()

        loop.run(build())

    def run(self, coro):
        return self.loop.run(coro)

    def create(self, **options):
        return self.run(self.sessions.create(self.tenant, "base", **options))[0]

    def command(self, session, cmd: str) -> str:
        async def go():
            route = await self.sessions.route(session)
            async with AgentChannel(route.socket_path) as channel:
                return (await channel.run(cmd)).text

        return self.run(go())

    def sample(self) -> None:
        self.run(self.meter.sample_once())

    def record(self, session):
        return self.run(self.metadb.get_usage(session.row_id))

    def close(self, stop_instances: bool = True) -> None:
        """Stop; with `stop_instances`, also stop the instances and unmount the staged host view."""

        async def go():
            await self.sessions.close()
            await self.scheduler.close(stop_instances=stop_instances)
            await self.metadb.close()
            if stop_instances:
                await self.scheduler.runtime.close(unstage=True)

        self.run(go())


@pytest.fixture(scope="module")
def loop():
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture
def data_dir():
    with throwaway_data_dir("hutch-meter-") as path:
        yield path


@pytest.fixture
def stack(loop, data_dir):
    made = Stack(loop, data_dir, Clock())
    yield made
    made.close()


def test_a_session_that_works_then_idles_is_billed_active_for_the_work_and_idle_for_the_rest(stack):
    session = stack.create()
    stack.clock.now += 5
    stack.sessions.activity.begin(session.row_id)  # a request arrives...
    stack.clock.now += 10
    stack.sample()  # ...a sample falls in the middle of it...
    stack.clock.now += 20
    stack.sessions.activity.begin(session.row_id)  # ...a second one overlaps it...
    stack.sessions.activity.end(session.row_id)
    stack.clock.now += 0.5
    stack.sessions.activity.end(session.row_id)  # ...and the last ends 30.5 s after the first began
    stack.clock.now += 64.5
    ended = stack.run(stack.sessions.end(session, "deleted"))

    record = stack.record(session)
    assert record.ended_at == ended.ended_at == session.created_at + 100
    assert record.amounts.active_s == pytest.approx(30.5, abs=EXACT)
    assert record.amounts.idle_s == pytest.approx(69.5, abs=EXACT)
    assert record.amounts.down_s == 0
    assert record.amounts.vcpu_active_s == pytest.approx(1.0 * 30.5, abs=EXACT)
    assert record.amounts.memory_alloc_idle_gib_s == pytest.approx(0.25 * 69.5, abs=EXACT)
    assert record.memory_peak_bytes > 1 << 20 and record.samples >= 3
    pricing = Pricing()  # allocated basis: 1 vCPU and 0.25 GiB; idle CPU free, idle memory a tenth
    expected = 30.5 * (0.000014 + 0.25 * 0.0000045) + 69.5 * 0.25 * 0.0000045 * 0.1
    assert cost(record.amounts, pricing).total == pytest.approx(expected + cost_of_disk(record), rel=1e-9)


def cost_of_disk(record) -> float:
    return Pricing().disk_gib_second * record.amounts.disk_gib_s


def test_ended_sessions_keep_their_records_and_the_buckets_add_up_to_them(stack):
    first = stack.create()
    second = stack.create()
    stack.sessions.activity.begin(second.row_id)
    stack.clock.now += 90  # spans at least one bucket boundary (60 s buckets)
    stack.sessions.activity.end(second.row_id)
    stack.run(stack.sessions.end(first, "deleted"))
    stack.clock.now += 30
    stack.run(stack.sessions.end(second, "deleted"))
    stack.clock.now += 600  # time after the end is nobody's
    stack.sample()

    records = [stack.record(first), stack.record(second)]
    assert [r.end_reason for r in records] == ["deleted", "deleted"]
    assert records[0].amounts.active_s + records[0].amounts.idle_s == pytest.approx(90, abs=EXACT)
    assert (records[1].amounts.active_s, records[1].amounts.idle_s) == pytest.approx((90, 30), abs=EXACT)
    assert not stack.meter.is_metered(first.row_id) and stack.meter.state(first.row_id) == "ended"
    totals = stack.run(stack.metadb.usage_totals(0, time.time() + 10_000, tenant_id="t1"))
    assert len(totals) == 1
    summed = totals[0][1]
    expected = UsageAmounts().add(records[0].amounts).add(records[1].amounts)
    for name in ("active_s", "idle_s", "cpu_s", "memory_gib_s", "vcpu_active_s", "disk_gib_s"):
        assert getattr(summed, name) == pytest.approx(getattr(expected, name), rel=1e-9, abs=1e-9), name


def test_cpu_seconds_match_what_a_cpu_burning_command_used_and_count_as_activity(stack):
    session = stack.create()
    stack.clock.now += 2
    stack.sample()
    used = float(stack.command(session, BURN.format(seconds=1.0)))  # no request through the gateway
    stack.clock.now += 20
    stack.sample()

    record = stack.record(session)
    assert used >= 1.0
    # the cgroup also saw bash and the agent serving the command: a few tens of milliseconds
    assert used <= record.amounts.cpu_s <= used + 0.3
    # no request was in flight: the CPU its window burnt is that window's active time, the rest idle
    assert used <= record.amounts.cpu_active_s <= record.amounts.cpu_s
    assert record.amounts.active_s == pytest.approx(record.amounts.cpu_active_s, abs=EXACT)
    assert record.amounts.active_s + record.amounts.idle_s == pytest.approx(22, abs=EXACT)


def test_a_process_that_waits_is_not_activity(stack):
    session = stack.create()

    async def spawn():
        route = await stack.sessions.route(session)
        async with AgentChannel(route.socket_path) as channel:
            await channel.spawn(["sleep", "600"], tag="user-server")
            await channel.spawn(["sleep", "600"])

    stack.run(spawn())
    stack.clock.now += 60
    stack.sample()
    assert stack.meter.state(session.row_id) == "idle"
    record = stack.record(session)
    assert record.amounts.active_s == 0 and record.amounts.idle_s == pytest.approx(60, abs=EXACT)


def test_the_reaper_ends_billing_when_it_ends_the_session(stack):
    session = stack.create(idle_timeout_s=30)
    stack.sessions.activity.begin(session.row_id)
    stack.clock.now += 4
    stack.sessions.activity.end(session.row_id)
    stack.run(stack.sessions.flush_activity())
    stack.clock.now += 30
    assert [s.end_reason for s in stack.run(stack.sessions.reap_once())] == ["idle"]
    stack.clock.now += 100
    stack.sample()
    record = stack.record(session)
    assert record.end_reason == "idle" and record.ended_at == session.created_at + 34
    assert (record.amounts.active_s, record.amounts.idle_s) == pytest.approx((4, 30), abs=EXACT)


def test_a_crashed_instance_is_down_until_the_recovery_and_its_cpu_is_kept(stack):
    session = stack.create()
    stack.clock.now += 5
    used = float(stack.command(session, BURN.format(seconds=0.5)))
    os.kill(stack.scheduler.runtime.get(session.instance_id).pid, 9)
    deadline = time.monotonic() + 10
    while stack.meter.state(session.row_id) != "down":  # the crash report reached the meter
        assert time.monotonic() < deadline
        time.sleep(0.02)
    stack.clock.now += 20
    recovered = stack.run(stack.sessions.route(session)).session
    assert recovered.epoch == 1 and stack.meter.state(session.row_id) == "idle"
    stack.clock.now += 5
    stack.run(stack.sessions.end(recovered, "deleted"))

    record = stack.record(session)
    assert record.amounts.down_s == pytest.approx(20, abs=EXACT)
    assert record.amounts.active_s + record.amounts.idle_s == pytest.approx(10, abs=EXACT)
    assert used <= record.amounts.cpu_s <= used + 0.5  # read from the dead instance's cgroup
    assert record.amounts.active_s >= used - 0.05
    assert record.instance_id == recovered.instance_id


def test_a_restart_resumes_the_records_and_bills_the_gap_idle_without_counting_twice(loop, data_dir):
    clock = Clock()
    first = Stack(loop, data_dir, clock)
    session = first.create(ttl_s=3600, idle_timeout_s=0)
    first.sessions.activity.begin(session.row_id)
    clock.now += 10
    first.sessions.activity.end(session.row_id)
    clock.now += 20
    first.close(stop_instances=False)  # hutch stops; its instance keeps running
    clock.now += 50  # nobody is there to account this: the restart does

    second = Stack(loop, data_dir, clock)
    try:
        record = second.record(session)
        assert record.accounted_to == clock.now and record.ended_at is None
        assert (record.amounts.active_s, record.amounts.idle_s) == pytest.approx((10, 70), abs=EXACT)
        live = second.sessions.active_sessions()[0]
        clock.now += 10
        second.run(second.sessions.end(live, "deleted"))
        record = second.record(session)
        assert (record.amounts.active_s, record.amounts.idle_s, record.amounts.down_s) == pytest.approx(
            (10, 80, 0), abs=EXACT
        )
        assert record.ended_at - record.started_at == pytest.approx(90, abs=EXACT)
    finally:
        second.close()


def test_a_restart_after_the_deadline_bills_only_up_to_it(loop, data_dir):
    clock = Clock()
    first = Stack(loop, data_dir, clock)
    session = first.create(ttl_s=40, idle_timeout_s=0)
    clock.now += 10
    first.close(stop_instances=False)
    clock.now += 100  # the TTL passed while no hutch was running

    second = Stack(loop, data_dir, clock)
    try:
        record = second.record(session)
        assert (record.amounts.idle_s, record.amounts.down_s) == pytest.approx((40, 70), abs=EXACT)
        assert [s.end_reason for s in second.run(second.sessions.reap_once())] == ["ttl"]
    finally:
        second.close()


def test_resource_quotas_refuse_a_session_over_the_tenants_vcpus_or_memory(loop, data_dir):
    tenant = Tenant("t2", "two", time.time(), max_sessions=10, max_vcpu=1.5, max_memory_mb=1024)
    quota = Stack(loop, data_dir, Clock(), tenant)
    try:
        quota.create()  # 1 vCPU, 256 MB
        with pytest.raises(QuotaExceeded, match=r"maxVcpu 1\.5"):
            quota.create()
    finally:
        quota.close()
