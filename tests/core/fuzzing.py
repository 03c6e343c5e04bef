"""The packet engine's fuzzer: packet generator, mutator and invariant checker.

Shared by ``bench/fuzz_engine.py`` (the long campaign) and
``tests/core/test_fuzz_corpus.py`` (the corpus and a short run in CI). Only the
standard library and ``loaded``: packets are built with ``struct`` and their
checksums computed here, independently of ``loaded.core.checksum``, because
scapy would cost a hundred times more per packet.

The invariant (``loaded.core.errors``: "the only exception it may see is
``PacketError``"), checked per packet by ``Checker``:

- ``Engine.handle`` (partial checksums off and on) and ``Engine.decide`` return
  normally or raise ``PacketError``; nothing else, and not slower than the
  watchdog allows (``bench/fuzz_engine.py`` arms it);
- ``handle`` (fast path) and ``handle_general`` agree exactly: same backend or
  reason, same bytes (the engine's docstring promises it);
- ``handle`` returning None leaves the bytes alone; ``decide`` never changes them;
- a rewritten packet keeps its length, changes only addresses and the checksums
  covering them, has the backend (inbound) or the VIP (return path) where it
  should, and every checksum that was valid in the input is valid in the output:
  the IPv4 header checksum, the transport checksum of an unfragmented packet
  (with partial checksums: always valid, the engine completes it), the ICMP
  checksum of an error it rewrote (recomputed), and the quoted packet's IPv4
  header checksum and, when the quote is whole, its transport checksum.
"""

from __future__ import annotations

import ipaddress
import random
import struct
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter

from loaded.core.config import parse_config
from loaded.core.engine import Engine, build_engine
from loaded.core.errors import PacketError
from loaded.core.packet import Packet, parse, parse_embedded, source_address
from loaded.core.pool import Backend

TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
HOPOPTS, ROUTING, FRAGMENT, AH, DSTOPTS, NONXT = 0, 43, 44, 51, 60, 59


def _a(s: str) -> bytes:
    return ipaddress.ip_address(s).packed


VIP4, VIP6 = _a("198.18.1.100"), _a("2001:db8:1::100")
BACKENDS4 = [_a(f"198.19.0.{i}") for i in (11, 12, 13)]
BACKENDS6 = [_a(f"2001:db8:2::{i}") for i in (11, 12, 13)]
CLIENTS4 = [_a(s) for s in ("198.18.0.11", "198.18.0.12", "198.18.200.7", "203.0.113.9")]
CLIENTS6 = [_a(s) for s in ("2001:db8:c::11", "2001:db8:c::12", "2001:db8:ffff::1",
                            "2001:db8:c::99")]
ROUTER4, ROUTER6 = _a("198.18.1.2"), _a("2001:db8:1::2")
UNLISTED4, UNLISTED6 = _a("198.19.0.200"), _a("2001:db8:2::200")  # real-server net, no backend
NS4, NS6 = _a("198.18.5.53"), _a("2001:db8:5::53")
MCAST4, MCAST6 = _a("224.0.0.5"), _a("ff02::1")
OTHER4, OTHER6 = _a("198.18.9.9"), _a("2001:db8:9::9")
ADDRS4 = [VIP4, *BACKENDS4, *CLIENTS4, ROUTER4, UNLISTED4, NS4, MCAST4, OTHER4]
ADDRS6 = [VIP6, *BACKENDS6, *CLIENTS6, ROUTER6, UNLISTED6, NS6, MCAST6, OTHER6]

STRATEGIES = ("rr", "weighted", "wrr", "lc", "sh", "maglev")
# Pool shapes a scenario starts from: states and weights of the three backends
# of each family. "down4"/"down6": every backend of a family down (no-backend).
POOLS = ("up", "one-down", "one-drain", "weights", "down4", "down6")


# --- checksums, independent of loaded.core.checksum -----------------------------


def csum_sum(data: bytes | bytearray, start: int = 0) -> int:
    """Ones' complement sum of 16-bit words, folded, 0 only for all-zero input."""
    if len(data) & 1:
        data = bytes(data) + b"\0"
    s = start + sum(struct.unpack(f"!{len(data) >> 1}H", data))
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def pseudo(src: bytes, dst: bytes, proto: int, length: int) -> int:
    return csum_sum(src + dst, proto + (length >> 16) + (length & 0xFFFF))


def _put16(buf: bytearray, off: int, v: int) -> None:
    buf[off] = (v >> 8) & 0xFF
    buf[off + 1] = v & 0xFF


def _seal(seg: bytearray, csum_at: int, start: int, udp: bool = False) -> bytearray:
    seg[csum_at] = seg[csum_at + 1] = 0
    c = ~csum_sum(seg, start) & 0xFFFF
    if c == 0 and udp:
        c = 0xFFFF
    _put16(seg, csum_at, c)
    return seg


# --- building valid packets ------------------------------------------------------


def tcp(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes = b"",
        flags: int = 0x18, options: bytes = b"", seq: int = 1000) -> bytearray:
    options += b"\x01" * (-len(options) % 4)
    doff = (20 + len(options)) >> 2
    seg = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq, 0, doff << 4, flags,
                                65535, 0, 0) + options + payload)
    return _seal(seg, 16, pseudo(src, dst, TCP, len(seg)))


def udp(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes = b"",
        zero: bool = False) -> bytearray:
    seg = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)
    return seg if zero else _seal(seg, 6, pseudo(src, dst, UDP, len(seg)), udp=True)


def icmp4(type_: int, code: int, rest: bytes, body: bytes = b"") -> bytearray:
    return _seal(bytearray(bytes((type_, code, 0, 0)) + rest[:4].ljust(4, b"\0") + body), 2, 0)


def icmp6(src: bytes, dst: bytes, type_: int, code: int, rest: bytes,
          body: bytes = b"") -> bytearray:
    msg = bytearray(bytes((type_, code, 0, 0)) + rest[:4].ljust(4, b"\0") + body)
    return _seal(msg, 2, pseudo(src, dst, ICMPV6, len(msg)))


def l4(family: int, proto: int, src: bytes, dst: bytes, sport: int, dport: int,
       payload: bytes, type_: int | None = None) -> bytearray:
    """A transport segment: TCP, UDP, or an ICMP echo (request unless ``type_``)."""
    if proto == TCP:
        return tcp(src, dst, sport, dport, payload)
    if proto == UDP:
        return udp(src, dst, sport, dport, payload)
    rest = struct.pack("!HH", sport, 1)
    if family == 4:
        return icmp4(8 if type_ is None else type_, 0, rest, payload)
    return icmp6(src, dst, 128 if type_ is None else type_, 0, rest, payload)


