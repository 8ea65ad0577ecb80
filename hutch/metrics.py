"""Prometheus metrics of one `hutch serve`: `GET /metrics` renders `Metrics.registry`.

Each `Hutch` has a registry of its own (never prometheus-client's global one), so several servers
in one process do not mix. Two kinds of metrics:
- observed as they happen: session create latency, gateway request latency by affinity mode
  (from the moment the gateway takes a request until its answer or stream ends, routing and a
  new session's creation included), sessions ended by reason;
- read at scrape time from the components (`_StateCollector`): sessions by state, instances by
  state, warm pools (size, target, hits, misses), instance crashes, and the metered amounts
  (active, idle and down seconds, CPU seconds, memory GiB-seconds since this process started;
  memory and workspace bytes of the live sessions now).

Nothing here carries a tenant's secrets or usage per tenant: labels are states, reasons,
affinity modes and warm-pool keys (`<tenant id>/<function>`). The endpoint asks for an admin key
unless `metrics_public` is set (`hutch.api.usage`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hutch.metadb.records import EndReason
from hutch.runtime.base import InstanceState

if TYPE_CHECKING:
    from hutch.metadb.records import SessionRecord
    from hutch.scheduler.scheduler import Scheduler
    from hutch.scheduler.sessions import SessionManager

SESSION_STATES = ("active", "idle", "down")
INSTANCE_STATES = ("warm", "bound", "starting", "unbound", "crashed")
CREATE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.create_seconds = Histogram(
            "hutch_session_create_seconds",
            "Time to create a session with its instance (warm-pool hit or cold start)",
            buckets=CREATE_BUCKETS,
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "hutch_gateway_request_seconds",
            "Gateway requests from arrival until the answer or stream ended, by session affinity mode",
            ["affinity"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.sessions_ended = Counter(
            "hutch_sessions_ended",
            "Sessions ended, by reason (ttl and idle: reaped by the lifecycle reaper)",
            ["reason"],
            registry=self.registry,
        )
        for reason in EndReason:
            self.sessions_ended.labels(reason.value)  # every reason is exported, at 0 until it happens
        self._by_affinity: dict[str, Histogram] = {}

    def attach(self, sessions: SessionManager, scheduler: Scheduler) -> None:
        """Start observing a started session manager and its scheduler."""
        sessions.on_created.append(self._created)
        sessions.on_end.append(self._ended)
        self.registry.register(_StateCollector(sessions, scheduler))

    def observe_request(self, affinity: str, seconds: float) -> None:
        """One gateway request (the hot path: a dict lookup and an observe, about a microsecond)."""
        child = self._by_affinity.get(affinity)
        if child is None:
            child = self._by_affinity[affinity] = self.request_seconds.labels(affinity)
        child.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def _created(self, session: SessionRecord, seconds: float) -> None:
        self.create_seconds.observe(seconds)

    def _ended(self, session: SessionRecord) -> None:
        self.sessions_ended.labels(session.end_reason or "unknown").inc()


class _StateCollector(Collector):
    def __init__(self, sessions: SessionManager, scheduler: Scheduler) -> None:
        self.sessions = sessions
        self.scheduler = scheduler

    def describe(self) -> list[Metric]:
        return []  # collected at scrape time only (never while registering)

    def collect(self) -> Iterator[Metric]:
        meter = self.sessions.meter
        live = self.sessions.active_sessions()

        states = dict.fromkeys(SESSION_STATES, 0)
        for session in live:
            state = meter.state(session.row_id)
            states[state] = states.get(state, 0) + 1
        family = GaugeMetricFamily("hutch_sessions", "Live sessions by state", labels=["state"])
        for state, count in states.items():
            family.add_metric([state], count)
        yield family

        asleep = {(how, why): 0 for how in ("frozen", "hibernated", "stopped") for why in ("paused", "idle")}
        for session in live:
            if session.sleep:
                how_why = (str(session.sleep["state"]), "paused" if session.paused else "idle")
                asleep[how_why] = asleep.get(how_why, 0) + 1
        family = GaugeMetricFamily(
            "hutch_sessions_asleep",
            "Live sessions asleep: frozen (memory kept in RAM), hibernated (memory on disk) or stopped (files "
            "only); paused by their owner or idle",
            labels=["how", "why"],
        )
        for (how, why), count in asleep.items():
            family.add_metric([how, why], count)
        yield family

        warm = {i for pool in self.scheduler.pools.values() for i in pool.warm}
        bound = {s.instance_id for s in live}
        instances = dict.fromkeys(INSTANCE_STATES, 0)
        for instance in self.scheduler.runtime.instances():
            if instance.instance_id in warm:
                state = "warm"
            elif instance.instance_id in bound:
                state = "bound"
            elif instance.state == InstanceState.STARTING:
                state = "starting"
            elif instance.state == InstanceState.CRASHED:
                state = "crashed"
            else:
                state = "unbound"
            instances[state] += 1
        family = GaugeMetricFamily("hutch_instances", "Instances on this host by state", labels=["state"])
        for state, count in instances.items():
            family.add_metric([state], count)
        yield family

        size = GaugeMetricFamily("hutch_warm_pool_size", "Warm instances ready, by pool", labels=["pool"])
        target = GaugeMetricFamily("hutch_warm_pool_target", "Warm instances wanted, by pool", labels=["pool"])
        for key, pool in self.scheduler.pools.items():
            size.add_metric([key], len(pool.warm))
            target.add_metric([key], pool.spec.warm_pool_size)
        yield size
        yield target
        stats = self.scheduler.stats
        yield CounterMetricFamily("hutch_warm_pool_hits", "Sessions that got a warm instance", stats["pool_hits"])
        yield CounterMetricFamily("hutch_warm_pool_misses", "Sessions that had to start one", stats["pool_misses"])
        yield CounterMetricFamily("hutch_instance_crashes", "Instances that died on their own", stats["crashes"])

        totals = meter.totals
        for name, value, help_text in (
            ("active_seconds", totals.active_s, "Session time with work in progress"),
            ("idle_seconds", totals.idle_s, "Session time with a live instance and nothing to do"),
            ("down_seconds", totals.down_s, "Session time with a dead instance (crash until recovery)"),
            ("cpu_seconds", totals.cpu_s, "CPU seconds sessions' instances used"),
            ("memory_gib_seconds", totals.memory_gib_s, "Memory sessions' instances used, integrated"),
            ("disk_gib_seconds", totals.disk_gib_s, "Workspace disk of sessions, integrated"),
        ):
            yield CounterMetricFamily(f"hutch_session_{name}", help_text + " (since this process started)", value)
        records = meter.live_records()
        yield GaugeMetricFamily(
            "hutch_session_memory_bytes",
            "Memory of the live sessions' instances at their last sample",
            sum(r.memory_bytes for r in records),
        )
        yield GaugeMetricFamily(
            "hutch_session_workspace_bytes",
            "Workspace bytes of the live sessions at their last sample",
            sum(r.disk_bytes for r in records),
        )
