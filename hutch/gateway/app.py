"""The gateway (pure ASGI). Being written: see the session-affinity issue."""

from __future__ import annotations


class Gateway:
    def __init__(self, hutch) -> None:
        self.hutch = hutch

    def claims(self, scope) -> bool:
        return False

    async def __call__(self, scope, receive, send) -> None:  # pragma: no cover - not routed yet
        raise NotImplementedError
