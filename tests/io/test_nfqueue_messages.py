"""The netlink message handling of the queue reader, without a kernel."""

from __future__ import annotations

import socket
import struct

from loaded.io import nfqueue as nq


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * ((4 - length) & 3)


def packet_message(pid: int, payload: bytes, *, skb_info: int | None = None,
                   cap_len: int | None = None, nested_flag: bool = False) -> bytearray:
    attrs = _attr(nq.NFQA_PACKET_HDR | (0x8000 if nested_flag else 0),
                  struct.pack("!IHB", pid, 0x0800, 0) + b"\0")
    if skb_info is not None:
        attrs += _attr(nq.NFQA_SKB_INFO, struct.pack("!I", skb_info))
    if cap_len is not None:
        attrs += _attr(nq.NFQA_CAP_LEN, struct.pack("!I", cap_len))
    attrs += _attr(nq.NFQA_PAYLOAD, payload)
    body = struct.pack("!BBH", socket.AF_INET, 0, 7) + attrs
    hdr = struct.pack("=IHHII", 16 + len(body), (nq.NFNL_SUBSYS_QUEUE << 8) | nq.NFQNL_MSG_PACKET,
                      0, 0, 0)
    return bytearray(hdr + body)


def test_parse_packet_finds_id_payload_and_flags() -> None:
    payload = bytes(range(61))  # odd length: the attribute is padded
    msg = packet_message(4242, payload, skb_info=nq.NFQA_SKB_CSUMNOTREADY)
    parsed = nq._parse_packet(msg, len(msg))
    assert parsed is not None
    pid, start, plen, partial, truncated = parsed
    assert pid == 4242 and bytes(msg[start:start + plen]) == payload
    assert partial and not truncated


def test_parse_packet_truncated_and_plain() -> None:
    msg = packet_message(1, b"\x45" + bytes(19), cap_len=3000, nested_flag=True)
    parsed = nq._parse_packet(msg, len(msg))
    assert parsed is not None and parsed[0] == 1 and parsed[4] and not parsed[3]


def test_parse_packet_ignores_non_packets_and_garbage() -> None:
    err = bytearray(struct.pack("=IHHII", 36, nq.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -1)
                    + bytes(16))
    assert nq._parse_packet(err, len(err)) is None
    assert nq._parse_packet(bytearray(8), 8) is None
    msg = packet_message(9, b"abc")
    # a zero-length attribute must end the walk, not loop
    broken = msg[:20] + bytearray(struct.pack("=HH", 0, 1)) + msg[24:]
    assert nq._parse_packet(broken, len(broken)) is None


def test_proc_stats_parse(tmp_path: object) -> None:
    from pathlib import Path

    p = Path(str(tmp_path)) / "q"
    p.write_text("    0  12345     0 2 65531     3     5       99  1\n"
                 "    1  12346     2 2 65531     0     0      100  1\n")
    stats = nq.read_proc_stats(str(p))
    assert stats[0]["queue_dropped"] == 3 and stats[0]["user_dropped"] == 5
    assert stats[1]["waiting"] == 2 and stats[1]["id_sequence"] == 100
    assert nq.read_proc_stats(str(p) + "-missing") == {}
