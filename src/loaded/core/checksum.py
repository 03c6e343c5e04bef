"""Internet checksum arithmetic (RFC 1071) and incremental updates (RFC 1624).

All sums are ones' complement sums of 16-bit big-endian words, folded to 16 bits.

Zero has two forms in ones' complement, 0x0000 and 0xFFFF. A sum over data that
is not all zero never folds to 0x0000, so a full computation over a packet (whose
pseudo-header always has a non-zero protocol number) yields checksums in
0x0000..0xFFFE. ``update`` keeps that form, so an incrementally updated checksum
is bit-for-bit what a full recomputation gives (RFC 1624, equation 3).
"""

from __future__ import annotations

import numpy as np


def fold(s: int) -> int:
    """Fold a wide ones' complement sum to 16 bits (never returns 0 for s > 0)."""
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return s


# Below this many bytes the big-integer sum beats numpy's call overhead.
_NUMPY_FROM = 256


def ones_sum(data: bytes | bytearray | memoryview, start: int = 0) -> int:
    """Ones' complement sum of ``data`` (odd length padded with a zero byte), plus ``start``.

    Short data: read as one big integer and reduced modulo 0xFFFF, which equals
    adding its 16-bit words with end-around carry, because 2**16 == 1 (mod 0xFFFF).
    Long data (a 64 KiB GSO packet whose checksum must be completed): numpy adds
    the words in native (little-endian) order, seven times faster; the sum of
    byte-swapped words is the byte-swapped sum (RFC 1071, 2.B). A non-zero sum is
    reported as 0xFFFF rather than 0 when it is a multiple of 0xFFFF, as end-around
    carry addition does.
    """
    n = len(data)
    if n >= _NUMPY_FROM:
        even = n & ~1
        le = int(np.frombuffer(data, dtype="<u2", count=even >> 1).sum(dtype=np.uint64))
        if n & 1:
            le += data[-1]  # (last, pad) as a little-endian word is just `last`
        be = _swap(fold(le)) if le else 0
        total = be + start
        return fold(total) if total else 0
    raw = bytes(data)
    if n & 1:
        raw += b"\0"
    total = int.from_bytes(raw, "big") + start
    if total == 0:
        return 0
    return total % 0xFFFF or 0xFFFF


def _swap(x: int) -> int:
    return ((x & 0xFF) << 8) | (x >> 8)


def checksum(data: bytes | bytearray | memoryview, start: int = 0) -> int:
    """The Internet checksum of ``data`` with ``start`` (e.g. a pseudo-header sum) added."""
    return ~ones_sum(data, start) & 0xFFFF


def address_delta(old: bytes, new: bytes) -> int:
    """The ones' complement sum of ~old + new over 16-bit words, never 0.

    Adding it to a sum replaces ``old`` by ``new`` wherever both sit 16-bit aligned
    in the checksummed data (IP header, pseudo-header, embedded headers).
    """
    if len(old) != len(new) or len(old) % 2:
        raise ValueError("addresses must have the same even length")
    s = 0
    for i in range(0, len(old), 2):
        s += (~((old[i] << 8) | old[i + 1]) & 0xFFFF) + ((new[i] << 8) | new[i + 1])
    s = fold(s)
    return s or 0xFFFF


def update(csum: int, delta: int) -> int:
    """Incrementally update a checksum field by a precomputed ``delta`` (RFC 1624 eq. 3)."""
    s = (~csum & 0xFFFF) + delta
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def update_partial(field: int, delta: int) -> int:
    """Update a checksum field that holds a *partial* (not complemented) pseudo-header sum.

    With checksum offload (CHECKSUM_PARTIAL), the kernel leaves the folded
    pseudo-header sum in the field and completes the sum over the payload later;
    an address change is then added to the field as it is, not to its complement.
    """
    s = field + delta
    s = (s & 0xFFFF) + (s >> 16)
    return s
