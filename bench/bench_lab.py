"""Throughput and latency through the namespace lab, one data path against another.

For every mode in every run a fresh lab is built (``loaded.lab.topology.Lab``:
clients, router, balancer host ``lb``, two backends running nginx and iperf3),
and from the client namespace the script measures, IPv4 and IPv6:

- keep-alive requests/s    ``wrk -t1 -c20`` (connections reused)
- new connections/s        the same with ``Connection: close``
- bulk throughput          ``iperf3``, one TCP stream
- ping RTT p50/p99         ``ping -i 0.01`` on an otherwise idle lab

The modes (each a small class with ``start``/``stop``; add one to ``MODES``):

- ``direct``    clients talk to backend b1's own address; lb only routes (the limit)
- ``nft-dnat``  lb routes and DNATs the VIP with an nftables ``numgen`` map,
                conntrack un-NATs the replies (the baseline)
- ``loaded``    the daemon: per-packet NFQUEUE data path, default config, 2 workers

Modes run interleaved inside each run (their order rotates from run to run), so
the ratio to ``nft-dnat`` *of the same run* cancels most of the drift of a shared
machine. The table is printed and written to the section "Through the lab" of
``docs/benchmarks.md``.

    .venv/bin/python bench/bench_lab.py            # 3 runs of 5 s, ~6 min
    .venv/bin/python bench/bench_lab.py --quick    # 2 runs of 3 s, ~2 min

Needs root. Installs nginx, wrk, iperf3, nftables and iputils-ping with apt when
missing. Every process it starts is bounded in time and killed at the end; all
traffic and every rule stay inside the lab's namespaces.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import ClassVar, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from loaded.lab import read_proc_net
from loaded.lab.netns import netns_socket
from loaded.lab.topology import Lab, LabError

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
SECTION = "## Through the lab"

HTTP_PORT = 80
IPERF_PORT = 5201
BACKENDS = 2
FAMILIES = (4, 6)

# Tool on PATH -> the Debian package that provides it.
TOOLS = {"nginx": "nginx", "wrk": "wrk", "iperf3": "iperf3", "nft": "nftables",
         "ping": "iputils-ping", "timeout": "coreutils"}

# The issue's reference (a C++ per-packet NFQUEUE balancer on this machine, as
# a fraction of nft-dnat) and the target for loaded's per-packet path.
REFERENCE = {"keepalive_rps": (0.50, 0.45), "close_cps": (0.50, 0.40), "bulk_gbps": (0.06, 0.10)}


T = TypeVar("T")


class BenchError(RuntimeError):
    """A mode or a tool failed; the cell is reported as missing, the run goes on."""


# --------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    runs: int
    seconds: int  # length of each wrk/iperf3 measurement
    ping_count: int
    conns: int
    clients: int  # client source addresses HTTP is spread over
    modes: tuple[str, ...]

    def estimate(self) -> float:
        """Seconds the whole run should take, for the progress line and the watchdog."""
        # Fitted on this machine: tools start fast, a lab costs about 3 s.
        per_family = 3 * (self.seconds + 0.2) + self.ping_count * 0.012 + 0.5
        per_mode = 3 + len(FAMILIES) * per_family
        return self.runs * len(self.modes) * per_mode


# ---------------------------------------------------------------- installation


def ensure_tools() -> list[str]:
    """apt-get install what is missing; returns the packages installed."""
    missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
    if not missing:
        return []
    print(f"bench_lab: installing with apt: {' '.join(missing)}", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
    if subprocess.run(cmd, env=env, timeout=600).returncode != 0:
        # A fresh machine may not have package lists yet.
        subprocess.run(["apt-get", "update", "-qq"], env=env, timeout=600, check=True)
        subprocess.run(cmd, env=env, timeout=600, check=True)
    still = [t for t in TOOLS if shutil.which(t) is None]
    if still:
        raise BenchError(f"still missing after apt: {still}")
    return missing


# ------------------------------------------------------------------- helpers


def url_host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr else addr


def family_of(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def listening(lab: Lab, ns: str, port: int) -> bool:
    """Whether something listens on TCP `port` in `ns` (read from /proc, so a probe
    connection does not disturb the server, e.g. iperf3 counts it as a test)."""
    want = f":{port:04X} "
    for table in ("tcp", "tcp6"):
        for line in read_proc_net(lab.ns(ns), table).splitlines()[1:]:
            cols = line.split()
            if len(cols) > 3 and (cols[1] + " ").endswith(want) and cols[3] == "0A":
                return True
    return False


def wait_for(what: str, check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        time.sleep(0.05)


def http_get(lab: Lab, host: str, timeout: float = 2.0) -> str:
    """One HTTP/1.0 GET from the client namespace; returns the body."""
    with netns_socket(lab.ns("cl"), family_of(host)) as s:
        s.settimeout(timeout)
        s.connect((host, HTTP_PORT))
        s.sendall(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise BenchError(f"bad HTTP reply from {host}: {head[:80]!r}")
    return body.decode(errors="replace").strip()


# Files of this run (server configs, logs, rulesets): one directory of our own
# for the whole run rather than each lab's workdir, which its teardown removes,
# so that --keep can keep the daemon's logs of every lab. Set by main().
WORKDIR = Path(tempfile.gettempdir())


def lab_dir(lab: Lab) -> Path:
    d = WORKDIR / lab.prefix
    d.mkdir(exist_ok=True)
    return d


def proc_cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, exact at the time of the call
    (unlike a counter that a daemon writes out once a second)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def machine_cpu() -> tuple[float, float]:
    """(busy, total) seconds of all cores since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already in user
    tick = os.sysconf("SC_CLK_TCK")
    return (total - idle) / tick, total / tick


