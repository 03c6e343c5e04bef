"""The per-packet path's rewrites in the kernel: a worker decides every packet to
the VIP, but answers a plain TCP or UDP one with its backend's mark, which the
kernel turns into the destination; the backends' TCP and UDP replies never reach
a worker. What the kernel cannot rewrite (ICMP, fragments) is rewritten by a
worker. Both data paths must get every case right."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from loaded.lab import traffic
from loaded.lab.topology import Lab
from tests.e2e.conftest import PORT, Daemon


def queued(d: Daemon) -> int:
    return sum(int(w.get("packets", 0)) for w in d.stats()["workers"])


def counters(lab: Lab, d: Daemon) -> dict[str, int]:
    out = lab.run("lb", ["nft", "-j", "list", "counters", "table", "inet", f"loaded_{d.tag}"],
                  check=True).stdout
    return {i["counter"]["name"]: int(i["counter"]["packets"])
            for i in json.loads(out)["nftables"] if "counter" in i}


def reply_counters(lab: Lab, d: Daemon) -> int:
    return sum(v for k, v in counters(lab, d).items() if k.startswith("backend_"))


def settled(d: Daemon, predicate: Any) -> int:
    """The workers' packet count once their report satisfies ``predicate``."""
    stats = d.wait_stats(lambda s: predicate(sum(int(w.get("packets", 0))
                                                 for w in s["workers"])))
    return sum(int(w.get("packets", 0)) for w in stats["workers"])


@pytest.mark.parametrize("family", [4, 6])
def test_replies_are_rewritten_in_the_kernel(lab: Lab, daemon_factory: Any, family: int,
                                             datapath: str) -> None:
    if datapath != "perpacket":
        pytest.skip("the conntrack path never queues replies")
    d: Daemon = daemon_factory().start()
    client = (lab.clients4 if family == 4 else lab.clients6)[2]
    vip = lab.vip4 if family == 4 else lab.vip6
    before_q, before_k = queued(d), reply_counters(lab, d)
    before_s = counters(lab, d)["steered"]
    n = 10
    for _ in range(n):
        _, seen = traffic.udp_request(client, vip, PORT, timeout=5, attempts=1,
                                      ns=lab.ns("cl")).split()
        assert seen == client
    # the requests went through a worker, which answered with the backend's mark
    # (the kernel rewrote them); the replies did not
    assert settled(d, lambda q: q >= before_q + n) == before_q + n
    assert counters(lab, d)["steered"] == before_s + n
    assert reply_counters(lab, d) == before_k + n
    # ICMP replies still go to the worker (an error quotes the client's packet)
    result = traffic.ping(lab.ns("cl"), client, vip, count=3, interval=0.05)
    assert result.ok, result.output
    assert settled(d, lambda q: q >= before_q + n + 6) == before_q + n + 6
    assert counters(lab, d)["steered"] == before_s + n  # echo requests: rewritten by it
    # the status adds the kernel's count to the workers' (read once a second)
    def through_backends() -> int:
        return sum(b["packets"] for s in d.control("status")["services"]
                   if s["family"] == family for b in s["backends"])
    deadline = time.monotonic() + 5
    while through_backends() < 2 * n + 6 and time.monotonic() < deadline:
        time.sleep(0.3)
    assert through_backends() >= 2 * n + 6
    assert d.stop() == 0


@pytest.mark.parametrize("family", [4, 6])
def test_fragmented_datagrams_both_ways(lab: Lab, daemon_factory: Any, family: int,
                                        datapath: str) -> None:
    """A 4,000-byte UDP datagram is fragmented by the client on the way in and by
    the backend on the way back; every fragment reaches the same backend and the
    client gets the whole datagram back from the VIP, checksum intact."""
    d: Daemon = daemon_factory().start()
    client = (lab.clients4 if family == 4 else lab.clients6)[3]
    vip = lab.vip4 if family == 4 else lab.vip6
    payload = b"ECHO " + bytes(range(256)) * 16
    reply = traffic.udp_exchange(client, vip, PORT, payload, timeout=5, ns=lab.ns("cl"))
    line, echoed = reply.split(b"\n", 1)
    assert line.split()[1].decode() == client
    assert echoed == payload
    assert d.stop() == 0
    assert d.problems() == []


@pytest.mark.parametrize("family", [4, 6])
def test_a_backends_icmp_error_reaches_the_clients_socket(lab: Lab, daemon_factory: Any,
                                                          family: int, datapath: str) -> None:
    """A datagram to a port no backend listens on: the backend's port unreachable
    quotes the packet it got (client -> backend). Only if the balancer rewrites
    the outer source and the quoted destination to the VIP does the client's
    connected socket see it, as a refusal, at once instead of a timeout."""
    d: Daemon = daemon_factory().start()
    client = (lab.clients4 if family == 4 else lab.clients6)[4]
    vip = lab.vip4 if family == 4 else lab.vip6
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        traffic.udp_request(client, vip, PORT + 1, timeout=4, attempts=2, ns=lab.ns("cl"))
    assert time.monotonic() - started < 3.5
    assert d.stop() == 0
    assert d.problems() == []
