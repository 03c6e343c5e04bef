"""Cost of a strategy's choice, of the client table's hot path, and of its memory.

Run from the repository root: ``.venv/bin/python bench/bench_strategies.py``.

* Time: every strategy's ``choose`` for new clients (many distinct addresses),
  with 10 and 1000 backends, in ns per choice, median of 5 repeats. Each choice is
  followed by the ``clients += 1`` the client table does, so the count-based
  strategies work as they do in service. The baseline, measured in the same run
  on the same keys, is a bare ``dict.get`` (what a sticky lookup costs at least).
* Memory: a ClientTable filled with 1,000,000 IPv4 and 1,000,000 IPv6 clients
  through ``backend_for``, each in a fresh process: tracemalloc's current size
  and the growth of VmRSS.
"""

from __future__ import annotations

import ipaddress
import json
import random
import statistics
import subprocess
import sys
import time
import timeit
import tracemalloc
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from loaded.core.clients import ClientTable
from loaded.core.hashing import stable_hash
from loaded.core.pool import Pool
from loaded.core.strategies import STRATEGIES, Strategy, WeightedRoundRobin, make_strategy

VIP4 = ipaddress.IPv4Address("192.0.2.1")
VIP6 = ipaddress.IPv6Address("2001:db8::1")
KEYS = 100_000
REPEATS = 5
MEMORY_CLIENTS = 1_000_000


class HeapOnlyWRR(WeightedRoundRobin):
    """wrr as it runs when the sum of weights is too large to replay a cycle."""

    CYCLE_LIMIT = 0


def make_pool(n: int) -> Pool:
    pool = Pool(VIP4)
    for i in range(n):
        pool.add(ipaddress.IPv4Address(0x0A000001 + i), weight=1 + i % 4)
    return pool


def keys(n: int, size: int = 4, seed: int = 7) -> list[bytes]:
    rnd = random.Random(seed)
    return [rnd.getrandbits(8 * size).to_bytes(size, "big") for _ in range(n)]


def median_ns(loop: Callable[[], object], per: int) -> float:
    times = timeit.repeat(loop, number=1, repeat=REPEATS)
    return statistics.median(times) / per * 1e9


def bench_time() -> None:
    sample = keys(KEYS)
    rows: list[tuple[str, str, float]] = []

    lookup = {k: None for k in sample}

    def baseline() -> None:
        get = lookup.get
        for k in sample:
            get(k)

    base = median_ns(baseline, len(sample))
    rows.append(("dict.get (baseline)", "-", base))

    def hash_only() -> None:
        for k in sample:
            stable_hash(k)

    rows.append(("stable_hash", "-", median_ns(hash_only, len(sample))))

    for n in (10, 1000):
        candidates: list[tuple[str, Callable[[Pool], Strategy]]] = [
            (name, STRATEGIES[name]) for name in STRATEGIES]
        candidates.append(("wrr, heaps only (sum of weights > CYCLE_LIMIT)", HeapOnlyWRR))
        for label, factory in candidates:
            strategy = factory(make_pool(n))  # maglev: the default table size, 65537
            strategy.choose(b"warm")  # the first choice builds; not what is measured

            def run(choose: Callable[[bytes], object] = strategy.choose) -> None:
                for k in sample:
                    choose(k).clients += 1  # type: ignore[attr-defined]

            rows.append((label, str(n), median_ns(run, len(sample))))

    # The client table's paths, with rr (the default strategy).
    for n in (10, 1000):
        pool = make_pool(n)
        table = ClientTable(pool, make_strategy("rr", pool), max_size=10 * KEYS)
        for k in sample:
            table.backend_for(k, 0.0)

        def established(backend_for: Callable[[bytes, float], object] = table.backend_for,
                        ) -> None:
            for k in sample:
                backend_for(k, 1.0)

        rows.append(("ClientTable.backend_for, established client", str(n),
                     median_ns(established, len(sample))))

        def new_clients(n: int = n) -> None:
            pool = make_pool(n)
            table = ClientTable(pool, make_strategy("rr", pool), max_size=10 * KEYS)
            backend_for = table.backend_for
            for k in sample:
                backend_for(k, 0.0)

        rows.append(("ClientTable.backend_for, new client (rr)", str(n),
                     median_ns(new_clients, len(sample))))

    print(f"Python {sys.version.split()[0]}; {len(sample)} distinct IPv4 clients per repeat, "
          f"median of {REPEATS}\n")
    print("| what | backends | ns per call | x dict.get |")
    print("|---|---:|---:|---:|")
    for what, backends, ns in rows:
        print(f"| {what} | {backends} | {ns:.0f} | {ns / base:.1f} |")


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def fill(family: int, n: int) -> ClientTable:
    vip = VIP4 if family == 4 else VIP6
    pool = Pool(vip)
    for i in range(10):
        pool.add(vip + 1 + i)
    table = ClientTable(pool, make_strategy("rr", pool), max_size=n)
    base = int(ipaddress.ip_address("198.51.0.0" if family == 4 else "2001:db8:c0::"))
    size = 4 if family == 4 else 16
    modulus = 1 << (8 * size)
    backend_for = table.backend_for
    # Keys are made here and only the table keeps them, as packet parsing does.
    # An odd stride is a bijection modulo 2**bits: the keys are distinct and spread.
    for i in range(n):
        backend_for(((base + i * 7919) % modulus).to_bytes(size, "big"), 0.0)
    assert len(table) == n
    return table


def measure_memory(family: int, mode: str) -> dict[str, float]:
    if mode == "tracemalloc":
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        table = fill(family, MEMORY_CLIENTS)
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        return {"tracemalloc_mb": (after - before) / 1e6, "entries": len(table)}
    rss0 = rss_kib()
    t0 = time.perf_counter()
    table = fill(family, MEMORY_CLIENTS)
    fill_s = time.perf_counter() - t0
    rss1 = rss_kib()
    # Both generations past their time: the whole table goes at once.
    t0 = time.perf_counter()
    table.expire(2 * table.idle_timeout)
    drop_s = time.perf_counter() - t0
    assert len(table) == 0
    return {"rss_mb": (rss1 - rss0) * 1024 / 1e6, "fill_s": fill_s, "drop_s": drop_s}


def bench_memory() -> None:
    print(f"\nClientTable with {MEMORY_CLIENTS:,} clients (max_size {MEMORY_CLIENTS:,}), "
          "each measured in a fresh process\n")
    print("| family | tracemalloc current | RSS growth | bytes/entry (RSS) "
          "| fill | drop all (expiry) |")
    print("|---|---:|---:|---:|---:|---:|")
    for family in (4, 6):
        result: dict[str, float] = {}
        for mode in ("tracemalloc", "rss"):
            out = subprocess.run([sys.executable, __file__, "--memory", str(family), mode],
                                 capture_output=True, text=True, check=True).stdout
            result |= json.loads(out)
        print(f"| IPv{family} | {result['tracemalloc_mb']:.1f} MB | {result['rss_mb']:.1f} MB "
              f"| {result['rss_mb'] * 1e6 / MEMORY_CLIENTS:.0f} "
              f"| {result['fill_s']:.2f} s | {result['drop_s'] * 1000:.0f} ms |")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--memory":
        print(json.dumps(measure_memory(int(sys.argv[2]), sys.argv[3])))
        return
    bench_time()
    bench_memory()


if __name__ == "__main__":
    main()
