"""``loaded replay``: the engine over a capture file, as a user runs it."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw
from scapy.utils import PcapReader, wrpcap

from loaded.core.config import parse_config
from loaded.io.capture import CaptureError, read_ip_packets
from loaded.replay import replay

ROOT = Path(__file__).resolve().parents[1]
CONF = """
VIP4=198.18.1.100
VIP6=2001:db8:1::100
server4=198.19.0.11
server4=198.19.0.12
server6=2001:db8:2::11
RIP4=198.19.0.0/24
strategy=rr
"""


def capture(tmp: Path, packets: list, linktype: int | None = None) -> Path:  # type: ignore[type-arg]
    path = tmp / "in.pcap"
    wrpcap(str(path), packets, linktype=linktype)
    return path


def run(tmp: Path, packets: list, linktype: int | None = None,  # type: ignore[type-arg]
        datapath: str = "perpacket") -> tuple[list[dict[str, object]], list[bytes]]:
    src = capture(tmp, packets, linktype)
    out_path = tmp / "out.pcap"
    text = io.StringIO()
    with open(src, "rb") as f, open(out_path, "wb") as g:
        replay(parse_config(CONF, "t.conf"), f, g, out=text, as_json=True, datapath=datapath)
    lines = [json.loads(line) for line in text.getvalue().splitlines()]
    written = [bytes(p) for p in PcapReader(str(out_path))]
    return lines, written


def test_replay_raw_ip_decisions_and_rewritten_output(tmp_path: Path) -> None:
    pkts = [
        IP(src="198.18.0.11", dst="198.18.1.100") / TCP(sport=1000, dport=80) / Raw(b"a"),
        IP(src="198.18.0.12", dst="198.18.1.100") / UDP(sport=1000, dport=53) / Raw(b"b"),
        IP(src="198.18.0.11", dst="198.18.1.100") / ICMP() / Raw(b"c"),
        IP(src="198.19.0.11", dst="198.18.0.11") / TCP(sport=80, dport=1000) / Raw(b"d"),
        IP(src="198.18.0.11", dst="198.18.1.100", ihl=4) / TCP() / Raw(b"e"),
        IPv6(src="2001:db8:c::1", dst="2001:db8:1::100") / TCP(sport=5, dport=80),
        IP(src="198.18.0.11", dst="198.18.1.100", proto=47) / Raw(b"gre"),
    ]
    lines, written = run(tmp_path, [bytes(p) for p in pkts], linktype=101)
    assert [d["index"] for d in lines] == list(range(len(pkts)))
    assert [d["verdict"] for d in lines] == ["accept"] * 4 + ["drop", "accept", "drop"]
    assert lines[0]["backend"] == "198.19.0.11" and lines[1]["backend"] == "198.19.0.12"
    assert lines[2]["backend"] == "198.19.0.11"  # the same client sticks
    assert lines[3]["backend"] == "198.19.0.11" and lines[3]["reason"] is None
    assert lines[4]["reason"] == "bad-ihl"
    assert lines[5]["backend"] == "2001:db8:2::11"
    assert lines[6]["reason"] == "unsupported-protocol"
    assert len(written) == 5
    assert IP(written[0]).dst == "198.19.0.11" and IP(written[3]).src == "198.18.1.100"


def test_replay_the_conntrack_path(tmp_path: Path) -> None:
    """The default data path: every packet a first packet, decided with ``decide``;
    the same choices as the per-packet path, the mark in the line, the packet as
    kernel NAT forwards it; ICMP errors and replies are conntrack's, not a worker's."""
    pkts = [
        IP(src="198.18.0.11", dst="198.18.1.100") / TCP(sport=1000, dport=80) / Raw(b"a"),
        IP(src="198.18.0.12", dst="198.18.1.100") / UDP(sport=1000, dport=53) / Raw(b"b"),
        IP(src="198.18.0.11", dst="198.18.1.100") / ICMP() / Raw(b"c"),
        IP(src="198.19.0.11", dst="198.18.0.11") / TCP(sport=80, dport=1000) / Raw(b"d"),
        IP(src="198.18.2.1", dst="198.18.1.100") / ICMP(type=3, code=4)
        / bytes(IP(src="198.18.1.100", dst="198.18.0.11") / TCP(sport=80, dport=1000)),
        IPv6(src="2001:db8:c::1", dst="2001:db8:1::100") / TCP(sport=5, dport=80),
    ]
    raw = [bytes(p) for p in pkts]
    lines, written = run(tmp_path, raw, linktype=101, datapath="conntrack")
    per_packet, rewritten = run(tmp_path, raw, linktype=101)
    assert [d["verdict"] for d in lines] == ["accept"] * 4 + ["drop", "accept"]
    for i in (0, 1, 2, 5):
        assert lines[i]["backend"] == per_packet[i]["backend"]
    assert [lines[i]["mark"] for i in (0, 1, 2, 5)] == [
        "0x4c420000", "0x4c420001", "0x4c420000", "0x4c428000"]
    assert lines[3]["backend"] is None and "mark" not in lines[3]  # a reply: conntrack's
    assert lines[4]["reason"] == "icmp-error-unknown-flow"
    # first packets leave as the engine would have rewritten them: kernel NAT's result
    assert written[0] == rewritten[0] and written[1] == rewritten[1]
    assert written[3] == raw[3]  # passed unchanged
    assert IP(written[2]).dst == "198.19.0.11"


def test_replay_ethernet_with_non_ip_frames(tmp_path: Path) -> None:
    pkts = [Ether() / IP(src="198.18.0.11", dst="198.18.1.100") / TCP(dport=80),
            Ether() / ARP(pdst="198.18.1.100"),
            Ether(type=0x8100) / b"\x00\x05\x08\x00" / IP(src="198.18.0.12", dst="198.18.1.100")
            / UDP(dport=53)]
    lines, written = run(tmp_path, pkts)
    assert [d["verdict"] for d in lines] == ["accept", "drop", "accept"]
    assert lines[1]["reason"] == "not-ip"
    assert [IP(w).dst for w in written] == ["198.19.0.11", "198.19.0.12"]


def test_replay_command_line(tmp_path: Path) -> None:
    conf = tmp_path / "l.conf"
    conf.write_text(CONF)
    src = capture(tmp_path, [bytes(IP(src="198.18.0.9", dst="198.18.1.100") / TCP(dport=80))],
                  linktype=101)
    out = tmp_path / "o.pcap"
    proc = subprocess.run([sys.executable, "-m", "loaded", "replay", "-c", str(conf), str(src),
                           str(out)], capture_output=True, text=True, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0 accept - 198.19.0.11"
    proc = subprocess.run([sys.executable, "-m", "loaded", "replay", "-c", str(conf),
                           "--datapath", "conntrack", str(src), str(out)],
                          capture_output=True, text=True, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0 accept - 198.19.0.11 0x4c420000"
    bad = tmp_path / "bad.conf"
    bad.write_text("VIP4=198.18.1.300\nserver4=198.19.0.1\n")
    proc = subprocess.run([sys.executable, "-m", "loaded", "replay", "-c", str(bad), str(src),
                           str(out)], capture_output=True, text=True, cwd=ROOT, check=False)
    assert proc.returncode == 2
    assert f"{bad}:1: error:" in proc.stderr


def test_not_a_capture(tmp_path: Path) -> None:
    path = tmp_path / "x.pcap"
    path.write_bytes(b"this is not a capture file at all")
    with open(path, "rb") as f, pytest.raises(CaptureError):
        list(read_ip_packets(f))
