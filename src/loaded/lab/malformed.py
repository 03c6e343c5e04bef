"""Malformed packets for the lab: raw IPv4/IPv6 packets of known kinds, each with
the drop reason the balancer must count it under on each data path.

Shared by the storm test (``tests/e2e/test_storm.py``) and the soak
(``bench/soak.py``). Packets are built whole (IP header included) and sent on a
raw ``IPPROTO_RAW`` socket, so their sources can be any address: the lab's
routers do no reverse-path filtering.
"""

from __future__ import annotations

import socket
import struct
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from loaded.core.checksum import checksum

# The conntrack path's guard chain: what conntrack calls invalid is dropped
# (and counted by the daemon's nftables counter ``invalid``) before any queue.
INVALID = "conntrack-invalid"
PORT = 8080  # the lab servers' port


def ip4(proto: int, payload: bytes, src: str, dst: str) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, 64, proto, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    return hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:] + payload


def ip6(nh: int, payload: bytes, src: str, dst: str) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), nh, 64,
                       socket.inet_pton(socket.AF_INET6, src),
                       socket.inet_pton(socket.AF_INET6, dst)) + payload


def icmp4(kind: int, code: int, body: bytes) -> bytes:
    msg = struct.pack("!BBHI", kind, code, 0, 0) + body
    return msg[:2] + struct.pack("!H", checksum(msg)) + msg[4:]


def icmp6(kind: int, code: int, body: bytes, src: str, dst: str) -> bytes:
    msg = struct.pack("!BBHI", kind, code, 0, 0) + body
    pseudo = (socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
              + struct.pack("!I3xB", len(msg), 58))
    return msg[:2] + struct.pack("!H", checksum(pseudo + msg)) + msg[4:]


TCP_SYN = struct.pack("!HHIIBBHHH", 1234, PORT, 1, 0, 5 << 4, 2, 1000, 0, 0)
TCP_DOFF2 = TCP_SYN[:12] + bytes([2 << 4]) + TCP_SYN[13:]  # data offset 8 bytes < 20
UDP_LEN4 = struct.pack("!HHHH", 1, PORT, 4, 0)  # UDP length 4 < 8
DSTOPT0 = bytes([60, 0, 1, 4, 0, 0, 0, 0])  # next=destopts, 8 bytes
TOO_MANY = DSTOPT0 * 9 + bytes([6, 0, 1, 4, 0, 0, 0, 0]) + TCP_SYN

Builder = Callable[[str, str, str], bytes]  # (src, dst, peer) -> packet


@dataclass(frozen=True)
class Kind:
    name: str
    family: int
    build: Builder  # peer: an address on dst's side, for the packets ICMP errors quote
    perpacket: str | None  # the reason counted on each path; None: counted nowhere
    conntrack: str | None
    backend_side: bool = False  # also sent by the backends (the return path)

    def reason(self, datapath: str) -> str | None:
        return self.perpacket if datapath == "perpacket" else self.conntrack