def proc_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


# ------------------------------------------------------------ backend servers

NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 100000;
    keepalive_timeout 60;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen {port} backlog=4096;
        listen [::]:{port} ipv6only=on backlog=4096;
        default_type text/plain;
        location / {{ return 200 "{name}\\n"; }}
    }}
}}
"""


def start_nginx(lab: Lab, backend: str, lifetime: int) -> None:
    """nginx on one backend, its files in a directory of its own; the body names
    the backend so the check can see which one answered."""
    d = lab_dir(lab) / f"nginx-{backend}"
    d.mkdir()
    conf = d / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=d, port=HTTP_PORT, name=backend))
    # `timeout` bounds the server's life even if this script is killed outright.
    argv = ["timeout", "-s", "KILL", str(lifetime), "nginx", "-p", str(d), "-c", str(conf),
            "-e", str(d / "error.log")]
    with open(d / "stdout.log", "wb") as out:
        lab.exec(backend, argv, stdout=out, stderr=subprocess.STDOUT)
    wait_for(f"nginx on {backend}", lambda: listening(lab, backend, HTTP_PORT))


def start_iperf3(lab: Lab, backend: str, lifetime: int) -> None:
    """A persistent iperf3 server (one test at a time); --rcv-timeout frees it
    if a client vanishes in the middle of a test."""
    argv = ["timeout", "-s", "KILL", str(lifetime), "iperf3", "-s", "-p", str(IPERF_PORT),
            "--rcv-timeout", "5000"]
    with open(lab_dir(lab) / f"iperf3-{backend}.log", "wb") as out:
        lab.exec(backend, argv, stdout=out, stderr=subprocess.STDOUT)
    wait_for(f"iperf3 on {backend}", lambda: listening(lab, backend, IPERF_PORT))


def prepare_clients(lab: Lab, clients: int) -> None:
    """Let the client namespace sustain connection churn, and spread HTTP over
    `clients` source addresses.

    wrk cannot bind a source address, so an SNAT rule in the client namespace
    picks one of the lab's client addresses per connection (numgen inc). It
    matters for loaded: its workers are chosen by a hash of the client address
    and a client sticks to one backend, so with one address one worker and one
    backend would get all requests. Only port 80: iperf3's control and data
    connections must come from the same address to reach the same backend.
    """
    cl = lab.ns("cl")
    # Connection: close at thousands per second would exhaust the default port
    # range inside a few seconds of TIME_WAIT.
    lab.sysctl(cl, "net.ipv4.ip_local_port_range", "1024 65535")
    lab.sysctl(cl, "net.ipv4.tcp_tw_reuse", 1)
    if clients <= 1:
        return
    lines = []
    for fam, addrs in (("ip", lab.clients4[:clients]), ("ip6", lab.clients6[:clients])):
        mapping = ", ".join(f"{i} : {a}" for i, a in enumerate(addrs))
        lines += [
            f"table {fam} bench_clients {{",
            "  chain post {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            f'    oifname "{lab.client_nic}" tcp dport {HTTP_PORT} '
            f"snat to numgen inc mod {len(addrs)} map {{ {mapping} }}",
            "  }",
            "}",
        ]
    nft_load(lab, "cl", "\n".join(lines) + "\n", "clients.nft")


def nft_load(lab: Lab, ns: str, ruleset: str, name: str) -> None:
    path = lab_dir(lab) / name
    path.write_text(ruleset)
    r = lab.run(ns, ["nft", "-f", str(path)], timeout=10)
    if r.returncode != 0:
        raise BenchError(f"nft -f {name} in {ns}: {r.stderr.strip()}")


# ------------------------------------------------------------ measurement tools


@dataclass
class WrkResult:
    rate: float  # requests/s
    errors: int  # socket errors plus non-2xx answers


def run_wrk(lab: Lab, host: str, seconds: int, conns: int, close: bool) -> WrkResult:
    """wrk from the client namespace; `close` makes every request a new connection."""
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "2s"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://{url_host(host)}:{HTTP_PORT}/")
    r = lab.run("cl", argv, timeout=seconds + 15)
    m = re.search(r"Requests/sec:\s+([\d.]+)", r.stdout)
    if r.returncode != 0 or not m:
        raise BenchError(f"wrk failed ({r.returncode}): {(r.stdout + r.stderr)[-300:]}")
    errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", r.stdout))
    if non2xx := re.search(r"Non-2xx or 3xx responses: (\d+)", r.stdout):
        errors += int(non2xx.group(1))
    return WrkResult(float(m.group(1)), errors)


def run_iperf3(lab: Lab, host: str, seconds: int) -> float:
    """One TCP stream client -> server for `seconds`; Gbit/s received."""
    argv = ["iperf3", "-c", host, "-p", str(IPERF_PORT), "-t", str(seconds), "-J",
            "--connect-timeout", "3000"]
    r = lab.run("cl", argv, timeout=seconds + 20)
    try:
        data = json.loads(r.stdout)
    except ValueError as e:
        raise BenchError(f"iperf3 gave no JSON ({r.returncode}): {r.stderr[-300:]}") from e
    if "error" in data:
        raise BenchError(f"iperf3: {data['error']}")
    return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9


@dataclass
class PingResult:
    p50_ms: float
    p99_ms: float
    lost: int


def run_ping(lab: Lab, host: str, count: int) -> PingResult:
    """`count` echoes 10 ms apart; percentiles from the per-packet times."""
    interval = 0.01
    deadline = int(count * interval + 5)
    argv = ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", "1",
            "-w", str(deadline), host]
    r = lab.run("cl", argv, timeout=deadline + 5)
    times = sorted(float(t) for t in re.findall(r"time=([\d.]+) ms", r.stdout))
    if not times:
        raise BenchError(f"ping got no answer: {(r.stdout + r.stderr)[-300:]}")
    p99 = times[min(len(times) - 1, int(0.99 * len(times)))]  # nearest rank
    return PingResult(statistics.median(times), p99, count - len(times))


# ----------------------------------------------------------------------- modes


@dataclass
class Usage:
    """What the balancer process spent during one measurement."""

    packets: int  # through the queues (a GSO super-packet counts once)
    worker_cpu: float
    worker_split: tuple[float, ...]  # CPU seconds of each worker
    # Of worker_cpu, in the kernel: the queue's copies and netlink, and also the
    # softirq that forwards a packet when its verdict re-injects it (work the
    # kernel does for every mode, here charged to the worker).
    worker_system: float
    supervisor_cpu: float
    queue_drops: int


class Mode:
    """A data path on lb. `start` gets a lab whose backends already serve."""

    name: ClassVar[str]
    description: ClassVar[str]

    def start(self, lab: Lab) -> None:
        self.lab = lab

    def stop(self) -> list[str]:
        """Undo `start`; returns problems worth reporting (e.g. daemon log lines)."""
        return []

    def target(self, family: int) -> str:
        """Where clients send their traffic."""
        return self.lab.vip4 if family == 4 else self.lab.vip6

    def usage_begin(self) -> object:
        """Counters before a measurement (modes without a process of their own: nothing)."""
        return None

    def usage_end(self, begin: object) -> Usage | None:
        return None

    def memory(self) -> dict[str, float]:
        return {}


class Direct(Mode):
    name = "direct"
    description = "clients -> b1's own address; lb only routes"

    def start(self, lab: Lab) -> None:
        super().start(lab)
        lab.setup_router_mode(vip=False)

    def target(self, family: int) -> str:
        b = self.lab.backends[0]
        return b.addr4 if family == 4 else b.addr6


class NftDnat(Mode):
    name = "nft-dnat"
    description = "lb routes; nftables `dnat to numgen inc mod 2 map` on the VIP, conntrack"

    TABLE = "bench_dnat"

    def start(self, lab: Lab) -> None:
        super().start(lab)
        lab.setup_router_mode(vip=True)
        lines = []
        for fam, vip, addrs, key in (
            ("ip", lab.vip4, [b.addr4 for b in lab.backends], "ip saddr"),
            ("ip6", lab.vip6, [b.addr6 for b in lab.backends], "ip6 saddr"),
        ):
            n = len(addrs)
            mapping = ", ".join(f"{i} : {a}" for i, a in enumerate(addrs))
            lines += [
                f"table {fam} {self.TABLE} {{",
                "  chain pre {",
                "    type nat hook prerouting priority dstnat; policy accept;",
                # iperf3 opens a control and a data connection that must meet the
                # same server: sticky by client address for its port only.
                f"    {fam} daddr {vip} tcp dport {IPERF_PORT} "
                f"dnat to jhash {key} mod {n} map {{ {mapping} }}",
                f"    {fam} daddr {vip} dnat to numgen inc mod {n} map {{ {mapping} }}",
                "  }",
                "}",
            ]
        nft_load(lab, "lb", "\n".join(lines) + "\n", "dnat.nft")

    def stop(self) -> list[str]:
        for fam in ("ip", "ip6"):
            self.lab.run("lb", ["nft", "delete", "table", fam, self.TABLE], timeout=10)
        return []


class Loaded(Mode):
    name = "loaded"
    description = "the daemon, per-packet NFQUEUE path, default config (rr), 2 workers"

    READY_TIMEOUT = 20.0

    def __init__(self, lifetime: int) -> None:
        self.lifetime = lifetime
        self.proc: subprocess.Popen[bytes] | None = None
        self.stats_path: Path | None = None
        self.log_path: Path | None = None

    def start(self, lab: Lab) -> None:
        super().start(lab)
        conf = lab.write_config(lab_dir(lab) / "loaded.conf", FIRST_CORE=0, LAST_CORE=1)
        self.log_path = lab_dir(lab) / "loaded.log"
        # `timeout` sends SIGTERM, so even an orphaned daemon undoes its set-up.
        argv = ["timeout", "-s", "TERM", str(self.lifetime), *self.daemon_argv(conf)]
        with open(self.log_path, "wb") as log:
            self.proc = lab.exec("lb", argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.READY_TIMEOUT
        while (m := re.search(r"event=started tag=(\w+)", self.log())) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError("loaded did not start; log:\n" + self.log()[-2000:])
            time.sleep(0.05)
        self.stats_path = Path("/run/loaded") / f"{m.group(1)}.stats.json"
        wait_for("loaded's stats file", lambda: len(self.worker_pids()) == 2)

    def daemon_argv(self, conf: Path) -> list[str]:
        return [sys.executable, "-m", "loaded", "-D", "-c", str(conf)]

    def log(self) -> str:
        assert self.log_path is not None
        return self.log_path.read_text(errors="replace")

    def stats(self) -> dict[str, object]:
        assert self.stats_path is not None
        try:
            data: dict[str, object] = json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            return {}
        return data

    def worker_pids(self) -> list[int]:
        workers = self.stats().get("workers", [])
        assert isinstance(workers, list)
        return [int(w["pid"]) for w in workers if w.get("alive") and w.get("pid")]

    def supervisor_pid(self) -> int:
        pid = self.stats().get("pid")
        assert isinstance(pid, int)
        return pid

    def _counters(self) -> tuple[tuple[int, ...], int, int, tuple[tuple[float, float], ...],
                                 float]:
        # The kernel's per-queue id_sequence counts every packet queued, exact
        # at any moment; the stats file lags by up to two seconds.
        pids = tuple(self.worker_pids())
        packets = drops = 0
        for line in read_proc_net(self.lab.ns("lb"), "netfilter/nfnetlink_queue").splitlines():
            cols = line.split()
            if len(cols) >= 8:
                drops += int(cols[5]) + int(cols[6])
                packets += int(cols[7])
        workers = tuple(proc_cpu_seconds(p) for p in pids)
        return pids, packets, drops, workers, sum(proc_cpu_seconds(self.supervisor_pid()))

    def usage_begin(self) -> object:
        return self._counters()

    def usage_end(self, begin: object) -> Usage | None:
        assert isinstance(begin, tuple)
        pids0, p0, d0, w0, s0 = begin
        pids1, p1, d1, w1, s1 = self._counters()
        if pids0 != pids1:
            # A restarted worker rebinds its queue (the kernel's counter starts
            # again) and is another process: nothing to subtract.
            raise BenchError(f"loaded's workers changed during the measurement "
                             f"({list(pids0)} -> {list(pids1)}); see the daemon log")
        split = tuple(sum(b) - sum(a) for a, b in zip(w0, w1, strict=True))
        system = sum(b[1] - a[1] for a, b in zip(w0, w1, strict=True))
        return Usage(p1 - p0, sum(split), split, system, s1 - s0, d1 - d0)

    def memory(self) -> dict[str, float]:
        mem = {f"worker{i}": proc_rss_mib(p) for i, p in enumerate(self.worker_pids())}
        mem["supervisor"] = proc_rss_mib(self.supervisor_pid())
        return mem

    def packets_per_batch(self) -> float | None:
        """Packets answered per sendmsg over the whole run so far (from the workers'
        own counters: each burst read from the queue is answered by one send)."""
        workers = self.stats().get("workers", [])
        assert isinstance(workers, list)
        batches = sum(int(w.get("batches", 0)) for w in workers)
        return sum(int(w.get("packets", 0)) for w in workers) / batches if batches else None

    def stop(self) -> list[str]:
        if self.proc is None:
            return []
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        # The daemon leaves its last counters behind; this run's are of no use later.
        if self.stats_path is not None:
            self.stats_path.unlink(missing_ok=True)
        log = self.log()
        # One line per distinct problem (the event and its error), not every repeat.
        problems: dict[str, int] = {}
        lines = log.splitlines()
        for i, line in enumerate(lines):
            if m := re.search(r" (ERROR|WARNING|CRITICAL) (event=\S+)(.*)", line):
                detail = m.group(3).strip()
                if m.group(1) == "ERROR" and i + 1 < len(lines) and lines[i + 1].startswith(
                        "Traceback"):
                    # The exception is the last line of the traceback that follows.
                    tail = next((x for x in lines[i + 2:] if not x.startswith((" ", "Traceback"))),
                                "")
                    detail = f"{detail} {tail}".strip()
                key = f"{m.group(1)} {m.group(2)} {detail}"
                problems[key] = problems.get(key, 0) + 1
        out = [f"daemon log: `{k}` x{n}" for k, n in problems.items()]
        if "event=stopped" not in log:
            out.append("daemon log has no event=stopped; last lines: " + " / ".join(lines[-3:]))
        return out


# name -> a new instance, given the lifetime (s) of the processes it may start
MODES: dict[str, Callable[[int], Mode]] = {
    "direct": lambda lifetime: Direct(),
    "nft-dnat": lambda lifetime: NftDnat(),
    "loaded": Loaded,
}
MODE_DESCRIPTIONS = {"direct": Direct.description, "nft-dnat": NftDnat.description,
                     "loaded": Loaded.description}

# ---------------------------------------------------------------------- runner

METRICS = {  # key: (label, unit)
    "keepalive_rps": ("keep-alive requests/s", "req/s"),
    "close_cps": ("new connections/s", "conn/s"),
    "bulk_gbps": ("bulk throughput", "Gbit/s"),
    "ping_p50_ms": ("ping RTT p50", "ms"),
    "ping_p99_ms": ("ping RTT p99", "ms"),
}


@dataclass
class Results:
    runs: int
    values: dict[tuple[str, int, str], list[float | None]] = field(default_factory=dict)
    usage: dict[tuple[str, int, str], list[Usage]] = field(default_factory=dict)
    busy: dict[tuple[str, int, str], list[float]] = field(default_factory=dict)
    memory: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    batch: list[float] = field(default_factory=list)  # loaded: packets per verdict send
    seen: dict[tuple[str, int], set[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def put(self, mode: str, family: int, metric: str, run: int, value: float) -> None:
        self.values.setdefault((mode, family, metric), [None] * self.runs)[run] = value
        unit = METRICS[metric][1]
        print(f"  {mode:9} IPv{family} {METRICS[metric][0]:22} {fmt(value, unit):>10} {unit}",
              file=sys.stderr)

    def note(self, run: int, mode: str, family: int | None, text: str) -> None:
        where = f"run {run + 1} {mode}" + (f" IPv{family}" if family else "")
        self.notes.append(f"{where}: {text}")
        print(f"  {where}: {text}", file=sys.stderr)

    def get(self, mode: str, family: int, metric: str) -> list[float]:
        return [v for v in self.values.get((mode, family, metric), []) if v is not None]

    def ratios(self, mode: str, family: int, metric: str, base: str = "nft-dnat") -> list[float]:
        """Per run: mode / base, both measured in that run."""
        a = self.values.get((mode, family, metric), [])
        b = self.values.get((base, family, metric), [])
        return [x / y for x, y in zip(a, b, strict=False) if x is not None and y]


@contextlib.contextmanager
def alarm_blocked() -> Iterator[None]:
    """Keep the watchdog from interrupting a teardown half-way."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})


