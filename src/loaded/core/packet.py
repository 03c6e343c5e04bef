"""Parsing and address rewriting of raw IP packets, as NFQUEUE hands them over.

A buffer starts at the IP header. ``parse`` validates it and returns a ``Packet``:
a set of offsets into the buffer, no copies of the payload. The rewrite
functions then change one address in place and fix every checksum that covers
it, incrementally (RFC 1624) when the old checksum is complete, fully when the
kernel left it unfinished (checksum offload).

Rules of the parser (every violation raises ``PacketError`` and nothing else):

- IPv4: header length (IHL) at least 20 bytes and within the buffer; total
  length at least the header length and at most the buffer (shorter is
  allowed: trailing bytes are link padding and are left alone).
- IPv6: payload length within the buffer (0, a jumbogram, is refused);
  extension headers walked with their own length rule:

  =====================  ==================  =============================
  header                 next-header value   length
  =====================  ==================  =============================
  hop-by-hop options     0                   (len + 1) * 8, first only
  routing                43                  (len + 1) * 8
  destination options    60                  (len + 1) * 8
  fragment               44                  8, at most once
  authentication (AH)    51                  (len + 2) * 4
  =====================  ==================  =============================

  Every length is at least 8, so the walk always advances; it stops after
  ``MAX_EXT_HEADERS`` headers, and a header that does not fit is refused. A
  routing header with segments left is refused: the address in the IPv6
  header is then not the final destination the checksums cover.
- Fragments: only the first (offset 0) carries the transport header and its
  checksum; later ones are rewritten in the IP header only. A first fragment
  too short to hold the whole transport header, and a TCP fragment at offset 8
  (RFC 1858), are refused.
- Transport: TCP header (data offset 5..15) and UDP header (length field
  8..available, unless fragmented) must fit; ICMP and ICMPv6 need 8 bytes.

Checksums: the IPv4 header checksum covers the addresses; the TCP, UDP and
ICMPv6 checksums cover them through the pseudo-header; the ICMPv4 checksum does
not. A UDP-over-IPv4 checksum of 0 means "none" and stays 0; a computed UDP
checksum of 0 is sent as 0xFFFF.
"""

from __future__ import annotations

from loaded.core.checksum import checksum, ones_sum, update, update_partial
from loaded.core.errors import PacketError, Reason

Buf = bytearray | memoryview  # a packet the engine may rewrite in place
ReadBuf = bytes | bytearray | memoryview

TCP = 6
UDP = 17
ICMP = 1
ICMPV6 = 58

HOPOPTS = 0
ROUTING = 43
FRAGMENT = 44
AH = 51
DSTOPTS = 60
_EXT_8 = frozenset((HOPOPTS, ROUTING, DSTOPTS))

MAX_EXT_HEADERS = 8

# ICMP message types that quote the packet that caused them (RFC 792, RFC 4443).
ICMP4_ERRORS = frozenset((3, 11, 12))  # unreachable/frag-needed, time exceeded, parameter
ICMP6_ERRORS = frozenset((1, 2, 3, 4))  # unreachable, packet too big, time exceeded, parameter
ICMP4_ECHO_REQUEST = 8
ICMP6_ECHO_REQUEST = 128
ICMP6_ECHO_REPLY = 129
# Neighbour discovery and router messages belong to the host that owns the address.
ICMP6_NDP = frozenset((133, 134, 135, 136, 137))


class Packet:
    """Where things are in one packet buffer. Offsets are absolute."""

    __slots__ = (
        "csum_off",
        "dst",
        "dst_off",
        "end",
        "first",
        "icmp_code",
        "icmp_type",
        "l4_off",
        "more",
        "proto",
        "src",
        "src_off",
        "version",
    )

    version: int
    src: bytes
    dst: bytes
    src_off: int
    dst_off: int
    proto: int  # upper-layer protocol, after IPv6 extension headers
    l4_off: int  # start of the transport header (first fragment) or of fragment data
    end: int  # end of the IP packet (total length), <= len(buffer)
    first: bool  # offset 0: the transport header is here
    more: bool  # more fragments follow
    csum_off: int  # transport checksum field, or -1 when absent or not covering addresses
    icmp_type: int  # -1 unless ICMP/ICMPv6 in a first fragment
    icmp_code: int

    @property
    def fragmented(self) -> bool:
        return self.more or not self.first

    @property
    def is_icmp_error(self) -> bool:
        if self.proto == ICMP:
            return self.icmp_type in ICMP4_ERRORS
        if self.proto == ICMPV6:
            return self.icmp_type in ICMP6_ERRORS
        return False


