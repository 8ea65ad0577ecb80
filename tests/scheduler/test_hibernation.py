"""Sessions that hibernate to disk (CRIU), through the session manager and the scheduler with a
real bwrap runtime and a template function: the idle tiers (freeze, then hibernate), a pause with
memory, and the wake that restores the session with its memory (same instance, same epoch).
Skipped where no usable CRIU is installed (scripts/install-criu.sh)."""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from hutch.errors import AlreadyExists
from hutch.functions import AffinityConfig, FunctionSpec, ResourceSpec
from hutch.metadb.records import FunctionRecord, Tenant
from hutch.metadb.sqlite import SQLiteMetaDB
from hutch.runtime.bwrap import BwrapRuntime
from hutch.runtime.channel import AgentChannel
from hutch.runtime.userns import RANGE, UidSlots
from hutch.scheduler.scheduler import Scheduler
from hutch.scheduler.sessions import SessionManager
from hutch.storage.local import DirectoryStore
from hutch.storage.shared import SharedStore
from tests.conftest import TEST_TEMPLATE, throwaway_data_dir
from tests.loop_thread import LoopThread
from tests.scheduler.clock import Clock

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="starts sandboxes: root only")

SPEC = FunctionSpec(
    name="napper",
    template=TEST_TEMPLATE,
    resources=ResourceSpec(memoryMB=512, diskMB=256),
    sessionAffinityConfig=AffinityConfig(sessionFreezeAfterIdleInSeconds=10, sessionHibernateAfterIdleInSeconds=20),
)

# A user server (startCommand): hutch follows its output over a connection of its own.
WEB = FunctionSpec(
    name="webby",
    template=TEST_TEMPLATE,
    resources=ResourceSpec(memoryMB=512, diskMB=256),
    startCommand=["python3", "-m", "http.server", "8080"],
    port=8080,
)


class Templates:
    """The part of `TemplateService` the scheduler uses, over the tests' template store."""

    def __init__(self, store) -> None:
        self.store = store

    def rootfs(self, name: str):
        return self.store.rootfs(name)

    def env(self, name: str) -> dict[str, str]:
        return {}


@pytest.fixture(scope="module")
def loop():
    thread = LoopThread()
    yield thread
    thread.close()


@dataclass
class Node:
    """One node of a cluster on this host: its name, uid slots of its own, and the MetaDB and
    workspace store every node shares."""

    name: str
    metadb_path: Path
    store: SharedStore
    uid_slots: UidSlots


class Stack:
    """MetaDB + runtime + scheduler + session manager on one data directory."""

    def __init__(
        self,
        loop: LoopThread,
        data_dir,
        clock: Clock,
        template_store,
        runtime_class=BwrapRuntime,
        node: Node | None = None,
    ) -> None:
        """`node`: this stack is that node of a cluster (its MetaDB and store shared)."""
        self.loop = loop
        self.clock = clock
        self.metadb = SQLiteMetaDB(node.metadb_path if node else data_dir / "meta.sqlite3")
        self.tenant = Tenant("t1", "one", clock.now, max_sessions=4)

        async def build():
            await self.metadb.open()
            try:
                await self.metadb.create_tenant(self.tenant)
                for spec in (SPEC, WEB):
                    spec = spec.model_copy(update={"runtime": runtime_class.name})
                    await self.metadb.put_function(FunctionRecord("t1", spec.name, spec.wire(), 0.0, 0.0))
            except AlreadyExists:
                pass  # a restart on the same data directory
            if node is None:
                self.runtime = runtime_class(data_dir, DirectoryStore(data_dir / "workspaces"))
            else:
                self.runtime = runtime_class(data_dir, node.store, node.uid_slots)
            self.scheduler = Scheduler(
                node.name if node else "s1",
                self.runtime,
                self.metadb,
                fill_interval=0.05,
                templates=Templates(template_store),
            )
            self.sessions = SessionManager(
                self.metadb, self.scheduler, b"k" * 32, clock=clock, reap_interval=3600, cluster=node is not None
            )
            await self.sessions.start()

        loop.run(build())
        self.quiesced: list[str | None] = []
        self.sessions.on_quiesce.append(self.quiesced.append)

    def close(self, stop_instances: bool = True) -> None:
        async def go():
            await self.sessions.close()
            await self.scheduler.close(stop_instances=stop_instances)
            await self.metadb.close()
            await self.runtime.close(unstage=stop_instances)

        self.loop.run(go())


