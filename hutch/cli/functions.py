"""`hutch function list|get|create|update|delete`: a tenant's functions (and the built-ins)."""

from __future__ import annotations

from pathlib import Path

import typer

from hutch.cli.remote import JSON_OPTION, connected, fields, pairs, print_json, read_json_file, split_command, table
from hutch.errors import InvalidArgument
from hutch.functions import AffinityType

app = typer.Typer(no_args_is_help=True, help="Functions: what a session's instance runs, with what limits.")

READ_ONLY = ("builtin", "createdTime", "lastModifiedTime")

FILE_OPTION = typer.Option(None, "--file", "-f", help="A function spec as JSON (wire names; '-' for stdin).")
DESCRIPTION = typer.Option(None, "--description", help="What the function is for.")
CPU = typer.Option(None, "--cpu", help="vCPUs per instance.")
MEMORY = typer.Option(None, "--memory-mb", help="Memory per instance, MiB.")
DISK = typer.Option(None, "--disk-mb", help="Workspace size, MiB.")
ENV = typer.Option(None, "--env", "-e", help="KEY=VALUE for every instance (repeatable).")
START = typer.Option(None, "--start-command", help="A user HTTP server started in every instance (shell words).")
PORT = typer.Option(None, "--port", help="The port that server listens on.")
AFFINITY = typer.Option(None, "--affinity", help="How requests find their session.")
HEADER = typer.Option(None, "--header-name", help="HEADER_FIELD: the session header.")
COOKIE = typer.Option(None, "--cookie-name", help="GENERATED_COOKIE: the cookie.")
TTL = typer.Option(None, "--ttl", help="Default session TTL, seconds (1-21600).")
IDLE = typer.Option(None, "--idle-timeout", help="Default idle timeout, seconds (0: never).")
REUSE = typer.Option(None, "--disable-reuse/--allow-reuse", help="Whether an ended session id may start again.")
POOL = typer.Option(None, "--warm-pool", help="Instances kept started ahead.")
PERSIST = typer.Option(None, "--persist-workspace/--no-persist-workspace", help="Keep workspaces after sessions.")
KERNEL = typer.Option(None, "--prestart-kernel/--no-prestart-kernel", help="Start a Jupyter kernel at boot.")


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _flags(**values) -> dict:
    """The spec fragment the flags give (wire names; unset flags left out)."""
    resources = {"cpu": values["cpu"], "memoryMB": values["memory_mb"], "diskMB": values["disk_mb"]}
    affinity_config = {
        "headerName": values["header_name"],
        "cookieName": values["cookie_name"],
        "sessionTTLInSeconds": values["ttl"],
        "sessionIdleTimeoutInSeconds": values["idle_timeout"],
        "disableSessionIdReuse": values["disable_reuse"],
    }
    spec = {
        "description": values["description"],
        "resources": {k: v for k, v in resources.items() if v is not None},
        "environmentVariables": pairs(values["env"], "--env") if values["env"] else None,
        "startCommand": split_command(values["start_command"]),
        "port": values["port"],
        "sessionAffinity": values["affinity"].value if values["affinity"] else None,
        "sessionAffinityConfig": {k: v for k, v in affinity_config.items() if v is not None},
        "warmPoolSize": values["warm_pool"],
        "persistWorkspace": values["persist_workspace"],
        "prestartKernel": values["prestart_kernel"],
    }
    return {k: v for k, v in spec.items() if v is not None and v != {}}


def _show(function: dict, as_json: bool) -> None:
    if as_json:
        print_json(function)
        return
    resources = function.get("resources", {})
    config = function.get("sessionAffinityConfig", {})
    fields(
        [
            ("name", function["name"]),
            ("description", function.get("description")),
            ("builtin", function.get("builtin")),
            ("affinity", function.get("sessionAffinity")),
            ("cpu", resources.get("cpu")),
            ("memory MB", resources.get("memoryMB")),
            ("disk MB", resources.get("diskMB")),
            ("session TTL s", config.get("sessionTTLInSeconds")),
            ("idle timeout s", config.get("sessionIdleTimeoutInSeconds")),
            ("warm pool", function.get("warmPoolSize")),
            ("start command", " ".join(function.get("startCommand") or []) or None),
            ("port", function.get("port")),
            ("environment", function.get("environmentVariables")),
            ("created", function.get("createdTime")),
            ("modified", function.get("lastModifiedTime")),
        ]
    )