def parse(buf: ReadBuf) -> Packet:
    """Validate ``buf`` (one IP packet) and locate its fields."""
    n = len(buf)
    if n == 0:
        raise PacketError(Reason.EMPTY)
    version = buf[0] >> 4
    p = Packet()
    p.version = version
    if version == 4:
        _parse_ip4(buf, n, p)
    elif version == 6:
        _parse_ip6(buf, n, p)
    else:
        raise PacketError(Reason.BAD_VERSION, f"version {version}")
    _parse_l4(buf, p, strict=True)
    return p


def source_address(buf: ReadBuf) -> bytes:
    """The packed source address of a packet ``parse`` has accepted."""
    return bytes(buf[12:16]) if buf[0] >> 4 == 4 else bytes(buf[8:24])


def _parse_ip4(buf: ReadBuf, n: int, p: Packet) -> None:
    if n < 20:
        raise PacketError(Reason.TRUNCATED_IP, f"{n} bytes")
    ihl = (buf[0] & 15) << 2
    if ihl < 20:
        raise PacketError(Reason.BAD_IHL, f"IHL {ihl >> 2}")
    if ihl > n:
        raise PacketError(Reason.TRUNCATED_IP, f"IHL {ihl} > {n} bytes")
    total = (buf[2] << 8) | buf[3]
    if total < ihl or total > n:
        raise PacketError(Reason.BAD_TOTAL_LENGTH, f"total length {total}, {n} bytes")
    frag = (buf[6] << 8) | buf[7]
    p.src_off, p.dst_off = 12, 16
    p.src = bytes(buf[12:16])
    p.dst = bytes(buf[16:20])
    p.proto = buf[9]
    p.l4_off = ihl
    p.end = total
    p.first = not frag & 0x1FFF
    p.more = bool(frag & 0x2000)
    if p.proto == TCP and (frag & 0x1FFF) == 1:
        raise PacketError(Reason.TINY_FRAGMENT, "TCP fragment at offset 8 (RFC 1858)")


def _parse_ip6(buf: ReadBuf, n: int, p: Packet) -> None:
    if n < 40:
        raise PacketError(Reason.TRUNCATED_IP, f"{n} bytes")
    plen = (buf[4] << 8) | buf[5]
    end = 40 + plen
    if end > n or (plen == 0 and n > 40):
        raise PacketError(Reason.BAD_PAYLOAD_LENGTH, f"payload length {plen}, {n} bytes")
    p.src_off, p.dst_off = 8, 24
    p.src = bytes(buf[8:24])
    p.dst = bytes(buf[24:40])
    p.end = end
    p.first, p.more = True, False
    nh, off = _walk_ext6(buf, 40, end, buf[6], p, strict=True)
    p.proto = nh
    p.l4_off = off


def _walk_ext6(buf: ReadBuf, off: int, end: int, nh: int, p: Packet,
               strict: bool) -> tuple[int, int]:
    """Walk IPv6 extension headers from ``off``; return (upper protocol, its offset).

    Sets ``p.first``/``p.more`` from a fragment header. With ``strict`` off (a
    packet quoted inside an ICMP error, which may be cut short), a truncated chain
    ends the walk instead of raising.
    """
    count = 0
    seen_frag = False
    chain_start = off
    while nh in _EXT_8 or nh == FRAGMENT or nh == AH:
        count += 1
        if count > MAX_EXT_HEADERS:
            raise PacketError(Reason.TOO_MANY_EXT, f"more than {MAX_EXT_HEADERS}")
        if off + 8 > end:
            if strict:
                raise PacketError(Reason.TRUNCATED_EXT, f"header {nh} at {off}")
            return -1, off
        if nh == FRAGMENT:
            if seen_frag:
                raise PacketError(Reason.BAD_EXT, "two fragment headers")
            seen_frag = True
            fo = (buf[off + 2] << 8) | buf[off + 3]
            p.first = not fo & 0xFFF8
            p.more = bool(fo & 1)
            hlen = 8
        elif nh == AH:
            hlen = (buf[off + 1] + 2) << 2
        else:
            if nh == HOPOPTS and off != chain_start:
                raise PacketError(Reason.BAD_EXT, "hop-by-hop options not first")
            if nh == ROUTING and buf[off + 3]:
                raise PacketError(Reason.ROUTING_HEADER, f"{buf[off + 3]} segments left")
            hlen = (buf[off + 1] + 1) << 3
        if off + hlen > end:
            if strict:
                raise PacketError(Reason.TRUNCATED_EXT, f"header {nh} of {hlen} bytes at {off}")
            return -1, off
        nh = buf[off]
        off += hlen
        if not p.first:
            # Later fragments hold only fragment data after the fragment header.
            break
    return nh, off