@contextlib.contextmanager
def fresh_lab(settings: Settings, lifetime: int) -> Iterator[Lab]:
    """A lab with servers on every backend and the client side prepared."""
    for attempt in range(3):
        lab = Lab(backends=BACKENDS, clients=max(1, settings.clients))
        try:
            lab.start()  # tears down what it built if it fails
            break
        except (LabError, OSError, IndexError) as e:
            # The lab tears down what it built; retry so that one hiccup of a
            # shared machine does not cost the whole run (printed, not hidden).
            where = traceback.extract_tb(e.__traceback__)[-1]
            print(f"bench_lab: building the lab failed ({e!r} at {where.filename}:"
                  f"{where.lineno}), attempt {attempt + 1}/3", file=sys.stderr)
            if attempt == 2:
                raise
            time.sleep(1)
    try:
        prepare_clients(lab, settings.clients)
        for b in lab.backends:
            start_nginx(lab, b.name, lifetime)
            start_iperf3(lab, b.name, lifetime)
        yield lab
    finally:
        with alarm_blocked():
            lab.teardown()


def measure(results: Results, mode: Mode, family: int, run: int, key: str,
            fn: Callable[[], T]) -> T | None:
    """Run one tool; on failure note it and return None. For a mode with a process
    of its own (loaded), also record what that process spent meanwhile."""
    try:
        begin = mode.usage_begin()
        busy0, total0 = machine_cpu()
        value = fn()
        busy1, total1 = machine_cpu()
    except (BenchError, subprocess.TimeoutExpired, OSError) as e:
        results.note(run, mode.name, family, f"{key}: {e}")
        return None
    # Cores busy on the whole machine (everything: clients, servers, balancer,
    # softirq, and whatever else shares it), to see what saturated.
    ncpu = os.cpu_count() or 1
    results.busy.setdefault((mode.name, family, key), []).append(
        (busy1 - busy0) / max(1e-9, total1 - total0) * ncpu)
    try:
        usage = mode.usage_end(begin)
    except (BenchError, OSError) as e:
        results.note(run, mode.name, family, f"{key}: {e}")
    else:
        if usage is not None:
            results.usage.setdefault((mode.name, family, key), []).append(usage)
    return value