def ip4(src: bytes, dst: bytes, proto: int, payload: bytes, frag: int = 0,
        options: bytes = b"", ident: int = 0x1234, ttl: int = 64) -> bytearray:
    options += b"\0" * (-len(options) % 4)
    ihl = (20 + len(options)) >> 2
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(payload),
                                ident, frag, ttl, proto, 0, src, dst) + options)
    _seal(hdr, 10, 0)
    return hdr + payload


def ip6(src: bytes, dst: bytes, nh: int, payload: bytes, hlim: int = 64) -> bytearray:
    return bytearray(struct.pack("!IHBB16s16s", 0x60000000, len(payload), nh, hlim, src, dst)
                     + payload)


def ip(family: int, src: bytes, dst: bytes, proto: int, payload: bytes) -> bytearray:
    return ip4(src, dst, proto, payload) if family == 4 else ip6(src, dst, proto, payload)


def ext(kind: int, units: int = 0, segleft: int = 0, frag: int = 0) -> bytes:
    """One IPv6 extension header without its next-header byte (the chain sets it).

    ``units`` is the header's own length field: (units + 1) * 8 bytes for
    options and routing, (units + 2) * 4 for AH; a fragment header is 8 bytes
    with ``frag`` as its offset/flags word.
    """
    if kind == FRAGMENT:
        return struct.pack("!BHI", 0, frag, 0xABCD)
    if kind == AH:
        return bytes((units, 0, 0)) + bytes(((units + 2) * 4) - 4)
    if kind == ROUTING:
        body = bytes((units, 0, segleft)) + bytes((units + 1) * 8 - 4)
        return body
    # options: Pad1 options (zero bytes) filling the header
    return bytes((units,)) + bytes((units + 1) * 8 - 2)


def chain6(headers: list[bytes], kinds: list[int], upper: int) -> tuple[int, bytes]:
    """(first next-header value, the chain's bytes) for headers ending in ``upper``."""
    out = b""
    for i, h in enumerate(headers):
        nxt = kinds[i + 1] if i + 1 < len(kinds) else upper
        out += bytes((nxt,)) + h
    return (kinds[0] if kinds else upper), out


def partial_form(buf: bytearray) -> bytearray:
    """What checksum offload leaves in an unfragmented TCP/UDP packet (Linux
    CHECKSUM_PARTIAL): the folded pseudo-header sum, not complemented. Other
    packets come back unchanged (the kernel offloads only TCP and UDP)."""
    try:
        p = parse(buf)
    except PacketError:
        return buf
    if p.fragmented or p.csum_off < 0 or p.proto not in (TCP, UDP):
        return buf
    out = bytearray(buf)
    _put16(out, p.csum_off, pseudo(p.src, p.dst, p.proto, p.end - p.l4_off))
    return out


# --- seed templates: every kind of packet the engine must handle -------------------


Template = Callable[[random.Random], bytearray]


def _family_addrs(family: int) -> tuple[bytes, list[bytes], list[bytes], bytes]:
    if family == 4:
        return VIP4, CLIENTS4, BACKENDS4, ROUTER4
    return VIP6, CLIENTS6, BACKENDS6, ROUTER6


def _client(rng: random.Random, family: int) -> bytes:
    if rng.random() < 0.8:
        return rng.choice(CLIENTS4 if family == 4 else CLIENTS6)
    if family == 4:
        return bytes((198, 18, rng.randrange(256), rng.randrange(1, 255)))
    return _a("2001:db8:c::")[:12] + rng.randbytes(4)


def _payload(rng: random.Random) -> bytes:
    n = rng.choice((0, 1, 7, 32, 100, 512, 1400)) if rng.random() < 0.9 else rng.randrange(2000)
    return rng.randbytes(n)


def _proto_of(name: str, family: int) -> int:
    return {"tcp": TCP, "udp": UDP, "icmp": ICMP if family == 4 else ICMPV6}[name]


def t_inbound(family: int, proto: str) -> Template:
    def make(rng: random.Random) -> bytearray:
        vip, _, _, _ = _family_addrs(family)
        src = _client(rng, family)
        pr = _proto_of(proto, family)
        seg = l4(family, pr, src, vip, rng.randrange(1, 65536), 80, _payload(rng))
        return ip(family, src, vip, pr, seg)
    return make


def t_return(family: int, proto: str, unlisted: bool = False) -> Template:
    """A backend's (or a real-server host's) reply to a client."""
    def make(rng: random.Random) -> bytearray:
        _, _, backends, _ = _family_addrs(family)
        src = (UNLISTED4 if family == 4 else UNLISTED6) if unlisted else rng.choice(backends)
        dst = _client(rng, family)
        pr = _proto_of(proto, family)
        seg = l4(family, pr, src, dst, 80, rng.randrange(1, 65536), _payload(rng),
                 type_=0 if family == 4 else 129)
        return ip(family, src, dst, pr, seg)
    return make


def t_udp_zero(family: int, inbound: bool) -> Template:
    def make(rng: random.Random) -> bytearray:
        vip, _, backends, _ = _family_addrs(family)
        c = _client(rng, family)
        src, dst = (c, vip) if inbound else (rng.choice(backends), c)
        return ip(family, src, dst, UDP, udp(src, dst, 5353, 53, _payload(rng), zero=True))
    return make


def t_passing(family: int) -> Template:
    """Traffic the engine lets pass: to a nameserver, multicast, unrelated, NDP."""
    def make(rng: random.Random) -> bytearray:
        vip, _, backends, router = _family_addrs(family)
        k = rng.randrange(4)
        if k == 0:
            src, dst = rng.choice(backends), NS4 if family == 4 else NS6
            return ip(family, src, dst, UDP, udp(src, dst, 3333, 53, b"dns"))
        if k == 1:
            src, dst = rng.choice(backends), MCAST4 if family == 4 else MCAST6
            return ip(family, src, dst, UDP, udp(src, dst, 520, 520, b"rip"))
        if k == 2 or family == 4:
            src, dst = OTHER4 if family == 4 else OTHER6, _client(rng, family)
            return ip(family, src, dst, TCP, tcp(src, dst, 1, 2, b"x"))
        t = rng.choice((133, 134, 135, 136, 137))
        return ip6(router, vip, ICMPV6, icmp6(router, vip, t, 0, b"", vip + b"\x01\x01" + bytes(6)))
    return make


def t_ip4_options(rng: random.Random) -> bytearray:
    src = _client(rng, 4)
    opts = rng.choice((b"\x01\x01\x01\x01", b"\x94\x04\x00\x00", b"\x07\x07\x04" + bytes(5),
                       bytes(40)))
    pr = rng.choice((TCP, UDP, ICMP))
    return ip4(src, VIP4, pr, l4(4, pr, src, VIP4, 1234, 80, _payload(rng)), options=opts)


