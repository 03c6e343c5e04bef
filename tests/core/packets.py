"""Packet builders for the core tests: scapy computes every checksum from scratch,
so a packet built here is the independent reference the engine is held to."""

from __future__ import annotations

from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.packet import Packet, Raw

from loaded.core.checksum import ones_sum

VIP4, VIP6 = "198.18.1.100", "2001:db8:1::100"
BACKENDS4 = ["198.19.0.11", "198.19.0.12", "198.19.0.13"]
BACKENDS6 = ["2001:db8:2::11", "2001:db8:2::12", "2001:db8:2::13"]
CLIENTS4 = ["198.18.0.11", "198.18.0.12", "198.18.200.7"]
CLIENTS6 = ["2001:db8:c::11", "2001:db8:c::12", "2001:db8:ffff::1"]
ROUTER4, ROUTER6 = "198.18.1.2", "2001:db8:1::2"

__all__ = [
    "ICMP", "IP", "TCP", "UDP", "ICMPv6DestUnreach", "ICMPv6EchoRequest",
    "ICMPv6PacketTooBig", "IPerror", "IPv6", "IPv6ExtHdrDestOpt", "IPv6ExtHdrFragment",
    "IPv6ExtHdrHopByHop", "IPv6ExtHdrRouting", "Packet", "Raw",
]


def ip(family: int, src: str, dst: str, **kw: object) -> Packet:
    return IP(src=src, dst=dst, **kw) if family == 4 else IPv6(src=src, dst=dst, **kw)


def l4(proto: str, payload: bytes, sport: int = 40000, dport: int = 80, family: int = 4,
       **kw: object) -> Packet:
    if proto == "tcp":
        return TCP(sport=sport, dport=dport, flags="PA", seq=1000, **kw) / Raw(payload)
    if proto == "udp":
        return UDP(sport=sport, dport=dport, **kw) / Raw(payload)
    if family == 4:
        return ICMP(type=8, id=sport, seq=1) / Raw(payload)
    return ICMPv6EchoRequest(id=sport, seq=1, data=payload)


def raw(pkt: Packet) -> bytearray:
    return bytearray(bytes(pkt))


def with_partial_checksum(buf: bytearray, family: int, proto: int, l4_off: int) -> bytearray:
    """Replace a complete TCP/UDP checksum by what offload leaves: the folded
    pseudo-header sum, not complemented (Linux CHECKSUM_PARTIAL)."""
    out = bytearray(buf)
    alen = 4 if family == 4 else 16
    so = 12 if family == 4 else 8
    length = len(out) - l4_off
    s = ones_sum(out[so:so + 2 * alen]) + proto + (length >> 16) + (length & 0xFFFF)
    s = ones_sum(b"", s)
    co = l4_off + (16 if proto == 6 else 6)
    out[co] = s >> 8
    out[co + 1] = s & 0xFF
    return out


payloads = st.binary(min_size=0, max_size=300)
ports = st.integers(min_value=1, max_value=65535)
families = st.sampled_from([4, 6])
protos = st.sampled_from(["tcp", "udp", "icmp"])
