"""New clients: what a balancer pays for clients it has never seen.

Every client of the other benchmarks is one of four addresses, so after four first
packets nothing reaches loaded's user space. Here every client is new. For each
step (a family, a SYN rate, a mode) a fresh lab is built (bench_lab.py's: client
``cl``, router ``rt``, balancer host ``lb``, two backends running nginx on port 80)
and, while the mode balances the VIP:

- **a SYN flood** from ``--sources`` distinct source addresses (IPv4 from
  198.18.64.0/18, 198.18.128.0/17, 198.19.64.0/18, 198.19.128.0/17; IPv6 from
  2001:db8:8000::/33, one per /64): a generated capture of one TCP SYN to VIP:80
  per source, replayed by ``tcpreplay`` on the client's link (``cl`` eth0, frames
  addressed to the router's MAC on that link) at each ``--rates`` rate, each source
  once. The router sends the backends' SYN-ACKs for those prefixes back to ``cl``,
  which drops them (they are not its addresses and it does not forward): nothing
  leaves the namespaces, nothing answers with a reset.
- **first-time legitimate clients** during the flood: ``--legit-rate`` HTTP/1.0
  requests per second, each from a fresh address of an AnyIP prefix of ``cl``
  (``ip route add local 198.18.16.0/20 dev lo``, ``2001:db8:a::/116``; IPv6
  binds need ``IP_FREEBIND``), each timed from ``connect`` to the last byte of
  nginx's answer (timeout 3 s: a SYN lost once still counts, at about 1 s).

Figures per mode, family and rate: the SYN rate ``tcpreplay`` achieved, the
fraction of SYNs delivered (counted by an nftables counter in each backend's
namespace), the daemon's CPU per new client (user and system time of the
supervisor and every process below it, from ``/proc/PID/stat`` before and after;
the supervisor's share apart), the kernel's queue drops (``nfnetlink_queue`` of
lb's namespace), and the legitimate clients' successes and p50/p99; ratios to
``nft-numgen`` of the same run. CPU per new client divides by the clients served
(flood SYNs delivered plus legitimate connections that succeeded). ``--json``
also keeps the whole machine's busy time and tcpreplay's own CPU per step.

Modes (all of lb's set-up is bench_lab.py's):

- ``nft-numgen``        kernel only: lb routes and DNATs the VIP by an nftables
                        ``numgen inc`` map (bench_lab.py's ``nft-dnat``)
- ``conntrack-rr``      the daemon, default data path (conntrack), ``strategy=rr``
- ``conntrack-maglev``  the same with ``strategy=maglev``
- ``perpacket``         the daemon, ``datapath=perpacket``, ``strategy=rr``

    sudo .venv/bin/python bench/bench_newclients.py             # the full run, ~4 min
    sudo .venv/bin/python bench/bench_newclients.py --seconds 3 --sources 5000 --no-doc
    sudo .venv/bin/python bench/bench_newclients.py --modes nft-numgen,conntrack-rr \\
        --families 4 --rates 10000,top --json /tmp/nc.json --no-doc

Needs root. Installs tcpreplay, nginx, iperf3 and nftables with apt when missing.
Every process it starts is bounded in time (``timeout``, a watchdog over the whole
run) and killed with its lab; all traffic and every rule stay inside the lab's
namespaces. By default the section "New clients" of docs/benchmarks.md is written
(a table and a text chart); ``--no-doc`` leaves the file alone.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import bench_lab as bl
from loaded.lab.balancer import kernel_queues
from loaded.lab.netns import netns_socket, read_proc_net, run_in_netns
from loaded.lab.topology import Lab

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
SECTION = "## New clients"
# Where the section goes when the document has none yet: before the first of these.
SECTION_BEFORE = ("## The core, one core, no kernel",)

HTTP_PORT = bl.HTTP_PORT
FAMILIES = (4, 6)
DEFAULT_RATES = "5000,20000,top"
DEFAULT_SOURCES = 50_000
DEFAULT_SECONDS = 10
DEFAULT_LEGIT_RATE = 100
LEGIT_TIMEOUT = 3.0  # one lost SYN (retransmitted after 1 s) still succeeds

# Flood sources: prefixes the router sends back to the client namespace.
FLOOD4 = ("198.18.128.0/17", "198.19.128.0/17", "198.18.64.0/18", "198.19.64.0/18")
FLOOD6 = "2001:db8:8000::/33"
# First-time legitimate clients: AnyIP prefixes of the client namespace.
LEGIT4 = "198.18.16.0/20"
LEGIT6 = "2001:db8:a::/116"
MAX_SOURCES4 = sum(ipaddress.ip_network(n).num_addresses - 2 for n in FLOOD4)
MAX_SOURCES6 = 1 << 31

COUNTER_TABLE = "bench_newclients"
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)

# Tool on PATH -> the Debian package that provides it.
TOOLS = {"tcpreplay": "tcpreplay", "nginx": "nginx", "iperf3": "iperf3", "nft": "nftables",
         "timeout": "coreutils"}


# ----------------------------------------------------------------------- modes


class NftNumgen(bl.NftDnat):
    name = "nft-numgen"
    description = ("kernel only: lb routes and DNATs the VIP with nftables `dnat to numgen "
                   "inc mod 2 map` (bench_lab.py's `nft-dnat`), conntrack un-NATs the replies")


class Daemon(bl.LoadedConntrack):
    """bench_lab.py's daemon start-up (config, `timeout`, waiting for its workers),
    with this mode's data path and strategy in the config."""

    DATAPATH = "conntrack"
    STRATEGY: ClassVar[str] = "rr"
    NFQ_LEN: ClassVar[int | None] = None  # the data path's default

    def daemon_argv(self, conf: Path) -> list[str]:
        # bench_lab wrote `conf` with the data path only; the same plus the strategy.
        # No saved client table: every lab starts with none and a stop need not write
        # tens of thousands of clients.
        self.lab.write_config(conf, FIRST_CORE=0, LAST_CORE=1, datapath=self.DATAPATH,
                              strategy=self.STRATEGY, persist_clients="no",
                              nfq_len=self.NFQ_LEN)
        return super().daemon_argv(conf)

    def supervisor(self) -> int | None:
        try:
            return self.supervisor_pid()
        except AssertionError:
            return None


