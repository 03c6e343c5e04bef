"""The supervisor: sets up the kernel, runs the workers, undoes it all on exit.

Life of a daemon:

1. undo what a crashed earlier run of the same instance left (its journal);
2. sysctls, addresses and routes;
3. fork one worker per queue; each binds its queue, pins itself to its core,
   drops its privileges and reports ready through its pipe;
4. only then the firewall rules that send packets to the queues, so that no
   packet waits on a queue nobody reads; then the backends' neighbour entries;
5. loop: restart a worker that dies (and replay the pool changes to it),
   collect the workers' counters into ``/run/loaded/<tag>.stats.json``, retry
   neighbours not resolved yet, send every pool change (health, operator,
   reload: ``loaded.core.backends`` decides it) to every worker, as typed
   messages on its pipe (``loaded.core.commands``);
6. on SIGTERM or SIGINT: stop the workers (each one's totals logged, a
   ``worker-stopped`` line), remove the stats file, undo every recorded kernel
   change.

The supervisor stays root, because undoing the set-up needs it, but keeps only
the capabilities listed in ``loaded.io.privileges.SUPERVISOR_CAPS``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import json
import logging
import os
import queue
import select
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loaded import __version__
from loaded.control.protocol import socket_path
from loaded.control.server import ControlServer
from loaded.control.web import StatusServer
from loaded.core.backends import HEALTH_FOLLOWS, BackendStates
from loaded.core.commands import (
    AddBackend,
    DumpQuery,
    Learned,
    MessageError,
    PoolCommand,
    Query,
    Reply,
    Report,
    decode,
    encode,
)
from loaded.core.config import Config
from loaded.core.engine import build_engine, table_share
from loaded.core.health import (
    Event,
    HealthMonitor,
    HostAdded,
    StateChanged,
)
from loaded.core.plan import Neighbour, Plan
from loaded.core.pool import IPAddress
from loaded.core.status import Status
from loaded.daemon.operator import Operator
from loaded.daemon.status import build_status
from loaded.daemon.worker import Worker, WorkerSpec
from loaded.io.files import write_atomic
from loaded.io.kernel import JOURNAL_DIR, Kernel, KernelError
from loaded.io.nfqueue import queue_owner, read_proc_stats
from loaded.io.privileges import limit_supervisor
from loaded.io.probes import HealthRunner

log = logging.getLogger("loaded.supervisor")

RESTART_DELAY = 1.0
READY_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
NEIGHBOUR_RETRY = 5.0
FORGET_AGAIN = 0.5


@dataclass
class _Query:
    """A question to every worker; ``done`` gets the replies when all are in, or
    those that came by the deadline."""

    expected: set[int]
    done: Callable[[list[Reply]], None]
    deadline: float
    replies: list[Reply] = field(default_factory=list)


@dataclass
class _Child:
    spec: WorkerSpec
    pid: int = 0
    fd: int = -1
    control: int = -1  # write end of the worker's command pipe
    buf: bytes = b""
    last: dict[str, object] = field(default_factory=dict)
    ready: bool = False
    restart_at: float = 0.0
    restarts: int = 0


class Supervisor:
    def __init__(self, config: Config, families: tuple[int, ...], plan: Plan, *,
                 maxlen: int, user: str | None, drop_privileges: bool = True,
                 failover: bool = False, journal_dir: Path = JOURNAL_DIR,
                 config_path: str | None = None) -> None:
        self.config = config
        self.config_path = os.path.abspath(config_path or config.path)
        self.failover = failover or config.failover
        self.health: HealthRunner | None = None
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.families = families
        self.plan = plan
        self.kernel = Kernel(plan, journal_dir)
        self.stats_path = journal_dir / f"{plan.tag}.stats.json"
        self.children = [
            _Child(WorkerSpec(i, q, core, maxlen, config.fail_open, config.gso, user,
                              drop_privileges, refuse_when_empty=config.no_backend == "refuse",
                              datapath=plan.datapath))
            for i, (q, core) in enumerate(zip(plan.queues, plan.cores, strict=True))]
        self.stopping = False
        # Every backend: what the file, the operator and health say, what the
        # workers' pools hold (and what a restarted worker replays), its index
        # in the pools (the conntrack path's mark).
        self.backends = BackendStates(config, families)
        self._forget_again: list[tuple[float, int]] = []
        self.operator = Operator(self)
        self.control: ControlServer | None = None
        self.web: StatusServer | None = None
        self._status: Status | None = None  # the HTTP server's threads read it
        self._qids = itertools.count(1)
        self._queries: dict[int, _Query] = {}
        self._reload_requested = False
        self._started_wall = time.time()
        self._counters: dict[int, tuple[int, int]] = {}
        self._invalid = 0
        self._learned: list[tuple[bytes, int]] = []  # (packed client, mark) decided
        self._retired: dict[tuple[str, str], Counter[str]] = {}
        self._wake_r, self._wake_w = os.pipe()
        self._started = time.monotonic()

    # --- workers -------------------------------------------------------------

    def _spawn(self, child: _Child) -> None:
        r, w = os.pipe()
        cr, cw = os.pipe()
        try:
            pid = os.fork()
        except OSError as e:
            for fd in (r, w, cr, cw):
                os.close(fd)
            child.restart_at = time.monotonic() + RESTART_DELAY
            log.error("event=fork-failed queue=%d error=%s", child.spec.queue, e)
            return
        if pid == 0:  # the worker
            code = 1
            try:
                os.close(r)
                os.close(cw)
                os.close(self._wake_r)
                os.close(self._wake_w)
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                os.set_blocking(cr, False)
                # Never block on the supervisor: a report that does not fit waits
                # (bounded) or, for the kernel's client memory, is dropped.
                os.set_blocking(w, False)
                _close_inherited(keep={w, cr})
                engine = build_engine(self.config, time.monotonic(), self.families,
                                      worker=child.spec.index,
                                      indexes=self.backends.indexes(),
                                      workers=len(self.children))
                code = Worker(child.spec, engine, w, cr).run()
            except BaseException:
                log.exception("event=worker-failed queue=%d", child.spec.queue)
            finally:
                os._exit(code)
        os.close(w)
        os.close(cr)
        os.set_blocking(r, False)
        if child.control >= 0:
            os.close(child.control)
        child.pid, child.fd, child.buf, child.ready, child.control = pid, r, b"", False, cw
        # A new worker starts from the config: bring it up to date first.
        for command in self.backends.replay():
            self._send(child, command)
        log.info("event=worker-started queue=%d core=%d pid=%d", child.spec.queue,
                 child.spec.core, pid)

    def command(self, command: PoolCommand) -> None:
        """Send a pool command (as ``self.backends`` gave it) to every worker, and
        through the replay to every future one."""
        vip, ip = command.vip, command.backend
        was_empty = next(self.backends.serving(vip), None) is None
        command = self.backends.sent(command)
        if isinstance(command, AddBackend) and self.plan.nft:
            try:
                self.kernel.map_backend(ip.version, self.backends.index_of(vip, ip), ip)
            except KernelError as e:  # the workers may still use it; NAT would not
                log.error("event=backend-not-mapped backend=%s error=%s", ip, e)
        for child in self.children:
            if child.pid:
                self._send(child, command)
        # What the kernel must forget now is the data path's to say.
        forget = self.plan.datapath.forgets(command, was_empty)
        if forget.backend:
            mark = self.backends.mark_of(vip, ip)
            self._forget(mark, connections=forget.connections, clients=forget.clients)
            if forget.again:
                self._forget_again.append((time.monotonic() + FORGET_AGAIN, mark))
        if forget.unbalanced:
            self._forget_unbalanced()

    def _forget(self, mark: int, connections: bool = True, clients: bool = True) -> None:
        n = forgotten = 0  # connections, clients
        if connections:
            try:
                n = self.kernel.forget_connections(mark)
            except Exception as e:  # netlink trouble must not take the supervisor down
                log.warning("event=conntrack-flush-failed mark=%#x error=%r", mark, e)
        if clients:
            try:
                forgotten = self.kernel.forget_clients(mark)
            except Exception as e:
                log.warning("event=clients-not-forgotten mark=%#x error=%r", mark, e)
        if n or forgotten:
            log.info("event=connections-cut mark=%#x connections=%d clients=%d", mark, n,
                     forgotten)

    def _forget_due(self, now: float) -> None:
        """The second forgetting of backends cut a moment ago (see ``command``)."""
        while self._forget_again and self._forget_again[0][0] <= now:
            mark = self._forget_again.pop(0)[1]
            if mark not in self._serving_marks():  # not enabled again meanwhile
                self._forget(mark)

    def _forget_unbalanced(self) -> None:
        """Connections to a VIP that conntrack took while no backend was up (or the
        daemon was away, fail-open) are bound to the balancer's own stack; a UDP
        flow that keeps sending would stay so. Forget them: their next packet is new."""
        try:
            n = self.kernel.forget_unbalanced(self.vips())
        except Exception as e:
            log.warning("event=conntrack-flush-failed what=unbalanced error=%r", e)
            return
        if n:
            log.info("event=unbalanced-forgotten connections=%d", n)

    def _serving_marks(self) -> set[int]:
        return {self.backends.mark_of(*key) for key in self.backends.serving()}

    def _remember_clients(self) -> None:
        """The workers' decisions into the kernel's client maps, except for backends
        that are down by now (their clients are decided again)."""
        learned, self._learned = self._learned, []
        serving = self._serving_marks()
        entries = []
        for client, mark in learned:
            if mark in serving:
                entries.append((ipaddress.ip_address(client), mark))
        try:
            self.kernel.remember_clients(entries, int(self.config.client_timeout))
        except Exception as e:
            log.warning("event=clients-not-recalled count=%d error=%r", len(entries), e)

    # --- the operator's view ---------------------------------------------------

    def vips(self) -> list[str]:
        return [str(self.config.family(f).vip) for f in self.families]

    def own_addresses(self) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        try:
            return set(self.kernel.own_addresses())
        except Exception:
            return set()

    def watch(self, vip: IPAddress, ip: IPAddress) -> None:
        if self.health is not None:
            self.health.watch(vip, ip)
        self._pin_later(ip)

    def _pin_later(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
        """A backend that joined at run time: its neighbour entry is pinned by the
        main loop's retries."""
        if self.config.private_nic:
            self.kernel.unresolved.append(Neighbour(self.config.private_nic, ip))

    def unwatch(self, vip: IPAddress, ip: IPAddress) -> None:
        if self.health is not None:
            self.health.unwatch(vip, ip)

    # --- questions to the workers ------------------------------------------------

    def ask(self, query: Query | None, done: Callable[[list[Reply]], None],
            timeout: float, only: dict[int, Query] | None = None) -> None:
        """Send ``query`` (or, per worker index, ``only``'s query) to the workers
        that run; ``done(replies)`` runs in the main loop."""
        qid = next(self._qids)
        targets = [c for c in self.children if c.pid and c.control >= 0
                   and (only is None or c.spec.index in only)]
        q = _Query({c.spec.index for c in targets}, done, time.monotonic() + timeout)
        if not targets:
            done([])
            return
        self._queries[qid] = q
        for c in targets:
            body = query if only is None else only[c.spec.index]
            assert body is not None
            self._send(c, dataclasses.replace(body, id=qid))

    def _on_reply(self, child: _Child, reply: Reply) -> None:
        q = self._queries.get(reply.id)
        if q is None:
            return
        q.replies.append(reply)
        q.expected.discard(child.spec.index)
        if not q.expected:
            del self._queries[reply.id]
            q.done(q.replies)

    def _expire_queries(self, now: float) -> None:
        for qid, q in list(self._queries.items()):
            if now >= q.deadline or not any(
                    c.pid for c in self.children if c.spec.index in q.expected):
                del self._queries[qid]
                log.warning("event=query-incomplete missing=%s", sorted(q.expected))
                q.done(q.replies)

    def _wait_queries(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._queries and time.monotonic() < deadline:
            self._poll(0.05)
            self._expire_queries(time.monotonic())

    # --- status ------------------------------------------------------------------

    def status(self) -> Status:
        now = time.monotonic()
        health = self.health.status() if self.health is not None else []
        states = self.backends
        extra = {(str(v), str(ip)): dict(entry.to_json(), mark=states.mark_of(v, ip))
                 for (v, ip), entry in states.pooled()}
        known = states.keys()
        endpoints: dict[str, str] = {}
        if self.web is not None:
            endpoints = {"status": self.web.url + "/", "metrics": self.web.url + "/metrics"}
        if self.control is not None:
            endpoints["control"] = self.control.path
        workers = [dict(c.last, restarts=c.restarts, alive=c.pid != 0, index=c.spec.index,
                        queue=c.spec.queue) for c in self.children]
        kernel = self.plan.datapath.kernel_view(self._counters, self._invalid)
        return build_status(
            daemon={"pid": os.getpid(), "tag": self.plan.tag, "config": self.config_path,
                    "version": __version__, "uptime": now - self._started,
                    "started_at": self._started_wall},
            vips=[(f, v) for f, v in zip(self.families, self.vips(), strict=True)],
            strategy=self.config.strategy, datapath=self.plan.datapath.name, workers=workers,
            health=health,
            admin={(str(v), str(ip)): states.admin(v, ip).value for v, ip in known},
            transitions={(str(v), str(ip)): states.transitions(v, ip) for v, ip in known},
            counters=kernel.counters, reply_counters=kernel.reply_counters,
            kernel_queues={str(k): v for k, v in read_proc_stats().items()
                           if k in self.plan.queues},
            endpoints=endpoints, now_mono=now, now_wall=time.time(), extra_backends=extra,
            retired=self._retired,
            client_table_max=(table_share(self.config.client_table_max, len(self.children))
                              * len(self.children)),
            kernel_drops=kernel.kernel_drops)

    def _cached_status(self) -> Status:
        # The HTTP server's threads: the main loop refreshes this once a second.
        if self._status is None:  # the server starts just before the first one
            raise RuntimeError("no status yet")
        return self._status

    def _start_servers(self) -> None:
        path = self.config.control_socket or socket_path(self.plan.tag)
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.control = ControlServer(path, self.operator.handle,
                                         group=self.config.control_group)
        except (OSError, KeyError) as e:
            log.error("event=control-socket-failed path=%s error=%s", path, e)
        listen = self.config.status_listen
        if listen is not None:
            try:
                self.web = StatusServer(listen[0], listen[1], self._cached_status)
                self.web.start()
            except OSError as e:
                log.error("event=status-server-failed listen=%s:%d error=%s", *listen, e)
                self.web = None
        self._status = self.status()
        log.info("event=control-ready socket=%s status=%s",
                 self.control.path if self.control else "-",
                 self.web.url if self.web else "-")

    @staticmethod
    def _send(child: _Child, message: PoolCommand | Query) -> None:
        view = memoryview(encode(message))
        try:
            while view:  # a write cut short by a signal must not cut the line
                view = view[os.write(child.control, view):]
        except OSError as e:  # a dying worker: its replacement replays everything
            log.warning("event=command-lost queue=%d error=%s", child.spec.queue, e)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for child in self.children:
                if child.pid == pid:
                    child.pid = 0
                    if child.fd >= 0:
                        self._read(child)
                        os.close(child.fd)
                        child.fd = -1
                    self._retire(child.last)
                    if self.stopping:
                        _log_final(child)
                    child.last = {}
                    if not self.stopping:
                        child.restarts += 1
                        child.restart_at = time.monotonic() + RESTART_DELAY
                        log.warning("event=worker-died queue=%d status=%s restart_in=%.1fs",
                                    child.spec.queue, _status(status), RESTART_DELAY)

    def _retire(self, last: dict[str, Any]) -> None:
        """Keep a dead worker's totals, so that counters never go down."""
        for vip, svc in last.get("services", {}).items():
            for ip, b in svc.get("backends", {}).items():
                carried = self._retired.setdefault((vip, ip), Counter())
                for key in ("packets", "bytes", "new_clients"):
                    carried[key] += int(b.get(key, 0))

    def _read(self, child: _Child) -> None:
        try:
            while True:
                data = os.read(child.fd, 65536)
                if not data:
                    break
                child.buf += data
        except BlockingIOError:
            pass
        *lines, child.buf = child.buf.split(b"\n")
        for line in lines:
            try:
                msg = decode(line)
            except MessageError as e:
                log.warning("event=bad-report queue=%d error=%s", child.spec.queue, e)
                continue
            if isinstance(msg, Reply):
                self._on_reply(child, msg)
            elif isinstance(msg, Learned):
                self._learned.extend(msg.clients)
            elif isinstance(msg, Report):
                child.last = dict(msg.snapshot)
                child.ready = True

    # --- main loop -----------------------------------------------------------

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        signal.signal(signal.SIGCHLD, self._ignore)
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w)
        try:
            self.kernel.recover()
        except KernelError as e:  # e.g. this instance already runs: leave it alone
            log.error("event=startup-failed error=%s", e)
            return 1
        taken = {q: owner for q in self.plan.queues if (owner := queue_owner(q)) is not None}
        if taken:
            # Another daemon (or program) reads these queues: refuse before
            # anything changes, and say whose they are and how to pick others.
            for q, owner in sorted(taken.items()):
                log.error("event=startup-failed reason=queue-in-use queue=%d owner=%r", q,
                          owner)
            log.error("event=startup-failed hint=%r", "give this instance other queues with "
                      f"FIRST_CORE= and LAST_CORE= (now {min(self.plan.queues)}.."
                      f"{max(self.plan.queues)}) in {self.config_path}")
            return 1
        try:
            self.kernel.apply_base()
            self._start_servers()  # before the supervisor gives up privileges
            limit_supervisor()
            for child in self.children:
                self._spawn(child)
            if not self._wait_ready():
                log.error("event=startup-failed reason=workers-not-ready")
                return 1
            if self.config.persist_clients:
                self._restore_tables()
            self.kernel.apply_rules()
            if self.plan.datapath.at_start().unbalanced:
                self._forget_unbalanced()
            if self.failover:
                self._start_health()
            log.info("event=started tag=%s families=%s workers=%d failover=%s", self.plan.tag,
                     ",".join(map(str, self.families)), len(self.children),
                     "on" if self.failover else "off")
            self._loop()
            return 0
        except KernelError as e:
            log.error("event=kernel-setup-failed error=%s", e)
            return 1
        finally:
            self._shutdown()

    def _restore_tables(self) -> None:
        queries = self.operator.restore_queries()
        if not queries:
            return

        def done(replies: list[Reply]) -> None:
            restored = sum(int((r.result or {}).get("restored", 0)) for r in replies
                           if r.error is None)
            errors = [r.error for r in replies if r.error is not None]
            log.info("event=clients-restored count=%d workers=%d errors=%s", restored,
                     len(replies), errors[:1] or "none")

        self.ask(None, done, 10.0, only=queries)
        self._wait_queries(10.0)

    def _save_tables(self) -> None:
        self.ask(DumpQuery(), self.operator.save_tables, 5.0)
        self._wait_queries(5.0)

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline and not self.stopping:
            self._poll(0.1)
            if all(c.ready for c in self.children):
                return True
            if any(c.pid == 0 for c in self.children):
                return False
        return False

    # --- health ----------------------------------------------------------------

    def _start_health(self) -> None:
        own = self.kernel.own_addresses()
        monitor = HealthMonitor.from_config(self.config, time.monotonic(), self.families,
                                            own=own)
        self.health = HealthRunner(monitor, self._on_health_event).start()

    def _on_health_event(self, event: Event) -> None:
        # The runner's thread: hand over to the main loop and wake it up.
        self._events.put(event)
        try:
            os.write(self._wake_w, b"h")
        except BlockingIOError:
            pass

    def _apply_health_events(self) -> None:
        cut = self.config.on_backend_down == "cut"
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            # What health, the operator and the (possibly reloaded) configured
            # state add up to, not the state the monitor was built with.
            command = self.backends.health(event, cut=cut)
            if command is None:
                if isinstance(event, StateChanged):
                    admin = self.backends.admin(event.vip, event.ip)
                    if admin not in HEALTH_FOLLOWS:
                        log.info("event=health-not-applied vip=%s backend=%s up=%s admin=%s",
                                 event.vip, event.ip, event.up, admin.value)
                continue
            self.command(command)
            if isinstance(event, HostAdded):
                self._pin_later(event.ip)

    def _loop(self) -> None:
        next_stats = next_neigh = 0.0
        while not self.stopping:
            self._poll(0.5)
            self._apply_health_events()
            now = time.monotonic()
            for child in self.children:
                if child.pid == 0 and now >= child.restart_at:
                    self._spawn(child)
            self._expire_queries(now)
            if self._reload_requested:
                self._reload_requested = False
                try:
                    self.operator.reload(dry_run=False)
                except Exception as e:  # a bad file or a kernel refusal: keep running
                    log.error("event=reload-failed error=%s", str(e).replace("\n", "; "))
            if now >= next_stats:
                next_stats = now + 1.0
                self.write_stats()
            self._forget_due(now)
            if self.kernel.unresolved and now >= next_neigh:
                next_neigh = now + NEIGHBOUR_RETRY
                self.kernel.unresolved = self.kernel.pin_neighbours(self.kernel.unresolved,
                                                                    wait=0.5)

    def _poll(self, timeout: float) -> None:
        fds = [self._wake_r] + [c.fd for c in self.children if c.fd >= 0]
        wfds: list[int] = []
        control = self.control
        if control is not None:
            fds += control.read_fds()
            wfds = control.write_fds()
            nxt = control.next_timeout()
            if nxt is not None:
                timeout = max(0.0, min(timeout, nxt))
        try:
            readable, writable, _ = select.select(fds, wfds, [], timeout)
        except InterruptedError:
            readable, writable = [], []
        if self._wake_r in readable:
            try:
                os.read(self._wake_r, 512)
            except BlockingIOError:
                pass
        self._reap()
        for child in self.children:
            if child.fd >= 0 and child.fd in readable:
                self._read(child)
        if self._learned:
            self._remember_clients()
        if control is not None:
            for fd in readable:
                if fd in control.read_fds():
                    control.on_readable(fd)
            for fd in writable:
                control.on_writable(fd)
            control.tick()

    def write_stats(self) -> None:
        """The stats file, and the status snapshot the HTTP server's threads read,
        from one reading of the kernel's counters and queues."""
        if self.plan.nft:
            try:
                self._counters, self._invalid = self.kernel.kernel_counters()
            except Exception as e:
                log.warning("event=counters-unreadable error=%r", e)
        self._status = self.status()
        stats = {
            "tag": self.plan.tag,
            "pid": os.getpid(),
            "uptime": time.monotonic() - self._started,
            "workers": [dict(c.last, restarts=c.restarts, alive=c.pid != 0,
                             index=c.spec.index, queue=c.spec.queue)
                        for c in self.children],
            "kernel_queues": self._status.to_json()["kernel_queues"],
            "unresolved_neighbours": [str(n.ip) for n in self.kernel.unresolved],
            "datapath": self.plan.datapath.name,
        }
        stats.update(self.plan.datapath.kernel_view(self._counters, self._invalid).stats)
        try:
            write_atomic(self.stats_path, json.dumps(stats))
        except OSError as e:
            log.warning("event=stats-write-failed error=%s", e)

    def _shutdown(self) -> None:
        clean = self.stopping and any(c.ready and c.pid for c in self.children)
        self.stopping = True
        if self.health is not None:
            self.health.stop()
        if clean and self.config.persist_clients:
            self._save_tables()
        if self.web is not None:
            self.web.stop()
            self.web = None
        if self.control is not None:
            self.control.close()
            self.control = None
        for child in self.children:
            if child.pid:
                try:
                    os.kill(child.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + STOP_TIMEOUT
        while any(c.pid for c in self.children) and time.monotonic() < deadline:
            self._poll(0.05)
        for child in self.children:
            if child.pid:
                try:
                    os.kill(child.pid, signal.SIGKILL)
                    os.waitpid(child.pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
                child.pid = 0
        # The stats file describes a running daemon: gone with it (the workers'
        # totals are in the log, one worker-stopped line each).
        try:
            self.stats_path.unlink()
        except FileNotFoundError:
            pass
        self.kernel.undo()
        self.kernel.close()
        log.info("event=stopped tag=%s", self.plan.tag)

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _on_hup(self, signum: int, frame: object) -> None:
        self._reload_requested = True

    def _ignore(self, signum: int, frame: object) -> None:
        pass


def _log_final(child: _Child) -> None:
    """A stopped worker's totals, in the log: the stats file goes with the daemon."""
    last: dict[str, Any] = child.last
    drops = ",".join(f"{k}:{v}" for k, v in sorted(last.get("drops", {}).items())) or "-"
    log.info("event=worker-stopped index=%d queue=%d pid=%s packets=%d accepted=%d dropped=%d "
             "drops=%s overruns=%d verdict_errors=%d cpu_seconds=%.2f restarts=%d",
             child.spec.index, child.spec.queue, last.get("pid", "-"),
             int(last.get("packets", 0)), int(last.get("accepted", 0)),
             int(last.get("dropped", 0)), drops, int(last.get("overruns", 0)),
             sum(last.get("verdict_errors", {}).values()),
             float(last.get("cpu_seconds", 0.0)), child.restarts)


def _status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal-{os.WTERMSIG(status)}"
    return f"exit-{os.WEXITSTATUS(status)}"


def _close_inherited(keep: set[int]) -> None:
    """In a new worker: close every descriptor the supervisor had open (netlink,
    nftables and health-probe sockets, the control and status servers, other
    workers' pipes) except the worker's own pipes, stdio and the log's."""
    for handler in logging.getLogger().handlers:
        for attr in ("socket", "stream"):
            obj = getattr(handler, attr, None)
            try:
                keep.add(obj.fileno())  # type: ignore[union-attr]
            except (AttributeError, OSError, ValueError):
                pass
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return
    for fd in fds:
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
