"""`hutch serve` with PostgreSQL as its MetaDB: the same product, the official e2b SDK included,
and a kill -9 of the server still loses nothing (the records live in PostgreSQL)."""

from __future__ import annotations

import asyncio
import signal

from e2b_code_interpreter import Sandbox as CodeSandbox

from tests.e2e.test_restart import _invoke
from tests.postgres import create_database


def test_serve_on_postgres_keeps_sessions_and_their_state_across_a_kill(fresh_server, postgres_server, monkeypatch):
    url = asyncio.run(create_database(postgres_server))
    server = fresh_server(
        f'metadb_url = "{url}"\nuid_base = 1700000000\n[warm_pools]\nbase = 1\n"code-interpreter-v1" = 0\n'
    )
    assert not (server.data_dir / "metadb.sqlite3").exists()  # nothing went to the embedded default
    client = server.new_tenant("pg")
    assert _invoke(client, "kept", "echo kept > mark; cat mark").strip() == "kept"

    monkeypatch.setenv("E2B_API_URL", server.url)
    monkeypatch.setenv("E2B_SANDBOX_URL", server.url)
    monkeypatch.setenv("E2B_API_KEY", client.headers["X-API-Key"])
    monkeypatch.delenv("E2B_DOMAIN", raising=False)
    sandbox = CodeSandbox.create()
    assert sandbox.run_code("x = 41").error is None

    server.restart(signal.SIGKILL)

    assert _invoke(client, "kept", "cat mark").strip() == "kept"
    again = CodeSandbox.connect(sandbox.sandbox_id)
    assert again.run_code("x + 1").text == "42"  # same instance: in-memory state kept
    sessions = client.get("/v1/sessions", params={"status": "Active"}).json()["sessions"]
    assert sorted(s["sessionId"] for s in sessions) == sorted(["kept", sandbox.sandbox_id])
    again.kill()
    assert client.delete("/v1/functions/base/sessions/kept").status_code == 204
