"""Recovery and adoption: what a restart finds (Active sessions, surviving instances), the
sessions of a dead node of a cluster, and a node's view made MetaDB's again.
"""

from __future__ import annotations

import logging

from hutch.errors import NotFound
from hutch.functions import BUILTIN_TENANT, FunctionSpec
from hutch.metadb.records import InstanceRole, SessionRecord
from hutch.scheduler.lifecycle import SessionLifecycle
from hutch.types import InstanceId

log = logging.getLogger(__name__)


class SessionRecovery(SessionLifecycle):
    """Sessions and instances taken back at start, or over from a dead node."""

    async def restore(self) -> None:
        """Load functions and Active sessions, adopt surviving instances, and follow the user
        servers of the sessions kept."""
        for tenant in [BUILTIN_TENANT, *[t.tenant_id for t in await self.metadb.list_tenants()]]:
            for record in await self.metadb.list_functions(tenant):
                spec = FunctionSpec.model_validate(record.spec)
                key = self.pool_key(record.tenant_id, spec.name)
                self._specs[key] = spec
                if spec.warm_pool_size:
                    self.scheduler.set_pool(key, spec)
        adopted = {i.instance_id: i for i in await self.scheduler.start()}
        # `hutch serve` takes every Active session (its scheduler id may have changed with the data
        # dir); a node of a cluster only its own: the others are other nodes'.
        mine = self.scheduler.scheduler_id if self.cluster else None
        for session in await self.metadb.active_sessions(mine):
            self._remember(session)
        bound = {s.instance_id for s in self._active.values() if s.instance_id}
        records = {r.instance_id: r for r in await self.metadb.list_instances(self.scheduler.scheduler_id)}
        for instance_id, instance in adopted.items():
            if instance_id in bound:
                continue
            role = records.get(instance_id)
            if (
                role is not None
                and role.role == InstanceRole.WARM
                and await self.scheduler.adopt_warm(instance, role.pool_key)
            ):
                continue
            keep = not instance.workspace.startswith("_instances/")
            await self.scheduler.release(instance_id, keep_workspace=keep)
        log.info("sessions: %d active, %d instances adopted", len(self._active), len(adopted))
        await self.meter.restore(self._active.values())
        for session in self._active.values():
            self._follow_user_server(session, self._specs.get(self.pool_key(session.tenant_id, session.function)))

    # -- a cluster's nodes ---------------------------------------------------------------------

    async def adopt(self, row_id: str, dead_node: str) -> SessionRecord:
        """Take over a session of a dead node (a gateway saw its lease run out): move it here in
        MetaDB (one compare-and-set, `epoch` + 1) and give it an instance on its workspace, which
        a shared store lets this host attach (one restored from its hibernation image, if it was
        hibernated there: `SessionSleep._take_over`). If another node took it first, that node's
        record is returned and nothing happens here.

        Raises:
            NotFound: the session has ended.
        """
        moved = await self.metadb.rehome_session(row_id, dead_node, self.scheduler.scheduler_id, self.clock())
        if moved is None:
            current = await self.metadb.get_session(row_id)
            if not current.active:
                raise NotFound(f"session {current.session_id} has ended")
            return current  # taken by another node (or by us, a moment ago)
        log.warning("session %s: adopted from dead node %s", moved.session_id, dead_node)
        self.log.add(moved, "warn", "moved to this node: its node stopped answering", fromNode=dead_node)
        self._remember(moved)
        await self.meter.restore([moved])
        await self._announce(moved)
        async with self._lock(moved.internal_id):
            return await self._take_over(moved)

    async def reconcile(self) -> None:
        """Make this node's sessions MetaDB's: drop those that moved away or ended while this node
        could not see MetaDB (stopping their instances, keeping workspaces another node may use
        now), and take renewals and network changes made meanwhile."""
        held = {s.row_id: s for s in await self.metadb.active_sessions(self.scheduler.scheduler_id)}
        for session in list(self._active.values()):
            current = held.get(session.row_id)
            if current is not None:
                if current.instance_id == session.instance_id:
                    self._remember(current)
                continue
            async with self._lock(session.internal_id):
                if self._active.get(session.internal_id) is not session:
                    continue
                self._forget(session)
            log.warning("session %s is no longer on this node: its instance stops", session.session_id)
            record = await self.metadb.get_session(session.row_id)
            ours = record.scheduler_id == session.scheduler_id  # ended while still bound here
            if ours and not record.active:
                await self.meter.finish(record)
            else:
                self.meter.drop(record.row_id)  # the node it moved to meters it (and ended it, if so)
            if session.instance_id is not None:
                await self.scheduler.release(session.instance_id, keep_workspace=True)
            if ours and not record.active and not record.persist_workspace:
                await self.scheduler.forget_workspace(record.workspace_key)
            for callback in self.on_end:
                callback(record)

    def _on_crash(self, instance_id: InstanceId) -> None:
        for session in self._active.values():
            if session.instance_id == instance_id:
                log.warning("instance %s of session %s crashed", instance_id, session.session_id)
                self.log.add(session, "error", "instance crashed", instance=instance_id)
                self._spawn(self.meter.instance_down(session.row_id, instance_id))
