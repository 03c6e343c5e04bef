"""Where loaded's workers spend their time under load in the lab.

Builds the same lab as ``bench_lab.py``, starts the daemon (per-packet path,
default config, 2 workers), puts one load on it from the client namespace and,
meanwhile, samples both workers:

- py-spy (Python stacks; ``--nonblocking``, so the workers are not paused):
  the share of samples per function, by itself (self) and with its callees;
- perf, when installed: the share of cycles per binary (kernel, the
  interpreter, libc...) and the top kernel and interpreter symbols.

    .venv/bin/python bench/profile_lab.py [--load keepalive|close|bulk] [--seconds 8]
        [--family 4|6] [--clients N] [--py-spy PATH]

py-spy is not a dependency of the project: install it in a separate virtual
environment (``python3 -m venv /tmp/spy && /tmp/spy/bin/pip install py-spy``)
and pass ``--py-spy /tmp/spy/bin/py-spy``, or have it on PATH.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_lab as bl

LOADS = {
    "keepalive": ["wrk", "-t1", "-c20"],
    "close": ["wrk", "-t1", "-c20", "-H", "Connection: close"],
    "bulk": ["iperf3", "-p", str(bl.IPERF_PORT)],
}


class LoadedUnconfined(bl.Loaded):
    """The daemon with its workers left outside their chroot: py-spy reads the
    interpreter's binary through /proc/PID/root, which in the (empty) chroot
    does not exist. The packet loop is the same code."""

    def daemon_argv(self, conf: Path) -> list[str]:
        return [sys.executable, str(Path(__file__).with_name("_loaded_unconfined.py")),
                "-D", "-c", str(conf)]


def load_argv(load: str, host: str, seconds: int) -> list[str]:
    if load == "bulk":
        return [*LOADS[load], "-c", host, "-t", str(seconds)]
    return [*LOADS[load], f"-d{seconds}s", f"http://{bl.url_host(host)}:{bl.HTTP_PORT}/"]


def collapsed_summary(path: Path, top: int) -> list[str]:
    """Self and inclusive shares per function from py-spy's collapsed stacks
    (`frame;frame;leaf count` per line)."""
    self_n: collections.Counter[str] = collections.Counter()
    incl_n: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        # A frame is "function (file:line)"; group by function and file only.
        frames = [f.split(":")[0] + ")" if ":" in f else f for f in stack.split(";")]
        total += n
        self_n[frames[-1]] += n
        for f in set(frames):
            incl_n[f] += n
    if not total:
        return ["  (no samples)"]
    out = [f"  {total} samples; self = in the function itself, incl = with callees"]
    out.append("  self   incl  function")
    for f, n in self_n.most_common(top):
        out.append(f"  {n / total:5.1%} {incl_n[f] / total:6.1%}  {f}")
    out.append("  -- inclusive, top:")
    for f, n in incl_n.most_common(top):
        out.append(f"         {n / total:6.1%}  {f}")
    return out


def perf_summary(data: Path, top: int) -> list[str]:
    out = []
    for sort in ("dso", "dso,sym"):
        r = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", sort,
                            "-g", "none", "--stdio", "--percent-limit", "1.5"],
                           capture_output=True, text=True, timeout=120)
        rows = [x for x in r.stdout.splitlines() if x.strip() and not x.startswith("#")]
        out.append(f"  perf by {sort}:")
        out += ["   " + x.strip() for x in rows[:top]]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--load", choices=sorted(LOADS), default="keepalive")
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--family", type=int, choices=(4, 6), default=4)
    ap.add_argument("--py-spy", default=shutil.which("py-spy"), help="py-spy binary")
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--clients", type=int, default=4,
                    help="client addresses the load comes from (1: one worker carries it)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("profile_lab: needs root", file=sys.stderr)
        return 2
    if not args.py_spy:
        print("profile_lab: py-spy not found (see --help)", file=sys.stderr)
        return 2
    bl.ensure_tools()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, bl._on_signal)
    lifetime = args.seconds * 4 + 120
    signal.signal(signal.SIGALRM, bl._watchdog)
    signal.alarm(lifetime)
    bl.WORKDIR = Path(tempfile.mkdtemp(prefix="profile-lab-"))
    settings = bl.Settings(runs=1, seconds=args.seconds, ping_count=0, conns=20,
                           clients=args.clients,
                           modes=("loaded",))
    report: list[str] = []
    try:
        with bl.fresh_lab(settings, lifetime) as lab:
            mode = LoadedUnconfined(lifetime)
            try:
                mode.start(lab)
                host = mode.target(args.family)
                bl.wait_for("loaded to answer", partial(bl.answers, lab, host), timeout=10)
                pids = mode.worker_pids()
                # The load runs 2 s longer than the sampling on both sides, so
                # that only steady state is sampled.
                load = lab.exec("cl", load_argv(args.load, host, args.seconds + 2),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                time.sleep(1)
                before = mode.usage_begin()
                spies = []
                for pid in pids:
                    out = bl.WORKDIR / f"spy-{pid}.txt"
                    argv = [args.py_spy, "record", "--pid", str(pid), "--nonblocking",
                            "--rate", "250", "--duration", str(args.seconds),
                            "--format", "raw", "--output", str(out)]
                    spies.append((pid, out, subprocess.Popen(
                        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
                perf_data = bl.WORKDIR / "perf.data"
                perf = None
                if shutil.which("perf"):
                    perf = subprocess.Popen(
                        ["perf", "record", "-q", "-F", "499", "-g", "-o", str(perf_data),
                         "-p", ",".join(map(str, pids)), "--", "sleep", str(args.seconds)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for _, _, p in spies:
                    p.wait(args.seconds + 30)
                if perf is not None:
                    perf.wait(args.seconds + 30)
                usage = mode.usage_end(before)
                ppb = mode.packets_per_batch()
                out_text, _ = load.communicate(timeout=args.seconds + 20)
                report.append(f"load: {' '.join(load_argv(args.load, host, args.seconds + 2))}")
                tail = [x for x in out_text.decode(errors="replace").splitlines()
                        if "Requests/sec" in x or "receiver" in x]
                report += [f"  {x.strip()}" for x in tail]
                if usage is not None:
                    secs = args.seconds + (1 if perf is None else 0)
                    report.append(
                        f"workers: {usage.packets / usage.worker_cpu:,.0f} packets per CPU "
                        f"second, {usage.worker_cpu / usage.packets * 1e6:.1f} us/packet, "
                        f"{usage.worker_system / usage.worker_cpu:.0%} of it in the kernel, "
                        f"{usage.packets / secs:,.0f} packets/s (sampling window ~{secs} s, "
                        "profilers running)")
                if ppb is not None:
                    report.append(f"packets per burst (one verdict sendmsg), whole run: {ppb:.2f}")
                for pid, out, _ in spies:
                    report.append(f"py-spy, worker {pid}:")
                    report += collapsed_summary(out, args.top) if out.exists() else ["  none"]
                if perf is not None and perf_data.exists() and os.environ.get("KEEP_PERF"):
                    shutil.copy(perf_data, os.environ["KEEP_PERF"])
                if perf is not None and perf_data.exists():
                    report += perf_summary(perf_data, args.top)
            finally:
                mode.stop()
    finally:
        signal.alarm(0)
        shutil.rmtree(bl.WORKDIR, ignore_errors=True)
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
