"""Stop every instance a test server left behind (they outlive the server process by design)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hutch.runtime.multi import MultiRuntime
from hutch.storage.local import DirectoryStore, ImageStore


def stop_leftover_instances(data_dir: Path, store=None) -> None:
    """`store`: the server's workspace store, when it is not the default under the data dir."""
    if not data_dir.exists():
        return

    async def run() -> None:
        made = store or _default_store(data_dir / "workspaces")
        runtime = MultiRuntime(data_dir, made)  # adopts every backend's instances, sweeps leftovers
        for instance in await runtime.adopt_running():
            await runtime.stop(instance.instance_id)
        for backend in runtime.runtimes.values():
            await backend.close(unstage=True)

    asyncio.run(run())


def _default_store(root: Path):
    return ImageStore(root) if ImageStore.available() else DirectoryStore(root)
