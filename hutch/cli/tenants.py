"""`hutch tenant create|list|update` and `hutch key create`: who may call (admin keys manage tenants)."""

from __future__ import annotations

import typer

from hutch.cli.remote import JSON_OPTION, connected, fail, fields, print_json, table, when

app = typer.Typer(no_args_is_help=True, help="Tenants (an admin key manages them).")
keys = typer.Typer(no_args_is_help=True, help="API keys.")


@app.command()
def create(
    name: str = typer.Argument(..., help="A name for people."),
    max_sessions: int = typer.Option(None, "--max-sessions", help="Live sessions at once [default: 50]."),
    max_vcpu: float = typer.Option(None, "--max-vcpu", help="vCPUs of all live sessions [default: no limit]."),
    max_memory_mb: int = typer.Option(None, "--max-memory-mb", help="Their memory [default: no limit]."),
    max_image_disk_mb: int = typer.Option(
        None, "--max-image-disk-mb", help="Disk of hibernated sessions and memory snapshots [default: 20480]."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Create a tenant; prints its first API key (shown once)."""
    with connected() as client:
        tenant = client.create_tenant(name, max_sessions, max_vcpu, max_memory_mb, max_image_disk_mb)
    if as_json:
        print_json(tenant)
        return
    fields(
        [
            ("tenant id", tenant["tenantId"]),
            ("name", tenant["name"]),
            ("max sessions", tenant["maxSessions"]),
            ("max vCPU", tenant.get("maxVcpu")),
            ("max memory MB", tenant.get("maxMemoryMB")),
            ("max image disk MB", tenant.get("maxImageDiskMB")),
            ("api key", tenant["apiKey"]),
        ]
    )


@app.command()
def update(
    tenant_id: str = typer.Argument(..., help="The tenant's id."),
    max_sessions: int = typer.Option(None, "--max-sessions", help="Live sessions at once."),
    max_vcpu: float = typer.Option(None, "--max-vcpu", help="vCPUs of all live sessions (0 or more)."),
    max_memory_mb: int = typer.Option(None, "--max-memory-mb", help="Memory of all live sessions, MB."),
    max_image_disk_mb: int = typer.Option(
        None, "--max-image-disk-mb", help="Disk of hibernated sessions and memory snapshots, MB."
    ),
    no_vcpu_limit: bool = typer.Option(False, "--no-vcpu-limit", help="Lift the vCPU quota."),
    no_memory_limit: bool = typer.Option(False, "--no-memory-limit", help="Lift the memory quota."),
    no_image_disk_limit: bool = typer.Option(False, "--no-image-disk-limit", help="Lift the image disk quota."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Change a tenant's quotas (admin key); live sessions stay, new ones are checked."""
    quotas: dict = {}
    if max_sessions is not None:
        quotas["maxSessions"] = max_sessions
    if max_vcpu is not None or no_vcpu_limit:
        quotas["maxVcpu"] = None if no_vcpu_limit else max_vcpu
    if max_memory_mb is not None or no_memory_limit:
        quotas["maxMemoryMB"] = None if no_memory_limit else max_memory_mb
    if max_image_disk_mb is not None or no_image_disk_limit:
        quotas["maxImageDiskMB"] = None if no_image_disk_limit else max_image_disk_mb
    if not quotas:
        fail("give at least one quota to change")
    with connected() as client:
        tenant = client.update_tenant(tenant_id, quotas)
    if as_json:
        print_json(tenant)
        return
    fields(
        [
            ("tenant id", tenant["tenantId"]),
            ("max sessions", tenant["maxSessions"]),
            ("max vCPU", _or_no_limit(tenant.get("maxVcpu"))),
            ("max memory MB", _or_no_limit(tenant.get("maxMemoryMB"))),
            ("max image disk MB", _or_no_limit(tenant.get("maxImageDiskMB"))),
        ]
    )


def _or_no_limit(quota: object) -> object:
    return quota if quota is not None else "no limit"


@app.command("list")
def list_(as_json: bool = JSON_OPTION) -> None:
    """Every tenant."""
    with connected() as client:
        tenants = client.list_tenants()
    if as_json:
        print_json(tenants)
        return
    table(
        ["TENANT ID", "NAME", "ADMIN", "MAX SESSIONS", "MAX VCPU", "MAX MEMORY MB", "MAX IMAGE DISK MB", "CREATED"],
        [
            (
                t["tenantId"],
                t["name"],
                "yes" if t["admin"] else "no",
                t["maxSessions"],
                t.get("maxVcpu"),
                t.get("maxMemoryMB"),
                t.get("maxImageDiskMB"),
                when(t["createdTime"]),
            )
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
