"""The nfnetlink counter reader's wire format, without a kernel (the end-to-end
suite reads the daemon's real counters through it on the conntrack path)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loaded.io import nftcounters as n


def _obj(seq: int, name: str, packets: int, nbytes: int) -> bytes:
    data = (n._attr(n.NFTA_COUNTER_BYTES, struct.pack("!Q", nbytes))
            + n._attr(n.NFTA_COUNTER_PACKETS, struct.pack("!Q", packets)))
    body = (n._NFGEN.pack(n.NFPROTO_INET, 0, 0)
            + n._attr(n.NFTA_OBJ_TABLE, b"loaded_t\0")
            + n._attr(n.NFTA_OBJ_NAME, name.encode() + b"\0")
            + n._attr(n.NFTA_OBJ_TYPE, struct.pack("!I", n.NFT_OBJECT_COUNTER))
            + n._attr(n.NFTA_OBJ_DATA | n.NLA_F_NESTED, data))
    return n._NLMSGHDR.pack(16 + len(body), (n.NFNL_SUBSYS_NFTABLES << 8) | n.NFT_MSG_NEWOBJ,
                            2, seq, 0) + body


def _done(seq: int) -> bytes:
    return n._NLMSGHDR.pack(20, n.NLMSG_DONE, 2, seq, 0) + bytes(4)


def test_request_names_the_table_and_the_type() -> None:
    msg = n.request("loaded_abc", 7)
    length, kind, flags, seq, _ = n._NLMSGHDR.unpack_from(msg)
    assert (length, kind, flags, seq) == (len(msg), 0x0A13, 0x301, 7)
    attrs = n._attrs(msg, 20, len(msg))
    assert attrs[n.NFTA_OBJ_TABLE] == b"loaded_abc\0"
    assert attrs[n.NFTA_OBJ_TYPE] == struct.pack("!I", 1)


def test_a_dump_in_two_reads() -> None:
    first = _obj(1, "invalid", 3, 180) + _obj(1, "backend_4c420000", 2**40, 2**50)
    got, done = n.parse(first, 1)
    assert not done and got == {"invalid": (3, 180), "backend_4c420000": (2**40, 2**50)}
    got, done = n.parse(_obj(9, "other seq", 1, 1) + _done(1), 1)
    assert done and got == {}


def test_the_kernels_error_is_raised() -> None:
    err = n._NLMSGHDR.pack(36, n.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -1) + bytes(16)
    with pytest.raises(n.CounterReadError):
        n.parse(err, 1)


@given(st.binary(max_size=300), st.sampled_from([b"", n._NLMSGHDR.pack(16, 2, 0, 1, 0)]))
def test_garbage_never_raises_anything_else(data: bytes, head: bytes) -> None:
    try:
        n.parse(head + data, 1)
    except n.CounterReadError:
        pass