def run_family(results: Results, mode: Mode, lab: Lab, family: int, run: int,
               settings: Settings) -> None:
    host = mode.target(family)
    wait_for(f"{mode.name} to answer on {host}", partial(answers, lab, host), timeout=10)
    # Which backends answer shows the spreading (and that each really serves).
    seen = results.seen.setdefault((mode.name, family), set())
    for _ in range(8):
        seen.add(http_get(lab, host))
    secs, conns = settings.seconds, settings.conns
    for key, close in (("keepalive_rps", False), ("close_cps", True)):
        w = measure(results, mode, family, run, key,
                    partial(run_wrk, lab, host, secs, conns, close))
        if w is not None:
            results.put(mode.name, family, key, run, w.rate)
            if w.errors:
                results.note(run, mode.name, family, f"{key}: wrk counted {w.errors} errors")
    gbps = measure(results, mode, family, run, "bulk_gbps", partial(run_iperf3, lab, host, secs))
    if gbps is not None:
        results.put(mode.name, family, "bulk_gbps", run, gbps)
        if gbps == 0:
            results.note(run, mode.name, family, "bulk_gbps: iperf3 received nothing")
    p = measure(results, mode, family, run, "ping",
                partial(run_ping, lab, host, settings.ping_count))
    if p is not None:
        results.put(mode.name, family, "ping_p50_ms", run, p.p50_ms)
        results.put(mode.name, family, "ping_p99_ms", run, p.p99_ms)
        if p.lost:
            results.note(run, mode.name, family, f"{p.lost} of {settings.ping_count} pings lost")


