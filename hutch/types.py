"""Names for the ids that cross component boundaries (one place, so signatures say what they take)."""

from __future__ import annotations

from typing import NewType

InstanceId = NewType("InstanceId", str)  # one sandbox instance ("containerId" on the wire)
SessionId = NewType("SessionId", str)  # the id a client sees (affinity key, E2B sandboxID)
InternalId = NewType("InternalId", str)  # keyed hash of tenant + function + session key
TenantId = NewType("TenantId", str)
SchedulerId = NewType("SchedulerId", str)
