"""A tiny Connect RPC (JSON codec) client for tests: written from the protocol, not from hutch."""

from __future__ import annotations

import json
import struct

import httpx

STREAM_TYPE = "application/connect+json"


def envelope(message: dict, flags: int = 0) -> bytes:
    data = json.dumps(message).encode()
    return struct.pack(">BI", flags, len(data)) + data


def parse_envelopes(data: bytes) -> list[tuple[int, dict]]:
    out = []
    while data:
        flags, length = struct.unpack(">BI", data[:5])
        out.append((flags, json.loads(data[5 : 5 + length])))
        data = data[5 + length :]
    return out


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
            buf += chunk
            while len(buf) >= 5:
                flags, length = struct.unpack(">BI", buf[:5])
                if len(buf) < 5 + length:
                    break
                yield flags, json.loads(buf[5 : 5 + length])
                buf = buf[5 + length :]
