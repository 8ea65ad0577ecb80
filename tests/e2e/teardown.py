"""Remove whatever a stopped (or killed) test server left on the host: `hutch cleanup`'s work."""

from __future__ import annotations

from pathlib import Path

from hutch.runtime.cleanup import cleanup


def stop_leftover_instances(data_dir: Path, store=None) -> list[str]:
    """What `hutch cleanup --data-dir` removes (the server must be stopped). `store` is not
    needed: a shared store's workspaces live on its mount, which the caller removes."""
    if not data_dir.exists():
        return []
    return cleanup(data_dir, wait_s=30)
