"""The balancer on the wire: real kernel, real NFQUEUE, real clients and servers.

Each test runs the daemon (two workers on a two-core machine) in the lab's
balancer namespace and talks to the VIP from the client namespace.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import pytest

from loaded.core.checksum import checksum
from loaded.lab import traffic
from loaded.lab.topology import Lab
from tests.e2e.conftest import PORT, Daemon, frozen_full_queues, kernel_state


def vip(lab: Lab, family: int) -> str:
    return lab.vip4 if family == 4 else lab.vip6


def clients(lab: Lab, family: int) -> list[str]:
    return lab.clients4 if family == 4 else lab.clients6


def who(lab: Lab, src: str, dst: str, proto: str = "tcp") -> tuple[str, str]:
    """(backend name, client address the backend saw)."""
    if proto == "tcp":
        line = traffic.tcp_request(src, dst, PORT, timeout=5, ns=lab.ns("cl"))
    else:
        line = traffic.udp_request(src, dst, PORT, timeout=5, attempts=3, ns=lab.ns("cl"))
    name, seen = line.split()
    return name, seen


@pytest.mark.parametrize("family", [4, 6])
def test_tcp_udp_icmp_through_the_vip(lab: Lab, daemon_factory: Any, family: int,
                                      datapath: str) -> None:
    d: Daemon = daemon_factory().start()
    assert len(d.stats()["workers"]) == min(2, os.cpu_count() or 1)
    chosen: dict[str, str] = {}
    for c in clients(lab, family):
        name, seen = who(lab, c, vip(lab, family))
        assert seen == c  # the backend sees the real client address
        chosen[c] = name
    # clients spread over every backend (rr in each worker, >= 3 clients in one)
    assert set(chosen.values()) == {b.name for b in lab.backends}
    if datapath == "conntrack":
        # the workers' decisions reach the kernel's client map
        recalled = wait_recalled(lab, d, family, len(chosen))
        names = {b.addr4 if family == 4 else b.addr6: b.name for b in lab.backends}
        marks = {f"{b['mark']:#x}": names[ip] for w in d.stats()["workers"]
                 for v in w["services"].values() for ip, b in v["backends"].items()
                 if ip in names}
        assert {c: marks[m] for c, m in recalled.items()} == chosen
    for c in clients(lab, family):
        for proto in ("tcp", "udp", "tcp"):
            assert who(lab, c, vip(lab, family), proto) == (chosen[c], c)  # sticky
        result = traffic.ping(lab.ns("cl"), c, vip(lab, family), count=3, interval=0.05)
        assert result.ok, result.output
    if datapath == "perpacket":
        stats = d.wait_stats(lambda s: sum(w.get("accepted", 0) for w in s["workers"]) > 60)
    else:
        # Only each client's very first connection reached a worker: the kernel
        # recalled the client for its other 4 flows (TCP, UDP, ping alike) and
        # carried every packet after the first (counted by the daemon's nft table).
        firsts = len(clients(lab, family))
        stats = d.wait_stats(lambda s: sum(w.get("accepted", 0) for w in s["workers"]) >= firsts
                             and sum(p for p, _ in s["conntrack"]["backends"].values()) > 100)
        assert sum(w.get("accepted", 0) for w in stats["workers"]) == firsts
    assert sum(w.get("dropped", 0) for w in stats["workers"]) == 0
    assert d.stop() == 0
    assert d.problems() == []


def wait_recalled(lab: Lab, d: Daemon, family: int, n: int,
                  timeout: float = 5.0) -> dict[str, str]:
    """The conntrack path's client map (client -> mark, as hex) once it holds n."""
    deadline = time.monotonic() + timeout
    while True:
        out = lab.run("lb", ["nft", "-j", "list", "map", "inet", f"loaded_{d.tag}",
                             f"clients{family}"], check=True).stdout
        elems = next(i["map"] for i in json.loads(out)["nftables"] if "map" in i).get("elem", [])
        found = {k["elem"]["val"]: f"{m:#x}" for k, m in elems}
        if len(found) >= n or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


@pytest.fixture(scope="module")
def small_mtu_lab() -> Any:
    with Lab(backends=2, clients=2, client_mtu=1280) as lab:
        lab.start_servers(PORT)
        yield lab


