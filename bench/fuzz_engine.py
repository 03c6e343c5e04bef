"""Fuzz campaign of the packet engine: any bytes in, a result or PacketError out.

Generates valid packets of every kind the engine handles (TCP, UDP, ICMP and
ICMPv6, IPv4 and IPv6, to the VIP and from a backend, ICMP errors quoting
packets, IPv6 extension-header chains, fragments, GSO super-packets), mutates
most of them (bit flips, bytes set, inserted and deleted, truncation, length and
protocol fields, addresses, splices, random bytes) and runs each through
``Engine.handle`` (fast and general path, partial checksums off and on) and
``Engine.decide``, under several strategies and pool states. The generator and
the invariant checks are in ``tests/core/fuzzing.py`` (shared with the CI test).

    .venv/bin/python bench/fuzz_engine.py [--packets N] [--seed S] [--seconds T]
                                          [--jobs J] [--crash-dir DIR]
                                          [--write-corpus FILE]

Exit status 0: no exception other than PacketError, no hang, no broken
invariant; 1 otherwise, with every failing packet saved in the crash
directory (one JSON file each: the packet in hex, the scenario, the traceback).
The same seed and job count give the same packets.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))  # tests.core.fuzzing: the generator, shared with CI

from tests.core.fuzzing import Hang, Result, campaign, corpus_seeds  # noqa: E402


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise Hang()


def _watchdog(seconds: float) -> None:
    signal.setitimer(signal.ITIMER_REAL, seconds)


def _job(args: tuple[int, int, float, int]) -> Result:
    seed, packets, deadline, gso = args
    signal.signal(signal.SIGALRM, _on_alarm)
    # the deadline is wall-clock: time.time() is the same in every process
    return campaign(seed, packets, deadline, time.time, gso_weight=gso, watchdog=_watchdog)


def write_corpus(path: Path, results: list[Result], failures: list[dict[str, object]]) -> None:
    """The seed corpus: every template's packets, the first input of every outcome
    of this run, its failures, and the packets of bugs found before (entries named
    "bug: ..." in the file already, kept as they are)."""
    kept: list[dict[str, str]] = []
    if path.exists():
        kept = [e for e in json.loads(path.read_text())["entries"]
                if e["name"].startswith("bug:")]
    entries = [{"name": f"seed {name}", "hex": data.hex()} for name, data in corpus_seeds()]
    seen: dict[str, str] = {}
    for r in results:
        for k, data in r.interesting.items():
            seen.setdefault(k, data.hex())
    entries += [{"name": f"first {k}", "hex": h} for k, h in sorted(seen.items())]
    entries += [{"name": f"crash: {f['entry']}: {f['problem']}", "hex": str(f["hex"])}
                for f in failures]
    doc = {"about": "Engine fuzz corpus (tests/core/test_fuzz_corpus.py); written by "
                    "bench/fuzz_engine.py --write-corpus, which keeps the bug: entries",
           "entries": kept + entries}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=0) + "\n")
    print(f"wrote {len(doc['entries'])} entries to {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=13, help="base seed (job k uses seed*1000+k)")
    ap.add_argument("--seconds", type=float, default=600.0, help="time limit")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--gso-weight", type=int, default=1,
                    help="weight of 2..64 KiB packets among ~200 (they cost ~20 small ones)")
    ap.add_argument("--crash-dir", type=Path, default=Path("fuzz-crashes"))
    ap.add_argument("--write-corpus", type=Path, default=None,
                    help="also write the first input of every outcome here (JSON)")
    args = ap.parse_args()

    t0 = time.time()
    deadline = t0 + args.seconds
    share = [args.packets // args.jobs + (k < args.packets % args.jobs)
             for k in range(args.jobs)]
    work = [(args.seed * 1000 + k, n, deadline, args.gso_weight) for k, n in enumerate(share)]
    if args.jobs == 1:
        results = [_job(work[0])]
    else:
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            results = pool.map(_job, work)
    took = time.time() - t0

    packets = sum(r.packets for r in results)
    counts: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    failures = [f for r in results for f in r.failures]
    for r in results:
        counts.update(r.counts)
        kinds.update(r.kinds)
    slow = max(results, key=lambda r: r.slowest)
    slowest = slow.slowest

    print(f"fuzz_engine: seed {args.seed}, {args.jobs} jobs, {packets} packets "
          f"({'all' if packets == args.packets else 'time limit hit'}) in {took:.1f} s: "
          f"{packets / took:.0f} packets/s")
    print(f"slowest engine call: {max(r.slowest_call for r in results) * 1000:.2f} ms; "
          f"slowest packet with its checks: {slowest * 1000:.1f} ms, {slow.slowest_packet}")
    print(f"each packet: handle (fast and general path) with partial checksums off and "
          f"on, decide: {3 * packets} runs per path\n")
    print("| entry | outcome | count |\n|---|---|---:|")
    for k in sorted(counts, key=lambda k: (k.split(":")[0], -counts[k])):
        entry, _, outcome = k.partition(":")
        print(f"| {entry} | {outcome} | {counts[k]} |")
    # per template, what handle (partial off) made of its packets, mutated or not
    cols = ("accept", "pass", "drop", "exception")
    table: dict[str, Counter[str]] = {}
    for k, v in kinds.items():
        name, _, outcome = k.partition(":")
        table.setdefault(name, Counter())[outcome] += v
    print("\n| template | packets | " + " | ".join(cols) + " |\n|---|" + "---:|" * 5)
    for name in sorted(table):
        row = table[name]
        print(f"| {name} | {sum(row.values())} | " + " | ".join(str(row[c]) for c in cols)
              + " |")
    print(f"\nfailures: {len(failures)}")

    if failures:
        args.crash_dir.mkdir(parents=True, exist_ok=True)
        by_problem: Counter[str] = Counter()
        for f in failures:
            by_problem[f"{f['entry']}: {f['problem']}"] += 1
            name = f"crash-{f['seed']}-{f['index']}-{f['entry'].replace(' ', '_')}.json"
            (args.crash_dir / name).write_text(json.dumps(f, indent=1) + "\n")
        for k, v in by_problem.most_common():
            print(f"  {v:6d}  {k}")
        print(f"saved in {args.crash_dir}/")
    if args.write_corpus is not None:
        write_corpus(args.write_corpus, results, failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
