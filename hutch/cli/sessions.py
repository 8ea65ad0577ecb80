"""`hutch session create|list|get|renew|pause|resume|logs|delete`: the caller's sessions (E2B sandboxes included)."""

from __future__ import annotations

import json
import time
from datetime import datetime

import typer

from hutch.cli.remote import JSON_OPTION, connected, fields, pairs, print_json, table, when
from hutch.client import HutchClient
from hutch.errors import InvalidArgument

app = typer.Typer(no_args_is_help=True, help="Sessions: one isolated instance each, reclaimed at TTL or idle.")

SESSION_ID = typer.Argument(..., help="The session id (an E2B sandbox id too).")
FUNCTION = typer.Option(None, "--function", "-f", help="The session's function [default: found by id].")
TTL = typer.Option(None, "--ttl", help="Session TTL in seconds, counted from now (1-21600).")
IDLE = typer.Option(None, "--idle-timeout", help="Idle timeout in seconds (0: never).")


def _show(session: dict, as_json: bool) -> None:
    if as_json:
        print_json(session)
        return
    fields(
        [
            ("session id", session["sessionId"]),
            ("function", session["functionName"]),
            ("status", session["sessionStatus"]),
            ("affinity", session["sessionAffinityType"]),
            ("container", session.get("containerId")),
            ("TTL s", session["sessionTTLInSeconds"]),
            ("idle timeout s", session["sessionIdleTimeoutInSeconds"]),
            ("created", session["createdTime"]),
            ("expires", session["expireTime"]),
            ("last activity", session.get("lastActivityTime")),
            ("epoch", session.get("epoch")),
            ("state", session.get("state", "running") + (" (paused)" if session.get("paused") else "")),
            ("metadata", session.get("metadata")),
            ("ended", session.get("endTime")),
            ("end reason", session.get("endReason")),
        ]
    )


def _function(client: HutchClient, function: str | None, session_id: str) -> str:
    return function or client.find_function_of(session_id)


