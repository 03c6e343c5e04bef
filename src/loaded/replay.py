"""``loaded replay``: the packet engine run offline over a capture file.

Every packet goes through ``Engine.handle`` exactly as a worker would hand it
over, with the config's strategy and a fresh client table, and the capture's
timestamps as the clock. Accepted packets are written, rewritten, in order, to
a raw-IP pcap; one line per input packet tells what happened to it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import BinaryIO, TextIO

from loaded.core.config import Config
from loaded.core.engine import Engine, build_engine
from loaded.core.errors import PacketError
from loaded.io.capture import RawIPWriter, read_ip_packets

NOT_IP = "not-ip"


@dataclass(frozen=True, slots=True)
class Outcome:
    index: int
    verdict: str  # "accept" or "drop"
    reason: str | None
    backend: str | None

    def as_json(self) -> str:
        return json.dumps({"index": self.index, "verdict": self.verdict,
                           "reason": self.reason, "backend": self.backend})

    def as_text(self) -> str:
        return f"{self.index} {self.verdict} {self.reason or '-'} {self.backend or '-'}"


def replay(config: Config, src: BinaryIO, dst: BinaryIO, out: TextIO = sys.stdout,
           as_json: bool = False) -> None:
    """Run ``src`` through a fresh engine, one line per packet on ``out``."""
    writer = RawIPWriter(dst)
    engine: Engine | None = None
    for index, (ts, packet) in enumerate(read_ip_packets(src)):
        if engine is None:
            engine = build_engine(config, now=ts)
        outcome = _one(engine, index, ts, packet, writer)
        print(outcome.as_json() if as_json else outcome.as_text(), file=out)


def _one(engine: Engine, index: int, ts: float, packet: bytes | None,
         writer: RawIPWriter) -> Outcome:
    if packet is None:
        return Outcome(index, "drop", NOT_IP, None)
    buf = bytearray(packet)
    try:
        backend = engine.handle(buf, ts)
    except PacketError as e:
        return Outcome(index, "drop", e.reason.value, None)
    writer.write(buf, ts)
    name = str(backend.ip) if backend is not None else None
    return Outcome(index, "accept", None, name)
