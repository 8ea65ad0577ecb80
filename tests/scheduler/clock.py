"""A clock the scheduler tests move by hand (`clock.now += 11`), so TTLs and idle times pass at once."""

from __future__ import annotations

import time


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now
