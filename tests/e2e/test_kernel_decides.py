"""Who decides for a new client, what the kernel remembers, and the overload
fall-back, on the wire (issue 11).

- ``sh``/``maglev`` on the conntrack path: the kernel picks a new client's
  backend with its hash table; no packet of it reaches a queue, and the
  choice is the one user space makes (the engine's strategy, ``replay``).
- Every path with a kernel client map: the kernel learns each client from the
  mark of its first connection, whoever chose it; the daemon writes none.
- ``fail_open=hash``: with the workers frozen behind a one-packet queue, a
  new client is still balanced, by the kernel's table.
"""

from __future__ import annotations

import ipaddress
import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.utils import wrpcap

from loaded.core.config import load_config
from loaded.core.engine import build_engine
from loaded.core.hashing import jhash_bucket
from loaded.core.strategies import hash_table
from loaded.lab import traffic
from loaded.lab.balancer import kernel_queues
from loaded.lab.topology import Lab
from tests.e2e.conftest import PORT, Daemon, frozen_full_queues

CLIENTS = 48


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(backends=3, clients=CLIENTS) as lab:
        lab.start_servers(PORT)
        yield lab


def served(lab: Lab, client: str, vip: str, proto: str = "tcp") -> str:
    """The name of the backend that answered ``client``."""
    if proto == "tcp":
        line = traffic.tcp_request(client, vip, PORT, timeout=5, ns=lab.ns("cl"))
    else:
        line = traffic.udp_request(client, vip, PORT, timeout=5, attempts=3, ns=lab.ns("cl"))
    name, seen = line.split()
    assert seen == client  # the client's address preserved
    return name


def queued(lab: Lab) -> int:
    """Packets the balancer's queues have taken so far (the kernel's own count)."""
    return sum(q["id_sequence"] for q in kernel_queues(lab).values())


def user_space_choice(d: Daemon, lab: Lab, client: str) -> str:
    """The backend a worker's engine picks for a new ``client`` (name)."""
    config = load_config(d.conf)
    ip = ipaddress.ip_address(client)
    engine = build_engine(config, 0.0, (ip.version,))
    b = engine.services[0].strategy.choose(ip.packed)
    assert b is not None
    return next(x.name for x in lab.backends if str(b.ip) in (x.addr4, x.addr6))


def name_of(lab: Lab, address: str | None) -> str | None:
    return next((b.name for b in lab.backends if address in (b.addr4, b.addr6)), None)


