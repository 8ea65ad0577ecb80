"""`hutch serve`: the whole platform in one process (gateway, API, MetaDB, scheduler, instances);
`hutch gateway` and `hutch node`: its roles apart, for a cluster on a shared MetaDB."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import typer

from hutch.config import ServerConfig

HOST = typer.Option(None, help="Address to listen on [default: 127.0.0.1].")
PORT = typer.Option(None, help="Port [default: 3000].")
DATA_DIR = typer.Option(None, "--data-dir", help="State, workspaces, instances [default: /var/lib/hutch].")
CONFIG = typer.Option(None, "--config", help="A TOML config file (see hutch/config.py).")
LOG_LEVEL = typer.Option("info", help="debug, info, warning or error.")


def serve(
    host: str = HOST,
    port: int = PORT,
    data_dir: Path = DATA_DIR,
    config: Path = CONFIG,
    log_level: str = LOG_LEVEL,
) -> None:
    """Run hutch. HUTCH_API_KEY sets the default tenant's key; otherwise one is printed once."""
    _run("all", host, port, data_dir, config, log_level)


def gateway(
    host: str = HOST,
    port: int = PORT,
    data_dir: Path = DATA_DIR,
    config: Path = CONFIG,
    log_level: str = LOG_LEVEL,
) -> None:
    """Run a gateway of a cluster: the API and the data plane, stateless (run any number).
    Needs metadb_url = "postgresql://…"; sessions live on `hutch node`s."""
    _run("gateway", host, port, data_dir, config, log_level)


def node(
    host: str = HOST,
    port: int = typer.Option(None, help="Port [default: 3000]."),
    data_dir: Path = DATA_DIR,
    config: Path = CONFIG,
    advertise: str = typer.Option(None, help="How gateways reach this node, http://HOST:PORT [default: the listener]."),
    log_level: str = LOG_LEVEL,
) -> None:
    """Run a node of a cluster: this host's scheduler and instances, for the gateways.
    Needs metadb_url = "postgresql://…", and a shared workspace store for sessions to survive the node."""
    _run("node", host, port, data_dir, config, log_level, advertise=advertise)


def _run(
    role: str,
    host: str | None,
    port: int | None,
    data_dir: Path | None,
    config: Path | None,
    log_level: str,
    advertise: str | None = None,
) -> None:
    import uvicorn

    from hutch.asgi import HutchApp
    from hutch.cluster.node import NodeApp
    from hutch.errors import HutchError
    from hutch.gateway.wire import GuardedHttpProtocol
    from hutch.server import Hutch, Role

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per agent call otherwise
    try:
        settings = ServerConfig.load(config, host=host, port=port, data_dir=data_dir)
        if role == "node":  # gateways find it at this address, through MetaDB
            address = advertise or settings.cluster.advertise or f"http://{settings.host}:{settings.port}"
            settings.cluster = settings.cluster.model_validate({**settings.cluster.model_dump(), "advertise": address})
        hutch = Hutch(settings, default_api_key=os.environ.get("HUTCH_API_KEY"), role=Role(role))
    except (HutchError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None
    app = NodeApp(hutch, settings.cluster.advertise) if role == "node" else HutchApp(hutch)
    _raise_open_files_limit()
    # httptools, with limits on request heads (hutch/gateway/wire.py)
    http = GuardedHttpProtocol.configured(head_timeout=settings.request_timeout)
    main = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=http,
        lifespan="on",
        log_level=log_level,
        access_log=log_level == "debug",
        timeout_graceful_shutdown=10,
    )
    preview = settings.preview
    if role == "node" or not preview.port:
        uvicorn.Server(main).run()
        return
    second = uvicorn.Config(
        app,
        host=preview.host or settings.host,
        port=preview.port,
        loop="uvloop",
        http=http,
        lifespan="off",  # the app starts and stops with the main listener
        log_level=log_level,
        access_log=log_level == "debug",
        timeout_graceful_shutdown=10,
        ssl_certfile=preview.tls_cert or None,
        ssl_keyfile=preview.tls_key or None,
    )
    _Listeners(main, second).run()


class _Listeners:
    """The main listener and the preview listener of one app, in one event loop: the preview one
    opens once the app has started, and both close on the signal the main one catches."""

    def __init__(self, main: Any, preview: Any) -> None:
        import uvicorn

        self.preview = uvicorn.Server(preview)
        outer = self

        class Main(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                outer.preview.should_exit = True
                super().handle_exit(sig, frame)

        self.main = Main(main)

    def run(self) -> None:
        from uvicorn._compat import asyncio_run

        asyncio_run(self._serve(), loop_factory=self.main.config.get_loop_factory())

    async def _serve(self) -> None:
        preview = asyncio.create_task(self._preview_when_started())
        try:
            await self.main.serve()
        finally:
            self.preview.should_exit = True
            await preview

    async def _preview_when_started(self) -> None:
        while not self.main.started:
            if self.main.should_exit or self.preview.should_exit:
                return
            await asyncio.sleep(0.02)
        await self.preview._serve()  # no signal handlers of its own: the main server's stop it


def _raise_open_files_limit() -> None:
    """Every client connection, instance socket and pooled upstream connection is a file: take
    the whole hard limit (service managers often start processes with a soft limit of 1024)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
