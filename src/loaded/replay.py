"""``loaded replay``: the packet engine run offline over a capture file.

Every packet goes to the engine exactly as a worker would hand it over, with
the config's strategy and a fresh client table, and the capture's timestamps
as the clock; one line per input packet tells what happened to it. Accepted
packets are written, in order, to a raw-IP pcap, as they leave the balancer.

- ``perpacket``: ``Engine.handle``, every packet rewritten as the per-packet
  path does it (the kernel's share of that rewrite, by the worker's mark, is
  proven equal to ``handle``'s in the tests).
- ``conntrack``: ``Engine.decide``, every packet taken as a first packet (a
  capture has no conntrack state); the line gives the backend's mark, and the
  packet is written as kernel NAT would send it, to the backend. What is not
  for a VIP passes unchanged (on the wire conntrack would carry replies).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import BinaryIO, TextIO

from loaded.core.config import Config
from loaded.core.datapath import DATAPATHS
from loaded.core.engine import Engine, build_engine
from loaded.core.errors import PacketError
from loaded.core.packet import parse, rewrite
from loaded.core.pool import Backend
from loaded.io.capture import RawIPWriter, read_ip_packets

NOT_IP = "not-ip"


@dataclass(frozen=True, slots=True)
class Outcome:
    index: int
    verdict: str  # "accept" or "drop"
    reason: str | None
    backend: str | None
    mark: int | None = None  # conntrack path: the verdict's mark

    def as_json(self) -> str:
        doc = {"index": self.index, "verdict": self.verdict, "reason": self.reason,
               "backend": self.backend}
        if self.mark is not None:
            doc["mark"] = f"{self.mark:#x}"
        return json.dumps(doc)

    def as_text(self) -> str:
        mark = "" if self.mark is None else f" {self.mark:#x}"
        return f"{self.index} {self.verdict} {self.reason or '-'} {self.backend or '-'}{mark}"


def replay(config: Config, src: BinaryIO, dst: BinaryIO, out: TextIO = sys.stdout,
           as_json: bool = False, datapath: str = "perpacket") -> None:
    """Run ``src`` through a fresh engine, one line per packet on ``out``."""
    if datapath not in DATAPATHS:
        raise ValueError(f"no data path {datapath!r} (known: {', '.join(sorted(DATAPATHS))})")
    first_packets = DATAPATHS[datapath].first_packets_only
    writer = RawIPWriter(dst)
    engine: Engine | None = None
    for index, (ts, packet) in enumerate(read_ip_packets(src)):
        if engine is None:
            engine = build_engine(config, now=ts)
        outcome = _one(engine, index, ts, packet, writer, first_packets)
        print(outcome.as_json() if as_json else outcome.as_text(), file=out)


def _one(engine: Engine, index: int, ts: float, packet: bytes | None,
         writer: RawIPWriter, first_packets: bool) -> Outcome:
    if packet is None:
        return Outcome(index, "drop", NOT_IP, None)
    buf = bytearray(packet)
    try:
        if first_packets:
            backend = engine.decide(buf, ts)
            if backend is not None:
                _nat(buf, backend)
        else:
            backend = engine.handle(buf, ts)
    except PacketError as e:
        return Outcome(index, "drop", e.reason.value, None)
    writer.write(buf, ts)
    name = str(backend.ip) if backend is not None else None
    mark = backend.mark if first_packets and backend is not None else None
    return Outcome(index, "accept", None, name, mark)


def _nat(buf: bytearray, backend: Backend) -> None:
    """What the conntrack path's DNAT does to a first packet the worker marked."""
    p = parse(buf)
    rewrite(buf, p, p.dst_off, backend.addr, backend.delta_in)
