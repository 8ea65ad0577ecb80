"""`hutch tenant create|list` and `hutch key create`: who may call (admin keys manage tenants)."""

from __future__ import annotations

import typer

from hutch.cli.remote import JSON_OPTION, connected, fields, print_json, table, when

app = typer.Typer(no_args_is_help=True, help="Tenants (an admin key manages them).")
keys = typer.Typer(no_args_is_help=True, help="API keys.")


@app.command()
def create(
    name: str = typer.Argument(..., help="A name for people."),
    max_sessions: int = typer.Option(None, "--max-sessions", help="Live sessions at once [default: 50]."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Create a tenant; prints its first API key (shown once)."""
    with connected() as client:
        tenant = client.create_tenant(name, max_sessions)
    if as_json:
        print_json(tenant)
        return
    fields(
        [
            ("tenant id", tenant["tenantId"]),
            ("name", tenant["name"]),
            ("max sessions", tenant["maxSessions"]),
            ("api key", tenant["apiKey"]),
        ]
    )


@app.command("list")
def list_(as_json: bool = JSON_OPTION) -> None:
    """Every tenant."""
    with connected() as client:
        tenants = client.list_tenants()
    if as_json:
        print_json(tenants)
        return
    table(
        ["TENANT ID", "NAME", "ADMIN", "MAX SESSIONS", "CREATED"],
        [
            (t["tenantId"], t["name"], "yes" if t["admin"] else "no", t["maxSessions"], when(t["createdTime"]))
            for t in tenants
        ],
    )


@keys.command("create")
def create_key(
    tenant: str = typer.Option(None, "--tenant", help="Tenant id [default: this key's]."),
    label: str = typer.Option(None, "--label", help="What the key is for."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Issue another API key (shown once)."""
    with connected() as client:
        made = client.create_key(tenant, label)
    if as_json:
        print_json(made)
        return
    fields([("tenant id", made["tenantId"]), ("api key", made["apiKey"])])
