"""Isolation backends, chosen by name.

`BACKENDS` names every backend and where it lives; `make_runtime` imports only the one asked for
(bwrap never loads gVisor's code, and the other way round). A function's `runtime` field is one
of these names; `hutch.runtime.multi.MultiRuntime` holds one runtime per name in use.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hutch.runtime.base import Runtime
    from hutch.runtime.cgroups import CgroupManager
    from hutch.runtime.userns import UidSlots
    from hutch.storage.base import WorkspaceStore

# name -> (module, class)
BACKENDS: dict[str, tuple[str, str]] = {
    "bwrap": ("hutch.runtime.bwrap", "BwrapRuntime"),
    "gvisor": ("hutch.runtime.gvisor", "GVisorRuntime"),
    "kubernetes": ("hutch.runtime.kubernetes.runtime", "KubernetesRuntime"),  # needs the `kubernetes` extra
}
DEFAULT_BACKEND = "bwrap"


def make_runtime(
    name: str,
    data_dir: Path,
    store: WorkspaceStore,
    uid_slots: UidSlots | None = None,
    cgroups: CgroupManager | None = None,
    **options: Any,
) -> Runtime:
    """A new runtime of backend `name`. Runtimes that share a data directory must share
    `uid_slots` too, or two instances could get the same host uids. `options` are the backend's
    own keyword arguments (gVisor: `platform`, `runsc`, `runsc_flags`; Kubernetes: the
    `[kubernetes]` config table, `hutch.config.KubernetesConfig`).

    Raises:
        ValueError: no backend has that name.
        BackendUnavailable: the backend cannot run on this host (a binary or cgroups missing).
    """
    try:
        module_name, class_name = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown runtime {name!r} (available: {', '.join(BACKENDS)})") from None
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(Path(data_dir), store, uid_slots, cgroups, **options)