@pytest.fixture
def data_dir():
    with throwaway_data_dir("hutch-hib-") as path:
        yield path


@pytest.fixture
def stack(loop, data_dir, template_store):
    made = Stack(loop, data_dir, Clock(), template_store)
    try:
        if not made.runtime.can_hibernate():
            pytest.skip(f"no usable CRIU: {made.runtime.hibernation_off_reason}")
        yield made.clock, made.tenant, made.scheduler, made.sessions, made.quiesced
    finally:
        made.close()


def _python(loop, sessions, session, code: str) -> str:
    async def go():
        route = await sessions.route(session)
        async with AgentChannel(route.socket_path) as channel:
            lines = await channel.execute(code)
        return "".join(line.get("text", "") for line in lines if line.get("type") == "stdout").strip()

    return loop.run(go())


def _shell(loop, sessions, session, cmd: str) -> str:
    async def go():
        route = await sessions.route(session)
        async with AgentChannel(route.socket_path) as channel:
            return (await channel.run(cmd)).text.strip()

    return loop.run(go())


def test_an_idle_session_freezes_then_hibernates_and_a_request_restores_its_memory(loop, stack):
    clock, tenant, scheduler, sessions, quiesced = stack
    session, _ = loop.run(sessions.create(tenant, SPEC.name, ttl_s=3600, idle_timeout_s=0))
    instance_id = session.instance_id
    _python(loop, sessions, session, "x = 42\nheap = bytearray(b'\\x07') * (80 << 20)")
    background = _shell(loop, sessions, session, "sleep 100000 >/dev/null 2>&1 & echo $!")
    clock.now += 11
    assert loop.run(sessions.reap_once()) == []
    frozen = sessions.active(session.internal_id)
    assert frozen.sleep["state"] == "frozen" and scheduler.frozen(instance_id)
    clock.now += 10
    assert loop.run(sessions.reap_once()) == []
    asleep = sessions.active(session.internal_id)
    assert asleep.sleep["state"] == "hibernated" and not asleep.paused
    assert scheduler.hibernated(instance_id) and not scheduler.is_live(instance_id)
    assert quiesced == [instance_id]  # hutch's connections to it were closed first
    # Any request wakes it: the same instance with its memory, processes and files.
    assert _python(loop, sessions, asleep, "print(x, len(heap) >> 20)") == "42 80"
    woken = sessions.active(session.internal_id)
    assert woken.sleep is None and woken.instance_id == instance_id and woken.epoch == 0
    assert _shell(loop, sessions, woken, f"tr '\\0' ' ' < /proc/{background}/cmdline") == "sleep 100000"


def test_a_pause_with_memory_hibernates_and_a_wake_restores(loop, stack):
    _, tenant, scheduler, sessions, _ = stack
    session, _ = loop.run(sessions.create(tenant, SPEC.name, ttl_s=3600, idle_timeout_s=0))
    _python(loop, sessions, session, "y = 'kept'")
    paused, slept = loop.run(sessions.sleep(session, paused=True))
    assert slept and paused.sleep["state"] == "hibernated" and scheduler.hibernated(session.instance_id)
    woken, was_asleep = loop.run(sessions.wake(paused, ttl_s=60))
    assert was_asleep and woken.sleep is None and woken.epoch == 0
    assert _python(loop, sessions, woken, "print(y)") == "kept"
    # Ended while hibernated: its instance (image and all) goes.
    again, _ = loop.run(sessions.sleep(woken, paused=True))
    assert again.sleep["state"] == "hibernated"
    loop.run(sessions.end(again, "deleted"))
    assert not scheduler.runtime.has(session.instance_id)


