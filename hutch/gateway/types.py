"""The contracts inside the gateway: where a request goes (`Target`) and the ASGI callables."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from starlette.types import Message, Receive, Scope, Send

from hutch.gateway.upstream import PoolKey
from hutch.metadb.records import SessionRecord

__all__ = ["Header", "Message", "Receive", "Scope", "Send", "Target"]

Header = tuple[bytes, bytes]


@dataclass(slots=True)
class Target:
    """A resolved request: the session's instance and how to rewrite the request for it."""

    session: SessionRecord  # its row id counts activity for the idle timeout
    socket_path: Path  # the instance's agent socket
    pool_key: PoolKey  # (instance id, user-server port or None)
    path: bytes  # request-target on the instance (path and query, still percent-encoded)
    drop: frozenset[bytes] = frozenset()  # request headers that must not reach the instance
    add: list[Header] = field(default_factory=list)  # request headers the gateway sets
    answer: list[Header] = field(default_factory=list)  # headers added to the answer (affinity)
    answer_drop: frozenset[bytes] = frozenset()  # instance answer headers the gateway's replace