def run_mode(results: Results, mode: Mode, run: int, settings: Settings, lifetime: int) -> None:
    with fresh_lab(settings, lifetime) as lab:
        try:
            mode.start(lab)
            for family in FAMILIES:
                run_family(results, mode, lab, family, run, settings)
            if mem := mode.memory():
                results.memory.setdefault(mode.name, []).append(mem)
            if isinstance(mode, Loaded) and (ppb := mode.packets_per_batch()) is not None:
                results.batch.append(ppb)
        except BenchError as e:
            results.note(run, mode.name, None, str(e))
        finally:
            for problem in mode.stop():
                results.note(run, mode.name, None, problem)


def answers(lab: Lab, host: str) -> bool:
    try:
        http_get(lab, host, timeout=1.0)
    except (OSError, BenchError):
        return False
    return True


# ---------------------------------------------------------------------- report


def machine() -> dict[str, str]:
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def version(argv: list[str]) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        return (r.stdout + r.stderr).strip().splitlines()[0] if (r.stdout + r.stderr) else "?"

    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "tools": ", ".join([version(["nginx", "-v"]).replace("nginx version: ", ""),
                            version(["wrk", "-v"]).split(" [")[0],
                            version(["iperf3", "--version"]).split(" (")[0]]),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def fmt(value: float, unit: str) -> str:
    if unit in ("req/s", "conn/s"):
        return f"{value:,.0f}"
    if unit == "Gbit/s":
        return f"{value:.2f}"
    return f"{value:.3f}"