class ConntrackRR(Daemon):
    name = "conntrack-rr"
    description = ("the daemon, default data path (`datapath=conntrack`), `strategy=rr`, "
                   "FIRST_CORE=0 LAST_CORE=1 (2 workers), the lab's config otherwise "
                   "(`fail_open=hash` and so a queue of 256, both defaults)")


class ConntrackRRLongQueue(Daemon):
    name = "conntrack-rr-q4096"
    description = ("conntrack-rr with `nfq_len=4096` (the default before 0.4): a flood "
                   "waits in the queue instead of reaching the kernel's table")
    NFQ_LEN = 4096


class ConntrackMaglev(Daemon):
    name = "conntrack-maglev"
    description = "the same with `strategy=maglev` (table_size default)"
    STRATEGY = "maglev"


class PerPacket(Daemon):
    name = "perpacket"
    description = "the same with `datapath=perpacket`, `strategy=rr`"
    DATAPATH = "perpacket"


# name -> a new instance, given the lifetime (s) of the processes it may start
MODES: dict[str, Callable[[int], bl.Mode]] = {
    "nft-numgen": lambda lifetime: NftNumgen(),
    "conntrack-rr": ConntrackRR,
    "conntrack-rr-q4096": ConntrackRRLongQueue,
    "conntrack-maglev": ConntrackMaglev,
    "perpacket": PerPacket,
}
MODE_CLASSES: dict[str, type[bl.Mode]] = {
    c.name: c for c in (NftNumgen, ConntrackRR, ConntrackRRLongQueue, ConntrackMaglev,
                        PerPacket)}
BASE = "nft-numgen"


# ---------------------------------------------------------------- installation


def ensure_tools() -> list[str]:
    """apt-get install what is missing (bench_lab's installer, this bench's tools)."""
    return bl.ensure_tools(TOOLS, "bench_newclients")


# ------------------------------------------------------------------ the capture


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def flood_sources(family: int, n: int) -> Iterator[bytes]:
    """`n` distinct packed source addresses of the flood prefixes."""
    if family == 4:
        if n > MAX_SOURCES4:
            raise ValueError(f"at most {MAX_SOURCES4} IPv4 sources")
        left = n
        for net in FLOOD4:
            first = int(ipaddress.IPv4Network(net).network_address) + 1
            count = min(left, ipaddress.IPv4Network(net).num_addresses - 2)
            for a in range(first, first + count):
                yield struct.pack("!I", a)
            left -= count
            if not left:
                return
    else:
        # One per /64 (2001:db8:8000:0::1, 2001:db8:8000:1::1, ...), should a
        # balancer ever key IPv6 clients by their /64.
        base = int(ipaddress.IPv6Network(FLOOD6).network_address)
        for i in range(n):
            yield ((base | (i << 64) | 1).to_bytes(16, "big"))


# (family, sources) -> IP packets (no link layer), built once per run
_PACKETS: dict[tuple[int, int], list[bytes]] = {}


def flood_packets(family: int, n: int, vip: str) -> list[bytes]:
    """One TCP SYN (MSS option) to vip:80 from each of `n` sources, random source
    ports and sequence numbers (fixed seed: the same capture in every mode)."""
    key = (family, n)
    if key in _PACKETS:
        return _PACKETS[key]
    rng = random.Random(11 * family + n)
    dst = ipaddress.ip_address(vip).packed
    out: list[bytes] = []
    for i, src in enumerate(flood_sources(family, n)):
        sport = rng.randrange(1024, 65536)
        seq = rng.getrandbits(32)
        # data offset 6 words (MSS option), SYN, window 64240
        tcp = struct.pack("!HHIIBBHHH", sport, HTTP_PORT, seq, 0, 6 << 4, 0x02, 64240, 0, 0)
        tcp += b"\x02\x04\x05\xb4"
        if family == 4:
            pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp))
            tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), i & 0xFFFF, 0x4000, 64,
                             6, 0, src, dst)
            ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
        else:
            pseudo = src + dst + struct.pack("!IxxxB", len(tcp), 6)
            tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
            ip = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), 6, 64, src, dst)
        out.append(ip + tcp)
    _PACKETS[key] = out
    return out


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def write_pcap(path: Path, dst_mac: str, src_mac: str, family: int,
               packets: list[bytes]) -> None:
    """A classic pcap (Ethernet) of `packets`, 10 µs apart (tcpreplay paces them itself)."""
    eth = mac_bytes(dst_mac) + mac_bytes(src_mac) + struct.pack(
        "!H", 0x0800 if family == 4 else 0x86DD)
    parts = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    for i, p in enumerate(packets):
        us = i * 10
        frame = eth + p
        parts.append(struct.pack("<IIII", us // 1_000_000, us % 1_000_000, len(frame),
                                 len(frame)))
        parts.append(frame)
    path.write_bytes(b"".join(parts))


# -------------------------------------------------------------- lab additions


def link_mac(lab: Lab, ns: str, ifname: str) -> str:
    r = lab.run(ns, ["ip", "-j", "link", "show", "dev", ifname], timeout=10, check=True)
    mac = json.loads(r.stdout)[0]["address"]
    assert isinstance(mac, str)
    return mac


def ip_cmd(lab: Lab, ns: str, *args: str) -> None:
    r = lab.run(ns, ["ip", *args], timeout=10)
    if r.returncode != 0:
        raise bl.BenchError(f"ip {' '.join(args)} in {ns}: {r.stderr.strip()}")


def prepare_new_clients(lab: Lab) -> None:
    """Routes for the flood's and the legitimate clients' prefixes, the AnyIP
    prefixes in the client namespace, and a SYN counter in every backend."""
    hop4, hop6 = lab.clients4[0], lab.clients6[0]  # cl's own addresses on its link
    ip_cmd(lab, "cl", "route", "add", "local", LEGIT4, "dev", "lo")
    ip_cmd(lab, "cl", "-6", "route", "add", "local", LEGIT6, "dev", "lo")
    for net in (*FLOOD4, LEGIT4):
        ip_cmd(lab, "rt", "route", "add", net, "via", hop4, "dev", lab.rt_client_nic)
    for net in (FLOOD6, LEGIT6):
        ip_cmd(lab, "rt", "-6", "route", "add", net, "via", hop6, "dev", lab.rt_client_nic)
    ruleset = f"""\
table inet {COUNTER_TABLE} {{
  counter flood {{ }}
  counter legit {{ }}
  chain pre {{
    type filter hook prerouting priority raw; policy accept;
    tcp dport {HTTP_PORT} tcp flags & (fin | syn | rst | ack) == syn jump syn
  }}
  chain syn {{
    ip saddr {{ {", ".join(FLOOD4)} }} counter name "flood" return
    ip6 saddr {FLOOD6} counter name "flood" return
    ip saddr {LEGIT4} counter name "legit" return
    ip6 saddr {LEGIT6} counter name "legit" return
  }}
}}
"""
    for b in lab.backends:
        bl.nft_load(lab, b.name, ruleset, f"counters-{b.name}.nft")


