"""Several backends behind one `Runtime`: what a scheduler holds when functions pick their own.

`MultiRuntime` makes the runtime of a backend the first time it is needed (gVisor's only when a
function asks for it, or when instances of it survived a restart), starts each instance on the
backend its spec names, and sends every call about an existing instance to the runtime that owns
it. All its runtimes share the data directory, the workspace store and the uid slots (so that no
two instances get the same host uids), and report deaths to the same `on_exit`.

It knows backends only by name (`hutch.runtime.make_runtime`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hutch.errors import NotFound
from hutch.runtime import DEFAULT_BACKEND, make_runtime
from hutch.runtime.base import HibernationImage, Instance, InstanceSpec, InstanceState, InstanceStats, Runtime
from hutch.runtime.network import Networking
from hutch.runtime.userns import UidSlots
from hutch.storage.base import WorkspaceStore
from hutch.types import InstanceId

log = logging.getLogger(__name__)


class MultiRuntime:
    name = "multi"

    def __init__(
        self,
        data_dir: Path,
        store: WorkspaceStore,
        uid_slots: UidSlots | None = None,
        options: dict[str, dict[str, Any]] | None = None,
        default: str = DEFAULT_BACKEND,
        networking: Networking | None = None,
        warm_lease_s: float | None = None,
    ) -> None:
        """`options`: per backend name, the keyword arguments of its runtime. `networking`: the
        instance networks all backends share (made by the first backend that needs one).
        `warm_lease_s`: how long warm instances outlive the last hutch (`hutch.runtime.keeper`)."""
        self.data_dir = Path(data_dir)
        self.networking = networking
        self.store = store
        self.uid_slots = uid_slots or UidSlots()
        self.options = options or {}
        self.runtimes: dict[str, Runtime] = {}
        self.warm_lease_s = warm_lease_s
        self._on_exit: Callable[[Instance], None] | None = None
        self.runtime(default)  # fail early if the default backend cannot run here

    def runtime(self, backend: str) -> Runtime:
        """The runtime of `backend`, made on first use."""
        runtime = self.runtimes.get(backend)
        if runtime is None:
            runtime = make_runtime(
                backend,
                self.data_dir,
                self.store,
                self.uid_slots,
                networking=self.networking,
                **self.options.get(backend, {}),
            )
            if self.networking is None:
                self.networking = runtime.networking = runtime.networking or Networking(runtime.default_layout())  # type: ignore[attr-defined]
            runtime.on_exit = self._on_exit
            if self.warm_lease_s is not None and hasattr(runtime, "warm_lease_s"):
                runtime.warm_lease_s = self.warm_lease_s
            self.runtimes[backend] = runtime
        return runtime

    @property
    def on_exit(self) -> Callable[[Instance], None] | None:
        return self._on_exit

    @on_exit.setter
    def on_exit(self, callback: Callable[[Instance], None] | None) -> None:
        self._on_exit = callback
        for runtime in self.runtimes.values():
            runtime.on_exit = callback

    def _owner(self, instance_id: str) -> Runtime:
        for runtime in self.runtimes.values():
            if runtime.has(instance_id):  # a dict lookup: this is on the request path
                return runtime
        raise NotFound(f"instance {instance_id} not found")

    # -- the Runtime interface -----------------------------------------------------------------

    async def start(self, spec: InstanceSpec) -> Instance:
        return await self.runtime(spec.backend).start(spec)

    async def stop(self, instance_id: InstanceId, keep_workspace: bool = False) -> None:
        await self._owner(instance_id).stop(instance_id, keep_workspace=keep_workspace)

    async def kill(self, instance_id: InstanceId) -> None:
        await self._owner(instance_id).kill(instance_id)

    async def halt(self, instance_id: InstanceId) -> None:
        await self._owner(instance_id).halt(instance_id)

    def broken(self, instance_id: InstanceId) -> str | None:
        for runtime in self.runtimes.values():
            if runtime.has(instance_id):
                return runtime.broken(instance_id)
        return None

    def disk_room(self) -> bool:
        return all(runtime.disk_room() for runtime in self.runtimes.values())

    async def status(self, instance_id: InstanceId) -> InstanceState:
        return await self._owner(instance_id).status(instance_id)

    async def stats(self, instance_id: InstanceId) -> InstanceStats:
        return await self._owner(instance_id).stats(instance_id)

    def get(self, instance_id: InstanceId) -> Instance:
        return self._owner(instance_id).get(instance_id)

    def instances(self) -> list[Instance]:
        return [i for runtime in self.runtimes.values() for i in runtime.instances()]

    def has(self, instance_id: str) -> bool:
        return any(runtime.has(instance_id) for runtime in self.runtimes.values())

    def sweep_orphans(self, live: set[str]) -> list[str]:
        return [item for runtime in self.runtimes.values() for item in runtime.sweep_orphans(live)]

    def is_running(self, instance_id: InstanceId) -> bool:
        return any(runtime.is_running(instance_id) for runtime in self.runtimes.values())

    def set_deadline(self, instance_id: InstanceId, at: float | None) -> None:
        self._owner(instance_id).set_deadline(instance_id, at)

    async def set_network(self, instance_id: InstanceId, policy: dict) -> None:
        await self._owner(instance_id).set_network(instance_id, policy)

    async def freeze(self, instance_id: InstanceId) -> None:
        await self._owner(instance_id).freeze(instance_id)

    async def thaw(self, instance_id: InstanceId) -> None:
        await self._owner(instance_id).thaw(instance_id)

    def frozen(self, instance_id: InstanceId) -> bool:
        return self._owner(instance_id).frozen(instance_id)

    def can_hibernate(self, instance_id: InstanceId | None = None) -> bool:
        if instance_id is None:
            return any(runtime.can_hibernate() for runtime in self.runtimes.values())
        return self._owner(instance_id).can_hibernate(instance_id)

    async def hibernate(self, instance_id: InstanceId) -> HibernationImage:
        return await self._owner(instance_id).hibernate(instance_id)

    async def restore(self, instance_id: InstanceId) -> Instance:
        return await self._owner(instance_id).restore(instance_id)

    def can_checkpoint(self, instance_id: InstanceId) -> bool:
        return self._owner(instance_id).can_checkpoint(instance_id)

    def restores_checkpoints(self, backend: str) -> bool:
        return self.runtime(backend).restores_checkpoints(backend)

    async def checkpoint(self, instance_id: InstanceId, into: Path) -> HibernationImage:
        return await self._owner(instance_id).checkpoint(instance_id, into)

    async def claim_workspace(self, instance_id: InstanceId, key: str) -> None:
        await self._owner(instance_id).claim_workspace(instance_id, key)

    async def adopt_running(self) -> list[Instance]:
        """Adopt with every backend that has instance records here (making its runtime)."""
        for backend in sorted(self._recorded_backends()):
            try:
                self.runtime(backend)
            except Exception as exc:  # a backend gone from this host: its records stay for later
                log.error("cannot adopt %s instances: %s", backend, exc)
        adopted = []
        for runtime in list(self.runtimes.values()):
            adopted += await runtime.adopt_running()
        # Only now is every live instance on this data directory known, whatever its backend.
        live: set[str] = {i.instance_id for i in self.instances()}
        for runtime in self.runtimes.values():
            await asyncio.to_thread(runtime.sweep_orphans, live)
        return adopted

    def _recorded_backends(self) -> set[str]:
        backends = set()
        for record in (self.data_dir / "instances").glob("*/instance.json"):
            try:
                backends.add(json.loads(record.read_text())["backend"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # the owning runtime removes unreadable records
        return backends

    async def close(self, unstage: bool = False) -> None:
        for runtime in self.runtimes.values():
            await runtime.close(unstage=unstage)
