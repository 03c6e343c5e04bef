"""StatusCollector: the Prometheus exposition says exactly what the snapshot says."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import prometheus_client
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from loaded.control.metrics import StatusCollector, histogram_buckets, make_registry
from loaded.core.status import Latency, Status

from . import snapshots as snap

Labels = frozenset[tuple[str, str]]


def snapshot() -> Status:
    return snap.status(
        daemon_info=snap.daemon(pid=4242, tag="lab", config="/etc/loaded/lab.conf",
                                uptime=123.5, datapath="conntrack",
                                started_at=1_700_000_000.25),
        services=[
            snap.service("198.18.1.100", strategy="rr", clients=7, backends=[
                snap.backend("198.19.0.11", weight=3, transitions=2,
                             last_check=snap.check(True, "tcp/80 connected", 1_700_000_120.5),
                             clients=5, new_clients=40, packets=123_456, bytes=98_765_432),
                snap.backend("198.19.0.12", state="down", health="down", transitions=5,
                             last_check=snap.check(False, "refused", 1_700_000_121.0),
                             new_clients=3, packets=17, bytes=1_500),
                snap.backend("198.19.0.13", weight=2, state="draining", admin="drain",
                             health="unknown", clients=2, new_clients=2, packets=900,
                             bytes=90_000),
            ]),
            snap.service("2001:db8:1::100", family=6, strategy="maglev", clients=1, backends=[
                snap.backend("2001:db8:2::11", transitions=1, clients=1, new_clients=1,
                             packets=10, bytes=1_000),
            ]),
        ],
        workers=[
            snap.worker(0, restarts=1, drops={"no-backend": 4, "malformed": 2},
                        report=snap.report(
                            pid=5001, packets=100_000, refused=3, cpu_seconds=12.75,
                            latency=snap.latency(
                                [(0.00001, 10), (0.0001, 900), (0.001, 990), (0.01, 1000)],
                                0.0421, 1000))),
            snap.worker(1, alive=False, restarts=4,
                        report=snap.report(pid=0, packets=5, cpu_seconds=0.5)),
        ],
        kernel_queues={0: snap.queue(waiting=3, queue_dropped=11, user_dropped=1,
                                     id_sequence=100_003),
                       1: snap.queue(id_sequence=5)},
        endpoints={"metrics": "http://127.0.0.1:9100/metrics",
                   "status": "http://127.0.0.1:9100/"},
    )


def scrape(status: Any) -> tuple[dict[str, Any], dict[tuple[str, Labels], float]]:
    """(families by name, {(sample name, labels): value}) parsed back from the text format."""
    registry = make_registry(lambda: status)
    text = generate_latest(registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples: dict[tuple[str, Labels], float] = {}
    for family in families.values():
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = s.value
    return families, samples


def L(**labels: Any) -> Labels:
    return frozenset((k, str(v)) for k, v in labels.items())


def test_backend_metrics_equal_snapshot() -> None:
    status = snapshot()
    _, samples = scrape(status)
    for service in status.services:
        vip = service.vip
        assert samples[("loaded_service_active_clients", L(vip=vip))] == service.clients
        assert samples[("loaded_service_info",
                        L(vip=vip, family=service.family,
                          strategy=service.strategy))] == 1
        for b in service.backends:
            lab = L(vip=vip, backend=b.address)
            assert samples[("loaded_backend_packets_total", lab)] == b.packets
            assert samples[("loaded_backend_bytes_total", lab)] == b.bytes
            assert samples[("loaded_backend_new_clients_total", lab)] == b.new_clients
            assert samples[("loaded_backend_active_clients", lab)] == b.clients
            assert samples[("loaded_backend_up", lab)] == (1 if b.health == "up" else 0)
            assert samples[("loaded_backend_health_transitions_total", lab)] == b.transitions
            assert samples[("loaded_backend_weight", lab)] == b.weight
            state = L(vip=vip, backend=b.address, state=b.state, admin=b.admin)
            assert samples[("loaded_backend_state", state)] == 1
            check = ("loaded_backend_last_check_timestamp_seconds", lab)
            if b.last_check is None:
                assert check not in samples
            else:
                assert samples[check] == b.last_check.at
    # exactly one state series per backend
    states = [k for k in samples if k[0] == "loaded_backend_state"]
    assert len(states) == sum(len(s.backends) for s in status.services)


def test_worker_metrics_equal_snapshot() -> None:
    status = snapshot()
    _, samples = scrape(status)
    for w in status.workers:
        assert w.report is not None
        lab = L(worker=w.index, queue=w.queue)
        assert samples[("loaded_worker_up", lab)] == (1 if w.alive else 0)
        assert samples[("loaded_worker_packets_total", lab)] == w.report.packets
        assert samples[("loaded_worker_refused_total", lab)] == w.report.refused
        assert samples[("loaded_worker_restarts_total", lab)] == w.restarts
        assert samples[("loaded_worker_cpu_seconds_total", lab)] == w.report.cpu_seconds
        for reason, count in w.drops.items():
            assert samples[("loaded_worker_drops_total",
                            L(worker=w.index, queue=w.queue, reason=reason))] == count
        lat = w.report.latency
        for le, count in lat.buckets:
            key = ("loaded_worker_verdict_latency_seconds_bucket",
                   L(worker=w.index, queue=w.queue, le=repr(float(le))))
            assert samples[key] == count
        inf = L(worker=w.index, queue=w.queue, le="+Inf")
        assert samples[("loaded_worker_verdict_latency_seconds_bucket", inf)] == lat.count
        assert samples[("loaded_worker_verdict_latency_seconds_count", lab)] == lat.count
        assert samples[("loaded_worker_verdict_latency_seconds_sum", lab)] == lat.sum


def test_kernel_and_daemon_metrics_equal_snapshot() -> None:
    status = snapshot()
    families, samples = scrape(status)
    for queue, q in status.kernel_queues.items():
        lab = L(queue=queue)
        assert samples[("loaded_kernel_queue_length", lab)] == q.waiting
        assert samples[("loaded_kernel_queue_dropped_total", lab)] == q.queue_dropped
        assert samples[("loaded_kernel_queue_user_dropped_total", lab)] == q.user_dropped
        assert samples[("loaded_kernel_queue_id_sequence", lab)] == q.id_sequence
    d = status.daemon
    info = L(tag=d.tag, version=d.version, datapath=d.datapath, config=d.config)
    assert samples[("loaded_daemon_info", info)] == 1
    assert samples[("loaded_daemon_uptime_seconds", L())] == d.uptime
    assert samples[("loaded_daemon_start_time_seconds", L())] == d.started_at
    assert families["loaded_backend_packets"].type == "counter"
    assert families["loaded_worker_verdict_latency_seconds"].type == "histogram"
    assert families["loaded_kernel_queue_length"].type == "gauge"


def test_every_family_is_prefixed_and_documented() -> None:
    families, _ = scrape(snapshot())
    expected = {
        "loaded_daemon_info", "loaded_daemon_start_time_seconds", "loaded_daemon_uptime_seconds",
        "loaded_service_info", "loaded_service_active_clients",
        "loaded_backend_packets", "loaded_backend_bytes", "loaded_backend_new_clients",
        "loaded_backend_active_clients", "loaded_backend_up", "loaded_backend_state",
        "loaded_backend_health_transitions", "loaded_backend_weight",
        "loaded_backend_last_check_timestamp_seconds",
        "loaded_worker_up", "loaded_worker_packets", "loaded_worker_drops",
        "loaded_worker_refused", "loaded_worker_restarts", "loaded_worker_cpu_seconds",
        "loaded_worker_verdict_latency_seconds",
        "loaded_kernel_queue_length", "loaded_kernel_queue_dropped",
        "loaded_kernel_queue_user_dropped", "loaded_kernel_queue_id_sequence",
        "loaded_kernel_drops",
    }
    assert set(families) == expected
    for name, family in families.items():
        assert name.startswith("loaded_")
        assert family.documentation, name


def test_the_kernels_hash_decisions_are_a_counter() -> None:
    from loaded.core.status import KernelHashStatus
    status = dataclasses.replace(snapshot(), kernel_hash=KernelHashStatus(
        "maglev", 65537, 1, False, True, 99))
    families, samples = scrape(status)
    assert families["loaded_kernel_hashed"].type == "counter"
    assert samples[("loaded_kernel_hashed_total", L(mode="fallback", strategy="maglev"))] == 99
    _, samples = scrape(snapshot())  # no table: no series
    assert not any(name.startswith("loaded_kernel_hashed") for name, _ in samples)


def test_kernel_drops_are_a_counter_by_reason() -> None:
    status = dataclasses.replace(snapshot(), kernel_drops={"conntrack-invalid": 12, "other": 0})
    families, samples = scrape(status)
    assert families["loaded_kernel_drops"].type == "counter"
    assert samples[("loaded_kernel_drops_total", L(reason="conntrack-invalid"))] == 12
    assert samples[("loaded_kernel_drops_total", L(reason="other"))] == 0
    # the per-packet path has none: no series, not a zero that suggests one
    _, samples = scrape(snapshot())
    assert not any(name.startswith("loaded_kernel_drops") for name, _ in samples)


def test_minimal_and_partial_snapshots() -> None:
    families, samples = scrape(snap.status(daemon_info=snap.daemon(
        tag="t", config="c", uptime=2.0, started_at=10.0)))
    assert "loaded_backend_packets" in families  # families exist, empty
    assert samples == {
        ("loaded_daemon_info", L(tag="t", version="0.1.0", datapath="perpacket",
                                 config="c")): 1,
        ("loaded_daemon_start_time_seconds", L()): 10.0,
        ("loaded_daemon_uptime_seconds", L()): 2.0}

    # A backend never probed, a worker that has not reported yet.
    status = snap.status(
        services=[snap.service("198.18.1.100", [snap.backend("198.19.0.11", health="unknown")],
                               clients=0)],
        workers=[snap.worker(0)],
        kernel_queues={0: snap.queue(waiting=2, queue_dropped=1)})
    _, samples = scrape(status)
    lab = L(vip="198.18.1.100", backend="198.19.0.11")
    assert samples[("loaded_backend_packets_total", lab)] == 0
    assert samples[("loaded_backend_up", lab)] == 0
    assert samples[("loaded_backend_weight", lab)] == 1
    assert ("loaded_backend_last_check_timestamp_seconds", lab) not in samples
    assert samples[("loaded_service_active_clients", L(vip="198.18.1.100"))] == 0
    assert samples[("loaded_worker_packets_total", L(worker=0, queue=0))] == 0
    assert samples[("loaded_worker_cpu_seconds_total", L(worker=0, queue=0))] == 0
    assert not any(k[0].startswith("loaded_worker_verdict_latency") for k in samples)
    assert samples[("loaded_kernel_queue_length", L(queue=0))] == 2
    assert samples[("loaded_kernel_queue_dropped_total", L(queue=0))] == 1


def test_histogram_buckets_are_normalised() -> None:
    # unsorted, an explicit +Inf bound, a non-monotonic count, a duplicate bound
    buckets, total = histogram_buckets(Latency(
        buckets=((0.01, 9), (0.001, 5), (math.inf, 12), (0.005, 4), (0.001, 3)),
        sum=0.5, count=12))
    assert buckets == [("0.001", 5), ("0.005", 5), ("0.01", 9), ("+Inf", 12)]
    assert total == 0.5
    # count is +Inf; never below the largest finite bucket
    assert histogram_buckets(Latency(((0.1, 3),), 0.0, 2))[0][-1] == ("+Inf", 3)
    assert histogram_buckets(Latency(((0.1, 3),), 0.0, 7))[0][-1] == ("+Inf", 7)
    assert histogram_buckets(Latency((), 0.0, 0))[0] == [("+Inf", 0)]


def test_counters_follow_the_snapshot_on_each_scrape() -> None:
    status = snapshot()
    registry = make_registry(lambda: status)
    key = 'loaded_backend_packets_total{backend="198.19.0.11",vip="198.18.1.100"}'
    assert f"{key} 123456.0" in generate_latest(registry).decode()
    first = status.services[0]
    grown = dataclasses.replace(first.backends[0], packets=200_000)
    status = dataclasses.replace(status, services=(
        dataclasses.replace(first, backends=(grown, *first.backends[1:])),
        *status.services[1:]))
    assert f"{key} 200000.0" in generate_latest(registry).decode()


def test_own_registry_not_the_global_one() -> None:
    before = set(prometheus_client.REGISTRY._collector_to_names)
    registry = make_registry(snapshot)
    assert registry is not prometheus_client.REGISTRY
    assert set(prometheus_client.REGISTRY._collector_to_names) == before
    assert prometheus_client.REGISTRY.get_sample_value(
        "loaded_backend_packets_total",
        {"vip": "198.18.1.100", "backend": "198.19.0.11"}) is None
    assert registry.get_sample_value(
        "loaded_backend_packets_total",
        {"vip": "198.18.1.100", "backend": "198.19.0.11"}) == 123_456


def test_errors_propagate() -> None:
    def broken() -> Status:
        raise RuntimeError("supervisor gone")

    with pytest.raises(RuntimeError, match="supervisor gone"):
        list(StatusCollector(broken).collect())
    def not_a_status() -> Any:
        return snapshot().to_json()  # the JSON form is for other processes, not for this

    with pytest.raises(TypeError):
        list(StatusCollector(not_a_status).collect())


def test_float_counters_go_out_as_they_are() -> None:
    status = snapshot()
    _, samples = scrape(status)
    assert samples[("loaded_worker_cpu_seconds_total", L(worker=0, queue=0))] == 12.75
    assert not math.isnan(samples[("loaded_worker_packets_total", L(worker=0, queue=0))])