def backend_syns(lab: Lab) -> tuple[int, int]:
    """(flood SYNs, legitimate SYNs) that reached the backends so far."""
    flood = legit = 0
    for b in lab.backends:
        r = lab.run(b.name, ["nft", "-j", "list", "counters", "table", "inet", COUNTER_TABLE],
                    timeout=10)
        if r.returncode != 0:
            raise bl.BenchError(f"reading the counters of {b.name}: {r.stderr.strip()}")
        for item in json.loads(r.stdout).get("nftables", []):
            c = item.get("counter")
            if c and c.get("name") == "flood":
                flood += int(c["packets"])
            elif c and c.get("name") == "legit":
                legit += int(c["packets"])
    return flood, legit


class NetDev:
    """A namespace's /proc/net/dev, opened once inside it and re-read cheaply
    (a seq_file regenerates on every read from offset 0)."""

    def __init__(self, lab: Lab, ns: str) -> None:
        self.fd = run_in_netns(lab.ns(ns), lambda: os.open("/proc/thread-self/net/dev",
                                                            os.O_RDONLY | os.O_CLOEXEC))

    def close(self) -> None:
        os.close(self.fd)

    def packets(self, ifname: str, column: int) -> int:
        """Column 0: received packets, column 8: sent packets."""
        for line in os.pread(self.fd, 1 << 16, 0).decode().splitlines()[2:]:
            name, _, counters = line.partition(":")
            if name.strip() == ifname:
                return int(counters.split()[1 + column])
        raise bl.BenchError(f"no {ifname} in /proc/net/dev")


RX, TX = 0, 8


def cl_absorbed(lab: Lab, family: int) -> tuple[int, int]:
    """(packets the client namespace dropped as not addressed to it, ICMP destination
    unreachables it sent): the backends' SYN-ACKs to the flood's sources end there."""
    if family == 6:
        values = dict(line.split() for line in
                      read_proc_net(lab.ns("cl"), "snmp6").splitlines() if line.strip())
        return int(values["Ip6InAddrErrors"]), int(values["Icmp6OutDestUnreachs"])
    rows: dict[str, dict[str, int]] = {}
    lines = read_proc_net(lab.ns("cl"), "snmp").splitlines()
    for head, vals in zip(lines[::2], lines[1::2], strict=False):
        proto = head.split(":")[0]
        rows[proto] = dict(zip(head.split()[1:], map(int, vals.split()[1:]), strict=False))
    return rows["Ip"]["InAddrErrors"], rows["Icmp"]["OutDestUnreachs"]


# ------------------------------------------------------------------ CPU counters


def proc_times(pid: int) -> tuple[float, float, float, float]:
    """(utime, stime, cutime, cstime) of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) / tick, int(fields[12]) / tick, int(fields[13]) / tick,
            int(fields[14]) / tick)


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it (children of each of its threads)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(x) for x in f.read().split()]
            except OSError:
                pass
    return out


@dataclass
class TreeCpu:
    """CPU seconds of a daemon's process tree at one moment."""

    supervisor: int
    # pid -> (user, system); the supervisor's include its reaped children's
    procs: dict[int, tuple[float, float]]

    @classmethod
    def read(cls, supervisor: int) -> TreeCpu:
        procs: dict[int, tuple[float, float]] = {}
        for pid in process_tree(supervisor):
            try:
                u, s, cu, cs = proc_times(pid)
            except OSError:
                continue  # exited meanwhile
            procs[pid] = (u + cu, s + cs) if pid == supervisor else (u, s)
        return cls(supervisor, procs)


@dataclass
class DaemonCpu:
    """What the daemon spent over a window, seconds."""

    user: float
    system: float
    supervisor_user: float
    supervisor_system: float
    processes: int
    changed: bool  # processes came or went during the window


def cpu_delta(a: TreeCpu, b: TreeCpu) -> DaemonCpu:
    user = system = 0.0
    for pid, (u1, s1) in b.procs.items():
        u0, s0 = a.procs.get(pid, (0.0, 0.0))  # a process new in the window: all of it
        user += u1 - u0
        system += s1 - s0
    su0, ss0 = a.procs.get(a.supervisor, (0.0, 0.0))
    su1, ss1 = b.procs.get(b.supervisor, (su0, ss0))
    return DaemonCpu(user, system, su1 - su0, ss1 - ss0, len(b.procs),
                     set(a.procs) != set(b.procs))


def queue_counters(lab: Lab) -> dict[int, tuple[int, int, int]]:
    """Per queue: (packets queued so far, dropped (queue full + user), waiting now)."""
    return {q: (v["id_sequence"], v["queue_dropped"] + v["user_dropped"], v["waiting"])
            for q, v in kernel_queues(lab).items()}


# ------------------------------------------------------------- legitimate clients


def legit_addresses(family: int) -> list[str]:
    net = ipaddress.ip_network(LEGIT4 if family == 4 else LEGIT6)
    return [str(a) for a in list(net.hosts())[:4000]]


@dataclass
class LegitStats:
    attempted: int = 0
    ok: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    backends: dict[str, int] = field(default_factory=dict)

    @property
    def p50(self) -> float | None:
        return statistics.median(self.latencies_ms) if self.latencies_ms else None

    @property
    def p99(self) -> float | None:
        return (bl.percentile(sorted(self.latencies_ms), 0.99) if self.latencies_ms
                else None)