def test_a_request_during_a_hibernation_waits_for_it_and_wakes_the_session(loop, stack):
    """A request that comes while the session's instance is being dumped (hutch's connections
    to it just cut) is not sent to the dying instance: it waits, then wakes the session with
    its memory. The client sees a slower answer, never an error."""
    _, tenant, scheduler, sessions, quiesced = stack
    session, _ = loop.run(sessions.create(tenant, SPEC.name, ttl_s=3600, idle_timeout_s=0))
    _python(loop, sessions, session, "z = 'waited'")

    async def go():
        sleeping = asyncio.create_task(sessions.sleep(session, paused=False, hibernate=True))
        while session.instance_id not in quiesced:
            await asyncio.sleep(0.001)
        route = await sessions.route(session)  # the dump runs now
        async with AgentChannel(route.socket_path) as channel:
            lines = await channel.execute("print(z)")
        slept, _ = await sleeping
        return slept, "".join(line.get("text", "") for line in lines if line.get("type") == "stdout").strip()

    slept, answer = loop.run(go())
    assert slept.sleep["state"] == "hibernated" and answer == "waited"
    woken = sessions.active(session.internal_id)
    assert woken.sleep is None and woken.epoch == 0 and scheduler.is_live(woken.instance_id)


def test_the_tenants_image_disk_quota_bounds_hibernation(loop, stack):
    """Hibernation images count against the tenant's `max_image_disk_mb`: a session whose image
    would not fit is frozen instead (its memory kept in RAM, the pause still a pause), and one
    that fits records its image's size."""
    _, tenant, scheduler, sessions, _ = stack
    metadb = sessions.metadb
    first, _ = loop.run(sessions.create(tenant, SPEC.name, ttl_s=3600, idle_timeout_s=0))
    second, _ = loop.run(sessions.create(tenant, SPEC.name, ttl_s=3600, idle_timeout_s=0))
    for session in (first, second):
        _python(loop, sessions, session, "heap = bytearray(b'\\x07') * (40 << 20)")
    loop.run(metadb.update_tenant(tenant.tenant_id, max_image_disk_mb=None))
    hibernated, _ = loop.run(sessions.sleep(first, paused=True))
    assert hibernated.sleep["state"] == "hibernated"
    used = hibernated.sleep["image_bytes"]
    assert used > 0 and loop.run(sessions.image_disk_used(tenant.tenant_id)) == used
    # Room for what the first one takes, not for a second image of 40 MB and more.
    loop.run(metadb.update_tenant(tenant.tenant_id, max_image_disk_mb=(used >> 20) + 20))
    frozen, slept = loop.run(sessions.sleep(second, paused=True))
    assert slept and frozen.paused and frozen.sleep["state"] == "frozen"
    assert scheduler.frozen(second.instance_id) and not scheduler.hibernated(second.instance_id)
    loop.run(sessions.log.flush())
    assert loop.run(metadb.session_logs(second.row_id, search="maxImageDiskMB")), "the log says why"
    woken, _ = loop.run(sessions.wake(frozen, ttl_s=60))
    assert _python(loop, sessions, woken, "print(len(heap) >> 20)") == "40"
    # Ended, the first one's image frees its room; with room (the estimate is the session's
    # memory, which compression only shrinks), the second one hibernates.
    loop.run(sessions.end(sessions.active(first.internal_id), "deleted"))
    assert loop.run(sessions.image_disk_used(tenant.tenant_id)) == 0
    loop.run(metadb.update_tenant(tenant.tenant_id, max_image_disk_mb=1024))
    again, _ = loop.run(sessions.sleep(woken, paused=True))
    assert again.sleep["state"] == "hibernated"


