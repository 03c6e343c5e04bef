"""The status snapshot, from worker reports, health and kernel counters."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from loaded.core.health import TargetStatus
from loaded.core.status import LastCheck, Status, StatusError
from loaded.daemon.operator import _merge_lists, _merge_lookups
from loaded.daemon.status import build_status
from tests.daemon.test_supervisor import servers, supervisor

VIP = "198.18.1.100"
QUEUE = {"portid": 4000, "waiting": 0, "copy_mode": 2, "copy_range": 65535,
         "queue_dropped": 0, "user_dropped": 0, "id_sequence": 7}  # read_proc_stats()


def worker(index: int, b1: tuple[int, int, int, int], b2: tuple[int, int, int, int]
           ) -> dict[str, Any]:
    """A worker's report as ``Worker.snapshot()`` makes it, with what the supervisor adds."""
    def b(v: tuple[int, int, int, int], mark: int, state: str = "up") -> dict[str, Any]:
        clients, new, packets, size = v
        return {"clients": clients, "new_clients": new, "packets": packets, "bytes": size,
                "state": state, "weight": 2, "mark": mark}
    return {"index": index, "queue": index, "pid": 100 + index, "packets": 9, "accepted": 9,
            "dropped": 0, "batches": 3, "overruns": 0, "truncated": 0, "verdict_errors": {},
            "drops": {}, "refused": 0, "cpu_seconds": 0.25,
            "latency": {"buckets": [[1e-05, 4], [2.5e-05, 9]], "sum": 0.0001, "count": 9},
            "services": {VIP: {"clients": b1[0] + b2[0], "backends": {
                "198.19.0.11": b(b1, 0x4C420000), "198.19.0.12": b(b2, 0x4C420001)}}},
            "restarts": 0, "alive": True}


def build(counters: dict[int, tuple[int, int]] | None = None, **kw: Any) -> Status:
    args: dict[str, Any] = {
        "daemon": {"pid": 1, "tag": "abc", "config": "/etc/loaded/lb.conf", "version": "0.1.0",
                   "uptime": 5.0, "started_at": 995.0},
        "vips": [(4, VIP)], "strategy": "rr",
        "datapath": "perpacket" if counters is None else "conntrack",
        "workers": [worker(0, (1, 2, 10, 100), (3, 3, 30, 300)),
                    worker(1, (2, 2, 20, 200), (0, 1, 5, 50))],
        "health": [], "admin": {}, "transitions": {}, "counters": counters,
        "kernel_queues": {"0": QUEUE}, "endpoints": {}, "now_mono": 100.0,
        "now_wall": 1000.0}
    args.update(kw)
    return build_status(**args)


def test_backends_are_summed_over_workers() -> None:
    s = build()
    svc = s.services[0]
    assert svc.clients == 6 and svc.datapath == "perpacket"
    b1, b2 = svc.backends
    assert (b1.address, b1.clients, b1.new_clients, b1.packets, b1.bytes) == (
        "198.19.0.11", 3, 4, 30, 300)
    assert (b2.clients, b2.packets) == (3, 35)
    assert b1.health == "unknown" and b1.admin == "enabled" and b1.last_check is None
    assert "services" not in s.to_json()["workers"][0] and s.daemon.datapath == "perpacket"


def test_conntrack_counters_replace_first_packet_counts() -> None:
    s = build(counters={0x4C420000: (5000, 7_000_000)})
    b1, b2 = s.services[0].backends
    assert (b1.packets, b1.bytes) == (5000, 7_000_000)
    assert (b2.packets, b2.bytes) == (0, 0)  # no connection yet


