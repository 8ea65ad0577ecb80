"""The contracts of the gateway: what it uses of the process it runs in (`DataPlane`), where a
request goes (`Target`), what watches its answer (`Observer`), and the ASGI callables."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from starlette.types import Message, Receive, Scope, Send

from hutch.gateway.upstream import PoolKey
from hutch.metadb.records import SessionRecord

if TYPE_CHECKING:
    from hutch.config import ServerConfig
    from hutch.metadb.base import MetaDB
    from hutch.metrics import Metrics
    from hutch.scheduler.interface import NodeAddress, Sessions
    from hutch.tenants import TenantService

__all__ = ["DataPlane", "Header", "Message", "Observer", "Receive", "Scope", "Send", "Target"]

Header = tuple[bytes, bytes]


class Observer(Protocol):
    """Watches one proxied exchange (MCP session affinity): the proxy calls `head` before the
    client sees the answer's head, `body` on every chunk before the client sees it, and the
    gateway calls `finish` once the exchange is over, however it ended."""

    def head(self, status: int, headers: list[Header]) -> list[Header]:
        """The instance's answer head; returns headers to add to the client's answer."""
        ...

    def body(self, data: bytes, last: bool) -> bytes:
        """A chunk of the answer; returns what the client gets (it may hold bytes back)."""
        ...

    async def settle(self) -> None:
        """Before the client gets a chunk of the answer (and its end): what the client may rely
        on next is done (a binding written to MetaDB, where other gateways look it up)."""
        ...

    async def finish(self) -> None: ...


@dataclass(slots=True)
class Target:
    """A resolved request: the session's instance and how to rewrite the request for it."""

    session: SessionRecord  # its row id counts activity for the idle timeout
    address: Path | tuple[str, int] | None  # the instance's agent socket, or (host, port) of its node
    pool_key: PoolKey  # (instance id, user-server port or None)
    path: bytes  # request-target on the instance (path and query, still percent-encoded)
    drop: frozenset[bytes] = frozenset()  # request headers that must not reach the instance
    add: list[Header] = field(default_factory=list)  # request headers the gateway sets
    answer: list[Header] = field(default_factory=list)  # headers added to the answer (affinity)
    answer_drop: frozenset[bytes] = frozenset()  # instance answer headers the gateway's replace
    observer: Observer | None = None  # MCP functions: learns session ids from the answer
    node: NodeAddress | None = None  # a cluster's gateway: the node that holds the session
    hop: tuple[Header, ...] = ()  # and the headers the request to that node carries


@dataclass(frozen=True, slots=True)
class DataPlane:
    """What the gateway uses of the process it runs in, handed to it once the sessions have
    started (`hutch.asgi`): the sessions through their seam, and nothing of how they are held."""

    config: ServerConfig
    sessions: Sessions
    tenants: TenantService
    metadb: MetaDB
    metrics: Metrics
