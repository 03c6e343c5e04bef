"""Reading and writing capture files (pcap, pcapng) of IP packets, with dpkt.

Link types read: raw IP (101, and 12/14 as some systems write it), IPv4 (228),
IPv6 (229), Ethernet (1, with 802.1Q/802.1ad tags) and Linux cooked captures
(113, 276: what ``tcpdump -i any`` writes). Written: raw IP (101).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO

import dpkt

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113
LINKTYPE_LINUX_SLL2 = 276
_RAW_TYPES = frozenset((LINKTYPE_RAW, 12, 14, 228, 229))
_ETH_IP = frozenset((0x0800, 0x86DD))
_VLAN = frozenset((0x8100, 0x88A8, 0x9100))


class CaptureError(Exception):
    """A capture file that cannot be read."""


def open_reader(f: BinaryIO) -> tuple[Iterator[tuple[float, bytes]], int]:
    """Frames and the link type of a pcap or pcapng file."""
    head = f.read(4)
    f.seek(0)
    try:
        if head == b"\x0a\x0d\x0d\x0a":
            ng = dpkt.pcapng.Reader(f)
            return iter(ng), int(ng.datalink())
        reader = dpkt.pcap.Reader(f)
        return iter(reader), int(reader.datalink())
    except (ValueError, dpkt.dpkt.Error, struct.error) as e:
        raise CaptureError(f"not a pcap or pcapng file: {e}") from None


def ip_payload(frame: bytes, linktype: int) -> bytes | None:
    """The IP packet inside ``frame``, or None when the frame carries no IP."""
    if linktype in _RAW_TYPES:
        return frame
    if linktype == LINKTYPE_ETHERNET:
        off = 12
        while off + 2 <= len(frame):
            ethertype = (frame[off] << 8) | frame[off + 1]
            if ethertype in _VLAN:
                off += 4
                continue
            return frame[off + 2:] if ethertype in _ETH_IP else None
        return None
    if linktype == LINKTYPE_LINUX_SLL:
        if len(frame) < 16:
            return None
        return frame[16:] if ((frame[14] << 8) | frame[15]) in _ETH_IP else None
    if linktype == LINKTYPE_LINUX_SLL2:
        if len(frame) < 20:
            return None
        return frame[20:] if ((frame[0] << 8) | frame[1]) in _ETH_IP else None
    raise CaptureError(f"unsupported link type {linktype}")


def read_ip_packets(f: BinaryIO) -> Iterator[tuple[float, bytes | None]]:
    """(timestamp, IP packet or None) for every frame of a capture."""
    frames, linktype = open_reader(f)
    if linktype not in _RAW_TYPES and linktype not in (
            LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2):
        raise CaptureError(f"unsupported link type {linktype}")
    try:
        for ts, frame in frames:
            yield float(ts), ip_payload(bytes(frame), linktype)
    except (ValueError, dpkt.dpkt.Error, struct.error) as e:
        raise CaptureError(f"damaged capture: {e}") from None


class RawIPWriter:
    """Writes IP packets to a pcap file of link type raw IP (101)."""

    def __init__(self, f: BinaryIO) -> None:
        self._w = dpkt.pcap.Writer(f, snaplen=262144, linktype=LINKTYPE_RAW)

    def write(self, packet: bytes | bytearray, ts: float) -> None:
        self._w.writepkt(bytes(packet), ts=ts)