@pytest.mark.parametrize("family", [4, 6])
def test_path_mtu_discovery_through_the_balancer(small_mtu_lab: Lab, daemon_factory: Any,
                                                 family: int) -> None:
    lab = small_mtu_lab
    assert lab.workdir is not None
    conf = lab.workdir / "pmtu.conf"
    lab.write_config(conf)
    d = Daemon(lab, conf).start()
    try:
        for c in clients(lab, family):
            name, received = traffic.tcp_bulk(c, vip(lab, family), PORT, 3_000_000, timeout=30,
                                              ns=lab.ns("cl"))
            assert received == 3_000_000, (name, received)
        drops = d.drops()
        assert drops.get("icmp-error-unknown-flow", 0) == 0
        assert d.problems() == []
        # The router's errors reached the backends: they lowered their path MTU.
        b = lab.backends[0]
        cache = lab.run(b.ns, ["ip", f"-{family}", "route", "show", "cache"]).stdout
        if family == 6:
            cache += lab.run(b.ns, ["ip", "-6", "route", "show", "table", "all"]).stdout
        seen = [lab.run(x.ns, ["ip", f"-{family}", "route", "get", vip_client]).stdout
                for x in lab.backends for vip_client in clients(lab, family)]
        assert any("mtu 1280" in s or "mtu 1280" in cache for s in seen), seen
    finally:
        assert d.stop() == 0


def _ip4(proto: int, payload: bytes, src: str, dst: str, ihl: int = 5) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", (4 << 4) | ihl, 0, 20 + len(payload), 1, 0, 64, proto, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
    return hdr + payload


def _ip6(nh: int, payload: bytes, src: str, dst: str) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), nh, 64,
                       socket.inet_pton(socket.AF_INET6, src),
                       socket.inet_pton(socket.AF_INET6, dst)) + payload


INVALID = "conntrack-invalid"


def malformed(lab: Lab) -> list[tuple[int, bytes, str, str]]:
    """(family, packet, reason it must be counted under: per-packet path, conntrack
    path). The conntrack path's nftables guard drops what conntrack calls invalid
    (counted by the daemon's ``invalid`` counter) before any queue."""
    c4, c6, v4, v6 = lab.clients4[0], lab.clients6[0], lab.vip4, lab.vip6
    tcp = struct.pack("!HHIIBBHHH", 1234, PORT, 1, 0, 5 << 4, 2, 1000, 0, 0)
    zero_len_opts = bytes([60, 0, 1, 4, 0, 0, 0, 0])  # next=destopts, hdr-ext-len 0 (8 bytes)
    chain = zero_len_opts * 9 + bytes([6, 0, 1, 4, 0, 0, 0, 0]) + tcp
    return [
        (4, _ip4(6, tcp[:6], c4, v4), "truncated-l4-header", INVALID),
        (4, _ip4(6, tcp[:12] + bytes([2 << 4]) + tcp[13:], c4, v4), "bad-l4-header", INVALID),
        # GRE is tracked generically: NEW, so queued, and refused by the worker
        (4, _ip4(47, b"\0\0\x08\0gre!", c4, v4), "unsupported-protocol", "unsupported-protocol"),
        (4, _ip4(17, struct.pack("!HHHH", 1, PORT, 4, 0), c4, v4), "bad-l4-header", INVALID),
        (6, _ip6(60, chain, c6, v6), "too-many-extension-headers", INVALID),
        (6, _ip6(60, bytes([6, 3, 0, 0]) + bytes(4), c6, v6), "truncated-extension-header",
         INVALID),
        (6, _ip6(132, b"sctp" * 4, c6, v6), "unsupported-protocol", INVALID),
        (6, _ip6(6, tcp[:10], c6, v6), "truncated-l4-header", INVALID),
    ]


def counted_drops(stats: dict[str, Any]) -> Counter[str]:
    out: Counter[str] = Counter()
    for w in stats["workers"]:
        out.update(w.get("drops", {}))
    if "conntrack" in stats:
        out[INVALID] += stats["conntrack"]["invalid"]
    return out


