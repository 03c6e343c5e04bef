"""Prometheus metrics from the daemon's status snapshot.

:class:`StatusCollector` is a custom ``prometheus_client`` collector: on every
scrape it calls ``get_status()`` once and turns the snapshot (the dict the
supervisor builds, see :mod:`loaded.control.web`) into metric families. Nothing
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
=============================================  =======  ==============================

``loaded_kernel_drops_total`` counts packets the kernel dropped before any
worker saw them; it has series only on the conntrack data path (reason
``conntrack-invalid``: the guard chain's drops of packets conntrack found
invalid), and none on the per-packet path, where nothing is counted.

Missing optional keys are tolerated: a metric whose value is absent from the
snapshot is left out rather than reported as zero (except per-backend and
per-worker counters, which default to 0 so every series exists from the start).
If ``get_status()`` raises, the exception propagates to the caller of
``collect()`` (the HTTP server answers 503).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

__all__ = ["Status", "StatusCollector", "StatusSource", "make_registry"]

Status = Mapping[str, Any]
StatusSource = Callable[[], Status]

PREFIX = "loaded_"
BACKEND_STATES = ("up", "draining", "down")


def _num(value: Any, default: float | None = 0.0) -> float | None:
    """A finite-or-infinite float from a snapshot value; ``default`` if unusable."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return default
    return default


def _f(value: Any) -> float:
    """Like :func:`_num` with 0.0 as default, typed as a plain float."""
    out = _num(value, 0.0)
    return 0.0 if out is None else out


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _le(value: Any) -> float:
    """A bucket bound: number, or "+Inf"/"inf"/None for the last bucket."""
    if value is None:
        return math.inf
    if isinstance(value, str) and value.strip().lower() in ("+inf", "inf"):
        return math.inf
    out = _num(value, None)
    return math.inf if out is None else out


def _format_le(bound: float) -> str:
    if math.isinf(bound):
        return "+Inf"
    return repr(float(bound))


