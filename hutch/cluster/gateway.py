"""The sessions of a cluster, as a stateless gateway (`hutch gateway`) sees them.

`ClusterSessions` is the `Sessions` of the gateway and the API (`hutch.scheduler.interface`), as
`SessionManager` is inside `hutch serve` (create, look up, route, end, renew, network), but the sessions live on nodes
(`hutch node`, `hutch.cluster.node`) and the truth in a shared MetaDB (PostgreSQL):

- **Routes are cached** (internal id -> session -> node): a request with a known key reaches its
  node without touching MetaDB. The cache is kept right by MetaDB's change notices (a node
  announces every end, move and renewal; on a lost notice connection the whole cache is
  dropped), and, for the moment between a change and its notice, by the node itself: a node
  answers 421 `x-hutch-misdirected` for a session it does not hold, and the gateway asks
  MetaDB again.
- **New sessions go to a node with room**: two live nodes sampled at random, the one with more
  free instance slots wins (best of two: nearly as good as the best of all, without every
  gateway piling onto the same node between two heartbeats). Two gateways racing on the first
  request of one key both ask a node to create it; MetaDB's unique index lets one insert win,
  and the loser's node answers with the winner's session.
- **Dead nodes' sessions move**: a node whose heartbeat is older than the lease is dead; the next
  request for one of its sessions asks a live node to adopt it (one compare-and-set in MetaDB:
  a new instance on the same shared workspace, `epoch` + 1). Before the lease runs out, a node
  that does not answer is `Unavailable` (503): it may only be restarting.

Activity, metering and reaping happen on the nodes, which see every request of their sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Coroutine
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

from hutch.cluster.wire import NODE_KEY_HEADER, SESSION_HEADER, node_key, session_from_wire
from hutch.errors import HutchError, NotFound, Unavailable, Unimplemented, from_wire
from hutch.functions import FunctionSpec
from hutch.metadb.base import MetaDB
from hutch.metadb.records import EndReason, SchedulerRecord, SessionRecord, SessionStatus, Tenant, UsageBucket
from hutch.scheduler import interface
from hutch.scheduler.interface import NodeAddress, Route
from hutch.scheduler.sessions import check_session_id

if TYPE_CHECKING:
    from hutch.runtime.base import RootFS
    from hutch.templates.model import Template

log = logging.getLogger(__name__)


class NodeUnreachable(Unavailable):
    """A node did not answer (refused, reset, timed out)."""


class NodeDirectory:
    """The nodes MetaDB knows and which of them are alive (heartbeat within the lease)."""

    def __init__(self, metadb: MetaDB, lease_seconds: float, refresh_interval: float = 1.0) -> None:
        self.metadb = metadb
        self.lease_seconds = lease_seconds
        self.refresh_interval = refresh_interval
        self.nodes: dict[str, SchedulerRecord] = {}
        self._task: asyncio.Task[Any] | None = None

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="node-directory")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def refresh(self) -> None:
        self.nodes = {record.scheduler_id: record for record in await self.metadb.list_schedulers()}

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval)
            try:
                await self.refresh()
            except HutchError as exc:
                log.warning("gateway: cannot read the node list: %s", exc.message)

    def is_live(self, node_id: str | None) -> bool:
        record = self.nodes.get(node_id or "")
        return record is not None and time.time() - record.heartbeat_at < self.lease_seconds

    def address(self, node_id: str) -> NodeAddress:
        record = self.nodes.get(node_id)
        if record is None:
            raise Unavailable(f"node {node_id} is not known (yet)")
        url = urlsplit(record.address)
        if url.scheme != "http" or not url.hostname or not url.port:
            raise Unavailable(f"node {node_id} advertises an unusable address {record.address!r}")
        return NodeAddress(node_id, url.hostname, url.port)

    def choose(self, exclude: AbstractSet[str] = frozenset()) -> SchedulerRecord:
        """A live node with room: the freer of two sampled at random."""
        live = [r for r in self.nodes.values() if self.is_live(r.scheduler_id) and r.scheduler_id not in exclude]
        if not live:
            raise Unavailable("no live node can take a session now; retry")
        sample = random.sample(live, min(2, len(live)))
        return max(sample, key=_free_slots)


def _free_slots(record: SchedulerRecord) -> int:
    capacity = record.capacity
    return int(capacity.get("max_instances", 0)) - int(capacity.get("instances", 0))


class NodeClient:
    """The control calls a gateway makes to nodes (`/_node/v1/…`), errors as hutch errors."""

    def __init__(self, secret: bytes, timeout: float = 120.0) -> None:
        self.key = node_key(secret)
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=3.0))

    async def close(self) -> None:
        await self.http.aclose()

    async def call(self, node: NodeAddress, path: str, body: dict[str, Any]) -> dict[str, Any]:
        url = f"http://{node.host}:{node.port}/_node/v1/{path}"
        try:
            answer = await self.http.post(url, json=body, headers={NODE_KEY_HEADER.decode(): self.key})
        except httpx.TransportError as exc:
            raise NodeUnreachable(f"node {node.node_id} did not answer: {exc.__class__.__name__}") from None
        if answer.status_code == 204:
            return {}
        try:
            data: dict[str, Any] = answer.json()
        except ValueError:
            raise Unavailable(f"node {node.node_id} answered {answer.status_code} without JSON") from None
        if answer.status_code >= 400:
            raise from_wire(data.get("code", "internal"), data.get("message", ""))
        return data


class _NoActivity:
    """Nodes count activity (every request passes through one); a gateway has nothing to count."""

    def begin(self, row_id: str) -> None:
        pass

    def end(self, row_id: str) -> None:
        pass


class _NoLiveMeter:
    """Metering happens on nodes; through a gateway, usage is what nodes have written to MetaDB
    (at most one sample interval old)."""

    def unflushed(self, tenant_id: str | None = None) -> list[UsageBucket]:
        return []

    def snapshot(self, row_id: str) -> None:
        return None

    def state(self, row_id: str) -> str:
        return "unknown"


class ClusterSessions:
    """The sessions of a cluster, through a gateway (the module docstring)."""

    def __init__(self, metadb: MetaDB, secret: bytes, lease_seconds: float, refresh_interval: float = 1.0) -> None:
        self.metadb = metadb
        self.secret = secret
        self.nodes = NodeDirectory(metadb, lease_seconds, refresh_interval)
        self.client = NodeClient(secret)
        self.activity = _NoActivity()
        self.meter = _NoLiveMeter()
        self._active: dict[str, SessionRecord] = {}  # internal id -> Active session (a cache)
        self._by_public: dict[str, str] = {}  # sandbox id -> internal id
        self._by_row: dict[str, str] = {}  # row id -> internal id
        self._specs: dict[tuple[str, str], tuple[str, FunctionSpec]] = {}  # (tenant, name) -> (pool key, spec)
        self.on_end: list[Callable[[SessionRecord], None]] = []
        self.on_created: list[Callable[[SessionRecord, float], None]] = []
        self._background: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        await self.metadb.watch(self._notice)
        await self.nodes.start()

    async def close(self) -> None:
        await self.nodes.close()
        await self.client.close()

    # -- the route cache ------------------------------------------------------------------------

    def _remember(self, session: SessionRecord) -> SessionRecord:
        self._active[session.internal_id] = session
        self._by_row[session.row_id] = session.internal_id
        if session.access_token:
            self._by_public[session.session_id] = session.internal_id
        return session

    def _forget(self, internal_id: str) -> SessionRecord | None:
        session = self._active.pop(internal_id, None)
        if session is not None and self._by_public.get(session.session_id) == internal_id:
            del self._by_public[session.session_id]
        if session is not None:
            self._by_row.pop(session.row_id, None)
        return session

    def _notice(self, internal_id: str | None) -> None:
        """A session changed somewhere (None: maybe any did): the cached route is dropped."""
        if internal_id is None:
            self._active.clear()
            self._by_public.clear()
            self._by_row.clear()
            self._specs.clear()
            return
        session = self._forget(internal_id)
        if session is not None and self.on_end:
            task = asyncio.get_running_loop().create_task(self._check_ended(session))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _check_ended(self, session: SessionRecord) -> None:
        with contextlib.suppress(HutchError):
            current = await self.metadb.get_session(session.row_id)
            if not current.active:
                for callback in self.on_end:
                    callback(current)

    # -- functions and ids (as SessionManager) -------------------------------------------------

    async def function(self, tenant_id: str, name: str) -> tuple[str, FunctionSpec]:
        cached = self._specs.get((tenant_id, name))
        if cached is not None:
            return cached
        record = await self.metadb.get_function(tenant_id, name)
        resolved = (f"{record.tenant_id}/{record.name}", FunctionSpec.model_validate(record.spec))
        self._specs[(tenant_id, name)] = resolved
        return resolved

    def function_changed(self, tenant_id: str, spec: FunctionSpec | None, name: str) -> None:
        """Tell every live node (their warm pools, their sessions of a deleted function)."""
        self._specs = {k: v for k, v in self._specs.items() if k[1] != name}
        body = {"tenantId": tenant_id, "name": name, "spec": spec.wire() if spec is not None else None}
        for node_id in list(self.nodes.nodes):
            if self.nodes.is_live(node_id):
                self._spawn(self._tell(node_id, body))

    async def _tell(self, node_id: str, body: dict[str, Any]) -> None:
        try:
            await self.client.call(self.nodes.address(node_id), "functions", body)
        except HutchError as exc:
            log.warning("node %s did not take a function change: %s", node_id, exc.message)

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def internal_id(self, tenant_id: str, function: str, key: str) -> str:
        return interface.internal_id(self.secret, tenant_id, function, key)

    # -- lookups -------------------------------------------------------------------------------

    def active(self, internal_id: str) -> SessionRecord | None:
        return self._active.get(internal_id)

    def active_by_public_id(self, session_id: str) -> SessionRecord | None:
        internal = self._by_public.get(session_id)
        return self._active.get(internal) if internal else None

    async def bound_session(self, tenant_id: str, function: str, key: str, value: str) -> SessionRecord | None:
        """A session by a binding another gateway recorded in its metadata (an MCP session id)."""
        found = await self.metadb.active_session_by_metadata(tenant_id, function, key, value)
        return self._remember(found) if found is not None else None

    async def find_by_public_id(self, session_id: str) -> SessionRecord | None:
        cached = self.active_by_public_id(session_id)
        if cached is not None:
            return cached
        record = await self.metadb.active_session_by_public_id(session_id)
        return self._remember(record) if record is not None else None

    async def find_by_row(self, row_id: str) -> SessionRecord | None:
        """An Active session by row id (a native session's host-named traffic), cached as any route."""
        internal = self._by_row.get(row_id)
        cached = self._active.get(internal) if internal else None
        if cached is not None:
            return cached
        try:
            record = await self.metadb.get_session(row_id)
        except NotFound:
            return None
        return self._remember(record) if record.active else None

    def active_sessions(self) -> list[SessionRecord]:
        """The sessions this gateway has routed lately (the cluster's are in MetaDB)."""
        return list(self._active.values())

    async def tenant_sessions(self, tenant_id: str) -> list[SessionRecord]:
        sessions, token = [], None
        while True:
            page, token = await self.metadb.list_sessions(
                tenant_id, status=SessionStatus.ACTIVE, limit=500, after=token
            )
            sessions += page
            if token is None:
                return sessions

    async def get(self, tenant_id: str, session_id: str, function: str | None = None) -> SessionRecord:
        return await self.metadb.find_session(tenant_id, session_id, function)

    # -- create --------------------------------------------------------------------------------

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
        started = time.perf_counter()
        await self.function(tenant.tenant_id, function)  # NotFound here, before any node is asked
        if session_id is not None:
            check_session_id(session_id)
            if existing_ok:
                internal = self.internal_id(tenant.tenant_id, function, session_id)
                existing = self._active.get(internal) or await self.metadb.active_session(internal)
                if existing is not None:
                    return self._remember(existing), False
        body = {
            "tenant": {
                "tenant_id": tenant.tenant_id,
                "name": tenant.name,
                "created_at": tenant.created_at,
                "is_admin": tenant.is_admin,
                "max_sessions": tenant.max_sessions,
                "max_vcpu": tenant.max_vcpu,
                "max_memory_mb": tenant.max_memory_mb,
                "max_image_disk_mb": tenant.max_image_disk_mb,
            },
            "function": function,
            "sessionId": session_id,
            "affinity": affinity,
            "ttlSeconds": ttl_s,
            "idleTimeoutSeconds": idle_timeout_s,
            "env": env,
            "metadata": metadata,
            "withToken": with_token,
            "existingOk": existing_ok,
            "network": network,
            "traffic": traffic,
            "lifecycle": lifecycle,
        }
        answer = await self._on_live_node("sessions", body, "no live node can take a session now; retry")
        record = self._remember(session_from_wire(answer["session"]))
        if answer["created"]:
            for callback in self.on_created:
                callback(record, time.perf_counter() - started)
        return record, bool(answer["created"])

    async def _on_live_node(self, path: str, body: dict[str, Any], none_left: str) -> dict[str, Any]:
        """A control call to a live node with room; up to three nodes are tried, as one may be
        unreachable, fenced or full (all `Unavailable`) while another is not."""
        tried: set[str] = set()
        last: HutchError | None = None
        refreshed = False
        while len(tried) < 3:
            try:
                node = self.nodes.choose(exclude=tried)
            except Unavailable:
                if refreshed:
                    break
                # The list read a moment ago may predate a node's first heartbeat: read it again
                # rather than refuse (only on this path: the hot one never reads MetaDB).
                await self.nodes.refresh()
                refreshed = True
                continue
            tried.add(node.scheduler_id)
            try:
                return await self.client.call(self.nodes.address(node.scheduler_id), path, body)
            except Unavailable as exc:
                last = exc
        raise last or Unavailable(none_left)

    # -- routing -------------------------------------------------------------------------------

    def _route(self, session: SessionRecord, spec: FunctionSpec | None) -> Route:
        node = self.nodes.address(session.scheduler_id or "")
        hop = ((NODE_KEY_HEADER, self.client.key.encode()), (SESSION_HEADER, session.row_id.encode()))
        return Route(session, None, spec.port if spec else None, node=node, hop=hop)

    async def route(self, session: SessionRecord) -> Route:
        """The node that holds the session. Its lease is not checked here: a node that answers is
        alive (a MetaDB outage stops every heartbeat at once, and must not move every session);
        only a node that does not answer and whose lease ran out loses its sessions (`reroute`)."""
        _, spec = await self.function(session.tenant_id, session.function)
        if session.scheduler_id not in self.nodes.nodes:
            await self.nodes.refresh()  # a node that joined since the last reading
        if session.scheduler_id not in self.nodes.nodes:
            session = await self._adopt(await self._reload(session))
        return self._route(session, spec)

    async def reroute(self, session: SessionRecord) -> Route:
        """The session's node took no connection: where the session is now; a live node adopts
        it if its node's lease ran out; until then 503 (a restarting node is not a dead one)."""
        current = await self._reload(session)
        await self.nodes.refresh()
        if current.scheduler_id != session.scheduler_id:
            return await self.route(current)  # it moved meanwhile
        if self.nodes.is_live(current.scheduler_id):
            record = self.nodes.nodes[current.scheduler_id or ""]
            left = max(0.0, self.nodes.lease_seconds - (time.time() - record.heartbeat_at))
            raise Unavailable(
                f"the node of session {session.session_id} does not answer; if it is down, the session "
                f"moves to another node in {left:.1f} s"
            )
        _, spec = await self.function(current.tenant_id, current.function)
        return self._route(await self._adopt(current), spec)

    async def misdirected(self, session: SessionRecord) -> None:
        """The node said it does not hold the session: forget the cached route."""
        self._forget(session.internal_id)

    async def _reload(self, session: SessionRecord) -> SessionRecord:
        current = await self.metadb.get_session(session.row_id)
        if not current.active:
            self._forget(session.internal_id)
            raise NotFound(f"session {session.session_id} has ended")
        return self._remember(current)

    async def _adopt(self, session: SessionRecord) -> SessionRecord:
        dead = session.scheduler_id or ""
        answer = await self._on_live_node(
            f"sessions/{session.row_id}/adopt",
            {"from": dead},
            f"session {session.session_id} lost its node and no live node can take it",
        )
        moved = self._remember(session_from_wire(answer["session"]))
        log.warning("session %s moved from dead node %s to %s", session.session_id, dead, moved.scheduler_id)
        return moved

    # -- changes, on the session's node --------------------------------------------------------

    async def _call_node(self, session: SessionRecord, action: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """The answer of the session's node to a change; None if the session has ended."""
        current = await self.metadb.get_session(session.row_id)
        if not current.active:
            self._forget(current.internal_id)
            return None
        address = self.nodes.address(current.scheduler_id or "") if self.nodes.is_live(current.scheduler_id) else None
        if address is None:
            raise NodeUnreachable(f"the node of session {session.session_id} is down")
        return await self.client.call(address, f"sessions/{current.row_id}/{action}", body)

    async def _on_node(self, session: SessionRecord, action: str, body: dict[str, Any]) -> SessionRecord | None:
        answer = await self._call_node(session, action, body)
        record = answer.get("session") if answer else None
        return session_from_wire(record) if record else None

    async def end(self, session: SessionRecord, reason: EndReason | str) -> SessionRecord | None:
        value = reason.value if isinstance(reason, EndReason) else reason
        try:
            ended = await self._on_node(session, "end", {"reason": value})
        except NodeUnreachable:
            # Its node is down: end it in MetaDB; the node drops the instance when it is back.
            ended = await self.metadb.end_session(session.row_id, value, time.time())
            if ended is not None:
                await self.metadb.announce(ended.internal_id)
        self._forget(session.internal_id)
        if ended is not None:
            for callback in self.on_end:
                callback(ended)
        return ended

    async def renew(
        self, session: SessionRecord, ttl_s: int | None = None, idle_timeout_s: int | None = None
    ) -> SessionRecord:
        body = {"ttlSeconds": ttl_s, "idleTimeoutSeconds": idle_timeout_s}
        try:
            updated = await self._on_node(session, "renew", body)
        except NodeUnreachable:
            now = time.time()
            changes: dict[str, Any] = {"last_modified": now}
            if ttl_s is not None:
                changes.update(ttl_s=ttl_s, expires_at=now + ttl_s)
            if idle_timeout_s is not None:
                changes["idle_timeout_s"] = idle_timeout_s
            updated = await self.metadb.update_session(session.row_id, **changes)
        if updated is None:
            raise NotFound(f"session {session.session_id} has ended")
        return self._remember(updated)

    async def sleep(
        self, session: SessionRecord, paused: bool = True, memory: bool = True
    ) -> tuple[SessionRecord, bool]:
        return await self._on_node_changed(session, "sleep", {"paused": paused, "memory": memory})

    async def wake(self, session: SessionRecord, ttl_s: int | None = None) -> tuple[SessionRecord, bool]:
        return await self._on_node_changed(session, "wake", {"ttlSeconds": ttl_s})

    async def copy_files(self, session: SessionRecord, into: Path, checkpoint: Path | None = None) -> RootFS:
        raise Unimplemented("snapshots are not available through a cluster's gateway yet")

    async def snapshot(
        self, tenant: Tenant, source: SessionRecord, name: str, memory: bool, kind: str = "snapshot"
    ) -> Template:
        raise Unimplemented("snapshots are not available through a cluster's gateway yet")

    async def fork(
        self, tenant: Tenant, source: SessionRecord, count: int, ttl_s: int | None = None
    ) -> list[SessionRecord | HutchError]:
        raise Unimplemented("forks are not available through a cluster's gateway yet")

    async def _on_node_changed(
        self, session: SessionRecord, action: str, body: dict[str, Any]
    ) -> tuple[SessionRecord, bool]:
        """A change only the session's node can make (its instance is there)."""
        answer = await self._call_node(session, action, body)
        if answer is None:
            raise NotFound(f"session {session.session_id} has ended")
        return self._remember(session_from_wire(answer["session"])), bool(answer.get("changed"))

    async def set_network(self, session: SessionRecord, policy: dict[str, Any]) -> SessionRecord:
        try:
            updated = await self._on_node(session, "network", {"policy": policy})
        except NodeUnreachable:
            updated = await self.metadb.update_session(session.row_id, network=dict(policy), last_modified=time.time())
        if updated is None:
            raise NotFound(f"session {session.session_id} has ended")
        return self._remember(updated)


if TYPE_CHECKING:

    def _implements(sessions: ClusterSessions) -> interface.Sessions:  # mypy checks the seam here
        return sessions
