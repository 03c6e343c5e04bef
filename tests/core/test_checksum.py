"""Checksum arithmetic against a word-by-word reference."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from loaded.core.checksum import address_delta, checksum, fold, ones_sum, update, update_partial


def reference_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return s


@given(st.binary(max_size=200))
def test_ones_sum_matches_reference(data: bytes) -> None:
    assert ones_sum(data) == reference_sum(data)
    assert checksum(data) == ~reference_sum(data) & 0xFFFF


# Long data takes the numpy branch (little-endian words, swapped back): odd and
# even lengths, all-zero and all-ones data, every kind of start value.
@given(st.one_of(st.binary(min_size=256, max_size=3000),
                 st.integers(256, 70000).map(bytes),
                 st.integers(256, 3000).map(lambda n: b"\xff" * n)),
       st.integers(0, 0x3FFFF), st.booleans())
def test_long_ones_sum_matches_reference(data: bytes, start: int, view: bool) -> None:
    ref = reference_sum(data) + start
    ref = (ref & 0xFFFF) + (ref >> 16)
    ref = (ref & 0xFFFF) + (ref >> 16)
    buf = memoryview(bytearray(data)) if view else data
    assert ones_sum(buf, start) == ref


@given(st.binary(min_size=4, max_size=64).filter(lambda b: len(b) % 2 == 0),
       st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4))
def test_update_equals_recomputation(data: bytes, old: bytes, new: bytes) -> None:
    # a header with a (non-zero) protocol word and an address somewhere aligned
    before = b"\x00\x06" + old + data
    after = b"\x00\x06" + new + data
    c = checksum(before)
    assert update(c, address_delta(old, new)) == checksum(after)
    # partial sums move by the same delta, without the complement
    assert update_partial(ones_sum(before), address_delta(old, new)) == ones_sum(after)


def test_delta_is_never_zero_and_fold() -> None:
    assert address_delta(b"\x00\x00", b"\x00\x00") == 0xFFFF
    assert address_delta(b"\xff\xff", b"\x00\x00") == 0xFFFF
    assert fold(0x1FFFE) == 0xFFFF and fold(0) == 0 and fold(0x10000) == 1
