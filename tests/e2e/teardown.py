"""Stop every instance a test server left behind (they outlive the server process by design)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hutch.runtime.multi import MultiRuntime
from hutch.storage.local import DirectoryStore, ImageStore


def stop_leftover_instances(data_dir: Path) -> None:
    if not data_dir.exists():
        return

    async def run() -> None:
        root = data_dir / "workspaces"
        store = ImageStore(root) if ImageStore.available() else DirectoryStore(root)
        runtime = MultiRuntime(data_dir, store)  # adopts every backend's instances, sweeps leftovers
        for instance in await runtime.adopt_running():
            await runtime.stop(instance.instance_id)
        for backend in runtime.runtimes.values():
            await backend.close(unstage=True)

    asyncio.run(run())
