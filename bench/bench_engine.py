"""Per-packet cost of the packet engine, single core, no kernel.

Measures, for an established client's TCP packet (the common case), the time
of parse + decide + rewrite through ``Engine.handle`` (fast path) and through
``Engine.handle_general`` (every check, no shortcut), of parse + decide through
``Engine.steer`` (what the per-packet worker does when the kernel rewrites by
mark), IPv4 and IPv6, plus a few rarer shapes. A baseline measured in the same
run (restore the packet bytes and look up the destination address in a dict:
the least any balancer in Python must do) gives ratios that survive a noisy
machine.

    .venv/bin/python bench/bench_engine.py [--packets N] [--repeat R]
"""

from __future__ import annotations

import argparse
import ipaddress
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from loaded.core.config import parse_config
from loaded.core.engine import Engine, build_engine

VIP4, VIP6 = "198.18.1.100", "2001:db8:1::100"


def make_engine(backends: int) -> Engine:
    lines = [f"VIP4={VIP4}", f"VIP6={VIP6}", "strategy=rr"]
    lines += [f"server4=198.19.{i // 250}.{i % 250 + 1}" for i in range(backends)]
    lines += [f"server6=2001:db8:2::{i + 1:x}" for i in range(backends)]
    return build_engine(parse_config("\n".join(lines), "bench.conf"), now=0.0)


def client_packets(family: int, clients: int, payload: int = 100) -> list[bytes]:
    out = []
    for i in range(clients):
        if family == 4:
            src = str(ipaddress.IPv4Address("198.18.64.0") + i)
            pkt = IP(src=src, dst=VIP4) / TCP(sport=40000, dport=80, flags="A") / Raw(
                b"x" * payload)
        else:
            src = str(ipaddress.IPv6Address("2001:db8:c::") + i)
            pkt = IPv6(src=src, dst=VIP6) / TCP(sport=40000, dport=80, flags="A") / Raw(
                b"x" * payload)
        out.append(bytes(pkt))
    return out


def per_packet_ns(fn: Callable[[bytearray, bytes], object], packets: list[bytes], n: int,
                  repeat: int) -> float:
    buf = bytearray(max(len(p) for p in packets))
    bufs = [bytearray(p) for p in packets]
    k = len(packets)
    results = []
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        for i in range(n):
            b = bufs[i % k]
            fn(b, packets[i % k])
        results.append((time.perf_counter_ns() - t0) / n)
    del buf
    return statistics.median(results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--packets", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    n, r = args.packets, args.repeat
    rows = []
    for family in (4, 6):
        eng = make_engine(10)
        packets = client_packets(family, 1000)
        for p in packets:  # make every client established
            eng.handle(bytearray(p), 0.0)
        addr = struct.Struct("4s4s" if family == 4 else "16s16s").unpack_from
        off = 12 if family == 4 else 8
        vips = {ipaddress.ip_address(VIP4 if family == 4 else VIP6).packed: 1}

        def baseline(b: bytearray, orig: bytes, vips: dict[bytes, int] = vips,
                     addr: Callable[..., tuple[bytes, ...]] = addr, off: int = off) -> object:
            b[:] = orig
            return vips.get(addr(b, off)[1])

        def fast(b: bytearray, orig: bytes, eng: Engine = eng) -> object:
            b[:] = orig
            return eng.handle(b, 1.0)

        def general(b: bytearray, orig: bytes, eng: Engine = eng) -> object:
            b[:] = orig
            return eng.handle_general(b, 1.0)

        def fast_mv(b: bytearray, orig: bytes, eng: Engine = eng) -> object:
            b[:] = orig
            return eng.handle(memoryview(b), 1.0)

        def steer(b: bytearray, orig: bytes, eng: Engine = eng) -> object:
            b[:] = orig  # steer writes nothing; kept so that the cases compare
            return eng.steer(memoryview(b), 1.0)

        base = per_packet_ns(baseline, packets, n, r)
        for name, fn in (("handle (fast path)", fast), ("handle on a memoryview", fast_mv),
                         ("steer (the kernel rewrites)", steer),
                         ("handle_general", general)):
            t = per_packet_ns(fn, packets, n, r)
            rows.append((f"IPv{family} TCP, established: {name}", t, t - base, t / base))
        rows.append((f"IPv{family} baseline (copy + dict lookup)", base, 0.0, 1.0))

    eng = make_engine(10)
    frags = [bytes(f) for f in fragment(IP(src="198.18.0.5", dst=VIP4) / UDP(sport=1, dport=2)
                                         / Raw(b"y" * 3000), 1000)]
    rows.append(("IPv4 UDP fragments (general path)",
                 per_packet_ns(lambda b, o: (b.__setitem__(slice(None), o),
                                             eng.handle(b, 1.0)), frags, n // 4, r), 0.0, 0.0))
    q = bytes(IP(src=VIP4, dst="198.18.0.5") / TCP(sport=80, dport=40000) / Raw(b"z" * 1000))
    eng.handle(bytearray(bytes(IP(src="198.18.0.5", dst=VIP4) / TCP(sport=40000, dport=80))), 0.0)
    err = [bytes(IP(src="198.18.1.2", dst=VIP4) / ICMP(type=3, code=4, nexthopmtu=1280)
                 / Raw(q[:548]))]
    rows.append(("IPv4 ICMP frag-needed to the VIP",
                 per_packet_ns(lambda b, o: (b.__setitem__(slice(None), o),
                                             eng.handle(b, 1.0)), err, n // 4, r), 0.0, 0.0))

    print(f"{n} packets x {r} runs, median; Python {sys.version.split()[0]}\n")
    print("| case | ns/packet | minus baseline | x baseline |")
    print("|---|---:|---:|---:|")
    for name, t, net, ratio in rows:
        print(f"| {name} | {t:.0f} | {net:.0f} | {ratio:.2f} |" if ratio else
              f"| {name} | {t:.0f} | | |")


if __name__ == "__main__":
    main()
