"""`hutch sandbox run`: one throwaway sandbox on this machine, without a server (needs root).

Useful to check that isolation works on a host before running `hutch serve`.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import typer

from hutch.errors import HutchError
from hutch.types import InstanceId

app = typer.Typer(no_args_is_help=True, help="Run a command in a fresh sandbox on this machine.")


@app.command("run")
def run(
    command: str = typer.Argument(..., help="Shell command to run inside (bash -l -c)."),
    memory_mb: int = typer.Option(512, help="Memory limit."),
    cpu: float = typer.Option(1.0, help="vCPUs."),
    data_dir: Path = typer.Option(None, help="Where instance files go (default: a temporary directory)."),
) -> None:
    """Start a sandbox, run COMMAND, print its output, end the sandbox; exits with its exit code."""
    from hutch.runtime.base import InstanceSpec, Resources
    from hutch.runtime.bwrap import BwrapRuntime
    from hutch.runtime.channel import AgentChannel
    from hutch.storage.local import DirectoryStore

    owned = data_dir is None
    root = Path(tempfile.mkdtemp(prefix="hutch-run-", dir="/var/tmp")) if owned else data_dir
    root.chmod(0o755)

    async def go() -> int:
        runtime = BwrapRuntime(root, DirectoryStore(root / "workspaces"))
        spec = InstanceSpec(
            instance_id=InstanceId(f"run-{uuid.uuid4().hex[:8]}"),
            resources=Resources(memory_mb=memory_mb, cpu=cpu, disk_mb=0),
        )
        instance = await runtime.start(spec)
        try:
            async with AgentChannel(instance.socket_path) as channel:
                result = await channel.run(command, timeout=3600)
            sys.stdout.buffer.write(result.stdout)
            sys.stderr.buffer.write(result.stderr)
            return result.exit_code if result.exit_code >= 0 else 128 + 9
        finally:
            await runtime.stop(instance.instance_id)
            await runtime.close(unstage=owned)

    try:
        code = asyncio.run(go())
    except HutchError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        code = 1
    finally:
        if owned:
            shutil.rmtree(root, ignore_errors=True)
    raise typer.Exit(code)