def t_tcp_options(family: int) -> Template:
    def make(rng: random.Random) -> bytearray:
        vip, _, _, _ = _family_addrs(family)
        src = _client(rng, family)
        opts = rng.choice((b"\x02\x04\x05\xb4", b"\x02\x04\x05\xb4\x04\x02\x08\x0a" + bytes(8),
                           bytes(40)))
        return ip(family, src, vip, TCP, tcp(src, vip, 4000, 80, _payload(rng), 0x02, opts))
    return make


def _quoted(family: int, src: bytes, dst: bytes, proto: str, rng: random.Random) -> bytearray:
    pr = _proto_of(proto, family)
    seg = l4(family, pr, src, dst, 80, rng.randrange(1, 65536), _payload(rng),
             type_=0 if family == 4 else 129)
    if family == 6 and rng.random() < 0.3:
        # the quoted packet has its own extension headers
        kinds = rng.choice(([DSTOPTS], [HOPOPTS, DSTOPTS], [FRAGMENT], [ROUTING]))
        nh, chain = chain6([ext(k) for k in kinds], kinds, pr)
        return ip6(src, dst, nh, chain + seg)
    if family == 4 and rng.random() < 0.2:
        return ip4(src, dst, pr, seg, options=b"\x01\x01\x01\x01")
    return ip(family, src, dst, pr, seg)


def _cut(rng: random.Random, q: bytearray, family: int) -> bytes:
    """A quote as routers send it: 8 bytes of transport (RFC 792), more, or all."""
    hdr = 20 if family == 4 else 40
    k = rng.random()
    if k < 0.3:
        return bytes(q[:hdr + 8])
    if k < 0.6:
        return bytes(q[:rng.randrange(1, len(q) + 1)])
    return bytes(q[:1232 if family == 6 else 548])


def _icmp_error(family: int, src: bytes, dst: bytes, quote: bytes,
                rng: random.Random) -> bytearray:
    if family == 4:
        t, c = rng.choice(((3, 4), (3, 3), (3, 1), (11, 0), (12, 0)))
        rest = struct.pack("!HH", 0, 1280) if (t, c) == (3, 4) else bytes(4)
        return ip4(src, dst, ICMP, icmp4(t, c, rest, quote))
    t, c = rng.choice(((2, 0), (1, 4), (1, 0), (3, 0), (4, 0)))
    rest = struct.pack("!I", 1280) if t == 2 else bytes(4)
    return ip6(src, dst, ICMPV6, icmp6(src, dst, t, c, rest, quote))


def t_error_in(family: int, proto: str) -> Template:
    """A router's ICMP error about the balancer's reply (VIP -> client): to the VIP."""
    def make(rng: random.Random) -> bytearray:
        vip, _, _, router = _family_addrs(family)
        q = _quoted(family, vip, _client(rng, family), proto, rng)
        return _icmp_error(family, router, vip, _cut(rng, q, family), rng)
    return make


def t_error_out(family: int, proto: str) -> Template:
    """A backend's ICMP error about a client's packet (client -> backend): to the client."""
    def make(rng: random.Random) -> bytearray:
        _, _, backends, _ = _family_addrs(family)
        b, c = rng.choice(backends), _client(rng, family)
        if rng.random() < 0.2:
            b = UNLISTED4 if family == 4 else UNLISTED6
            q = _quoted(family, c, rng.choice(backends), proto, rng)
        else:
            q = _quoted(family, c, b, proto, rng)
        return _icmp_error(family, b, c, _cut(rng, q, family), rng)
    return make


def t_ext6(rng: random.Random) -> bytearray:
    """IPv6 with an extension-header chain: valid ones, zero-length ones (length
    field 0: 8 bytes), long and looping ones (a header naming its own kind next,
    past MAX_EXT_HEADERS), misplaced hop-by-hop, two fragment headers, routing
    with segments left, AH, and a chain that ends in "no next header"."""
    src = _client(rng, 6)
    dst = VIP6 if rng.random() < 0.8 else rng.choice(BACKENDS6)
    shape = rng.randrange(8)
    if shape == 0:
        kinds = rng.choice(([HOPOPTS], [DSTOPTS], [HOPOPTS, DSTOPTS], [AH], [ROUTING],
                            [HOPOPTS, ROUTING, DSTOPTS], [DSTOPTS, AH, DSTOPTS]))
    elif shape == 1:
        kinds = [DSTOPTS] * rng.randrange(6, 12)  # the loop: each names the next alike
    elif shape == 2:
        kinds = [rng.choice((HOPOPTS, ROUTING, DSTOPTS, AH, FRAGMENT))
                 for _ in range(rng.randrange(1, 11))]
    elif shape == 3:
        kinds = [DSTOPTS, HOPOPTS]
    elif shape == 4:
        kinds = [FRAGMENT, FRAGMENT]
    elif shape == 5:
        kinds = [HOPOPTS] * rng.randrange(1, 10)
    elif shape == 6:
        kinds = [ROUTING]
    else:
        kinds = [DSTOPTS, DSTOPTS]
    headers = []
    for k in kinds:
        if k == ROUTING:
            headers.append(ext(k, 2 * rng.randrange(2), segleft=rng.choice((0, 0, 1))))
        elif k == AH:
            headers.append(ext(k, rng.choice((1, 4))))
        elif k == FRAGMENT:
            headers.append(ext(k, frag=rng.choice((0, 1, 8, 9))))
        else:
            headers.append(ext(k, rng.choice((0, 0, 1, 3))))
    pr = rng.choice((TCP, UDP, ICMPV6, NONXT))
    seg = b"" if pr == NONXT else l4(6, pr, src, dst, 1234, 80, _payload(rng))
    nh, chain = chain6(headers, kinds, pr)
    return ip6(src, dst, nh, chain + seg)


