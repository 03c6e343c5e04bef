"""The balancer daemon running in a lab's balancer namespace, for the lab command,
the end-to-end tests and the benchmarks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loaded.core.plan import instance_tag
from loaded.io.kernel import JOURNAL_DIR
from loaded.io.nfqueue import parse_proc_stats
from loaded.lab.netns import read_proc_net
from loaded.lab.topology import Lab

Stats = dict[str, Any]


class BalancerError(RuntimeError):
    pass


def kernel_queues(lab: Lab) -> dict[int, dict[str, int]]:
    """The kernel's queue table in the balancer's namespace, now, per queue number."""
    return parse_proc_stats(read_proc_net(lab.ns("lb"), "netfilter/nfnetlink_queue"))


def final_workers(log: str) -> list[dict[str, Any]]:
    """The ``event=worker-stopped`` lines of a daemon's log, as stats entries."""
    out: list[dict[str, Any]] = []
    for line in log.splitlines():
        if "event=worker-stopped" not in line:
            continue
        f = dict(w.split("=", 1) for w in line.split() if "=" in w)
        drops = {} if f["drops"] == "-" else {
            k: int(v) for k, v in (d.split(":") for d in f["drops"].split(","))}
        out.append({
            "index": int(f["index"]), "queue": int(f["queue"]),
            "pid": None if f["pid"] == "-" else int(f["pid"]),
            "packets": int(f["packets"]), "accepted": int(f["accepted"]),
            "dropped": int(f["dropped"]), "drops": drops, "overruns": int(f["overruns"]),
            "verdict_errors": {"all": int(f["verdict_errors"])} if int(f["verdict_errors"])
            else {}, "cpu_seconds": float(f["cpu_seconds"]), "restarts": int(f["restarts"]),
            "alive": False})
    return out


class Balancer:
    """``loaded -D -c CONF [ARGS]`` in the lab's ``lb`` namespace."""

    def __init__(self, lab: Lab, conf: Path, args: tuple[str, ...] = ()) -> None:
        self.lab = lab
        self.conf = conf
        self.args = args
        self.tag = instance_tag(os.path.abspath(conf))
        self.stats_path = JOURNAL_DIR / f"{self.tag}.stats.json"
        if lab.workdir is None:
            raise BalancerError("the lab is not running")
        self.log_path = lab.workdir / f"daemon-{self.tag}-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> Balancer:
        try:
            self.stats_path.unlink()
        except FileNotFoundError:
            pass
        with open(self.log_path, "wb") as log:
            self.proc = self.lab.exec("lb", [sys.executable, "-m", "loaded", "-D", "-c",
                                             str(self.conf), *self.args],
                                      stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # Started, and the first stats written (just after the log line), so
            # that callers can read worker pids and counters at once.
            if "event=started" in self.log and self.stats_path.exists():
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise BalancerError(f"the balancer did not start:\n{self.log}")

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stats(self) -> Stats:
        """The daemon's stats file; once it has stopped (and removed the file),
        the workers' totals from its ``worker-stopped`` log lines."""
        try:
            data: Stats = json.loads(self.stats_path.read_text())
        except FileNotFoundError:
            if self.proc is None or self.proc.poll() is None:
                raise
            return {"workers": final_workers(self.log)}
        return data

    def wait_stats(self, predicate: Callable[[Stats], bool], timeout: float = 6.0) -> Stats:
        deadline = time.monotonic() + timeout
        last: Stats = {}
        while time.monotonic() < deadline:
            try:
                last = self.stats()
                if predicate(last):
                    return last
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.2)
        raise BalancerError(f"stats never matched: {json.dumps(last)[:2000]}")

    def drops(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for w in self.stats()["workers"]:
            for reason, n in w.get("drops", {}).items():
                total[reason] = total.get(reason, 0) + n
        return total

    def problems(self) -> list[str]:
        """What went wrong inside the balancer that traffic alone might not show."""
        out = []
        for w in self.stats()["workers"]:
            q = w.get("queue")
            if w.get("restarts"):
                out.append(f"worker {q} restarted {w['restarts']} times")
            if w.get("verdict_errors"):
                out.append(f"worker {q} verdict errors {w['verdict_errors']}")
            if w.get("overruns"):
                out.append(f"worker {q} socket overruns {w['overruns']}")
            if w.get("drops", {}).get("internal-error"):
                out.append(f"worker {q} internal errors {w['drops']['internal-error']}")
        return out

    def control(self, *args: str, check: bool = True, timeout: float = 20.0) -> Any:
        """``loaded ARGS --json -c CONF`` in the balancer's namespace: the daemon's
        answer, parsed."""
        proc = self.lab.run("lb", [sys.executable, "-m", "loaded", *args, "--json", "-c",
                                   str(self.conf)], check=False, timeout=timeout)
        if check and proc.returncode != 0:
            raise BalancerError(f"loaded {' '.join(args)}: exit {proc.returncode}: "
                                f"{proc.stderr.strip()}")
        return json.loads(proc.stdout) if proc.stdout.strip() else None

    def http_get(self, url: str, timeout: float = 10.0) -> str:
        """GET ``url`` from inside the balancer's namespace (the status server
        listens on its loopback)."""
        code = ("import sys, urllib.request;"
                "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read()"
                ".decode())")
        proc = self.lab.run("lb", [sys.executable, "-c", code, url], check=False,
                            timeout=timeout)
        if proc.returncode != 0:
            raise BalancerError(f"GET {url}: {proc.stderr.strip()[-500:]}")
        return str(proc.stdout)

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.stats()["workers"] if w.get("alive") and "pid" in w]

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill_all(self) -> None:
        """A crash: SIGKILL the supervisor and every worker, so nothing is undone."""
        pids = self.worker_pids()
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
