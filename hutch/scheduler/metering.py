"""Metering: what every session used, accounted exactly at every boundary and kept in MetaDB.

Per session (`SessionUsage`): active, idle and down seconds; CPU seconds and memory (integrated,
hence average; peak: the cgroup's high-water mark, which for a warm instance includes its
warm-up) from the instance's cgroup; workspace bytes from the store, sampled with the rest; the
allocation times active and idle time. Per tenant and function, the same amounts in time buckets
(`UsageBucket`, `bucket_seconds` long), which is what ranges and charts are summed from. The
cost of any of them is `hutch.pricing.cost`.

**Active**, at any moment, means either
1. at least one request or stream of the session is in flight through the gateway (exact: the
   `ActivityTracker` reports the moment the first begins and the last ends), or
2. the instance is working on its own: over a sampling window (`sample_interval`, 5 s by
   default) it used more CPU than `busy_cpu_fraction` (5 % of one vCPU by default). A command
   or code execution that keeps running after its client left counts so; a user server, a
   Jupyter kernel or a `sleep` that waits does not, however long it waits. The active time of a
   window is `min(window, max(request time, CPU seconds))`: CPU used outside requests adds to
   the active time, counted as the CPU seconds it burnt (never more than the window).
Otherwise the session is **idle** while its instance lives, and **down** while it is dead
(between a crash and the recovery on the next request): nothing is held then, nothing is billed
but the workspace's disk. The CPU seconds of a window with any activity are active CPU; its
memory is active in proportion to its active time. A session is metered from its creation (the
start of its instance on a warm-pool miss counts as idle) to its end.

**Accounting.** Each session has one open window, from `accounted_to` to now. A window is closed
(its amounts added to the session and to its buckets, `accounted_to` moved) at every sample, at a
crash, at a recovery, at the end (with a last sample of the instance before it is stopped), and
once at start-up. Request transitions do not close windows: they are timed exactly inside them.
CPU is a difference of the cgroup's counter from the previous sample of the same instance, so no
CPU second is counted twice or lost while the instance lives (the CPU a crashed instance used
after its last sample is read from its cgroup, which outlives it until the recovery). Memory and
disk are integrated between samples (trapezoids). The amounts of a window are spread over the
buckets it overlaps in proportion to the overlap.

**Persistence and restarts.** Records and bucket sums are written in one transaction after every
sampling round and at every end (`flush`). A restarted `hutch serve` resumes each Active
session's record from `accounted_to`: the gap when no hutch ran is closed with a fresh sample of
the instance (it kept running: idle, or active by the CPU rule; no request could be served),
billed up to the session's deadline (TTL, or idle timeout) and down beyond it; a session whose
instance died in the gap is down for the whole gap (when it died is unknown). A kill -9 of hutch
loses only the request timing of its last unflushed window, which the restart bills as idle;
nothing is counted twice.

**Metric samples.** Every sample of an instance also becomes a `MetricSample` (CPU percent of the
session's vCPUs since the previous sample, memory, workspace bytes), written with the rest and
kept `metrics_keep_s` (24 h by default: the longest life of a sandbox), whether the session still
lives or not: E2B's sandbox metrics and hutch's per-session ones are read from them.

It knows nothing of HTTP or pricing; `hutch.scheduler.sessions` drives it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from hutch.errors import HutchError
from hutch.metadb.base import MetaDB
from hutch.metadb.records import MetricSample, SessionRecord, SessionUsage, UsageAmounts, UsageBucket
from hutch.runtime.base import InstanceStats
from hutch.scheduler.scheduler import Scheduler
from hutch.types import InstanceId

log = logging.getLogger(__name__)

GIB = float(1 << 30)
BucketKey = tuple[str, str, float]  # tenant, function, bucket start


@dataclass
class _Live:
    """A live session's record plus what only memory knows (the open window's request time)."""

    usage: SessionUsage
    up: bool = True  # the instance is alive
    busy_since: float | None = None  # requests in flight since then
    busy_s: float = 0.0  # request time inside the open window, from requests that ended
    cpu_busy: bool = False  # the last closed window was active because of CPU alone
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def copy(self) -> _Live:
        usage = replace(self.usage, amounts=self.usage.amounts.copy())
        return _Live(usage, self.up, self.busy_since, self.busy_s, self.cpu_busy)


class Meter:
    def __init__(
        self,
        metadb: MetaDB,
        scheduler: Scheduler,
        clock: Callable[[], float] = time.time,
        sample_interval: float = 5.0,
        bucket_seconds: float = 60.0,
        busy_cpu_fraction: float = 0.05,
        metrics_keep_s: float = 86400.0,
    ) -> None:
        if sample_interval <= 0 or bucket_seconds <= 0 or busy_cpu_fraction < 0 or metrics_keep_s <= 0:
            raise ValueError(
                "sample_interval, bucket_seconds and metrics_keep_s must be positive, busy_cpu_fraction not negative"
            )
        self.metadb = metadb
        self.scheduler = scheduler
        self.clock = clock
        self.sample_interval = sample_interval
        self.bucket_seconds = float(bucket_seconds)
        self.busy_cpu_fraction = busy_cpu_fraction
        self.metrics_keep_s = metrics_keep_s
        self.totals = UsageAmounts()  # accounted by this process since it started (Prometheus counters)
        self._live: dict[str, _Live] = {}  # session row id -> its record
        self._pending: dict[BucketKey, UsageAmounts] = {}  # bucket amounts not written yet
        self._ended: list[SessionUsage] = []  # final records not written yet
        self._samples: list[MetricSample] = []  # metric samples not written yet
        self._forgotten_at = 0.0  # when old metric samples were last deleted

    # -- the session lifecycle ------------------------------------------------------------------

    async def open(self, session: SessionRecord) -> None:
        """Start metering a new session (bound to its instance): billed from its creation."""
        usage = SessionUsage(
            row_id=session.row_id,
            tenant_id=session.tenant_id,
            function=session.function,
            session_id=session.session_id,
            vcpu=session.cpu,
            memory_mb=session.memory_mb,
            started_at=session.created_at,
            accounted_to=session.created_at,
            instance_id=session.instance_id,
        )
        live = self._live[session.row_id] = _Live(usage)
        async with live.lock:
            stats = await self._stats(usage.instance_id)
            if stats is not None:  # the instance held this much since the session's creation
                usage.memory_bytes, usage.disk_bytes = stats.memory_bytes, stats.workspace_bytes
            self._close(live, self.clock(), stats)  # the baseline: CPU counted from here
        await self._flush_quietly()

    async def restore(self, sessions: Iterable[SessionRecord]) -> None:
        """After a restart: resume the records of the Active sessions and account the gap."""
        sessions = list(sessions)
        records = await self.metadb.usage_of([s.row_id for s in sessions])
        for session in sessions:
            usage = records.get(session.row_id)
            if usage is None:  # hutch died between creating the session and its first write
                usage = SessionUsage(
                    row_id=session.row_id,
                    tenant_id=session.tenant_id,
                    function=session.function,
                    session_id=session.session_id,
                    vcpu=session.cpu,
                    memory_mb=session.memory_mb,
                    started_at=session.created_at,
                    accounted_to=session.created_at,
                )
            usage.ended_at = usage.end_reason = None
            if usage.instance_id != session.instance_id:  # re-bound after the last write: new counter
                usage.instance_id, usage.cpu_base = session.instance_id, None
            live = self._live[session.row_id] = _Live(usage, up=self.scheduler.is_live(session.instance_id))
            async with live.lock:
                stats = await self._stats(usage.instance_id) if live.up else None
                now = self.clock()
                if live.up:
                    billed_to = min(now, max(_deadline(session), usage.accounted_to))
                    self._close(live, billed_to, stats)
                    if billed_to < now:
                        live.up = False
                        self._close(live, now, None)
                        live.up = True
                else:
                    self._close(live, now, None)
        await self.flush()

    def request_state(self, row_id: str, busy: bool, at: float) -> None:
        """`ActivityTracker.on_change`: requests in flight began (busy) or all ended, at `at`."""
        live = self._live.get(row_id)
        if live is None:
            return
        if busy:
            live.busy_since = at
        elif live.busy_since is not None:
            live.busy_s += max(0.0, at - max(live.busy_since, live.usage.accounted_to))
            live.busy_since = None

    async def instance_down(self, row_id: str, instance_id: InstanceId | None) -> None:
        """The session's instance died: account up to now (with its last CPU), then down."""
        live = self._live.get(row_id)
        if live is None:
            return
        async with live.lock:
            if not live.up or live.usage.instance_id != instance_id or row_id not in self._live:
                return
            stats = await self._stats(instance_id)
            self._close(live, self.clock(), stats)
            live.up = False
            live.cpu_busy = False

    async def instance_up(self, session: SessionRecord) -> None:
        """The session got a new instance (recovery): close the down time, take a baseline."""
        live = self._live.get(session.row_id)
        if live is None:
            return
        async with live.lock:
            if live.up:  # replaced without a crash report: account the old instance's window first
                self._close(live, self.clock(), await self._stats(live.usage.instance_id))
            live.up = False
            self._close(live, self.clock(), None)
            live.up = True
            live.usage.instance_id, live.usage.cpu_base = session.instance_id, None
            self._close(live, self.clock(), await self._stats(session.instance_id))

    async def finish(self, ended: SessionRecord) -> SessionUsage | None:
        """The session ended (its instance is not stopped yet): last sample, final record, written."""
        live = self._live.get(ended.row_id)
        if live is None:
            return None
        async with live.lock:
            if self._live.pop(ended.row_id, None) is None:
                return None
            stats = await self._stats(live.usage.instance_id) if live.up else None
            at = max(ended.ended_at or self.clock(), live.usage.accounted_to)
            self._close(live, at, stats)
            live.usage.ended_at = at
            live.usage.end_reason = ended.end_reason
            self._ended.append(live.usage)
        await self._flush_quietly()
        return live.usage

    def drop(self, row_id: str) -> None:
        """Stop metering a session that moved to another node (which meters it from now on)."""
        self._live.pop(row_id, None)

    # -- sampling and writing -------------------------------------------------------------------

    async def sample_once(self) -> None:
        """Sample every live session's instance, close its window, write everything."""
        for row_id, live in list(self._live.items()):
            if not live.up:
                continue
            async with live.lock:
                if self._live.get(row_id) is not live or not live.up:
                    continue
                stats = await self._stats(live.usage.instance_id)
                self._close(live, self.clock(), stats)
        await self.flush()

    async def flush(self) -> None:
        """Write the live records, the ended ones and the bucket amounts, in one transaction."""
        records = [replace(live.usage, amounts=live.usage.amounts.copy()) for live in self._live.values()]
        ended, self._ended = self._ended, []
        pending, self._pending = self._pending, {}
        samples, self._samples = self._samples, []
        buckets = [UsageBucket(t, f, start, amounts) for (t, f, start), amounts in pending.items()]
        try:
            await self.metadb.save_usage(ended + records, buckets, samples)
        except BaseException:
            self._ended = ended + self._ended
            self._samples = samples + self._samples
            for key, amounts in pending.items():
                self._pending.setdefault(key, UsageAmounts()).add(amounts)
            raise
        now = self.clock()
        if now - self._forgotten_at >= min(60.0, self.metrics_keep_s):
            self._forgotten_at = now
            await self.metadb.forget_metric_samples(now - self.metrics_keep_s)

    async def _flush_quietly(self) -> None:
        """`flush` where a failure must not stop a session's start or end (the next flush retries)."""
        try:
            await self.flush()
        except Exception:
            log.exception("writing usage records")

    # -- reading ----------------------------------------------------------------------------------

    def is_metered(self, row_id: str) -> bool:
        return row_id in self._live

    def snapshot(self, row_id: str) -> SessionUsage | None:
        """A live session's record as of now (its open window included, without a new sample)."""
        live = self._live.get(row_id)
        if live is None:
            return None
        copy = live.copy()
        self._close(copy, max(self.clock(), copy.usage.accounted_to), None, sink={}, count=False)
        return copy.usage

    def unflushed(self, tenant_id: str | None = None) -> list[UsageBucket]:
        """Bucket amounts not in MetaDB yet: pending writes and the open windows as of now."""
        sink: dict[BucketKey, UsageAmounts] = {}
        for key, amounts in self._pending.items():
            if tenant_id is None or key[0] == tenant_id:
                sink.setdefault(key, UsageAmounts()).add(amounts)
        now = self.clock()
        for live in self._live.values():
            if tenant_id is None or live.usage.tenant_id == tenant_id:
                copy = live.copy()
                self._close(copy, max(now, copy.usage.accounted_to), None, sink=sink, count=False)
        return [UsageBucket(t, f, start, amounts) for (t, f, start), amounts in sink.items()]

    def state(self, row_id: str) -> str:
        """`active`, `idle` or `down` for a live session; `ended` for any other."""
        live = self._live.get(row_id)
        if live is None:
            return "ended"
        if not live.up:
            return "down"
        return "active" if live.busy_since is not None or live.cpu_busy else "idle"

    def live_records(self) -> list[SessionUsage]:
        return [live.usage for live in self._live.values()]

    # -- the accounting ---------------------------------------------------------------------------

    async def _stats(self, instance_id: InstanceId | None) -> InstanceStats | None:
        if instance_id is None:
            return None
        try:
            return await self.scheduler.runtime.stats(instance_id)
        except (HutchError, OSError, KeyError, ValueError) as exc:
            log.debug("no stats for instance %s: %s", instance_id, exc)
            return None

    def _close(
        self,
        live: _Live,
        at: float,
        stats: InstanceStats | None,
        sink: dict[BucketKey, UsageAmounts] | None = None,
        count: bool = True,
    ) -> None:
        """Close the open window at `at`: add its amounts to the record and the buckets."""
        usage = live.usage
        start = usage.accounted_to
        at = max(at, start)
        length = at - start
        cpu = 0.0
        if stats is not None:
            if usage.cpu_base is not None and stats.cpu_seconds >= usage.cpu_base:
                cpu = stats.cpu_seconds - usage.cpu_base
            usage.cpu_base = stats.cpu_seconds
        amounts = UsageAmounts(cpu_s=cpu)
        if live.up:
            requests = live.busy_s
            if live.busy_since is not None:
                requests += at - max(live.busy_since, start)
            cpu_busy = cpu if cpu > 0 and cpu >= self.busy_cpu_fraction * length else 0.0
            active = min(length, max(requests, cpu_busy))
            idle = length - active
            share = active / length if length > 0 else 0.0
            memory_now = stats.memory_bytes if stats is not None else usage.memory_bytes
            memory = (usage.memory_bytes + memory_now) / 2 / GIB * length
            gib = usage.memory_mb / 1024
            amounts.active_s, amounts.idle_s = active, idle
            amounts.cpu_active_s = cpu if active > 0 or requests > 0 else 0.0
            amounts.memory_gib_s, amounts.memory_active_gib_s = memory, memory * share
            amounts.vcpu_active_s, amounts.vcpu_idle_s = usage.vcpu * active, usage.vcpu * idle
            amounts.memory_alloc_active_gib_s, amounts.memory_alloc_idle_gib_s = gib * active, gib * idle
            if count:
                live.cpu_busy = cpu_busy > requests
        else:
            amounts.down_s = length
        disk_now = stats.workspace_bytes if stats is not None else usage.disk_bytes
        amounts.disk_gib_s = (usage.disk_bytes + disk_now) / 2 / GIB * length
        if stats is not None:
            if count:
                cores = max(1, round(usage.vcpu))
                percent = min(100.0, cpu / length / cores * 100) if length > 0 else 0.0
                self._samples.append(
                    MetricSample(usage.row_id, at, round(percent, 2), stats.memory_bytes, stats.workspace_bytes)
                )
            usage.memory_bytes = stats.memory_bytes
            usage.memory_peak_bytes = max(usage.memory_peak_bytes, stats.memory_peak_bytes, stats.memory_bytes)
            usage.disk_bytes = stats.workspace_bytes
            usage.disk_peak_bytes = max(usage.disk_peak_bytes, stats.workspace_bytes)
            usage.samples += 1
        usage.amounts.add(amounts)
        usage.accounted_to = at
        live.busy_s = 0.0
        self._spread(usage, start, at, amounts, self._pending if sink is None else sink)
        if count:
            self.totals.add(amounts)

    def _spread(
        self, usage: SessionUsage, start: float, end: float, amounts: UsageAmounts, sink: dict[BucketKey, UsageAmounts]
    ) -> None:
        """Add a window's amounts to the buckets it overlaps, in proportion to the overlap."""
        size = self.bucket_seconds
        bucket = math.floor(start / size) * size
        if end <= start:
            sink.setdefault((usage.tenant_id, usage.function, bucket), UsageAmounts()).add(amounts)
            return
        while bucket < end:
            overlap = min(end, bucket + size) - max(start, bucket)
            if overlap > 0:
                key = (usage.tenant_id, usage.function, bucket)
                sink.setdefault(key, UsageAmounts()).add(amounts, overlap / (end - start))
            bucket += size


def _deadline(session: SessionRecord) -> float:
    """When the reaper would have ended a session nobody used (TTL, or idle timeout)."""
    deadline = session.expires_at
    if session.idle_timeout_s > 0:
        deadline = min(deadline, session.last_activity + session.idle_timeout_s)
    return deadline
