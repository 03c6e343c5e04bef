"""A bounded storm of malformed packets on the wire, on both data paths (issue 13).

Every kind of malformed packet of ``test_balancing`` and more (20 kinds, IPv4
and IPv6, ``loaded.lab.malformed``), each from many distinct source
addresses: from the client side to the VIPs (512 spoofed sources beside the
client network, so that they spread over every worker) and, for the kinds
that are neither TCP nor UDP, from every backend to many client addresses
(the return path), interleaved with legitimate TCP and UDP requests from
every client address of the lab. Bounded: a fixed count, paced, and a time
limit. Afterwards:

- each kind is counted exactly, under its reason, in the daemon's drop
  counters (the workers' ``drops``; on the conntrack path the ``guard``
  chain's ``invalid`` counter for what conntrack rejects before any queue),
  and nothing else is counted;
- every queue in the balancer's namespace has nothing waiting, no queue or
  user drops, is still bound by the same worker, and the kernel's count of
  packets it queued (``id_sequence``) equals the packets that worker answered;
- every worker is alive with the pid it had before, never restarted;
- every legitimate request was answered (no retry: a UDP request is one
  datagram).

On the conntrack path the backend side is not the daemon's: there is no
FORWARD chain, nothing from the backends is queued, so those packets must
leave every counter untouched.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from loaded.lab import traffic
from loaded.lab.balancer import kernel_queues
from loaded.lab.malformed import KINDS, Kind, expected, spoofed_sources
from loaded.lab.netns import pid_alive
from loaded.lab.topology import Lab
from tests.e2e.conftest import PORT, Daemon
from tests.e2e.test_balancing import counted_drops

CLIENTS = 24  # legitimate client addresses per family
SPOOFED = 256  # distinct source addresses of the client-side storm, per family
PER_KIND_CLIENT = 1500  # packets of each kind from the client side
PER_KIND_BACKEND = 900  # packets of each kind from the backends
RATE = 10_000  # malformed packets per second, all senders together
STORM_LIMIT = 20.0  # seconds: the storm stops by then whatever it has sent
MIN_LEGIT = 96  # legitimate requests at least (half TCP, half UDP, both families)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """This module's own lab (it overrides conftest's): more client addresses."""
    with Lab(backends=3, clients=CLIENTS) as lab:
        lab.start_servers(PORT)
        yield lab


# ----------------------------------------------------------------- packets


@dataclass
class Shot:
    ns: str
    family: int
    packet: bytes
    dst: str
    kind: Kind
    side: str


def storm_plan(lab: Lab) -> list[Shot]:
    """Every packet of the storm, kinds interleaved round by round."""
    shots: list[Shot] = []
    vip = {4: lab.vip4, 6: lab.vip6}
    legit = {4: lab.clients4, 6: lab.clients6}
    for r in range(PER_KIND_CLIENT):
        for k, kind in enumerate(KINDS):
            srcs = spoofed_sources(kind.family, SPOOFED)
            src = srcs[(r * len(KINDS) + k) % len(srcs)]
            peer = srcs[(r * len(KINDS) + k + 1) % len(srcs)]
            shots.append(Shot("cl", kind.family, kind.build(src, vip[kind.family], peer),
                              vip[kind.family], kind, "client"))
        if r >= PER_KIND_BACKEND:
            continue
        b = lab.backends[r % len(lab.backends)]
        for k, kind in enumerate(KINDS):
            if not kind.backend_side:
                continue
            src = b.addr4 if kind.family == 4 else b.addr6
            dsts = legit[kind.family]
            dst = dsts[(r * len(KINDS) + k) % len(dsts)]
            peer = dsts[(r + 1) % len(dsts)]
            shots.append(Shot(b.ns, kind.family, kind.build(src, dst, peer), dst, kind,
                              "backend"))
    return shots


# ----------------------------------------------------------------- reading


def queues_settled(lab: Lab, stats: dict[str, Any]) -> bool:
    """Every queue empty, and every packet it queued answered by its worker as
    the worker last reported (the stats file lags by up to a second or two)."""
    queues = kernel_queues(lab)
    workers = {w["queue"]: w for w in stats["workers"]}
    return set(queues) == set(workers) and all(
        q["waiting"] == 0 and q["id_sequence"] == workers[n]["packets"]
        for n, q in queues.items())


def settled(d: Daemon, lab: Lab, want: Counter[str], timeout: float = 10.0) -> dict[str, Any]:
    """The stats once they count ``want`` and the queues are settled, or the last
    ones read after ``timeout`` (the caller's asserts then say what differs)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = d.stats()
        if counted_drops(stats) == want and queues_settled(lab, stats):
            return stats
        if time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


# ------------------------------------------------------------------- storm


class Storm:
    """Sends the planned shots from one thread per namespace, bounded by count
    and by ``STORM_LIMIT`` seconds; records what it sent."""

    def __init__(self, lab: Lab, shots: list[Shot]) -> None:
        self.sent: list[Shot] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        by_ns: dict[str, list[Shot]] = {}
        for s in shots:
            by_ns.setdefault(s.ns, []).append(s)
        self._socks: dict[tuple[str, int], socket.socket] = {}
        for ns in by_ns:
            for fam, af in ((4, socket.AF_INET), (6, socket.AF_INET6)):
                self._socks[ns, fam] = lab.socket(ns, af, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self._threads = [threading.Thread(target=self._send, args=(s,), daemon=True)
                         for s in by_ns.values()]
        self._total = len(shots)
        self._end = time.monotonic() + STORM_LIMIT

    def _send(self, shots: list[Shot]) -> None:
        sent = []
        rate = RATE * len(shots) / self._total  # this thread's share
        start = time.monotonic()
        for i, s in enumerate(shots):
            if time.monotonic() > self._end:
                break
            try:
                self._socks[s.ns, s.family].sendto(s.packet, (s.dst, 0))
            except OSError as e:
                with self._lock:
                    self.errors.append(f"{s.kind.name} from {s.ns}: {e}")
                break
            sent.append(s)
            if i % 32 == 31:  # paced: the legitimate requests go on in between
                time.sleep(max(0.0, start + (i + 1) / rate - time.monotonic()))
        with self._lock:
            self.sent += sent

    def __enter__(self) -> Storm:
        for t in self._threads:
            t.start()
        return self

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def __exit__(self, *exc: object) -> None:
        self._end = 0.0
        for t in self._threads:
            t.join(STORM_LIMIT + 5)
        for sock in self._socks.values():
            sock.close()


def legit_request(lab: Lab, i: int) -> tuple[str, str, str | None]:
    """The i-th legitimate request: (what, client, error or None)."""
    family = 4 if i % 2 == 0 else 6
    proto = "tcp" if i % 4 < 2 else "udp"
    clients = lab.clients4 if family == 4 else lab.clients6
    client = clients[(i // 4) % len(clients)]
    dst = lab.vip4 if family == 4 else lab.vip6
    try:
        if proto == "tcp":
            line = traffic.tcp_request(client, dst, PORT, timeout=5, ns=lab.ns("cl"))
        else:
            line = traffic.udp_request(client, dst, PORT, timeout=5, attempts=1,
                                       ns=lab.ns("cl"))
        name, seen = line.split()
        if seen != client or name not in {b.name for b in lab.backends}:
            return f"{proto}{family}", client, f"unexpected answer {line!r}"
        return f"{proto}{family}", client, None
    except (OSError, ValueError) as e:
        return f"{proto}{family}", client, f"{type(e).__name__}: {e}"


# ------------------------------------------------------------------- tests


def test_malformed_storm_is_counted_exactly_and_harms_nobody(lab: Lab, daemon_factory: Any,
                                                            datapath: str) -> None:
    d: Daemon = daemon_factory("storm.conf").start()
    # every worker has reported (the stats file can list one before it has)
    before = d.wait_stats(lambda s: bool(s["workers"])
                          and all(w.get("alive") and w.get("pid") for w in s["workers"]))
    pids = {w["queue"]: w["pid"] for w in before["workers"]}
    shots = storm_plan(lab)
    results: list[tuple[str, str, str | None]] = []
    t0 = time.monotonic()
    with Storm(lab, shots) as storm:
        i = 0
        # Requests go on for as long as the storm lasts, and at least MIN_LEGIT.
        while ((storm.running or i < MIN_LEGIT)
               and time.monotonic() - t0 < STORM_LIMIT + 10):
            results.append(legit_request(lab, i))
            i += 1
            time.sleep(0.005)
    took = time.monotonic() - t0
    assert storm.errors == []
    sent = len(storm.sent)
    assert sent == len(shots), f"the storm stopped at its time limit ({took:.1f} s)"
    failed = [r for r in results if r[2] is not None]
    assert failed == [], failed[:10]
    assert len({c for _, c, _ in results}) == 2 * CLIENTS  # every client address spoke

    want = expected(((s.kind, s.side) for s in storm.sent), datapath)
    stats = settled(d, lab, want)
    counted = counted_drops(stats)
    assert dict(counted) == dict(want)  # each reason exactly, and nothing else

    queues = kernel_queues(lab)
    for n, q in queues.items():
        w = next(w for w in stats["workers"] if w["queue"] == n)
        assert q["waiting"] == 0 and q["queue_dropped"] == 0 and q["user_dropped"] == 0, q
        assert q["portid"] == w["pid"] == pids[n]  # still bound by the same worker
        assert q["id_sequence"] == w["packets"] == w["accepted"] + w["dropped"]
        assert not w["verdict_errors"] and not w["overruns"] and not w["truncated"], w
    for w in stats["workers"]:
        assert w["alive"] and w["restarts"] == 0 and pid_alive(w["pid"])
        assert w["pid"] == pids[w["queue"]]
    assert stats["pid"] == before["pid"]
    assert d.problems() == []
    kinds = Counter(s.kind.name for s in storm.sent)
    print(f"\n{datapath}: {len(storm.sent)} malformed packets of {len(kinds)} kinds "
          f"({sum(s.side == 'client' for s in storm.sent)} from "
          f"{2 * SPOOFED} client-side sources, "
          f"{sum(s.side == 'backend' for s in storm.sent)} from {len(lab.backends)} backends) "
          f"and {len(results)} legitimate requests in {took:.1f} s; counted "
          f"{dict(sorted(counted.items()))}; queued "
          f"{sum(q['id_sequence'] for q in queues.values())} packets, every one answered")
    assert d.stop() == 0
