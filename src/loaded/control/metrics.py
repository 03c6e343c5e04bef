"""Prometheus metrics from the daemon's status snapshot.

:class:`StatusCollector` is a custom ``prometheus_client`` collector: on every
scrape it calls ``get_status()`` once and turns the snapshot (the
``loaded.core.status.Status`` the supervisor builds) into metric families. Nothing
is kept between scrapes, so counters are exactly what the daemon reports.
:func:`make_registry` puts one in a registry of its own; the process-wide
default registry is never touched.

Metric names are stable; every one starts with ``loaded_``:

=============================================  =======  ==============================
name                                           type     labels
=============================================  =======  ==============================
loaded_daemon_info                             info     tag, version, datapath, config
loaded_daemon_start_time_seconds               gauge
loaded_daemon_uptime_seconds                   gauge
loaded_service_info                            info     vip, family, strategy
loaded_service_active_clients                  gauge    vip
loaded_backend_packets_total                   counter  vip, backend
loaded_backend_bytes_total                     counter  vip, backend
loaded_backend_new_clients_total               counter  vip, backend
loaded_backend_active_clients                  gauge    vip, backend
loaded_backend_up                              gauge    vip, backend
loaded_backend_state                           gauge    vip, backend, state, admin
loaded_backend_health_transitions_total        counter  vip, backend
loaded_backend_weight                          gauge    vip, backend
loaded_backend_last_check_timestamp_seconds    gauge    vip, backend
loaded_worker_up                               gauge    worker, queue
loaded_worker_packets_total                    counter  worker, queue
loaded_worker_drops_total                      counter  worker, queue, reason
loaded_worker_refused_total                    counter  worker, queue
loaded_worker_restarts_total                   counter  worker, queue
loaded_worker_cpu_seconds_total                counter  worker, queue
loaded_worker_verdict_latency_seconds          histo.   worker, queue
loaded_kernel_queue_length                     gauge    queue
loaded_kernel_queue_dropped_total              counter  queue
loaded_kernel_queue_user_dropped_total         counter  queue
loaded_kernel_queue_id_sequence                gauge    queue
loaded_kernel_drops_total                      counter  reason
loaded_kernel_hashed_total                     counter  mode, strategy
=============================================  =======  ==============================

``loaded_kernel_drops_total`` counts packets the kernel dropped before any
worker saw them; it has series only on the conntrack data path (reason
``conntrack-invalid``: the guard chain's drops of packets conntrack found
invalid), and none on the per-packet path, where nothing is counted.

The snapshot is typed (``loaded.core.status``), so nothing here checks it
again. A value the snapshot does not have yet is left out rather than
reported as zero: a backend's last check before its first probe, a worker's
latency histogram before its first report. A worker's own counters are 0
until then, so that every series exists from the start. If ``get_status()``
raises, the exception propagates to the caller of ``collect()`` (the HTTP
server answers 503).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from loaded.core.status import (
    DaemonInfo,
    KernelHashStatus,
    Latency,
    QueueStatus,
    ServiceStatus,
    Status,
    WorkerStatus,
)

__all__ = ["StatusCollector", "StatusSource", "make_registry"]

StatusSource = Callable[[], Status]

PREFIX = "loaded_"


def _format_le(bound: float) -> str:
    if math.isinf(bound):
        return "+Inf"
    return repr(float(bound))


def histogram_buckets(latency: Latency) -> tuple[list[tuple[str, float]], float]:
    """Cumulative ``(le, count)`` buckets ending in +Inf, and the sum.

    Bounds are sorted, duplicates merged, counts made monotonic, as Prometheus
    requires whatever a worker counted; the +Inf bucket is ``count`` (never
    below the largest finite bucket).
    """
    merged: dict[float, float] = {}
    for bound, n in latency.buckets:
        merged[bound] = max(merged.get(bound, 0.0), float(n))
    out: list[tuple[str, float]] = []
    running = 0.0
    for bound, seen in sorted(merged.items()):
        if math.isinf(bound):
            continue
        running = max(running, seen)
        out.append((_format_le(bound), running))
    out.append(("+Inf", max(float(latency.count), running)))
    return out, latency.sum


class StatusCollector(Collector):
    """Turns ``get_status()`` into Prometheus metric families on each scrape."""

    def __init__(self, get_status: StatusSource) -> None:
        self._get_status = get_status

    def describe(self) -> list[Metric]:
        # Registering must not call get_status (it may not be ready yet).
        return []

    def collect(self) -> Iterator[Metric]:
        status = self._get_status()
        if not isinstance(status, Status):  # a wrong source is a bug: say so, do not guess
            raise TypeError(f"status snapshot is {type(status).__name__}, not a Status")
        yield from self._daemon(status.daemon)
        yield from self._services(status.services)
        yield from self._workers(status.workers)
        yield from self._kernel(status.kernel_queues)
        yield from self._kernel_drops(status.kernel_drops or {})
        if status.kernel_hash is not None:
            yield from self._kernel_hash(status.kernel_hash)

    # -- daemon -----------------------------------------------------------------------

    def _daemon(self, daemon: DaemonInfo) -> Iterator[Metric]:
        info = InfoMetricFamily(
            PREFIX + "daemon", "The running daemon: tag, version, datapath, config file.")
        info.add_metric([], {"tag": daemon.tag, "version": daemon.version,
                             "datapath": daemon.datapath, "config": daemon.config})
        yield info
        yield GaugeMetricFamily(
            PREFIX + "daemon_start_time_seconds",
            "Unix time the daemon started.", value=daemon.started_at)
        yield GaugeMetricFamily(
            PREFIX + "daemon_uptime_seconds",
            "Seconds since the daemon started.", value=daemon.uptime)

    # -- services and backends --------------------------------------------------------

    def _services(self, services: Sequence[ServiceStatus]) -> Iterator[Metric]:
        vb = ["vip", "backend"]
        info = InfoMetricFamily(
            PREFIX + "service", "A virtual IP: address family and balancing strategy.")
        clients = GaugeMetricFamily(
            PREFIX + "service_active_clients",
            "Clients currently in the client table for the VIP.", labels=["vip"])
        packets = CounterMetricFamily(
            PREFIX + "backend_packets", "Packets balanced to the backend.", labels=vb)
        octets = CounterMetricFamily(
            PREFIX + "backend_bytes", "Bytes (IP packets) balanced to the backend.", labels=vb)
        new_clients = CounterMetricFamily(
            PREFIX + "backend_new_clients", "New clients assigned to the backend.", labels=vb)
        active = GaugeMetricFamily(
            PREFIX + "backend_active_clients",
            "Clients currently sticking to the backend.", labels=vb)
        up = GaugeMetricFamily(
            PREFIX + "backend_up",
            "1 if the backend's health check says up, 0 if down or unknown.", labels=vb)
        state = GaugeMetricFamily(
            PREFIX + "backend_state",
            "Always 1; the state label is the backend's state "
            "(up, draining, down), admin its administrative setting.",
            labels=[*vb, "state", "admin"])
        transitions = CounterMetricFamily(
            PREFIX + "backend_health_transitions",
            "Times the backend's health changed between up and down.", labels=vb)
        weight = GaugeMetricFamily(
            PREFIX + "backend_weight", "Configured weight of the backend.", labels=vb)
        last_check = GaugeMetricFamily(
            PREFIX + "backend_last_check_timestamp_seconds",
            "Unix time of the backend's last health check.", labels=vb)

        for service in services:
            vip = service.vip
            info.add_metric([], {"vip": vip, "family": str(service.family),
                                 "strategy": service.strategy})
            clients.add_metric([vip], service.clients)
            for backend in service.backends:
                labels = [vip, backend.address]
                packets.add_metric(labels, backend.packets)
                octets.add_metric(labels, backend.bytes)
                new_clients.add_metric(labels, backend.new_clients)
                active.add_metric(labels, backend.clients)
                up.add_metric(labels, 1.0 if backend.health == "up" else 0.0)
                state.add_metric([*labels, backend.state, backend.admin], 1.0)
                transitions.add_metric(labels, backend.transitions)
                weight.add_metric(labels, backend.weight)
                if backend.last_check is not None:
                    last_check.add_metric(labels, backend.last_check.at)
        yield from (info, clients, packets, octets, new_clients, active, up, state,
                    transitions, weight, last_check)

    # -- workers ----------------------------------------------------------------------

    def _workers(self, workers: Sequence[WorkerStatus]) -> Iterator[Metric]:
        wq = ["worker", "queue"]
        alive = GaugeMetricFamily(
            PREFIX + "worker_up", "1 if the worker process is running.", labels=wq)
        packets = CounterMetricFamily(
            PREFIX + "worker_packets", "Packets the worker gave a verdict on.", labels=wq)
        drops = CounterMetricFamily(
            PREFIX + "worker_drops", "Packets the worker dropped, by reason.",
            labels=[*wq, "reason"])
        refused = CounterMetricFamily(
            PREFIX + "worker_refused",
            "Packets handed to the local stack to be refused (no backend up).", labels=wq)
        restarts = CounterMetricFamily(
            PREFIX + "worker_restarts", "Times the supervisor restarted the worker.",
            labels=wq)
        cpu = CounterMetricFamily(
            PREFIX + "worker_cpu_seconds", "CPU time the worker process used.", labels=wq)
        latency = HistogramMetricFamily(
            PREFIX + "worker_verdict_latency_seconds",
            "Seconds from a packet's arrival in the worker to its verdict.", labels=wq)
        for worker in workers:
            labels = [str(worker.index), str(worker.queue)]
            report = worker.report
            alive.add_metric(labels, 1.0 if worker.alive else 0.0)
            packets.add_metric(labels, 0 if report is None else report.packets)
            for reason, count in sorted(worker.drops.items()):
                drops.add_metric([*labels, reason], count)
            refused.add_metric(labels, 0 if report is None else report.refused)
            restarts.add_metric(labels, worker.restarts)
            cpu.add_metric(labels, 0.0 if report is None else report.cpu_seconds)
            if report is not None:
                buckets, total = histogram_buckets(report.latency)
                latency.add_metric(labels, buckets, total)
        yield from (alive, packets, drops, refused, restarts, cpu, latency)

    # -- kernel queues ----------------------------------------------------------------

    def _kernel(self, queues: Mapping[int, QueueStatus]) -> Iterator[Metric]:
        length = GaugeMetricFamily(
            PREFIX + "kernel_queue_length",
            "Packets waiting in the kernel's NFQUEUE for a verdict now "
            "(/proc/net/netfilter/nfnetlink_queue).", labels=["queue"])
        dropped = CounterMetricFamily(
            PREFIX + "kernel_queue_dropped",
            "Packets the kernel dropped because the queue was full.", labels=["queue"])
        user_dropped = CounterMetricFamily(
            PREFIX + "kernel_queue_user_dropped",
            "Packets the kernel failed to send to user space (netlink buffer full).",
            labels=["queue"])
        id_sequence = GaugeMetricFamily(
            PREFIX + "kernel_queue_id_sequence",
            "Id of the last packet the kernel queued (wraps at 2^32).", labels=["queue"])

        for queue, stats in sorted(queues.items()):
            labels = [str(queue)]
            length.add_metric(labels, stats.waiting)
            dropped.add_metric(labels, stats.queue_dropped)
            user_dropped.add_metric(labels, stats.user_dropped)
            id_sequence.add_metric(labels, stats.id_sequence)
        yield from (length, dropped, user_dropped, id_sequence)

    def _kernel_drops(self, drops: Mapping[str, int]) -> Iterator[Metric]:
        family = CounterMetricFamily(
            PREFIX + "kernel_drops",
            "Packets the kernel dropped before balancing, by reason (conntrack-invalid: "
            "conntrack found them invalid). Conntrack data path only.", labels=["reason"])
        for reason in sorted(drops):
            family.add_metric([reason], drops[reason])
        yield family


    def _kernel_hash(self, table: KernelHashStatus) -> Iterator[Metric]:
        family = CounterMetricFamily(
            PREFIX + "kernel_hashed",
            "New connections the kernel's hash table gave a bucket (mode=decides: "
            "every new TCP/UDP client of sh or maglev; mode=fallback: those no worker "
            "took, fail_open=hash).", labels=["mode", "strategy"])
        family.add_metric(["decides" if table.decides else "fallback", table.strategy],
                          table.hashed)
        yield family


def make_registry(get_status: StatusSource) -> CollectorRegistry:
    """A fresh registry (not the global one) holding one :class:`StatusCollector`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(get_status))
    return registry
