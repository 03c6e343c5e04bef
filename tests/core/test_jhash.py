"""``loaded.core.hashing.jhash`` is the kernel's: against a literal transcription
of include/linux/jhash.h, and against buckets the kernel itself chose (nft 1.0.6,
kernel 6.18: ``meta mark set jhash ip saddr mod 65537 seed 0x1234`` fed into a
map from the packet path; the end-to-end test compares live)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loaded.core.hashing import jhash, jhash_bucket

M = 0xFFFFFFFF


def rol32(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & M


def reference_jhash(k: bytes, length: int, initval: int) -> int:
    """include/linux/jhash.h ``jhash()``, statement for statement (the switch's
    fall-through written as one ``if`` per case)."""
    a = b = c = (0xDEADBEEF + length + initval) & M
    i = 0
    while length > 12:
        a = (a + int.from_bytes(k[i:i + 4], "little")) & M  # __get_unaligned_cpu32, x86
        b = (b + int.from_bytes(k[i + 4:i + 8], "little")) & M
        c = (c + int.from_bytes(k[i + 8:i + 12], "little")) & M
        # __jhash_mix(a, b, c)
        a = (a - c) & M; a ^= rol32(c, 4); c = (c + b) & M  # noqa: E702
        b = (b - a) & M; b ^= rol32(a, 6); a = (a + c) & M  # noqa: E702
        c = (c - b) & M; c ^= rol32(b, 8); b = (b + a) & M  # noqa: E702
        a = (a - c) & M; a ^= rol32(c, 16); c = (c + b) & M  # noqa: E702
        b = (b - a) & M; b ^= rol32(a, 19); a = (a + c) & M  # noqa: E702
        c = (c - b) & M; c ^= rol32(b, 4); b = (b + a) & M  # noqa: E702
        length -= 12
        i += 12
    t = k[i:]
    if length >= 12:
        c = (c + (t[11] << 24)) & M
    if length >= 11:
        c = (c + (t[10] << 16)) & M
    if length >= 10:
        c = (c + (t[9] << 8)) & M
    if length >= 9:
        c = (c + t[8]) & M
    if length >= 8:
        b = (b + (t[7] << 24)) & M
    if length >= 7:
        b = (b + (t[6] << 16)) & M
    if length >= 6:
        b = (b + (t[5] << 8)) & M
    if length >= 5:
        b = (b + t[4]) & M
    if length >= 4:
        a = (a + (t[3] << 24)) & M
    if length >= 3:
        a = (a + (t[2] << 16)) & M
    if length >= 2:
        a = (a + (t[1] << 8)) & M
    if length >= 1:
        a = (a + t[0]) & M
        # __jhash_final(a, b, c)
        c ^= b; c = (c - rol32(b, 14)) & M  # noqa: E702
        a ^= c; a = (a - rol32(c, 11)) & M  # noqa: E702
        b ^= a; b = (b - rol32(a, 25)) & M  # noqa: E702
        c ^= b; c = (c - rol32(b, 16)) & M  # noqa: E702
        a ^= c; a = (a - rol32(c, 4)) & M  # noqa: E702
        b ^= a; b = (b - rol32(a, 14)) & M  # noqa: E702
        c ^= b; c = (c - rol32(b, 24)) & M  # noqa: E702
    return c


@given(st.binary(max_size=64), st.integers(0, M))
def test_jhash_is_the_kernels_algorithm(key: bytes, seed: int) -> None:
    assert jhash(key, seed) == reference_jhash(key, len(key), seed)


@given(st.binary(min_size=4, max_size=16), st.integers(0, M), st.integers(1, 2**20))
def test_bucket_is_reciprocal_scale(key: bytes, seed: int, n: int) -> None:
    b = jhash_bucket(key, seed, n)
    assert 0 <= b < n and b == (reference_jhash(key, len(key), seed) * n) >> 32


# (client address, bucket) as the kernel chose them with seed 0x1234, mod 65537
KERNEL_CHOSE = [
    ("198.18.1.8", 50965), ("198.18.2.15", 4124), ("198.18.3.22", 17103),
    ("198.18.4.29", 56699), ("198.18.5.36", 12300), ("198.18.6.43", 21196),
    ("2001:db8::1:d", 29852), ("2001:db8::2:1a", 2952), ("2001:db8::3:27", 6878),
    ("2001:db8::4:34", 16290), ("2001:db8::5:41", 46102), ("2001:db8::6:4e", 44967),
]


@pytest.mark.parametrize(("client", "bucket"), KERNEL_CHOSE)
def test_the_kernel_chose_these_buckets(client: str, bucket: int) -> None:
    assert jhash_bucket(ipaddress.ip_address(client).packed, 0x1234, 65537) == bucket


def test_buckets_spread_sequential_addresses() -> None:
    # A /16 of consecutive clients over 64 buckets: within 10% of even.
    counts = [0] * 64
    for i in range(65536):
        counts[jhash_bucket((0xC6120000 + i).to_bytes(4, "big"), 0x4C4F4144, 64)] += 1
    assert max(counts) < 1024 * 1.1 and min(counts) > 1024 * 0.9
