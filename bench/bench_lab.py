"""Throughput, latency and cost through the namespace lab, one data path against another.

For every mode in every run a fresh lab is built (``loaded.lab.topology.Lab``:
clients, router, balancer host ``lb``, two backends running nginx and iperf3),
and from the client namespace the script measures, IPv4 and IPv6:

- keep-alive requests/s    ``wrk -t1 -c20`` (connections reused)
- new connections/s        the same with ``Connection: close``
- bulk throughput          ``iperf3``, one TCP stream
- ping RTT p50/p99         ``ping -i 0.01`` on an otherwise idle lab
- TCP RTT p50/p99          one kept-alive TCP connection, one short HTTP request
                           and its answer every 10 ms, timed by the client
- balancer CPU per packet  CPU seconds per million packets that lb received;
                           for a mode with a process (loaded, haproxy) that
                           process's CPU, for the kernel modes the whole machine's
- balancer memory          RSS of the balancer's processes after the run

The modes (each a small class with ``start``/``stop``; add one to ``MODES``):

- ``direct``            clients talk to backend b1's own address; lb only routes (the limit)
- ``nft-dnat``          lb routes and DNATs the VIP with an nftables ``numgen`` map,
                        conntrack un-NATs the replies (the baseline)
- ``haproxy``           HAProxy in TCP mode on lb, listening on the VIPs, round-robin
                        (a proxy: the backends see lb's address, not the client's)
- ``loaded``            the daemon, ``datapath=perpacket``: every packet to the VIP
                        through NFQUEUE (the kernel rewrites the plain TCP/UDP ones by
                        the worker's mark, and the backends' TCP/UDP replies itself)
- ``loaded-conntrack``  the daemon, ``datapath=conntrack`` (its default): a client's
                        first connection through NFQUEUE, the rest in the kernel

Modes run interleaved inside each run (their order rotates from run to run), so
the ratio to ``nft-dnat`` *of the same run* cancels most of the drift of a shared
machine. The tables are printed and written to the section "Through the lab" of
``docs/benchmarks.md``, the ratios also drawn in ``docs/img/bench_lab.png``
(needs matplotlib: ``.venv/bin/pip install -e '.[bench]'``; without it the
chart is skipped).

    .venv/bin/python bench/bench_lab.py            # all 5 modes, 3 runs of 5 s, ~11 min
    .venv/bin/python bench/bench_lab.py --quick    # all 5 modes, 2 runs of 3 s, ~4.5 min
    .venv/bin/python bench/bench_lab.py --quick --modes nft-dnat,loaded

Needs root. Installs nginx, wrk, iperf3, haproxy, nftables and iputils-ping with
apt when missing. Every process it starts is bounded in time and killed at the
end; all traffic and every rule stay inside the lab's namespaces.
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
CHART = REPO / "docs" / "img" / "bench_lab.png"
SECTION = "## Through the lab"

HTTP_PORT = 80
IPERF_PORT = 5201
BACKENDS = 2
FAMILIES = (4, 6)

# Tool on PATH -> the Debian package that provides it.
TOOLS = {"nginx": "nginx", "wrk": "wrk", "iperf3": "iperf3", "nft": "nftables",
         "ping": "iputils-ping", "timeout": "coreutils", "haproxy": "haproxy"}

# Ratios to nft-dnat (same run) that each of loaded's data paths must reach.
TARGETS: dict[str, dict[str, float]] = {
    "loaded-conntrack": {"keepalive_rps": 0.95, "close_cps": 0.90, "bulk_gbps": 0.95},
    "loaded": {"keepalive_rps": 0.55, "close_cps": 0.55, "bulk_gbps": 0.60},
}
# Ratios to nft-dnat measured by others on this kind of machine, for comparison.
REFERENCES: dict[str, dict[str, float]] = {
    "HAProxy": {"keepalive_rps": 0.65, "close_cps": 0.68, "bulk_gbps": 0.52},
    "C++ original (per-packet)": {"keepalive_rps": 0.50, "close_cps": 0.50, "bulk_gbps": 0.06},
    "nfqlb (C, one direction queued)": {"keepalive_rps": 0.94, "close_cps": 0.88,
                                        "bulk_gbps": 0.65},
    "first-packet prototype": {"keepalive_rps": 0.99, "close_cps": 0.86, "bulk_gbps": 0.97},
}


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
        # Pings and TCP exchanges are paced 10 ms apart.
        per_family = 3 * (self.seconds + 0.2) + 2 * self.ping_count * 0.012 + 0.5
        per_mode = 3 + len(FAMILIES) * per_family
        return self.runs * len(self.modes) * per_mode


# ---------------------------------------------------------------- installation


def ensure_tools(tools: dict[str, str] | None = None, who: str = "bench_lab") -> list[str]:
    """apt-get install what is missing of ``tools`` (command -> Debian package;
    default this benchmark's ``TOOLS``); returns the packages installed."""
    tools = TOOLS if tools is None else tools
    missing = sorted({pkg for tool, pkg in tools.items() if shutil.which(tool) is None})
    if not missing:
        return []
    print(f"{who}: installing with apt: {' '.join(missing)}", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
    if subprocess.run(cmd, env=env, timeout=600).returncode != 0:
        # A fresh machine may not have package lists yet.
        subprocess.run(["apt-get", "update", "-qq"], env=env, timeout=600, check=True)
        subprocess.run(cmd, env=env, timeout=600, check=True)
    still = [t for t in tools if shutil.which(t) is None]
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


def child_pids(pid: int) -> list[int]:
    """The children of a process (e.g. what `timeout` started)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


LB_LINKS = (Lab.pub_nic, Lab.priv_nic)  # lb's links: to the router (clients), to the backends


def lb_packets(lab: Lab) -> int:
    """Packets lb has received on both its links (a GSO/GRO super-packet counts once):
    the same count for every mode, whatever does the balancing."""
    total = 0
    for line in read_proc_net(lab.ns("lb"), "dev").splitlines()[2:]:
        name, _, counters = line.partition(":")
        if name.strip() in LB_LINKS:
            total += int(counters.split()[1])
    return total


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
    return PingResult(statistics.median(times), percentile(times, 0.99), count - len(times))


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest rank, as for ping."""
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


HTTP_REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


def read_http_response(s: socket.socket, buf: bytearray) -> None:
    """Read one HTTP/1.1 response with a Content-Length from `s`; `buf` keeps
    whatever arrived beyond it."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            m = re.search(rb"(?im)^content-length:\s*(\d+)", bytes(buf[:end]))
            if m is None:
                raise BenchError(f"HTTP answer without Content-Length: {bytes(buf[:80])!r}")
            if not buf.startswith(b"HTTP/1.1 200"):
                raise BenchError(f"bad HTTP answer: {bytes(buf[:80])!r}")
            need = end + 4 + int(m.group(1))
            if len(buf) >= need:
                del buf[:need]
                return
        chunk = s.recv(65536)
        if not chunk:
            raise BenchError("the server closed the kept-alive connection")
        buf += chunk


def run_tcp_rtt(lab: Lab, host: str, count: int) -> PingResult:
    """`count` short HTTP exchanges 10 ms apart on one kept-alive TCP connection
    (TCP_NODELAY), each timed from the request's send to the answer's last byte:
    the round trip through the balancer plus nginx's and this client's (Python)
    handling, which are the same in every mode. The first exchange (connection
    set-up, the balancer's first-packet work) is not counted."""
    interval = 0.01
    deadline = time.monotonic() + count * (interval + 0.002) + 10
    times: list[float] = []
    buf = bytearray()
    with netns_socket(lab.ns("cl"), family_of(host)) as s:
        s.settimeout(2.0)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.connect((host, HTTP_PORT))
        for i in range(count + 1):
            if time.monotonic() > deadline:
                raise BenchError(f"TCP RTT: only {len(times)} of {count} exchanges in time")
            t0 = time.perf_counter()
            s.sendall(HTTP_REQUEST)
            read_http_response(s, buf)
            took = time.perf_counter() - t0
            if i:
                times.append(took * 1000)
            time.sleep(max(0.0, interval - took))
    times.sort()
    return PingResult(statistics.median(times), percentile(times, 0.99), 0)


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

    def balancer_pids(self) -> list[int] | None:
        """The processes that do the balancing, whose CPU is the balancer's;
        None when the kernel does it (not separable from the rest of the machine)."""
        return None

    def memory(self) -> dict[str, float]:
        """VmRSS (MiB) of each balancer process."""
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


HAPROXY_CONF = """\
# HAProxy for bench_lab.py, lab {prefix}: TCP mode on the VIPs, round-robin.
global
    nbthread {threads}
    cpu-map auto:1/1-{threads} 0-{last_cpu}
    # Two descriptors per connection; wrk keeps 20 open. Well under the usual
    # hard limit on open files, which HAProxy must not need to exceed.
    maxconn 4000
    # No log target: nothing is logged per connection.

defaults
    mode tcp
    timeout connect 3s
    timeout client 60s
    timeout server 60s
{sections}"""


class HAProxy(Mode):
    name = "haproxy"
    description = ("HAProxy (Debian's package) on lb in TCP mode, listening on the VIPs, "
                   "round-robin to the backends' real addresses (port 5201: by client "
                   "address, for iperf3); a proxy, so the backends see lb's address, not the "
                   "client's; `nbthread 2` pinned to cores 0-1 by `cpu-map`, no health checks, "
                   "no splicing, `-db` (foreground)")

    def __init__(self, lifetime: int) -> None:
        self.lifetime = lifetime
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None  # haproxy's own (the Popen's is `timeout`'s)
        self.log_path: Path | None = None

    @staticmethod
    def threads() -> int:
        return min(2, os.cpu_count() or 1)

    def config(self, lab: Lab) -> str:
        sections = []
        for fam, vip, addrs in ((4, lab.vip4, [b.addr4 for b in lab.backends]),
                                (6, lab.vip6, [b.addr6 for b in lab.backends])):
            # iperf3's control and data connections must meet the same server:
            # by client address for its port, as nft-dnat does.
            for port, name, balance in ((HTTP_PORT, "http", "roundrobin"),
                                        (IPERF_PORT, "iperf", "source")):
                lines = ["", f"listen {name}{fam}", f"    bind {url_host(vip)}:{port}",
                         f"    balance {balance}"]
                lines += [f"    server {b.name} {url_host(a)}:{port}"
                          for b, a in zip(lab.backends, addrs, strict=True)]
                sections.append("\n".join(lines))
        threads = self.threads()
        return HAPROXY_CONF.format(prefix=lab.prefix, threads=threads, last_cpu=threads - 1,
                                   sections="\n".join(sections) + "\n")

    def start(self, lab: Lab) -> None:
        super().start(lab)
        # The VIPs on pub0 (HAProxy binds them), forwarding, the private gateway
        # (the backends' route back), as for the other modes.
        lab.setup_router_mode(vip=True)
        # HAProxy opens a connection of its own to a backend per client connection.
        lab.sysctl("lb", "net.ipv4.ip_local_port_range", "1024 65535")
        lab.sysctl("lb", "net.ipv4.tcp_tw_reuse", 1)
        cfg = lab_dir(lab) / "haproxy.cfg"
        cfg.write_text(self.config(lab))
        check = lab.run("lb", ["haproxy", "-c", "-q", "-f", str(cfg)], timeout=10)
        if check.returncode != 0:
            out = (check.stdout + check.stderr).strip()
            raise BenchError(f"haproxy -c rejected the config: {out[-500:]}")
        self.log_path = lab_dir(lab) / "haproxy.log"
        # -db: foreground, no daemon, no master process; `timeout` bounds its life
        # and passes our SIGTERM on.
        argv = ["timeout", "-s", "KILL", str(self.lifetime), "haproxy", "-db", "-f", str(cfg)]
        with open(self.log_path, "wb") as log:
            self.proc = lab.exec("lb", argv, stdout=log, stderr=subprocess.STDOUT)

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise BenchError(f"haproxy exited ({self.proc.returncode}): {self.log()[-500:]}")
            return all(listening(lab, "lb", p) for p in (HTTP_PORT, IPERF_PORT))

        wait_for("haproxy to listen", up)
        wait_for("haproxy's pid", lambda: bool(child_pids(self.proc.pid)) if self.proc else False)
        self.pid = child_pids(self.proc.pid)[0]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def balancer_pids(self) -> list[int] | None:
        return [self.pid] if self.pid is not None else []

    def memory(self) -> dict[str, float]:
        return {"haproxy": proc_rss_mib(self.pid)} if self.pid is not None else {}

    def stop(self) -> list[str]:
        if self.proc is None:
            return []
        if self.proc.poll() is None:
            self.proc.terminate()  # `timeout` forwards SIGTERM: haproxy stops at once
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        problems = [line for line in self.log().splitlines()
                    if re.match(r"\[(ALERT|WARNING)\]", line)]
        return [f"haproxy: `{line.strip()}`" for line in problems[:5]]


class Loaded(Mode):
    name = "loaded"
    description = ("the daemon, `datapath=perpacket`: every packet through NFQUEUE, "
                   "rr, FIRST_CORE=0 LAST_CORE=1 (2 workers)")
    DATAPATH = "perpacket"

    READY_TIMEOUT = 20.0

    def __init__(self, lifetime: int) -> None:
        self.lifetime = lifetime
        self.proc: subprocess.Popen[bytes] | None = None
        self.stats_path: Path | None = None
        self.log_path: Path | None = None
        self.started = False

    def start(self, lab: Lab) -> None:
        super().start(lab)
        conf = lab.write_config(lab_dir(lab) / f"{self.name}.conf", FIRST_CORE=0, LAST_CORE=1,
                                datapath=self.DATAPATH)
        self.log_path = lab_dir(lab) / f"{self.name}.log"
        # `timeout` sends SIGTERM, so even an orphaned daemon undoes its set-up.
        argv = ["timeout", "-s", "TERM", str(self.lifetime), *self.daemon_argv(conf)]
        with open(self.log_path, "wb") as log:
            self.proc = lab.exec("lb", argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.READY_TIMEOUT
        while (m := re.search(r"event=started tag=(\w+)", self.log())) is None:
            if self.proc.poll() is not None:
                # E.g. a setting this version of the daemon refuses: its own words.
                raise BenchError(f"the daemon refused to start (exit code "
                                 f"{self.proc.returncode}): {self.last_words()}")
            if time.monotonic() > deadline:
                raise BenchError(f"the daemon did not report event=started within "
                                 f"{self.READY_TIMEOUT:.0f} s: {self.last_words()}")
            time.sleep(0.05)
        self.started = True
        self.stats_path = Path("/run/loaded") / f"{m.group(1)}.stats.json"
        # Every worker the stats file lists is alive (however many the data path runs).
        wait_for("loaded's stats file", self.workers_ready)

    def workers_ready(self) -> bool:
        workers = self.stats().get("workers", [])
        return (isinstance(workers, list) and bool(workers)
                and all(w.get("alive") and w.get("pid") for w in workers))

    def last_words(self, lines: int = 3) -> str:
        """The last lines of the daemon's output, on one line."""
        tail = [x.strip() for x in self.log().splitlines() if x.strip()][-lines:]
        return " / ".join(f"`{x}`" for x in tail) or "(no output)"

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

    def balancer_pids(self) -> list[int] | None:
        return [*self.worker_pids(), self.supervisor_pid()]

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
        if self.started and "event=stopped" not in log:
            out.append("daemon log has no event=stopped; last lines: " + " / ".join(lines[-3:]))
        return out


class LoadedConntrack(Loaded):
    """The same daemon on its conntrack data path (the default). A daemon that
    refuses to start is reported as missing cells, with its own words."""

    name = "loaded-conntrack"
    description = "the same daemon and config with `datapath=conntrack`"
    DATAPATH = "conntrack"


# name -> a new instance, given the lifetime (s) of the processes it may start
MODES: dict[str, Callable[[int], Mode]] = {
    "direct": lambda lifetime: Direct(),
    "nft-dnat": lambda lifetime: NftDnat(),
    "haproxy": HAProxy,
    "loaded": Loaded,
    "loaded-conntrack": LoadedConntrack,
}
MODE_CLASSES: dict[str, type[Mode]] = {
    c.name: c for c in (Direct, NftDnat, HAProxy, Loaded, LoadedConntrack)}
MODE_DESCRIPTIONS = {name: c.description for name, c in MODE_CLASSES.items()}
KERNEL_MODES = ("direct", "nft-dnat")  # no balancer process: CPU is the machine's

# ---------------------------------------------------------------------- runner

METRICS = {  # key: (label, unit)
    "keepalive_rps": ("keep-alive requests/s", "req/s"),
    "close_cps": ("new connections/s", "conn/s"),
    "bulk_gbps": ("bulk throughput", "Gbit/s"),
    "ping_p50_ms": ("ping RTT p50", "ms"),
    "ping_p99_ms": ("ping RTT p99", "ms"),
    "tcp_p50_ms": ("TCP request RTT p50", "ms"),
    "tcp_p99_ms": ("TCP request RTT p99", "ms"),
}


@dataclass
class Cost:
    """What one throughput measurement cost the balancer, any mode."""

    seconds: float
    packets: int  # received by lb on both links (a GSO/GRO super-packet counts once)
    machine_cpu: float  # CPU seconds of the whole machine, every process and the kernel
    balancer_cpu: float | None  # CPU seconds of the balancer's processes; None: kernel mode


@dataclass
class Results:
    runs: int
    values: dict[tuple[str, int, str], list[float | None]] = field(default_factory=dict)
    usage: dict[tuple[str, int, str], list[Usage]] = field(default_factory=dict)
    busy: dict[tuple[str, int, str], list[float]] = field(default_factory=dict)
    cost: dict[tuple[str, int, str], list[Cost]] = field(default_factory=dict)
    memory: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    # loaded's modes: packets per verdict send, per run
    batch: dict[str, list[float]] = field(default_factory=dict)
    seen: dict[tuple[str, int], set[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # mode -> why it could not be measured at all (distinct reasons, in order)
    missing: dict[str, list[str]] = field(default_factory=dict)

    def put(self, mode: str, family: int, metric: str, run: int, value: float) -> None:
        self.values.setdefault((mode, family, metric), [None] * self.runs)[run] = value
        unit = METRICS[metric][1]
        print(f"  {mode:16} IPv{family} {METRICS[metric][0]:22} {fmt(value, unit):>10} {unit}",
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


def cpu_of(pids: list[int] | None) -> dict[int, float] | None:
    return None if pids is None else {p: sum(proc_cpu_seconds(p)) for p in pids}


def measure(results: Results, mode: Mode, family: int, run: int, key: str,
            fn: Callable[[], T]) -> T | None:
    """Run one tool; on failure note it and return None. Also record what the
    balancer spent meanwhile: its processes' CPU (machine CPU for a kernel mode)
    against the packets lb received, and for loaded its queues' own counters."""
    try:
        begin = mode.usage_begin()
        cpu0 = cpu_of(mode.balancer_pids())
        packets0 = lb_packets(mode.lab)
        t0 = time.monotonic()
        busy0, total0 = machine_cpu()
        value = fn()
        busy1, total1 = machine_cpu()
        t1 = time.monotonic()
        packets1 = lb_packets(mode.lab)
        cpu1 = cpu_of(mode.balancer_pids())
    except (BenchError, subprocess.TimeoutExpired, OSError) as e:
        results.note(run, mode.name, family, f"{key}: {e}")
        return None
    # Cores busy on the whole machine (everything: clients, servers, balancer,
    # softirq, and whatever else shares it), to see what saturated.
    ncpu = os.cpu_count() or 1
    results.busy.setdefault((mode.name, family, key), []).append(
        (busy1 - busy0) / max(1e-9, total1 - total0) * ncpu)
    balancer: float | None = None
    if cpu0 is not None and cpu1 is not None:
        if cpu0.keys() != cpu1.keys():
            results.note(run, mode.name, family, f"{key}: the balancer's processes changed "
                         f"({sorted(cpu0)} -> {sorted(cpu1)}): no CPU figure")
        else:
            balancer = sum(cpu1[p] - cpu0[p] for p in cpu0)
    if cpu0 is None or balancer is not None:
        results.cost.setdefault((mode.name, family, key), []).append(
            Cost(t1 - t0, packets1 - packets0, busy1 - busy0, balancer))
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
    t = measure(results, mode, family, run, "tcp_rtt",
                partial(run_tcp_rtt, lab, host, settings.ping_count))
    if t is not None:
        results.put(mode.name, family, "tcp_p50_ms", run, t.p50_ms)
        results.put(mode.name, family, "tcp_p99_ms", run, t.p99_ms)


def run_mode(results: Results, mode: Mode, run: int, settings: Settings, lifetime: int) -> None:
    with fresh_lab(settings, lifetime) as lab:
        started = False
        try:
            mode.start(lab)
            started = True
            for family in FAMILIES:
                run_family(results, mode, lab, family, run, settings)
            if mem := mode.memory():
                results.memory.setdefault(mode.name, []).append(mem)
            if isinstance(mode, Loaded) and (ppb := mode.packets_per_batch()) is not None:
                results.batch.setdefault(mode.name, []).append(ppb)
        except (BenchError, LabError, OSError, subprocess.TimeoutExpired) as e:
            results.note(run, mode.name, None, str(e))
            if not started:
                reasons = results.missing.setdefault(mode.name, [])
                if str(e) not in reasons:
                    reasons.append(str(e))
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
    mem = "?"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break

    def version(argv: list[str]) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        return (r.stdout + r.stderr).strip().splitlines()[0] if (r.stdout + r.stderr) else "?"

    haproxy = version(["haproxy", "-v"]).split()
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "mem": mem,
        "kernel": platform.release(),
        "os": platform.freedesktop_os_release().get("PRETTY_NAME", "?")
        if hasattr(platform, "freedesktop_os_release") else "?",
        "python": platform.python_version(),
        "tools": ", ".join([version(["nginx", "-v"]).replace("nginx version: ", ""),
                            version(["wrk", "-v"]).split(" [")[0],
                            version(["iperf3", "--version"]).split(" (")[0],
                            " ".join(haproxy[:3]) if len(haproxy) >= 3 else "haproxy ?"]),
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


def measured(results: Results, mode: str) -> bool:
    return any(results.get(mode, f, k) for f in FAMILIES for k in METRICS)


def table(head: list[str], rows: list[list[str]], left: int = 2) -> list[str]:
    return ["| " + " | ".join(head) + " |",
            "|" + "---|" * left + "---:|" * (len(head) - left),
            *("| " + " | ".join(r) + " |" for r in rows)]


def results_table(results: Results, modes: tuple[str, ...]) -> list[str]:
    rows = [[f"{label} ({unit})", f"v{fam}",
             *(cell(results.get(m, fam, key), unit) if measured(results, m) else "missing"
               for m in modes)]
            for key, (label, unit) in METRICS.items() for fam in FAMILIES]
    return table(["metric", "IP", *(f"`{m}`" for m in modes)], rows)


def ratios_table(results: Results, modes: tuple[str, ...]) -> list[str]:
    others = [m for m in modes if m != "nft-dnat"]
    rows = [[label, f"v{fam}",
             *(ratio_cell(results.ratios(m, fam, key)) if measured(results, m) else "missing"
               for m in others)]
            for key, (label, _) in METRICS.items() for fam in FAMILIES]
    return table(["metric", "IP", *(f"`{m}` ÷ nft" for m in others)], rows)


def missing_lines(results: Results, modes: tuple[str, ...]) -> list[str]:
    out = []
    for m in modes:
        if measured(results, m):
            continue
        why = "; ".join(results.missing.get(m, [])) or "every measurement failed (see below)"
        out.append(f"- `{m}`: not measured in any run: {why}")
    return out


def median_ratio(results: Results, mode: str, fam: int, key: str) -> float | None:
    r = results.ratios(mode, fam, key)
    return statistics.median(r) if r else None


def reference_table(results: Results, modes: tuple[str, ...]) -> list[str]:
    """Targets and others' figures against what this run measured (ratios to nft-dnat)."""
    head = ["workload"]
    for m in TARGETS:
        head += [f"`{m}` v4 / v6", "target"]
    if "haproxy" in modes:
        head.append("`haproxy` v4 / v6")
    head += [f"{r} (others)" for r in REFERENCES]
    rows = []
    for key in LOADS:
        row = [METRICS[key][0]]
        for m, targets in TARGETS.items():
            got = [median_ratio(results, m, f, key) for f in FAMILIES]
            if m not in modes:
                shown = "not run"
            elif not measured(results, m):
                shown = "missing"
            else:
                # Three decimals, so that a "no" at 0.547 does not read as 0.55.
                shown = " / ".join(f"{g:.3f}" if g is not None else "–" for g in got)
                met = all(g is not None and g >= targets[key] for g in got)
                shown += " (met)" if met else " (not met)"
            row += [shown, f"≥ {targets[key]:.2f}"]
        if "haproxy" in modes:
            got = [median_ratio(results, "haproxy", f, key) for f in FAMILIES]
            row.append(" / ".join(f"{g:.2f}" if g is not None else "–" for g in got)
                       if measured(results, "haproxy") else "missing")
        row += [f"{ref[key]:.2f}" for ref in REFERENCES.values()]
        rows.append(row)
    return ["Targets and references (fraction of nft-dnat of the same run, median of the "
            "runs; \"met\" when both IPv4 and IPv6 reach the target; \"others\": figures "
            "measured by others on this kind of machine, not in this run):", "",
            *table(head, rows, left=1)]


def cost_tables(results: Results, modes: tuple[str, ...]) -> list[str]:
    shown = [m for m in modes if measured(results, m)]
    rows, rows_machine = [], []
    for key in LOADS:
        for fam in FAMILIES:
            row, row_m = [METRICS[key][0], f"v{fam}"], [METRICS[key][0], f"v{fam}"]
            for m in shown:
                cs = [c for c in results.cost.get((m, fam, key), []) if c.packets > 0]
                if not cs:
                    row.append("–")
                    row_m.append("–")
                    continue
                kpps = statistics.median(c.packets / c.seconds for c in cs) / 1000
                mach = statistics.median(c.machine_cpu / c.packets * 1e6 for c in cs)
                if m in KERNEL_MODES:
                    row.append(f"{mach:.1f}† ({kpps:,.0f}k)")
                else:
                    own = statistics.median(c.balancer_cpu / c.packets * 1e6 for c in cs
                                            if c.balancer_cpu is not None)
                    row.append(f"{own:.1f} ({kpps:,.0f}k)")
                busy = results.busy.get((m, fam, key))
                row_m.append(f"{statistics.median(busy):.2f} ({mach:.1f})" if busy else
                             f"– ({mach:.1f})")
            rows.append(row)
            rows_machine.append(row_m)
    head = ["workload", "IP", *(f"`{m}`" for m in shown)]
    return [
        "Balancer CPU seconds per million packets that lb received on its two links (a "
        "GSO/GRO super-packet counts once; the same count in every mode), median over runs; "
        "in parentheses packets/s. `loaded`, `loaded-conntrack`: the daemon's workers and "
        "supervisor (user and system time; on the per-packet path that includes the "
        "forwarding the kernel does when a verdict re-injects a packet, on the conntrack "
        "path the kernel forwards and NATs most packets in softirq, outside the daemon, so "
        "its figure leaves that out); `haproxy`: its process (user and system time, which "
        "includes the kernel's TCP work done in its system calls); † kernel modes: the "
        "balancing is the kernel's forwarding (and NAT) in softirq, which cannot be told "
        "apart from the rest of the machine, so this is the CPU of the *whole machine* "
        "(clients, servers, kernel) per million packets, an upper bound and not comparable "
        "to the process figures (the table after this one gives that for every mode):",
        "",
        *table(head, rows),
        "",
        "The whole machine during each measurement, every mode: cores busy (of "
        f"{os.cpu_count()}; clients, servers, kernel and balancer together) and, in "
        "parentheses, machine CPU seconds per million packets through lb, median:",
        "",
        *table(head, rows_machine),
    ]


def memory_table(results: Results, modes: tuple[str, ...]) -> list[str]:
    rows = []
    for m in modes:
        if m in KERNEL_MODES:
            rows.append([f"`{m}`", "none: the kernel (conntrack and nftables state, not "
                         "measured)", "–"])
            continue
        mem = results.memory.get(m)
        if not mem:
            rows.append([f"`{m}`", "missing", "–"])
            continue
        rss = {k: max(x.get(k, 0.0) for x in mem) for k in mem[0]}
        total = max(sum(x.values()) for x in mem)
        rows.append([f"`{m}`", ", ".join(f"{k} {v:.1f}" for k, v in rss.items()),
                     f"{total:.1f}"])
    return ["Balancer memory: VmRSS of its processes after the run (MiB, max over runs; the "
            "sum counts pages the processes share once per process):", "",
            *table(["mode", "processes", "sum"], rows, left=2)]


def loaded_table(results: Results, seconds: int) -> list[str]:
    names = [m for m in MODE_CLASSES if issubclass(MODE_CLASSES[m], Loaded)
             and any(k[0] == m for k in results.usage)]
    out = ["What loaded spends, by its own counters (per measurement window, median over "
           "runs; packets counted by the kernel's queues, a GSO super-packet once; CPU from "
           "/proc/PID/stat):", "",
           "| mode | workload | IP | packets/s through the queues | worker CPU s / M queued "
           "packets | of which in the kernel | workers busy (cores: sum = w0 + w1) | "
           "supervisor CPU s | queue drops |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        for key in LOADS:
            for fam in FAMILIES:
                us = results.usage.get((name, fam, key), [])
                if not us:
                    continue
                pps = statistics.median(u.packets / seconds for u in us)
                per_m = [u.worker_cpu / u.packets * 1e6 for u in us if u.packets]
                kernel = [u.worker_system / u.worker_cpu for u in us if u.worker_cpu]
                # The run with the median total (upper one of two), with its split.
                mid = sorted(us, key=lambda u: u.worker_cpu)[len(us) // 2]
                split = " + ".join(f"{w / seconds:.2f}" for w in mid.worker_split)
                sup = statistics.median(u.supervisor_cpu for u in us)
                drops = sum(u.queue_drops for u in us)
                out.append(
                    f"| `{name}` | {METRICS[key][0]} | v{fam} | {pps:,.0f} | "
                    + (f"{statistics.median(per_m):.1f} | " if per_m else "– | ")
                    + (f"{statistics.median(kernel):.0%} | " if kernel else "– | ")
                    + f"{mid.worker_cpu / seconds:.2f} = {split} | {sup:.2f} | {drops} |")
    for name in names:
        if batch := results.batch.get(name):
            out += ["", f"`{name}` packets per burst (one recv loop, one verdict sendmsg), "
                    f"over each whole run: {', '.join(f'{b:.2f}' for b in batch)}."]
    return out


CHART_COLORS = {"direct": "#9e9e9e", "haproxy": "#e69f00", "loaded": "#0072b2",
                "loaded-conntrack": "#009e73"}


def write_chart(results: Results, modes: tuple[str, ...], path: Path, title: str) -> str | None:
    """Grouped bars of the ratio to nft-dnat (median, min–max error bars), one panel
    per family; returns why not, if no chart was written."""
    if "nft-dnat" not in modes:
        return "no chart: it needs nft-dnat among the modes"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no chart: matplotlib is not installed (.venv/bin/pip install -e '.[bench]')"
    shown = [m for m in modes if m != "nft-dnat"]
    width = 0.8 / max(1, len(shown))
    fig, axes = plt.subplots(1, len(FAMILIES), figsize=(11, 4.6), sharey=True)
    top = 1.2
    for ax, fam in zip(axes, FAMILIES, strict=True):
        target_label: str | None = "target"
        for i, m in enumerate(shown):
            color = CHART_COLORS.get(m, f"C{i}")
            for j, key in enumerate(LOADS):
                x = j - 0.4 + width * (i + 0.5)
                r = results.ratios(m, fam, key)
                if not r:
                    ax.text(x, 0.03, "missing", rotation=90, ha="center", va="bottom",
                            fontsize=8, color=color)
                    ax.bar(x, 0, width, color=color, label=m if j == 0 else None)
                else:
                    med = statistics.median(r)
                    ax.bar(x, med, width, color=color, label=m if j == 0 else None,
                           yerr=[[med - min(r)], [max(r) - med]], capsize=3,
                           error_kw={"elinewidth": 1, "ecolor": "black"})
                    top = max(top, max(r) + 0.1)
                if (target := TARGETS.get(m, {}).get(key)) is not None:
                    ax.hlines(target, x - width / 2, x + width / 2, colors="black",
                              linestyles="dashed", linewidth=1.5, label=target_label)
                    target_label = None
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(LOADS)), ["keep-alive req/s", "new conn/s", "bulk Gbit/s"])
        ax.set_title(f"IPv{fam}")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("÷ nft-dnat of the same run (1.0 = nft-dnat)")
    axes[0].set_ylim(0, top)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), frameon=False,
               bbox_to_anchor=(0.5, 0.93))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.88))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def report(results: Results, settings: Settings, command: str, mach: dict[str, str],
           elapsed: float, chart: Path | None) -> str:
    """The markdown section: set-up, the tables, and whatever went wrong."""
    modes = settings.modes
    spread = (f"spread over {settings.clients} client addresses by an SNAT rule in the "
              "client namespace, as wrk cannot bind a source address"
              if settings.clients > 1 else "from one client address")
    out = [
        SECTION,
        "",
        f"Machine: {mach['nproc']} cores ({mach['cpu']}, a virtual machine shared with other "
        f"work), {mach['mem']} RAM, {mach['os']}, kernel {mach['kernel']}, Python "
        f"{mach['python']}; {mach['tools']}. Load average (1, 5, 15 min) at start "
        f"{mach['load']}, at the end {mach['load_end']} (expect noise: ratios to nft-dnat of "
        "the same run are the robust numbers).",
        "",
        f"Command: `{command}` ({settings.runs} run(s), {settings.seconds} s per wrk/iperf3 "
        f"measurement, {settings.ping_count} pings and TCP exchanges, took "
        f"{elapsed / 60:.1f} min). To reproduce, as root on Debian 12: `./run setup && "
        ".venv/bin/pip install -e '.[bench]'`, then the command (it installs nginx, wrk, "
        "iperf3, haproxy and nftables with apt when missing; `--quick` for 2 runs of 3 s, "
        "`--modes` for a subset).",
        "",
        "Modes (each in a fresh lab; order rotated between runs):",
        "",
        *(f"- `{m}`: {MODE_DESCRIPTIONS[m]}" for m in modes),
        "",
        f"Load: `wrk -t1 -c{settings.conns} -d{settings.seconds}s` (HTTP {spread}); "
        f"`-H 'Connection: close'` for new connections; `iperf3 -t {settings.seconds}`, one "
        f"stream, one client address; `ping -i 0.01 -c {settings.ping_count}` on an idle lab; "
        f"TCP RTT: {settings.ping_count} HTTP requests 10 ms apart on one kept-alive "
        "connection (TCP_NODELAY) from a Python client, each timed from the send to the last "
        "byte of the answer (the first, with the connection set-up, not counted): a round "
        "trip through the balancer plus nginx's and the client's handling, the same in every "
        "mode. "
        + ("With `haproxy` the VIP is a local address of lb, so lb itself answers the pings "
           "(they do not reach a backend) and only the TCP RTT compares. "
           if "haproxy" in modes else "")
        + "Backends: nginx (1 worker, static 3-byte body, keepalive_requests 100000) and "
        "iperf3 on b1 and b2. Median over runs (min–max); ratios are mode ÷ nft-dnat of the "
        "same run, median (min–max).",
        "",
    ]
    if chart is not None:
        rel = os.path.relpath(chart, DOC.parent)
        out += [f"![Ratio to nft-dnat per mode]({rel})", "",
                f"`{rel}`: throughput of each mode ÷ nft-dnat of the same run (bars: median, "
                "whiskers: min–max over runs; dashed: the targets of loaded's two data "
                "paths; line at 1.0: nft-dnat).", ""]
    out += [*results_table(results, modes)]
    if missing := missing_lines(results, modes):
        out += ["", *missing]
    if "nft-dnat" in modes:
        out += ["", *ratios_table(results, modes)]
        out += ["", *reference_table(results, modes)]
    out += ["", *cost_tables(results, modes)]
    out += ["", *memory_table(results, modes)]
    if results.usage:
        out += ["", *loaded_table(results, settings.seconds)]
    seen = [f"{m} v{f}: {', '.join(sorted(s))}" for (m, f), s in sorted(results.seen.items())]
    if seen:
        out += ["", "Backends answering 8 check requests before the load: " + "; ".join(seen)
                + "."]
    if results.notes:
        out += ["", "Anomalies during the run:", ""]
        out += [f"- {n}" for n in results.notes[:40]]
        if len(results.notes) > 40:
            out.append(f"- ... and {len(results.notes) - 40} more")
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
                    help="2 runs, 3 s measurements, 100 pings (~4.5 min for all modes)")
    ap.add_argument("--runs", type=int, help="runs per cell (default 3; --quick: 2)")
    ap.add_argument("--seconds", type=int, help="length of each wrk/iperf3 measurement "
                    "(default 5; --quick: 3)")
    ap.add_argument("--pings", type=int, default=200, help="pings per cell (default 200)")
    ap.add_argument("--conns", type=int, default=20, help="wrk connections (default 20)")
    ap.add_argument("--clients", type=int, default=4,
                    help="client addresses HTTP is spread over, 1..4 (default 4)")
    ap.add_argument("--modes", default=",".join(MODES),
                    help=f"comma-separated subset of {','.join(MODES)}")
    ap.add_argument("--no-doc", action="store_true",
                    help=f"do not write {DOC.relative_to(REPO)} nor {CHART.relative_to(REPO)}")
    ap.add_argument("--chart", type=Path,
                    help=f"write the chart here (default {CHART.relative_to(REPO)}, "
                    "none with --no-doc)")
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
          f"bench_lab: {', '.join(TOOLS)} already installed", file=sys.stderr)

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

    chart: Path | None = None
    chart_path = args.chart or (None if args.no_doc else CHART)
    if chart_path is not None:
        title = (f"bench_lab.py: {settings.runs} run(s) of {settings.seconds} s, "
                 f"{mach['nproc']} shared cores, kernel {mach['kernel']}, "
                 f"{time.strftime('%Y-%m-%d')}")
        try:
            why_not = write_chart(results, modes, chart_path, title)
        except Exception as e:  # a chart must not cost the tables of a long run
            why_not = f"no chart: {e!r}"
        if why_not is None:
            chart = chart_path
            print(f"bench_lab: wrote {chart_path}", file=sys.stderr)
        else:
            results.notes.append(why_not)
            print(f"bench_lab: {why_not}", file=sys.stderr)
    text = report(results, settings, command.strip(), mach, elapsed, chart)
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
            "cost": {f"{m}/v{f}/{k}": [c.__dict__ for c in cs]
                     for (m, f, k), cs in results.cost.items()},
            "memory": results.memory, "batch": results.batch, "notes": results.notes,
            "missing": results.missing,
        }
        args.json.write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
