"""Snapshots of a session's files: its instance's upper layer (everything the session changed
on its template's root file system, its home included) copied out while the instance is frozen
a moment, so the copy is consistent and the session runs on afterwards. The template service
turns the copy into a layer and a template of its own (`TemplateService.add_snapshot`): new
sessions boot from it with the files, not the memory, of the source (E2B's filesystem snapshot).
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from hutch.errors import FailedPrecondition, IsolationError
from hutch.metadb.records import SessionRecord
from hutch.runtime.base import RootFS
from hutch.scheduler.sleep import SessionSleep


class SessionSnapshots(SessionSleep):
    """Copies a session's files out (see the module docstring)."""

    async def copy_files(self, session: SessionRecord, into: Path) -> RootFS:
        """Copy the session's upper layer into the empty directory `into`; returns the root file
        system the session boots from (its template's layers), which the copy goes on top of.

        Raises:
            FailedPrecondition: the session has ended, sleeps with its instance stopped, or runs
                on the host's system (no root file system of its own to copy).
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
            frozen = current.sleep is not None
            if not frozen:
                await self.scheduler.freeze(instance_id)
            try:
                copied = await asyncio.to_thread(
                    subprocess.run,
                    ["cp", "-a", f"{instance.workspace_path}/upper/.", f"{into}/"],
                    capture_output=True,
                    text=True,
                )
            finally:
                if not frozen:
                    await self.scheduler.thaw(instance_id)
            if copied.returncode != 0:
                raise IsolationError(f"cannot copy the files of {current.session_id}: {copied.stderr.strip()[-500:]}")
        self.log.add(current, "info", "snapshot of its files taken")
        return rootfs