# From the backends, only what is neither TCP nor UDP: the per-packet path's
# return half may leave TCP and UDP to the kernel (nftables rewrites the
# source; what it cannot rewrite is queued), so which malformed TCP or UDP
# header from a backend reaches a worker is the kernel's choice, not the
# daemon's. On the conntrack path nothing from the backends is queued.
KINDS: tuple[Kind, ...] = (
    # the eight of test_balancing's malformed test
    Kind("v4 TCP header cut at 6 bytes", 4, lambda s, d, p: ip4(6, TCP_SYN[:6], s, d),
         "truncated-l4-header", INVALID),
    Kind("v4 TCP data offset 8", 4, lambda s, d, p: ip4(6, TCP_DOFF2, s, d),
         "bad-l4-header", INVALID),
    # GRE is tracked generically: NEW, so queued, and refused by the worker
    Kind("v4 GRE", 4, lambda s, d, p: ip4(47, b"\0\0\x08\0gre!", s, d),
         "unsupported-protocol", "unsupported-protocol", backend_side=True),
    Kind("v4 UDP length 4", 4, lambda s, d, p: ip4(17, UDP_LEN4, s, d), "bad-l4-header", INVALID),
    Kind("v6 ten extension headers", 6, lambda s, d, p: ip6(60, TOO_MANY, s, d),
         "too-many-extension-headers", INVALID),
    Kind("v6 extension header longer than the packet", 6,
         lambda s, d, p: ip6(60, bytes([6, 3, 0, 0]) + bytes(4), s, d),
         "truncated-extension-header", INVALID, backend_side=True),
    Kind("v6 SCTP", 6, lambda s, d, p: ip6(132, b"sctp" * 4, s, d),
         "unsupported-protocol", INVALID, backend_side=True),
    Kind("v6 TCP header cut at 10 bytes", 6, lambda s, d, p: ip6(6, TCP_SYN[:10], s, d),
         "truncated-l4-header", INVALID),
    # more
    Kind("v4 ICMP cut at 2 bytes", 4, lambda s, d, p: ip4(1, b"\x08\x00", s, d),
         "truncated-l4-header", INVALID, backend_side=True),
    Kind("v4 UDP header cut at 3 bytes", 4, lambda s, d, p: ip4(17, b"\x00\x01\x1f", s, d),
         "truncated-l4-header", INVALID),
    # The per-packet engine's IPv6 fast path once read the UDP length (bytes
    # 44-45) before checking that the payload holds a UDP header, and counted
    # these as internal errors (found by the fuzz campaign and, on the wire, by
    # the storm; fixed in 609ac03).
    Kind("v6 UDP header cut at 2 bytes", 6, lambda s, d, p: ip6(17, b"\x00\x01", s, d),
         "truncated-l4-header", INVALID),
    Kind("v6 UDP length 4", 6, lambda s, d, p: ip6(17, UDP_LEN4, s, d), "bad-l4-header", INVALID),
    Kind("v6 TCP data offset 8", 6, lambda s, d, p: ip6(6, TCP_DOFF2, s, d),
         "bad-l4-header", INVALID),
    Kind("v6 GRE", 6, lambda s, d, p: ip6(47, b"\0\0\x86\xddgre!", s, d),
         "unsupported-protocol", "unsupported-protocol", backend_side=True),
    Kind("v6 routing header type 0, segments left 1", 6,
         lambda s, d, p: ip6(43, bytes([6, 2, 0, 1, 0, 0, 0, 0]) + bytes(16) + TCP_SYN, s, d),
         "routing-header-in-transit", INVALID),
    # The kernel's IPv6 defragmentation (before conntrack) drops a fragment
    # header cut short: on the conntrack path nothing of the daemon sees it.
    Kind("v6 fragment header cut at 3 bytes", 6, lambda s, d, p: ip6(44, bytes([6, 0, 0]), s, d),
         "truncated-extension-header", None, backend_side=True),
    Kind("v4 ICMP error, bad checksum", 4,
         lambda s, d, p: ip4(1, struct.pack("!BBHI", 3, 3, 0x1234, 0)
                             + ip4(6, TCP_SYN[:8], d, p), s, d),
         "bad-icmp-checksum", INVALID, backend_side=True),
    Kind("v4 ICMP timestamp request", 4, lambda s, d, p: ip4(1, icmp4(13, 0, bytes(12)), s, d),
         "unsupported-icmp-type", "unsupported-icmp-type"),
    Kind("v6 ICMP type 200", 6, lambda s, d, p: ip6(58, icmp6(200, 0, bytes(8), s, d), s, d),
         "unsupported-icmp-type", INVALID),
    # port unreachable quoting a flow VIP -> peer that nobody opened (the peer
    # must never make a request: a client the balancer knows would have it
    # passed on to its backend, as it should)
    Kind("v4 ICMP error about no known flow", 4,
         lambda s, d, p: ip4(1, icmp4(3, 3, ip4(6, TCP_SYN[:8], d, p)), s, d),
         "icmp-error-unknown-flow", INVALID),
)


def spoofed_sources(family: int, n: int) -> list[str]:
    """``n`` addresses on the client side that no lab host has (198.18.4.0/23,
    beside the clients' /24; in the clients' /64): the kernel's only business
    with them is to route packets to the balancer. At most 500."""
    if not 1 <= n <= 500:
        raise ValueError("1..500 spoofed sources")
    if family == 4:
        return [f"198.18.{4 + i // 250}.{1 + i % 250}" for i in range(n)]
    return [f"2001:db8:c::8:{i:x}" for i in range(n)]


def expected(sent: Iterable[tuple[Kind, str]], datapath: str) -> Counter[str]:
    """What the daemon must count for the (kind, side) pairs sent, side being
    "client" or "backend"."""
    want: Counter[str] = Counter()
    for kind, side in sent:
        if side == "backend" and datapath == "conntrack":
            continue  # never queued: the conntrack path has no rule for the return path
        reason = kind.reason(datapath)
        if reason is not None:
            want[reason] += 1
    return want
