"""`hutch node`: the scheduler and instances of one host, reached by gateways over HTTP.

A node owns the sessions MetaDB binds to it (`scheduler_id`): it runs their instances, meters
them, reaps them at TTL or idle, and recovers their crashed instances, all with the same
`SessionManager` as `hutch serve`. Gateways reach it two ways, both authenticated by the node
key (a keyed hash of the cluster's secret, which lives in MetaDB):

- the data plane: a gateway forwards a client's request as it is, plus `x-hutch-session: <row id>`;
  the node proxies it to the session's instance (`hutch.gateway.proxy`), counting it as activity.
  A session this node does not hold is answered 421 with `x-hutch-misdirected`, so the gateway
  drops its cached route and asks MetaDB where the session lives now.
- the control plane under `/_node/v1/`: create a session here, adopt a dead node's session,
  end, renew, change its network, and hear of function changes (warm pools).

Liveness is a lease: the node writes its heartbeat (and free capacity) to MetaDB every
`heartbeat_interval`; gateways treat a node whose heartbeat is older than `lease_seconds` as
dead and move its sessions to live nodes (`adopt`: one compare-and-set in MetaDB, a new instance
on the same shared workspace, `epoch` + 1). A node that cannot renew its heartbeat for half a
lease fences itself: it stops serving, because its sessions may be about to move. When it can
write again it reconciles with MetaDB first: sessions that moved or ended elsewhere are dropped
and their instances stopped (their workspaces kept), so a node that comes back never serves a
stale binding.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hutch.api.auth import api_key_of
from hutch.cluster.wire import (
    CONTROL_PREFIX,
    HOP_HEADERS,
    MISDIRECTED_HEADER,
    MISDIRECTED_STATUS,
    NODE_KEY_HEADER,
    PORT_HEADER,
    SESSION_HEADER,
    node_key,
    session_to_wire,
    tenant_from_wire,
)
from hutch.errors import HutchError, InvalidArgument, NotFound, Unauthenticated, Unavailable
from hutch.functions import FunctionSpec
from hutch.gateway.invoke import HeaderView
from hutch.gateway.proxy import proxy_http
from hutch.gateway.types import Header, Receive, Scope, Send, Target
from hutch.gateway.upstream import UpstreamPool
from hutch.gateway.websocket import proxy_websocket, refuse_with_error
from hutch.lifespan import run_lifespan
from hutch.metadb.records import SchedulerRecord, SessionRecord
from hutch.scheduler.sessions import SessionManager

if TYPE_CHECKING:
    from hutch.config import ServerConfig
    from hutch.metadb.base import MetaDB
    from hutch.metrics import Metrics
    from hutch.tenants import TenantService

log = logging.getLogger(__name__)


class NodeHost(Protocol):
    """What a node uses of the process it runs in (`hutch.server.Hutch`, role `node`)."""

    @property
    def config(self) -> ServerConfig: ...
    @property
    def metadb(self) -> MetaDB: ...
    @property
    def tenants(self) -> TenantService: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def secret(self) -> bytes: ...
    @property
    def manager(self) -> SessionManager | None:
        """This host's sessions, once started."""
        ...

    async def start(self) -> object: ...
    async def stop(self) -> None: ...


# -- liveness -----------------------------------------------------------------------------------


def check_lease(interval: float, lease_seconds: float) -> None:
    if interval <= 0 or lease_seconds <= 2 * interval:
        raise InvalidArgument("the lease must be longer than two heartbeat intervals")


