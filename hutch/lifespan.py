"""The ASGI lifespan protocol for hutch's two apps (`hutch.asgi.HutchApp`, `hutch.cluster.node.NodeApp`)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from hutch.errors import BackendUnavailable, FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)


async def run_lifespan(
    receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
    send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    start: Callable[[], Awaitable[None]],
    stop: Callable[[], Awaitable[None]],
    what: str,
) -> None:
    """`start` at the server's startup, `stop` at its shutdown. A failed start fails the startup:
    said in one line when a setting or the host is at fault, with its traceback otherwise."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await start()
            except Exception as exc:
                if isinstance(exc, InvalidArgument | BackendUnavailable | FailedPrecondition):
                    log.error("%s failed to start: %s", what, exc)
                else:
                    log.exception("%s failed to start", what)
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            try:
                await stop()
            finally:
                await send({"type": "lifespan.shutdown.complete"})
            return
