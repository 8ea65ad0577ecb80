"""Sessions of a gVisor template function hibernate through the session manager and the
scheduler as bwrap's do (`test_hibernation.py`): idle freeze then hibernation, a request that
restores them with their memory, a pause with memory and an end while hibernated. Skipped
where runsc is missing."""

from __future__ import annotations

import shutil

import pytest

from hutch.runtime.gvisor import GVisorRuntime
from tests.conftest import throwaway_data_dir
from tests.loop_thread import LoopThread
from tests.scheduler.clock import Clock
from tests.scheduler.test_hibernation import SPEC, Stack, _python, _shell

pytestmark = pytest.mark.skipif(shutil.which("runsc") is None, reason="gVisor (runsc) is not installed")


@pytest.fixture(scope="module")
def loop():
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture
def stack(loop, template_store):
    with throwaway_data_dir("hutch-gvhib-") as data_dir:
        made = Stack(loop, data_dir, Clock(), template_store, runtime_class=GVisorRuntime)
        try:
            yield made.clock, made.tenant, made.scheduler, made.sessions, made.quiesced
        finally:
            made.close()


def test_an_idle_gvisor_session_freezes_then_hibernates_and_a_request_restores_it(loop, stack):
    clock, tenant, scheduler, sessions, quiesced = stack
    session, _ = loop.run(sessions.create(tenant, SPEC.name, ttl_s=3600, idle_timeout_s=0))
    instance_id = session.instance_id
    assert scheduler.runtime.get(instance_id).backend == "gvisor"
    _python(loop, sessions, session, "x = 42\nheap = bytearray(b'\\x07') * (80 << 20)")
    background = _shell(loop, sessions, session, "sleep 100000 >/dev/null 2>&1 & echo $!")
    clock.now += 11
    assert loop.run(sessions.reap_once()) == []
    assert sessions.active(session.internal_id).sleep["state"] == "frozen"
    clock.now += 10
    assert loop.run(sessions.reap_once()) == []
    asleep = sessions.active(session.internal_id)
    assert asleep.sleep["state"] == "hibernated"
    assert scheduler.hibernated(instance_id) and not scheduler.is_live(instance_id)
    assert quiesced == [instance_id]
    assert _python(loop, sessions, asleep, "print(x, len(heap) >> 20)") == "42 80"
    woken = sessions.active(session.internal_id)
    assert woken.sleep is None and woken.instance_id == instance_id and woken.epoch == 0
    assert _shell(loop, sessions, woken, f"tr '\\0' ' ' < /proc/{background}/cmdline") == "sleep 100000"


def test_a_paused_gvisor_session_hibernates_wakes_and_ends_while_hibernated(loop, stack):
    _, tenant, scheduler, sessions, _ = stack
    session, _ = loop.run(sessions.create(tenant, SPEC.name, ttl_s=3600, idle_timeout_s=0))
    _python(loop, sessions, session, "y = 'kept'")
    paused, slept = loop.run(sessions.sleep(session, paused=True))
    assert slept and paused.sleep["state"] == "hibernated"
    woken, was_asleep = loop.run(sessions.wake(paused, ttl_s=60))
    assert was_asleep and woken.epoch == 0
    assert _python(loop, sessions, woken, "print(y)") == "kept"
    again, _ = loop.run(sessions.sleep(woken, paused=True))
    assert again.sleep["state"] == "hibernated"
    loop.run(sessions.end(again, "deleted"))
    assert not scheduler.runtime.has(session.instance_id)
