"""Soak: the daemon under mixed traffic, failures and reloads for a long while.

    .venv/bin/python bench/soak.py --minutes 30                       # conntrack path
    .venv/bin/python bench/soak.py --minutes 30 --datapath perpacket
    .venv/bin/python bench/soak.py --minutes 3 --json /tmp/soak.json

Builds a lab (``loaded.lab.topology.Lab``: 5 backends, 200 client addresses of
each family), runs the daemon in it (failover on: checks every second, rise 2,
fall 3; strategy ``wrr``; ``on_backend_down=cut``, the default) and for the
whole duration:

- traffic from the 400 client addresses to both VIPs: new TCP connections
  (one request each), UDP requests (one datagram, no retry) and ICMP echoes,
  IPv4 and IPv6, every outcome recorded; about 1 % of the packets that the
  balancer receives are malformed (``loaded.lab.malformed``: from 500 spoofed
  client-side sources, and the non-TCP/UDP kinds from the backends too);
- every 2 minutes (at 0:45, 2:45, ...) ``kill -9`` of a worker (always the
  last one, so the other lives the whole run: its memory over the whole
  run is measured); the supervisor restarts it;
- every minute (at 0:20, 1:20, ...) a config reload with a change,
  ``loaded reload -c CONF``: in turn b2's weight 1 -> 3, b5 added, b2's
  weight back to 1, b5 removed;
- every 4 minutes (at 1:30, 5:30, ...) backend b4 flaps: its server is stopped,
  and started again 30 s later; the health checks take it down and up;
- every minute, a checkpoint: the traffic pauses (a few seconds) until every
  queue is idle, then for every queue the kernel's count of packets queued to
  its worker (``id_sequence`` in ``/proc/net/netfilter/nfnetlink_queue``, per
  bound socket, so per worker incarnation) is compared with the verdicts that
  worker reports (accepted + dropped): the difference is a verdict lost. The
  malformed packets counted by the daemon are compared with those sent, by
  reason;
- every 10 s, the RSS of every daemon process (supervisor, workers, any other
  child).

A failed request is put down to the flap if its client was last served by
b4 and it started between 3 s before b4's server stopped and 1 s after the
daemon logged b4 down (the backend is gone, the checks need fall x interval
to notice; with ``cut`` its connections are then reset), to a kill if it
started between 3 s before the kill and 1 s after the worker was back (the
queue has nobody to answer it; TCP retries its SYN after 1 s, a UDP request
is not retried); anything else is unexplained. A worker killed with packets
in its queue takes them with it: the kernel frees them when the socket
closes; they are counted apart ("waiting at the kill").

Writes a JSON result (``--json``, default ``soak-<datapath>-<minutes>m.json``
in the current directory) and prints a markdown summary. Bounded: stops by
itself, a watchdog (SIGALRM) ends the run at the duration + 5 min, and the lab
(namespaces, processes) is torn down on any exit, Ctrl-C and SIGTERM included.
All traffic stays inside the lab's namespaces.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import loaded
from loaded.lab import traffic
from loaded.lab.balancer import Balancer, kernel_queues
from loaded.lab.malformed import KINDS, Kind, expected, spoofed_sources
from loaded.lab.netns import read_proc_net
from loaded.lab.topology import Lab

PORT = 8080
BACKENDS = 5  # b1..b5; b5 is joined and left by reloads, b4 flaps
FLAPPER = "b4"
JOINER = "b5"
CLIENTS = 200  # per family (the lab's maximum)
SPOOFED = 250  # malformed-packet sources per family
MALFORMED_SHARE = 0.01
HEALTH = {"failover": True, "check_interval": 1.0, "rise": 2, "fall": 3, "check_timeout": 0.5,
          "check_cycle": 30}
TCP_THREADS, UDP_THREADS, ICMP_THREADS = 3, 2, 1
TCP_TIMEOUT, UDP_TIMEOUT, ICMP_TIMEOUT = 3.0, 2.0, 2.0
PAUSE_BETWEEN = 0.01  # s, per traffic thread between two requests
RSS_EVERY = 10.0
CHECKPOINT_EVERY = 60.0
RELOAD_EVERY, RELOAD_AT = 60.0, 20.0
KILL_EVERY, KILL_AT = 120.0, 45.0
FLAP_EVERY, FLAP_AT, FLAP_DOWN = 240.0, 90.0, 30.0
MARGIN = 1.0  # s after a detected event that its failures are still put down to it

MAIN_PID = os.getpid()


class WatchdogExpired(BaseException):
    """Not an Exception: no handler may swallow it, it must unwind the run."""


def _watchdog(signum: int, frame: object) -> None:
    raise WatchdogExpired("soak: watchdog: the run went on far past its duration")


def _on_signal(signum: int, frame: object) -> None:
    # pyroute2's forked helpers inherit this handler: they must just die.
    if os.getpid() != MAIN_PID:
        os._exit(128 + signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def log(msg: str) -> None:
    print(f"soak {time.strftime('%H:%M:%S')}: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the kernel


def lb_received(lab: Lab) -> int:
    """Packets the balancer has received on its two links."""
    total = 0
    for line in read_proc_net(lab.ns("lb"), "dev").splitlines()[2:]:
        name, _, counters = line.partition(":")
        if name.strip() in (Lab.pub_nic, Lab.priv_nic):
            total += int(counters.split()[1])
    return total


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


# ------------------------------------------------------------------- traffic


@dataclass
class Failure:
    t0: float
    t1: float
    what: str  # tcp4, udp6, icmp4, ...
    client: str
    last_backend: str | None
    error: str
    cause: str = ""


@dataclass
class Tally:
    requests: int = 0
    answered: int = 0
    slow: int = 0  # answered after more than 0.9 s (a retried SYN, typically)
    max_latency: float = 0.0


class Traffic:
    """The legitimate clients and the malformed-packet sender, in threads, all
    pausable (``pause`` waits until every thread is idle)."""

    def __init__(self, lab: Lab, t_start: float) -> None:
        self.lab = lab
        self.t_start = t_start
        self.stop = threading.Event()
        self._run = threading.Event()
        self._run.set()
        self._malformed_run = threading.Event()
        self._malformed_run.set()
        self._lock = threading.Lock()
        self.tally: dict[str, Tally] = {}
        self.failures: list[Failure] = []
        self.last_backend: dict[str, str] = {}
        self.malformed_sent: Counter[tuple[str, str]] = Counter()  # (kind name, side)
        self._idle: dict[str, bool] = {}
        self.threads: list[threading.Thread] = []
        self.errors: list[str] = []
        lab.sysctl("cl", "net.ipv4.ping_group_range", "0 2147483647")  # ICMP echo sockets
        self.backend_names = {b.name for b in lab.backends}

    # ---- control

    def start(self) -> None:
        specs: list[tuple[str, Callable[[int, int], None], int]] = [
            ("tcp", self._tcp_loop, TCP_THREADS), ("udp", self._udp_loop, UDP_THREADS),
            ("icmp", self._icmp_loop, ICMP_THREADS)]
        for name, fn, n in specs:
            for j in range(n):
                self._spawn(f"{name}{j}", self._loop, fn, j, n)
        self._spawn("malformed", self._malformed_loop)

    def _spawn(self, name: str, target: Callable[..., None], *args: Any) -> None:
        self._idle[name] = False
        t = threading.Thread(target=self._guard, args=(name, target, *args), name=name,
                             daemon=True)
        self.threads.append(t)
        t.start()

    def _guard(self, name: str, target: Callable[..., None], *args: Any) -> None:
        try:
            target(name, *args)
        except Exception as e:  # a bug of the soak, not of the daemon: say so
            with self._lock:
                self.errors.append(f"{name}: {e!r}")
            log(f"traffic thread {name} died: {e!r}")

    def pause(self, timeout: float = 6.0) -> bool:
        self._run.clear()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self._idle[t.name] or not t.is_alive() for t in self.threads):
                return True
            time.sleep(0.02)
        return False

    def resume(self) -> None:
        self._run.set()

    def pause_malformed(self) -> None:
        self._malformed_run.clear()

    def resume_malformed(self) -> None:
        self._malformed_run.set()

    def finish(self) -> None:
        self.stop.set()
        self._run.set()
        self._malformed_run.set()
        for t in self.threads:
            t.join(10)

    def _wait_run(self, name: str, *events: threading.Event) -> bool:
        """Block while paused; False once stopping. Busy is announced before the
        check, so that ``pause`` never takes a thread about to work for idle."""
        while not self.stop.is_set():
            self._idle[name] = False
            if all(e.is_set() for e in (self._run, *events)):
                return True
            self._idle[name] = True
            time.sleep(0.01)
        self._idle[name] = True
        return False

    # ---- the legitimate clients

    def _loop(self, name: str, fn: Callable[[int, int], None], j: int, n: int) -> None:
        i = j
        while self._wait_run(name):
            fn(i, n)
            i += n
            time.sleep(PAUSE_BETWEEN)

    def _client(self, i: int) -> tuple[int, str, str]:
        family = 4 if (i // 7) % 2 == 0 else 6
        clients = self.lab.clients4 if family == 4 else self.lab.clients6
        c = clients[i % len(clients)]
        return family, c, self.lab.vip4 if family == 4 else self.lab.vip6

    def _record(self, what: str, client: str, t0: float, answer: str | None,
                error: str = "") -> None:
        t1 = time.monotonic()
        with self._lock:
            tl = self.tally.setdefault(what, Tally())
            tl.requests += 1
            if answer is not None:
                tl.answered += 1
                tl.max_latency = max(tl.max_latency, t1 - t0)
                if t1 - t0 > 0.9:
                    tl.slow += 1
                if answer in self.backend_names:
                    self.last_backend[client] = answer
            else:
                self.failures.append(Failure(t0 - self.t_start, t1 - self.t_start, what,
                                             client, self.last_backend.get(client), error))

    def _answer(self, line: str, client: str) -> str:
        name, seen = line.split()
        if seen != client or name not in self.backend_names:
            raise ValueError(f"unexpected answer {line!r}")
        return name

    def _tcp_loop(self, i: int, n: int) -> None:
        family, c, vip = self._client(i)
        t0 = time.monotonic()
        try:
            line = traffic.tcp_request(c, vip, PORT, timeout=TCP_TIMEOUT, ns=self.lab.ns("cl"))
            self._record(f"tcp{family}", c, t0, self._answer(line, c))
        except (OSError, ValueError) as e:
            self._record(f"tcp{family}", c, t0, None, f"{type(e).__name__}: {e}")

    def _udp_loop(self, i: int, n: int) -> None:
        family, c, vip = self._client(i + 3)
        t0 = time.monotonic()
        try:
            line = traffic.udp_request(c, vip, PORT, timeout=UDP_TIMEOUT, attempts=1,
                                       ns=self.lab.ns("cl"))
            self._record(f"udp{family}", c, t0, self._answer(line, c))
        except (OSError, ValueError) as e:
            self._record(f"udp{family}", c, t0, None, f"{type(e).__name__}: {e}")

    def _icmp_loop(self, i: int, n: int) -> None:
        family, c, vip = self._client(i + 5)
        t0 = time.monotonic()
        try:
            echo(self.lab, c, vip, i & 0xFFFF, ICMP_TIMEOUT)
            self._record(f"icmp{family}", c, t0, "echo")
        except OSError as e:
            self._record(f"icmp{family}", c, t0, None, f"{type(e).__name__}: {e}")

    # ---- the malformed packets

    def _malformed_loop(self, name: str) -> None:
        lab = self.lab
        socks = {}
        nss = ["cl", *(b.name for b in lab.backends if b.name in ("b1", "b2", "b3"))]
        for ns in nss:
            for fam, af in ((4, socket.AF_INET), (6, socket.AF_INET6)):
                socks[ns, fam] = lab.socket(ns, af, socket.SOCK_RAW, socket.IPPROTO_RAW)
        plan: list[tuple[Kind, str]] = [(k, "client") for k in KINDS]
        plan += [(k, "backend") for k in KINDS if k.backend_side]
        srcs = {f: spoofed_sources(f, SPOOFED) for f in (4, 6)}
        vip = {4: lab.vip4, 6: lab.vip6}
        legit = {4: lab.clients4, 6: lab.clients6}
        backends = [b for b in lab.backends if b.name in ("b1", "b2", "b3")]
        seq = 0
        try:
            last = lb_received(lab)
            sent_total = 0
            received_total = 0
            while self._wait_run(name, self._malformed_run):
                time.sleep(0.25)
                now = lb_received(lab)
                received_total += now - last
                last = now
                # 1 % of what the balancer received (this stream included)
                budget = int(received_total * MALFORMED_SHARE) - sent_total
                for _ in range(max(0, min(budget, 2000))):
                    kind, side = plan[seq % len(plan)]
                    f = kind.family
                    if side == "client":
                        s = srcs[f][seq % SPOOFED]
                        p = srcs[f][(seq + 1) % SPOOFED]
                        ns, dst = "cl", vip[f]
                    else:
                        b = backends[seq % len(backends)]
                        s = b.addr4 if f == 4 else b.addr6
                        dst = legit[f][seq % len(legit[f])]
                        p = legit[f][(seq + 1) % len(legit[f])]
                        ns = b.name
                    socks[ns, f].sendto(kind.build(s, dst, p), (dst, 0))
                    with self._lock:
                        self.malformed_sent[kind.name, side] += 1
                    sent_total += 1
                    seq += 1
        finally:
            for sock in socks.values():
                sock.close()

    def malformed_pairs(self) -> list[tuple[Kind, str]]:
        by_name = {k.name: k for k in KINDS}
        with self._lock:
            items = list(self.malformed_sent.items())
        return [(by_name[name], side) for (name, side), n in items for _ in range(n)]


def echo(lab: Lab, src: str, dst: str, seq: int, timeout: float) -> None:
    """One ICMP echo on a ping socket (the kernel picks the id and checks the
    reply belongs to it); raises TimeoutError without an answer."""
    v6 = ":" in dst
    af = socket.AF_INET6 if v6 else socket.AF_INET
    proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    with lab.socket("cl", af, socket.SOCK_DGRAM, proto) as s:
        s.bind((src, 0))
        s.settimeout(timeout)
        s.connect((dst, 0))
        s.send(struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, 0, seq) + b"soak" * 8)
        deadline = time.monotonic() + timeout
        while True:
            s.settimeout(max(0.001, deadline - time.monotonic()))
            data = s.recv(2048)
            if data and data[0] == (129 if v6 else 0) and struct.unpack("!H", data[6:8])[0] == seq:
                return


# -------------------------------------------------------------------- the run


@dataclass
class Incarnation:
    """One worker process: its queue's kernel counters as last read exactly
    (at a checkpoint, or just before it was killed)."""

    queue: int
    pid: int
    first_seen: float
    queued: int = 0  # id_sequence
    answered: int = 0  # accepted + dropped
    waiting: int = 0
    queue_dropped: int = 0
    user_dropped: int = 0
    verdict_errors: int = 0
    lost: int = 0  # queued - answered - waiting, at the last checkpoint
    drops: dict[str, int] = field(default_factory=dict)
    killed_at: float | None = None
    waiting_at_kill: int = 0  # freed by the kernel with the socket
    after_last_report: int = 0  # queued after the last report before the kill
    checkpoints: int = 0


@dataclass
class Event:
    t: float
    kind: str
    detail: dict[str, Any]


class Soak:
    def __init__(self, minutes: float, datapath: str) -> None:
        self.minutes = minutes
        self.duration = minutes * 60.0
        self.datapath = datapath
        self.events: list[Event] = []
        self.incarnations: dict[int, Incarnation] = {}
        self.rss: list[dict[str, Any]] = []
        self.checkpoints: list[dict[str, Any]] = []
        self.flaps: list[dict[str, Any]] = []
        self.kills: list[dict[str, Any]] = []
        self.reloads: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.weights = {"b2": 1}
        self.joined = False
        self.t0 = 0.0

    def now(self) -> float:
        return time.monotonic() - self.t0

    # ---- set-up

    def config(self, lab: Lab, conf: Path) -> None:
        members = [b for b in lab.backends if b.name != JOINER or self.joined]
        w = {b.name: self.weights.get(b.name, 1) for b in members}
        lab.write_config(conf, datapath=self.datapath, strategy="wrr", **HEALTH,
                         server4=[f"{b.addr4} weight={w[b.name]}" for b in members],
                         server6=[f"{b.addr6} weight={w[b.name]}" for b in members])

    def start_daemon(self, lab: Lab, conf: Path, lifetime: int) -> Balancer:
        d = Balancer(lab, conf)
        d.stats_path.unlink(missing_ok=True)
        # `timeout`: even if this script is killed outright, the daemon stops
        # (and undoes its set-up) by itself.
        with open(d.log_path, "wb") as out:
            d.proc = lab.exec("lb", ["timeout", "-s", "TERM", str(lifetime), sys.executable,
                                     "-m", "loaded", "-D", "-c", str(conf)],
                              stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if "event=started" in d.log and d.stats_path.exists():
                try:
                    s = d.stats()
                except (OSError, ValueError):
                    s = {}
                ws = s.get("workers", [])
                if ws and all(w.get("alive") and w.get("pid") for w in ws):
                    return d
            if d.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"the daemon did not start:\n{d.log[-3000:]}")

    # ---- readings

    def stats(self, d: Balancer) -> dict[str, Any]:
        for _ in range(20):
            try:
                return d.stats()
            except (OSError, ValueError):
                time.sleep(0.05)  # replaced atomically, but be patient
        return d.stats()

    def note_workers(self, stats: dict[str, Any]) -> None:
        for w in stats.get("workers", []):
            pid = w.get("pid")
            if pid and w.get("alive") and pid not in self.incarnations:
                self.incarnations[pid] = Incarnation(w["queue"], pid, self.now())
            if pid in self.incarnations and w.get("alive"):
                self.incarnations[pid].drops = dict(w.get("drops", {}))

    def sample_rss(self, d: Balancer, stats: dict[str, Any]) -> None:
        sup = int(stats["pid"])
        workers = {int(w["pid"]): f"worker{w['index']}" for w in stats["workers"]
                   if w.get("pid") and w.get("alive")}
        sample: dict[str, Any] = {"t": round(self.now(), 1), "rss_kib": {}}
        procs = {sup: "supervisor", **workers}
        for p in descendants(sup):
            procs.setdefault(p, f"child:{comm(p)}")
        for pid, role in procs.items():
            kib = rss_kib(pid)
            if kib is not None:
                sample["rss_kib"][role] = {"pid": pid, "kib": kib}
        self.rss.append(sample)

    def counted(self, stats: dict[str, Any]) -> Counter[str]:
        out: Counter[str] = Counter()
        for inc in self.incarnations.values():
            out.update(inc.drops)
        if "conntrack" in stats:
            out["conntrack-invalid"] += int(stats["conntrack"]["invalid"])
        return +out

    # ---- events

    def checkpoint(self, lab: Lab, d: Balancer, tr: Traffic, final: bool = False) -> None:
        t = self.now()
        idle = tr.pause()
        quiet_since = time.monotonic()
        quiet_wall = time.time()
        settled = False
        stats: dict[str, Any] = {}
        queues: dict[int, dict[str, int]] = {}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            stats = self.stats(d)
            queues = kernel_queues(lab)
            ws = {w["queue"]: w for w in stats["workers"]}
            # written after the pause began: the kernel's counters in it
            # (conntrack-invalid) hold every packet sent
            fresh = (all(w.get("alive") for w in ws.values())
                     and os.stat(d.stats_path).st_mtime > quiet_wall + 0.2)
            if fresh and set(queues) == set(ws) and all(
                    q["waiting"] == 0 and q["portid"] == ws[n]["pid"]
                    and q["id_sequence"] == ws[n]["accepted"] + ws[n]["dropped"]
                    for n, q in queues.items()):
                settled = True
                break
            time.sleep(0.2)
        self.note_workers(stats)
        ws = {w["queue"]: w for w in stats["workers"]}
        for n, q in queues.items():
            w = ws.get(n)
            if not w or not w.get("pid") or w["pid"] not in self.incarnations:
                continue
            inc = self.incarnations[w["pid"]]
            if q["portid"] != inc.pid:
                continue
            inc.queued, inc.waiting = q["id_sequence"], q["waiting"]
            inc.answered = int(w["accepted"]) + int(w["dropped"])
            inc.queue_dropped, inc.user_dropped = q["queue_dropped"], q["user_dropped"]
            inc.verdict_errors = sum(int(v) for v in w.get("verdict_errors", {}).values())
            inc.lost = inc.queued - inc.answered - inc.waiting
            inc.checkpoints += 1
        want = expected(tr.malformed_pairs(), self.datapath)
        got = self.counted(stats)
        cp = {"t": round(t, 1), "idle": idle, "settled": settled,
              "pause_s": round(time.monotonic() - quiet_since, 2),
              "lost": sum(i.lost for i in self.incarnations.values()),
              "queue_dropped": sum(i.queue_dropped for i in self.incarnations.values()),
              "user_dropped": sum(i.user_dropped for i in self.incarnations.values()),
              "malformed_expected": dict(want), "malformed_counted": dict(got),
              "malformed_exact": got == want}
        self.checkpoints.append(cp)
        log(f"checkpoint at {t:.0f} s: settled={settled} lost={cp['lost']} "
            f"malformed exact={cp['malformed_exact']} ({sum(want.values())} sent and expected)")
        if not final:
            tr.resume()

    def kill_worker(self, lab: Lab, d: Balancer, tr: Traffic) -> None:
        t = self.now()
        # The malformed packets pause first, so that the victim's last report
        # (once a second) holds every drop it counted: legitimate traffic
        # causes none.
        tr.pause_malformed()
        time.sleep(2.5)
        stats = self.stats(d)
        self.note_workers(stats)
        victim = max((w for w in stats["workers"] if w.get("alive") and w.get("pid")),
                     key=lambda w: w["index"])
        queue, pid = victim["queue"], int(victim["pid"])
        q = kernel_queues(lab).get(queue, {})
        os.kill(pid, signal.SIGKILL)
        t_kill = self.now()
        inc = self.incarnations.setdefault(pid, Incarnation(queue, pid, t))
        inc.killed_at = t_kill
        if q.get("portid") == pid:
            inc.waiting_at_kill = q["waiting"]
            inc.after_last_report = q["id_sequence"] - int(victim["packets"])
            inc.queue_dropped, inc.user_dropped = q["queue_dropped"], q["user_dropped"]
        new_pid = 0
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                s = d.stats()
            except (OSError, ValueError):
                s = {}
            w: dict[str, Any] = next(
                (x for x in s.get("workers", []) if x.get("queue") == queue), {})
            if w.get("alive") and w.get("pid") and w["pid"] != pid:
                rows = kernel_queues(lab)
                if rows.get(queue, {}).get("portid") == w["pid"]:
                    new_pid = int(w["pid"])
                    self.note_workers(s)
                    break
            time.sleep(0.05)
        t_back = self.now()
        tr.resume_malformed()
        k = {"t": round(t_kill, 2), "queue": queue, "pid": pid, "new_pid": new_pid,
             "back_after_s": round(t_back - t_kill, 2), "waiting_at_kill": inc.waiting_at_kill,
             "queued_after_last_report": inc.after_last_report, "t_back": round(t_back, 2)}
        self.kills.append(k)
        log(f"killed worker {pid} (queue {queue}); back as {new_pid} after "
            f"{t_back - t_kill:.2f} s; {inc.waiting_at_kill} waiting at the kill")

    def reload(self, lab: Lab, d: Balancer) -> None:
        step = len(self.reloads) % 4
        change = ["b2 weight 1 -> 3", f"add {JOINER}", "b2 weight 3 -> 1", f"remove {JOINER}"][step]
        if step == 0:
            self.weights["b2"] = 3
        elif step == 1:
            self.joined = True
        elif step == 2:
            self.weights["b2"] = 1
        else:
            self.joined = False
        self.config(lab, d.conf)
        t = self.now()
        try:
            result = d.control("reload")
            ops = [c.get("op") for c in (result or {}).get("changes", [])]
            ok = bool(result and result.get("applied", True)) and bool(ops)
            error = ""
        except Exception as e:
            ops, ok, error = [], False, repr(e)
        took = self.now() - t
        # Applied in the workers: the status shows the change.
        seen = False
        deadline = time.monotonic() + 10
        while ok and time.monotonic() < deadline:
            st = d.control("status")
            rows = {b["address"]: b for s in st["services"] for b in s["backends"]}
            b2, b5 = lab.backend("b2"), lab.backend(JOINER)
            b5row = rows.get(b5.addr4)
            # a removed backend leaves gracefully: it may be listed a while, not up
            b5ok = (b5row is not None and b5row.get("state") == "up") if self.joined else (
                b5row is None or b5row.get("state") != "up")
            if rows.get(b2.addr4, {}).get("weight") == self.weights["b2"] and b5ok:
                seen = True
                break
            time.sleep(0.2)
        r = {"t": round(t, 2), "change": change, "ops": ops, "applied": ok and seen,
             "took_s": round(took, 2), "error": error}
        self.reloads.append(r)
        log(f"reload at {t:.0f} s: {change}: ops {ops} applied={ok and seen} {error}")

    def _events_of(self, lab: Lab, d: Balancer, event: str) -> dict[str, int]:
        b = lab.backend(FLAPPER)
        text = d.log
        return {str(fam): len(re.findall(rf"event={event} vip=\S+ backend={re.escape(addr)}\b",
                                         text))
                for fam, addr in ((4, b.addr4), (6, b.addr6))}

    def flap_down(self, lab: Lab, d: Balancer, servers: dict[str, Any]) -> None:
        base = self._events_of(lab, d, "backend-down")
        proc = servers[FLAPPER]
        proc.terminate()
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(3)
        self.flaps.append({"stop": round(self.now(), 2), "down": {}, "start": None, "up": {},
                           "_down": base, "_up": {}})
        log(f"{FLAPPER}'s server stopped")

    def flap_up(self, lab: Lab, d: Balancer, servers: dict[str, Any]) -> None:
        base = self._events_of(lab, d, "backend-up")
        servers[FLAPPER] = lab.start_server(FLAPPER, PORT)
        self.flaps[-1]["start"] = round(self.now(), 2)
        self.flaps[-1]["_up"] = base
        log(f"{FLAPPER}'s server started")

    def watch_flap(self, lab: Lab, d: Balancer) -> None:
        """Note when the daemon logged the flapping backend down and up, per family."""
        if not self.flaps:
            return
        f = self.flaps[-1]
        for event, key in (("backend-down", "down"), ("backend-up", "up")):
            base = f[f"_{key}"]
            if not base or len(f[key]) == len(base):
                continue
            for fam, n in self._events_of(lab, d, event).items():
                if n > base[fam] and fam not in f[key]:
                    f[key][fam] = round(self.now(), 2)

    # ---- the whole run

    def schedule(self) -> list[tuple[float, str]]:
        out: list[tuple[float, str]] = []
        t = CHECKPOINT_EVERY
        while t < self.duration - 5:
            out.append((t, "checkpoint"))
            t += CHECKPOINT_EVERY
        for every, at, what in ((RELOAD_EVERY, RELOAD_AT, "reload"),
                                (KILL_EVERY, KILL_AT, "kill")):
            t = at
            while t < self.duration - 10:
                out.append((t, what))
                t += every
        t = FLAP_AT
        while t + FLAP_DOWN < self.duration - 10:
            out.append((t, "flap-down"))
            out.append((t + FLAP_DOWN, "flap-up"))
            t += FLAP_EVERY
        return sorted(out)

    def run(self, lab: Lab, lifetime: int) -> dict[str, Any]:
        assert lab.workdir is not None
        servers = {b.name: lab.start_server(b, PORT) for b in lab.backends}
        conf = lab.workdir / "soak.conf"
        self.config(lab, conf)
        d = self.start_daemon(lab, conf, lifetime)
        self.t0 = time.monotonic()
        stats0 = self.stats(d)
        self.note_workers(stats0)
        supervisor = int(stats0["pid"])
        log(f"daemon up: supervisor {supervisor}, workers "
            f"{[w['pid'] for w in stats0['workers']]}, {self.datapath} path")
        tr = Traffic(lab, self.t0)
        todo = self.schedule()
        next_rss = 0.0
        try:
            tr.start()
            while True:
                now = self.now()
                if now >= self.duration:
                    break
                if now >= next_rss:
                    s = self.stats(d)
                    self.note_workers(s)
                    self.sample_rss(d, s)
                    next_rss = now + RSS_EVERY
                self.watch_flap(lab, d)
                while todo and todo[0][0] <= now:
                    _, what = todo.pop(0)
                    if what == "checkpoint":
                        self.checkpoint(lab, d, tr)
                    elif what == "reload":
                        self.reload(lab, d)
                    elif what == "kill":
                        self.kill_worker(lab, d, tr)
                    elif what == "flap-down":
                        self.flap_down(lab, d, servers)
                    elif what == "flap-up":
                        self.flap_up(lab, d, servers)
                if d.proc is not None and d.proc.poll() is not None:
                    self.notes.append(f"the daemon exited at {now:.0f} s: {d.log[-2000:]}")
                    break
                if tr.errors:
                    self.notes.append(f"traffic thread failed: {tr.errors}")
                    break
                time.sleep(0.1)
            self.checkpoint(lab, d, tr, final=True)
            s = self.stats(d)
            self.sample_rss(d, s)
            final_stats = s
        finally:
            tr.finish()
        self.watch_flap(lab, d)
        restarts = sum(int(w.get("restarts", 0)) for w in final_stats["workers"])
        rc = d.stop(timeout=20)
        problems = [line for line in d.log.splitlines()
                    if "event=internal-error" in line or "Traceback" in line]
        return self.result(tr, final_stats, restarts, rc, problems, supervisor, d)

    # ---- the result

    def attribute(self, tr: Traffic) -> None:
        kills = [(k["t"] - 3.0, k["t_back"] + MARGIN) for k in self.kills]
        flaps = []
        for f in self.flaps:
            detected = max(f["down"].values(), default=f["stop"] + 10.0)
            flaps.append((f["stop"] - 3.0, detected + MARGIN))
        for fl in tr.failures:
            if any(a <= fl.t0 <= b for a, b in kills):
                fl.cause = "kill"
            elif fl.last_backend == FLAPPER and any(a <= fl.t0 <= b for a, b in flaps):
                fl.cause = "flap"
            else:
                fl.cause = "unexplained"

    def result(self, tr: Traffic, stats: dict[str, Any], restarts: int, rc: int,
               problems: list[str], supervisor: int, d: Balancer) -> dict[str, Any]:
        self.attribute(tr)
        by_cause = Counter(f.cause for f in tr.failures)
        per_what: dict[str, dict[str, Any]] = {}
        for what, tl in sorted(tr.tally.items()):
            fails = Counter(f.cause for f in tr.failures if f.what == what)
            per_what[what] = {**asdict(tl), "failed": tl.requests - tl.answered,
                              "flap": fails["flap"], "kill": fails["kill"],
                              "unexplained": fails["unexplained"]}
        roles: dict[str, dict[str, Any]] = {}
        for sample in self.rss:
            for role, v in sample["rss_kib"].items():
                r = roles.setdefault(role, {"start_kib": v["kib"], "max_kib": v["kib"],
                                            "pids": [], "start_t": sample["t"]})
                r["end_kib"], r["end_t"] = v["kib"], sample["t"]
                r["max_kib"] = max(r["max_kib"], v["kib"])
                if v["pid"] not in r["pids"]:
                    r["pids"].append(v["pid"])
        half = self.now() / 2
        for role, r in roles.items():
            r["growth_kib"] = r["end_kib"] - r["start_kib"]
            mid = [v["rss_kib"][role]["kib"] for v in self.rss
                   if v["t"] >= half and role in v["rss_kib"]]
            r["mid_kib"] = mid[0] if mid else r["start_kib"]
            r["second_half_growth_kib"] = r["end_kib"] - r["mid_kib"]
        # Growth of each process over its own life (a restarted worker starts afresh).
        per_pid: dict[int, list[int]] = {}
        for sample in self.rss:
            for v in sample["rss_kib"].values():
                per_pid.setdefault(v["pid"], []).append(v["kib"])
        last_cp = self.checkpoints[-1] if self.checkpoints else {}
        incs = sorted(self.incarnations.values(), key=lambda i: (i.queue, i.first_seen))
        sent: Counter[str] = Counter()
        for (_name, side), n in tr.malformed_sent.items():
            sent[side] += n
        received = sum(tl.requests for tl in tr.tally.values())
        return {
            "command": "sudo .venv/bin/python bench/soak.py " + " ".join(sys.argv[1:]),
            "datapath": self.datapath, "minutes": self.minutes,
            "duration_s": round(self.now(), 1),
            "machine": {"kernel": platform.release(), "cpus": os.cpu_count(),
                        "python": platform.python_version()},
            "loaded_from": str(Path(loaded.__file__).parent),
            "commit": os.environ.get("SOAK_COMMIT", ""),
            "requests": per_what, "requests_total": received,
            "failed_by_cause": dict(by_cause),
            "failures": [asdict(f) for f in tr.failures[:500]],
            "kills": self.kills, "worker_restarts": restarts, "reloads": self.reloads,
            "flaps": [{k: v for k, v in f.items() if not k.startswith("_")}
                      for f in self.flaps],
            "checkpoints": self.checkpoints,
            "verdicts": {
                "lost_at_checkpoints": sum(i.lost for i in incs),
                "waiting_at_kills": sum(i.waiting_at_kill for i in incs),
                "queue_dropped": sum(i.queue_dropped for i in incs),
                "user_dropped": sum(i.user_dropped for i in incs),
                "verdict_errors": sum(i.verdict_errors for i in incs),
                "queued_checked": sum(i.queued for i in incs),
                "queued_after_last_report_at_kills": sum(i.after_last_report for i in incs),
                "incarnations": [asdict(i) for i in incs],
            },
            "malformed": {"sent": dict(sent),
                          "sent_by_kind": {f"{n} ({s})": c
                                           for (n, s), c in sorted(tr.malformed_sent.items())},
                          "expected": last_cp.get("malformed_expected", {}),
                          "counted": last_cp.get("malformed_counted", {}),
                          "exact": last_cp.get("malformed_exact", False)},
            "rss": {"roles": roles,
                    "per_pid_growth_kib": {str(p): v[-1] - v[0] for p, v in per_pid.items()},
                    "samples": self.rss},
            "supervisor_pid": supervisor, "daemon_exit": rc, "daemon_problems": problems[:20],
            "notes": self.notes,
        }


def markdown(r: dict[str, Any]) -> str:
    out = [f"Command: `{r['command']}`; {r['datapath']} path, {r['duration_s'] / 60:.1f} min "
           f"({r['machine']['cpus']} cores, kernel {r['machine']['kernel']}).", ""]
    out += ["| requests | sent | answered | failed: flap (by design) | failed: kill (by design) "
            "| failed: unexplained | answered after > 0.9 s | slowest |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    tot: Counter[str] = Counter()
    for what, v in r["requests"].items():
        out.append(f"| {what} | {v['requests']} | {v['answered']} | {v['flap']} | {v['kill']} | "
                   f"{v['unexplained']} | {v['slow']} | {v['max_latency']:.2f} s |")
        for k in ("requests", "answered", "flap", "kill", "unexplained", "slow"):
            tot[k] += v[k]
    out.append(f"| all | {tot['requests']} | {tot['answered']} | {tot['flap']} | {tot['kill']} | "
               f"{tot['unexplained']} | {tot['slow']} | |")
    v = r["verdicts"]
    kills = r["kills"]
    out += ["", "| kernel queues and verdicts | |", "|---|---:|",
            f"| packets queued, checked against the workers' verdicts | {v['queued_checked']} |",
            f"| verdicts lost (queued - answered - waiting, at quiet checkpoints) | "
            f"{v['lost_at_checkpoints']} |",
            f"| queue drops (queue full) / user drops (socket buffer) | {v['queue_dropped']} / "
            f"{v['user_dropped']} |",
            f"| verdict errors | {v['verdict_errors']} |",
            f"| worker kills / restarts seen by the supervisor | {len(kills)} / "
            f"{r['worker_restarts']} |",
            "| back after a kill (new worker bound to the queue) | "
            + (f"{min(k['back_after_s'] for k in kills):.2f}-"
               f"{max(k['back_after_s'] for k in kills):.2f} s |" if kills else "- |"),
            f"| packets waiting in a killed worker's queue (freed with it, by design) | "
            f"{v['waiting_at_kills']} |",
            f"| packets queued to a killed worker after its last report (not checkable) | "
            f"{v['queued_after_last_report_at_kills']} |",
            f"| checkpoints settled / taken | "
            f"{sum(1 for c in r['checkpoints'] if c['settled'])} / {len(r['checkpoints'])} |"]
    rl = r["reloads"]
    fl = r["flaps"]
    down = [f["down"].get(fam, 0) - f["stop"] for f in fl for fam in ("4", "6") if f["down"]]
    up = [f["up"].get(fam, 0) - f["start"] for f in fl for fam in ("4", "6")
          if f["up"] and f["start"] is not None]
    out += [f"| reloads applied / done | {sum(1 for x in rl if x['applied'])} / {len(rl)} |",
            f"| flaps of {FLAPPER}: detected down / up after | {len(fl)}: "
            + (f"{min(down):.1f}-{max(down):.1f} s" if down else "-") + " / "
            + (f"{min(up):.1f}-{max(up):.1f} s" if up else "-") + " |"]
    m = r["malformed"]
    out += ["", f"Malformed packets: {sum(m['sent'].values())} sent ({m['sent']}), "
            f"{'counted exactly' if m['exact'] else 'NOT counted exactly'} by reason: "
            f"expected {m['expected']}, counted {m['counted']}.", ""]
    out += ["| process (RSS, MiB) | start | half-way | end | max | growth | growth, 2nd half "
            "| processes |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for role, x in sorted(r["rss"]["roles"].items()):
        out.append(f"| {role} | {x['start_kib'] / 1024:.1f} | {x['mid_kib'] / 1024:.1f} "
                   f"| {x['end_kib'] / 1024:.1f} | {x['max_kib'] / 1024:.1f} "
                   f"| {x['growth_kib'] / 1024:+.1f} | {x['second_half_growth_kib'] / 1024:+.1f} "
                   f"| {len(x['pids'])} |")
    if r["notes"] or r["daemon_problems"]:
        out += ["", "Notes: " + "; ".join(r["notes"] + r["daemon_problems"])]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="duration (default 30)")
    ap.add_argument("--datapath", choices=("conntrack", "perpacket"), default="conntrack")
    ap.add_argument("--json", type=Path, help="result file (default soak-<datapath>-<m>m.json)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("soak: needs root (network namespaces)", file=sys.stderr)
        return 2
    if not 1 <= args.minutes <= 24 * 60:
        ap.error("--minutes: 1..1440")
    out = args.json or Path(f"soak-{args.datapath}-{args.minutes:g}m.json")
    lifetime = int(args.minutes * 60 + 300)
    signal.signal(signal.SIGALRM, _watchdog)
    signal.alarm(lifetime)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)
    soak = Soak(args.minutes, args.datapath)
    lab = Lab(backends=BACKENDS, clients=CLIENTS)
    try:
        lab.start()
        log(f"lab {lab.prefix}: {BACKENDS} backends, {CLIENTS} clients per family; "
            f"{args.minutes:g} min on the {args.datapath} path")
        result = soak.run(lab, lifetime)
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGINT, signal.SIGTERM})
        try:
            lab.teardown()
        finally:
            signal.alarm(0)
            signal.pthread_sigmask(signal.SIG_UNBLOCK,
                                   {signal.SIGALRM, signal.SIGINT, signal.SIGTERM})
    out.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    log(f"wrote {out}")
    bad = (result["failed_by_cause"].get("unexplained", 0)
           or result["verdicts"]["lost_at_checkpoints"]
           or result["verdicts"]["queue_dropped"] or result["verdicts"]["user_dropped"]
           or not result["malformed"]["exact"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