def test_a_hibernated_session_survives_a_restart_and_wakes_with_its_memory(loop, data_dir, template_store):
    clock = Clock()
    first = Stack(loop, data_dir, clock, template_store)
    if not first.runtime.can_hibernate():
        first.close()
        pytest.skip(f"no usable CRIU: {first.runtime.hibernation_off_reason}")
    session, _ = loop.run(first.sessions.create(first.tenant, SPEC.name, ttl_s=3600, idle_timeout_s=0))
    _python(loop, first.sessions, session, "z = 'across restarts'")
    paused, _ = loop.run(first.sessions.sleep(session, paused=True))
    assert paused.sleep["state"] == "hibernated"
    first.close(stop_instances=False)  # a restart with live_restore: instances are left as they are
    second = Stack(loop, data_dir, clock, template_store)
    try:
        again = second.sessions.active(session.internal_id)
        assert again.sleep["state"] == "hibernated" and second.scheduler.hibernated(session.instance_id)
        woken, _ = loop.run(second.sessions.wake(again, ttl_s=60))
        assert woken.instance_id == session.instance_id and woken.epoch == 0
        assert _python(loop, second.sessions, woken, "print(z)") == "across restarts"
    finally:
        second.close()


def test_a_session_hibernated_on_a_dead_node_moves_to_another_with_its_memory(loop, data_dir, template_store):
    """Two nodes share MetaDB and a workspace store: node A hibernates two idle sessions (their
    images on the store) and dies; node B adopts them. The one whose image is there runs on B
    with its memory, processes and files, `epoch` as it was; the one whose image was lost gets a
    new instance on its files (`epoch` + 1), as any adopted session."""
    clock = Clock()
    (data_dir / "shared").mkdir()
    first_uid = 2_000_000_000 + random.randrange(128) * 128 * RANGE

    def node(index: int) -> Stack:
        name = f"node-{index}"
        store = SharedStore(data_dir / "shared" / "workspaces", name)
        slots = UidSlots(first_uid=first_uid + index * 64 * RANGE, count=64)
        shared = Node(name, data_dir / "meta.sqlite3", store, slots)
        return Stack(loop, data_dir / name, clock, template_store, node=shared)

    node_a = node(0)
    if not node_a.runtime.can_hibernate():
        node_a.close()
        pytest.skip(f"no usable CRIU: {node_a.runtime.hibernation_off_reason}")
    kept, lost = (loop.run(node_a.sessions.create(node_a.tenant, SPEC.name, ttl_s=3600))[0] for _ in range(2))
    for session, word in ((kept, "kept"), (lost, "lost")):
        _python(loop, node_a.sessions, session, f"z = '{word} memory'")
        _shell(loop, node_a.sessions, session, f"echo {word} > /home/user/file.txt")
    asleep = {}
    for session in (kept, lost):
        asleep[session.session_id], _ = loop.run(node_a.sessions.sleep(session, paused=False, hibernate=True))
        assert asleep[session.session_id].sleep["image_of"] == session.instance_id  # on the store
    lost_images = node_a.runtime.get(lost.instance_id).workspace_path / "hibernation"
    node_a.close(stop_instances=False)  # node A dies
    for image in lost_images.iterdir():
        for entry in (image / "image").iterdir():
            entry.unlink()  # this one's image is lost

    node_b = node(1)
    try:
        moved = loop.run(node_b.sessions.adopt(kept.row_id, "node-0"))
        assert moved.scheduler_id == "node-1" and moved.instance_id != kept.instance_id
        assert moved.epoch == kept.epoch and moved.sleep is None  # nothing was lost
        assert _python(loop, node_b.sessions, moved, "print(z)") == "kept memory"
        assert _shell(loop, node_b.sessions, moved, "cat /home/user/file.txt") == "kept"
        assert not (node_b.runtime.get(moved.instance_id).workspace_path / "hibernation" / kept.instance_id).exists()

        recovered = loop.run(node_b.sessions.adopt(lost.row_id, "node-0"))
        assert recovered.epoch == lost.epoch + 1 and recovered.sleep is None
        assert _python(loop, node_b.sessions, recovered, "print(globals().get('z'))") == "None"
        assert _shell(loop, node_b.sessions, recovered, "cat /home/user/file.txt") == "lost"
        loop.run(node_b.sessions.log.flush())
        assert loop.run(node_b.metadb.session_logs(lost.row_id, search="image could not be restored here"))
        assert loop.run(node_b.metadb.session_logs(kept.row_id, search="restored here from its hibernation image"))
    finally:
        node_b.close()


