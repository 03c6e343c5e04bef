"""The full Internet checksum of a long packet: what the per-packet path pays for
each GSO packet whose checksum the kernel left unfinished (after a rewrite the
kernel wants it final: ``nfqnl_mangle`` marks the packet ``CHECKSUM_NONE``).

Compares, in the same run, ``loaded.core.checksum.ones_sum`` (numpy from 256
bytes up) with the big-integer sum it replaced (``int.from_bytes`` and
``% 0xFFFF``), over random payloads of typical sizes; both give the same sum.

    .venv/bin/python bench/bench_checksum.py [--repeat R]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from loaded.core.checksum import ones_sum


def big_int_sum(data: bytes | bytearray | memoryview) -> int:
    raw = bytes(data)
    if len(raw) & 1:
        raw += b"\0"
    total = int.from_bytes(raw, "big")
    return 0 if total == 0 else total % 0xFFFF or 0xFFFF


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    print("| bytes | big integer (µs) | numpy (µs) | ratio |")
    print("|---:|---:|---:|---:|")
    for size in (1500, 9000, 16384, 65535):
        buf = memoryview(bytearray(os.urandom(size)))
        assert ones_sum(buf) == big_int_sum(buf)
        n = max(200, 2_000_000 // size)
        old = statistics.median(timeit.repeat(lambda b=buf: big_int_sum(b), number=n,
                                              repeat=args.repeat)) / n * 1e6
        new = statistics.median(timeit.repeat(lambda b=buf: ones_sum(b), number=n,
                                              repeat=args.repeat)) / n * 1e6
        print(f"| {size} | {old:.1f} | {new:.1f} | {old / new:.1f}x |")


if __name__ == "__main__":
    main()