def _parse_l4(buf: ReadBuf, p: Packet, strict: bool) -> None:
    """Locate the transport checksum and ICMP type of a first fragment.

    With ``strict`` off (a quoted packet), missing bytes leave the checksum
    unknown (-1) instead of raising.
    """
    p.csum_off = -1
    p.icmp_type = p.icmp_code = -1
    if not p.first:
        return
    proto = p.proto
    off = p.l4_off
    avail = p.end - off
    short = Reason.TINY_FRAGMENT if p.more else Reason.TRUNCATED_L4
    if proto == TCP:
        if avail < 20:
            if strict:
                raise PacketError(short, f"TCP header needs 20 bytes, {avail} present")
            if avail >= 18:
                p.csum_off = off + 16
            return
        doff = (buf[off + 12] >> 4) << 2
        if doff < 20:
            raise PacketError(Reason.BAD_L4, f"TCP data offset {doff >> 2}")
        if doff > avail and strict:
            raise PacketError(short, f"TCP header of {doff} bytes, {avail} present")
        p.csum_off = off + 16
    elif proto == UDP:
        if avail < 8:
            if strict:
                raise PacketError(short, f"UDP header needs 8 bytes, {avail} present")
            return
        ulen = (buf[off + 4] << 8) | buf[off + 5]
        if strict and not p.more and (ulen < 8 or ulen > avail):
            raise PacketError(Reason.BAD_L4, f"UDP length {ulen}, {avail} bytes present")
        p.csum_off = off + 6
    elif proto == ICMP or proto == ICMPV6:
        if avail < 8:
            if strict:
                raise PacketError(short, f"ICMP header needs 8 bytes, {avail} present")
            if avail >= 2:
                p.icmp_type, p.icmp_code = buf[off], buf[off + 1]
            return
        p.icmp_type, p.icmp_code = buf[off], buf[off + 1]
        if proto == ICMPV6:
            p.csum_off = off + 2


def parse_embedded(buf: ReadBuf, p: Packet) -> Packet:
    """The packet quoted in the ICMP error ``p`` (offsets absolute in ``buf``).

    A quoted packet is usually cut short: its length fields describe the
    original, not the quote, so they are not checked against what is there, and
    its transport checksum is located only if the quote still holds it.
    """
    start = p.l4_off + 8
    end = p.end
    avail = end - start
    if avail < 1:
        raise PacketError(Reason.BAD_EMBEDDED, "no quoted packet")
    version = buf[start] >> 4
    if version != p.version:
        raise PacketError(Reason.BAD_EMBEDDED, f"quoted IP version {version}")
    q = Packet()
    q.version = version
    q.end = end
    if version == 4:
        if avail < 20:
            raise PacketError(Reason.BAD_EMBEDDED, f"quoted IPv4 header cut at {avail} bytes")
        ihl = (buf[start] & 15) << 2
        if ihl < 20 or ihl > avail:
            raise PacketError(Reason.BAD_EMBEDDED, f"quoted IHL {ihl >> 2}")
        frag = (buf[start + 6] << 8) | buf[start + 7]
        q.src_off, q.dst_off = start + 12, start + 16
        q.proto = buf[start + 9]
        q.l4_off = start + ihl
        q.first = not frag & 0x1FFF
        q.more = bool(frag & 0x2000)
    else:
        if avail < 40:
            raise PacketError(Reason.BAD_EMBEDDED, f"quoted IPv6 header cut at {avail} bytes")
        q.src_off, q.dst_off = start + 8, start + 24
        q.first, q.more = True, False
        try:
            q.proto, q.l4_off = _walk_ext6(buf, start + 40, end, buf[start + 6], q, strict=False)
        except PacketError as e:
            raise PacketError(Reason.BAD_EMBEDDED, str(e)) from None
    q.src = bytes(buf[q.src_off:q.dst_off])
    q.dst = bytes(buf[q.dst_off:q.dst_off + (q.dst_off - q.src_off)])
    if q.proto < 0:
        q.csum_off = q.icmp_type = q.icmp_code = -1
    else:
        try:
            _parse_l4(buf, q, strict=False)
        except PacketError as e:
            raise PacketError(Reason.BAD_EMBEDDED, str(e)) from None
    return q


