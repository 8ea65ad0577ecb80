"""`hutch serve`: the whole platform in one process (gateway, API, MetaDB, scheduler, instances)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import typer

from hutch.config import ServerConfig


def serve(
    host: str = typer.Option(None, help="Address to listen on [default: 127.0.0.1]."),
    port: int = typer.Option(None, help="Port [default: 3000]."),
    data_dir: Path = typer.Option(None, "--data-dir", help="State, workspaces, instances [default: /var/lib/hutch]."),
    config: Path = typer.Option(None, "--config", help="A TOML config file (see hutch/config.py)."),
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
) -> None:
    """Run hutch. HUTCH_API_KEY sets the default tenant's key; otherwise one is printed once."""
    import uvicorn

    from hutch.asgi import HutchApp
    from hutch.errors import HutchError
    from hutch.server import Hutch

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per agent call otherwise
    try:
        settings = ServerConfig.load(config, host=host, port=port, data_dir=data_dir)
    except (HutchError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None
    app = HutchApp(Hutch(settings, default_api_key=os.environ.get("HUTCH_API_KEY")))
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_level=log_level,
        access_log=log_level == "debug",
        timeout_graceful_shutdown=10,
    )
