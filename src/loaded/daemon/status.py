"""The daemon's status snapshot (a ``loaded.core.status.Status``): what ``loaded
status``, the metrics endpoint and the status page show, assembled from what the
supervisor knows.

Inputs, all plain data: each worker's latest report (its counters and its view
of every pool), the health monitor's targets, the administrative state the
operator set, and on the conntrack path the kernel's per-backend counters.

Rules:

- A backend's clients, new clients, packets and bytes are the sums over the
  workers (each worker owns a disjoint share of the clients), plus what workers
  that died had counted (``retired``), so that counters never go down. On the conntrack
  path the workers see first packets only, so packets and bytes come from the
  kernel's counters of the backend's connections, both directions
  (``counters``). On the per-packet path the kernel rewrites most replies
  itself and counts them (``reply_counters``), which add to the workers' counts.
- State and weight come from the workers' pools (they all apply the same
  commands); a backend only the supervisor knows yet (just added) shows as its
  command says.
- ``client_table_max`` is the bound on each VIP's clients over all workers
  (each worker holds an equal share of it).
- ``health`` is ``unknown`` until a first probe result (or without failover).
- ``kernel_drops`` (conntrack path only, absent on the per-packet path):
  packets the kernel dropped before any worker saw them, by reason, as
  counters; today ``conntrack-invalid``, the guard chain's drops of packets
  conntrack calls invalid. Without it those drops would be in the stats file
  alone, invisible in ``loaded status``, the metrics and the page.
- A worker's own counters (``WorkerReport``) are there once it has reported
  (its report has a ``pid``); before, and after it died, only what the
  supervisor knows of it.
- Times go out as Unix time; the supervisor's clocks are monotonic.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from loaded.core.health import TargetStatus
from loaded.core.status import (
    BackendStatus,
    DaemonInfo,
    KernelHashStatus,
    LastCheck,
    QueueStatus,
    ServiceStatus,
    Status,
    WorkerReport,
    WorkerStatus,
)

_SUMMED = ("clients", "new_clients", "packets", "bytes")


def build_status(*, daemon: Mapping[str, Any], vips: Iterable[tuple[int, str]], strategy: str,
                 datapath: str, workers: Sequence[Mapping[str, Any]],
                 health: Iterable[TargetStatus], admin: Mapping[tuple[str, str], str],
                 transitions: Mapping[tuple[str, str], int],
                 counters: Mapping[int, tuple[int, int]] | None,
                 kernel_queues: Mapping[str, Mapping[str, int]], endpoints: Mapping[str, str],
                 now_mono: float, now_wall: float,
                 extra_backends: Mapping[tuple[str, str], Mapping[str, Any]] | None = None,
                 retired: Mapping[tuple[str, str], Mapping[str, int]] | None = None,
                 client_table_max: int | None = None,
                 kernel_drops: Mapping[str, int] | None = None,
                 reply_counters: Mapping[int, tuple[int, int]] | None = None,
                 kernel_hash: KernelHashStatus | None = None,
                 ) -> Status:
    """``daemon``: pid, tag, config, version, uptime, started_at (``DaemonInfo``
    without the datapath); ``workers``: each worker's latest report with the
    supervisor's ``index``, ``queue``, ``alive``, ``restarts``; ``kernel_queues``:
    ``read_proc_stats()`` of the daemon's queues."""
    by_target = {(str(t.vip), str(t.ip)): t for t in health}
    services = []
    for family, vip in vips:
        # Per backend, in the order first seen: weight, state, mark, and the sums.
        merged: dict[str, tuple[int, str, int | None, dict[str, int]]] = {}
        clients = 0
        for w in workers:
            svc = w.get("services", {}).get(vip)
            if not svc:
                continue
            clients += int(svc.get("clients", 0))
            for ip, b in svc.get("backends", {}).items():
                if ip not in merged:
                    merged[ip] = (int(b.get("weight", 1)), str(b.get("state")), b.get("mark"),
                                  dict.fromkeys(_SUMMED, 0))
                sums = merged[ip][3]
                for key in _SUMMED:
                    sums[key] += int(b.get(key, 0))
        for (v, ip), extra in (extra_backends or {}).items():
            if v == vip and ip not in merged:
                merged[ip] = (int(extra.get("weight", 1)), str(extra.get("state", "up")),
                              extra.get("mark"), dict.fromkeys(_SUMMED, 0))
        for (v, ip), carried in (retired or {}).items():
            if v == vip and ip in merged:
                for key in ("packets", "bytes", "new_clients"):
                    merged[ip][3][key] += int(carried.get(key, 0))
        backends = []
        for ip, (weight, state, mark, sums) in merged.items():
            packets, nbytes = sums["packets"], sums["bytes"]
            if counters is not None and mark is not None:
                packets, nbytes = counters.get(mark, (0, 0))
            if reply_counters is not None and mark is not None:
                more_packets, more_bytes = reply_counters.get(mark, (0, 0))
                packets += more_packets
                nbytes += more_bytes
            target = (vip, ip)
            t = by_target.get(target)
            if t is None or t.last_at is None:
                health_now, check = "unknown", None
            else:
                health_now = "up" if t.up else "down"
                check = LastCheck(ok=bool(t.last_ok), detail=t.reason,
                                  at=now_wall - (now_mono - t.last_at), latency=t.latency,
                                  check=t.check)
            backends.append(BackendStatus(
                address=ip, weight=weight, state=state, mark=mark, clients=sums["clients"],
                new_clients=sums["new_clients"], packets=packets, bytes=nbytes,
                admin=admin.get(target, "enabled"), transitions=transitions.get(target, 0),
                health=health_now, last_check=check))
        backends.sort(key=lambda b: (b.mark is None, b.mark or 0, b.address))
        services.append(ServiceStatus(
            vip=vip, family=family, strategy=strategy, datapath=datapath, clients=clients,
            client_table_max=client_table_max, backends=tuple(backends)))
    return Status(
        daemon=DaemonInfo(**daemon, datapath=datapath),
        services=tuple(services),
        workers=tuple(_worker(w) for w in workers),
        kernel_queues={int(q): QueueStatus(**stats) for q, stats in kernel_queues.items()},
        endpoints=dict(endpoints),
        kernel_drops=None if kernel_drops is None else dict(kernel_drops),
        kernel_hash=kernel_hash)


def _worker(w: Mapping[str, Any]) -> WorkerStatus:
    # The report is the worker's snapshot as it sent it over its pipe, in the
    # status JSON's shape: the snapshot's own decoder reads it.
    report = WorkerReport.from_json(w) if "pid" in w else None
    return WorkerStatus(index=int(w["index"]), queue=int(w["queue"]), alive=bool(w["alive"]),
                        restarts=int(w["restarts"]), drops=dict(w.get("drops", {})),
                        report=report)
