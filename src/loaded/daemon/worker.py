"""A worker: one queue, one core, one engine, no privileges beyond the queue's.

Everything the packet loop needs is imported, opened and exercised before the
chroot, because nothing can be loaded from disk afterwards.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from loaded.core.checksum import ones_sum
from loaded.core.commands import (
    ClientsQuery,
    DumpQuery,
    LookupQuery,
    MessageError,
    PoolCommand,
    PreviewQuery,
    Query,
    Reply,
    Report,
    decode,
    encode,
)
from loaded.core.config import Config
from loaded.core.datapath import DataPath
from loaded.core.datapath import datapath as datapath_named
from loaded.core.engine import Engine
from loaded.core.errors import PacketError, Reason
from loaded.core.persist import dump_tables, list_clients, restore_tables
from loaded.core.preview import lookup_client, preview
from loaded.io.nfqueue import ACCEPT, ACCEPT_UNCHANGED, DROP, LATENCY_BOUNDS, NfQueue
from loaded.io.privileges import WORKER_CAPS, drop_privileges

log = logging.getLogger("loaded.worker")

INTERNAL_ERROR = "internal-error"
REPORT_EVERY = 1.0


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    queue: int
    core: int
    maxlen: int
    fail_open: bool
    gso: bool
    user: str | None
    drop_privileges: bool = True
    refuse_when_empty: bool = True  # no_backend=refuse
    # Which handler every queued packet goes to (``DataPath.packet_handler``).
    datapath: DataPath = field(default_factory=lambda: datapath_named(Config.datapath))


def _latency(q: NfQueue | None) -> dict[str, object]:
    """The queue's user-space latency histogram as cumulative buckets."""
    if q is None:
        return {"buckets": [], "sum": 0.0, "count": 0}
    running = 0
    buckets: list[list[float]] = []
    for bound, n in zip(LATENCY_BOUNDS, q.stats.latency_counts, strict=False):
        running += n
        buckets.append([bound, running])
    return {"buckets": buckets, "sum": q.stats.latency_sum,
            "count": sum(q.stats.latency_counts)}


