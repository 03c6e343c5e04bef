"""The supervisor's children: one worker process per queue, its two pipes, its
start, death and restart.

Rules:

- This module owns the children (``Child``: pid, pipes, the last report, ready,
  restarts); nobody else forks, reaps, reads a report pipe or writes a command
  pipe.
- A new worker (the first, or a restarted one) starts from the config; before
  anything else it is sent the replay (``replay()``: every pool change so far),
  so that all workers' pools agree.
- A worker that dies is restarted ``RESTART_DELAY`` later (``restart_due``),
  unless the daemon is stopping; either way its last report goes to
  ``on_exit`` first (the supervisor keeps its totals, so that counters never
  go down) and, when stopping, its totals are logged (``worker-stopped``).
- Reports arrive one message per line (``loaded.core.commands``); a reply goes
  to ``on_reply``, a report becomes the
  child's ``last`` and marks it ready. A line that does not decode is logged
  and skipped.
- A write to a dying worker's pipe may fail: logged, and its replacement gets
  the replay.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from loaded.core.commands import (
    MessageError,
    PoolCommand,
    Query,
    Reply,
    Report,
    decode,
    encode,
)
from loaded.core.engine import Engine
from loaded.daemon.worker import Worker, WorkerSpec

log = logging.getLogger("loaded.supervisor")

RESTART_DELAY = 1.0


@dataclass
class Child:
    spec: WorkerSpec
    pid: int = 0
    fd: int = -1
    control: int = -1  # write end of the worker's command pipe
    buf: bytes = b""
    last: dict[str, object] = field(default_factory=dict)
    ready: bool = False
    restart_at: float = 0.0
    restarts: int = 0


class Workers:
    def __init__(self, specs: Iterable[WorkerSpec], *,
                 make_engine: Callable[[WorkerSpec], Engine],
                 replay: Callable[[], Iterable[PoolCommand]],
                 on_reply: Callable[[int, Reply], None],
                 on_exit: Callable[[Child], None],
                 private_fds: tuple[int, ...] = ()) -> None:
        self.children = [Child(spec) for spec in specs]
        self._make_engine = make_engine  # in the new worker, after the fork
        self._replay = replay
        self._on_reply = on_reply
        self._on_exit = on_exit
        self._private_fds = private_fds  # the supervisor's own, closed in a worker

    # --- what runs -----------------------------------------------------------------

    def fds(self) -> list[int]:
        """The report pipes to watch."""
        return [c.fd for c in self.children if c.fd >= 0]

    def running(self) -> list[Child]:
        """The workers that run and can be sent messages."""
        return [c for c in self.children if c.pid and c.control >= 0]

    def alive(self) -> set[int]:
        """The indexes of the workers that run."""
        return {c.spec.index for c in self.children if c.pid}

    def all_ready(self) -> bool:
        return all(c.ready for c in self.children)

    def any_dead(self) -> bool:
        return any(c.pid == 0 for c in self.children)

    def any_alive(self) -> bool:
        return any(c.pid for c in self.children)

    def any_ready_alive(self) -> bool:
        return any(c.ready and c.pid for c in self.children)

    # --- start, death, restart -------------------------------------------------------

    def start(self) -> None:
        for child in self.children:
            self.spawn(child)

    def restart_due(self, now: float) -> None:
        for child in self.children:
            if child.pid == 0 and now >= child.restart_at:
                self.spawn(child)

    def spawn(self, child: Child) -> None:
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
                for fd in self._private_fds:
                    os.close(fd)
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                os.set_blocking(cr, False)
                # Never block on the supervisor: a report that does not fit waits
                # (bounded) or, for the kernel's client memory, is dropped.
                os.set_blocking(w, False)
                _close_inherited(keep={w, cr})
                engine = self._make_engine(child.spec)
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
        for command in self._replay():
            self.send(child, command)
        log.info("event=worker-started queue=%d core=%d pid=%d", child.spec.queue,
                 child.spec.core, pid)

    def reap(self, stopping: bool) -> None:
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
                        self.read(child)
                        os.close(child.fd)
                        child.fd = -1
                    self._on_exit(child)
                    if stopping:
                        _log_final(child)
                    child.last = {}
                    if not stopping:
                        child.restarts += 1
                        child.restart_at = time.monotonic() + RESTART_DELAY
                        log.warning("event=worker-died queue=%d status=%s restart_in=%.1fs",
                                    child.spec.queue, _exit_status(status), RESTART_DELAY)

    def terminate(self) -> None:
        """SIGTERM to every worker that runs."""
        for child in self.children:
            if child.pid:
                try:
                    os.kill(child.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def kill(self) -> None:
        """SIGKILL to every worker still there (it did not stop in time), and reap it."""
        for child in self.children:
            if child.pid:
                try:
                    os.kill(child.pid, signal.SIGKILL)
                    os.waitpid(child.pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
                child.pid = 0

    # --- the pipes -------------------------------------------------------------------

    def read_ready(self, readable: Iterable[int]) -> None:
        ready = set(readable)
        for child in self.children:
            if child.fd >= 0 and child.fd in ready:
                self.read(child)

    def read(self, child: Child) -> None:
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
                self._on_reply(child.spec.index, msg)
            elif isinstance(msg, Report):
                child.last = dict(msg.snapshot)
                child.ready = True

    def broadcast(self, message: PoolCommand) -> None:
        """``message`` to every worker that runs (a dead one gets it in its replay)."""
        for child in self.children:
            if child.pid:
                self.send(child, message)

    def send_to(self, index: int, message: PoolCommand | Query) -> None:
        self.send(self.children[index], message)

    @staticmethod
    def send(child: Child, message: PoolCommand | Query) -> None:
        view = memoryview(encode(message))
        try:
            while view:  # a write cut short by a signal must not cut the line
                view = view[os.write(child.control, view):]
        except OSError as e:  # a dying worker: its replacement replays everything
            log.warning("event=command-lost queue=%d error=%s", child.spec.queue, e)


def _log_final(child: Child) -> None:
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


def _exit_status(status: int) -> str:
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
