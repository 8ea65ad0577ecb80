"""The session seam: what the gateway and the API ask of sessions, and nothing more.

Two classes implement `Sessions`:
- `hutch.scheduler.sessions.SessionManager`: the sessions of this host (`hutch serve`, and each
  `hutch node` of a cluster), with their instances, metering and reaping;
- `hutch.cluster.gateway.ClusterSessions`: a cluster's stateless gateway (`hutch gateway`), whose
  sessions live on nodes and whose truth is a shared MetaDB.

The gateway (`hutch.gateway`) and the API (`hutch.api`) depend on this Protocol alone, so they
run unchanged in both. What only one side has (reaping, adoption, a route cache) stays on its
class. `Route` says where a request goes; the hop to a cluster's node is data on it, so the
gateway needs to know nothing of how nodes are reached.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from hutch.errors import HutchError
from hutch.metadb.records import EndReason, SessionRecord, Tenant

if TYPE_CHECKING:
    from hutch.functions import FunctionSpec
    from hutch.metadb.records import SessionUsage, UsageBucket
    from hutch.runtime.base import RootFS
    from hutch.templates.model import Template

Header = tuple[bytes, bytes]


@dataclass(frozen=True, slots=True)
class NodeAddress:
    """A node of a cluster, where a gateway sends requests for the sessions it holds."""

    node_id: str
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request for a session goes: an instance's socket on this host, or (through a
    gateway of a cluster) the node that holds the session."""

    session: SessionRecord
    socket_path: Path | None
    port: int | None  # the function's user server; None: the agent itself
    node: NodeAddress | None = None
    hop: tuple[Header, ...] = ()  # headers a request to `node` carries (who asks, for which session)


def internal_id(secret: bytes, tenant_id: str, function: str, key: str) -> str:
    """A session's internal id: a keyed hash of (tenant, function, key), the same on every host
    that has the secret."""
    message = f"{tenant_id}\x00{function}\x00{key}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()[:40]


class Activity(Protocol):
    """Requests in flight per session (row id): the idle timeout and metering count from them."""

    def begin(self, row_id: str) -> None: ...
    def end(self, row_id: str) -> None: ...


class LiveMeter(Protocol):
    """What the usage API reads of metering not yet written to MetaDB."""

    def unflushed(self, tenant_id: str | None = None) -> list[UsageBucket]: ...
    def snapshot(self, row_id: str) -> SessionUsage | None: ...
    def state(self, row_id: str) -> str: ...


class Sessions(Protocol):
    """The sessions as the gateway and the API see them (see the module docstring).

    Lookups by key or id that miss return None; calls that name a session that does not exist
    raise `hutch.errors.NotFound`; quotas and capacity raise `QuotaExceeded` / `Unavailable`."""

    @property
    def activity(self) -> Activity: ...
    @property
    def meter(self) -> LiveMeter: ...
    @property
    def on_end(self) -> list[Callable[[SessionRecord], None]]:
        """Called with each session that ends (here, or, for a gateway, anywhere it routed)."""
        ...

    @property
    def on_created(self) -> list[Callable[[SessionRecord, float], None]]:
        """Called with each session created, and the seconds it took."""
        ...

    async def start(self) -> None: ...
    async def close(self) -> None: ...

    # functions and ids
    async def function(self, tenant_id: str, name: str) -> tuple[str, FunctionSpec]:
        """(pool key, spec) of the function a tenant means by `name`."""
        ...

    def function_changed(self, tenant_id: str, spec: FunctionSpec | None, name: str) -> None:
        """Called after a function is created, updated (spec) or deleted (None)."""
        ...

    def internal_id(self, tenant_id: str, function: str, key: str) -> str: ...

    # create
    async def create(
        self,
        tenant: Tenant,
        function: str,
        *,
        session_id: str | None = None,
        affinity: str = "API",
        ttl_s: int | None = None,
        idle_timeout_s: int | None = None,
        env: dict[str, str] | None = None,
        metadata: dict[str, Any] | None = None,
        with_token: bool = False,
        existing_ok: bool = False,
        network: dict[str, Any] | None = None,
        traffic: dict[str, Any] | None = None,
        lifecycle: dict[str, Any] | None = None,
    ) -> tuple[SessionRecord, bool]:
        """A new Active session and whether it was created (False: `existing_ok` found one)."""
        ...

    # lookups
    def active(self, internal_id: str) -> SessionRecord | None: ...
    def active_by_public_id(self, session_id: str) -> SessionRecord | None: ...
    async def bound_session(self, tenant_id: str, function: str, key: str, value: str) -> SessionRecord | None:
        """The Active session whose metadata binds `key` to `value` (an MCP session id)."""
        ...

    async def find_by_public_id(self, session_id: str) -> SessionRecord | None: ...
    async def find_by_row(self, row_id: str) -> SessionRecord | None: ...
    def active_sessions(self) -> list[SessionRecord]: ...
    async def tenant_sessions(self, tenant_id: str) -> list[SessionRecord]: ...
    async def get(self, tenant_id: str, session_id: str, function: str | None = None) -> SessionRecord: ...

    # routing
    async def route(self, session: SessionRecord) -> Route: ...
    async def reroute(self, session: SessionRecord) -> Route:
        """Where to send a request whose instance (or node) took no connection."""
        ...

    async def misdirected(self, session: SessionRecord) -> None:
        """The session's node said it does not hold it: forget the route."""
        ...

    # changes
    async def end(self, session: SessionRecord, reason: EndReason | str) -> SessionRecord | None: ...
    async def renew(
        self, session: SessionRecord, ttl_s: int | None = None, idle_timeout_s: int | None = None
    ) -> SessionRecord: ...
    async def set_network(self, session: SessionRecord, policy: dict[str, Any]) -> SessionRecord: ...
    # sleep (`hutch.scheduler.sleep`): (the session, whether its state changed)
    async def sleep(
        self, session: SessionRecord, paused: bool = True, memory: bool = True
    ) -> tuple[SessionRecord, bool]: ...
    async def wake(self, session: SessionRecord, ttl_s: int | None = None) -> tuple[SessionRecord, bool]: ...
    # snapshots (`hutch.scheduler.snapshots`): the session's upper layer copied into `into`, and
    # with `checkpoint` its processes and memory written there at the same moment
    async def copy_files(self, session: SessionRecord, into: Path, checkpoint: Path | None = None) -> RootFS: ...
    # a template of the session's files (and memory), with a function like its own
    async def snapshot(
        self, tenant: Tenant, source: SessionRecord, name: str, memory: bool, kind: str = "snapshot"
    ) -> Template: ...
    # `count` sessions started from one checkpoint of `source`: a session or an error each
    async def fork(
        self, tenant: Tenant, source: SessionRecord, count: int, ttl_s: int | None = None
    ) -> list[SessionRecord | HutchError]: ...
