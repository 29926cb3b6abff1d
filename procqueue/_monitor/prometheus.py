"""The optional Prometheus endpoint of the monitor (`pip install 'procqueue[prometheus]'`).

Each scrape reads `Pool.stats()` (fresh counters, the latest sample's
readings): nothing is pushed, nothing is stored twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from procqueue._stats import Stats


class Sampled(Protocol):
    """What a scrape reads (the pool's `Sampler`)."""

    @property
    def started(self) -> bool: ...

    def stats(self) -> Stats: ...


COUNTERS = ("submitted", "completed", "failed", "retried", "dropped", "cancelled", "crashed", "timed_out")
GAUGES = {
    "pending": "tasks waiting in the queue (queue depth)",
    "retrying": "tasks waiting out a retry backoff",
    "in_flight": "tasks handed to workers and not yet ended",
    "throughput": "tasks ended per second over the recent window",
    "throughput_ewma": "tasks ended per second, exponentially weighted",
}


def serve(sampler: Sampled, host: str, port: int) -> tuple[Any, tuple[str, int]]:
    """Start the HTTP endpoint in a daemon thread; returns the server and its bound address."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError as exc:
        raise ImportError(
            "Monitor(prometheus_port=...) needs prometheus-client: pip install 'procqueue[prometheus]'"
        ) from exc
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_PoolCollector(sampler))  # type: ignore[arg-type]
    try:
        server, _thread = start_http_server(port, host, registry)
    except OSError as exc:
        raise OSError(
            exc.errno, f"the monitor cannot serve Prometheus metrics on {host}:{port}: {exc.strerror}; "
            "pick another prometheus_port, or 0 for any free port"
        ) from exc  # fmt: skip
    bound = server.server_address
    return server, (str(bound[0]), int(bound[1]))


class _PoolCollector:
    def __init__(self, sampler: Sampled) -> None:
        self.sampler = sampler

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        if not self.sampler.started:
            return
        s = self.sampler.stats()
        for name in COUNTERS:
            yield CounterMetricFamily(f"procqueue_tasks_{name}", f"tasks {name.replace('_', ' ')}", getattr(s, name))
        yield CounterMetricFamily("procqueue_attempts", "attempts accounted by the collector", s.attempts)
        for name, text in GAUGES.items():
            yield GaugeMetricFamily(f"procqueue_{name}", text, getattr(s, name))
        yield GaugeMetricFamily("procqueue_workers_alive", "worker processes alive", sum(w.pid > 0 for w in s.workers))
        cpu = GaugeMetricFamily("procqueue_worker_cpu_percent", "CPU of one worker, % of a core", labels=["slot"])
        rss = GaugeMetricFamily("procqueue_worker_rss_bytes", "resident memory of one worker", labels=["slot"])
        done = CounterMetricFamily("procqueue_worker_tasks_done", "attempts finished in a worker slot", labels=["slot"])
        recycled = CounterMetricFamily("procqueue_worker_recycled", "workers of a slot replaced for a limit", labels=["slot"])  # fmt: skip
        deaths = CounterMetricFamily("procqueue_worker_deaths", "workers of a slot that died unasked", labels=["slot"])
        for w in s.workers:
            label = [str(w.slot)]
            cpu.add_metric(label, w.cpu_percent)
            rss.add_metric(label, w.rss)
            done.add_metric(label, w.tasks_done)
            recycled.add_metric(label, w.recycled)
            deaths.add_metric(label, w.deaths)
        yield from (cpu, rss, done, recycled, deaths)
        if s.collector is not None:
            yield GaugeMetricFamily("procqueue_collector_cpu_percent", "CPU of the collector", s.collector.cpu_percent)
            yield GaugeMetricFamily(
                "procqueue_collector_rss_bytes", "resident memory of the collector", s.collector.rss
            )
