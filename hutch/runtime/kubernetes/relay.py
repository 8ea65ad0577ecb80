"""The `kubernetes` backend's relay: the instance's Unix socket on this host, piped to its pod."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0  # the relay's connection to a pod's agent
RELAY_CHUNK = 256 * 1024


class Relay:
    """A Unix socket on this host whose every connection is piped to a pod's agent (TCP).

    Bytes go through untouched, both ways, with half-closes passed on (an HTTP client may shut
    its side after a request), so everything that speaks to an agent's socket (the gateway's
    pooled connections, WebSocket and port splices, `AgentChannel`) works as with bwrap's. A
    connection the agent refuses or that cannot be made is closed at once: the same as a dead
    agent's socket, which the layers above already handle."""

    def __init__(self, path: Path, host: str, port: int) -> None:
        self.path = Path(path)
        self.host = host
        self.port = port
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._handle, path=str(self.path))
        os.chmod(self.path, 0o600)  # hutch (root) only; the directory is 0700 anyway

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), CONNECT_TIMEOUT
                )
            except (OSError, TimeoutError) as exc:
                log.debug("relay %s: cannot reach %s:%d: %s", self.path, self.host, self.port, exc)
                return
            upstream = up_writer
            self._writers.add(up_writer)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for side in (writer, upstream):
                if side is not None:
                    self._writers.discard(side)
                    side.close()

    def shut(self) -> None:
        """Stop listening and drop every open connection, at once (from synchronous code)."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()
        self.path.unlink(missing_ok=True)

    async def close(self) -> None:
        """`shut`, and wait for the listener to be gone (the pod keeps running)."""
        server = self._server
        self.shut()
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1)
        self._server = None


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close the other side; on an error, close it (which ends the
    opposite direction too)."""
    try:
        while data := await reader.read(RELAY_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()
