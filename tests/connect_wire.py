"""A tiny Connect RPC (JSON codec) client for tests: written from the protocol, not from hutch.

The tests' one Connect codec. It stays apart from `hutch.agent.envelope` on purpose: a codec
checked against itself proves nothing.
"""

from __future__ import annotations

import base64
import json
import struct

import httpx

STREAM_TYPE = "application/connect+json"


def envelope(message: dict, flags: int = 0) -> bytes:
    data = json.dumps(message).encode()
    return struct.pack(">BI", flags, len(data)) + data


def split(data: bytes) -> tuple[list[tuple[int, dict]], bytes]:
    """The whole (flags, message) envelopes at the start of `data`, and the bytes after them."""
    out = []
    while len(data) >= 5:
        flags, length = struct.unpack(">BI", data[:5])
        if len(data) < 5 + length:
            break
        out.append((flags, json.loads(data[5 : 5 + length])))
        data = data[5 + length :]
    return out, data


def parse_envelopes(data: bytes) -> list[tuple[int, dict]]:
    """Every envelope of a whole body (which must hold nothing else)."""
    out, rest = split(data)
    assert not rest, f"{len(rest)} bytes after the last whole envelope"
    return out


def stdout_of(data: bytes) -> str:
    """What a `process.Process/Start` stream's process wrote to stdout (its whole envelopes)."""
    out = b""
    for _, message in split(data)[0]:
        out += base64.b64decode(message.get("event", {}).get("data", {}).get("stdout", ""))
    return out.decode()


def unary(client: httpx.Client, path: str, message: dict) -> httpx.Response:
    return client.post(path, json=message)


def server_stream(client: httpx.Client, path: str, message: dict, headers: dict | None = None):
    """All (flags, message) envelopes of a server stream; the last one has flags 0x02."""
    r = client.post(path, content=envelope(message), headers={"content-type": STREAM_TYPE, **(headers or {})})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == STREAM_TYPE
    return parse_envelopes(r.content)


def iter_stream(client: httpx.Client, path: str, message: dict, headers: dict | None = None):
    """Yield (flags, message) envelopes as they arrive."""
    with client.stream(
        "POST", path, content=envelope(message), headers={"content-type": STREAM_TYPE, **(headers or {})}
    ) as r:
        assert r.status_code == 200
        buf = b""
        for chunk in r.iter_raw():
            messages, buf = split(buf + chunk)
            yield from messages
