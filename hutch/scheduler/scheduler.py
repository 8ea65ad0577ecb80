"""The scheduler of one host: its instances, its warm pools, allocation and release.

- Warm pools: per function (`pool_key` = "<tenant>/<function>"), instances started ahead with the
  function's settings and a fresh workspace; a background task keeps each pool at its size.
- `allocate`: a new session takes a warm instance (its fresh workspace is renamed to the
  session's key, session env is pushed with `/init`) or, if the pool is empty or the session
  already has a workspace (recovery, reuse of a kept one), starts one with that workspace.
- `release`: stops the instance, keeping the workspace if asked.
- Crash tracking: the runtime reports instances that die; `is_live` is what the gateway checks
  on every request (a dict lookup). Every `health_interval` the runtime is asked which live
  instances can no longer work (`Runtime.broken`: a workspace that failed when the host's disk
  filled up); once the host has room again each is killed, and so replaced like a crashed one.

It knows nothing of HTTP, tenants or affinity: `hutch.scheduler.sessions` drives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from hutch.errors import CapacityError, FailedPrecondition, HutchError, IsolationError, Unavailable
from hutch.functions import FunctionSpec
from hutch.metadb.base import MetaDB
from hutch.metadb.records import InstanceRecord, InstanceRole, SchedulerRecord
from hutch.runtime.base import HibernationImage, Instance, InstanceSpec, InstanceState, Runtime
from hutch.runtime.channel import AgentChannel
from hutch.templates.model import HOST
from hutch.templates.service import BUILTIN as BUILTIN_TEMPLATES
from hutch.templates.service import TemplateService
from hutch.types import InstanceId

log = logging.getLogger(__name__)

USER_SERVER_TAG = "user-server"  # the agent's tag of a function's `startCommand` process

USER_SERVER_TIMEOUT = 30.0


class Default:
    """The type of DEFAULT: "not given" (the function's), where None means "no network"."""


DEFAULT = Default()


@dataclass
class Pool:
    key: str
    spec: FunctionSpec
    warm: deque[InstanceId]  # of InstanceId, oldest first
    starting: int = 0


class Scheduler:
    def __init__(
        self,
        scheduler_id: str,
        runtime: Runtime,  # `hutch.runtime.multi.MultiRuntime` when functions pick backends
        metadb: MetaDB,
        max_instances: int = 256,
        fill_interval: float = 0.2,
        health_interval: float = 2.0,
        address: str = "local",
        templates: TemplateService | None = None,
    ) -> None:
        """`address`: how gateways reach this scheduler ("local": in the same process)."""
        if max_instances < 1 or fill_interval <= 0 or health_interval <= 0:
            raise ValueError("max_instances, fill_interval and health_interval must be positive")
        self.scheduler_id = scheduler_id
        self.address = address
        self.runtime = runtime
        self.metadb = metadb
        self.max_instances = max_instances
        self.fill_interval = fill_interval
        self.health_interval = health_interval
        self.pools: dict[str, Pool] = {}
        self._pool_event = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._starting = 0
        self._cleanups: set[asyncio.Task[Any]] = set()
        self.on_crash: Callable[[InstanceId], None] | None = None  # for instances that die on their own
        # Root file systems of functions with a template (`hutch.templates`); None: only `host`.
        self.templates: TemplateService | None = templates
        self.stats = {"pool_hits": 0, "pool_misses": 0, "crashes": 0}
        runtime.on_exit = self._on_exit

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> list[Instance]:
        """Adopt the instances that survived a restart; return them (the session layer binds them)."""
        adopted = await self.runtime.adopt_running()
        records = {r.instance_id: r for r in await self.metadb.list_instances(self.scheduler_id)}
        for instance_id in set(records) - {i.instance_id for i in adopted}:
            await self.metadb.delete_instance(instance_id)
        await self._heartbeat()
        return adopted

    def start_pools(self) -> None:
        """Start keeping the warm pools full (after adopted warm instances are back in them)."""
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._fill_pools(), name="pool-filler"),
                asyncio.create_task(self._check_health(), name="instance-health"),
            ]

    async def adopt_warm(self, instance: Instance, pool_key: str) -> bool:
        """Put an adopted, unbound instance back in its pool (if that pool still exists)."""
        pool = self.pools.get(pool_key)
        if pool is None or len(pool.warm) >= pool.spec.warm_pool_size:
            return False
        pool.warm.append(instance.instance_id)
        return True

    async def close(self, stop_instances: bool = False) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if stop_instances:
            # What sessions still hold keeps its workspace; warm instances' fresh ones go.
            await asyncio.gather(
                *(
                    self.release(i.instance_id, keep_workspace=not i.workspace.startswith("_instances/"))
                    for i in self.runtime.instances()
                ),
                return_exceptions=True,
            )
        await self.runtime.close(unstage=stop_instances)

    async def _heartbeat(self) -> None:
        await self.metadb.upsert_scheduler(
            SchedulerRecord(
                scheduler_id=self.scheduler_id,
                address=self.address,
                heartbeat_at=time.time(),
                capacity={"max_instances": self.max_instances, "instances": len(self.runtime.instances())},
            )
        )

    # -- pools ---------------------------------------------------------------------------------

    def set_pool(self, pool_key: str, spec: FunctionSpec) -> None:
        """Keep `spec.warm_pool_size` warm instances of this function (0 removes the pool)."""
        pool = self.pools.get(pool_key)
        if pool is None:
            self.pools[pool_key] = Pool(pool_key, spec, deque())
        else:
            pool.spec = spec
        self._pool_event.set()

    async def drop_pool(self, pool_key: str) -> None:
        pool = self.pools.pop(pool_key, None)
        if pool is not None:
            while pool.warm:
                await self.release(pool.warm.popleft(), keep_workspace=False)

    async def recycle_warm(self, template: str) -> None:
        """Replace the warm instances of the functions booting `template` (it became ready: those
        started before run on the host's system); the filler starts new ones from it."""
        for pool in list(self.pools.values()):
            if pool.spec.template == template:
                while pool.warm:
                    await self.release(pool.warm.popleft(), keep_workspace=False)
        self._pool_event.set()

    def pool_sizes(self) -> dict[str, int]:
        return {key: len(pool.warm) for key, pool in self.pools.items()}

    async def _fill_pools(self) -> None:
        while True:
            try:
                await self._fill_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("filling warm pools")
                await asyncio.sleep(1)
            self._pool_event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._pool_event.wait(), self.fill_interval)

    async def _fill_once(self) -> None:
        for pool in list(self.pools.values()):
            excess = len(pool.warm) - pool.spec.warm_pool_size
            while excess > 0 and pool.warm:
                await self.release(pool.warm.pop(), keep_workspace=False)
                excess -= 1
            while len(pool.warm) + pool.starting < pool.spec.warm_pool_size and self._has_room():
                pool.starting += 1
                try:
                    instance = await self._start(pool.spec, workspace=None)
                except HutchError as exc:
                    log.warning("warm instance for %s failed to start: %s", pool.key, exc)
                    await asyncio.sleep(1)
                    return
                finally:
                    pool.starting -= 1
                if self.pools.get(pool.key) is not pool:  # dropped meanwhile
                    await self.release(instance.instance_id, keep_workspace=False)
                    return
                pool.warm.append(instance.instance_id)
                await self.metadb.put_instance(
                    InstanceRecord(instance.instance_id, self.scheduler_id, pool.key, InstanceRole.WARM, time.time())
                )

    async def _check_health(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            try:
                await self.replace_broken()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("checking instances")

    async def replace_broken(self) -> list[str]:
        """Kill the live instances that can no longer work, once a replacement could start (the
        host has the disk): each then ends as a crash does. Returns their ids."""
        live = [i.instance_id for i in self.runtime.instances() if self.is_live(i.instance_id)]
        broken = await asyncio.to_thread(lambda: {i: self.runtime.broken(i) for i in live})
        broken = {i: why for i, why in broken.items() if why}
        if not broken or not await asyncio.to_thread(self.runtime.disk_room):
            return []
        for instance_id, why in broken.items():
            log.warning("instance %s is replaced: %s", instance_id, why)
            with contextlib.suppress(HutchError):
                await self.runtime.kill(instance_id)
        return list(broken)

    def _has_room(self) -> bool:
        # Hibernated instances hold disk, not RAM or CPU: bounded by their tenants' image quota.
        running = sum(1 for i in self.runtime.instances() if i.state != InstanceState.HIBERNATED)
        return running + self._starting < self.max_instances

    # -- allocation ----------------------------------------------------------------------------

    async def allocate(
        self,
        pool_key: str,
        spec: FunctionSpec,
        workspace: str,
        session_row_id: str,
        env: dict[str, str] | None = None,
        fresh_workspace: bool = True,
        network: dict[str, Any] | None = None,
        memory_image: str | None = None,
    ) -> Instance:
        """An instance for a session. `fresh_workspace`: the session has no workspace yet, so a
        warm instance can be used (its fresh workspace becomes the session's). `network`: the
        session's egress policy, None for loopback only; a warm instance serves only if it has a
        network exactly when the session needs one (its policy is then set at claim).
        `memory_image`: the instance starts from that image on the session's files
        (`hutch.runtime.base.moved_image`) instead of booting."""
        instance = None
        pool = self.pools.get(pool_key)
        usable = pool is not None and (pool.spec.network is None) == (network is None)
        while fresh_workspace and usable and pool is not None and pool.warm:
            candidate = pool.warm.popleft()
            self._pool_event.set()  # refill
            if self.is_live(candidate):
                instance = self.runtime.get(candidate)
                try:
                    await self.runtime.claim_workspace(candidate, workspace)
                    if network is not None and instance.spec.network != network:
                        await self.runtime.set_network(candidate, network)
                    if env:
                        async with AgentChannel(instance.socket_path, timeout=10) as channel:
                            await channel.init(env)
                except HutchError:
                    log.exception("claiming warm instance %s", candidate)
                    await self.release(candidate, keep_workspace=False)
                    instance = None
                    continue
                self.stats["pool_hits"] += 1
                break
        if instance is None:
            self.stats["pool_misses"] += 1
            if not self._has_room():
                raise CapacityError(f"this host runs its maximum of {self.max_instances} instances")
            instance = await self._start(
                spec, workspace=workspace, env=env, network=network, fresh=fresh_workspace, memory_image=memory_image
            )
        try:
            await self.metadb.put_instance(
                InstanceRecord(
                    instance.instance_id, self.scheduler_id, pool_key, InstanceRole.BOUND, time.time(), session_row_id
                )
            )
        except BaseException:
            await self.release(instance.instance_id, keep_workspace=not fresh_workspace)
            raise
        return instance

    async def _start(
        self,
        spec: FunctionSpec,
        workspace: str | None,
        env: dict[str, str] | None = None,
        network: dict[str, Any] | Default | None = DEFAULT,
        fresh: bool = True,
        memory_image: str | None = None,
    ) -> Instance:
        """A new instance of `spec`'s function; `fresh`: its workspace is new (not a session's
        files to boot on); `memory_image`: see `allocate`."""
        rootfs = None
        base_env: dict[str, str] = {}
        if spec.template != HOST:
            if self.templates is not None:
                rootfs = self.templates.rootfs(spec.template)
                base_env = self.templates.env(spec.template)
            elif spec.template not in BUILTIN_TEMPLATES:  # built-ins fall back to the host's system
                raise FailedPrecondition(f"this node has no templates; function {spec.name} needs {spec.template!r}")
        if (
            rootfs is not None
            and rootfs.memory_image is not None
            and (not fresh or not self.runtime.restores_checkpoints(spec.runtime))
        ):
            # A memory snapshot's processes go with its files as they were: a session's own files
            # (a recovery, a wake after a filesystem pause) or a host without CRIU boot afresh.
            rootfs = dataclasses.replace(rootfs, memory_image=None)
        if memory_image is not None:
            if rootfs is None or not self.runtime.restores_checkpoints(spec.runtime):
                raise FailedPrecondition(f"instances of function {spec.name} cannot start from a memory image")
            rootfs = dataclasses.replace(rootfs, memory_image=memory_image)
        restored = rootfs is not None and rootfs.memory_image is not None
        instance_spec = InstanceSpec(
            instance_id=InstanceId(f"i-{uuid.uuid4().hex[:16]}"),
            resources=spec.resources.to_runtime(),
            backend=spec.runtime,
            env={**base_env, **spec.env, **(env or {})},
            rootfs=rootfs,
            workspace=workspace,
            prestart_kernel=spec.prestart_kernel,
            network=(spec.network.to_runtime() if spec.network else None) if isinstance(network, Default) else network,
        )
        self._starting += 1
        try:
            instance = await self.runtime.start(instance_spec)
        finally:
            self._starting -= 1
        try:
            if restored:
                # The snapshot's processes run already; new ones get this instance's environment.
                async with AgentChannel(instance.socket_path, timeout=10) as channel:
                    await channel.init(instance_spec.env)
            elif rootfs is not None and rootfs.start_cmd:
                await self._start_template_command(instance, rootfs.start_cmd, rootfs.ready_cmd, rootfs.user)
            if spec.start_command and spec.port is not None and not restored:  # together or neither (FunctionSpec)
                await self._start_user_server(instance, spec.start_command, spec.port)
        except BaseException:
            await self.release(instance.instance_id, keep_workspace=workspace is not None)
            raise
        return instance

    async def _start_template_command(self, instance: Instance, start: str, ready: str | None, user: str) -> None:
        """E2B's start command of a template, in the background, and its ready command until it
        exits 0 (every second, as E2B polls it)."""
        async with AgentChannel(instance.socket_path, timeout=USER_SERVER_TIMEOUT) as channel:
            await channel.spawn(["/bin/bash", "-l", "-c", start], tag="start-cmd", user=user)
            if not ready:
                return
            deadline = time.monotonic() + USER_SERVER_TIMEOUT
            while True:
                result = await channel.run(ready, user=user, timeout=USER_SERVER_TIMEOUT)
                if result.exit_code == 0:
                    return
                if time.monotonic() > deadline:
                    raise Unavailable(f"the template's ready command never succeeded: {ready[:200]!r}")
                await asyncio.sleep(0.2)

    async def _start_user_server(self, instance: Instance, command: list[str], port: int) -> None:
        """Run the function's server in the background and wait until its port answers."""
        async with AgentChannel(instance.socket_path, timeout=USER_SERVER_TIMEOUT) as channel:
            await channel.spawn(command, tag=USER_SERVER_TAG)
            deadline = time.monotonic() + USER_SERVER_TIMEOUT
            while True:
                try:
                    response = await channel.http.get("/", headers={"E2b-Sandbox-Port": str(port)}, timeout=5)
                    if response.status_code != 503 or "listening" not in response.text:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise Unavailable(f"the function's server did not open port {port} in time")
                await asyncio.sleep(0.02)

    async def release(self, instance_id: InstanceId, keep_workspace: bool) -> bool:
        """Stop an instance; False if this host did not know it (already gone)."""
        for pool in self.pools.values():
            if instance_id in pool.warm:
                pool.warm.remove(instance_id)
        stopped = True
        try:
            await self.runtime.stop(instance_id, keep_workspace=keep_workspace)
        except IsolationError:
            log.exception("stopping instance %s", instance_id)
        except HutchError:
            stopped = False
        try:
            await self.metadb.delete_instance(instance_id)
        except HutchError as exc:  # a stale record is dropped at the next start (`start`)
            log.warning("instance %s: its record stays in MetaDB for now: %s", instance_id, exc.message)
        return stopped

    def set_deadline(self, instance_id: InstanceId, at: float | None) -> None:
        """When an instance ends even if hutch is gone (`Runtime.set_deadline`); None: warm."""
        with contextlib.suppress(HutchError):
            self.runtime.set_deadline(instance_id, at)

    async def freeze(self, instance_id: InstanceId) -> None:
        """Put a session's instance to sleep (`Runtime.freeze`)."""
        await self.runtime.freeze(instance_id)

    async def thaw(self, instance_id: InstanceId) -> None:
        await self.runtime.thaw(instance_id)

    def frozen(self, instance_id: InstanceId) -> bool:
        return self.runtime.frozen(instance_id)

    def can_hibernate(self, instance_id: InstanceId) -> bool:
        """Whether the instance can go to disk with its memory (`Runtime.hibernate`)."""
        return self.runtime.can_hibernate(instance_id)

    def can_checkpoint(self, instance_id: InstanceId) -> bool:
        """Whether the instance's memory and processes can be copied out (`Runtime.checkpoint`)."""
        return self.runtime.can_checkpoint(instance_id)

    async def hibernate(self, instance_id: InstanceId) -> HibernationImage:
        return await self.runtime.hibernate(instance_id)

    async def restore(self, instance_id: InstanceId) -> None:
        await self.runtime.restore(instance_id)

    def hibernated(self, instance_id: InstanceId | None) -> bool:
        """Whether the instance is on disk, waiting for `restore`."""
        if instance_id is None or not self.runtime.has(instance_id):
            return False
        return self.runtime.get(instance_id).state == InstanceState.HIBERNATED

    async def instance_gone(self, instance_id: InstanceId | None) -> None:
        """Nothing answers on an instance's socket although its process was not seen to exit (its
        agent died a moment ago, or alone): end it as a crash, so that `is_live` says so."""
        if instance_id is not None and self.is_live(instance_id):
            await self.runtime.kill(instance_id)

    async def forget_workspace(self, workspace: str) -> None:
        """Delete a workspace whose instance is already gone."""
        await asyncio.to_thread(self.runtime.store.delete, workspace)

    # -- state ---------------------------------------------------------------------------------

    def is_live(self, instance_id: InstanceId | None) -> bool:
        return instance_id is not None and self.runtime.is_running(instance_id)

    def socket_path(self, instance_id: InstanceId) -> Path:
        return self.runtime.get(instance_id).socket_path

    def _on_exit(self, instance: Instance) -> None:
        self.stats["crashes"] += 1
        for pool in self.pools.values():
            if instance.instance_id in pool.warm:
                pool.warm.remove(instance.instance_id)
                self._pool_event.set()
                # Nobody's session lived there: clean it up now.
                task = asyncio.get_running_loop().create_task(self.release(instance.instance_id, keep_workspace=False))
                self._cleanups.add(task)
                task.add_done_callback(self._cleanups.discard)
                return
        if self.on_crash is not None:
            self.on_crash(instance.instance_id)
