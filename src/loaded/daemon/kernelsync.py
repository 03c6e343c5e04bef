"""The kernel's state kept in step with the pools: what the data path's table maps,
what conntrack and the client maps remember, and the table's counters.

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
- The workers' decisions (learned clients) are remembered in the kernel only
  for backends that still serve when they arrive; the others' clients are
  decided again.
- Netlink or nftables trouble is logged, never raised: the supervisor keeps
  running, the workers keep deciding.
- This module owns the cut backends waiting for their second forgetting, the
  learned clients not yet remembered and the last reading of the counters.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable

from loaded.core.backends import BackendStates
from loaded.core.commands import PoolCommand
from loaded.core.datapath import DataPath, Forget, KernelView
from loaded.core.plan import Plan
from loaded.core.pool import IPAddress
from loaded.io.kernel import Kernel, KernelError

log = logging.getLogger("loaded.supervisor")

FORGET_AGAIN = 0.5


class KernelSync:
    def __init__(self, kernel: Kernel, plan: Plan, backends: BackendStates,
                 vips: Callable[[], list[str]]) -> None:
        self.kernel = kernel
        self.datapath: DataPath = plan.datapath
        self._table = bool(plan.nft)  # the plan has an nftables table of ours
        self.backends = backends
        self._vips = vips
        self.forget_again: list[tuple[float, int]] = []  # (when, mark)
        self.learned: list[tuple[bytes, int]] = []  # (packed client, mark) decided
        self.counters: dict[int, tuple[int, int]] = {}  # mark -> (packets, bytes)
        self.invalid = 0  # packets the table dropped as invalid

    # --- the pools changed -------------------------------------------------------------

    def map_backend(self, vip: IPAddress, ip: IPAddress) -> None:
        if not self._table:
            return
        try:
            self.kernel.map_backend(ip.version, self.backends.index_of(vip, ip), ip)
        except KernelError as e:  # the workers may still use it; NAT would not
            log.error("event=backend-not-mapped backend=%s error=%s", ip, e)

    def after(self, command: PoolCommand, was_empty: bool) -> None:
        """What the kernel must forget now that ``command`` went to the workers;
        ``was_empty``: no backend of its VIP served before."""
        self._carry_out(self.datapath.forgets(command, was_empty), command)

    def start(self) -> None:
        """Once the rules are in place."""
        self._carry_out(self.datapath.at_start(), None)

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

    # --- the workers decided -----------------------------------------------------------

    def learn(self, clients: tuple[tuple[bytes, int], ...]) -> None:
        self.learned.extend(clients)

    def remember(self, client_timeout: int) -> None:
        """The workers' decisions into the kernel's client maps, except for backends
        that are down by now (their clients are decided again)."""
        learned, self.learned = self.learned, []
        serving = self.serving_marks()
        entries = []
        for client, mark in learned:
            if mark in serving:
                entries.append((ipaddress.ip_address(client), mark))
        try:
            self.kernel.remember_clients(entries, client_timeout)
        except Exception as e:
            log.warning("event=clients-not-recalled count=%d error=%r", len(entries), e)

    # --- the counters -------------------------------------------------------------------

    def read_counters(self) -> None:
        if self._table:
            try:
                self.counters, self.invalid = self.kernel.kernel_counters()
            except Exception as e:
                log.warning("event=counters-unreadable error=%r", e)

    def view(self) -> KernelView:
        """The last reading, as the data path shows it."""
        return self.datapath.kernel_view(self.counters, self.invalid)
