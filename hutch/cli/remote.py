"""What the client commands share: the connection to a hutch server, errors, and output.

The server is `HUTCH_URL` (default http://127.0.0.1:3000), the key `HUTCH_API_KEY`. Every
command prints a rich table (or a key/value view) for people, or the server's JSON with
`--json`; an error is one line on stderr (`error: ...`) and exit status 1.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.table import Table

from hutch.client import HutchClient
from hutch.errors import HutchError, InvalidArgument

JSON_OPTION = typer.Option(False, "--json", help="Print the server's JSON answer.")


@contextmanager
def connected() -> Iterator[HutchClient]:
    """A client of the configured server; a `HutchError` inside becomes `error: ...` and exit 1."""
    client = HutchClient()
    try:
        yield client
    except HutchError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from None
    finally:
        client.close()


def fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def print_json(value) -> None:
    typer.echo(json.dumps(value, indent=2))


def when(value: str | None) -> str:
    """An RFC 3339 time as `YYYY-MM-DD HH:MM:SS` (UTC), for tables."""
    return value.replace("T", " ")[:19] if value else "-"


def console() -> Console:
    """Rich's console; piped output is 200 columns wide (not 80) unless COLUMNS says otherwise."""
    out = Console()
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out.width = 200
    return out


def table(columns: list[str], rows: Iterable[Iterable[object]], wrap: tuple[str, ...] = ("DESCRIPTION",)) -> None:
    """Ids, names and times are never cut; only the `wrap` columns wrap when space runs out."""
    view = Table(show_lines=False, header_style="bold")
    for column in columns:
        view.add_column(column, no_wrap=column not in wrap, overflow="fold" if column not in wrap else "ellipsis")
    for row in rows:
        view.add_row(*("-" if cell is None else str(cell) for cell in row))
    console().print(view)


def fields(pairs: Iterable[tuple[str, object]]) -> None:
    view = Table.grid(padding=(0, 2))
    view.add_column(style="bold")
    view.add_column()
    for key, value in pairs:
        if isinstance(value, dict | list):
            value = json.dumps(value) if value else "-"
        view.add_row(key, "-" if value is None or value == "" else str(value))
    console().print(view)


def pairs(values: list[str] | None, what: str) -> dict[str, str]:
    """`KEY=VALUE` options as a dict."""
    out: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"{what} must be KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def read_json_file(path: Path) -> dict:
    """A JSON object from a file (`-`: stdin)."""
    try:
        text = typer.get_text_stream("stdin").read() if str(path) == "-" else path.read_text()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path}: {exc.strerror}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{path} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{path} must hold a JSON object")
    return value


def split_command(command: str | None) -> list[str] | None:
    return shlex.split(command) if command is not None else None