@app.command("list")
def list_(as_json: bool = JSON_OPTION) -> None:
    """The functions this key's tenant can use, built-ins included."""
    with connected() as client:
        functions = client.list_functions()
    if as_json:
        print_json(functions)
        return
    table(
        ["NAME", "BUILTIN", "AFFINITY", "CPU", "MEMORY MB", "WARM POOL", "DESCRIPTION"],
        [
            (
                f["name"],
                "yes" if f.get("builtin") else "no",
                f.get("sessionAffinity"),
                f["resources"]["cpu"],
                f["resources"]["memoryMB"],
                f.get("warmPoolSize"),
                f.get("description"),
            )
            for f in functions
        ],
    )


@app.command()
def get(name: str = typer.Argument(..., help="Function name."), as_json: bool = JSON_OPTION) -> None:
    """One function's settings."""
    with connected() as client:
        function = client.get_function(name)
    _show(function, as_json)


@app.command()
def create(
    name: str = typer.Argument(None, help="Function name (or the file's `name`)."),
    file: Path = FILE_OPTION,
    description: str = DESCRIPTION,
    cpu: float = CPU,
    memory_mb: int = MEMORY,
    disk_mb: int = DISK,
    env: list[str] = ENV,
    start_command: str = START,
    port: int = PORT,
    affinity: AffinityType = AFFINITY,
    header_name: str = HEADER,
    cookie_name: str = COOKIE,
    ttl: int = TTL,
    idle_timeout: int = IDLE,
    disable_reuse: bool = REUSE,
    warm_pool: int = POOL,
    persist_workspace: bool = PERSIST,
    prestart_kernel: bool = KERNEL,
    as_json: bool = JSON_OPTION,
) -> None:
    """Create a function from flags and/or a JSON spec (flags win)."""
    flags = dict(locals())
    with connected() as client:
        spec = read_json_file(file) if file else {}
        if name and spec.get("name", name) != name:
            raise InvalidArgument(f"the file names function {spec['name']!r}, the argument {name!r}")
        spec = _merge(spec, _flags(**flags))
        spec["name"] = name or spec.get("name")
        if not spec["name"]:
            raise InvalidArgument("name the function (argument or the file's `name`)")
        function = client.create_function(spec)
    _show(function, as_json)


@app.command()
def update(
    name: str = typer.Argument(..., help="Function name."),
    file: Path = FILE_OPTION,
    description: str = DESCRIPTION,
    cpu: float = CPU,
    memory_mb: int = MEMORY,
    disk_mb: int = DISK,
    env: list[str] = ENV,
    start_command: str = START,
    port: int = PORT,
    affinity: AffinityType = AFFINITY,
    header_name: str = HEADER,
    cookie_name: str = COOKIE,
    ttl: int = TTL,
    idle_timeout: int = IDLE,
    disable_reuse: bool = REUSE,
    warm_pool: int = POOL,
    persist_workspace: bool = PERSIST,
    prestart_kernel: bool = KERNEL,
    as_json: bool = JSON_OPTION,
) -> None:
    """Change a function: its current settings, then the file's, then the flags'."""
    flags = dict(locals())
    with connected() as client:
        current = {k: v for k, v in client.get_function(name).items() if k not in READ_ONLY}
        spec = _merge(current, read_json_file(file) if file else {})
        spec = _merge(spec, _flags(**flags))
        if spec.get("name") != name:
            raise InvalidArgument(f"the file names function {spec.get('name')!r}, the argument {name!r}")
        function = client.update_function(name, spec)
    _show(function, as_json)


@app.command()
def delete(name: str = typer.Argument(..., help="Function name.")) -> None:
    """Delete a function; its sessions end."""
    with connected() as client:
        client.delete_function(name)
    typer.echo(f"deleted function {name}")
