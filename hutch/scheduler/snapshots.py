"""Snapshots of a session: its instance's upper layer (everything the session changed on its
template's root file system, its home included) copied out while the instance is frozen a
moment, so the copy is consistent and the session runs on afterwards; with its memory, a
checkpoint of its processes taken in the same frozen moment (`Runtime.checkpoint`). The template
service turns the copy into a layer and a template of its own (`TemplateService.add_snapshot`):
new sessions boot from it with the files of the source (E2B's filesystem snapshot), or start
from the checkpoint with its files and memory too (E2B's snapshot and fork).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

from hutch.errors import FailedPrecondition, HutchError, IsolationError, NotFound, QuotaExceeded, Unimplemented
from hutch.metadb.records import FunctionRecord, SessionRecord, Tenant
from hutch.runtime.base import RootFS
from hutch.scheduler.sleep import SessionSleep
from hutch.templates.model import Template

log = logging.getLogger(__name__)


FORK_PREFIX = "fork-"  # the name of a fork's snapshot and function (a template no one lists)


class SessionSnapshots(SessionSleep):
    """Copies a session's files (and memory) out, and forks it (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._forking: set[str] = set()  # fork snapshots whose sandboxes are being started
        self.on_end.append(self._fork_ended)

    async def fork(
        self, tenant: Tenant, source: SessionRecord, count: int, ttl_s: int | None = None
    ) -> list[SessionRecord | HutchError]:
        """`count` new sessions started from one checkpoint of `source` (frozen a moment; it runs
        on): its memory, processes and files, each with its own id, token, uids, network and
        copy of the files, of a function like the source's. One result per fork: its session, or
        the error its start met. The snapshot (`fork:<session>`, with a function of its name) is
        deleted once no fork of it lives.

        Raises:
            Unimplemented: no template store, or a source that cannot be checkpointed here.
            FailedPrecondition: the source has no running instance (asleep on disk, or ended).
        """
        name = f"{FORK_PREFIX}{secrets.token_hex(6)}"
        self._forking.add(name)
        try:
            await self.snapshot(tenant, source, name, memory=True, kind="fork")
            results: list[SessionRecord | HutchError] = []
            for _ in range(count):
                try:
                    fork, _ = await self.create(
                        tenant,
                        name,
                        affinity=source.affinity,
                        ttl_s=ttl_s if ttl_s is not None else source.ttl_s,
                        idle_timeout_s=source.idle_timeout_s,
                        env=source.env,
                        metadata=source.metadata,
                        with_token=source.access_token is not None,
                        network=source.network,
                        traffic=_own_traffic(source.traffic),
                        lifecycle=source.lifecycle,
                    )
                except HutchError as exc:
                    results.append(exc)
                else:
                    self.log.add(fork, "info", f"forked from {source.session_id}")
                    results.append(fork)
        finally:
            self._forking.discard(name)
            await self.sweep_forks()  # this one, if no fork of it started
        self.log.add(source, "info", f"forked: {sum(isinstance(r, SessionRecord) for r in results)} of {count}")
        return results

    async def snapshot(
        self, tenant: Tenant, source: SessionRecord, name: str, memory: bool, kind: str = "snapshot"
    ) -> Template:
        """A template `name` of the session's files (`memory`: and of its processes, which its
        sandboxes start from), made by `TemplateService.add_snapshot`; the tenant gets a function
        of that name like the source's (its resources, network, kernel), unless it has one.

        Raises:
            Unimplemented: no template store, or a memory snapshot this host cannot take.
            FailedPrecondition: the session has no running instance, or runs on the host's system.
            QuotaExceeded: the checkpoint would pass the tenant's `max_image_disk_mb`.
        """
        templates = self.scheduler.templates
        if templates is None:
            raise Unimplemented("this server has no template store: sessions cannot be snapshotted")
        _, like = await self.function(tenant.tenant_id, source.function)
        template = await templates.add_snapshot(
            name,
            tenant.tenant_id,
            source.session_id,
            lambda into, checkpoint: self.copy_files(source, into, checkpoint),
            memory=memory,
            kind=kind,
        )
        try:
            await self.metadb.get_function(tenant.tenant_id, name)
        except NotFound:
            spec = like.model_copy(
                update={
                    "name": name,
                    "template": name,
                    "warm_pool_size": 0,
                    "description": f"{kind} of {source.session_id}",
                }
            )
            now = time.time()
            await self.metadb.put_function(FunctionRecord(tenant.tenant_id, name, spec.wire(), now, now))
            self.function_changed(tenant.tenant_id, spec, name)
        return template

    def _fork_ended(self, session: SessionRecord) -> None:
        if session.function.startswith(FORK_PREFIX):
            self._spawn(self.sweep_forks())

    async def sweep_forks(self) -> list[str]:
        """Delete the snapshots of forks (`fork:<session>` templates, with their checkpoint and
        the function the forks were sessions of) that no live session uses any more; returns
        their names. Called as a fork's session ends."""
        templates = self.scheduler.templates
        if templates is None:
            return []
        live = {(s.tenant_id, s.function) for s in self.active_sessions()}
        removed = []
        for template in templates.templates():
            if (
                not template.source.startswith("fork:")
                or (template.owner, template.name) in live
                or template.name in self._forking
            ):
                continue
            try:
                templates.delete(template.name)  # refused while an instance still runs of it
                with contextlib.suppress(NotFound):
                    await self.metadb.delete_function(template.owner, template.name)
                self.function_changed(template.owner, None, template.name)
            except HutchError as exc:
                log.warning("the snapshot of fork %s stays for now: %s", template.name, exc.message)
                continue
            removed.append(template.name)
        return removed

    async def copy_files(self, session: SessionRecord, into: Path, checkpoint: Path | None = None) -> RootFS:
        """Copy the session's upper layer into the empty directory `into` (and, with `checkpoint`,
        write its processes and memory there at the same moment); returns the root file system
        the session boots from (its template's layers), which the copy goes on top of.

        Raises:
            FailedPrecondition: the session has ended, sleeps with its instance stopped or on
                disk, or runs on the host's system (no root file system of its own to copy).
            Unimplemented: a `checkpoint` that this backend or instance cannot take.
            IsolationError: the copy or the checkpoint failed (the session runs on as it was).
        """
        async with self._lock(session.internal_id):
            current = self._current(session)
            instance_id = current.instance_id
            if instance_id is None or not self.scheduler.is_live(instance_id):
                raise FailedPrecondition(f"session {current.session_id} has no running instance to snapshot")
            instance = self.scheduler.runtime.get(instance_id)
            rootfs = instance.spec.rootfs
            if rootfs is None:
                raise FailedPrecondition(
                    f"session {current.session_id} runs on the host's system (template 'host'): only sessions "
                    "of a template can be snapshotted"
                )
            if checkpoint is not None and not self.scheduler.can_checkpoint(instance_id):
                raise Unimplemented(
                    f"session {current.session_id} cannot be snapshotted with its memory on this host "
                    "(its backend or a missing CRIU); a filesystem snapshot keeps its files"
                )
            frozen = current.sleep is not None
            if checkpoint is not None:
                over = await self.image_quota_left(current.tenant_id, await self._memory_of(instance_id))
                if over is not None:
                    raise QuotaExceeded(f"no memory snapshot of {current.session_id}: {over}")
                await self._quiesce(current)
            try:
                if not frozen:
                    await self.scheduler.freeze(instance_id)
                copied = await asyncio.to_thread(
                    subprocess.run,
                    ["cp", "-a", f"{instance.workspace_path}/upper/.", f"{into}/"],
                    capture_output=True,
                    text=True,
                )
                if copied.returncode != 0:
                    raise IsolationError(
                        f"cannot copy the files of {current.session_id}: {copied.stderr.strip()[-500:]}"
                    )
                if checkpoint is not None:
                    await self.scheduler.runtime.checkpoint(instance_id, checkpoint)
            finally:
                if not frozen:
                    await self.scheduler.thaw(instance_id)
                if checkpoint is not None:
                    self._unquiesce(current)
        self.log.add(current, "info", f"snapshot of its files{' and memory' if checkpoint else ''} taken")
        return rootfs


def _own_traffic(traffic: dict[str, Any] | None) -> dict[str, Any] | None:
    """A session's rules for host-named traffic, with a token of the fork's own."""
    if traffic is None or not traffic.get("token"):
        return traffic
    return {**traffic, "token": secrets.token_urlsafe(24)}
