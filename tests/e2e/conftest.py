"""End-to-end fixtures: a namespace lab and the real daemon running in it.

Needs root (namespaces, NFQUEUE, iptables); skipped otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from scapy.layers.inet import IP, UDP

from loaded.lab.balancer import Balancer
from loaded.lab.topology import Lab

if os.geteuid() != 0:
    pytest.skip("end-to-end tests need root (namespaces, NFQUEUE)", allow_module_level=True)

PORT = 8080


Daemon = Balancer


@contextlib.contextmanager
def frozen_full_queues(lab: Lab, d: Balancer, clients: Sequence[str]) -> Iterator[None]:
    """The daemon's workers stopped (SIGSTOP) and each of its queues (``nfq_len=1``)
    holding one packet: a UDP datagram to the VIP from each of ``clients``,
    spread over the queues by their addresses. The workers go on on exit."""
    pids = d.worker_pids()
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        raw4 = lab.socket("cl", socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        try:
            for c in clients:
                raw4.sendto(bytes(IP(src=c, dst=lab.vip4) / UDP(sport=9, dport=9)),
                            (lab.vip4, 0))
        finally:
            raw4.close()
        time.sleep(0.2)
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def kernel_state(lab: Lab) -> dict[str, Any]:
    """What the balancer namespace looks like, for before/after comparisons."""

    def out(*argv: str) -> str:
        return lab.run("lb", list(argv), check=True).stdout

    def rules(tool: str) -> list[str]:
        return sorted(line for line in out(tool).splitlines()
                      if line and not line.startswith("#"))

    addrs = sorted((a["ifname"], i["local"], i["prefixlen"])
                   for a in json.loads(out("ip", "-j", "addr", "show"))
                   for i in a.get("addr_info", []))
    sysctls = {k: lab.sysctl("lb", k) for k in (
        "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding",
        "net.ipv4.conf.all.send_redirects", "net.ipv4.icmp_echo_ignore_broadcasts")}
    return {
        "addresses": addrs,
        "routes4": sorted(out("ip", "-4", "route", "show", "table", "all").splitlines()),
        "routes6": sorted(line for line in out("ip", "-6", "route", "show", "table", "all")
                          .splitlines() if "expires" not in line),
        "neigh": sorted(out("ip", "neigh", "show", "nud", "permanent").splitlines()),
        "iptables": rules("iptables-save"),
        "ip6tables": rules("ip6tables-save"),
        "sysctls": sysctls,
        "nftables": sorted(out("nft", "list", "tables").splitlines()),
        "conntrack_marks": sorted(out("nft", "list", "ruleset").count(m) for m in ("0x4c42",)),
    }


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(backends=3, clients=6) as lab:
        lab.start_servers(PORT)
        yield lab


DATAPATHS = ("perpacket", "conntrack")


@pytest.fixture(params=DATAPATHS)
def datapath(request: pytest.FixtureRequest) -> str:
    """Every end-to-end test that starts a daemon runs on both data paths."""
    return str(request.param)


@pytest.fixture
def daemon_factory(lab: Lab, datapath: str) -> Iterator[Any]:
    started: list[Daemon] = []

    def make(name: str = "lab.conf", args: tuple[str, ...] = (), text: str | None = None,
             **overrides: Any) -> Daemon:
        assert lab.workdir is not None
        conf = lab.workdir / f"{datapath}-{name}"
        if text is not None:
            # saved client tables beside the config, never in /var/lib/loaded
            conf.write_text(f"{text.rstrip()}\ndatapath={datapath}\n"
                            f"persist_file={conf.resolve()}.clients.json\n")
        else:
            overrides.setdefault("datapath", datapath)
            lab.write_config(conf, **overrides)
        d = Daemon(lab, conf, args)
        started.append(d)
        return d

    yield make
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
        d.stats_path.unlink(missing_ok=True)