def cell(values: list[float], unit: str) -> str:
    if not values:
        return "–"
    med = fmt(statistics.median(values), unit)
    if len(values) == 1:
        return med
    return f"{med} ({fmt(min(values), unit)}–{fmt(max(values), unit)})"


def ratio_cell(values: list[float]) -> str:
    if not values:
        return "–"
    med = f"{statistics.median(values):.2f}"
    if len(values) == 1:
        return med
    return f"{med} ({min(values):.2f}–{max(values):.2f})"


LOADS = ("keepalive_rps", "close_cps", "bulk_gbps")


def results_table(results: Results, modes: tuple[str, ...]) -> list[str]:
    others = [m for m in modes if m != "nft-dnat"] if "nft-dnat" in modes else []
    head = ["metric", "IP", *modes, *(f"{m} ÷ nft" for m in others)]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for key, (label, unit) in METRICS.items():
        for fam in FAMILIES:
            row = [f"{label} ({unit})", f"v{fam}"]
            row += [cell(results.get(m, fam, key), unit) for m in modes]
            row += [ratio_cell(results.ratios(m, fam, key)) for m in others]
            out.append("| " + " | ".join(row) + " |")
    return out


def reference_table(results: Results) -> list[str]:
    out = ["Against the issue's reference (fraction of nft-dnat, higher is better):", "",
           "| workload | C++ per-packet balancer | target | loaded v4 | loaded v6 | met |",
           "|---|---:|---:|---:|---:|---|"]
    for key, (ref, target) in REFERENCE.items():
        got = [statistics.median(r) if (r := results.ratios("loaded", f, key)) else None
               for f in FAMILIES]
        met = "yes" if all(g is not None and g >= target for g in got) else "no"
        # Three decimals, so that a "no" at 0.447 does not read as 0.45.
        cells_ = [f"{g:.3f}" if g is not None else "–" for g in got]
        out.append(f"| {METRICS[key][0]} | {ref:.2f} | ≥ {target:.2f} | "
                   f"{' | '.join(cells_)} | {met} |")
    return out