@pytest.mark.parametrize("datapath", ["conntrack"])
@pytest.mark.parametrize("strategy", ["maglev", "sh"])
def test_the_kernel_decides_for_hash_strategies(lab: Lab, daemon_factory: Any,
                                               strategy: str) -> None:
    d: Daemon = daemon_factory(f"kd-{strategy}.conf", strategy=strategy,
                               hash_seed="0x5eed").start()
    clients = lab.clients4[:CLIENTS // 2] + lab.clients6[:CLIENTS // 2]
    before = queued(lab)
    got = {c: served(lab, c, lab.vip6 if ":" in c else lab.vip4) for c in clients}
    assert queued(lab) == before, "a new TCP client of a hash strategy reached a worker"
    want = {c: user_space_choice(d, lab, c) for c in clients}
    assert got == want
    assert len(set(got.values())) == 3  # spread over every backend
    # UDP too, and the kernel counted its own decisions
    for c in clients[:4]:
        assert served(lab, c, lab.vip4 if ":" not in c else lab.vip6, "udp") == got[c]
    assert queued(lab) == before
    # the kernel learned every client, and the control interface says so
    found = d.control("clients", "lookup", clients[0])
    assert found["kernel"] is not None and name_of(lab, found["kernel"]["backend"]) == got[
        clients[0]]
    assert d.wait_stats(lambda s: s.get("kernel_hash", {}).get("hashed", 0) >= len(clients))
    table = d.control("status")["kernel_hash"]
    assert (table["strategy"], table["buckets"], table["seed"], table["decides"]) == (
        strategy, 65537, 0x5EED, True)
    # replay (a worker's decision offline, from a capture) agrees with the kernel's
    assert lab.workdir is not None
    capture, written = lab.workdir / f"syns-{strategy}.pcap", lab.workdir / "out.pcap"
    wrpcap(str(capture), [
        (IPv6(src=c, dst=lab.vip6) if ":" in c else IP(src=c, dst=lab.vip4))
        / TCP(sport=40000, dport=PORT, flags="S") for c in clients], linktype=101)
    out = lab.run("lb", [sys.executable, "-m", "loaded", "replay", "-c", str(d.conf),
                         "--datapath", "conntrack", "--json", str(capture), str(written)],
                  check=True)
    replayed = [json.loads(line)["backend"] for line in out.stdout.splitlines()]
    assert [name_of(lab, b) for b in replayed] == [got[c] for c in clients]
    assert d.stop() == 0


@pytest.mark.parametrize("datapath", ["conntrack"])
def test_the_kernel_learns_a_workers_decision(lab: Lab, daemon_factory: Any) -> None:
    d: Daemon = daemon_factory("learn.conf", strategy="rr").start()
    client = lab.clients4[5]
    before = queued(lab)
    first = served(lab, client, lab.vip4)
    assert queued(lab) == before + 1  # the SYN went to a worker, which chose
    # the kernel remembered the worker's choice from its mark: nobody wrote it
    found = d.control("clients", "lookup", client)
    assert found["kernel"] is not None and name_of(lab, found["kernel"]["backend"]) == first
    assert 250 < found["kernel"]["expires"] <= 300  # client_timeout, in the kernel
    # its next connections: the kernel's, to the same backend, none queued
    again = [served(lab, client, lab.vip4) for _ in range(5)]
    assert again == [first] * 5 and queued(lab) == before + 1
    # a backend cut: the kernel forgets its clients, the next choice is new
    backend = next(b for b in lab.backends if b.name == first)
    d.control("backend", "disable", backend.addr4)
    deadline = time.monotonic() + 5
    while d.control("clients", "lookup", client)["kernel"] is not None:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert served(lab, client, lab.vip4) != first
    assert d.stop() == 0


@pytest.mark.parametrize(("datapath", "strategy"), [("conntrack", "rr"),
                                                    ("conntrack", "lc"),
                                                    ("perpacket", "maglev")])
def test_a_full_queue_falls_back_to_the_kernels_table(lab: Lab, daemon_factory: Any,
                                                      datapath: str, strategy: str) -> None:
    d: Daemon = daemon_factory(f"fb-{strategy}.conf", nfq_len=1, strategy=strategy,
                               fail_open="hash").start()
    with frozen_full_queues(lab, d, lab.clients4[:12]):  # nobody reads the full queues
        queue_full = {q: v["waiting"] for q, v in kernel_queues(lab).items()}
        assert all(n >= 1 for n in queue_full.values()), queue_full
        # new clients the frozen workers never saw: balanced by the kernel's
        # table, as a worker of the same table would have
        config = load_config(d.conf)
        tables = {f: hash_table("maglev", build_engine(config, 0.0, (f,)).services[0]
                                .pool.eligible(), config.hash_table_size) for f in (4, 6)}
        for c in lab.clients4[20:26] + lab.clients6[20:26]:
            ip = ipaddress.ip_address(c)
            vip = lab.vip6 if ip.version == 6 else lab.vip4
            b = tables[ip.version][jhash_bucket(ip.packed, config.hash_seed,
                                                config.hash_table_size)]
            assert b is not None
            assert served(lab, c, vip) == name_of(lab, str(b.ip)), c
        dropped = sum(v["queue_dropped"] for v in kernel_queues(lab).values())
        assert dropped == 0  # nothing was dropped: the kernel took what the queue could not
    assert d.stop() == 0
