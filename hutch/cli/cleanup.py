"""`hutch cleanup`: remove what a crashed (or `live_restore`) hutch left on this host for a data dir."""

from __future__ import annotations

from pathlib import Path

import typer


def cleanup(
    data_dir: Path = typer.Option(..., "--data-dir", help="The data directory of the hutch that ran here."),
) -> None:
    """Stop every instance of DATA_DIR and remove all hutch made on this host for it (processes,
    cgroups, mounts, loop devices, network namespaces, veths, the nftables table, the host binds).
    Refused while a hutch serves DATA_DIR; safe to run twice."""
    from hutch.errors import HutchError
    from hutch.runtime.cleanup import cleanup as clean

    if not data_dir.is_dir():
        raise typer.BadParameter(f"{data_dir} is not a directory", param_hint="--data-dir")
    try:
        removed = clean(data_dir)
    except HutchError as exc:
        typer.echo(f"refused: {exc.message}", err=True)
        raise typer.Exit(1) from None
    for item in removed:
        typer.echo(f"removed {item}")
    typer.echo(f"{data_dir}: {len(removed)} thing(s) removed" if removed else f"{data_dir}: nothing to remove")