class Worker:
    def __init__(self, spec: WorkerSpec, engine: Engine, report_fd: int,
                 control_fd: int = -1) -> None:
        self.spec = spec
        self.engine = engine
        self.report_fd = report_fd
        self.control_fd = control_fd
        self._control_buf = b""
        self.drops: Counter[str] = Counter()
        self.refused = 0  # packets refused by the local stack: no backend was up
        self.stopping = False
        self._next_report = 0.0
        self.queue: NfQueue | None = None

    def on_packet(self, payload: memoryview, partial: bool) -> int:
        """The per-packet data path: decide every packet. A plain TCP or UDP packet to
        a VIP goes back as its backend's mark, which the kernel's ``steer`` chain
        turns into the destination (no payload copied back, any checksum state);
        the rest is rewritten here."""
        try:
            now = time.monotonic()
            b = self.engine.steer(payload, now)
            if b is not None:
                return b.mark
            if self.engine.handle(payload, now, partial) is None:
                return ACCEPT_UNCHANGED
        except Exception as e:
            return self._failed(e)
        return ACCEPT

    def on_first_packet(self, payload: memoryview, partial: bool) -> int:
        """The conntrack data path: the backend's mark; kernel NAT does the rest,
        and the kernel remembers the client from the mark (its ``steer`` chain),
        so nothing else leaves the worker."""
        try:
            b = self.engine.decide(payload, time.monotonic())
        except Exception as e:
            return self._failed(e)
        if b is None:
            return ACCEPT_UNCHANGED
        return b.mark

    def _failed(self, e: Exception) -> int:
        if isinstance(e, PacketError):
            if e.reason is Reason.NO_BACKEND and self.spec.refuse_when_empty:
                # Unchanged to the balancer's own stack, which owns the VIP and
                # refuses at once: a reset beats a client hanging on silence.
                self.refused += 1
                return ACCEPT_UNCHANGED
            self.drops[e.reason.value] += 1
            return DROP
        # A bug must cost one packet, never the worker or a queue slot.
        self.drops[INTERNAL_ERROR] += 1
        if self.drops[INTERNAL_ERROR] < 10:
            log.error("event=internal-error queue=%d error=%r", self.spec.queue, e,
                      exc_info=e)
        return DROP

    def tick(self) -> None:
        now = time.monotonic()
        if now < self._next_report:
            return
        self._next_report = now + REPORT_EVERY
        for b in self.engine.settle(now):
            log.info("event=backend-left queue=%d backend=%s", self.spec.queue, b.ip)
        self.report()

    def on_control(self) -> None:
        """Pool commands and queries from the supervisor, one message per line."""
        try:
            data = os.read(self.control_fd, 65536)
        except BlockingIOError:
            return
        if not data:  # the supervisor is gone: so are we
            self.stopping = True
            return
        *lines, self._control_buf = (self._control_buf + data).split(b"\n")
        now = time.monotonic()
        for line in lines:
            try:
                message = decode(line)
                if isinstance(message, PoolCommand):
                    b = self.engine.apply(message, now)
                elif isinstance(message, Query):
                    self.answer(message)
                    continue
                else:
                    raise MessageError(f"{message.type} is no message for a worker")
            except (ValueError, KeyError) as e:  # garbage, or a command the pool refuses
                log.warning("event=bad-command queue=%d command=%r error=%s", self.spec.queue,
                            line[:200], e)
                continue
            log.debug("event=applied queue=%d op=%s backend=%s state=%s", self.spec.queue,
                      message.op, b.ip, b.state.value)

    def answer(self, query: Query) -> None:
        """A question from the supervisor (for the control socket): answered on the
        report pipe by a ``Reply`` with its result or error."""
        now = time.monotonic()
        result: Any = None
        error: str | None = None
        try:
            if isinstance(query, PreviewQuery):
                result = preview(self.engine, query.command, now).to_json()
            elif isinstance(query, LookupQuery):
                result = lookup_client(self.engine, str(query.client), now)
            elif isinstance(query, ClientsQuery):
                result = list_clients(self.engine, now,
                                      None if query.vip is None else str(query.vip),
                                      query.limit)
            elif isinstance(query, DumpQuery):
                result = dump_tables(self.engine, now, time.time())
            else:
                result = restore_tables(self.engine, query.data, now, time.time(),
                                        query.max_age).to_json()
        except (ValueError, KeyError, TypeError, LookupError) as e:
            error = str(e) or type(e).__name__
        self._write(encode(Reply(query.id, self.spec.index, result, error)))

    def _write(self, data: bytes, timeout: float = 10.0, droppable: bool = False) -> bool:
        """All of ``data`` on the (non-blocking) report pipe: a reply may be far
        larger than the pipe's buffer, so wait for the supervisor to read, within
        ``timeout``. ``droppable``: if the pipe is full, give up at once, before a
        byte of it is written (the stream of lines stays whole)."""
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        while view:
            try:
                n = os.write(self.report_fd, view)
                view = view[n:]
            except BlockingIOError:
                if droppable and len(view) == len(data):
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("event=reply-lost queue=%d bytes=%d", self.spec.queue,
                                len(view))
                    return False
                select.select([], [self.report_fd], [], min(left, 0.5))
            except BrokenPipeError:
                self.stopping = True
                return False
        return True

    def snapshot(self) -> dict[str, object]:
        q = self.queue
        return {
            "index": self.spec.index,
            "queue": self.spec.queue,
            "pid": os.getpid(),
            "packets": q.stats.packets if q else 0,
            "accepted": q.stats.accepted if q else 0,
            "dropped": q.stats.dropped if q else 0,
            "batches": q.stats.batches if q else 0,
            "overruns": q.stats.overruns if q else 0,
            "truncated": q.stats.truncated if q else 0,
            "verdict_errors": {str(k): v for k, v in (q.stats.verdict_errors if q else {}).items()},
            "drops": dict(self.drops),
            "refused": self.refused,
            "cpu_seconds": time.process_time(),
            "latency": _latency(q),
            "services": {
                str(svc.vip): {
                    "clients": len(svc.table),
                    "backends": {str(b.ip): {"packets": b.packets, "bytes": b.bytes,
                                             "clients": b.clients, "state": b.state.value,
                                             "new_clients": b.new_clients,
                                             "weight": b.weight, "mark": b.mark}
                                 for b in svc.pool},
                } for svc in self.engine.services
            },
        }

    def report(self) -> None:
        # Droppable: the next report, a second later, says it all again.
        self._write(encode(Report(self.snapshot())), timeout=1.0, droppable=True)

    def warm_up(self) -> None:
        """Run the engine's code paths once so nothing is loaded lazily after chroot."""
        for svc in self.engine.services:
            probe = bytearray(60 if svc.version == 4 else 80)
            try:
                self.engine.handle_general(probe, 0.0)
            except PacketError:
                pass
        for call in (self.engine.handle, self.engine.decide):
            try:
                call(bytearray(b"\x45" + bytes(39)), 0.0)
            except PacketError:
                pass
        ones_sum(bytes(1500))  # the numpy branch, for GSO packets
        decode(encode(Report({"warm": 1})))
        time.process_time()

    def run(self) -> int:
        spec = self.spec
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        try:
            os.sched_setaffinity(0, {spec.core})
        except OSError as e:
            log.warning("event=affinity-failed core=%d error=%s", spec.core, e)
        try:
            os.nice(-20)
        except OSError:
            pass
        self.queue = NfQueue(spec.queue, spec.maxlen, fail_open=spec.fail_open, gso=spec.gso)
        self.warm_up()
        if spec.drop_privileges:
            drop_privileges(spec.user, WORKER_CAPS)
        log.info("event=worker-ready queue=%d core=%d pid=%d user=%s", spec.queue, spec.core,
                 os.getpid(), spec.user or "root")
        self.report()
        try:
            watch = {self.control_fd: self.on_control} if self.control_fd >= 0 else {}
            handler = spec.datapath.packet_handler(self)
            self.queue.run(handler, lambda: self.stopping, self.tick, watch=watch)
        finally:
            self.report()
            self.queue.close()
        return 0

    def _stop(self, signum: int, frame: object) -> None:
        self.stopping = True
