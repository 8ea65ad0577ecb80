"""How the gateway ends an agent's streamed answer that its instance cut short.

Once the status line is out, an instance that dies in the middle of its answer can no longer be
reported with a status. For the agent's own streaming protocols the gateway can still end the
stream the way that protocol ends a failed call, so that a client (the E2B SDKs, curl) gets an
error it can read rather than a broken connection:
- Connect server streams (`application/connect+json`, envd's processes and watchers): an
  end-of-stream envelope with an `unavailable` error, as E2B's own proxy does when a sandbox is
  killed mid-command (the SDK then probes the sandbox, and this session's next request brings it
  back on a new instance);
- NDJSON (`application/x-ndjson`, the code interpreter's `/execute`): an `error` line, which
  `run_code` returns as the execution's error; unless the session itself ended (killed, timed
  out): then the client's connection is cut, as E2B's proxy does, and the SDK, finding the
  sandbox gone, raises its own "sandbox was killed while the request was in progress"
  (`proxy_http`'s `ended`).
Only at a message boundary: a message cut in its middle cannot be completed, and the client's
connection is cut instead, as for any other answer. The answers of user servers are never
touched: their protocols are theirs.
"""

from __future__ import annotations

import json
from typing import Protocol

from hutch.agent import envelope


class Ending(Protocol):
    """Follows what the client was sent of a stream, and says how to end it with an error."""

    def feed(self, data: bytes) -> None:
        """Bytes the client was sent."""
        ...

    def tail(self, message: str) -> bytes | None:
        """The bytes that end the stream with `message` as its error (b"" when it had ended
        already); None when the stream stopped in the middle of a message."""
        ...


class ConnectEnding:
    """A Connect stream: envelopes (`hutch.agent.envelope`) followed without buffering them."""

    __slots__ = ("_ended", "_header", "_remaining")

    def __init__(self) -> None:
        self._header = b""  # the part of an envelope's header received so far
        self._remaining = 0  # bytes of the current envelope's message still to come
        self._ended = False  # the end-of-stream envelope has begun

    def feed(self, data: bytes) -> None:
        i, size = 0, len(data)
        while i < size:
            if self._remaining:
                taken = min(self._remaining, size - i)
                self._remaining -= taken
                i += taken
                continue
            needed = envelope.HEADER.size - len(self._header)
            self._header += data[i : i + needed]
            i += needed
            if len(self._header) == envelope.HEADER.size:
                flags, self._remaining = envelope.HEADER.unpack(self._header)
                if flags & envelope.FLAG_END_STREAM:
                    self._ended = True
                self._header = b""

    def tail(self, message: str) -> bytes | None:
        if self._header or self._remaining:
            return None
        if self._ended:
            return b""
        return envelope.encode({"error": {"code": "unavailable", "message": message}}, envelope.FLAG_END_STREAM)


class NdjsonEnding:
    """The code interpreter's answer: one JSON object per line."""

    __slots__ = ("_open",)

    def __init__(self) -> None:
        self._open = False  # the last line sent has no newline yet

    def feed(self, data: bytes) -> None:
        if data:
            self._open = not data.endswith(b"\n")

    def tail(self, message: str) -> bytes | None:
        if self._open:
            return None
        line = {"type": "error", "name": "InstanceStopped", "value": message, "traceback": ""}
        return json.dumps(line).encode() + b"\n"


def for_answer(headers: list[tuple[bytes, bytes]]) -> Ending | None:
    """The ending for an agent's answer with these headers; None for any other kind of answer."""
    for name, value in headers:
        if name == b"content-type":
            kind = value.split(b";", 1)[0].strip().lower()
            if kind.startswith(b"application/connect+"):
                return ConnectEnding()
            if kind == b"application/x-ndjson":
                return NdjsonEnding()
            return None
    return None