class Lease:
    """This node's heartbeat in MetaDB, and whether it may still serve (not fenced)."""

    def __init__(
        self, metadb: MetaDB, sessions: SessionManager, address: str, interval: float, lease_seconds: float
    ) -> None:
        check_lease(interval, lease_seconds)
        self.metadb = metadb
        self.sessions = sessions
        self.scheduler = sessions.scheduler
        self.address = address
        self.interval = interval
        self.lease_seconds = lease_seconds
        self._last_renewed = 0.0  # monotonic time of the last heartbeat MetaDB took
        self._fenced = True  # until the first heartbeat and reconciliation
        self._task: asyncio.Task[Any] | None = None

    @property
    def fenced(self) -> bool:
        return self._fenced or time.monotonic() - self._last_renewed > self.lease_seconds / 2

    async def start(self) -> None:
        await self.beat()
        self._task = asyncio.create_task(self._loop(), name="node-lease")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def beat(self) -> None:
        was_fenced = self.fenced
        scheduler = self.scheduler
        capacity = {
            "max_instances": scheduler.max_instances,
            "instances": len(scheduler.runtime.instances()),
            "sessions": len(self.sessions.active_sessions()),
        }
        await self.metadb.upsert_scheduler(SchedulerRecord(scheduler.scheduler_id, self.address, time.time(), capacity))
        if was_fenced:
            # Before serving again: drop what moved or ended while we could not see MetaDB.
            await self.sessions.reconcile()
        self._last_renewed = time.monotonic()
        if self._fenced:
            log.info("node %s: lease held, serving", scheduler.scheduler_id)
        self._fenced = False

    async def _loop(self) -> None:
        last_sweep = 0.0
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.beat()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.fenced and not self._fenced:
                    log.warning("node: MetaDB unreachable for half a lease: fenced (%s)", exc)
                    self._fenced = True
                elif not self.fenced:
                    log.warning("node: heartbeat failed: %s", exc)
                continue
            if time.monotonic() - last_sweep >= self.lease_seconds:
                last_sweep = time.monotonic()
                try:
                    await self.sweep_dead_nodes()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("node: ending dead nodes' expired sessions")

    async def sweep_dead_nodes(self) -> None:
        """End dead nodes' sessions that expired or went idle. One node does it (the first live
        one by id) so that nodes do not race for the same rows (the compare-and-set would make
        that safe, only wasteful)."""
        scheduler = self.scheduler
        now = time.time()
        live = {
            record.scheduler_id
            for record in await self.metadb.list_schedulers()
            if now - record.heartbeat_at < self.lease_seconds
        }
        if min(live | {scheduler.scheduler_id}) == scheduler.scheduler_id:
            await self.sessions.reap_orphans(live)


# -- the ASGI app -------------------------------------------------------------------------------


