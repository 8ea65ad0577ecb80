"""Connect's envelope (https://connectrpc.com/docs/protocol#streaming-request): the one codec.

A Connect stream is a sequence of envelopes: 1 flag byte, a 4-byte big-endian length, the
message (JSON here). The last envelope of a server stream carries `FLAG_END_STREAM` and holds
`{}` or `{"error": {...}}`.

Every part of hutch that frames or reads Connect streams does it here: the agent's server
(`connect.py`), the host's agent client (`runtime/channel.py`), the gateway's stream endings
(`gateway/endings.py`), the MCP tools (`mcp/sandboxes.py`) and the self-test. Standard library
only: the agent imports it at boot, and the host imports nothing else of the agent with it.
"""

from __future__ import annotations

import json
import struct

TYPE_CHECKING = False  # typing itself is not imported: the agent's start-up budget
if TYPE_CHECKING:
    from typing import Any

HEADER = struct.Struct(">BI")
FLAG_COMPRESSED = 0x01
FLAG_END_STREAM = 0x02


def frame(payload: bytes, flags: int = 0) -> bytes:
    """One envelope around bytes already encoded."""
    return HEADER.pack(flags, len(payload)) + payload


def encode(message: dict[str, Any], flags: int = 0) -> bytes:
    """One envelope holding `message` as compact JSON."""
    return frame(json.dumps(message, separators=(",", ":")).encode(), flags)


def split(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """The whole (flags, payload) envelopes at the start of `data`, and the bytes after them."""
    out: list[tuple[int, bytes]] = []
    offset, size = 0, len(data)
    while size - offset >= HEADER.size:
        flags, length = HEADER.unpack_from(data, offset)
        end = offset + HEADER.size + length
        if end > size:
            break
        out.append((flags, data[offset + HEADER.size : end]))
        offset = end
    return out, data[offset:]


def decode(data: bytes) -> tuple[list[tuple[int, Any]], bytes]:
    """Like `split`, with each payload parsed as JSON (ValueError if one is not)."""
    envelopes, rest = split(data)
    return [(flags, json.loads(payload)) for flags, payload in envelopes], rest


class Decoder:
    """Reads a stream's envelopes as its chunks arrive."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[tuple[int, Any]]:
        """The (flags, message) envelopes this chunk completes, in order."""
        messages, self._buffer = decode(self._buffer + chunk)
        return messages