@app.command()
def create(
    function: str = typer.Option("base", "--function", "-f", help="The function to run."),
    session_id: str = typer.Option(None, "--session-id", help="Your own id (HEADER_FIELD functions)."),
    ttl: int = TTL,
    idle_timeout: int = IDLE,
    env: list[str] = typer.Option(None, "--env", "-e", help="KEY=VALUE for the instance (repeatable)."),
    metadata: list[str] = typer.Option(None, "--metadata", "-m", help="KEY=VALUE kept with the session."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Create a session now (its instance is started before the first request)."""
    with connected() as client:
        session = client.create_session(
            function,
            session_id=session_id,
            ttl_s=ttl,
            idle_timeout_s=idle_timeout,
            env=pairs(env, "--env"),
            metadata=pairs(metadata, "--metadata"),
        )
    _show(session, as_json)


@app.command("list")
def list_(
    function: str = typer.Option(None, "--function", "-f", help="Only this function's sessions."),
    status: str = typer.Option(None, "--status", "-s", help="Active or Expired."),
    limit: int = typer.Option(100, "--limit", help="At most this many (1-1000)."),
    next_token: str = typer.Option(None, "--next-token", help="Continue a listing."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Sessions, newest first."""
    with connected() as client:
        if status is not None and status.capitalize() not in ("Active", "Expired"):
            raise InvalidArgument(f"--status must be Active or Expired, got {status!r}")
        sessions, token = client.list_sessions(
            function, status.capitalize() if status else None, limit=limit, next_token=next_token
        )
    if as_json:
        print_json({"sessions": sessions, "nextToken": token})
        return
    table(
        ["SESSION ID", "FUNCTION", "STATUS", "AFFINITY", "CONTAINER", "CREATED", "EXPIRES"],
        [
            (
                s["sessionId"],
                s["functionName"],
                s["sessionStatus"],
                s["sessionAffinityType"],
                s.get("containerId"),
                when(s["createdTime"]),
                when(s.get("endTime") or s["expireTime"]),
            )
            for s in sessions
        ],
    )
    if token:
        typer.echo(f"more: hutch session list --next-token {token}", err=True)


@app.command()
def get(session_id: str = SESSION_ID, function: str = FUNCTION, as_json: bool = JSON_OPTION) -> None:
    """One session."""
    with connected() as client:
        session = client.get_session(_function(client, function, session_id), session_id)
    _show(session, as_json)


@app.command()
def renew(
    session_id: str = SESSION_ID,
    function: str = FUNCTION,
    ttl: int = TTL,
    idle_timeout: int = IDLE,
    as_json: bool = JSON_OPTION,
) -> None:
    """Extend an Active session: a new TTL from now and/or a new idle timeout."""
    with connected() as client:
        if ttl is None and idle_timeout is None:
            raise InvalidArgument("give --ttl and/or --idle-timeout")
        session = client.renew_session(_function(client, function, session_id), session_id, ttl, idle_timeout)
    _show(session, as_json)


@app.command()
def logs(
    session_id: str = SESSION_ID,
    function: str = FUNCTION,
    follow: bool = typer.Option(False, "--follow", help="Keep printing new entries until Ctrl-C."),
    level: str = typer.Option(None, help="The lowest level shown: debug, info, warn or error."),
    as_json: bool = JSON_OPTION,
) -> None:
    """What happened to a session: created, renewed, crashed and replaced, ended and why."""
    with connected() as client:
        name = _function(client, function, session_id)
        last_ms: int | None = None
        at_last: set[str] = set()  # entries of the last millisecond printed (the next page starts there)
        while True:
            for entry in client.session_logs(name, session_id, last_ms, level=level):
                key = json.dumps(entry, sort_keys=True)
                ms = _millis(entry["timestamp"])
                if ms == last_ms and key in at_last:
                    continue
                if ms != last_ms:
                    last_ms, at_last = ms, set()
                at_last.add(key)
                typer.echo(key if as_json else f"{entry['timestamp']} {entry['level']:5} {entry['message']}")
            if not follow:
                return
            time.sleep(1.0)


def _millis(timestamp: str) -> int:
    return int(datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp() * 1000)


@app.command()
def pause(
    session_id: str = SESSION_ID,
    function: str = FUNCTION,
    files_only: bool = typer.Option(False, "--files-only", help="Stop it and keep only its files (no RAM held)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Pause a session with its memory (hibernated to disk where the host can, else frozen; or
    only its files kept) until `resume`."""
    with connected() as client:
        session = client.pause_session(_function(client, function, session_id), session_id, not files_only)
    _show(session, as_json)


@app.command()
def fork(
    session_id: str = SESSION_ID,
    function: str = FUNCTION,
    count: int = typer.Option(1, "--count", min=1, max=20, help="How many copies."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Copy a running session, memory and processes included, into new sessions (it runs on)."""
    with connected() as client:
        forks = client.fork_session(_function(client, function, session_id), session_id, count)
    if as_json:
        print_json(forks)
        return
    table(
        ["SESSION ID", "RESULT"],
        [
            (fork["sessionId"], "started") if "sessionId" in fork else ("-", f"failed: {fork['error']['message']}")
            for fork in forks
        ],
    )


@app.command()
def resume(session_id: str = SESSION_ID, function: str = FUNCTION, as_json: bool = JSON_OPTION) -> None:
    """Resume a paused session (its TTL starts again from now)."""
    with connected() as client:
        session = client.resume_session(_function(client, function, session_id), session_id)
    _show(session, as_json)


@app.command()
def delete(session_id: str = SESSION_ID, function: str = FUNCTION) -> None:
    """End a session now: its instance is stopped and its data wiped."""
    with connected() as client:
        client.delete_session(_function(client, function, session_id), session_id)
    typer.echo(f"deleted session {session_id}")
