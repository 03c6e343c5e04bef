"""The building blocks of the kernel rules that every data path shares.

Rules:

- An iptables chain of the daemon's own is a ``Chain``: entered from one
  built-in chain by one jump rule, its rules argument vectors (never shell
  strings), its name carrying the instance tag.
- Every data path spreads packets over the workers the same way: HMARK hashes
  the client and VIP (for an ICMP error, the quoted packet's addresses: the
  same pair) into one mark per worker (``MARK_BASE + i``), each mark queued to
  its worker's queue; IPv6 neighbour discovery stays local; what HMARK cannot
  hash goes to the first worker's queue.
- The nftables table is ``inet loaded_<tag>``; a backend's counter is named
  after its mark (``counter_name``/``counter_mark``), whatever the data path
  counts in it; a backend is a target under its mark in ``@backends4``/``6``
  (``mark_target``).
- DNS from the real-server network to a nameserver is masqueraded out of the
  public interface (``dns_masquerade``), on every data path.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from loaded.core.pool import CT_FAMILY_MASK, ct_mark

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MARK_BASE = 0x4C440000  # "LD" in the high half: recognisable in a trace

ADDR_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}
IP = {4: "ip", 6: "ip6"}


@dataclass(frozen=True)
class Chain:
    """A chain of our own, entered from ``hook`` by one jump rule."""

    family: int
    table: str
    hook: str
    name: str
    jump_match: tuple[str, ...]  # match of the jump rule in the built-in chain
    rules: tuple[tuple[str, ...], ...]  # each: iptables arguments after "-A <name>"


def nft_table_name(tag: str) -> str:
    return f"loaded_{tag}"


_COUNTER_PREFIX = "backend_"


def counter_name(mark: int) -> str:
    return f"{_COUNTER_PREFIX}{mark:08x}"


def counter_mark(name: str) -> int | None:
    """The mark a per-backend counter is named after (``counter_name``), or None."""
    if not name.startswith(_COUNTER_PREFIX):
        return None
    return int(name[len(_COUNTER_PREFIX):], 16)


def mark_match(key: dict[str, Any], version: int) -> dict[str, Any]:
    """``key & CT_FAMILY_MASK == base``: a backend's mark of one family."""
    return {"match": {"op": "==", "left": key, "right": {
        "prefix": {"addr": ct_mark(version, 0), "len": CT_FAMILY_MASK.bit_count()}}}}


def mark_target(tag: str, version: int, index: int, ip: IPAddress,
                counted_by: tuple[str, object]) -> list[dict[str, Any]]:
    """``ip`` the destination of its mark (``@backends4``/``6``), with its counter,
    which the map ``counted_by`` = (name, key) points at."""
    t = {"family": "inet", "table": nft_table_name(tag)}
    mark = ct_mark(version, index)
    name = counter_name(mark)
    counters, key = counted_by
    return [
        {"add": {"counter": {**t, "name": name}}},
        {"add": {"element": {**t, "name": f"backends{version}", "elem": [[mark, str(ip)]]}}},
        {"add": {"element": {**t, "name": counters, "elem": [[key, name]]}}},
    ]


def queue_target(queues: tuple[int, ...], fail_open: bool) -> tuple[str, ...]:
    if len(queues) == 1:
        target: tuple[str, ...] = ("-j", "NFQUEUE", "--queue-num", str(queues[0]))
    else:
        target = ("-j", "NFQUEUE", "--queue-balance", f"{queues[0]}:{queues[-1]}")
    return (*target, "--queue-bypass") if fail_open else target


def to_workers(family: int, tag: str, queues: tuple[int, ...], fail_open: bool
               ) -> list[tuple[str, ...]]:
    """The rules that hash a packet to a VIP to its worker's queue (see the rules)."""
    rules: list[tuple[str, ...]] = []
    if family == 6:
        rules += [("-p", "ipv6-icmp", "--icmpv6-type", t, "-j", "RETURN")
                  for t in ("neighbour-solicitation", "neighbour-advertisement")]
    n = len(queues)
    rnd = int(tag, 16) | 1
    rules.append(("-j", "HMARK", "--hmark-tuple", "src,dst", "--hmark-mod", str(n),
                  "--hmark-offset", str(MARK_BASE), "--hmark-rnd", hex(rnd)))
    for i, q in enumerate(queues):
        rules.append(("-m", "mark", "--mark", str(MARK_BASE + i), *queue_target((q,), fail_open)))
    # HMARK leaves the mark alone when it cannot hash a packet (an ICMP error
    # whose quote it cannot parse): such a packet must still meet a worker, which
    # counts and drops it, instead of slipping through to the local stack.
    rules.append(queue_target((queues[0],), fail_open))
    return rules


def dns_pairs(nameservers: list[IPAddress]) -> list[tuple[str, str]]:
    """(nameserver, protocol) for each nameserver of one family, UDP and TCP."""
    return [(str(ns), proto) for ns in nameservers for proto in ("udp", "tcp")]


def dns_masquerade(family: int, tag: str, rip: IPNetwork, nameservers: list[IPAddress],
                   pub: str) -> list[Chain]:
    dns = dns_pairs(nameservers)
    if not dns:
        return []
    r = str(rip)
    nat = tuple(("-s", r, "-d", ns, "-p", p, "--dport", "53", "-o", pub, "-j", "MASQUERADE")
                for ns, p in dns)
    return [Chain(family, "nat", "POSTROUTING", f"LOADED-NAT-{tag}", (), nat)]
