"""The daemon's status snapshot: what ``loaded status``, the metrics endpoint and
the status page show, assembled from what the supervisor knows.

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
- Times go out as Unix time; the supervisor's clocks are monotonic.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from loaded.core.health import TargetStatus


def build_status(*, daemon: Mapping[str, Any], vips: Iterable[tuple[int, str]], strategy: str,
                 datapath: str, workers: Sequence[Mapping[str, Any]],
                 health: Iterable[TargetStatus], admin: Mapping[tuple[str, str], str],
                 transitions: Mapping[tuple[str, str], int],
                 counters: Mapping[int, tuple[int, int]] | None,
                 kernel_queues: Mapping[str, Any], endpoints: Mapping[str, str],
                 now_mono: float, now_wall: float,
                 extra_backends: Mapping[tuple[str, str], Mapping[str, Any]] | None = None,
                 retired: Mapping[tuple[str, str], Mapping[str, int]] | None = None,
                 client_table_max: int | None = None,
                 kernel_drops: Mapping[str, int] | None = None,
                 reply_counters: Mapping[int, tuple[int, int]] | None = None,
                 ) -> dict[str, Any]:
    by_target = {(str(t.vip), str(t.ip)): t for t in health}
    services = []
    for family, vip in vips:
        merged: dict[str, dict[str, Any]] = {}
        clients = 0
        for w in workers:
            svc = w.get("services", {}).get(vip)
            if not svc:
                continue
            clients += int(svc.get("clients", 0))
            for ip, b in svc.get("backends", {}).items():
                agg = merged.get(ip)
                if agg is None:
                    agg = merged[ip] = {
                        "address": ip, "weight": b.get("weight", 1), "state": b.get("state"),
                        "mark": b.get("mark"), "clients": 0, "new_clients": 0,
                        "packets": 0, "bytes": 0}
                for key in ("clients", "new_clients", "packets", "bytes"):
                    agg[key] += int(b.get(key, 0))
        for (v, ip), extra in (extra_backends or {}).items():
            if v == vip and ip not in merged:
                merged[ip] = {"address": ip, "weight": extra.get("weight", 1),
                              "state": extra.get("state", "up"), "mark": extra.get("mark"),
                              "clients": 0, "new_clients": 0, "packets": 0, "bytes": 0}
        for (v, ip), carried in (retired or {}).items():
            if v == vip and ip in merged:
                for key in ("packets", "bytes", "new_clients"):
                    merged[ip][key] += int(carried.get(key, 0))
        backends = []
        for ip, agg in merged.items():
            if counters is not None and agg.get("mark") is not None:
                agg["packets"], agg["bytes"] = counters.get(int(agg["mark"]), (0, 0))
            if reply_counters is not None and agg.get("mark") is not None:
                packets, nbytes = reply_counters.get(int(agg["mark"]), (0, 0))
                agg["packets"] += packets
                agg["bytes"] += nbytes
            target = (vip, ip)
            t = by_target.get(target)
            agg["admin"] = admin.get(target, "enabled")
            agg["transitions"] = transitions.get(target, 0)
            if t is None or t.last_at is None:
                agg["health"] = "unknown"
                agg["last_check"] = None
            else:
                agg["health"] = "up" if t.up else "down"
                agg["last_check"] = {"ok": bool(t.last_ok), "detail": t.reason,
                                     "at": now_wall - (now_mono - t.last_at),
                                     "latency": t.latency, "check": t.check}
            backends.append(agg)
        backends.sort(key=lambda b: (b.get("mark") is None, b.get("mark") or 0, b["address"]))
        services.append({"vip": vip, "family": family, "strategy": strategy,
                         "datapath": datapath, "clients": clients,
                         "client_table_max": client_table_max, "backends": backends})
    out = {
        "daemon": dict(daemon, datapath=datapath),
        "services": services,
        "workers": [_worker(w) for w in workers],
        "kernel_queues": dict(kernel_queues),
        "endpoints": dict(endpoints),
    }
    if kernel_drops is not None:
        out["kernel_drops"] = {str(k): int(v) for k, v in kernel_drops.items()}
    return out


def _worker(w: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in w.items() if k != "services"}
    out.setdefault("drops", {})
    return out