# --- rewriting -------------------------------------------------------------------


def rewrite(buf: Buf, p: Packet, which: int, new: bytes, delta: int,
            partial: bool = False) -> None:
    """Replace the source (``which`` = p.src_off) or destination address (p.dst_off).

    ``delta`` is ``address_delta(old, new)``. ``partial`` says the transport
    checksum is still the kernel's unfinished pseudo-header sum (offload): it is
    then completed over the whole segment, because the kernel treats a packet
    whose payload user space replaced as fully checksummed.
    """
    buf[which:which + len(new)] = new
    if p.version == 4:
        c = (buf[10] << 8) | buf[11]
        c = update(c, delta)
        buf[10] = c >> 8
        buf[11] = c & 0xFF
    co = p.csum_off
    if co < 0 or p.proto == ICMP:
        return
    if partial:
        if p.fragmented:
            # The kernel never hands over a fragment with an unfinished checksum;
            # if it did, only the sum over the pseudo-header could be moved.
            c = update_partial((buf[co] << 8) | buf[co + 1], delta)
        else:
            complete_l4_checksum(buf, p)
            return
    else:
        c = (buf[co] << 8) | buf[co + 1]
        if c == 0 and p.proto == UDP:
            return  # no checksum (IPv4), or invalid anyway (IPv6): leave it
        c = update(c, delta)
        if c == 0 and p.proto == UDP:
            c = 0xFFFF
    buf[co] = c >> 8
    buf[co + 1] = c & 0xFF


def pseudo_header_sum(buf: ReadBuf, p: Packet, length: int) -> int:
    """Ones' complement sum of the pseudo-header for ``p``'s transport protocol."""
    alen = p.dst_off - p.src_off
    s = ones_sum(buf[p.src_off:p.dst_off + alen])
    return s + (length >> 16) + (length & 0xFFFF) + p.proto


def l4_checksum(buf: ReadBuf, p: Packet) -> int:
    """Full transport checksum of an unfragmented ``p``, as if its field were zero."""
    co = p.csum_off
    seg = bytearray(buf[p.l4_off:p.end])
    rel = co - p.l4_off
    seg[rel] = seg[rel + 1] = 0
    pseudo = 0 if p.proto == ICMP else pseudo_header_sum(buf, p, len(seg))
    c = checksum(seg, pseudo)
    if c == 0 and p.proto == UDP:
        c = 0xFFFF
    return c


def complete_l4_checksum(buf: Buf, p: Packet) -> None:
    c = l4_checksum(buf, p)
    buf[p.csum_off] = c >> 8
    buf[p.csum_off + 1] = c & 0xFF


def icmp_checksum_ok(buf: ReadBuf, p: Packet) -> bool:
    """Whether the ICMP/ICMPv6 message ``p`` (unfragmented) carries a valid checksum."""
    msg = buf[p.l4_off:p.end]
    pseudo = pseudo_header_sum(buf, p, len(msg)) if p.proto == ICMPV6 else 0
    return ones_sum(msg, pseudo) == 0xFFFF


def set_icmp_checksum(buf: Buf, p: Packet) -> None:
    off = p.l4_off
    buf[off + 2] = buf[off + 3] = 0
    msg = buf[off:p.end]
    pseudo = pseudo_header_sum(buf, p, len(msg)) if p.proto == ICMPV6 else 0
    c = checksum(msg, pseudo)
    buf[off + 2] = c >> 8
    buf[off + 3] = c & 0xFF


def rewrite_embedded(buf: Buf, q: Packet, which: int, new: bytes, delta: int) -> None:
    """Replace an address of a quoted packet and fix the quoted checksums still present.

    The enclosing ICMP checksum is not touched here: the caller recomputes it.
    """
    buf[which:which + len(new)] = new
    if q.version == 4:
        base = q.src_off - 12
        c = update((buf[base + 10] << 8) | buf[base + 11], delta)
        buf[base + 10] = c >> 8
        buf[base + 11] = c & 0xFF
    co = q.csum_off
    if co < 0 or co + 2 > q.end or q.proto == ICMP:
        return
    c = (buf[co] << 8) | buf[co + 1]
    if c == 0 and q.proto == UDP:
        return
    c = update(c, delta)
    if c == 0 and q.proto == UDP:
        c = 0xFFFF
    buf[co] = c >> 8
    buf[co + 1] = c & 0xFF
