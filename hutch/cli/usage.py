"""`hutch usage [sessions|session|tenants|export]`: what sessions used and what it costs.

`hutch usage` alone prints the caller's totals per function over a range (all time unless
`--since`/`--from`/`--to`). Times are given as `--since 90m` (s, m, h, d), or as unix seconds or
ISO 8601 with `--from`/`--to`. The cost formula is `hutch/pricing.py`'s.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import typer

from hutch.cli.remote import JSON_OPTION, connected, fields, print_json, table, when
from hutch.errors import InvalidArgument

app = typer.Typer(
    help="Usage and cost: per function (default), per session, per tenant (admin); CSV export.",
    invoke_without_command=True,
)

SINCE = typer.Option(None, "--since", help="How far back, e.g. 90m, 24h, 7d [default: all time].")
FROM = typer.Option(None, "--from", help="Start: unix seconds or ISO 8601 (UTC unless a zone is given).")
TO = typer.Option(None, "--to", help="End [default: now].")
FUNCTION = typer.Option(None, "--function", "-f", help="Only this function.")
STATUS = typer.Option(None, "--status", help="Active or Expired.")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _start(since: str | None, start: str | None) -> str | float | None:
    if since is None:
        return start
    if start is not None:
        raise InvalidArgument("give --since or --from, not both")
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", since.strip())
    if match is None:
        raise InvalidArgument(f"--since {since!r}: a number and s, m, h or d (e.g. 24h)")
    return time.time() - float(match[1]) * UNITS[match[2]]


def duration(seconds: float) -> str:
    """`12.3s`, `4m05s`, `2h03m`: for tables."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def size(value: int) -> str:
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024 or unit == "GiB":
            return f"{amount:.0f}{unit}" if unit == "B" else f"{amount:.1f}{unit}"
        amount /= 1024
    return f"{amount:.1f}GiB"


def money(cost: dict) -> str:
    return f"{cost['total']:.6f}"


def _amount_cells(row: dict) -> list[str]:
    return [
        duration(row["activeSeconds"]),
        duration(row["idleSeconds"]),
        f"{row['cpuSeconds']:.2f}",
        f"{row['memoryGiBSeconds']:.3f}",
        money(row["cost"]),
    ]


@app.callback()
def summary(
    ctx: typer.Context,
    since: str = SINCE,
    start: str = FROM,
    end: str = TO,
    function: str = FUNCTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """The caller's usage and cost per function (and in total) over a time range."""
    if ctx.invoked_subcommand is not None:
        return
    with connected() as client:
        report = client.usage(_start(since, start), end, function)
    if as_json:
        print_json(report)
        return
    currency = report["pricing"]["currency"]
    rows = [[f["functionName"], *_amount_cells(f)] for f in report["functions"]]
    rows.append(["TOTAL", *_amount_cells(report["totals"])])
    since = "all time" if report["from"].startswith("1970-01-01T00:00:00") else f"from {when(report['from'])}"
    live = report["liveSessions"]
    typer.echo(f"tenant {report['tenantId']}: {since} to {when(report['to'])} UTC; live sessions: {live}")
    table(["FUNCTION", "ACTIVE", "IDLE", "CPU s", "MEMORY GiB·s", f"COST {currency}"], rows)


@app.command()
def sessions(
    since: str = SINCE,
    start: str = FROM,
    end: str = TO,
    function: str = FUNCTION,
    status: str = STATUS,
    limit: int = typer.Option(100, "--limit", help="At most this many (newest first)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Session records (live ones as of now) whose life overlaps the range."""
    with connected() as client:
        records, _ = client.usage_sessions(_start(since, start), end, function, status, limit=limit)
    if as_json:
        print_json(records)
        return
    table(
        ["SESSION", "FUNCTION", "STATE", "STARTED", "ENDED", "ACTIVE", "IDLE", "CPU s", "MEM AVG", "MEM PEAK", "COST"],
        [
            (
                r["sessionId"],
                r["functionName"],
                r["state"],
                when(r["startTime"]),
                when(r["endTime"]),
                duration(r["activeSeconds"]),
                duration(r["idleSeconds"]),
                f"{r['cpuSeconds']:.2f}",
                size(r["memoryAverageBytes"]),
                size(r["memoryPeakBytes"]),
                money(r["cost"]),
            )
            for r in records
        ],
    )


@app.command()
def session(
    session_id: str = typer.Argument(..., help="The session id (an E2B sandbox id too)."),
    function: str = typer.Option(None, "--function", "-f", help="The session's function [default: found by id]."),
    as_json: bool = JSON_OPTION,
) -> None:
    """One session's record (the live one, or the newest that ended)."""
    with connected() as client:
        record = client.session_usage(function or client.find_function_of(session_id), session_id)
    if as_json:
        print_json(record)
        return
    cost = record["cost"]
    fields(
        [
            ("session id", record["sessionId"]),
            ("function", record["functionName"]),
            ("state", record["state"]),
            ("started", record["startTime"]),
            ("ended", record["endTime"]),
            ("end reason", record["endReason"]),
            ("allocation", f"{record['vcpu']:g} vCPU, {record['memoryMB']} MB"),
            ("active", duration(record["activeSeconds"])),
            ("idle", duration(record["idleSeconds"])),
            ("down", duration(record["downSeconds"])),
            ("CPU seconds", f"{record['cpuSeconds']:.3f}"),
            ("memory avg / peak", f"{size(record['memoryAverageBytes'])} / {size(record['memoryPeakBytes'])}"),
            ("disk now / peak", f"{size(record['diskBytes'])} / {size(record['diskPeakBytes'])}"),
            (
                "cost",
                f"{cost['total']:.6f} {cost['currency']} (CPU {cost['cpu']:.6f}, memory {cost['memory']:.6f}, "
                f"disk {cost['disk']:.6f})",
            ),
        ]
    )


@app.command()
def tenants(since: str = SINCE, start: str = FROM, end: str = TO, as_json: bool = JSON_OPTION) -> None:
    """Every tenant's usage and cost (admin key)."""
    with connected() as client:
        rows = client.usage_tenants(_start(since, start), end)
    if as_json:
        print_json(rows)
        return
    table(
        ["TENANT ID", "NAME", "LIVE", "ACTIVE", "IDLE", "CPU s", "MEMORY GiB·s", "COST"],
        [(t["tenantId"], t["name"], t["liveSessions"], *_amount_cells(t)) for t in rows],
    )


@app.command()
def export(
    output: Path = typer.Option(None, "--output", "-o", help="Write the CSV here [default: standard output]."),
    since: str = SINCE,
    start: str = FROM,
    end: str = TO,
    function: str = FUNCTION,
    status: str = STATUS,
) -> None:
    """Every session record in the range as CSV (one line per session, costs included)."""
    with connected() as client:
        text = client.usage_csv(_start(since, start), end, function, status)
    if output is None:
        sys.stdout.write(text)
        return
    try:
        output.write_text(text)
    except OSError as exc:
        typer.echo(f"error: cannot write {output}: {exc.strerror}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{text.count(chr(10)) - 1} sessions written to {output}")