def test_a_session_whose_restore_fails_gets_a_new_instance_on_its_files(loop, stack):
    _, tenant, scheduler, sessions, _ = stack
    session, _ = loop.run(sessions.create(tenant, SPEC.name, ttl_s=3600, idle_timeout_s=0))
    # A process holding a file open that is gone when the restore comes: CRIU cannot restore it.
    _shell(
        loop, sessions, session, "echo held > /home/user/held.txt; sleep 100000 < /home/user/held.txt >/dev/null 2>&1 &"
    )
    _shell(loop, sessions, session, "echo kept > /home/user/kept.txt")
    paused, _ = loop.run(sessions.sleep(session, paused=True))
    assert paused.sleep["state"] == "hibernated"
    instance = scheduler.runtime.get(session.instance_id)
    (instance.workspace_path / "upper" / "home" / "user" / "held.txt").unlink()
    woken, _ = loop.run(sessions.wake(paused, ttl_s=60))  # no error: a new instance, files kept
    assert woken.sleep is None and woken.epoch == 1 and woken.instance_id != session.instance_id
    assert not scheduler.runtime.has(session.instance_id)  # the old one (image and all) is gone
    assert _shell(loop, sessions, woken, "cat /home/user/kept.txt") == "kept"


def test_a_session_with_a_user_server_hibernates_and_its_log_follows_again(loop, stack):
    _, tenant, _scheduler, sessions, _ = stack
    session, _ = loop.run(sessions.create(tenant, WEB.name, ttl_s=3600, idle_timeout_s=0))
    probe = "python3 -c \"import urllib.request as u; print(u.urlopen('http://127.0.0.1:8080/').status)\""
    deadline = time.monotonic() + 20
    while _shell(loop, sessions, session, probe + " 2>/dev/null") != "200":
        assert time.monotonic() < deadline, "the user server did not answer"
        time.sleep(0.2)
    assert session.row_id in sessions._followers
    paused, _ = loop.run(sessions.sleep(session, paused=True))
    assert paused.sleep["state"] == "hibernated"  # the follower's connection did not stop the dump
    assert session.row_id not in sessions._followers
    woken, _ = loop.run(sessions.wake(paused, ttl_s=60))
    assert woken.epoch == 0 and session.row_id in sessions._followers
    assert _shell(loop, sessions, woken, probe) == "200"


def test_on_a_host_without_criu_sessions_freeze_instead_and_wake_with_their_memory(loop, data_dir, template_store):
    made = Stack(loop, data_dir, Clock(), template_store)
    try:
        # This host as one without a usable CRIU (hutch found none at start): no instance it
        # starts is laid out for CRIU, and every sleep with memory is a freeze.
        made.runtime.criu = None
        assert not made.runtime.can_hibernate()
        session, _ = loop.run(made.sessions.create(made.tenant, SPEC.name, ttl_s=3600, idle_timeout_s=0))
        assert not made.runtime.can_hibernate(session.instance_id)
        _python(loop, made.sessions, session, "z = 'in memory'")
        paused, slept = loop.run(made.sessions.sleep(session, paused=True))
        assert slept and paused.sleep["state"] == "frozen" and made.scheduler.frozen(session.instance_id)
        # The idle tier that would hibernate leaves it frozen; a wake thaws it, memory and all.
        made.clock.now += 3600 * 0.9
        loop.run(made.sessions.reap_once())
        assert made.sessions.active(session.internal_id).sleep["state"] == "frozen"
        woken, _ = loop.run(made.sessions.wake(paused, ttl_s=60))
        assert woken.sleep is None and woken.epoch == 0
        assert _python(loop, made.sessions, woken, "print(z)") == "in memory"
    finally:
        made.close()