def loaded_table(results: Results, seconds: int) -> list[str]:
    out = ["What loaded spends (per measurement window, median over runs; packets counted by "
           "the kernel's queues, a GSO super-packet once; CPU from /proc/PID/stat):", "",
           "| workload | IP | packets/s through the queues | worker CPU s / M packets | "
           "of which in the kernel | workers busy (cores: sum = w0 + w1) | "
           "supervisor CPU s | queue drops |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for key in LOADS:
        for fam in FAMILIES:
            us = results.usage.get(("loaded", fam, key), [])
            if not us:
                continue
            pps = statistics.median(u.packets / seconds for u in us)
            per_m = statistics.median(u.worker_cpu / u.packets * 1e6 for u in us if u.packets)
            kernel = statistics.median(u.worker_system / u.worker_cpu for u in us
                                       if u.worker_cpu)
            # The run with the median total (upper one of two), with its split.
            mid = sorted(us, key=lambda u: u.worker_cpu)[len(us) // 2]
            split = " + ".join(f"{w / seconds:.2f}" for w in mid.worker_split)
            sup = statistics.median(u.supervisor_cpu for u in us)
            drops = sum(u.queue_drops for u in us)
            out.append(f"| {METRICS[key][0]} | v{fam} | {pps:,.0f} | {per_m:.1f} | "
                       f"{kernel:.0%} | {mid.worker_cpu / seconds:.2f} = {split} | "
                       f"{sup:.2f} | {drops} |")
    if mem := results.memory.get("loaded"):
        rss = {k: max(m.get(k, 0.0) for m in mem) for k in mem[0]}
        out += ["", "loaded memory (VmRSS after the run, max over runs): " +
                ", ".join(f"{k} {v:.1f} MiB" for k, v in rss.items()) + "."]
    if results.batch:
        out += ["", "loaded packets per burst (one recv loop, one verdict sendmsg), over "
                f"each whole run: {', '.join(f'{b:.2f}' for b in results.batch)}."]
    return out


def busy_table(results: Results, modes: tuple[str, ...], ncpu: str) -> list[str]:
    out = [f"Cores busy on the whole machine during each measurement (of {ncpu}; clients, "
           "servers, kernel and balancer together), median:", "",
           "| workload | IP | " + " | ".join(modes) + " |", "|---|---|" + "---:|" * len(modes)]
    for key in LOADS:
        for fam in FAMILIES:
            row = [f"{statistics.median(b):.2f}" if (b := results.busy.get((m, fam, key)))
                   else "–" for m in modes]
            out.append(f"| {METRICS[key][0]} | v{fam} | " + " | ".join(row) + " |")
    return out


def report(results: Results, settings: Settings, command: str, mach: dict[str, str],
           elapsed: float) -> str:
    """The markdown section: set-up, the tables, and whatever went wrong."""
    modes = settings.modes
    spread = (f"spread over {settings.clients} client addresses by an SNAT rule in the "
              "client namespace, as wrk cannot bind a source address"
              if settings.clients > 1 else "from one client address")
    out = [
        SECTION,
        "",
        f"Machine: {mach['nproc']} cores, {mach['cpu']}, kernel {mach['kernel']}, "
        f"Python {mach['python']}; {mach['tools']}. Load average (1, 5, 15 min) at start "
        f"{mach['load']}, at the end {mach['load_end']} (the cores are shared with other "
        "work: expect noise).",
        "",
        f"Command: `{command}` ({settings.runs} run(s), {settings.seconds} s per wrk/iperf3 "
        f"measurement, {settings.ping_count} pings, took {elapsed / 60:.1f} min).",
        "",
        "Modes (each in a fresh lab; order rotated between runs):",
        "",
        *(f"- `{m}`: {MODE_DESCRIPTIONS[m]}" for m in modes),
        "",
        f"Load: `wrk -t1 -c{settings.conns} -d{settings.seconds}s` (HTTP {spread}); "
        f"`-H 'Connection: close'` for new connections; `iperf3 -t {settings.seconds}`, one "
        f"stream, one client address; `ping -i 0.01 -c {settings.ping_count}` on an idle lab. "
        "Backends: nginx (1 worker, static 3-byte body, keepalive_requests 100000) and "
        "iperf3 on b1 and b2. Median over runs (min–max); ratios are mode ÷ nft-dnat of the "
        "same run, median (min–max).",
        "",
        *results_table(results, modes),
    ]
    if "loaded" in modes and "nft-dnat" in modes:
        out += ["", *reference_table(results)]
    if any(k[0] == "loaded" for k in results.usage):
        out += ["", *loaded_table(results, settings.seconds)]
    out += ["", *busy_table(results, modes, mach["nproc"])]
    seen = [f"{m} v{f}: {', '.join(sorted(s))}" for (m, f), s in sorted(results.seen.items())]
    out += ["", "Backends answering 8 check requests before the load: " + "; ".join(seen) + "."]
    if results.notes:
        out += ["", "Anomalies during the run:", ""]
        out += [f"- {n}" for n in results.notes[:40]]
    return "\n".join(out) + "\n"


def write_doc(section: str) -> None:
    """Replace the section (up to the next `## ` heading) or append it."""
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    DOC.write_text(text.rstrip("\n") + "\n")


# ------------------------------------------------------------------------ main


MAIN_PID = os.getpid()


class WatchdogExpired(BaseException):
    """Not an Exception (nor an OSError, as TimeoutError is), so that no handler
    of a failed measurement swallows it: it must unwind the whole run."""


def _watchdog(signum: int, frame: object) -> None:
    raise WatchdogExpired("bench_lab: watchdog: the run took far longer than estimated")


def _on_signal(signum: int, frame: object) -> None:
    """SIGTERM and SIGINT: unwind (the `with` blocks tear the labs down) -- but
    only in this process.

    pyroute2 creates netns sockets in short-lived forked children of this
    process and stops them with SIGTERM; a Ctrl-C reaches them too. A child
    inherits this handler; had it raised (as loaded.lab.sigterm_as_exit does)
    it would unwind through the copy of our stack, through Lab.start's clean-up,
    and delete the namespaces of the lab being built under our feet (seen here:
    lab builds failing at random, IndexError/FileNotFoundError in topology.py).
    """
    if os.getpid() != MAIN_PID:
        os._exit(128 + signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="2 runs, 3 s measurements, 100 pings (~2 min)")
    ap.add_argument("--runs", type=int, help="runs per cell (default 3; --quick: 2)")
    ap.add_argument("--seconds", type=int, help="length of each wrk/iperf3 measurement "
                    "(default 5; --quick: 3)")
    ap.add_argument("--pings", type=int, default=200, help="pings per cell (default 200)")
    ap.add_argument("--conns", type=int, default=20, help="wrk connections (default 20)")
    ap.add_argument("--clients", type=int, default=4,
                    help="client addresses HTTP is spread over, 1..4 (default 4)")
    ap.add_argument("--modes", default=",".join(MODES),
                    help=f"comma-separated subset of {','.join(MODES)}")
    ap.add_argument("--no-doc", action="store_true", help=f"do not write {DOC.relative_to(REPO)}")
    ap.add_argument("--keep", action="store_true", help="keep configs and logs (a temp dir)")
    ap.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = ap.parse_args()

    modes = tuple(m for m in args.modes.split(",") if m)
    if bad := [m for m in modes if m not in MODES]:
        ap.error(f"unknown mode(s) {bad}")
    settings = Settings(
        runs=args.runs or (2 if args.quick else 3),
        seconds=args.seconds or (3 if args.quick else 5),
        ping_count=100 if args.quick and args.pings == 200 else args.pings,
        conns=args.conns,
        clients=max(1, min(4, args.clients)),
        modes=modes,
    )
    if os.geteuid() != 0:
        print("bench_lab: needs root (network namespaces)", file=sys.stderr)
        return 2
    installed = ensure_tools()
    print(f"bench_lab: installed {installed}" if installed else
          "bench_lab: nginx, wrk, iperf3, nft, ping already installed", file=sys.stderr)

    est = settings.estimate()
    # Hard bound on the whole run: servers die by `timeout` at `lifetime` and the
    # watchdog raises in the main thread, so the `with` blocks tear everything down.
    lifetime = int(2 * est + 120)
    signal.signal(signal.SIGALRM, _watchdog)
    signal.alarm(lifetime)
    # Also SIGINT: a shell that starts us in the background ignores it for us.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)
    command = "sudo .venv/bin/python bench/bench_lab.py " + " ".join(sys.argv[1:])
    mach = machine()
    print(f"bench_lab: {settings}; about {est / 60:.1f} min", file=sys.stderr)

    global WORKDIR
    WORKDIR = Path(tempfile.mkdtemp(prefix="bench-lab-"))
    results = Results(runs=settings.runs)
    t0 = time.monotonic()
    try:
        for run in range(settings.runs):
            order = modes[run % len(modes):] + modes[:run % len(modes)]
            for name in order:
                print(f"run {run + 1}/{settings.runs}: {name}", file=sys.stderr)
                run_mode(results, MODES[name](lifetime), run, settings, lifetime)
    finally:
        signal.alarm(0)
        if args.keep:
            print(f"bench_lab: logs kept in {WORKDIR}", file=sys.stderr)
        else:
            shutil.rmtree(WORKDIR, ignore_errors=True)
    elapsed = time.monotonic() - t0
    mach["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())

    text = report(results, settings, command.strip(), mach, elapsed)
    print(text)
    if not args.no_doc:
        write_doc(text)
        print(f"bench_lab: wrote {DOC}", file=sys.stderr)
    if args.json:
        raw = {
            "settings": settings.__dict__, "machine": mach, "elapsed": elapsed,
            "values": {f"{m}/v{f}/{k}": v for (m, f, k), v in results.values.items()},
            "usage": {f"{m}/v{f}/{k}": [u.__dict__ for u in us]
                      for (m, f, k), us in results.usage.items()},
            "busy": {f"{m}/v{f}/{k}": v for (m, f, k), v in results.busy.items()},
            "memory": results.memory, "batch": results.batch, "notes": results.notes,
        }
        args.json.write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
