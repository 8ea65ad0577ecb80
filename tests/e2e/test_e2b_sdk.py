"""The official `e2b` and `e2b-code-interpreter` SDKs, unchanged, against `hutch serve`.

The SDKs are pointed at hutch the way a user does it: `E2B_API_URL` and `E2B_SANDBOX_URL` set to
the server, `E2B_API_KEY` to a tenant's key. The newest SDKs run in this process; the oldest
supported ones (e2b 2.31) run the same core scenario in a virtualenv of their own.
Control-plane tests come first; the data-plane ones (commands, files, code) go through the
gateway.
"""

from __future__ import annotations

import threading
import time
import uuid
from datetime import timedelta

import httpx
import pytest
from e2b import (
    AuthenticationException,
    FileType,
    Sandbox,
    SandboxException,
    SandboxNotFoundException,
    SandboxNotRunningException,
    SandboxQuery,
    SandboxState,
    TimeoutException,
)
from e2b_code_interpreter import Sandbox as CodeSandbox

from tests.e2e.old_sdk import ensure_venv, run_scenario


def _wait_for(predicate, timeout: float = 10.0, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not met in time")


@pytest.fixture
def tenant(server, monkeypatch):
    """A fresh tenant whose key the SDK reads from E2B_API_KEY; its sandboxes are killed after."""
    client = server.new_tenant("e2b")
    monkeypatch.setenv("E2B_API_URL", server.url)
    monkeypatch.setenv("E2B_SANDBOX_URL", server.url)
    monkeypatch.setenv("E2B_API_KEY", client.headers["X-API-Key"])
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    monkeypatch.delenv("E2B_DOMAIN", raising=False)
    yield client
    for sandbox in client.get("/v2/sandboxes").json():
        client.delete(f"/sandboxes/{sandbox['sandboxID']}")


@pytest.fixture
def other_key(server) -> str:
    return server.new_tenant("mallory").headers["X-API-Key"]


def _session(client: httpx.Client, sandbox_id: str) -> dict:
    return client.get(f"/v1/functions/base/sessions/{sandbox_id}").json()


# -- control plane -----------------------------------------------------------------------------


def test_create_returns_a_running_sandbox_the_sdk_can_describe(tenant):
    box = Sandbox.create(timeout=120, metadata={"owner": "alice"}, envs={"GREETING": "hi"})
    info = box.get_info()
    assert info.sandbox_id == box.sandbox_id and info.template_id == "base"
    assert info.state == SandboxState.RUNNING and info.metadata == {"owner": "alice"}
    assert abs(info.end_at - info.started_at - timedelta(seconds=120)) < timedelta(milliseconds=10)
    assert info.envd_version == "0.6.4" and info.cpu_count == 1 and info.memory_mb == 512
    assert info.allow_internet_access is True  # E2B's default: egress through hutch's proxy
    assert box.connection_config.sandbox_headers["X-Access-Token"]


def test_an_e2b_sandbox_is_a_session_in_the_native_api(tenant):
    box = Sandbox.create(timeout=90)
    session = _session(tenant, box.sandbox_id)
    assert session["sessionAffinityType"] == "E2B" and session["sessionStatus"] == "Active"
    assert session["sessionTTLInSeconds"] == 90 and session["sessionIdleTimeoutInSeconds"] == 0
    listed = tenant.get("/v1/sessions", params={"status": "Active"}).json()["sessions"]
    assert [s["sessionId"] for s in listed] == [box.sandbox_id]

    assert tenant.delete(f"/v1/functions/base/sessions/{box.sandbox_id}").status_code == 204
    with pytest.raises(SandboxNotFoundException):
        box.get_info()


def test_kill_ends_the_session_and_a_second_kill_reports_false(tenant):
    box = Sandbox.create()
    assert box.kill() is True
    assert Sandbox.kill(box.sandbox_id) is False
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(box.sandbox_id)
    ended = _session(tenant, box.sandbox_id)
    assert ended["sessionStatus"] == "Expired" and ended["endReason"] == "deleted"


def test_set_timeout_moves_the_deadline_both_ways(tenant):
    box = Sandbox.create(timeout=300)
    first = box.get_info().end_at
    box.set_timeout(30)
    shorter = box.get_info().end_at
    assert shorter < first
    assert _session(tenant, box.sandbox_id)["sessionTTLInSeconds"] == 30
    box.set_timeout(3600)
    assert box.get_info().end_at > first


def test_a_sandbox_ends_when_its_timeout_runs_out(tenant):
    box = Sandbox.create(timeout=300)
    box.set_timeout(1)
    ended = _wait_for(lambda: (s := _session(tenant, box.sandbox_id))["sessionStatus"] == "Expired" and s, 10)
    assert ended["endReason"] == "ttl"
    with pytest.raises(SandboxNotFoundException):
        box.get_info()


def test_connect_returns_the_same_sandbox_and_only_extends_its_timeout(tenant):
    box = Sandbox.create(timeout=600)
    before = box.get_info().end_at
    again = Sandbox.connect(box.sandbox_id, timeout=60)
    assert again.sandbox_id == box.sandbox_id
    assert (
        again.connection_config.sandbox_headers["X-Access-Token"]
        == (box.connection_config.sandbox_headers["X-Access-Token"])
    )
    assert box.get_info().end_at == before  # 60 s from now is sooner: unchanged
    Sandbox.connect(box.sandbox_id, timeout=1200)
    assert box.get_info().end_at > before


def test_list_filters_by_metadata_and_pages_with_next_tokens(tenant):
    tag = uuid.uuid4().hex
    made = {Sandbox.create(metadata={"suite": tag, "n": str(i)}).sandbox_id for i in range(3)}
    Sandbox.create(metadata={"suite": "other"})

    paginator = Sandbox.list(query=SandboxQuery(metadata={"suite": tag}), limit=2)
    pages = []
    while paginator.has_next:
        pages.append([s.sandbox_id for s in paginator.next_items()])
    assert [len(p) for p in pages] == [2, 1]
    assert {i for p in pages for i in p} == made

    running = Sandbox.list(query=SandboxQuery(metadata={"suite": tag}, state=[SandboxState.RUNNING])).next_items()
    assert {s.sandbox_id for s in running} == made and all(s.metadata["suite"] == tag for s in running)
    assert Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items() == []
    listed = Sandbox.list(query=SandboxQuery(template="base")).next_items()
    assert len(listed) == 4


def test_another_tenant_cannot_see_kill_connect_or_extend_a_sandbox(tenant, other_key):
    box = Sandbox.create(timeout=120)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(box.sandbox_id, api_key=other_key)
    assert Sandbox.kill(box.sandbox_id, api_key=other_key) is False
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(box.sandbox_id, api_key=other_key)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.set_timeout(box.sandbox_id, 5, api_key=other_key)
    assert Sandbox.list(api_key=other_key).next_items() == []
    assert box.get_info().state == SandboxState.RUNNING


def test_a_wrong_key_or_an_unknown_template_is_refused(tenant):
    with pytest.raises(AuthenticationException):
        Sandbox.create(api_key="e2b_not_a_key")
    with pytest.raises(SandboxException, match="template 'no-such-template' not found"):
        Sandbox.create(template="no-such-template")


COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done"


def _count(box) -> int:
    return int(box.files.read("/tmp/count").strip() or 0)


def test_pause_and_connect_keep_variables_a_heap_files_and_processes(tenant):
    box = CodeSandbox.create(timeout=120)
    box.run_code("x = 42\nheap = bytearray(80 * 2**20)")
    box.files.write("/home/user/kept.txt", "still here")
    box.commands.run(COUNTER, background=True)
    _wait_for(lambda: box.files.exists("/tmp/count") and _count(box) > 2)
    for _ in range(3):
        before = _count(box)
        assert box.pause() is True
        assert box.get_info().state == SandboxState.PAUSED
        paused = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()
        assert [s.sandbox_id for s in paused] == [box.sandbox_id]
        assert Sandbox.list(query=SandboxQuery(state=[SandboxState.RUNNING])).next_items() == []
        assert box.pause() is False  # already paused
        assert box.is_running() is False
        with pytest.raises(TimeoutException, match="is paused"):  # the SDKs' answer to E2B's 502
            box.run_code("x")  # no auto_resume: traffic does not wake it
        time.sleep(2)  # the counter would have gone ~20 further if it ran
        resumed = Sandbox.connect(box.sandbox_id, timeout=120)
        assert resumed.get_info().state == SandboxState.RUNNING
        assert _count(box) - before < 10  # frozen while paused
        assert box.run_code("x").text == "42"
        assert box.run_code("len(heap)").text == str(80 * 2**20)
        assert box.files.read("/home/user/kept.txt") == "still here"
        _wait_for(lambda before=before: _count(box) > before + 3)  # the background process runs on
    box.kill()


def test_auto_pause_at_the_timeout_and_auto_resume_on_the_next_run_code(tenant):
    box = CodeSandbox.create(timeout=3, lifecycle={"on_timeout": "pause", "auto_resume": True})
    assert box.get_info().lifecycle == {"on_timeout": "pause", "auto_resume": True}
    box.run_code("y = 'kept'")
    _wait_for(lambda: box.get_info().state == SandboxState.PAUSED, timeout=20)
    assert box.run_code("y").text == "kept"  # traffic resumes it
    info = box.get_info()
    assert info.state == SandboxState.RUNNING
    box.kill()


def test_a_filesystem_only_pause_keeps_files_and_drops_processes(tenant):
    box = Sandbox.create(timeout=120, lifecycle={"on_timeout": "pause"})
    box.files.write("/home/user/notes.txt", "on disk")
    box.commands.run("sleep 600", background=True)
    assert box.pause(mode="filesystem") is True
    assert box.get_info().state == SandboxState.PAUSED
    assert Sandbox.connect(box.sandbox_id).get_info().state == SandboxState.RUNNING
    assert box.files.read("/home/user/notes.txt") == "on disk"
    assert "sleep 600" not in box.commands.run("ps -eo args").stdout
    box.kill()


def test_auto_resume_without_a_pause_at_the_timeout_is_refused(tenant):
    refused = tenant.post("/v2/sandboxes", json={"templateID": "base", "autoResume": {"enabled": True}})
    assert refused.status_code == 400 and "autoPause" in refused.json()["message"]
    both = {"templateID": "base", "autoPause": True, "autoPauseMemory": False, "autoResume": {"enabled": True}}
    assert tenant.post("/v2/sandboxes", json=both).status_code == 400


def test_the_pre_2_51_endpoints_speak_e2b_shapes(server, tenant):
    made = tenant.post(
        "/sandboxes",
        json={"templateID": "base", "timeout": 60, "secure": True, "allow_internet_access": True, "metadata": {}},
    )
    assert made.status_code == 201
    body = made.json()
    assert body["envdVersion"] == "0.6.4" and body["domain"] == f"localhost:{server.port}" and body["envdAccessToken"]
    assert {"templateID", "sandboxID", "clientID"} <= set(body)
    listed = tenant.get("/sandboxes").json()
    assert [s["sandboxID"] for s in listed] == [body["sandboxID"]] and listed[0]["state"] == "running"
    connected = tenant.post(f"/sandboxes/{body['sandboxID']}/connect", json={"timeout": 30})
    assert connected.status_code == 200 and connected.json()["sandboxID"] == body["sandboxID"]

    bad = tenant.post("/v2/sandboxes", json={"timeout": 60})
    assert bad.status_code == 400 and bad.json()["code"] == 400 and "templateID" in bad.json()["message"]
    assert tenant.post("/v2/sandboxes", json={"templateID": "base", "timeout": 86401}).status_code == 400
    missing = tenant.delete("/sandboxes/inosuchsandbox")
    assert missing.status_code == 404 and missing.json() == {"code": 404, "message": "sandbox inosuchsandbox not found"}
    anonymous = httpx.get(f"{server.url}/v2/sandboxes")
    assert anonymous.status_code == 401 and anonymous.json()["code"] == 401
    logs = tenant.get(f"/sandboxes/{body['sandboxID']}/snapshots")
    assert logs.status_code == 501 and logs.json()["code"] == 501


def test_get_metrics_reads_the_samples_of_the_sandbox_s_instance(tenant):
    box = Sandbox.create(timeout=120)
    first = box.get_metrics()  # a sample is taken when the sandbox is made
    assert first and first[0].cpu_count == 1 and first[0].mem_total == 512 << 20 and first[0].mem_used > 0
    assert first[0].disk_total > 0 and first[0].disk_used >= 0 and 0 <= first[0].cpu_used_pct <= 100
    # Up to the second of the create sample (the SDK sends whole seconds: the sandbox was made
    # within that second, after its start): that sample, not a 400.
    assert len(box.get_metrics(end=first[0].timestamp)) >= 1
    box.files.write("/home/user/blob", b"x" * 3_000_000)
    box.commands.run("timeout 1 sh -c 'while :; do :; done' || true", timeout=10)  # CPU for the next sample

    # The meter samples every instance on one clock: its next sample may come before the write,
    # so wait for one taken after the write and the CPU burn.
    def after_the_work():
        got = Sandbox.get_metrics(box.sandbox_id)
        done = len(got) >= 2 and max(m.disk_used for m in got) >= 3_000_000 and max(m.cpu_used_pct for m in got) > 0
        return done and got

    series = _wait_for(after_the_work, timeout=30)
    assert [m.timestamp for m in series] == sorted(m.timestamp for m in series)
    start = series[-1].timestamp
    assert len(box.get_metrics(start=start)) >= 1 and len(box.get_metrics(end=start)) >= 1

    newest = tenant.get("/sandboxes/metrics", params={"sandbox_ids": f"{box.sandbox_id},inosuch"}).json()
    assert list(newest["sandboxes"]) == [box.sandbox_id] and newest["sandboxes"][box.sandbox_id]["memTotal"] > 0
    assert (
        tenant.get("/sandboxes/metrics", params={"sandbox_ids": ",".join(f"i{n}" for n in range(101))}).status_code
        == 400
    )
    box.kill()
    assert len(Sandbox.get_metrics(box.sandbox_id)) >= len(series)  # kept after the end
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_metrics("inosuchsandbox")


def test_a_sandbox_s_logs_tell_its_life_in_e2b_s_shapes(tenant):
    box = Sandbox.create(timeout=120)
    box.set_timeout(300)
    box.kill()
    path = f"/v2/sandboxes/{box.sandbox_id}/logs"
    logs = _wait_for(lambda: (got := tenant.get(path).json()["logs"]) and len(got) == 3 and got)
    assert [e["message"] for e in logs] == ["created", "renewed", "ended: deleted (killed) by its owner"]
    assert {e["level"] for e in logs} == {"info"} and logs[1]["fields"]["ttlSeconds"] == 300
    assert logs[0]["fields"]["sessionId"] == box.sandbox_id and logs[0]["timestamp"].endswith("Z")

    newest = tenant.get(path, params={"direction": "backward", "limit": 1}).json()["logs"]
    assert [e["message"] for e in newest] == [logs[-1]["message"]]
    assert [e["message"] for e in tenant.get(path, params={"search": "RENEW"}).json()["logs"]] == ["renewed"]
    assert tenant.get(path, params={"level": "warn"}).json()["logs"] == []
    after = tenant.get(path, params={"cursor": 4102444800000}).json()["logs"]  # 2100-01-01
    assert after == []
    v1 = tenant.get(f"/sandboxes/{box.sandbox_id}/logs").json()
    assert [line["line"] for line in v1["logs"]] == [e["message"] for e in logs] and len(v1["logEntries"]) == 3
    assert tenant.get(path, params={"level": "loud"}).status_code == 400
    assert tenant.get("/v2/sandboxes/inosuchsandbox/logs").status_code == 404


def test_an_idempotency_key_makes_a_retried_create_return_the_same_sandbox(server, tenant, other_key):
    body = {"templateID": "base", "timeout": 60}
    first = tenant.post("/v2/sandboxes", json=body, headers={"Idempotency-Key": "retry-1"}).json()
    again = tenant.post("/sandboxes", json=body, headers={"Idempotency-Key": "retry-1"})
    other = tenant.post("/v2/sandboxes", json=body, headers={"Idempotency-Key": "retry-2"}).json()
    assert again.status_code == 201 and first["sandboxID"] == again.json()["sandboxID"] != other["sandboxID"]
    assert again.json()["envdAccessToken"] == first["envdAccessToken"]

    changed = tenant.post("/v2/sandboxes", json={**body, "timeout": 61}, headers={"Idempotency-Key": "retry-1"})
    assert changed.status_code == 409 and changed.json()["code"] == 409
    assert "different request" in changed.json()["message"]
    mallory = httpx.post(
        f"{server.url}/v2/sandboxes", json=body, headers={"X-API-Key": other_key, "Idempotency-Key": "retry-1"}
    )
    assert mallory.status_code == 201 and mallory.json()["sandboxID"] != first["sandboxID"]  # keys are per tenant
    httpx.delete(f"{server.url}/sandboxes/{mallory.json()['sandboxID']}", headers={"X-API-Key": other_key})


# -- data plane (through the gateway) ----------------------------------------------------------


def test_commands_and_files_reach_the_sandbox(tenant):
    box = Sandbox.create(envs={"GREETING": "hello"})
    result = box.commands.run("echo $GREETING from $(whoami) in $PWD")
    assert result.stdout == "hello from user in /home/user\n" and result.exit_code == 0
    box.files.write("/home/user/notes.txt", "kept")
    assert box.files.read("notes.txt") == "kept"
    assert Sandbox.connect(box.sandbox_id).commands.run("cat notes.txt").stdout == "kept"


def test_get_info_of_a_directory_reports_its_own_size_as_stat_does(tenant):
    box = Sandbox.create()
    box.files.make_dir("test_dir")
    info = box.files.get_info("test_dir")
    assert info.type == FileType.DIR and info.size > 0  # envd: Go's Lstat, as the SDK's own tests expect
    assert info.size == int(box.commands.run("stat -c %s test_dir").stdout)
    assert [e.size for e in box.files.list(".") if e.name == "test_dir"] == [info.size]


def test_a_command_whose_sandbox_is_killed_ends_in_e2b_s_sandbox_not_running_error(tenant):
    box = Sandbox.create()
    running = box.commands.run("sleep 60", background=True)
    Sandbox.kill(box.sandbox_id)
    with pytest.raises(SandboxNotRunningException) as caught:
        running.wait()
    assert str(caught.value) == (
        f"the connection to sandbox {box.sandbox_id} ended before the stream completed: "
        "The sandbox was killed or reached its end of life while the request was in flight."
    )


def test_is_running_tells_a_live_sandbox_from_a_killed_one(tenant):
    box = Sandbox.create()
    assert box.is_running() is True
    box.kill()
    assert box.is_running() is False


def test_run_code_keeps_state_across_calls(tenant):
    box = CodeSandbox.create(timeout=120)
    assert box.get_info().template_id == "code-interpreter-v1"
    box.run_code("x = 41")
    assert box.run_code("x + 1").text == "42"
    failure = box.run_code("undefined_name")
    assert failure.error is not None and failure.error.name == "NameError"
    box.kill()


def test_run_code_whose_sandbox_is_killed_ends_in_the_sdk_s_killed_sandbox_error(tenant):
    box = CodeSandbox.create(timeout=120)
    assert box.run_code("[1, 2].length + 1", language="js").text == "3"  # other languages, through the gateway
    box.run_code("import time")
    killer = threading.Timer(1.0, Sandbox.kill, (box.sandbox_id,))
    killer.start()
    try:
        with pytest.raises(TimeoutException) as caught:
            box.run_code("time.sleep(30)")
    finally:
        killer.join()
    assert str(caught.value).startswith("The sandbox was killed while the request was in progress.")


def test_another_tenant_cannot_reach_the_inside_of_a_sandbox(server, tenant, other_key):
    box = Sandbox.create()
    box.files.write("/home/user/secret.txt", "mine")
    stolen = httpx.get(
        f"{server.url}/files",
        params={"path": "/home/user/secret.txt"},
        headers={"E2b-Sandbox-Id": box.sandbox_id, "E2b-Sandbox-Port": "49983", "X-API-Key": other_key},
    )
    assert stolen.status_code in (401, 403, 404) and "mine" not in stolen.text


# -- the oldest supported SDK ------------------------------------------------------------------


@pytest.fixture(scope="module")
def oldest(server) -> dict:
    python = ensure_venv()
    alice, mallory = server.new_tenant("old-sdk"), server.new_tenant("old-sdk-other")
    tag = uuid.uuid4().hex
    record = run_scenario(python, server.url, alice.headers["X-API-Key"], mallory.headers["X-API-Key"], tag)
    record["_tenant"] = alice
    return record


def _value(record: dict, step: str):
    outcome = record[step]
    assert outcome["ok"], f"{step}: {outcome['error']}: {outcome['message']}\n{record['_stderr']}"
    return outcome["value"]


def test_the_oldest_sdk_drives_the_control_plane(oldest):
    assert _value(oldest, "versions") == ["2.31.0", "2.9.0"]
    template, state, metadata, seconds = _value(oldest, "info")
    assert (template, state) == ("base", "running") and set(metadata) == {"suite"}
    assert abs(seconds - 120) < 0.01
    assert len(_value(oldest, "list")) == 1
    assert _value(oldest, "set_timeout") < seconds  # 60 s from a later now: sooner than 120 s from the start
    assert _value(oldest, "connect")
    assert oldest["other_tenant_info"] == {
        "ok": False,
        "error": "SandboxNotFoundException",
        "message": oldest["other_tenant_info"]["message"],
    }
    assert _value(oldest, "other_tenant_kill") is False
    assert _value(oldest, "kill") is True and _value(oldest, "kill_again") is False
    assert oldest["info_after_kill"]["error"] == "SandboxNotFoundException"
    sessions = {s["functionName"]: s for s in oldest["_tenant"].get("/v1/sessions").json()["sessions"]}
    assert sessions["base"]["sessionAffinityType"] == "E2B" and sessions["base"]["endReason"] == "deleted"
    assert sessions["base"]["sessionTTLInSeconds"] == 300  # its connect() always asks for 300 s, which extends


def test_the_oldest_sdk_runs_commands_files_and_code(oldest):
    assert _value(oldest, "commands") == "hi from user\n"
    assert _value(oldest, "files") == "written"
    assert _value(oldest, "connected_sees_files") == "written"
    assert _value(oldest, "is_running") is True
    assert _value(oldest, "is_running_after_kill") is False
    assert _value(oldest, "run_code") == "42"
    assert _value(oldest, "code_kill") is True
