"""The kernel's state kept in step with the pools: what the data path's table maps,
the kernel's hash table, what conntrack and the client maps remember, and the
table's counters.

Rules:

- What to do is the data path's to say (``loaded.core.datapath``): after each
  pool command (``after``) and at start-up (``start``); here it is carried out
  through ``loaded.io.kernel``. Nothing here tests which data path runs.
- An added backend becomes a target of its mark before any worker hears of it
  (``map_backend``, called before the command is sent), so that no mark means
  nothing.
- A cut backend is forgotten twice: at once, and ``FORGET_AGAIN`` later, for a
  first packet a worker answered before it heard the news; the second time
  only if the backend does not serve again by then.
- The kernel learns clients itself (a rule of the data path's table): nothing
  here writes a client, only forgets them.
- The kernel's hash table (``Plan.hashing``) is the one every worker builds
  from its pool: this module keeps a copy of the workers' pools (``mirror``,
  an engine without packets, built as theirs and given every command they
  get) and after each command loads the buckets that changed, in one
  transaction, before anything is forgotten (so a forgotten client is not
  hashed back to a backend that just went away).
- Netlink or nftables trouble is logged, never raised: the supervisor keeps
  running, the workers keep deciding.
- This module owns the cut backends waiting for their second forgetting, the
  mirror of the pools, the buckets loaded in the kernel and the last reading
  of the counters.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from loaded.core.backends import BackendStates
from loaded.core.commands import PoolCommand
from loaded.core.datapath import DataPath, Forget, KernelView, nft_hash_buckets
from loaded.core.engine import Engine
from loaded.core.plan import Plan
from loaded.core.pool import IPAddress
from loaded.core.status import KernelHashStatus
from loaded.core.strategies import hash_table
from loaded.io.kernel import Kernel, KernelError

log = logging.getLogger("loaded.supervisor")

FORGET_AGAIN = 0.5


class KernelSync:
    def __init__(self, kernel: Kernel, plan: Plan, backends: BackendStates,
                 vips: Callable[[], list[str]], mirror: Engine | None = None) -> None:
        self.kernel = kernel
        self.datapath: DataPath = plan.datapath
        self._table = bool(plan.nft)  # the plan has an nftables table of ours
        self._tag = plan.tag
        self.hashing = plan.hashing if self._table else None
        self.mirror = mirror if self.hashing is not None else None
        self.buckets: dict[int, list[int]] = {}  # family -> mark per bucket, as loaded
        self.backends = backends
        self._vips = vips
        self.forget_again: list[tuple[float, int]] = []  # (when, mark)
        self.counters: dict[int, tuple[int, int]] = {}  # mark -> (packets, bytes)
        self.invalid = 0  # packets the table dropped as invalid
        self.hashed = 0  # new connections the kernel's hash table decided

    # --- the pools changed -------------------------------------------------------------

    def map_backend(self, vip: IPAddress, ip: IPAddress) -> None:
        if not self._table:
            return
        try:
            self.kernel.map_backend(ip.version, self.backends.index_of(vip, ip), ip)
        except KernelError as e:  # the workers may still use it; NAT would not
            log.error("event=backend-not-mapped backend=%s error=%s", ip, e)

    def after(self, command: PoolCommand, was_empty: bool) -> None:
        """What the kernel must change now that ``command`` went to the workers: the
        hash table's buckets, then what it forgets; ``was_empty``: no backend of
        its VIP served before."""
        if self.mirror is not None:
            try:
                self.mirror.apply(command, time.monotonic())
            except (KeyError, ValueError) as e:  # the workers refused it too
                log.warning("event=mirror-refused command=%s error=%s", command.op, e)
            self.load_hash_tables()
        self._carry_out(self.datapath.forgets(command, was_empty), command)

    def start(self) -> None:
        """Once the rules are in place."""
        self.load_hash_tables()
        self._carry_out(self.datapath.at_start(), None)

    def load_hash_tables(self) -> None:
        """The kernel's hash table of each VIP made equal to the workers' (only the
        buckets that changed)."""
        hashing, mirror = self.hashing, self.mirror
        if hashing is None or mirror is None:
            return
        for svc in mirror.services:
            eligible = svc.pool.eligible()
            table = ([b.mark if b else 0
                      for b in hash_table(hashing.strategy, eligible, hashing.size)]
                     if eligible else [0] * hashing.size)
            commands = nft_hash_buckets(self._tag, svc.vip.version, table,
                                        self.buckets.get(svc.vip.version))
            if commands:
                try:
                    self.kernel.update_hash(commands)
                except KernelError as e:
                    # Left as it was: next time, the whole difference again.
                    log.error("event=hash-table-not-loaded vip=%s error=%s", svc.vip, e)
                    continue
            self.buckets[svc.vip.version] = table

    def _carry_out(self, forget: Forget, command: PoolCommand | None) -> None:
        if forget.backend and command is not None:
            mark = self.backends.mark_of(command.vip, command.backend)
            self.forget(mark, connections=forget.connections, clients=forget.clients)
            if forget.again:
                self.forget_again.append((time.monotonic() + FORGET_AGAIN, mark))
        if forget.unbalanced:
            self.forget_unbalanced()

    def forget(self, mark: int, connections: bool = True, clients: bool = True) -> None:
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

    def forget_due(self, now: float) -> None:
        """The second forgetting of backends cut a moment ago (see the rules)."""
        while self.forget_again and self.forget_again[0][0] <= now:
            mark = self.forget_again.pop(0)[1]
            if mark not in self.serving_marks():  # not enabled again meanwhile
                self.forget(mark)

    def forget_unbalanced(self) -> None:
        """Connections to a VIP that conntrack took while no backend was up (or the
        daemon was away, fail-open) are bound to the balancer's own stack; a UDP
        flow that keeps sending would stay so. Forget them: their next packet is new."""
        try:
            n = self.kernel.forget_unbalanced(self._vips())
        except Exception as e:
            log.warning("event=conntrack-flush-failed what=unbalanced error=%r", e)
            return
        if n:
            log.info("event=unbalanced-forgotten connections=%d", n)

    def serving_marks(self) -> set[int]:
        return {self.backends.mark_of(*key) for key in self.backends.serving()}

    # --- the counters -------------------------------------------------------------------

    def read_counters(self) -> None:
        if self._table:
            try:
                self.counters, named = self.kernel.kernel_counters()
                self.invalid, self.hashed = named.get("invalid", 0), named.get("hashed", 0)
            except Exception as e:
                log.warning("event=counters-unreadable error=%r", e)

    def view(self) -> KernelView:
        """The last reading, as the data path shows it."""
        view = self.datapath.kernel_view(self.counters, self.invalid)
        if self.hashing is None:
            return view
        h = self.hashing
        table = KernelHashStatus(h.strategy, h.size, h.seed, h.decides, h.fallback,
                                 self.hashed)
        return dataclasses.replace(view, kernel_hash=table,
                                   stats={**view.stats, "kernel_hash": table.to_json()})
