"""What the daemon finds in the kernel stays as it was: nothing of the operator's
is replaced, and the undo takes back exactly what was added."""

from __future__ import annotations

import socket
import struct
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from loaded.core.checksum import checksum
from loaded.lab import traffic
from loaded.lab.topology import Lab
from tests.e2e.conftest import PORT, Daemon, kernel_state


@pytest.fixture
def operator_gateway(lab: Lab) -> Iterator[None]:
    """The operator's own addresses in the real-server nets on the private side,
    which give the kernel's routes to them (IPv6: proto kernel metric 256)."""
    added = [(f"{lab.private_gw4}/{lab.private_gw4_prefixlen}", []),
             (f"{lab.private_gw6}/{lab.private_gw6_prefixlen}", ["nodad"])]
    for addr, flags in added:
        lab.run("lb", ["ip", "addr", "add", addr, "dev", lab.priv_nic, *flags], check=True)
    try:
        yield
    finally:
        for addr, _ in added:
            lab.run("lb", ["ip", "addr", "del", addr, "dev", lab.priv_nic])


def routes_to(lab: Lab, family: int, net: str) -> list[str]:
    out = lab.run("lb", ["ip", f"-{family}", "route", "show", "table", "all", net],
                  check=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def test_an_existing_route_to_the_real_servers_is_kept(lab: Lab, daemon_factory: Any,
                                                       operator_gateway: None) -> None:
    before = kernel_state(lab)
    routes6, routes4 = routes_to(lab, 6, lab.rip6), routes_to(lab, 4, lab.rip4)
    assert len(routes6) == 1 and "proto kernel" in routes6[0]
    assert len(routes4) == 1 and "proto kernel" in routes4[0]
    d: Daemon = daemon_factory(private_GW=None).start()
    # An equivalent route was there: the daemon added none of its own.
    assert routes_to(lab, 6, lab.rip6) == routes6
    assert routes_to(lab, 4, lab.rip4) == routes4
    for c, v in ((lab.clients4[0], lab.vip4), (lab.clients6[0], lab.vip6)):
        _, seen = traffic.tcp_request(c, v, PORT, timeout=5, ns=lab.ns("cl")).split()
        assert seen == c
    assert d.stop() == 0
    assert routes_to(lab, 6, lab.rip6) == routes6
    assert kernel_state(lab) == before


def test_its_own_route_is_removed_exactly(lab: Lab, daemon_factory: Any) -> None:
    """No private gateway and no address in the net: the daemon adds the routes, and
    removes those (with their protocol and metric), nothing else."""
    before = kernel_state(lab)
    d: Daemon = daemon_factory(private_GW=None).start()
    during6 = routes_to(lab, 6, lab.rip6)
    during4 = routes_to(lab, 4, lab.rip4)
    assert len(during6) == 1 and "proto static metric 1024" in during6[0], during6
    assert len(during4) == 1 and "proto static" in during4[0], during4
    assert d.stop() == 0
    assert routes_to(lab, 6, lab.rip6) == [] and routes_to(lab, 4, lab.rip4) == []
    assert kernel_state(lab) == before


def test_another_instance_on_the_same_queues_names_the_owner(lab: Lab,
                                                             daemon_factory: Any) -> None:
    first: Daemon = daemon_factory("queues-a.conf").start()
    other = daemon_factory("queues-b.conf")  # another config file: another instance
    during = kernel_state(lab)
    second = lab.run("lb", [sys.executable, "-m", "loaded", "-D", "-c", str(other.conf)],
                     timeout=20)
    assert second.returncode == 1
    assert "reason=queue-in-use queue=0" in second.stderr
    assert any(f"pid {pid} " in second.stderr for pid in first.worker_pids()), second.stderr
    assert "FIRST_CORE= and LAST_CORE=" in second.stderr
    assert "Traceback" not in second.stderr
    assert kernel_state(lab) == during
    assert first.proc is not None and first.proc.poll() is None
    assert first.stop() == 0


def test_clean_stop_leaves_no_stats_file_and_logs_the_totals(lab: Lab,
                                                             daemon_factory: Any) -> None:
    d: Daemon = daemon_factory("clean-stop.conf", client_table_max=1001).start()
    traffic.tcp_request(lab.clients4[1], lab.vip4, PORT, timeout=5, ns=lab.ns("cl"))
    workers = len(d.stats()["workers"])
    # the VIP's bound over all workers, each holding an equal share
    status = d.control("status")
    assert {s["client_table_max"] for s in status["services"]} == {1001 // workers * workers}
    assert d.stop() == 0
    assert not d.stats_path.exists()
    final = [line for line in d.log.splitlines() if "event=worker-stopped" in line]
    assert len(final) == workers
    assert sum(int(line.split("packets=")[1].split()[0]) for line in final) >= 1
    assert all("queue=None" not in line and "pid=-" not in line for line in final), final
    # Nothing but our own log lines: no library chatter on stderr.
    assert "warning: stmt ops" not in d.log and "no json callback" not in d.log


def _icmp4_error_with_garbage_quote(src: str, dst: str) -> bytes:
    # a quote shorter than an IPv4 header: HMARK cannot read the inner addresses
    icmp = bytearray(struct.pack("!BBHI", 3, 1, 0, 0) + b"\x45" + b"\x99" * 7)
    icmp[2:4] = struct.pack("!H", checksum(bytes(icmp)))
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 7, 0, 64, 1, 0,
                                socket.inet_aton(src), socket.inet_aton(dst)))
    hdr[10:12] = struct.pack("!H", checksum(bytes(hdr)))
    return bytes(hdr + icmp)


def test_what_hmark_cannot_hash_still_meets_a_worker(lab: Lab, daemon_factory: Any,
                                                     datapath: str) -> None:
    """An ICMP error to the VIP whose quote is garbage: HMARK cannot hash it and
    leaves no mark. It used to match no queue rule and reach the balancer's own
    stack unseen; now the first worker gets it, and counts and drops it."""
    d: Daemon = daemon_factory("unhashed.conf").start()
    n = 25
    raw4 = lab.socket("cl", socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        for i in range(n):
            raw4.sendto(_icmp4_error_with_garbage_quote(lab.clients4[i % 6], lab.vip4),
                        (lab.vip4, 0))
    finally:
        raw4.close()

    def counted(s: dict[str, Any]) -> int:
        drops = sum(sum(w.get("drops", {}).values()) for w in s["workers"])
        return drops + int(s.get("conntrack", {}).get("invalid", 0))

    stats = d.wait_stats(lambda s: counted(s) >= n)
    assert counted(stats) == n
    if datapath == "perpacket":
        reasons = {r for w in stats["workers"] for r in w.get("drops", {})}
        assert reasons == {"bad-embedded-packet"}, reasons
    assert d.stop() == 0
