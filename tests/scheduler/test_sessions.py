"""The session manager and the scheduler together, in-process, with real sandboxes.

A controllable clock drives TTL and idle expiry, so these tests never wait for time to pass.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from hutch.errors import AlreadyExists, FailedPrecondition, Paused, QuotaExceeded
from hutch.functions import BUILTIN_FUNCTIONS, BUILTIN_TENANT, AffinityConfig, FunctionSpec, ResourceSpec
from hutch.metadb.records import FunctionRecord, SessionStatus, Tenant
from hutch.metadb.sqlite import SQLiteMetaDB
from hutch.runtime.bwrap import BwrapRuntime
from hutch.runtime.channel import AgentChannel
from hutch.scheduler.scheduler import Scheduler
from hutch.scheduler.sessions import SessionManager
from hutch.storage.local import DirectoryStore
from tests.conftest import throwaway_data_dir
from tests.loop_thread import LoopThread
from tests.scheduler.clock import Clock

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="starts sandboxes: root only")

SMALL = ResourceSpec(memoryMB=256, diskMB=64)


class Stack:
    """MetaDB + runtime + scheduler + session manager on one data directory."""

    def __init__(self, loop: LoopThread, data_dir: Path, clock: Clock) -> None:
        self.loop = loop
        self.data_dir = data_dir
        self.clock = clock
        self.metadb = SQLiteMetaDB(data_dir / "meta.sqlite3")
        self.tenant = Tenant("t1", "one", clock.now, max_sessions=4)

        async def build():
            await self.metadb.open()
            try:
                await self.metadb.create_tenant(self.tenant)
            except AlreadyExists:
                pass
            for spec in (
                BUILTIN_FUNCTIONS[0].model_copy(update={"warm_pool_size": 1, "resources": SMALL}),
                FunctionSpec(name="keep", resources=SMALL, persistWorkspace=True),
                FunctionSpec(
                    name="noreuse",
                    resources=SMALL,
                    sessionAffinityConfig=AffinityConfig(disableSessionIdReuse=True),
                ),
            ):
                tenant = BUILTIN_TENANT if spec.name == "base" else "t1"
                await self.metadb.put_function(FunctionRecord(tenant, spec.name, spec.wire(), 0.0, 0.0))
            runtime = BwrapRuntime(data_dir, DirectoryStore(data_dir / "workspaces"))
            self.scheduler = Scheduler("s1", runtime, self.metadb, fill_interval=0.05)
            self.sessions = SessionManager(self.metadb, self.scheduler, b"k" * 32, clock=clock, reap_interval=3600)
            await self.sessions.start()

        loop.run(build())

    def run(self, coro):
        return self.loop.run(coro)

    def command(self, session, cmd: str) -> str:
        async def go():
            route = await self.sessions.route(session)
            async with AgentChannel(route.socket_path) as channel:
                return (await channel.run(cmd)).text

        return self.run(go())

    def wait_pool(self, size: int = 1) -> None:
        deadline = time.monotonic() + 20
        while self.scheduler.pool_sizes().get("*/base", 0) < size:
            assert time.monotonic() < deadline, "warm pool did not fill"
            time.sleep(0.05)

    def close(self, stop_instances: bool = True) -> None:
        async def go():
            await self.sessions.close()
            await self.scheduler.close(stop_instances=stop_instances)
            await self.metadb.close()

        self.run(go())


@pytest.fixture(scope="module")
def loop():
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture
def data_dir():
    with throwaway_data_dir("hutch-sched-") as path:
        yield path


@pytest.fixture
def stack(loop, data_dir):
    made = Stack(loop, data_dir, Clock())
    yield made
    made.close()
    made.run(made.scheduler.runtime.close(unstage=True))


def test_a_new_session_takes_a_warm_instance_and_the_pool_refills(stack):
    stack.wait_pool()
    warm = list(stack.scheduler.pools["*/base"].warm)
    session, created = stack.run(stack.sessions.create(stack.tenant, "base", session_id="s1"))
    assert created and session.instance_id == warm[0]
    assert stack.scheduler.stats["pool_hits"] == 1
    stack.wait_pool()
    assert session.instance_id not in stack.scheduler.pools["*/base"].warm
    assert stack.command(session, "pwd; ls -A").split() == ["/home/user"]


def test_a_key_started_again_while_its_last_session_ends_gets_a_wiped_workspace(stack):
    first, _ = stack.run(stack.sessions.create(stack.tenant, "base", session_id="again"))
    assert stack.command(first, "echo old > mine.txt; echo ok").strip() == "ok"

    async def end_and_start_again():
        # The request for the key arrives while the end is under way (after MetaDB said Expired).
        ending = asyncio.ensure_future(stack.sessions.end(first, "deleted"))
        while stack.sessions.active(first.internal_id) is not None:
            await asyncio.sleep(0)
        started = await stack.sessions.create(stack.tenant, "base", session_id="again", existing_ok=True)
        await ending
        return started

    second, created = stack.run(end_and_start_again())
    assert created and second.row_id != first.row_id
    assert stack.command(second, "ls -A; echo end").split() == ["end"]  # no file of the old session
    assert stack.command(second, "echo new > mine.txt; cat mine.txt").strip() == "new"  # and not wiped later


def test_racing_first_requests_with_one_key_share_one_instance(stack):
    async def race():
        return await asyncio.gather(
            *[stack.sessions.create(stack.tenant, "base", session_id="same", existing_ok=True) for _ in range(8)]
        )

    results = stack.run(race())
    assert len({session.instance_id for session, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    with pytest.raises(AlreadyExists):
        stack.run(stack.sessions.create(stack.tenant, "base", session_id="same"))


def test_a_crashed_instance_is_replaced_keeping_id_and_workspace(stack):
    session, _ = stack.run(stack.sessions.create(stack.tenant, "base", session_id="crashy"))
    stack.command(session, "echo kept > note.txt")
    os.kill(stack.scheduler.runtime.get(session.instance_id).pid, 9)
    deadline = time.monotonic() + 5
    while stack.scheduler.is_live(session.instance_id):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    route = stack.run(stack.sessions.route(session))
    assert route.session.session_id == "crashy"
    assert route.session.epoch == 1 and route.session.instance_id != session.instance_id
    assert stack.command(route.session, "cat note.txt").strip() == "kept"


def test_ttl_and_idle_timeouts_end_sessions_and_busy_ones_stay(stack):
    ttl, _ = stack.run(stack.sessions.create(stack.tenant, "base", ttl_s=10, idle_timeout_s=0))
    idle, _ = stack.run(stack.sessions.create(stack.tenant, "base", ttl_s=600, idle_timeout_s=5))
    busy, _ = stack.run(stack.sessions.create(stack.tenant, "base", ttl_s=600, idle_timeout_s=5))
    stack.sessions.activity.begin(busy.row_id)  # an open stream
    stack.clock.now += 6
    ended = {s.row_id: s.end_reason for s in stack.run(stack.sessions.reap_once())}
    assert ended == {idle.row_id: "idle"}
    stack.clock.now += 5
    ended = {s.row_id: s.end_reason for s in stack.run(stack.sessions.reap_once())}
    assert ended == {ttl.row_id: "ttl"}
    assert not stack.scheduler.is_live(ttl.instance_id) and not stack.scheduler.is_live(idle.instance_id)
    stack.sessions.activity.end(busy.row_id)
    stack.clock.now += 5
    assert [s.row_id for s in stack.run(stack.sessions.reap_once())] == [busy.row_id]


def test_renewal_moves_the_ttl_deadline(stack):
    session, _ = stack.run(stack.sessions.create(stack.tenant, "base", ttl_s=10, idle_timeout_s=0))
    stack.clock.now += 8
    stack.run(stack.sessions.renew(session, ttl_s=10))
    stack.clock.now += 8
    assert stack.run(stack.sessions.reap_once()) == []
    stack.clock.now += 3
    assert [s.end_reason for s in stack.run(stack.sessions.reap_once())] == ["ttl"]
    with pytest.raises(FailedPrecondition):
        stack.run(stack.sessions.renew(session, ttl_s=10))


def test_the_workspace_is_wiped_at_the_end_unless_the_function_keeps_it(stack):
    store = stack.scheduler.runtime.store
    plain, _ = stack.run(stack.sessions.create(stack.tenant, "base", session_id="p"))
    kept, _ = stack.run(stack.sessions.create(stack.tenant, "keep", session_id="k"))
    stack.command(kept, "echo again > memo")
    stack.run(stack.sessions.end(plain, "deleted"))
    stack.run(stack.sessions.end(kept, "deleted"))
    assert not store.exists(plain.workspace_key)
    assert store.exists(kept.workspace_key)
    back, _ = stack.run(stack.sessions.create(stack.tenant, "keep", session_id="k"))
    assert back.row_id != kept.row_id and back.workspace_key == kept.workspace_key
    assert stack.command(back, "cat memo").strip() == "again"


def test_reuse_of_an_ended_id_follows_disable_session_id_reuse(stack):
    first, _ = stack.run(stack.sessions.create(stack.tenant, "noreuse", session_id="once"))
    stack.run(stack.sessions.end(first, "deleted"))
    with pytest.raises(FailedPrecondition):
        stack.run(stack.sessions.create(stack.tenant, "noreuse", session_id="once"))
    again, _ = stack.run(stack.sessions.create(stack.tenant, "base", session_id="once"))
    assert again.status == SessionStatus.ACTIVE


def test_the_live_session_quota_is_enforced(stack):
    for _ in range(4):
        stack.run(stack.sessions.create(stack.tenant, "base"))
    with pytest.raises(QuotaExceeded):
        stack.run(stack.sessions.create(stack.tenant, "base"))


def test_a_restart_reattaches_live_instances_and_recovers_dead_ones(loop, data_dir):
    clock = Clock()
    first = Stack(loop, data_dir, clock)
    first.wait_pool()
    alive, _ = first.run(first.sessions.create(first.tenant, "base", session_id="alive"))
    dead, _ = first.run(first.sessions.create(first.tenant, "base", session_id="dead"))
    first.command(alive, "echo a > mark")
    first.command(dead, "echo d > mark")
    dead_pid = first.scheduler.runtime.get(dead.instance_id).pid
    first.close(stop_instances=False)  # hutch goes away; its instances keep running
    os.kill(dead_pid, 9)  # and one of them dies meanwhile
    time.sleep(0.2)

    second = Stack(loop, data_dir, clock)
    try:
        live = {s.session_id: s for s in second.sessions.active_sessions()}
        assert set(live) == {"alive", "dead"}
        assert second.scheduler.is_live(live["alive"].instance_id)
        assert live["alive"].instance_id == alive.instance_id
        assert second.command(live["alive"], "cat mark").strip() == "a"
        assert not second.scheduler.is_live(live["dead"].instance_id)
        recovered = second.run(second.sessions.route(live["dead"])).session
        assert recovered.epoch == 1
        assert second.command(recovered, "cat mark").strip() == "d"
        assert len(second.scheduler.pools["*/base"].warm) == 1  # the warm instance was adopted back
    finally:
        second.close()
        second.run(second.scheduler.runtime.close(unstage=True))


# -- sleep (`hutch.scheduler.sleep`) ----------------------------------------------------------------


def test_a_session_paused_at_its_timeout_keeps_its_memory_until_resumed_then_ends_after_retention(stack):
    lifecycle = {"on_timeout": "pause", "auto_resume": False, "memory": True}
    session, _ = stack.run(stack.sessions.create(stack.tenant, "base", ttl_s=10, idle_timeout_s=0, lifecycle=lifecycle))
    stack.command(session, "sleep 600 & echo started")
    stack.clock.now += 11
    assert stack.run(stack.sessions.reap_once()) == []  # paused, not ended
    paused = stack.sessions.active(session.internal_id)
    assert paused.paused and paused.sleep["state"] == "frozen"
    assert stack.scheduler.frozen(paused.instance_id)
    assert paused.expires_at == stack.clock.now + stack.sessions.paused_retention_s
    with pytest.raises(Paused):
        stack.run(stack.sessions.route(paused))
    woken, slept = stack.run(stack.sessions.wake(paused, ttl_s=30))
    assert slept and woken.sleep is None and woken.expires_at == stack.clock.now + 30
    assert not stack.scheduler.frozen(woken.instance_id) and woken.epoch == 0
    assert "sleep 600" in stack.command(woken, "ps -eo args")  # its processes were kept
    # Paused again, it is kept for the retention, then ended.
    stack.run(stack.sessions.sleep(woken, paused=True))
    stack.clock.now += stack.sessions.paused_retention_s + 1
    assert [s.end_reason for s in stack.run(stack.sessions.reap_once())] == ["ttl"]


def test_an_idle_freeze_wakes_on_route_and_a_filesystem_pause_boots_a_new_instance(stack):
    session, _ = stack.run(stack.sessions.create(stack.tenant, "base", session_id="dozy"))
    stack.command(session, "echo on-disk > note")
    asleep, slept = stack.run(stack.sessions.sleep(session, paused=False))
    assert slept and not asleep.paused and stack.scheduler.frozen(asleep.instance_id)
    route = stack.run(stack.sessions.route(asleep))  # any request wakes an idle sleeper
    assert route.session.sleep is None and route.session.instance_id == session.instance_id
    stopped, _ = stack.run(stack.sessions.sleep(route.session, paused=True, memory=False))
    assert stopped.sleep["state"] == "stopped" and stopped.instance_id is None
    assert not stack.scheduler.is_live(session.instance_id)
    woken, _ = stack.run(stack.sessions.wake(stopped))
    assert woken.epoch == 1 and woken.instance_id not in (None, session.instance_id)
    assert stack.command(woken, "cat note").strip() == "on-disk"


def test_a_paused_session_survives_a_restart_still_paused(loop, data_dir):
    clock = Clock()
    first = Stack(loop, data_dir, clock)
    session, _ = first.run(first.sessions.create(first.tenant, "base", session_id="napper"))
    first.command(session, "echo z > mark")
    first.run(first.sessions.sleep(session, paused=True))
    first.close(stop_instances=False)
    second = Stack(loop, data_dir, clock)
    try:
        back = second.sessions.active(session.internal_id)
        assert back.paused and second.scheduler.frozen(back.instance_id)
        woken, _ = second.run(second.sessions.wake(back))
        assert woken.epoch == 0 and second.command(woken, "cat mark").strip() == "z"
    finally:
        second.close()
        second.run(second.scheduler.runtime.close(unstage=True))