def test_health_admin_and_backends_only_the_supervisor_knows() -> None:
    t = TargetStatus(ipaddress.ip_address(VIP), ipaddress.ip_address("198.19.0.12"), False,
                     90.0, "connection refused", 0.001, "tcp:80", False, 7, False, 99.0)
    s = build(health=[t], admin={(VIP, "198.19.0.11"): "drain"},
              transitions={(VIP, "198.19.0.12"): 3},
              extra_backends={(VIP, "198.19.0.13"): {"weight": 1, "state": "up",
                                                      "mark": 0x4C420002}})
    b1, b2, b3 = s.services[0].backends
    assert b1.admin == "drain"
    assert b2.health == "down" and b2.transitions == 3
    assert b2.last_check == LastCheck(ok=False, detail="connection refused", at=999.0,
                                      latency=0.001, check="tcp:80")
    assert b3.address == "198.19.0.13" and b3.clients == 0


def test_client_answers_of_workers_are_merged() -> None:
    lists = [[{"vip": VIP, "total": 2, "clients": [["198.18.0.1", "b", 5.0],
                                                   ["198.18.0.2", "b", 1.0]]}],
             [{"vip": VIP, "total": 1, "clients": [["198.18.0.3", "c", 3.0]]}]]
    merged = _merge_lists(lists, limit=2)
    assert merged == {"services": [{"vip": VIP, "total": 3, "clients": [
        ["198.18.0.2", "b", 1.0], ["198.18.0.3", "c", 3.0]]}]}
    lookups = [[{"vip": VIP, "backend": None}], [{"vip": VIP, "backend": "198.19.0.11"}]]
    assert _merge_lookups("198.18.0.1", lookups)["services"] == [
        {"vip": VIP, "backend": "198.19.0.11"}]


def test_kernel_drops_on_the_conntrack_path_only() -> None:
    s = build(counters={}, kernel_drops={"conntrack-invalid": 7})
    assert s.kernel_drops == {"conntrack-invalid": 7}
    assert s.to_json()["kernel_drops"] == {"conntrack-invalid": 7}
    # per-packet path: the kernel drops nothing of ours, and the key is absent
    assert build().kernel_drops is None and "kernel_drops" not in build().to_json()


def test_the_supervisor_reports_conntrack_invalid_drops(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, servers(11), datapath="conntrack")
    sup.sync.invalid = 42  # what the guard chain's counter said at the last reading
    assert sup.status().kernel_drops == {"conntrack-invalid": 42}
    other = tmp_path / "pp"
    other.mkdir()
    assert supervisor(other, servers(11), datapath="perpacket").status().kernel_drops is None


def test_the_json_is_the_protocol_shape_and_decodes_back(tmp_path: Path) -> None:
    s = build(counters={0x4C420000: (5000, 7_000_000)}, kernel_drops={"conntrack-invalid": 1},
              client_table_max=1000)
    data = s.to_json()
    assert set(data) == {"daemon", "services", "workers", "kernel_queues", "endpoints",
                         "kernel_drops"}
    assert set(data["daemon"]) == {"pid", "tag", "config", "version", "uptime", "started_at",
                                   "datapath"}
    assert set(data["services"][0]) == {"vip", "family", "strategy", "datapath", "clients",
                                        "client_table_max", "backends"}
    assert set(data["services"][0]["backends"][0]) == {
        "address", "weight", "state", "mark", "clients", "new_clients", "packets", "bytes",
        "admin", "transitions", "health", "last_check"}
    # A worker's object is its report (less its pools) and what the supervisor adds.
    report = {k: v for k, v in worker(0, (0, 0, 0, 0), (0, 0, 0, 0)).items() if k != "services"}
    assert data["workers"][0] == report
    assert data["kernel_queues"] == {"0": QUEUE}
    assert Status.from_json(json.loads(json.dumps(data))) == s
    # what the supervisor builds, before any worker reported, round-trips too
    fresh = supervisor(tmp_path, servers(11), datapath="conntrack").status()
    assert fresh.to_json()["workers"] == [
        {"index": 0, "queue": 0, "drops": {}, "restarts": 0, "alive": False}]
    assert Status.from_json(json.loads(json.dumps(fresh.to_json()))) == fresh


def test_a_bad_worker_report_is_a_status_error() -> None:
    bad = dict(worker(0, (0, 0, 0, 0), (0, 0, 0, 0)), packets="9")
    with pytest.raises(StatusError, match=r"report.packets: expected an integer, got str"):
        build(workers=[bad])