def t_frag4(rng: random.Random) -> bytearray:
    src = _client(rng, 4)
    dst = VIP4 if rng.random() < 0.8 else rng.choice(BACKENDS4)
    pr = rng.choice((TCP, UDP, ICMP))
    seg = l4(4, pr, src, dst, 1234, 80, rng.randbytes(rng.randrange(8, 600)))
    k = rng.randrange(5)
    if k == 0:  # first fragment: transport header, more fragments
        cut = 8 * rng.randrange(1, max(2, len(seg) // 8))
        return ip4(src, dst, pr, seg[:cut], frag=0x2000)
    if k == 1:  # a middle one
        return ip4(src, dst, pr, bytes(seg[16:80]), frag=0x2000 | rng.randrange(2, 100))
    if k == 2:  # the last one
        return ip4(src, dst, pr, bytes(seg[24:]), frag=rng.randrange(3, 8000))
    if k == 3:  # RFC 1858: TCP at offset 8 overwriting the header
        return ip4(src, dst, TCP, bytes(seg[8:40]), frag=1)
    # a first fragment too short for its transport header
    return ip4(src, dst, pr, bytes(seg[:rng.randrange(1, 8)]), frag=0x2000)


def t_frag6(rng: random.Random) -> bytearray:
    src = _client(rng, 6)
    dst = VIP6 if rng.random() < 0.8 else rng.choice(BACKENDS6)
    pr = rng.choice((TCP, UDP, ICMPV6))
    seg = l4(6, pr, src, dst, 1234, 80, rng.randbytes(rng.randrange(8, 600)))
    k = rng.randrange(4)
    if k == 0:
        data, fo = seg[:8 * rng.randrange(1, max(2, len(seg) // 8))], 1
    elif k == 1:
        data, fo = seg[24:], rng.randrange(3, 8000) << 3
    elif k == 2:
        data, fo = seg[16:80], (rng.randrange(2, 100) << 3) | 1
    else:
        data, fo = seg[:rng.randrange(1, 8)], 1
    kinds = [FRAGMENT] if rng.random() < 0.7 else [DSTOPTS, FRAGMENT]
    headers = [ext(k2, frag=fo) for k2 in kinds]
    nh, chain = chain6(headers, kinds, pr)
    return ip6(src, dst, nh, chain + bytes(data))


def t_gso(family: int) -> Template:
    """A segmentation-offload super-packet, up to 64 KiB."""
    def make(rng: random.Random) -> bytearray:
        vip, _, backends, _ = _family_addrs(family)
        c = _client(rng, family)
        src, dst = (c, vip) if rng.random() < 0.6 else (rng.choice(backends), c)
        size = rng.randrange(2000, 65400)
        pr = rng.choice((TCP, TCP, UDP))
        seg = l4(family, pr, src, dst, 40000, 80, rng.randbytes(size))
        return ip(family, src, dst, pr, seg)
    return make


def t_other_proto(rng: random.Random) -> bytearray:
    family = rng.choice((4, 6))
    vip = VIP4 if family == 4 else VIP6
    src = _client(rng, family)
    pr = rng.choice((47, 50, 132, 2, 41, 4, NONXT, ICMPV6 if family == 4 else ICMP))
    body = rng.randbytes(rng.randrange(0, 64))
    if family == 4 and pr == ICMPV6 and len(body) >= 8:  # the other family's ICMP
        body = bytes((128,)) + body[1:]
    return ip(family, src, vip, pr, body)


def t_icmp_types(rng: random.Random) -> bytearray:
    family = rng.choice((4, 6))
    vip = VIP4 if family == 4 else VIP6
    src = _client(rng, family)
    t = rng.randrange(256)
    if family == 4:
        return ip4(src, vip, ICMP, icmp4(t, rng.randrange(3), b"abcd", rng.randbytes(20)))
    return ip6(src, vip, ICMPV6, icmp6(src, vip, t, rng.randrange(3), b"abcd", rng.randbytes(20)))


def t_random(rng: random.Random) -> bytearray:
    head = rng.choice((b"", b"\x45", b"\x45\x00", b"\x46", b"\x4f", b"\x60\x00\x00\x00", b"\x60",
                       b"\x40", b"\x50"))
    return bytearray(head + rng.randbytes(rng.randrange(0, 120)))


TEMPLATES: list[tuple[str, Template, int]] = []  # (name, builder, weight)
for _f in (4, 6):
    for _p in ("tcp", "udp", "icmp"):
        TEMPLATES += [
            (f"v{_f}-{_p}-inbound", t_inbound(_f, _p), 8),
            (f"v{_f}-{_p}-return", t_return(_f, _p), 4),
            (f"v{_f}-{_p}-unlisted", t_return(_f, _p, unlisted=True), 1),
            (f"v{_f}-{_p}-error-in", t_error_in(_f, _p), 4),
            (f"v{_f}-{_p}-error-out", t_error_out(_f, _p), 3),
        ]
    TEMPLATES += [
        (f"v{_f}-udp-zero-in", t_udp_zero(_f, True), 1),
        (f"v{_f}-udp-zero-out", t_udp_zero(_f, False), 1),
        (f"v{_f}-passing", t_passing(_f), 2),
        (f"v{_f}-tcp-options", t_tcp_options(_f), 1),
        (f"v{_f}-gso", t_gso(_f), 0),  # weight set by the campaign: costly
    ]
TEMPLATES += [
    ("v4-options", t_ip4_options, 2),
    ("v6-ext-chain", t_ext6, 8),
    ("v4-fragment", t_frag4, 4),
    ("v6-fragment", t_frag6, 4),
    ("other-protocol", t_other_proto, 2),
    ("icmp-type", t_icmp_types, 2),
    ("random", t_random, 4),
]


# --- mutation ------------------------------------------------------------------


_INTERESTING = (0, 1, 2, 4, 5, 6, 7, 8, 0x0F, 0x10, 0x14, 0x28, 0x3F, 0x40, 0x45, 0x4F, 0x60,
                0x7F, 0x80, 0xFE, 0xFF)
_PROTOS = (0, 1, 4, 6, 17, 41, 43, 44, 47, 50, 51, 58, 59, 60, 135, 139, 253, 255)
_ICMP_TYPES = (0, 1, 2, 3, 4, 5, 8, 11, 12, 13, 128, 129, 133, 134, 135, 136, 137, 255)


def _layout(buf: bytearray) -> tuple[int, int]:
    """(IP header length, transport offset) as well as can be guessed."""
    if not buf:
        return 0, 0
    if buf[0] >> 4 == 6:
        try:
            return 40, parse(buf).l4_off
        except PacketError:
            return 40, 40
    ihl = (buf[0] & 15) * 4
    return 20, max(ihl, 20)


def mutate(rng: random.Random, buf: bytearray, others: Callable[[], bytearray]) -> str:
    """Apply one random change to ``buf`` in place; its name."""
    n = len(buf)
    op = rng.choice(("flip", "flip", "byte", "byte", "insert", "delete", "truncate",
                     "extend", "length", "length", "proto", "frag", "addr", "addr",
                     "icmp", "splice"))
    hl, lo = _layout(buf)
    if op in ("flip", "byte") and n:
        i = rng.randrange(min(n, 80)) if rng.random() < 0.7 else rng.randrange(n)
        if op == "flip":
            buf[i] ^= 1 << rng.randrange(8)
        else:
            buf[i] = rng.choice(_INTERESTING) if rng.random() < 0.5 else rng.randrange(256)
    elif op == "insert":
        i = rng.randrange(n + 1)
        buf[i:i] = rng.randbytes(rng.randrange(1, 9))
    elif op == "delete" and n:
        i = rng.randrange(n)
        del buf[i:i + rng.randrange(1, 9)]
    elif op == "truncate" and n:
        del buf[rng.randrange(n):]
    elif op == "extend":
        buf += rng.randbytes(rng.randrange(1, 64))
    elif op == "length" and n >= 4:
        if hl == 40:
            spots = [(4, 2), (lo + 4, 2), (lo + 12, 1), (41, 1), (49, 1)]
        else:
            spots = [(0, 1), (2, 2), (lo + 4, 2), (lo + 12, 1)]
        off, width = rng.choice(spots)
        if off + width <= n:
            if width == 2:
                v = rng.choice((0, 1, 7, 8, 19, 20, 39, 40, n, n - 1, n + 1, n - hl, 0xFFFF,
                                rng.randrange(65536)))
                _put16(buf, off, v & 0xFFFF)
            elif off == 0:
                buf[0] = 0x40 | rng.randrange(16)
            else:
                buf[off] = rng.choice(_INTERESTING) if rng.random() < 0.6 else rng.randrange(256)
    elif op == "proto" and n >= 10:
        spots = [6, 40, 48] if hl == 40 else [9]
        off = rng.choice(spots)
        if off < n:
            buf[off] = rng.choice(_PROTOS)
    elif op == "frag" and n >= 8:
        if hl == 40:
            if n >= 44:
                _put16(buf, 42, rng.choice((0, 1, 8, 9, 0xFFF8, rng.randrange(65536))))
        else:
            _put16(buf, 6, rng.choice((0, 1, 0x2000, 0x2001, 0x4000, 0x1FFF, 0x8000,
                                       rng.randrange(65536))))
    elif op == "addr" and n >= hl + 0 and hl:
        alen = 4 if hl == 20 else 16
        off = (12 if hl == 20 else 8) + alen * rng.randrange(2)
        if off + alen <= n:
            buf[off:off + alen] = rng.choice(ADDRS4 if alen == 4 else ADDRS6)
    elif op == "icmp" and lo + 1 < n:
        buf[lo] = rng.choice(_ICMP_TYPES)
        buf[lo + 1] = rng.choice((0, 0, 1, 3, 4, rng.randrange(256)))
    elif op == "splice":
        other = others()
        i = rng.randrange(n + 1)
        buf[i:] = other[rng.randrange(len(other) + 1):]
    return op


def repair(rng: random.Random, buf: bytearray) -> None:
    """Undo part of the damage so that mutants get deep into the engine: the lengths
    made to fit, the transport and ICMP checksums recomputed, and the IPv4 header
    checksum (the kernel drops a packet with a bad one before it is queued)."""
    n = len(buf)
    if n < 20:
        return
    v = buf[0] >> 4
    if rng.random() < 0.3:
        if v == 4 and n <= 0xFFFF:
            _put16(buf, 2, n)
        elif v == 6 and 40 < n <= 0xFFFF + 40:
            _put16(buf, 4, n - 40)
    if rng.random() < 0.5:
        try:
            p = parse(buf)
        except PacketError:
            p = None
        if p is not None and not p.fragmented:
            seg = bytearray(buf[p.l4_off:p.end])
            at = {TCP: 16, UDP: 6, ICMP: 2, ICMPV6: 2}.get(p.proto, -1)
            if at >= 0 and at + 2 <= len(seg):
                start = 0 if p.proto == ICMP else pseudo(p.src, p.dst, p.proto, len(seg))
                _seal(seg, at, start, udp=p.proto == UDP)
                buf[p.l4_off + at:p.l4_off + at + 2] = seg[at:at + 2]
    if v == 4 and rng.random() < 0.9:
        ihl = (buf[0] & 15) * 4
        if 20 <= ihl <= n:
            hdr = bytearray(buf[:ihl])
            _seal(hdr, 10, 0)
            buf[10:12] = hdr[10:12]


# --- engines -----------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    strategy: str = "rr"
    pool: str = "up"
    table_max: int = 1_000_000
    nameservers: bool = True

    def config(self) -> str:
        lines = ["VIP4=198.18.1.100", "VIP4net=24", "VIP6=2001:db8:1::100", "VIP6net=64",
                 "RIP4=198.19.0.0/24", "RIP6=2001:db8:2::/64",
                 f"client_table_max={self.table_max}", "client_timeout=30"]
        lines.append("strategy=maglev table_size=251" if self.strategy == "maglev"
                     else f"strategy={self.strategy}")
        if self.nameservers:
            lines += ["NS=198.18.5.53", "NS=2001:db8:5::53"]
        for family, backends in ((4, BACKENDS4), (6, BACKENDS6)):
            for i, b in enumerate(backends):
                opt = ""
                if (self.pool == "one-down" and i == 1) or self.pool == f"down{family}":
                    opt = " state=down"
                elif self.pool == "one-drain" and i == 0:
                    opt = " state=drain"
                elif self.pool == "weights":
                    opt = f" weight={(3, 0, 1)[i]}"
                lines.append(f"server{family}={ipaddress.ip_address(b)}{opt}")
        return "\n".join(lines) + "\n"

    def engine(self) -> Engine:
        return build_engine(parse_config(self.config(), "fuzz.conf"), now=0.0)

    def __str__(self) -> str:
        return (f"{self.strategy}/{self.pool}/max={self.table_max}"
                f"{'' if self.nameservers else '/no-ns'}")


def random_scenario(rng: random.Random) -> Scenario:
    return Scenario(rng.choice(STRATEGIES), rng.choice(POOLS),
                    rng.choice((1_000_000, 1_000_000, 8)), rng.random() < 0.8)


def prime(engines: tuple[Engine, ...], now: float = 0.0) -> None:
    """Every regular client has a backend, so errors about their flows find one."""
    for family, vip, clients in ((4, VIP4, CLIENTS4), (6, VIP6, CLIENTS6)):
        for c in clients:
            for e in engines:
                try:
                    e.handle(ip(family, c, vip, UDP, udp(c, vip, 1, 80)), now)
                except PacketError:
                    pass  # every backend of the family down


# --- the oracle ----------------------------------------------------------------


class Hang(BaseException):
    """Raised by the campaign's watchdog inside a packet that takes too long.
    A BaseException so that no ``except Exception`` in the engine swallows it."""


@dataclass
class Failure:
    entry: str  # "handle", "handle partial", "decide"
    problem: str
    data: bytes  # the input packet
    detail: str = ""


class Clock:
    """The slowest engine call seen, in seconds (the checks around it not counted)."""

    slowest = 0.0


def _outcome(fn: Callable[[], Backend | None]) -> tuple[str, Backend | None, BaseException | None]:
    t0 = perf_counter()
    try:
        b = fn()
    except PacketError as e:
        return f"drop:{e.reason.value}", None, None
    except Hang:
        raise
    except Exception as e:
        return f"exception:{type(e).__name__}", None, e
    finally:
        took = perf_counter() - t0
        if took > Clock.slowest:
            Clock.slowest = took
    return ("pass" if b is None else "accept"), b, None


def _tb(e: BaseException) -> str:
    return "".join(traceback.format_exception(e)).strip()


def _l4_sum(buf: bytes | bytearray, version: int, proto: int, start: int, end: int,
            src: bytes, dst: bytes) -> int:
    seg = buf[start:end]
    return csum_sum(seg, 0 if proto == ICMP else pseudo(src, dst, proto, len(seg)))


def _whole(p: Packet) -> bool:
    return (p.first and not p.more and p.csum_off >= 0) or (
        p.first and not p.more and p.proto == ICMP and p.icmp_type >= 0)


def _valid4(buf: bytes | bytearray, base: int) -> bool:
    ihl = (buf[base] & 15) * 4
    return base + ihl <= len(buf) and csum_sum(buf[base:base + ihl]) == 0xFFFF


class Checker:
    """Runs one packet through both entry points of an engine pair and counts what
    happened; ``fast`` gets ``handle``, ``general`` gets ``handle_general``, both
    get ``decide``, so their client tables stay alike."""

    def __init__(self, scenario: Scenario, view: bool = True) -> None:
        self.scenario = scenario
        self.fast = scenario.engine()
        self.general = scenario.engine()
        self.view = view  # feed memoryviews, as the workers do
        self.counts: Counter[str] = Counter()
        self.last = self._last = ""
        prime((self.fast, self.general))

    def check(self, data: bytes, now: float,
              partial_inputs: tuple[bytes, ...] | None = None) -> list[Failure]:
        """``handle`` on ``data`` with partial checksums off, on each of
        ``partial_inputs`` (default: ``data`` itself) with them on, ``decide`` on
        ``data``. ``last`` is then the outcome of the first ``handle``."""
        out = self._handle(data, now, False)
        self.last = self._last
        for pi in (data,) if partial_inputs is None else partial_inputs:
            out += self._handle(pi, now, True)
        out += self._decide(data, now)
        return out

    def _wrap(self, b: bytearray) -> bytearray | memoryview:
        return memoryview(b) if self.view else b

    def _handle(self, data: bytes, now: float, partial: bool) -> list[Failure]:
        entry = "handle partial" if partial else "handle"
        a, g = bytearray(data), bytearray(data)
        ka, ba, ea = _outcome(lambda: self.fast.handle(self._wrap(a), now, partial))
        kg, bg, eg = _outcome(lambda: self.general.handle_general(self._wrap(g), now, partial))
        self.counts[f"{entry}:{ka}"] += 1
        self._last = ka
        fails = []
        if ea is not None:
            fails.append(Failure(entry, ka, data, _tb(ea)))
        if eg is not None:
            fails.append(Failure(entry + " (general)", kg, data, _tb(eg)))
        if fails:
            return fails
        if ka != kg or (ba is not bg and (ba is None or bg is None or ba.ip != bg.ip)) or (
                ka in ("accept", "pass") and a != g):
            return [Failure(entry, "fast and general paths differ", data,
                            f"fast {ka} {ba}, general {kg} {bg}\n"
                            f"fast    {a.hex()}\ngeneral {g.hex()}")]
        if ka == "pass" and a != data:
            return [Failure(entry, "passed unchanged but changed", data, a.hex())]
        if ka == "accept":
            try:
                problem = self._rewritten(data, a, partial)
            except Exception as e:  # a bug of the checker: reported all the same
                problem = f"checker failed: {type(e).__name__}: {e}"
            if problem:
                return [Failure(entry, problem, data, a.hex())]
        return []

    def _decide(self, data: bytes, now: float) -> list[Failure]:
        a, g = bytearray(data), bytearray(data)
        ka, ba, ea = _outcome(lambda: self.fast.decide(self._wrap(a), now))
        kg, bg, eg = _outcome(lambda: self.general.decide(self._wrap(g), now))
        self.counts[f"decide:{ka}"] += 1
        if ea is not None:
            return [Failure("decide", ka, data, _tb(ea))]
        if ba is not None:
            try:
                if source_address(self._wrap(a)) != parse(data).src:
                    return [Failure("decide", "source_address wrong", data)]
            except Exception as e:
                return [Failure("decide", f"source_address: {type(e).__name__}", data, _tb(e))]
            if ba.mark & 0xFFFF0000 != 0x4C420000:
                return [Failure("decide", f"mark {ba.mark:#x}", data)]
        if a != data:
            return [Failure("decide", "decide changed the packet", data, a.hex())]
        del kg, bg, eg  # same engine state, same decision: not compared (no fast path)
        return []

    def _rewritten(self, before: bytes, after: bytearray, partial: bool) -> str:
        """What is wrong with ``after``, the rewrite of ``before``; "" when nothing."""
        if len(after) != len(before):
            return f"length {len(before)} -> {len(after)}"
        p = parse(before)  # handle accepted it, so the parser did
        v4 = p.version == 4
        alen = 4 if v4 else 16
        allowed = set(range(p.src_off, p.src_off + alen)) | set(range(p.dst_off, p.dst_off + alen))
        if v4:
            allowed |= {10, 11}
        if p.csum_off >= 0:
            allowed |= {p.csum_off, p.csum_off + 1}
        q = None
        if p.is_icmp_error:
            allowed |= {p.l4_off + 2, p.l4_off + 3}
            q = parse_embedded(before, p)
            allowed |= set(range(q.src_off, q.src_off + alen))
            allowed |= set(range(q.dst_off, q.dst_off + alen))
            if v4:
                allowed |= {q.src_off - 2, q.src_off - 1}
            if q.csum_off >= 0:
                allowed |= {q.csum_off, q.csum_off + 1}
        masked = bytearray(after)
        for i in allowed:
            if i < len(before):
                masked[i] = before[i]
        if masked != before:
            stray = [i for i in range(len(before)) if masked[i] != before[i]]
            return f"bytes changed outside addresses and checksums: {stray[:8]}"
        vip = VIP4 if v4 else VIP6
        inbound = p.dst == vip
        where = p.dst_off if inbound else p.src_off
        got = bytes(after[where:where + alen])
        if inbound and got not in (BACKENDS4 if v4 else BACKENDS6):
            return f"inbound destination {got.hex()} is not a backend"
        if not inbound and got != vip:
            return f"return source {got.hex()} is not the VIP"
        if v4 and _valid4(before, 0) and not _valid4(after, 0):
            return "IPv4 header checksum broken"
        if _whole(p) and p.proto in (TCP, UDP, ICMP, ICMPV6):
            src_a, dst_a = bytes(after[p.src_off:p.src_off + alen]), bytes(
                after[p.dst_off:p.dst_off + alen])
            old = _l4_sum(before, p.version, p.proto, p.l4_off, p.end, p.src, p.dst)
            new = _l4_sum(after, p.version, p.proto, p.l4_off, p.end, src_a, dst_a)
            field_before = (before[p.csum_off] << 8 | before[p.csum_off + 1]
                            if p.csum_off >= 0 else -1)
            udp_none = p.proto == UDP and field_before == 0 and not partial
            offloaded = partial and p.proto != ICMP and p.csum_off >= 0
            if udp_none:
                if after[p.csum_off:p.csum_off + 2] != b"\0\0":
                    return "UDP without checksum got one"
            elif (old == 0xFFFF or offloaded or q is not None) and new != 0xFFFF:
                return (f"transport checksum invalid after rewrite (before {old:#06x}, "
                        f"after {new:#06x}, partial={partial})")
        if q is not None:
            if v4 and _valid4(before, q.src_off - 12) and not _valid4(after, q.src_off - 12):
                return "quoted IPv4 header checksum broken"
            qlen = ((before[q.src_off - 10] << 8 | before[q.src_off - 9]) if v4 else
                    40 + (before[q.src_off - 4] << 8 | before[q.src_off - 3]))
            qstart = q.src_off - (12 if v4 else 8)
            if (qstart + qlen == p.end and q.first and not q.more and q.csum_off >= 0
                    and q.proto in (TCP, UDP, ICMPV6)
                    and (before[q.csum_off] or before[q.csum_off + 1] or q.proto != UDP)):
                qa = bytes(after[q.src_off:q.src_off + alen])
                qb = bytes(after[q.dst_off:q.dst_off + alen])
                old = _l4_sum(before, q.version, q.proto, q.l4_off, p.end, q.src, q.dst)
                new = _l4_sum(after, q.version, q.proto, q.l4_off, p.end, qa, qb)
                if old == 0xFFFF and new != 0xFFFF:
                    return "quoted transport checksum broken"
        return ""


# --- the campaign ----------------------------------------------------------------


@dataclass
class Result:
    packets: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    failures: list[dict[str, object]] = field(default_factory=list)
    slowest: float = 0.0  # seconds, the slowest packet (all its runs and checks)
    slowest_call: float = 0.0  # seconds, the slowest single handle or decide
    slowest_packet: str = ""  # which it was: template, mutations, scenario, hex
    interesting: dict[str, bytes] = field(default_factory=dict)  # outcome -> first input


class Generator:
    """Packets for the campaign: a template's fresh valid packet, then (most of the
    time) a few mutations and a partial repair."""

    def __init__(self, rng: random.Random, gso_weight: int = 1) -> None:
        self.rng = rng
        self.names = [t[0] for t in TEMPLATES]
        self.makers = [t[1] for t in TEMPLATES]
        self.weights = [t[2] if "gso" not in t[0] else gso_weight for t in TEMPLATES]

    def seed(self) -> tuple[str, bytearray]:
        i = self.rng.choices(range(len(self.makers)), self.weights)[0]
        return self.names[i], self.makers[i](self.rng)

    def packet(self) -> tuple[str, bytearray]:
        """(description: template and mutations, packet)."""
        rng = self.rng
        name, buf = self.seed()
        if rng.random() < 0.25:
            return name, buf
        ops = [mutate(rng, buf, lambda: self.seed()[1]) for _ in range(rng.choice((1, 1, 2, 3, 5)))]
        if rng.random() < 0.7:
            repair(rng, buf)
            ops.append("repair")
        return f"{name}+{','.join(ops)}", buf


def campaign(seed: int, packets: int, deadline: float, clock: Callable[[], float],
             scenario_every: int = 5000, gso_weight: int = 1,
             watchdog: Callable[[float], object] | None = None,
             hang_after: float = 2.0) -> Result:
    """Run ``packets`` generated packets (or until ``clock() >= deadline``) through a
    fresh scenario every ``scenario_every`` packets. Deterministic for a seed,
    whatever the speed, except where the deadline cuts it. ``watchdog(seconds)``
    arms (0: disarms) a timer that raises ``Hang`` in a packet taking too long."""
    rng = random.Random(seed)
    gen = Generator(rng, gso_weight)
    res = Result()
    Clock.slowest = 0.0
    checker: Checker | None = None
    now = 0.0
    for i in range(packets):
        if i % scenario_every == 0:
            if clock() >= deadline:
                break
            checker = Checker(random_scenario(rng), view=rng.random() < 0.7)
            now = 1.0
        assert checker is not None
        # time moves on, now and then past the client timeout (30 s): entries expire
        now += rng.random() * 0.01 if rng.random() < 0.999 else 31.0
        desc, buf = gen.packet()
        data = bytes(buf)
        # mostly what offload really leaves; sometimes a complete checksum flagged partial
        partial = bytes(partial_form(buf)) if rng.random() < 0.8 else data
        t0 = clock()
        try:
            if watchdog is not None:
                watchdog(hang_after)
            fails = checker.check(data, now, (partial,))
        except Hang:
            fails = [Failure("any", f"hang: no result after {hang_after} s", data)]
        finally:
            if watchdog is not None:
                watchdog(0)
        took = clock() - t0
        if took > res.slowest:
            res.slowest = took
            res.slowest_packet = f"{desc} in {checker.scenario} ({len(data)} bytes)"
        res.packets += 1
        res.kinds[f"{desc.split('+')[0]}:{checker.last.split(':')[0]}"] += 1
        for k, v in checker.counts.items():
            if v and k not in res.interesting:
                res.interesting[k] = data
        res.counts.update(checker.counts)
        checker.counts.clear()
        for f in fails:
            res.failures.append({"index": i, "seed": seed, "scenario": str(checker.scenario),
                                 "view": checker.view, "packet": desc, "entry": f.entry,
                                 "problem": f.problem, "hex": f.data.hex(),
                                 "partial_hex": partial.hex(), "detail": f.detail})
        if fails:
            # a divergence leaves the engine pair in unlike states: start afresh
            checker = Checker(checker.scenario, checker.view)
        if i % 64 == 0:
            for e in (checker.fast, checker.general):
                e.settle(now)
    res.slowest_call = Clock.slowest
    return res


def corpus_scenarios() -> list[Scenario]:
    return [Scenario("rr"), Scenario("sh", "one-down"), Scenario("maglev", "weights", 8),
            Scenario("lc", "down4", nameservers=False)]



def special_seeds() -> list[tuple[str, bytes]]:
    """Hand-made edge cases a random draw might miss: (name, packet)."""
    c4, c6, b6 = CLIENTS4[0], CLIENTS6[0], BACKENDS6[0]
    t6 = tcp(c6, VIP6, 1234, 80, b"x")
    u6 = udp(c6, VIP6, 1234, 80, b"x")

    def v6(kinds: list[int], headers: list[bytes] | None = None, upper: int = TCP,
           seg: bytes = t6, src: bytes = c6, dst: bytes = VIP6) -> bytes:
        nh, chain = chain6([ext(k) for k in kinds] if headers is None else headers, kinds, upper)
        return bytes(ip6(src, dst, nh, chain + seg))

    def err6(quote: bytes) -> bytes:
        return bytes(ip6(ROUTER6, VIP6, ICMPV6, icmp6(ROUTER6, VIP6, 2, 0, b"\0\0\x05\0", quote)))

    q6 = udp(VIP6, c6, 80, 1234, b"reply")
    q4 = bytes(ip4(VIP4, c4, TCP, tcp(VIP4, c4, 80, 40000, b"reply")))
    err4 = bytes(ip4(ROUTER4, VIP4, ICMP, icmp4(3, 4, b"\0\0\x05\0", q4)))
    out = [
        ("v6 eight zero-length destination options (the most allowed)", v6([DSTOPTS] * 8)),
        ("v6 nine zero-length destination options (a loop)", v6([DSTOPTS] * 9)),
        ("v6 sixteen hop-by-hop headers", v6([HOPOPTS] * 16)),
        ("v6 hop-by-hop after destination options", v6([DSTOPTS, HOPOPTS])),
        ("v6 two fragment headers", v6([FRAGMENT, FRAGMENT])),
        ("v6 routing header, segments left", v6([ROUTING], [ext(ROUTING, 2, segleft=1)])),
        ("v6 routing header, done", v6([ROUTING], [ext(ROUTING, 2)])),
        ("v6 AH then UDP", v6([AH], [ext(AH, 4)], UDP, u6)),
        ("v6 options longer than the packet", v6([DSTOPTS], [b"\xc8" + bytes(6)])),
        ("v6 no next header", v6([DSTOPTS], upper=NONXT, seg=b"")),
        ("v6 first fragment", v6([FRAGMENT], [ext(FRAGMENT, frag=1)])),
        ("v6 later fragment", v6([FRAGMENT], [ext(FRAGMENT, frag=0x100)], seg=b"y" * 16)),
        ("v6 payload length 0 (jumbogram) with payload", bytes(ip6(c6, VIP6, TCP, t6))[:4]
         + b"\0\0" + bytes(ip6(c6, VIP6, TCP, t6))[6:]),
        ("v6 header only", bytes(ip6(c6, VIP6, NONXT, b""))),
        ("v6 ICMP error quoting an extension chain",
         err6(bytes(ip6(VIP6, c6, DSTOPTS, chain6([ext(DSTOPTS), ext(FRAGMENT, frag=1)],
                                                  [DSTOPTS, FRAGMENT], UDP)[1] + q6)))),
        ("v6 ICMP error quoting a looping chain",
         err6(bytes(ip6(VIP6, c6, DSTOPTS, chain6([ext(DSTOPTS)] * 9, [DSTOPTS] * 9,
                                                  UDP)[1] + q6)))),
        ("v6 ICMP error quoting a cut chain", err6(bytes(ip6(VIP6, c6, DSTOPTS, b"\x11\x04")))),
        ("v6 ICMP error from a backend quoting a routing header",
         bytes(ip6(b6, c6, ICMPV6, icmp6(b6, c6, 1, 4, b"", bytes(ip6(
             c6, b6, ROUTING, b"\x11" + ext(ROUTING, 2, segleft=1) + u6)))))),
        ("v4 ICMP error quoting an ICMP error", bytes(ip4(ROUTER4, VIP4, ICMP, icmp4(
            11, 0, b"", bytes(ip4(VIP4, c4, ICMP, icmp4(3, 3, b"", q4[:28]))))))),
        ("v4 ICMP error quoting 8 bytes",
         bytes(ip4(ROUTER4, VIP4, ICMP, icmp4(3, 4, b"\0\0\x05\0", q4[:28])))),
        ("v4 ICMP error, whole quote", err4),
        ("v4 first fragment", bytes(ip4(c4, VIP4, UDP, udp(c4, VIP4, 1, 2, b"z" * 64)[:40],
                                        frag=0x2000))),
        ("v4 later fragment", bytes(ip4(c4, VIP4, UDP, b"z" * 40, frag=0x0010))),
        ("v4 TCP fragment at offset 8", bytes(ip4(c4, VIP4, TCP, b"z" * 24, frag=1))),
        ("v4 trailing link padding", bytes(ip4(c4, VIP4, UDP, udp(c4, VIP4, 1, 2))) + bytes(18)),
        ("v4 total length below the header", bytes(ip4(c4, VIP4, UDP, b""))[:2] + b"\0\x10"
         + bytes(ip4(c4, VIP4, UDP, b""))[4:]),
        ("v4 ICMPv6 echo in IPv4", bytes(ip4(c4, VIP4, ICMPV6,
                                             icmp6(c4, VIP4, 128, 0, b"\0\1\0\1")))),
        ("v6 ICMPv4 echo in IPv6", bytes(ip6(c6, VIP6, ICMP, icmp4(8, 0, b"\0\1\0\1")))),
        ("v6 45 bytes of UDP with payload length 5", bytes(ip6(c6, VIP6, UDP, b"\0\1\0\2\0"))),
    ]
    return out


def big_seeds() -> list[tuple[str, bytes]]:
    """64 KiB GSO packets, both families and directions: built, not stored."""
    out = []
    data = bytes(range(256)) * 255
    for family, vip, c, b in ((4, VIP4, CLIENTS4[0], BACKENDS4[0]),
                              (6, VIP6, CLIENTS6[0], BACKENDS6[0])):
        room = 65535 - (20 if family == 4 else 0) - 20
        for name, src, dst in (("to the VIP", c, vip), ("from a backend", b, c)):
            for proto, seg in ((TCP, tcp(src, dst, 1, 80, data[:room])),
                               (UDP, udp(src, dst, 1, 80, data[:room - 8]))):
                out.append((f"v{family} 64 KiB {'TCP' if proto == TCP else 'UDP'} {name}",
                            bytes(ip(family, src, dst, proto, seg))))
    return out


def corpus_seeds(seed: int = 1, per_template: int = 2,
                 max_size: int = 3_000) -> list[tuple[str, bytes]]:
    """Unmutated packets of every template, the corpus's base: (name, packet).
    Packets above ``max_size`` are drawn again (the corpus stays small; the
    campaign and the CI run cover 64 KiB)."""
    rng = random.Random(seed)
    out = []
    for name, make, _ in TEMPLATES:
        for _ in range(per_template):
            buf = make(rng)
            while len(buf) > max_size:
                buf = make(rng)
            out.append((name, bytes(buf)))
    return out + special_seeds()
