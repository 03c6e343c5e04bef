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

This module is the start-up, the shutdown and the loop, and wires the parts,
each the one owner of its state:

==========================  =====================================================
``loaded.daemon.workers``   the children: fork, pipes, reap, restart, replay
``loaded.daemon.queries``   questions to the workers and their answers
``loaded.daemon.kernelsync``  the kernel in step with the pools (the data path's
                            table, conntrack, the client maps), its counters
``loaded.daemon.operator``  the control socket's commands, reload, saved tables
``loaded.core.backends``    every backend's state (file x operator x health)
==========================  =====================================================

Here: the health runner's events handed to the main loop, the status snapshot
and the stats file, the control and status servers, signals.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import queue
import select
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loaded import __version__
from loaded.control.protocol import socket_path
from loaded.control.server import ControlServer
from loaded.control.web import StatusServer
from loaded.core.backends import HEALTH_FOLLOWS, BackendStates
from loaded.core.commands import AddBackend, DumpQuery, PoolCommand, Query, Reply
from loaded.core.config import Config
from loaded.core.engine import Engine, build_engine, table_share
from loaded.core.health import (
    Event,
    HealthMonitor,
    HostAdded,
    StateChanged,
)
from loaded.core.plan import Neighbour, Plan
from loaded.core.pool import IPAddress
from loaded.core.status import Status
from loaded.daemon.kernelsync import KernelSync
from loaded.daemon.operator import Operator
from loaded.daemon.queries import Queries
from loaded.daemon.status import build_status
from loaded.daemon.worker import WorkerSpec
from loaded.daemon.workers import Child, Workers
from loaded.io.files import write_atomic
from loaded.io.kernel import JOURNAL_DIR, Kernel, KernelError
from loaded.io.nfqueue import queue_owner, read_proc_stats
from loaded.io.privileges import limit_supervisor
from loaded.io.probes import HealthRunner

log = logging.getLogger("loaded.supervisor")

READY_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
NEIGHBOUR_RETRY = 5.0


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
        self.stopping = False
        # Every backend: what the file, the operator and health say, what the
        # workers' pools hold (and what a restarted worker replays), its index
        # in the pools (the conntrack path's mark).
        self.backends = BackendStates(config, families)
        self._wake_r, self._wake_w = os.pipe()
        self.queries = Queries()
        # The workers' pools as the kernel's hash table must follow them: built
        # as a worker's engine is, given every command they get.
        mirror = (build_engine(config, time.monotonic(), families,
                               indexes=self.backends.indexes())
                  if plan.hashing is not None else None)
        self.sync = KernelSync(self.kernel, plan, self.backends, self.vips, mirror)
        self.workers = Workers(
            (WorkerSpec(i, q, core, maxlen, plan.queue_bypass, config.gso, user,
                        drop_privileges, refuse_when_empty=config.no_backend == "refuse",
                        datapath=plan.datapath)
             for i, (q, core) in enumerate(zip(plan.queues, plan.cores, strict=True))),
            make_engine=self._engine, replay=self.backends.replay,
            on_reply=self.queries.on_reply,
            on_exit=lambda child: self._retire(child.last),
            private_fds=(self._wake_r, self._wake_w))
        self.operator = Operator(self)
        self.control: ControlServer | None = None
        self.web: StatusServer | None = None
        self._status: Status | None = None  # the HTTP server's threads read it
        self._reload_requested = False
        self._started_wall = time.time()
        self._retired: dict[tuple[str, str], Counter[str]] = {}
        self._started = time.monotonic()

    # --- workers -------------------------------------------------------------

    @property
    def children(self) -> list[Child]:
        """The workers (owned by ``self.workers``)."""
        return self.workers.children

    def _engine(self, spec: WorkerSpec) -> Engine:
        """A new worker's engine (in the worker, after the fork): the config as it
        is now, the pools numbered as the kernel's maps."""
        return build_engine(self.config, time.monotonic(), self.families, worker=spec.index,
                            indexes=self.backends.indexes(), workers=len(self.children))

    def command(self, command: PoolCommand) -> None:
        """Send a pool command (as ``self.backends`` gave it) to every worker, and
        through the replay to every future one."""
        vip, ip = command.vip, command.backend
        was_empty = next(self.backends.serving(vip), None) is None
        command = self.backends.sent(command)
        if isinstance(command, AddBackend):
            self.sync.map_backend(vip, ip)
        self.workers.broadcast(command)
        self.sync.after(command, was_empty)

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
        targets = [c.spec.index for c in self.workers.running()
                   if only is None or c.spec.index in only]
        self.queries.ask(targets, self.workers.send_to, query, done, timeout, only)

    def _wait_queries(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.queries and time.monotonic() < deadline:
            self._poll(0.05)
            self.queries.expire(time.monotonic(), self.workers.alive())

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
        kernel = self.sync.view()
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
            kernel_drops=kernel.kernel_drops, kernel_hash=kernel.kernel_hash)

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
            # The status server's sampler asks at once: a first snapshot before it
            # starts (its own address comes with the next one, just below).
            self._status = self.status()
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

    def _retire(self, last: dict[str, Any]) -> None:
        """Keep a dead worker's totals, so that counters never go down."""
        for vip, svc in last.get("services", {}).items():
            for ip, b in svc.get("backends", {}).items():
                carried = self._retired.setdefault((vip, ip), Counter())
                for key in ("packets", "bytes", "new_clients"):
                    carried[key] += int(b.get(key, 0))

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
            self.workers.start()
            if not self._wait_ready():
                log.error("event=startup-failed reason=workers-not-ready")
                return 1
            if self.config.persist_clients:
                self._restore_tables()
            self.kernel.apply_rules()
            self.sync.start()
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
            if self.workers.all_ready():
                return True
            if self.workers.any_dead():
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
            self.workers.restart_due(now)
            self.queries.expire(now, self.workers.alive())
            if self._reload_requested:
                self._reload_requested = False
                try:
                    self.operator.reload(dry_run=False)
                except Exception as e:  # a bad file or a kernel refusal: keep running
                    log.error("event=reload-failed error=%s", str(e).replace("\n", "; "))
            if now >= next_stats:
                next_stats = now + 1.0
                self.write_stats()
            self.sync.forget_due(now)
            if self.kernel.unresolved and now >= next_neigh:
                next_neigh = now + NEIGHBOUR_RETRY
                self.kernel.unresolved = self.kernel.pin_neighbours(self.kernel.unresolved,
                                                                    wait=0.5)

    def _poll(self, timeout: float) -> None:
        fds = [self._wake_r, *self.workers.fds()]
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
        self.workers.reap(self.stopping)
        self.workers.read_ready(readable)
        if control is not None:
            control.on_ready(readable, writable)

    def write_stats(self) -> None:
        """The stats file, and the status snapshot the HTTP server's threads read,
        from one reading of the kernel's counters and queues."""
        self.sync.read_counters()
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
        stats.update(self.sync.view().stats)
        try:
            write_atomic(self.stats_path, json.dumps(stats))
        except OSError as e:
            log.warning("event=stats-write-failed error=%s", e)

    def _shutdown(self) -> None:
        clean = self.stopping and self.workers.any_ready_alive()
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
        self.workers.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.workers.any_alive() and time.monotonic() < deadline:
            self._poll(0.05)
        self.workers.kill()
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

