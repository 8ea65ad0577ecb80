"""`hutch function|session|tenant|key ...` as a user runs them: a subprocess against `hutch serve`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from tests.e2e.conftest import ADMIN_KEY, free_port


def hutch(url: str, key: str | None, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUTCH_")}
    env.update(HUTCH_URL=url, COLUMNS="250", NO_COLOR="1")
    if key is not None:
        env["HUTCH_API_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "hutch", *args], env=env, input=stdin, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def cli(server):
    """`cli(*args)` runs hutch as a fresh tenant; `cli.admin(*args)` with the admin key."""
    key = server.new_tenant("cli").headers["X-API-Key"]

    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return hutch(server.url, key, *args, stdin=stdin)

    run.key = key
    run.admin = lambda *args: hutch(server.url, ADMIN_KEY, *args)
    return run


def ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr}"
    return done.stdout


def as_json(done: subprocess.CompletedProcess):
    return json.loads(ok(done))


def test_functions_are_created_shown_updated_and_deleted(cli, tmp_path):
    name = f"fn-{uuid.uuid4().hex[:8]}"
    made = as_json(cli("function", "create", name, "--memory-mb", "256", "--disk-mb", "64", "-e", "A=1", "--json"))
    assert made["name"] == name and made["resources"]["memoryMB"] == 256 and made["environmentVariables"] == {"A": "1"}

    shown = ok(cli("function", "get", name))
    assert name in shown and "256" in shown and "HEADER_FIELD" in shown
    listed = ok(cli("function", "list"))
    assert "NAME" in listed and name in listed and "code-interpreter-v1" in listed

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"description": "from a file", "sessionAffinityConfig": {"sessionTTLInSeconds": 600}}))
    updated = as_json(cli("function", "update", name, "--file", str(spec), "--warm-pool", "0", "-e", "B=2", "--json"))
    assert updated["description"] == "from a file" and updated["sessionAffinityConfig"]["sessionTTLInSeconds"] == 600
    assert updated["resources"]["memoryMB"] == 256 and updated["environmentVariables"] == {"A": "1", "B": "2"}

    assert "deleted function" in ok(cli("function", "delete", name))
    gone = cli("function", "get", name)
    assert gone.returncode == 1 and gone.stderr.startswith("error: ") and "not found" in gone.stderr


def test_a_function_can_come_from_a_json_file_on_stdin(cli):
    name = f"fn-{uuid.uuid4().hex[:8]}"
    spec = {"name": name, "resources": {"memoryMB": 128, "diskMB": 32}, "sessionAffinity": "GENERATED_COOKIE"}
    made = as_json(cli("function", "create", "--file", "-", "--json", stdin=json.dumps(spec)))
    assert made["sessionAffinity"] == "GENERATED_COOKIE" and made["resources"]["memoryMB"] == 128
    clash = cli("function", "create", "other-name", "--file", "-", stdin=json.dumps(spec))
    assert clash.returncode == 1 and "names function" in clash.stderr


def test_sessions_are_created_listed_renewed_and_deleted(cli):
    name = f"fn-{uuid.uuid4().hex[:8]}"
    ok(cli("function", "create", name, "--memory-mb", "256", "--disk-mb", "64"))
    made = as_json(
        cli("session", "create", "--function", name, "--session-id", "cli-1", "--ttl", "600", "--idle-timeout", "60",
            "-m", "who=cli", "--json")
    )  # fmt: skip
    assert made["sessionId"] == "cli-1" and made["sessionStatus"] == "Active" and made["metadata"] == {"who": "cli"}
    assert made["sessionTTLInSeconds"] == 600 and made["sessionIdleTimeoutInSeconds"] == 60

    table = ok(cli("session", "list"))
    assert "SESSION ID" in table and "cli-1" in table and name in table and "Active" in table
    page = as_json(cli("session", "list", "--status", "active", "--function", name, "--json"))
    assert [s["sessionId"] for s in page["sessions"]] == ["cli-1"] and page["nextToken"] is None

    shown = ok(cli("session", "get", "cli-1"))  # the function is found by the id
    assert "cli-1" in shown and name in shown and "Active" in shown
    renewed = as_json(cli("session", "renew", "cli-1", "--function", name, "--ttl", "1200", "--json"))
    assert renewed["sessionTTLInSeconds"] == 1200 and renewed["sessionIdleTimeoutInSeconds"] == 60
    assert "frozen (paused)" in ok(cli("session", "pause", "cli-1"))
    resumed = as_json(cli("session", "resume", "cli-1", "--json"))
    assert resumed["state"] == "running" and resumed["paused"] is False and resumed["epoch"] == 0

    assert "deleted session cli-1" in ok(cli("session", "delete", "cli-1"))
    ended = as_json(cli("session", "get", "cli-1", "--json"))
    assert ended["sessionStatus"] == "Expired" and ended["endReason"] == "deleted"
    again = cli("session", "delete", "cli-1", "--function", name)
    assert again.returncode == 1 and "already ended" in again.stderr


def test_session_logs_tell_what_happened_and_follow_new_entries(server, cli):
    import time

    ok(cli("session", "create", "--session-id", "logged", "--ttl", "600"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUTCH_")}
    env.update(HUTCH_URL=server.url, HUTCH_API_KEY=cli.key)
    follower = subprocess.Popen(
        [sys.executable, "-m", "hutch", "session", "logs", "logged", "--follow"],
        env=env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert "info  created" in follower.stdout.readline()  # flushed within a second of the create
        ok(cli("session", "renew", "logged", "--ttl", "1200"))
        assert "info  renewed" in follower.stdout.readline()  # printed as it comes
    finally:
        follower.terminate()
        follower.wait(10)
    ok(cli("session", "delete", "logged"))
    deadline = time.monotonic() + 10
    while "ended: deleted" not in (done := ok(cli("session", "logs", "logged"))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [line.split(" ", 1)[1].split()[1] for line in done.splitlines()] == ["created", "renewed", "ended:"]
    entries = [json.loads(line) for line in ok(cli("session", "logs", "logged", "--json")).splitlines()]
    assert entries[-1]["fields"]["reason"] == "deleted" and entries[0]["fields"]["sessionId"] == "logged"


def test_an_e2b_sandbox_is_listed_like_any_session(server, cli):
    import httpx

    made = httpx.post(f"{server.url}/v2/sandboxes", json={"templateID": "base"}, headers={"X-API-Key": cli.key})
    sandbox_id = made.json()["sandboxID"]
    listed = as_json(cli("session", "list", "--json"))["sessions"]
    assert [(s["sessionId"], s["sessionAffinityType"]) for s in listed] == [(sandbox_id, "E2B")]
    ok(cli("session", "delete", sandbox_id))
    assert httpx.get(f"{server.url}/sandboxes/{sandbox_id}", headers={"X-API-Key": cli.key}).status_code == 404


def test_listing_pages_point_to_the_next_page(cli):
    for _ in range(3):
        ok(cli("session", "create"))
    first = cli("session", "list", "--limit", "2")
    assert first.returncode == 0 and "more: hutch session list --next-token" in first.stderr
    token = first.stderr.split("--next-token ")[1].strip()
    rest = as_json(cli("session", "list", "--limit", "2", "--next-token", token, "--json"))
    assert len(rest["sessions"]) == 1 and rest["nextToken"] is None


def test_tenants_and_keys_are_managed_with_an_admin_key(server, cli):
    made = as_json(cli.admin("tenant", "create", "team-x", "--max-sessions", "3", "--json"))
    assert made["name"] == "team-x" and made["maxSessions"] == 3 and made["apiKey"].startswith("e2b_")
    assert made["tenantId"] in ok(cli.admin("tenant", "list"))
    new_key = as_json(hutch(server.url, made["apiKey"], "key", "create", "--label", "ci", "--json"))["apiKey"]
    assert as_json(hutch(server.url, new_key, "session", "list", "--json"))["sessions"] == []

    refused = cli("tenant", "create", "not-allowed")
    assert refused.returncode == 1 and refused.stderr == "error: only an admin tenant may do this\n"


def test_errors_are_one_line_and_exit_non_zero(server, cli):
    no_key = hutch(server.url, None, "function", "list")
    assert no_key.returncode == 1 and no_key.stderr.startswith("error: an API key is required")
    wrong = hutch(server.url, "hk_wrong", "session", "list")
    assert wrong.returncode == 1 and wrong.stderr == "error: invalid API key\n"
    nowhere = hutch(f"http://127.0.0.1:{free_port()}", "hk_x", "session", "list")
    assert nowhere.returncode == 1 and nowhere.stderr.startswith("error: cannot reach hutch at http://127.0.0.1:")
    assert len(nowhere.stderr.strip().splitlines()) == 1
    bad_env = cli("session", "create", "--env", "NOEQUALS")
    assert bad_env.returncode == 1 and "--env must be KEY=VALUE" in bad_env.stderr
    missing = cli("session", "get", "no-such-session")
    assert missing.returncode == 1 and missing.stderr == "error: session no-such-session not found\n"
    bad_ttl = cli("session", "create", "--ttl", "0")
    assert bad_ttl.returncode == 1 and "sessionTTLInSeconds" in bad_ttl.stderr