class LegitClients:
    """HTTP/1.0 requests to the VIP at a steady rate, each from a fresh address of
    the AnyIP prefix, until stopped; each bounded by LEGIT_TIMEOUT."""

    def __init__(self, lab: Lab, family: int, vip: str, rate: float) -> None:
        self.ns = lab.ns("cl")
        self.family = socket.AF_INET if family == 4 else socket.AF_INET6
        self.vip = vip
        self.interval = 1.0 / rate
        self.addresses = legit_addresses(family)
        self.stats = LegitStats()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="legit")
        self._futures: list[Future[None]] = []
        self._thread = threading.Thread(target=self._pace, name="legit-pacer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> LegitStats:
        """No new requests; wait for those under way (each ends within its timeout)."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(LEGIT_TIMEOUT + 2)
        for f in self._futures:
            with contextlib.suppress(Exception):
                f.result(LEGIT_TIMEOUT + 2)
        self._pool.shutdown(wait=True)
        return self.stats

    def _pace(self) -> None:
        next_t = time.monotonic()
        for addr in self.addresses:
            if self._stop.wait(max(0.0, next_t - time.monotonic())):
                return
            self._futures.append(self._pool.submit(self._one, addr))
            next_t += self.interval

    def _one(self, src: str) -> None:
        with self._lock:
            self.stats.attempted += 1
        try:
            with netns_socket(self.ns, self.family) as s:
                # An IPv6 AnyIP address cannot be bound without it (IPv4 can).
                s.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
                s.bind((src, 0))
                deadline = time.monotonic() + LEGIT_TIMEOUT
                t0 = time.perf_counter()
                s.settimeout(LEGIT_TIMEOUT)
                s.connect((self.vip, HTTP_PORT))
                s.sendall(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
                data = b""
                while True:
                    s.settimeout(max(0.001, deadline - time.monotonic()))
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                took = (time.perf_counter() - t0) * 1000
            head, _, body = data.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise bl.BenchError(f"bad answer {head[:40]!r}")
        except (OSError, bl.BenchError) as e:
            kind = type(e).__name__
            with self._lock:
                self.stats.errors[kind] = self.stats.errors.get(kind, 0) + 1
            return
        name = body.decode(errors="replace").strip()
        with self._lock:
            self.stats.ok += 1
            self.stats.latencies_ms.append(took)
            self.stats.backends[name] = self.stats.backends.get(name, 0) + 1


# ---------------------------------------------------------------------- a step


@dataclass(frozen=True)
class Settings:
    modes: tuple[str, ...]
    families: tuple[int, ...]
    rates: tuple[int | None, ...]  # packets/s; None: as fast as tcpreplay can
    sources: int
    seconds: int  # bound on each flood
    legit_rate: float
    runs: int

    def count(self, rate: int | None) -> int:
        """SYNs (= distinct sources) of one flood."""
        return self.sources if rate is None else min(self.sources, rate * self.seconds)

    def estimate(self) -> float:
        """Seconds the whole run should take (fitted here: a step costs about 6 s
        besides its flood: lab, servers, daemon, the idle second, drain, teardown)."""
        per_family = sum(6 + min(self.seconds, self.count(r) / (r or 40_000))
                         for r in self.rates)
        return self.runs * len(self.modes) * len(self.families) * per_family


def rate_label(rate: int | None) -> str:
    return "top" if rate is None else f"{rate / 1000:g}k"


@dataclass
class Step:
    mode: str
    family: int
    rate: str
    run: int
    sent: int = 0
    failed: int = 0
    send_seconds: float = 0.0
    achieved_pps: float = 0.0
    at_lb: int = 0  # packets lb received on pub0 in the window (flood and legit)
    delivered: int = 0  # flood SYNs counted on the backends
    legit_syns: int = 0
    absorbed: int = 0  # packets cl dropped as not its own (the SYN-ACKs to the flood)
    window: float = 0.0  # seconds from before the flood to the end of the drain
    drain: float = 0.0
    # from the flood's first packets at lb to lb's last packet to the backends
    delivery_seconds: float | None = None
    idle_cpu_per_s: float | None = None  # the daemon's CPU at rest, s/s, before the flood
    queued: int | None = None
    queue_drops: int | None = None
    daemon: DaemonCpu | None = None
    # Busy seconds of all cores in the window, and tcpreplay's own CPU: only in the
    # JSON, as tcpreplay's pacing (a loop of system calls) and the kernel's
    # forwarding, which mostly runs inside its send calls, cannot be told apart.
    machine_busy: float = 0.0
    replay_user: float = 0.0
    replay_system: float = 0.0
    legit: LegitStats = field(default_factory=LegitStats)
    notes: list[str] = field(default_factory=list)

    @property
    def new_clients(self) -> int:
        """New clients served: flood SYNs delivered to a backend and legitimate
        connections that succeeded (those the balancer dropped cost it nothing or
        little: a full queue drops in the kernel)."""
        return self.delivered + self.legit.ok

    def per_client_us(self, seconds: float) -> float | None:
        return seconds / self.new_clients * 1e6 if self.new_clients else None

    @property
    def delivered_pps(self) -> float | None:
        return self.delivered / self.delivery_seconds if self.delivery_seconds else None

    @property
    def delivered_fraction(self) -> float | None:
        return self.delivered / self.sent if self.sent else None


_TCPREPLAY_ACTUAL = re.compile(r"Actual: (\d+) packets \(\d+ bytes\) sent in ([\d.]+) seconds")
_TCPREPLAY_RATED = re.compile(r"Rated: [\d.]+ Bps, [\d.]+ Mbps, ([\d.]+) pps")
_TCPREPLAY_FAILED = re.compile(r"Failed packets:\s+(\d+)")


def replay(lab: Lab, pcap: Path, count: int, rate: int | None, seconds: int
           ) -> tuple[int, float, float, int]:
    """tcpreplay on cl's link; (sent, seconds, packets/s, failed)."""
    pace = ["--topspeed"] if rate is None else [f"--pps={rate}"]
    bound = seconds + 10
    argv = ["timeout", "-s", "KILL", str(bound), "tcpreplay", "-i", lab.client_nic,
            "--preload-pcap", "--no-flow-stats", f"--limit={count}",
            f"--duration={seconds + 1}", *pace, str(pcap)]
    r = lab.run("cl", argv, timeout=bound + 5)
    out = r.stdout + r.stderr
    actual, rated = _TCPREPLAY_ACTUAL.search(out), _TCPREPLAY_RATED.search(out)
    if r.returncode != 0 or actual is None or rated is None:
        raise bl.BenchError(f"tcpreplay failed ({r.returncode}): {out.strip()[-400:]}")
    failed = _TCPREPLAY_FAILED.search(out)
    return (int(actual.group(1)), float(actual.group(2)), float(rated.group(1)),
            int(failed.group(1)) if failed else 0)


class FloodWatch:
    """Notes when the flood reaches lb (its pub0 has received FLOOD_SEEN packets more
    than at the start) and then starts the legitimate clients: a thread that polls
    every 2 ms until then or until stopped."""

    FLOOD_SEEN = 20

    def __init__(self, dev: NetDev, ifname: str, on_start: Callable[[], None]) -> None:
        self.dev, self.ifname, self.on_start = dev, ifname, on_start
        self.base = dev.packets(ifname, RX)
        self.started: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flood-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            if self.dev.packets(self.ifname, RX) - self.base >= self.FLOOD_SEEN:
                self.started = time.monotonic()
                self.on_start()
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def drain(lab: Lab, mode: bl.Mode, dev: NetDev, timeout: float = 10.0) -> tuple[float, float]:
    """Wait until lb has sent nothing to the backends for 0.5 s and the queues are
    empty (SYNs still queued when the flood ends are delivered meanwhile).
    Returns (seconds waited, when lb last sent to the backends)."""
    t0 = time.monotonic()
    last, last_change = dev.packets(lab.priv_nic, TX), t0
    while time.monotonic() - t0 < timeout:
        time.sleep(0.02)
        now = dev.packets(lab.priv_nic, TX)
        waiting = (sum(w for _, _, w in queue_counters(lab).values())
                   if isinstance(mode, Daemon) else 0)
        if now != last:
            last, last_change = now, time.monotonic()
        elif not waiting and time.monotonic() - last_change >= 0.5:
            break
    return time.monotonic() - t0, last_change


IDLE_SECONDS = 1.0


def measure_step(step: Step, mode: bl.Mode, lab: Lab, family: int, rate: int | None,
                 settings: Settings) -> None:
    vip = mode.target(family)
    bl.wait_for(f"{mode.name} to answer on {vip}", lambda: bl.answers(lab, vip), timeout=10)
    count = settings.count(rate)
    pcap = bl.lab_dir(lab) / f"flood-v{family}.pcap"
    write_pcap(pcap, link_mac(lab, "rt", lab.rt_client_nic), link_mac(lab, "cl", lab.client_nic),
               family, flood_packets(family, count, vip))
    supervisor = mode.supervisor() if isinstance(mode, Daemon) else None
    if isinstance(mode, Daemon) and supervisor is None:
        raise bl.BenchError("the daemon's pid is not in its stats file")
    dev = NetDev(lab, "lb")
    try:
        # The daemon at rest, for the same time in every mode (it also lets the
        # fresh lab settle): what it spends without any client.
        idle0 = TreeCpu.read(supervisor) if supervisor else None
        t_idle = time.monotonic()
        time.sleep(IDLE_SECONDS)
        if supervisor and idle0 is not None:
            idle = cpu_delta(idle0, TreeCpu.read(supervisor))
            step.idle_cpu_per_s = (idle.user + idle.system) / (time.monotonic() - t_idle)
        flood(step, mode, lab, family, vip, pcap, count, rate, settings, supervisor, dev)
    finally:
        dev.close()
        pcap.unlink(missing_ok=True)


def flood(step: Step, mode: bl.Mode, lab: Lab, family: int, vip: str, pcap: Path, count: int,
          rate: int | None, settings: Settings, supervisor: int | None, dev: NetDev) -> None:
    """One flood with the legitimate clients during it, and what it cost."""
    flood0, legit0 = backend_syns(lab)
    absorbed0, unreach0 = cl_absorbed(lab, family)
    q0 = queue_counters(lab) if supervisor else {}
    rx0 = dev.packets(lab.pub_nic, RX)
    cpu0 = TreeCpu.read(supervisor) if supervisor else None
    busy0, _ = bl.machine_cpu()
    t0 = time.monotonic()
    legit = LegitClients(lab, family, vip, settings.legit_rate)
    try:
        # The legitimate clients start when the flood reaches lb (tcpreplay loads
        # the capture first) and stop when tcpreplay is done.
        watch = FloodWatch(dev, lab.pub_nic, legit.start)
        # tcpreplay (under `timeout`, under `ip netns exec`) is the only child
        # process that ends in this call: its CPU is the children's delta.
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            step.sent, step.send_seconds, step.achieved_pps, step.failed = replay(
                lab, pcap, count, rate, settings.seconds)
            ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            step.replay_user = ru1.ru_utime - ru0.ru_utime
            step.replay_system = ru1.ru_stime - ru0.ru_stime
        finally:
            watch.stop()
    finally:
        step.legit = legit.stop()
    step.drain, last_sent = drain(lab, mode, dev)
    cpu1 = TreeCpu.read(supervisor) if supervisor else None
    busy1, _ = bl.machine_cpu()
    step.window = time.monotonic() - t0
    rx1 = dev.packets(lab.pub_nic, RX)
    q1 = queue_counters(lab) if supervisor else {}
    flood1, legit1 = backend_syns(lab)
    absorbed1, unreach1 = cl_absorbed(lab, family)

    step.absorbed = absorbed1 - absorbed0
    if unreach1 > unreach0:
        step.notes.append(f"the client namespace sent {unreach1 - unreach0} ICMP "
                          "unreachables")
    step.delivered, step.legit_syns = flood1 - flood0, legit1 - legit0
    step.at_lb = rx1 - rx0
    if watch.started is not None and last_sent > watch.started:
        step.delivery_seconds = last_sent - watch.started
    step.machine_busy = busy1 - busy0
    if cpu0 is not None and cpu1 is not None:
        step.daemon = cpu_delta(cpu0, cpu1)
        if step.daemon.changed:
            step.notes.append(f"the daemon's processes changed during the flood "
                              f"({sorted(cpu0.procs)} -> {sorted(cpu1.procs)})")
    if supervisor:
        if set(q0) != set(q1) or any(q1[q][0] < q0[q][0] for q in q0):
            step.notes.append(f"a queue was rebound during the flood ({q0} -> {q1}): "
                              "no queue figures")
        else:
            step.queued = sum(q1[q][0] - q0[q][0] for q in q0)
            step.queue_drops = sum(q1[q][1] - q0[q][1] for q in q0)
    if step.failed:
        step.notes.append(f"tcpreplay could not send {step.failed} packets")
    if step.at_lb < step.sent:
        step.notes.append(f"only {step.at_lb} of {step.sent} flood packets reached lb")
    if step.drain >= 9.9:
        step.notes.append("the balancer had not drained 10 s after the flood")


def run_step(results: Results, name: str, family: int, rate: int | None, run: int,
             settings: Settings, lifetime: int) -> None:
    step = Step(name, family, rate_label(rate), run)
    lab_settings = bl.Settings(runs=1, seconds=1, ping_count=0, conns=1, clients=1, modes=())
    with bl.fresh_lab(lab_settings, lifetime) as lab:
        mode = MODES[name](lifetime)
        try:
            mode.start(lab)
            prepare_new_clients(lab)
            measure_step(step, mode, lab, family, rate, settings)
        except (bl.BenchError, OSError, subprocess.TimeoutExpired, ValueError) as e:
            step.notes.append(f"failed: {e}")
            step.sent = 0
        finally:
            step.notes += mode.stop()
    results.add(step)


# ---------------------------------------------------------------------- results


@dataclass
class Results:
    steps: list[Step] = field(default_factory=list)

    def add(self, step: Step) -> None:
        self.steps.append(step)
        where = f"{step.mode:17} v{step.family} {step.rate:>4}"
        if not step.sent:
            print(f"  {where}: {'; '.join(step.notes) or 'nothing sent'}", file=sys.stderr)
            return
        d = step.daemon
        cpu = (f"daemon {step.per_client_us(d.user):.1f}+{step.per_client_us(d.system):.1f} "
               f"µs/client" if d else "daemon –")
        p50, p99 = step.legit.p50, step.legit.p99
        print(f"  {where}: sent {step.sent} at {step.achieved_pps:,.0f}/s, delivered "
              f"{step.delivered} ({(step.delivered_fraction or 0):.1%}), {cpu}, queue drops "
              f"{step.queue_drops if step.queue_drops is not None else '–'}, legit "
              f"{step.legit.ok}/{step.legit.attempted} p50 {fmt_ms(p50)} p99 {fmt_ms(p99)} ms",
              file=sys.stderr)
        for n in step.notes:
            print(f"    {n}", file=sys.stderr)

    def get(self, mode: str, family: int, rate: str) -> list[Step]:
        return [s for s in self.steps
                if (s.mode, s.family, s.rate) == (mode, family, rate) and s.sent]

    def ratios(self, mode: str, family: int, rate: str,
               value: Callable[[Step], float | None]) -> list[float]:
        """Per run: mode's value / nft-numgen's of the same run and step."""
        out = []
        for s in self.get(mode, family, rate):
            for b in self.get(BASE, family, rate):
                if b.run == s.run:
                    x, y = value(s), value(b)
                    if x is not None and y:
                        out.append(x / y)
        return out


def fmt_ms(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def spread(values: list[float], f: Callable[[float], str]) -> str:
    if not values:
        return "–"
    m = statistics.median(values)
    if len(values) == 1:
        return f(m)
    return f"{f(m)} ({f(min(values))}–{f(max(values))})"


def with_ratio(text: str, ratios: list[float]) -> str:
    return f"{text} ({statistics.median(ratios):.2f}×)" if ratios and text != "–" else text


def cpu_values(steps: list[Step], pick: Callable[[DaemonCpu], float]) -> list[float]:
    out = []
    for s in steps:
        if s.daemon is not None and (v := s.per_client_us(pick(s.daemon))) is not None:
            out.append(v)
    return out


def flood_table(results: Results, settings: Settings, family: int) -> list[str]:
    head = ["SYN rate asked", "mode", "achieved SYN/s (÷ nft)", "delivered",
            "delivered SYN/s (÷ nft)", "queue drops",
            "daemon µs per new client: user + sys = total", "of which supervisor user + sys",
            "legit ok", "legit p50 ms (÷ nft)", "legit p99 ms (÷ nft)"]
    rows = []
    for rate in settings.rates:
        label = rate_label(rate)
        for m in settings.modes:
            steps = results.get(m, family, label)
            if not steps:
                rows.append([label if rate else "top speed", f"`{m}`", "missing", *["–"] * 8])
                continue

            def r(v: Callable[[Step], float | None], m: str = m, label: str = label
                  ) -> list[float]:
                return results.ratios(m, family, label, v) if m != BASE else []

            achieved = with_ratio(spread([s.achieved_pps for s in steps],
                                         lambda x: f"{x:,.0f}"), r(lambda s: s.achieved_pps))
            delivered = spread([s.delivered_fraction or 0.0 for s in steps],
                               lambda x: f"{x:.1%}")
            delivered_pps = with_ratio(
                spread([v for s in steps if (v := s.delivered_pps) is not None],
                       lambda x: f"{x:,.0f}"), r(lambda s: s.delivered_pps))
            drops = ("–" if m == BASE else
                     spread([float(s.queue_drops) for s in steps if s.queue_drops is not None],
                            lambda x: f"{x:,.0f}"))
            user = med(cpu_values(steps, lambda d: d.user))
            system = med(cpu_values(steps, lambda d: d.system))
            total = cpu_values(steps, lambda d: d.user + d.system)
            daemon = ("kernel only" if m == BASE else "–" if user is None or system is None
                      else f"{user:.1f} + {system:.1f} = {spread(total, lambda x: f'{x:.1f}')}")
            su = med(cpu_values(steps, lambda d: d.supervisor_user))
            ss = med(cpu_values(steps, lambda d: d.supervisor_system))
            sup = "–" if su is None or ss is None else f"{su:.1f} + {ss:.1f}"
            ok = ", ".join(f"{s.legit.ok}/{s.legit.attempted}" for s in steps)
            p50 = with_ratio(spread([v for s in steps if (v := s.legit.p50) is not None],
                                    lambda x: f"{x:.2f}"), r(lambda s: s.legit.p50))
            p99 = with_ratio(spread([v for s in steps if (v := s.legit.p99) is not None],
                                    lambda x: f"{x:.2f}"), r(lambda s: s.legit.p99))
            rows.append([label if rate else "top speed", f"`{m}`", achieved, delivered,
                         delivered_pps, drops,
                         daemon, sup, ok, p50, p99])
    return bl.table(head, rows)


def text_chart(results: Results, settings: Settings) -> list[str]:
    """Daemon CPU per new client as text bars: █ user, ░ system."""
    entries = []
    for family in settings.families:
        for rate in settings.rates:
            for m in settings.modes:
                if m == BASE:
                    continue
                steps = results.get(m, family, rate_label(rate))
                u = med(cpu_values(steps, lambda d: d.user))
                s = med(cpu_values(steps, lambda d: d.system))
                entries.append((f"v{family} {rate_label(rate):>4} {m}", u, s))
    if not entries:
        return []
    top = max([(u or 0) + (s or 0) for _, u, s in entries] + [1e-9])
    width = 50
    lines = ["```", "daemon CPU per new client, µs (█ user, ░ system; median over runs)"]
    for label, u, s in entries:
        if u is None or s is None:
            lines.append(f"{label:28} missing")
            continue
        nu, ns = round(u / top * width), round(s / top * width)
        lines.append(f"{label:28} {'█' * nu}{'░' * ns} {u + s:.1f} ({u:.1f} + {s:.1f})")
    lines.append("```")
    return lines


def report(results: Results, settings: Settings, command: str, mach: dict[str, str],
           elapsed: float) -> str:
    rates = ", ".join("as fast as tcpreplay sends (`--topspeed`)" if r is None else
                      f"{r:,}/s" for r in settings.rates)
    out = [
        SECTION,
        "",
        "What a balancer pays for clients it has never seen: a SYN flood from distinct "
        "sources and, during it, first-time legitimate clients (issue 11).",
        "",
        f"Machine: {mach['nproc']} cores ({mach['cpu']}, a virtual machine shared with other "
        f"work), {mach['mem']} RAM, {mach['os']}, kernel {mach['kernel']}, Python "
        f"{mach['python']}; {mach['tcpreplay']}. Load average (1, 5, 15 min) at start "
        f"{mach['load']}, at the end {mach['load_end']}.",
        "",
        f"Command: `{command}` ({settings.runs} run(s), took {elapsed / 60:.1f} min). As "
        "root on Debian 12 after `./run setup`; it installs tcpreplay, nginx, iperf3 and "
        "nftables with apt when missing.",
        "",
        "Modes (each step in a fresh lab: client, router, lb, two backends with nginx on "
        "port 80; mode order rotated from step to step):",
        "",
        *(f"- `{m}`: {MODE_CLASSES[m].description}" for m in settings.modes),
        "",
        "How each figure is got:",
        "",
        f"- Flood: one TCP SYN to VIP:80 from each of up to {settings.sources:,} distinct "
        "sources (IPv4 from 198.18.64.0/18, 198.18.128.0/17, 198.19.64.0/18, "
        "198.19.128.0/17; IPv6 one per /64 of 2001:db8:8000::/33), a generated capture "
        f"replayed once by tcpreplay on the client's link at {rates}; each flood is "
        f"min(sources, rate × {settings.seconds} s) SYNs, every one a client new to the "
        "balancer. The backends' SYN-ACKs are routed back to the client namespace and "
        "dropped there.",
        "- Achieved SYN/s: what tcpreplay sent. It also pays, in its send calls, the "
        "kernel's forwarding of each packet as far as the packet goes, so where a queue "
        "holds the packets it sends faster. Delivered SYN/s: the SYNs delivered over the "
        "time from the flood's first packets at lb to lb's last packet to the backends.",
        "- Delivered: SYNs counted by an nftables counter in the backends' namespaces.",
        "- Queue drops: `/proc/net/netfilter/nfnetlink_queue` of lb's namespace (queue "
        "full plus user drops).",
        "- Daemon CPU per new client: user and system time (`/proc/PID/stat`) of the "
        "supervisor (with its reaped children) and of every process below it, from just "
        "before the flood until lb has sent nothing to the backends for 0.5 s and the "
        "queues are empty, divided by the new clients served (flood SYNs delivered plus "
        "legitimate connections that succeeded; a full queue drops in the kernel, at no "
        "cost to the daemon). A worker's system time includes the kernel's forwarding of "
        "the packets its verdicts re-inject. The whole machine's busy time and "
        "tcpreplay's own CPU are only in the `--json` output: tcpreplay's pacing (a loop "
        "of system calls) and the kernel's forwarding, which runs mostly inside its send "
        "calls, cannot be told apart.",
        "- Legitimate clients, started when the flood reaches lb and stopped when "
        f"tcpreplay is done: {settings.legit_rate:g} HTTP/1.0 requests/s, each from a "
        "fresh address of an AnyIP prefix of the client namespace (`ip route add local "
        f"{LEGIT4} dev lo`, `{LEGIT6}`), timed from connect to the last byte of the "
        f"answer, timeout {LEGIT_TIMEOUT:g} s (a SYN retransmitted once shows as about "
        "1000 ms).",
        "- Median over runs (min–max when more than one); ÷ nft: the ratio to "
        "`nft-numgen` of the same run and step.",
        "",
    ]
    idle = [(s.idle_cpu_per_s, s.per_client_us(s.idle_cpu_per_s * s.window))
            for s in results.steps if s.idle_cpu_per_s is not None and s.sent]
    if idle:
        out += [f"The daemon at rest ({IDLE_SECONDS:g} s before each flood) used "
                f"{min(i for i, _ in idle) * 1000:.0f}–{max(i for i, _ in idle) * 1000:.0f} ms "
                "of CPU per second; over a flood's window that is at most "
                f"{max(u or 0.0 for _, u in idle):.1f} µs of a per-client figure (included "
                "in them, not subtracted).", ""]
    for family in settings.families:
        out += [f"IPv{family}:", "", *flood_table(results, settings, family), ""]
    out += text_chart(results, settings)
    notes = [f"run {s.run + 1} {s.mode} v{s.family} {s.rate}: {n}"
             for s in results.steps for n in s.notes]
    if notes:
        out += ["", "Anomalies during the run:", ""]
        out += [f"- {n}" for n in notes[:40]]
        if len(notes) > 40:
            out.append(f"- ... and {len(notes) - 40} more")
    return "\n".join(out).rstrip("\n") + "\n"


def write_doc(path: Path, section: str) -> None:
    """Replace the section (up to the next `## ` heading), or insert it before the
    first of SECTION_BEFORE, or append it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        for heading in SECTION_BEFORE:
            at = text.find("\n" + heading + "\n")
            if at >= 0:
                text = text[:at + 1] + section + "\n" + text[at + 1:]
                break
        else:
            text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


# ------------------------------------------------------------------------ main


def parse_rates(text: str) -> tuple[int | None, ...]:
    out: list[int | None] = []
    for word in text.split(","):
        word = word.strip().lower()
        if word in ("top", "topspeed", "max"):
            out.append(None)
        elif word:
            value = int(float(word.removesuffix("k")) * (1000 if word.endswith("k") else 1))
            if not 1 <= value <= 10_000_000:
                raise argparse.ArgumentTypeError(f"bad rate {word!r}")
            out.append(value)
    if not out:
        raise argparse.ArgumentTypeError("no rate")
    return tuple(out)


def machine_info() -> dict[str, str]:
    mach = bl.machine()
    try:
        r = subprocess.run(["tcpreplay", "--version"], capture_output=True, text=True,
                           timeout=5)
        mach["tcpreplay"] = (r.stdout + r.stderr).strip().splitlines()[0].split(" (")[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        mach["tcpreplay"] = "tcpreplay ?"
    return mach


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--modes", default=",".join(MODE_CLASSES),
                    help=f"comma-separated subset of {','.join(MODES)}")
    ap.add_argument("--families", default="4,6", help="4, 6 or 4,6 (default 4,6)")
    ap.add_argument("--rates", type=parse_rates, default=parse_rates(DEFAULT_RATES),
                    help=f"SYN rates, packets/s, 'k' allowed, 'top' for tcpreplay's "
                    f"--topspeed (default {DEFAULT_RATES})")
    ap.add_argument("--sources", type=int, default=DEFAULT_SOURCES,
                    help=f"distinct flood sources, one SYN each (default {DEFAULT_SOURCES:,}; "
                    f"IPv4 at most {MAX_SOURCES4:,})")
    ap.add_argument("--seconds", type=int, default=DEFAULT_SECONDS,
                    help="bound on each flood's length: min(sources, rate x seconds) SYNs "
                    f"(default {DEFAULT_SECONDS})")
    ap.add_argument("--legit-rate", type=float, default=DEFAULT_LEGIT_RATE,
                    help=f"first-time legitimate clients per second during the flood "
                    f"(default {DEFAULT_LEGIT_RATE})")
    ap.add_argument("--runs", type=int, default=1, help="runs of every step (default 1)")
    ap.add_argument("--json", type=Path, help="also write the raw numbers here")
    ap.add_argument("--no-doc", action="store_true", help="do not write the markdown section")
    ap.add_argument("--doc", type=Path, default=DOC,
                    help=f"the markdown file to update (default {DOC.relative_to(REPO)})")
    ap.add_argument("--keep", action="store_true", help="keep configs and logs (a temp dir)")
    args = ap.parse_args()

    modes = tuple(m for m in args.modes.split(",") if m)
    if bad := [m for m in modes if m not in MODE_CLASSES]:
        ap.error(f"unknown mode(s) {bad}")
    try:
        families = tuple(sorted({int(f) for f in args.families.split(",") if f}))
    except ValueError:
        ap.error(f"bad --families {args.families!r}")
    if not families or not set(families) <= set(FAMILIES):
        ap.error("--families takes 4, 6 or 4,6")
    if not 1 <= args.sources <= (MAX_SOURCES4 if 4 in families else MAX_SOURCES6):
        ap.error(f"--sources must be 1..{MAX_SOURCES4} (IPv4)")
    if not 1 <= args.seconds <= 120 or not 0.1 <= args.legit_rate <= 1000 or args.runs < 1:
        ap.error("--seconds 1..120, --legit-rate 0.1..1000, --runs >= 1")
    settings = Settings(modes=modes, families=families, rates=args.rates,
                        sources=args.sources, seconds=args.seconds,
                        legit_rate=args.legit_rate, runs=args.runs)
    if os.geteuid() != 0:
        print("bench_newclients: needs root (network namespaces)", file=sys.stderr)
        return 2
    installed = ensure_tools()
    if installed:
        print(f"bench_newclients: installed {installed}", file=sys.stderr)

    est = settings.estimate()
    lifetime = int(2 * est + 120)
    signal.signal(signal.SIGALRM, bl._watchdog)
    signal.alarm(lifetime)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, bl._on_signal)
    command = "sudo .venv/bin/python bench/bench_newclients.py " + " ".join(sys.argv[1:])
    mach = machine_info()
    print(f"bench_newclients: {settings}; about {est / 60:.1f} min", file=sys.stderr)

    bl.WORKDIR = Path(tempfile.mkdtemp(prefix="bench-newclients-"))
    results = Results()
    t0 = time.monotonic()
    index = 0
    try:
        for run in range(settings.runs):
            for family in families:
                for rate in settings.rates:
                    order = modes[index % len(modes):] + modes[:index % len(modes)]
                    index += 1
                    for name in order:
                        print(f"run {run + 1}/{settings.runs} IPv{family} "
                              f"{rate_label(rate)}: {name}", file=sys.stderr)
                        run_step(results, name, family, rate, run, settings, lifetime)
    finally:
        signal.alarm(0)
        if args.keep:
            print(f"bench_newclients: logs kept in {bl.WORKDIR}", file=sys.stderr)
        else:
            shutil.rmtree(bl.WORKDIR, ignore_errors=True)
    elapsed = time.monotonic() - t0
    mach["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())

    text = report(results, settings, command.strip(), mach, elapsed)
    print(text)
    if not args.no_doc:
        write_doc(args.doc, text)
        print(f"bench_newclients: wrote {args.doc}", file=sys.stderr)
    if args.json:
        raw = {
            "settings": {**asdict(settings), "rates": [rate_label(r) for r in settings.rates]},
            "machine": mach, "elapsed": elapsed, "command": command.strip(),
            "steps": [{**asdict(s), "new_clients": s.new_clients,
                       "legit_p50_ms": s.legit.p50, "legit_p99_ms": s.legit.p99}
                      for s in results.steps],
        }
        args.json.write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
