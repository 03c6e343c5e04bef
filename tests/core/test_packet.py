"""The packet parser and rewriter against scapy's independent computation."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import fragment
from scapy.layers.inet6 import fragment6

from loaded.core.checksum import address_delta
from loaded.core.errors import PacketError, Reason
from loaded.core.packet import (
    ICMP as P_ICMP,
)
from loaded.core.packet import (
    ICMPV6,
    MAX_EXT_HEADERS,
    icmp_checksum_ok,
    l4_checksum,
    parse,
    rewrite,
)
from loaded.core.packet import (
    UDP as P_UDP,
)
from tests.core.packets import (
    BACKENDS4,
    BACKENDS6,
    CLIENTS4,
    CLIENTS6,
    TCP,
    UDP,
    VIP4,
    VIP6,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    Raw,
    families,
    ip,
    l4,
    payloads,
    ports,
    protos,
    raw,
    with_partial_checksum,
)


def packed(a: str) -> bytes:
    return ipaddress.ip_address(a).packed


def addrs(family: int) -> tuple[str, list[str], list[str]]:
    return (VIP4, CLIENTS4, BACKENDS4) if family == 4 else (VIP6, CLIENTS6, BACKENDS6)


def nat_dst(buf: bytearray, new: str, partial: bool = False) -> None:
    p = parse(buf)
    rewrite(buf, p, p.dst_off, packed(new), address_delta(p.dst, packed(new)), partial)


def nat_src(buf: bytearray, new: str) -> None:
    p = parse(buf)
    rewrite(buf, p, p.src_off, packed(new), address_delta(p.src, packed(new)))


# --- parsing ------------------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("proto,number", [("tcp", 6), ("udp", 17), ("icmp", None)])
def test_parse_locates_fields(family: int, proto: str, number: int | None) -> None:
    vip, clients, _ = addrs(family)
    buf = raw(ip(family, clients[0], vip) / l4(proto, b"hello", family=family))
    p = parse(buf)
    assert p.version == family
    assert p.src == packed(clients[0]) and p.dst == packed(vip)
    assert p.proto == (number or (1 if family == 4 else 58))
    assert p.l4_off == (20 if family == 4 else 40)
    assert p.end == len(buf)
    assert p.first and not p.more
    if proto == "icmp":
        assert p.icmp_type == (8 if family == 4 else 128)
        assert p.csum_off == (-1 if family == 4 else 42)
    else:
        assert p.csum_off == p.l4_off + (16 if proto == "tcp" else 6)


def test_ipv4_options_and_padding() -> None:
    pkt = ip(4, CLIENTS4[0], VIP4, options=b"\x01\x01\x01\x00") / l4("tcp", b"x")
    buf = raw(pkt) + b"\0" * 6  # Ethernet padding after the IP packet
    p = parse(buf)
    assert p.l4_off == 24 and p.end == len(buf) - 6


@pytest.mark.parametrize(
    "mangle,reason",
    [
        (lambda b: b[:0], Reason.EMPTY),
        (lambda b: bytearray([0x55]) + b[1:], Reason.BAD_VERSION),
        (lambda b: b[:19], Reason.TRUNCATED_IP),
        (lambda b: bytearray([0x44]) + b[1:], Reason.BAD_IHL),
        (lambda b: bytearray([0x4F]) + b[1:40], Reason.TRUNCATED_IP),
        (lambda b: b[:2] + bytearray([0xFF, 0xFF]) + b[4:], Reason.BAD_TOTAL_LENGTH),
        (lambda b: b[:2] + bytearray([0, 10]) + b[4:], Reason.BAD_TOTAL_LENGTH),
        (lambda b: b[:2] + bytearray([0, 30]) + b[4:30], Reason.TRUNCATED_L4),
        (lambda b: b[:32] + bytearray([0x30]) + b[33:], Reason.BAD_L4),
        (lambda b: b[:32] + bytearray([0xF0]) + b[33:], Reason.TRUNCATED_L4),
    ],
)
def test_malformed_ipv4(mangle: object, reason: Reason) -> None:
    buf = raw(ip(4, CLIENTS4[0], VIP4) / l4("tcp", b"hello"))
    with pytest.raises(PacketError) as e:
        parse(mangle(buf))  # type: ignore[operator]
    assert e.value.reason is reason


def test_malformed_ipv6_lengths() -> None:
    buf = raw(ip(6, CLIENTS6[0], VIP6) / l4("udp", b"hello"))
    with pytest.raises(PacketError) as e:
        parse(buf[:39])
    assert e.value.reason is Reason.TRUNCATED_IP
    with pytest.raises(PacketError) as e:
        parse(buf[:-1])
    assert e.value.reason is Reason.BAD_PAYLOAD_LENGTH
    jumbo = buf[:4] + bytearray(2) + buf[6:]
    with pytest.raises(PacketError) as e:
        parse(jumbo)
    assert e.value.reason is Reason.BAD_PAYLOAD_LENGTH
    bad_udp_len = bytearray(buf)
    bad_udp_len[44:46] = b"\x00\x04"
    with pytest.raises(PacketError) as e:
        parse(bad_udp_len)
    assert e.value.reason is Reason.BAD_L4


def _chain6(headers: list[tuple[int, int]], final: int = 6, tail: bytes = b"") -> bytearray:
    """IPv6 packet with raw extension headers given as (kind, hdr-ext-len)."""
    body = bytearray()
    kinds = [k for k, _ in headers] + [final]
    for i, (kind, hlen) in enumerate(headers):
        size = (hlen + 2) * 4 if kind == 51 else 8 if kind == 44 else (hlen + 1) * 8
        h = bytearray(size)
        h[0] = kinds[i + 1]
        if kind != 44:
            h[1] = hlen
        body += h
    body += tail
    hdr = raw(IPv6(src=CLIENTS6[0], dst=VIP6, nh=kinds[0], plen=len(body)))
    return hdr + body


def test_extension_header_length_rules() -> None:
    tcp = bytes(TCP(sport=1, dport=2))
    # hop-by-hop (len 0 = 8 bytes), routing (len 2 = 24), fragment (8), AH (len 1 = 12),
    # destination options (len 1 = 16): 8 + 24 + 8 + 12 + 16 = 68 bytes of headers.
    buf = _chain6([(0, 0), (43, 2), (44, 0), (51, 1), (60, 1)], tail=tcp)
    p = parse(buf)
    assert p.proto == 6 and p.l4_off == 40 + 68 and p.csum_off == p.l4_off + 16


def test_zero_length_extension_headers_cannot_loop() -> None:
    tcp = bytes(TCP(sport=1, dport=2))
    ok = _chain6([(60, 0)] * MAX_EXT_HEADERS, tail=tcp)
    assert parse(ok).l4_off == 40 + 8 * MAX_EXT_HEADERS
    with pytest.raises(PacketError) as e:
        parse(_chain6([(60, 0)] * (MAX_EXT_HEADERS + 1), tail=tcp))
    assert e.value.reason is Reason.TOO_MANY_EXT


@pytest.mark.parametrize(
    "headers,cut,reason",
    [
        ([(60, 4)], 8, Reason.TRUNCATED_EXT),  # says 40 bytes, 8 present
        ([(51, 4)], 8, Reason.TRUNCATED_EXT),
        ([(60, 0), (0, 0)], 0, Reason.BAD_EXT),  # hop-by-hop not first
        ([(44, 0), (44, 0)], 0, Reason.BAD_EXT),
    ],
)
def test_bad_extension_chains(headers: list[tuple[int, int]], cut: int, reason: Reason) -> None:
    buf = _chain6(headers, final=59)
    if cut:
        buf = buf[: 40 + cut]
        buf[4:6] = cut.to_bytes(2, "big")
    with pytest.raises(PacketError) as e:
        parse(buf)
    assert e.value.reason is reason


def test_routing_header_with_segments_left_is_refused() -> None:
    pkt = IPv6(src=CLIENTS6[0], dst=VIP6) / IPv6ExtHdrRouting(
        addresses=["2001:db8::9"], segleft=1) / TCP()
    with pytest.raises(PacketError) as e:
        parse(raw(pkt))
    assert e.value.reason is Reason.ROUTING_HEADER


def test_tcp_fragment_at_offset_8_is_refused() -> None:
    buf = raw(ip(4, CLIENTS4[0], VIP4, frag=1, flags="MF") / Raw(b"x" * 16))
    buf[9] = 6
    with pytest.raises(PacketError) as e:
        parse(buf)
    assert e.value.reason is Reason.TINY_FRAGMENT


def test_first_fragment_too_short_for_transport_header() -> None:
    buf = raw(ip(4, CLIENTS4[0], VIP4, flags="MF", proto=6) / Raw(b"x" * 8))
    with pytest.raises(PacketError) as e:
        parse(buf)
    assert e.value.reason is Reason.TINY_FRAGMENT


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=120))
def test_random_bytes_raise_only_packet_error(data: bytes) -> None:
    for candidate in (data, b"\x45" + data, b"\x60" + data):
        try:
            parse(bytearray(candidate))
        except PacketError:
            pass


# --- rewriting -------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(families, protos, payloads, ports, ports, st.integers(0, 2), st.integers(0, 2))
def test_rewrite_equals_full_recomputation_and_reverses(
    family: int, proto: str, payload: bytes, sport: int, dport: int, ci: int, bi: int
) -> None:
    vip, clients, backends = addrs(family)
    layer = l4(proto, payload, sport, dport, family)
    original = raw(ip(family, clients[ci], vip) / layer)
    buf = bytearray(original)
    nat_dst(buf, backends[bi])
    assert buf == raw(ip(family, clients[ci], backends[bi]) / layer)
    nat_dst(buf, vip)
    assert buf == original
    # the return path: backend -> client becomes VIP -> client
    reply = raw(ip(family, backends[bi], clients[ci]) / layer)
    nat_src(reply, vip)
    assert reply == raw(ip(family, vip, clients[ci]) / layer)


@settings(max_examples=100, deadline=None)
@given(families, st.sampled_from(["tcp", "udp"]), payloads, st.integers(0, 2))
def test_rewrite_completes_partial_checksums(
    family: int, proto: str, payload: bytes, bi: int
) -> None:
    vip, clients, backends = addrs(family)
    layer = l4(proto, payload, family=family)
    buf = raw(ip(family, clients[0], vip) / layer)
    l4_off = 20 if family == 4 else 40
    partial = with_partial_checksum(buf, family, 6 if proto == "tcp" else 17, l4_off)
    assert partial != buf
    nat_dst(partial, backends[bi], partial=True)
    assert partial == raw(ip(family, clients[0], backends[bi]) / layer)


def test_udp4_without_checksum_stays_without() -> None:
    pkt = ip(4, CLIENTS4[0], VIP4) / UDP(sport=5, dport=53, chksum=0) / Raw(b"abc")
    buf = raw(pkt)
    nat_dst(buf, BACKENDS4[0])
    assert buf[26:28] == b"\0\0"
    assert buf == raw(ip(4, CLIENTS4[0], BACKENDS4[0]) / UDP(sport=5, dport=53, chksum=0)
                      / Raw(b"abc"))


@pytest.mark.parametrize("family", [4, 6])
def test_udp_checksum_computing_to_zero_is_sent_as_ffff(family: int) -> None:
    vip, clients, backends = addrs(family)

    def build(dst: str, word: bytes) -> bytearray:
        return raw(ip(family, clients[0], dst) / UDP(sport=7, dport=9) / Raw(word + b"zz"))

    # Choose a payload word that makes the checksum after NAT sum to zero.
    probe = build(backends[0], b"\0\0")
    off = 20 if family == 4 else 40
    p = parse(probe)
    c0 = l4_checksum(probe, p)
    word = c0.to_bytes(2, "big")
    buf = build(vip, word)
    nat_dst(buf, backends[0])
    assert buf[off + 6:off + 8] == b"\xff\xff"
    assert buf == build(backends[0], word)


def test_ipv4_fragments_rewritten_only_first_carries_l4_checksum() -> None:
    def frags(dst: str) -> list[bytearray]:
        pkt = ip(4, CLIENTS4[0], dst, id=77) / UDP(sport=5, dport=6) / Raw(bytes(range(256)) * 12)
        return [raw(f) for f in fragment(pkt, fragsize=1000)]

    got = frags(VIP4)
    assert len(got) >= 3
    for i, buf in enumerate(got):
        p = parse(buf)
        assert p.first == (i == 0) and p.more == (i < len(got) - 1)
        assert (p.csum_off >= 0) == (i == 0)
        nat_dst(buf, BACKENDS4[1])
    assert got == frags(BACKENDS4[1])


def test_ipv6_fragments() -> None:
    def frags(dst: str) -> list[bytearray]:
        pkt = IPv6(src=CLIENTS6[0], dst=dst) / IPv6ExtHdrFragment(id=9) / UDP(
            sport=5, dport=6) / Raw(bytes(range(256)) * 12)
        return [raw(f) for f in fragment6(pkt, 1280)]

    got = frags(VIP6)
    assert len(got) >= 3
    for i, buf in enumerate(got):
        p = parse(buf)
        assert p.first == (i == 0)
        assert p.proto == P_UDP
        nat_dst(buf, BACKENDS6[2])
    assert got == frags(BACKENDS6[2])


def test_ipv6_extension_headers_rewritten() -> None:
    def build(dst: str) -> bytearray:
        return raw(IPv6(src=CLIENTS6[1], dst=dst) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
                   / IPv6ExtHdrRouting(segleft=0) / TCP(sport=3, dport=4) / Raw(b"data"))

    buf = build(VIP6)
    nat_dst(buf, BACKENDS6[0])
    assert buf == build(BACKENDS6[0])


def test_ipv6_ah_is_walked() -> None:
    def build(dst: str) -> bytearray:
        udp = raw(IPv6(src=CLIENTS6[1], dst=dst) / UDP(sport=3, dport=4) / Raw(b"data"))[40:]
        ah = bytes([17, 1, 0, 0]) + (1).to_bytes(4, "big") + (7).to_bytes(4, "big")
        return raw(IPv6(src=CLIENTS6[1], dst=dst, nh=51, plen=len(ah) + len(udp))) + ah + udp

    buf = build(VIP6)
    p = parse(buf)
    assert p.proto == P_UDP and p.l4_off == 52
    nat_dst(buf, BACKENDS6[0])
    assert buf == build(BACKENDS6[0])


def test_icmp_checksums() -> None:
    buf = raw(ip(4, CLIENTS4[0], VIP4) / l4("icmp", b"ping"))
    p = parse(buf)
    assert p.proto == P_ICMP and p.csum_off == -1
    buf6 = raw(ip(6, CLIENTS6[0], VIP6) / l4("icmp", b"ping", family=6))
    p6 = parse(buf6)
    assert p6.proto == ICMPV6 and p6.csum_off == p6.l4_off + 2
    assert icmp_checksum_ok(buf6, p6)  # scapy's checksum, verified with the pseudo-header
    buf6[p6.l4_off + 10] ^= 1
    assert not icmp_checksum_ok(buf6, p6)
