"""The client table: which backend each client of one VIP sticks to.

Rules:

* A client (its packed source address) keeps the backend it was given for as long
  as it keeps sending and that backend ``serves_existing`` (up or draining). The
  first packet after its backend went down or left the pool gets a new backend
  from the strategy, like a new client.
* Entries live in two generations, ``young`` and ``old``, plain dicts from client
  to a shared ``Backend`` (an entry costs its key and a dict slot). A lookup tries
  young, then old, and moves a hit from old to young.
* Time is a grid of ``idle_timeout`` steps. At each step old is discarded and
  young becomes old (checked on every call that passes ``now``, and by
  ``expire``). An entry used at time t is in young until the next step and in old
  until the one after, so an idle client is forgotten no sooner than
  ``idle_timeout`` and no later than ``2 * idle_timeout`` after its last packet.
* Memory is bounded by ``max_size``: young may hold ``max_size // 2`` entries; an
  insertion into a full young rotates at once (the least recently used half, old,
  goes) and restarts the grid there. Under that pressure clients may be forgotten
  sooner than ``idle_timeout``; never is the table larger than ``max_size``.
* ``Backend.clients`` is always the number of entries pointing at the backend.
  Each generation keeps its own count per backend, so a rotation costs
  O(backends), not O(entries). A rotation or any other bulk removal calls
  ``pool.changed()`` (count-based strategies rebuild); a single removal calls
  ``strategy.released(backend)``.
* ``backend_down`` handles a backend that went down or left the pool: with a
  strategy that ``resteers`` (sh, maglev) its clients get their new backend at
  once, in place; otherwise they are dropped and re-balanced on their next packet.
  The backend must already be marked down (or removed) in the pool.

The established-client path, ``backend_for`` with a known client, is one float
comparison, one dict lookup and one attribute test.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain

from loaded.core.pool import Backend, Pool
from loaded.core.strategies import Strategy

__all__ = ["ClientTable"]


class ClientTable:
    """Client address -> Backend for one pool, with idle expiry and a size bound."""

    __slots__ = (
        "_cap",
        "_deadline",
        "_old",
        "_old_counts",
        "_started",
        "_young",
        "_young_counts",
        "idle_timeout",
        "max_size",
        "pool",
        "strategy",
    )

    def __init__(self, pool: Pool, strategy: Strategy, idle_timeout: float = 300.0,
                 max_size: int = 1_000_000, now: float = 0.0) -> None:
        if not idle_timeout > 0:
            raise ValueError(f"idle_timeout must be positive, not {idle_timeout}")
        if max_size < 2:
            raise ValueError(f"max_size must be at least 2, not {max_size}")
        if strategy.pool is not pool:
            raise ValueError("the strategy belongs to another pool")
        self.pool = pool
        self.strategy = strategy
        self.idle_timeout = float(idle_timeout)
        self.max_size = max_size
        self._cap = max_size // 2  # for young; old was a young, so the sum stays in bounds
        self._young: dict[bytes, Backend] = {}
        self._old: dict[bytes, Backend] = {}
        self._young_counts: dict[Backend, int] = {}
        self._old_counts: dict[Backend, int] = {}
        self._started = float(now)  # grid step at which young started
        self._deadline = self._started + self.idle_timeout

    # The hot path.

    def backend_for(self, client: bytes, now: float) -> Backend | None:
        """The client's backend: its sticky one while that serves it, else a new one.

        ``None`` when the client has no usable backend and no backend accepts new
        clients.
        """
        if now < self._deadline:
            b = self._young.get(client)
            if b is not None and b.serves_existing:
                return b
        return self._backend_for(client, now)

    def _backend_for(self, client: bytes, now: float) -> Backend | None:
        if now >= self._deadline:
            self.expire(now)
        b = self._young.get(client)
        if b is not None:
            if b.serves_existing:
                return b
            del self._young[client]
            self._uncount(self._young_counts, b)
        else:
            b = self._old.pop(client, None)
            if b is not None:
                counts = self._old_counts
                counts[b] -= 1
                if b.serves_existing:
                    # Promotion: the entry moves generation, the backend's total stays.
                    if len(self._young) >= self._cap:
                        self._rotate_early(now)
                    self._young[client] = b
                    counts = self._young_counts
                    counts[b] = counts.get(b, 0) + 1
                    return b
                b.clients -= 1
        # A dropped entry's backend is down, so no strategy counts it: no released().
        if len(self._young) >= self._cap:
            # Before choosing, so count-based strategies see the counts after it.
            self._rotate_early(now)
        chosen = self.strategy.choose(client)
        if chosen is not None:
            self._young[client] = chosen
            counts = self._young_counts
            counts[chosen] = counts.get(chosen, 0) + 1
            chosen.clients += 1
            chosen.new_clients += 1
        return chosen

    # Inspection and explicit changes.

    def peek(self, client: bytes) -> Backend | None:
        """The entry for ``client`` if any, whatever its backend's state; refreshes nothing."""
        b = self._young.get(client)
        return self._old.get(client) if b is None else b

    def assign(self, client: bytes, backend: Backend, now: float) -> None:
        """Make ``client`` stick to ``backend`` from now on (the entry counts as fresh)."""
        self.expire(now)
        young = self._young
        prev = young.get(client)
        if prev is backend:
            return
        if prev is not None:
            del young[client]
            self._uncount(self._young_counts, prev)
        else:
            prev = self._old.pop(client, None)
            if prev is not None:
                self._uncount(self._old_counts, prev)
        if prev is not None and prev is not backend:
            self.strategy.released(prev)
        if len(young) >= self._cap:
            self._rotate_early(now)
        self._young[client] = backend
        counts = self._young_counts
        counts[backend] = counts.get(backend, 0) + 1
        backend.clients += 1

    def forget(self, client: bytes) -> Backend | None:
        """Drop the client's entry; return the backend it had, if any."""
        b = self._young.pop(client, None)
        if b is not None:
            self._uncount(self._young_counts, b)
        else:
            b = self._old.pop(client, None)
            if b is None:
                return None
            self._uncount(self._old_counts, b)
        self.strategy.released(b)
        return b

    def backend_down(self, backend: Backend, now: float) -> int:
        """Move (resteering strategies) or drop the entries of a backend that went down.

        Returns how many entries were moved or dropped. O(entries): a scan of the
        generations that hold any entry for ``backend``.
        """
        self.expire(now)
        choose = self.strategy.choose if self.strategy.resteers else None
        affected = 0
        for entries, counts in ((self._young, self._young_counts),
                                (self._old, self._old_counts)):
            if not counts.pop(backend, 0):
                continue
            clients = [c for c, b in entries.items() if b is backend]
            backend.clients -= len(clients)
            kept = 0
            for client in clients:
                new = choose(client) if choose is not None else None
                if new is None:
                    del entries[client]
                elif new is backend:
                    kept += 1  # not down after all (still accepts new clients)
                else:
                    entries[client] = new  # same generation: the client keeps its age
                    counts[new] = counts.get(new, 0) + 1
                    new.clients += 1
            if kept:
                counts[backend] = kept
                backend.clients += kept
            affected += len(clients) - kept
        if affected:
            self.pool.changed()
        return affected

    def expire(self, now: float) -> None:
        """Take the grid steps due by ``now``: drop what has been idle long enough."""
        if now < self._deadline:
            return
        step = self.idle_timeout
        steps = int((now - self._started) // step)
        if steps >= 2:
            # Both generations are past their time.
            dropped = bool(self._young or self._old)
            self._drop(self._old_counts)
            self._drop(self._young_counts)
            self._young, self._old = {}, {}
            self._young_counts, self._old_counts = {}, {}
            if dropped:
                self.pool.changed()
        else:
            self._rotate()
        self._started += max(steps, 1) * step
        self._deadline = self._started + step
        if self._deadline <= now:  # float rounding on the grid: never loop forever
            self._started = now
            self._deadline = now + step

    def __len__(self) -> int:
        return len(self._young) + len(self._old)

    def __contains__(self, client: object) -> bool:
        return client in self._young or client in self._old

    def items(self) -> Iterator[tuple[bytes, Backend]]:
        """Every (client, backend) entry, youngest generation first.

        A live view: do not change the table while iterating.
        """
        return chain(self._young.items(), self._old.items())

    def ages(self, now: float) -> Iterator[tuple[bytes, Backend, float]]:
        """Every entry that ``expire(now)`` would keep, with the least time it can
        have been idle at ``now``: 0 for one used in the current grid step (young),
        the time since that step began for the others (old). Changes nothing.

        A live view: do not change the table while iterating.
        """
        young, old, idle = self._view(now)
        for client, b in young.items():
            yield client, b, 0.0
        for client, b in old.items():
            yield client, b, idle

    def age(self, client: bytes, now: float) -> tuple[Backend, float] | None:
        """``client``'s entry as ``ages`` would give it, or None. Changes nothing."""
        young, old, idle = self._view(now)
        b = young.get(client)
        if b is not None:
            return b, 0.0
        b = old.get(client)
        return None if b is None else (b, idle)

    def _view(self, now: float) -> tuple[dict[bytes, Backend], dict[bytes, Backend], float]:
        """(young, old, idle of old) as they would be after ``expire(now)``."""
        young, old, started = self._young, self._old, self._started
        if now >= self._deadline:  # the steps expire(now) would take, taken on paper
            step = self.idle_timeout
            if int((now - started) // step) >= 2:
                return {}, {}, 0.0
            young, old = {}, young
            started += step
            if started + step <= now:
                started = now
        return young, old, max(0.0, now - started)

    def restore(self, client: bytes, backend: Backend, idle: float, now: float) -> bool:
        """Put back an entry saved earlier (see ``ages``) that has been idle ``idle``
        seconds at ``now``, into the generation it would be in had it never left:
        young when its last use falls in the current grid step, else old. It is
        forgotten on the usual bounds, counted from that last use.

        False, and nothing changes, when the client has an entry already, ``idle``
        is ``idle_timeout`` or more, or the generation is full. ``backend`` must be
        in the pool and serve existing clients (ValueError otherwise).
        """
        if self.pool.by_addr(backend.addr) is not backend or not backend.serves_existing:
            raise ValueError(f"{backend} cannot take restored clients")
        self.expire(now)
        if idle >= self.idle_timeout or client in self._young or client in self._old:
            return False
        if idle <= now - self._started:
            entries, counts = self._young, self._young_counts
        else:
            entries, counts = self._old, self._old_counts
        if len(entries) >= self._cap:
            return False
        entries[client] = backend
        counts[backend] = counts.get(backend, 0) + 1
        backend.clients += 1
        return True

    def __repr__(self) -> str:
        return (f"ClientTable({self.pool.vip}, {len(self)} clients, "
                f"strategy={self.strategy.name})")

    # Internals.

    def _rotate(self) -> None:
        dropped = self._old
        if dropped:
            self._drop(self._old_counts)
        self._old, self._old_counts = self._young, self._young_counts
        self._young, self._young_counts = {}, {}
        if dropped:
            self.pool.changed()

    def _rotate_early(self, now: float) -> None:
        self._rotate()
        # Restart the grid: what just became old was used before now, and gets
        # a full step from here before it goes.
        self._started = now
        self._deadline = now + self.idle_timeout

    @staticmethod
    def _drop(counts: dict[Backend, int]) -> None:
        for b, n in counts.items():
            b.clients -= n

    @staticmethod
    def _uncount(counts: dict[Backend, int], b: Backend) -> None:
        counts[b] -= 1
        b.clients -= 1
