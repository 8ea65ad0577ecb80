"""The composition root of `hutch serve`: every component made once, wired, started, stopped.

One class for the three roles (`Role`): `hutch serve` is all of them in one process;
`hutch gateway` stops after step 3 with `ClusterSessions` (sessions live on nodes), and
`hutch node` skips step 2 and runs steps 4-5 for this host only, behind
`hutch.cluster.node.NodeApp`. The two split roles need PostgreSQL as MetaDB.

Start order (each step needs the ones before):
1. MetaDB opened and migrated; the server secret (keyed hash of session ids) read or created.
2. The default tenant and its key (printed once, or taken from HUTCH_API_KEY).
3. The built-in functions written to MetaDB (with any pool sizes from the config).
4. Workspace store, runtime, scheduler; the session manager loads Active sessions, adopts the
   instances that survived a restart, recovers or cleans up the rest, resumes their metering
   and starts its loops (reaper, activity flush, metering samples).
5. The Prometheus metrics start observing the session manager and the scheduler.

A process that runs instances (`serve`, `node`) holds `<data>/serve.lock` from step 4 on: a
second one on the same data directory is refused, and so is `hutch cleanup`; the deadline keeper
(`hutch.runtime.keeper`) reads it to know whether a hutch is alive.

Stop (SIGTERM, SIGINT), in order:
1. the loops stop and activity is flushed;
2. by default every Active session ends (reason `shutdown`: its usage record finished, its
   instance stopped), then the warm pools' instances stop, and the runtime removes what they
   shared on the host (the network table, the host binds, cgroup parents) and stops the keeper;
   a last `clean_host` pass removes anything left and says so. With `live_restore = true`,
   sessions are sampled and their usage written instead, and their instances run on for the next
   start to adopt (each still ends at its session's deadline, held by the keeper);
3. MetaDB is closed and the serve lock let go.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import re
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from hutch.cluster.gateway import ClusterSessions
from hutch.config import ServerConfig
from hutch.errors import InvalidArgument
from hutch.functions import BUILTIN_FUNCTIONS, BUILTIN_TENANT
from hutch.metadb import open_metadb
from hutch.metadb.postgres import PostgresMetaDB
from hutch.metadb.records import FunctionRecord
from hutch.metrics import Metrics
from hutch.runtime.cleanup import clean_host
from hutch.runtime.keeper import hold_serve_lock, release_serve_lock, stop_keeper
from hutch.runtime.multi import MultiRuntime
from hutch.runtime.network import Networking, layout_for
from hutch.runtime.userns import UidSlots
from hutch.scheduler.interface import Sessions
from hutch.scheduler.metering import Meter
from hutch.scheduler.scheduler import Scheduler
from hutch.scheduler.sessions import SessionManager
from hutch.storage.local import DirectoryStore, ImageStore
from hutch.storage.shared import default_node_id, open_shared_store
from hutch.templates.service import TemplateService
from hutch.templates.store import TemplateStore
from hutch.tenants import TenantService

log = logging.getLogger(__name__)


class Role(enum.StrEnum):
    ALL = "all"  # `hutch serve`: gateway, API and node in one process, on any MetaDB
    GATEWAY = "gateway"  # `hutch gateway`: gateway and API; sessions live on nodes
    NODE = "node"  # `hutch node`: the scheduler and instances of this host


@dataclass(frozen=True, slots=True)
class Started:
    """What `Hutch.start` made, typed as the role has it. The composition roots (`hutch.asgi`,
    `hutch.cluster.node`) hand each component the parts it uses, so nothing downstream asks
    whether the server has started."""

    sessions: Sessions  # what the gateway and the API use, in every role
    manager: SessionManager | None  # this host's sessions (`serve`, `node`)
    scheduler: Scheduler | None  # this host's instances (`serve`, `node`)
    templates: TemplateService | None  # root file systems (`serve`, `node`)


class Hutch:
    def __init__(self, config: ServerConfig, default_api_key: str | None = None, role: Role = Role.ALL) -> None:
        self.config = config
        self.role = role
        self.default_api_key = default_api_key
        self.data_dir = Path(config.data_dir)
        self.metadb = open_metadb(config.metadb_url, self.data_dir)
        if role != Role.ALL and not isinstance(self.metadb, PostgresMetaDB):
            raise InvalidArgument(
                f"`hutch {role.value}` shares its MetaDB with the rest of the cluster: "
                'set metadb_url = "postgresql://…" (SQLite serves one `hutch serve` only)'
            )
        self.tenants = TenantService(self.metadb)
        self.metrics = Metrics()
        self.scheduler: Scheduler | None = None
        self.templates: TemplateService | None = None  # root file systems (not on a gateway)
        self.sessions: Sessions | None = None  # what the gateway and the API use
        self.manager: SessionManager | None = None  # this host's sessions (not on a gateway)
        self.secret = b""  # the cluster's secret: keyed hashes of session ids, the node key
        self.started_at = 0.0
        self.bootstrap_key: str | None = None
        self.holds_lock = False

    async def start(self) -> Started:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o755)  # sandboxes are set up under unprivileged uids: they must reach it
        await self.metadb.open()
        secret = await self.metadb.set_setting_if_absent("session_secret", secrets.token_hex(32))
        self.secret = bytes.fromhex(secret)
        if self.role != Role.NODE:
            self.bootstrap_key = await self.tenants.bootstrap(self.default_api_key)
        now = time.time()
        for spec in BUILTIN_FUNCTIONS:
            size = self.config.warm_pools.get(spec.name, spec.warm_pool_size)
            spec = spec.model_copy(update={"warm_pool_size": size})
            await self.metadb.put_function(FunctionRecord(BUILTIN_TENANT, spec.name, spec.wire(), now, now))
        if self.role == Role.GATEWAY:
            cluster = self.config.cluster
            gateway = ClusterSessions(self.metadb, self.secret, cluster.lease_seconds, cluster.directory_refresh)
            self.sessions = gateway
            await gateway.start()
            self.started_at = time.time()
            return Started(gateway, None, None, None)
        await asyncio.to_thread(hold_serve_lock, self.data_dir)
        self.holds_lock = True
        scheduler_id = self.node_id()
        store = self._store(scheduler_id)
        # One runtime per backend the functions use (gVisor's made on first use); shared uid slots.
        runtime = MultiRuntime(
            self.data_dir,
            store,
            UidSlots(first_uid=self.config.uid_base),
            options={
                "kubernetes": self.config.kubernetes.model_dump(),
                "bwrap": {
                    "criu": self.config.criu or None,
                    "compress": self.config.hibernation.compress,
                },
            },
            networking=self._networking(),
            warm_lease_s=self.config.warm_lease,
        )
        templates_config = self.config.templates
        template_store = TemplateStore(templates_config.dir or self.data_dir / "templates")
        for scrap in template_store.sweep():
            log.warning("removed %s", scrap)
        templates = self.templates = TemplateService(
            template_store,
            templates_config,
            in_use=lambda: {i.spec.rootfs.template for i in runtime.instances() if i.spec.rootfs is not None},
            runtime=runtime,
        )
        scheduler = self.scheduler = Scheduler(
            scheduler_id,
            runtime,
            self.metadb,
            max_instances=self.config.max_instances,
            address=self.config.cluster.advertise if self.role == Role.NODE else "local",
            templates=templates,
        )
        templates.on_ready = scheduler.recycle_warm
        metering = self.config.metering
        meter = Meter(
            self.metadb,
            scheduler,
            sample_interval=metering.sample_interval,
            bucket_seconds=metering.bucket_seconds,
            busy_cpu_fraction=metering.busy_cpu_fraction,
            metrics_keep_s=metering.metrics_keep_seconds,
        )
        manager = SessionManager(
            self.metadb,
            scheduler,
            self.secret,
            reap_interval=self.config.reap_interval,
            meter=meter,
            cluster=self.role == Role.NODE,
        )
        manager.paused_retention_s = self.config.paused_retention
        self.sessions = self.manager = manager
        await manager.start()
        self.metrics.attach(manager, scheduler)
        templates.prepare_builtins()
        self.started_at = time.time()
        return Started(manager, manager, scheduler, templates)

    def node_id(self) -> str:
        """The scheduler id of this host in MetaDB. `hutch serve`'s derives from the data dir alone
        (one per host); a cluster node's is configured, or made unique with the host name."""
        digest = hashlib.sha256(str(self.data_dir.resolve()).encode()).hexdigest()[:8]
        if self.role == Role.ALL:
            return "local-" + digest
        if self.config.cluster.node_id:
            return self.config.cluster.node_id
        host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()).lstrip(".-") or "host"
        return f"{host}-{digest}"[:128]

    def _networking(self) -> Networking:
        """Instance networks with the configured subnet (or one derived from the data dir)."""
        settings = self.config.network
        return Networking(layout_for(self.data_dir, settings.subnet), static_hosts=settings.hosts)

    def _store(self, scheduler_id: str):
        root = self.data_dir / "workspaces"
        kind = self.config.workspace_store
        if kind == "shared":
            shared = self.config.shared_storage
            assert shared.path is not None  # the config's validator says so
            return open_shared_store(
                shared.path,
                shared.node_id or default_node_id(scheduler_id),
                self.data_dir,
                juicefs_meta_url=shared.juicefs_meta_url,
                juicefs_cache_dir=shared.juicefs_cache_dir,
                juicefs_mount_options=shared.juicefs_mount_options,
            )
        if kind == "image" or (kind == "auto" and ImageStore.available()):
            return ImageStore(root)
        return DirectoryStore(root)

    async def stop(self) -> None:
        """The stop sequence of the module docstring."""
        clean = not self.config.live_restore
        if self.templates is not None:
            await self.templates.close()  # builds in progress end; their sandboxes go below
        if isinstance(self.sessions, SessionManager):
            await self.sessions.close(end_sessions=clean)
        elif self.sessions is not None:
            await self.sessions.close()
        if self.scheduler is not None:
            await self.scheduler.close(stop_instances=clean)
            if clean:
                await asyncio.to_thread(stop_keeper, self.data_dir)
                left = await asyncio.to_thread(clean_host, self.data_dir)
                if left:
                    log.warning("removed at stop what instances left: %s", ", ".join(left))
        await self.metadb.close()
        if self.holds_lock:
            release_serve_lock(self.data_dir)
            self.holds_lock = False