def histogram_buckets(latency: Mapping[str, Any]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative ``(le, count)`` buckets ending in +Inf, and the sum, from a snapshot.

    Bounds are sorted, duplicates merged, counts made monotonic; the +Inf bucket
    is ``count`` when given (and never below the largest finite bucket).
    """
    merged: dict[float, float] = {}
    for item in _list(latency.get("buckets")):
        if not isinstance(item, list | tuple) or len(item) < 2:
            continue
        bound = _le(item[0])
        if math.isnan(bound):
            continue
        merged[bound] = max(merged.get(bound, 0.0), _f(item[1]))
    ordered = sorted(merged.items())
    out: list[tuple[str, float]] = []
    running = 0.0
    for bound, count in ordered:
        if math.isinf(bound):
            continue
        running = max(running, count)
        out.append((_format_le(bound), running))
    total = _num(latency.get("count"), None)
    if total is None:
        total = merged.get(math.inf, running)
    out.append(("+Inf", max(total, running)))
    return out, _f(latency.get("sum"))


class StatusCollector(Collector):
    """Turns ``get_status()`` into Prometheus metric families on each scrape."""

    def __init__(self, get_status: StatusSource) -> None:
        self._get_status = get_status

    def describe(self) -> list[Metric]:
        # Registering must not call get_status (it may not be ready yet).
        return []

    def collect(self) -> Iterator[Metric]:
        status = self._get_status()
        if not isinstance(status, Mapping):
            raise TypeError(f"status snapshot is {type(status).__name__}, not a mapping")
        yield from self._daemon(_dict(status.get("daemon")))
        yield from self._services(_list(status.get("services")))
        yield from self._workers(_list(status.get("workers")))
        yield from self._kernel(_dict(status.get("kernel_queues")))
        yield from self._kernel_drops(_dict(status.get("kernel_drops")))

    # -- daemon -----------------------------------------------------------------------

    def _daemon(self, daemon: Mapping[str, Any]) -> Iterator[Metric]:
        info = InfoMetricFamily(
            PREFIX + "daemon", "The running daemon: tag, version, datapath, config file.")
        info.add_metric([], {
            "tag": str(daemon.get("tag", "")),
            "version": str(daemon.get("version", "")),
            "datapath": str(daemon.get("datapath", "")),
            "config": str(daemon.get("config", "")),
        })
        yield info
        started = _num(daemon.get("started_at"), None)
        if started is not None:
            yield GaugeMetricFamily(
                PREFIX + "daemon_start_time_seconds",
                "Unix time the daemon started.", value=started)
        uptime = _num(daemon.get("uptime"), None)
        if uptime is not None:
            yield GaugeMetricFamily(
                PREFIX + "daemon_uptime_seconds",
                "Seconds since the daemon started.", value=uptime)

    # -- services and backends --------------------------------------------------------

    def _services(self, services: list[Any]) -> Iterator[Metric]:
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
            if not isinstance(service, Mapping):
                continue
            vip = str(service.get("vip", ""))
            info.add_metric([], {
                "vip": vip,
                "family": str(service.get("family", "")),
                "strategy": str(service.get("strategy", "")),
            })
            service_clients = _num(service.get("clients"), None)
            if service_clients is not None:
                clients.add_metric([vip], service_clients)
            for backend in _list(service.get("backends")):
                if not isinstance(backend, Mapping):
                    continue
                labels = [vip, str(backend.get("address", ""))]
                packets.add_metric(labels, _f(backend.get("packets")))
                octets.add_metric(labels, _f(backend.get("bytes")))
                new_clients.add_metric(labels, _f(backend.get("new_clients")))
                active.add_metric(labels, _f(backend.get("clients")))
                up.add_metric(labels, 1.0 if backend.get("health") == "up" else 0.0)
                state.add_metric(
                    [*labels, str(backend.get("state", "unknown")),
                     str(backend.get("admin", "unknown"))], 1.0)
                transitions.add_metric(labels, _f(backend.get("transitions")))
                weight.add_metric(labels, _f(backend.get("weight", 1)))
                at = _num(_dict(backend.get("last_check")).get("at"), None)
                if at is not None:
                    last_check.add_metric(labels, at)
        yield from (info, clients, packets, octets, new_clients, active, up, state,
                    transitions, weight, last_check)

    # -- workers ----------------------------------------------------------------------

    def _workers(self, workers: list[Any]) -> Iterator[Metric]:
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
            if not isinstance(worker, Mapping):
                continue
            labels = [str(worker.get("index", "")), str(worker.get("queue", ""))]
            alive.add_metric(labels, 1.0 if worker.get("alive") else 0.0)
            packets.add_metric(labels, _f(worker.get("packets")))
            for reason, count in sorted(_dict(worker.get("drops")).items()):
                drops.add_metric([*labels, str(reason)], _f(count))
            refused.add_metric(labels, _f(worker.get("refused")))
            restarts.add_metric(labels, _f(worker.get("restarts")))
            cpu.add_metric(labels, _f(worker.get("cpu_seconds")))
            lat = worker.get("latency")
            if isinstance(lat, Mapping):
                buckets, total = histogram_buckets(lat)
                latency.add_metric(labels, buckets, total)
        yield from (alive, packets, drops, refused, restarts, cpu, latency)

    # -- kernel queues ----------------------------------------------------------------

    def _kernel(self, queues: Mapping[str, Any]) -> Iterator[Metric]:
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

        def order(key: str) -> tuple[int, str]:
            return (int(key), "") if key.isdigit() else (1 << 62, key)

        for queue in sorted(queues, key=lambda k: order(str(k))):
            stats = _dict(queues[queue])
            labels = [str(queue)]
            waiting = _num(stats.get("queue_total", stats.get("waiting")), None)
            if waiting is not None:
                length.add_metric(labels, waiting)
            dropped.add_metric(labels, _f(stats.get("queue_dropped")))
            user_dropped.add_metric(labels, _f(stats.get("user_dropped")))
            seq = _num(stats.get("id_sequence"), None)
            if seq is not None:
                id_sequence.add_metric(labels, seq)
        yield from (length, dropped, user_dropped, id_sequence)

    def _kernel_drops(self, drops: Mapping[str, Any]) -> Iterator[Metric]:
        family = CounterMetricFamily(
            PREFIX + "kernel_drops",
            "Packets the kernel dropped before balancing, by reason (conntrack-invalid: "
            "conntrack found them invalid). Conntrack data path only.", labels=["reason"])
        for reason in sorted(drops):
            family.add_metric([str(reason)], _f(drops[reason]))
        yield family


def make_registry(get_status: StatusSource) -> CollectorRegistry:
    """A fresh registry (not the global one) holding one :class:`StatusCollector`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(get_status))
    return registry