class NodeApp:
    def __init__(self, hutch: NodeHost, address: str) -> None:
        self.hutch = hutch
        self.address = address
        settings = hutch.config.cluster
        check_lease(settings.heartbeat_interval, settings.lease_seconds)
        self.pool = UpstreamPool()
        self.head_timeout = hutch.config.gateway.head_timeout
        self.sessions: SessionManager  # these two are set by `start`, before any request
        self.lease: Lease
        self._key = b""
        self.control = Starlette(
            routes=[
                Route(CONTROL_PREFIX + "sessions", self._create, methods=["POST"]),
                Route(CONTROL_PREFIX + "sessions/{row_id}/adopt", self._adopt, methods=["POST"]),
                Route(CONTROL_PREFIX + "sessions/{row_id}/end", self._end, methods=["POST"]),
                Route(CONTROL_PREFIX + "sessions/{row_id}/renew", self._renew, methods=["POST"]),
                Route(CONTROL_PREFIX + "sessions/{row_id}/network", self._network, methods=["POST"]),
                Route(CONTROL_PREFIX + "sessions/{row_id}/sleep", self._sleep, methods=["POST"]),
                Route(CONTROL_PREFIX + "sessions/{row_id}/wake", self._wake, methods=["POST"]),
                Route(CONTROL_PREFIX + "functions", self._function_changed, methods=["POST"]),
            ],
            exception_handlers={HutchError: self._error, Exception: self._unexpected},
        )

    # lifespan

    async def start(self) -> None:
        await self.hutch.start()
        manager = self.hutch.manager
        if manager is None:
            raise Unavailable("hutch node runs no sessions: is its role `node`?")
        self.sessions = manager
        self._key = node_key(self.hutch.secret).encode()
        manager.on_end.append(lambda s: self.pool.drop_instance(s.instance_id))
        manager.on_quiesce.append(self.pool.cut_instance)
        settings = self.hutch.config.cluster
        self.lease = Lease(
            self.hutch.metadb, manager, self.address, settings.heartbeat_interval, settings.lease_seconds
        )
        await self.lease.start()

    async def stop(self) -> None:
        await self.lease.close()
        self.pool.close()
        await self.hutch.stop()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        # A gateway's forwarded request names its session; any path is the instance's then.
        forwarded = any(name == SESSION_HEADER for name, _ in scope["headers"])
        if not forwarded and scope["path"] == "/health" and kind == "http":
            await self._health(send)
            return
        try:
            if not forwarded and scope["path"] == "/metrics" and kind == "http":
                await self._metrics(scope, send)
                return
            self._authenticate(scope["headers"])
            if self.lease.fenced:
                raise Unavailable("this node lost its lease on MetaDB and serves nothing until it is back")
            if forwarded:
                await self._forward(scope, receive, send)
            elif scope["path"].startswith(CONTROL_PREFIX) and kind == "http":
                await self.control(scope, receive, send)
            else:
                raise NotFound(f"no {scope['path']} on a node: gateways send requests with x-hutch-session")
        except HutchError as exc:
            await self._refuse(scope, send, exc)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await run_lifespan(receive, send, self.start, self.stop, "hutch node")

    async def _health(self, send: Send) -> None:
        body = {
            "status": "fenced" if self.lease.fenced else "ok",
            "node": self.sessions.scheduler.scheduler_id,
            "activeSessions": len(self.sessions.active_sessions()),
        }
        await _send_json(send, 503 if self.lease.fenced else 200, body)

    async def _metrics(self, scope: Scope, send: Send) -> None:
        """This host's sessions, instances, warm pools and usage for Prometheus (a gateway's
        `/metrics` has only what gateways see); an admin key unless `metrics_public`, as there."""
        from prometheus_client import CONTENT_TYPE_LATEST

        hutch = self.hutch
        if not hutch.config.metrics_public:
            hutch.tenants.require_admin(await hutch.tenants.authenticate(api_key_of(HeaderView(scope["headers"]))))
        body = hutch.metrics.render()
        headers = [(b"content-type", CONTENT_TYPE_LATEST.encode()), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _authenticate(self, headers: list[Header]) -> None:
        for name, value in headers:
            if name == NODE_KEY_HEADER:
                if self._key and hmac.compare_digest(value, self._key):
                    return
                break
        raise Unauthenticated("a node answers only gateways of its cluster (x-hutch-node-key)")

    async def _refuse(self, scope: Scope, send: Send, exc: HutchError, extra: list[Header] | None = None) -> None:
        if scope["type"] == "websocket":
            await refuse_with_error(scope, send, exc, exc.to_dict())
        else:
            await _send_json(send, exc.http_status, exc.to_dict(), extra)

    # data plane

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        sessions = self.sessions
        row_id = port = None
        for name, value in scope["headers"]:
            if name == SESSION_HEADER:
                row_id = value.decode("latin-1")
            elif name == PORT_HEADER:
                port = int(value) if value.isdigit() else None
        if row_id is None:
            raise InvalidArgument("no x-hutch-session header: nodes serve gateways, not clients")
        session = await sessions.held(row_id)
        if session is None:
            # 421: the gateway's route is stale (the session moved or ended); it asks MetaDB again.
            gone = {"code": "misdirected", "message": f"session {row_id} is not on this node"}
            if scope["type"] == "websocket":
                await refuse_with_error(
                    scope, send, NotFound(gone["message"]), gone, MISDIRECTED_STATUS, [(MISDIRECTED_HEADER, b"1")]
                )
            else:
                await _send_json(send, MISDIRECTED_STATUS, gone, [(MISDIRECTED_HEADER, b"1")])
            return
        route = await sessions.route(session)
        raw: bytes = scope.get("raw_path") or scope["path"].encode("latin-1")
        query: bytes = scope.get("query_string", b"")
        target = Target(
            session=route.session,
            address=route.socket_path,
            pool_key=(route.session.instance_id or "", port),
            path=raw + b"?" + query if query else raw,
            drop=HOP_HEADERS,
        )
        sessions.activity.begin(row_id)
        try:
            if scope["type"] == "http":
                await proxy_http(
                    self.pool, target, scope, receive, send, head_timeout=self.head_timeout, reroute=self._reroute
                )
            else:
                await proxy_websocket(target, scope, receive, send)
        finally:
            sessions.activity.end(row_id)

    async def _reroute(self, target: Target) -> Target:
        sessions = self.sessions
        self.pool.drop_instance(target.pool_key[0])
        route = await sessions.reroute(target.session)
        target.session = route.session
        target.address = route.socket_path
        target.pool_key = (route.session.instance_id or "", target.pool_key[1])
        return target

    # control plane

    async def _create(self, request: Request) -> JSONResponse:
        body = await _json(request)
        sessions = self.sessions
        record, created = await sessions.create(
            tenant_from_wire(body["tenant"]),
            body["function"],
            session_id=body.get("sessionId"),
            affinity=body.get("affinity", "API"),
            ttl_s=body.get("ttlSeconds"),
            idle_timeout_s=body.get("idleTimeoutSeconds"),
            env=body.get("env"),
            metadata=body.get("metadata"),
            with_token=bool(body.get("withToken")),
            existing_ok=bool(body.get("existingOk")),
            network=body.get("network"),
            traffic=body.get("traffic"),
            lifecycle=body.get("lifecycle"),
        )
        return JSONResponse({"session": session_to_wire(record), "created": created})

    async def _adopt(self, request: Request) -> JSONResponse:
        body = await _json(request)
        sessions = self.sessions
        record = await sessions.adopt(request.path_params["row_id"], body["from"])
        return JSONResponse({"session": session_to_wire(record)})

    async def _end(self, request: Request) -> JSONResponse:
        body = await _json(request)
        sessions = self.sessions
        session = await self._held(request)
        ended = await sessions.end(session, body.get("reason", "deleted"))
        return JSONResponse({"session": session_to_wire(ended) if ended else None})

    async def _renew(self, request: Request) -> JSONResponse:
        body = await _json(request)
        sessions = self.sessions
        updated = await sessions.renew(
            await self._held(request), body.get("ttlSeconds"), body.get("idleTimeoutSeconds")
        )
        return JSONResponse({"session": session_to_wire(updated)})

    async def _network(self, request: Request) -> JSONResponse:
        body = await _json(request)
        sessions = self.sessions
        updated = await sessions.set_network(await self._held(request), body["policy"])
        return JSONResponse({"session": session_to_wire(updated)})

    async def _sleep(self, request: Request) -> JSONResponse:
        body = await _json(request)
        updated, changed = await self.sessions.sleep(
            await self._held(request), bool(body.get("paused", True)), bool(body.get("memory", True))
        )
        return JSONResponse({"session": session_to_wire(updated), "changed": changed})

    async def _wake(self, request: Request) -> JSONResponse:
        body = await _json(request)
        updated, changed = await self.sessions.wake(await self._held(request), body.get("ttlSeconds"))
        return JSONResponse({"session": session_to_wire(updated), "changed": changed})

    async def _function_changed(self, request: Request) -> Response:
        body = await _json(request)
        sessions = self.sessions
        spec = FunctionSpec.model_validate(body["spec"]) if body.get("spec") is not None else None
        sessions.function_changed(body["tenantId"], spec, body["name"])
        return Response(status_code=204)

    async def _held(self, request: Request) -> SessionRecord:
        sessions = self.sessions
        session = sessions.active_by_row(request.path_params["row_id"])
        if session is None:
            raise NotFound(f"session {request.path_params['row_id']} is not on this node")
        return session

    async def _error(self, request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HutchError)
        return JSONResponse(exc.to_dict(), status_code=exc.http_status)

    async def _unexpected(self, request: Request, exc: Exception) -> JSONResponse:
        log.exception("node control %s failed", request.url.path)
        return JSONResponse({"code": "internal", "message": f"internal error: {exc.__class__.__name__}"}, 500)


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise InvalidArgument("the body must be JSON") from None
    if not isinstance(body, dict):
        raise InvalidArgument("the body must be a JSON object")
    return body


async def _send_json(send: Send, status: int, body: dict[str, Any], extra: list[Header] | None = None) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": data})