def test_malformed_packets_are_dropped_counted_and_harmless(lab: Lab, daemon_factory: Any,
                                                            datapath: str) -> None:
    d: Daemon = daemon_factory().start()
    probes = malformed(lab)
    column = 2 if datapath == "perpacket" else 3
    expected = Counter(p[column] for p in probes)
    rounds = 200
    raw4 = lab.socket("cl", socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    raw6 = lab.socket("cl", socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
    served: list[tuple[str, str]] = []
    try:
        for i in range(rounds):
            for family, pkt, *_ in probes:
                if family == 4:
                    raw4.sendto(pkt, (lab.vip4, 0))
                else:
                    raw6.sendto(pkt, (lab.vip6, 0))
            if i % 20 == 0:  # service goes on during the flood
                served.append(who(lab, lab.clients4[1], lab.vip4))
                served.append(who(lab, lab.clients6[1], lab.vip6))
    finally:
        raw4.close()
        raw6.close()
    assert len(served) == 2 * rounds // 20
    want = {r: n * rounds for r, n in expected.items()}
    stats = d.wait_stats(lambda s: all(counted_drops(s)[r] >= n for r, n in want.items()))
    counted = counted_drops(stats)
    assert {r: counted[r] for r in want} == want
    assert sum(counted.values()) == sum(want.values())
    assert d.problems() == []
    # every malformed packet got its verdict: nothing waits in or fell off the queues
    for q in stats["kernel_queues"].values():
        assert q["waiting"] == 0 and q["queue_dropped"] == 0 and q["user_dropped"] == 0
    assert d.stop() == 0


ORIGINAL_STYLE = """#!/bin/sh
# loaded.config as the original's users write it: set-up commands and settings.
VIP4={vip4}
VIP4net=24
VIP6={vip6}
VIP6net=64
NS=198.18.5.53
FIRST_CORE=0
LAST_CORE=1
RIP4=198.19.0.0/24
RIP6=2001:db8:2::/64
public_NIC=pub0
private_NIC=priv0
private_GW={gw4}/24
{servers}
strategy=rr
nfq_len=10000
broadcast=198.19.0.255
port_alive={port}
check_cycle=30
#failover

iptables -F
iptables -F -t mangle
iptables -t mangle -A PREROUTING -d $VIP4 -j NFQUEUE --queue-balance $FIRST_CORE:$LAST_CORE
iptables -A FORWARD -s $RIP4 -j NFQUEUE --queue-balance $FIRST_CORE:$LAST_CORE
ip addr flush dev $public_NIC
ip addr add $VIP4/$VIP4net dev $public_NIC
ip addr add $private_GW dev $private_NIC
echo 1 > /proc/sys/net/ipv4/ip_forward
"""


def test_original_config_file_works_unmodified(lab: Lab, daemon_factory: Any) -> None:
    servers = "\n".join([f"server4={b.addr4}" for b in lab.backends]
                        + [f"server6={b.addr6}" for b in lab.backends])
    text = ORIGINAL_STYLE.format(vip4=lab.vip4, vip6=lab.vip6, gw4=lab.private_gw4,
                                 servers=servers, port=PORT)
    before = kernel_state(lab)
    d: Daemon = daemon_factory("original.conf", text=text).start()
    assert "warning" not in d.log.lower()
    for c in lab.clients4[:3]:
        assert who(lab, c, lab.vip4)[1] == c
    assert d.stop() == 0
    assert kernel_state(lab) == before


def test_exit_removes_exactly_what_it_added(lab: Lab, daemon_factory: Any) -> None:
    before = kernel_state(lab)
    d: Daemon = daemon_factory().start()
    during = kernel_state(lab)
    assert any(a[1] == lab.vip4 for a in during["addresses"])
    assert any(a[1] == lab.vip6 for a in during["addresses"])
    assert any("LOADED-IN" in r for r in during["iptables"])
    assert any("LOADED-IN" in r for r in during["ip6tables"])
    assert len(during["neigh"]) == len(before["neigh"]) + 2 * len(lab.backends)
    assert during["sysctls"]["net.ipv4.ip_forward"] == "1"
    who(lab, lab.clients4[0], lab.vip4)
    assert d.stop() == 0
    assert kernel_state(lab) == before
    assert "event=stopped" in d.log


def test_privileges_of_running_workers(lab: Lab, daemon_factory: Any) -> None:
    d: Daemon = daemon_factory(args=("-U", "nobody")).start()
    who(lab, lab.clients4[0], lab.vip4)  # the queue works for unprivileged workers
    who(lab, lab.clients6[0], lab.vip6)
    pids = d.worker_pids()
    assert pids
    nobody = __import__("pwd").getpwnam("nobody")
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
        assert status["Uid"].split() == [str(nobody.pw_uid)] * 4
        assert status["Gid"].split() == [str(nobody.pw_gid)] * 4
        assert int(status["CapEff"], 16) == (1 << 12) | (1 << 13)  # NET_ADMIN, NET_RAW
        assert int(status["CapPrm"], 16) == (1 << 12) | (1 << 13)
        assert int(status["CapBnd"], 16) == (1 << 12) | (1 << 13)
        assert int(status["CapInh"], 16) == 0 and int(status["CapAmb"], 16) == 0
        assert status["NoNewPrivs"].strip() == "1"
        assert os.readlink(f"/proc/{pid}/root") == os.path.realpath("/var/run/empty")
    st = os.stat("/var/run/empty")
    assert st.st_uid == 0 and not st.st_mode & 0o022
    assert d.stop() == 0


def test_worker_that_dies_is_restarted(lab: Lab, daemon_factory: Any) -> None:
    d: Daemon = daemon_factory().start()
    victim = d.worker_pids()[0]
    os.kill(victim, 9)
    d.wait_stats(lambda s: any(w.get("restarts") == 1 and w.get("alive") and w.get("pid") != victim
                               for w in s["workers"]), timeout=10)
    for c in lab.clients4:
        assert who(lab, c, lab.vip4)[1] == c
    assert "event=worker-died" in d.log
    assert d.stop() == 0


@pytest.mark.parametrize("fail_open", [False, True])
def test_dead_daemon_fails_open_or_closed_then_recovers(lab: Lab, daemon_factory: Any,
                                                        fail_open: bool) -> None:
    before = kernel_state(lab)
    name = f"crash-{fail_open}.conf"
    d: Daemon = daemon_factory(name, fail_open="yes" if fail_open else "no").start()
    who(lab, lab.clients4[0], lab.vip4)
    d.kill_all()  # a crash: rules stay, nobody reads the queues
    t0 = time.monotonic()
    # a client the daemon never saw: on the conntrack path the kernel may still
    # remember clients4[0] (its client map stays with the rules) and carry it
    with pytest.raises(OSError) as err:
        traffic.tcp_request(lab.clients4[2], lab.vip4, PORT, timeout=2, ns=lab.ns("cl"))
    if fail_open:
        # unbalanced, to the balancer's own stack: an immediate refusal
        assert isinstance(err.value, ConnectionRefusedError)
        assert time.monotonic() - t0 < 1.5
    else:
        assert isinstance(err.value, TimeoutError)  # dropped
    # the next start of the same instance undoes what the crashed one left
    again = Daemon(lab, d.conf).start()
    assert who(lab, lab.clients4[0], lab.vip4)[1] == lab.clients4[0]
    assert again.stop() == 0
    assert kernel_state(lab) == before


def test_nameserver_traffic_is_masqueraded_not_balanced(lab: Lab, daemon_factory: Any) -> None:
    ns_addr = lab.rt_pub4  # the router plays the nameserver (replies from this address)
    server = lab.exec("rt", [sys.executable, "-m", "loaded.lab.server", "--name", "dns",
                             "--port", "53", "--udp-port", "53"], stdout=subprocess.PIPE)
    assert server.stdout is not None and server.stdout.readline().strip() == b"ready"
    d: Daemon = daemon_factory("ns.conf", NS=ns_addr).start()
    b = lab.backends[0]
    for kind in ("udp", "tcp"):
        if kind == "udp":
            line = traffic.udp_request(None, ns_addr, 53, timeout=5, attempts=3, ns=b.ns)
        else:
            line = traffic.tcp_request(None, ns_addr, 53, timeout=5, ns=b.ns)
        # the nameserver sees the balancer's own public address, not the VIP
        assert line.split() == ["dns", lab.lb_pub4]
    assert who(lab, lab.clients4[0], lab.vip4)[1] == lab.clients4[0]  # balancing goes on
    assert d.stop() == 0
    server.terminate()


def test_second_instance_refuses_and_leaves_the_first_alone(lab: Lab,
                                                           daemon_factory: Any) -> None:
    first: Daemon = daemon_factory("twice.conf").start()
    during = kernel_state(lab)
    second = lab.run("lb", [sys.executable, "-m", "loaded", "-D", "-c", str(first.conf)],
                     timeout=20)
    assert second.returncode == 1
    assert "is running as pid" in second.stderr
    assert kernel_state(lab) == during
    assert first.stats()["pid"] != 0 and first.proc is not None and first.proc.poll() is None
    assert who(lab, lab.clients4[0], lab.vip4)[1] == lab.clients4[0]
    assert first.stop() == 0


@pytest.mark.parametrize("fail_open", [False, True])
def test_full_queue_fails_open_or_closed(lab: Lab, daemon_factory: Any, fail_open: bool) -> None:
    d: Daemon = daemon_factory(f"full-{fail_open}.conf", nfq_len=1,
                               fail_open="yes" if fail_open else "no").start()
    with frozen_full_queues(lab, d, lab.clients4):  # nobody reads the full queues
        t0 = time.monotonic()
        with pytest.raises(OSError) as err:
            traffic.tcp_request(lab.clients4[0], lab.vip4, PORT, timeout=2, ns=lab.ns("cl"))
        # the kernel's own count: a full queue drops only when failing closed
        dropped = sum(int(line.split()[5]) for line in lab.run(
            "lb", ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout.splitlines())
        if fail_open:
            assert isinstance(err.value, ConnectionRefusedError)  # unbalanced: refused at once
            assert time.monotonic() - t0 < 1.5
            assert dropped == 0
        else:
            assert isinstance(err.value, TimeoutError)  # dropped
            assert dropped > 0
    assert d.stop() == 0
