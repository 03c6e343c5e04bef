"""Strategies: which backend a new client goes to.

Rules:

* A strategy answers one question, ``choose(client)``: the backend for a client
  (its packed source address) that the client table does not know yet, or whose
  backend no longer serves it. It records nothing about the client; remembering
  the answer is the client table's job.
* It returns only backends of its pool with ``accepts_new`` (state up and weight
  > 0), and ``None`` when there is none. Draining, down and weight-0 backends get
  no new clients from any strategy.
* It is built from the pool lazily: every ``choose`` first compares
  ``pool.version`` with the version it was built for and rebuilds when they
  differ. A rebuild whose inputs did not change (same eligible backends with the
  same weights: the version was bumped by a bulk change of client counts) keeps
  the strategy's state, so the rr cursor, the wrr schedule and the hash tables
  survive client-table expiry untouched.
* ``resteers`` is True when the choice is a pure function of the client and the
  eligible backends (sh, maglev): the client table may then move a dead
  backend's clients at once, and every process and every restart makes the same
  choice for the same client.
* The hash strategies look a client up exactly as the kernel does
  (``jhash_bucket``: nftables' ``jhash ip saddr mod SIZE seed SEED``) in a table
  of ``SIZE`` buckets that ``hash_table`` builds; the daemon loads the same
  table into the kernel, which then decides for new clients itself, and a
  worker deciding in its place (an ICMP echo, a full map) gives the same answer.
* The count-based strategies (weighted, lc) read ``Backend.clients``, which the
  client table maintains. The table bumps ``pool.version`` after a bulk decrease
  (expiry, a backend's clients dropped) and calls ``released(backend)`` after a
  single one (a forgotten or moved client); with both, their choice is exact: the
  eligible backend with the smallest load, ties to the first in pool order.

Strategies and their cost per ``choose`` (n = eligible backends):

==========  ==================================================  ================
name        choice                                              cost
==========  ==================================================  ================
rr          next eligible backend in pool order, cyclic         O(1)
weighted    fewest clients (weights ignored except 0): the      O(log n)
            original's "weighted", without its O(clients) scan  amortised
lc          least (clients + 1) / weight                        O(log n)
                                                                amortised
wrr         smooth weighted round robin (EEVDF)                 O(1) if W <= 16384
                                                                else O(log n)
sh          source hash over a weighted slot table (runs)       O(1)
maglev      Maglev consistent hash (weighted, Envoy's way)      O(1)
==========  ==================================================  ================

Rebuilds cost O(n) (rr, weighted, lc), O(W log n) (wrr, W = sum of weights, up
to its cycle limit), O(M) (sh) and O(M log M) (maglev), M = table size (~50 ms
for maglev's 65537); they happen only when the eligible backends or their
weights change (for weighted and lc also when counts drop in bulk, O(n)).
"""

from __future__ import annotations

from heapq import heapify, heappop, heappush, heapreplace
from typing import ClassVar

from loaded.core.hashing import jhash_bucket, stable_hash
from loaded.core.pool import Backend, Pool

__all__ = [
    "STRATEGIES",
    "LeastClients",
    "Maglev",
    "RoundRobin",
    "SourceHash",
    "Strategy",
    "WeightedLeastClients",
    "WeightedRoundRobin",
    "hash_table",
    "make_strategy",
]

HASH_STRATEGIES = frozenset({"sh", "maglev"})
DEFAULT_TABLE_SIZE = 65537
DEFAULT_HASH_SEED = 0x4C4F4144  # "LOAD": the same on every node unless configured

# Ratios (clients + 1) / weight and wrr's turn times k / weight are compared as
# floor(ratio * 2**_FRACTION_BITS). Two different ratios whose denominators are
# weights (<= 65535 < 2**16) differ by at least 2**-32, so their scaled floors
# differ by at least 2**8 and keep the exact order; equal ratios stay equal. This
# keeps heap entries plain ints (fast to compare) without losing exactness.
_FRACTION_BITS = 40

_Signature = tuple[tuple[Backend, int], ...]


class Strategy:
    """Base class: lazily rebuilt from its pool when ``pool.version`` moves."""

    name: ClassVar[str] = ""
    resteers: ClassVar[bool] = False

    __slots__ = ("_signature", "_version", "pool")

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self._version = -1  # never a pool version: the first choice builds
        self._signature: _Signature | None = None

    def choose(self, client: bytes) -> Backend | None:
        """The backend for a new client; ``None`` when no backend accepts new clients."""
        raise NotImplementedError

    def released(self, backend: Backend) -> None:
        """``backend.clients`` just went down by one entry (forgotten or moved)."""

    def stagger(self, offset: int) -> None:
        """Start ``offset`` places further on. Workers have a strategy each: without
        this, every worker's round robin would send its first client to the same
        backend. No-op for strategies without a cursor."""

    def _sync(self) -> bool:
        """Catch up with the pool's version; True when the eligible backends or weights changed."""
        pool = self.pool
        self._version = pool.version
        signature = tuple((b, b.weight) for b in pool if b.accepts_new)
        if signature == self._signature:
            return False
        self._signature = signature
        return True

    def _eligible(self) -> list[Backend]:
        assert self._signature is not None
        return [b for b, _ in self._signature]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pool.vip})"


class RoundRobin(Strategy):
    """``rr``: the next eligible backend in pool order, cyclic; weights other than 0 ignored."""

    name = "rr"
    __slots__ = ("_next", "_ring")

    def __init__(self, pool: Pool) -> None:
        super().__init__(pool)
        self._ring: list[Backend] = []
        self._next = 0

    def choose(self, client: bytes) -> Backend | None:
        if self._version != self.pool.version:
            self._rebuild()
        ring = self._ring
        i = self._next
        try:
            b = ring[i]
        except IndexError:  # empty ring; cheaper than testing it on every call
            return None
        i += 1
        self._next = i if i < len(ring) else 0
        return b

    def stagger(self, offset: int) -> None:
        if self._version != self.pool.version:
            self._rebuild()
        if self._ring:
            self._next = offset % len(self._ring)

    def _rebuild(self) -> None:
        old, nxt = self._ring, self._next
        if not self._sync():
            return
        ring = self._eligible()
        self._ring = ring
        self._next = 0
        if old and ring:
            # Carry on after the backend chosen last instead of restarting at the
            # first one, so frequent pool changes do not favour the head of the list.
            last = old[nxt - 1].index
            for pos, b in enumerate(ring):
                if b.index > last:
                    self._next = pos
                    break


class _LeastLoaded(Strategy):
    """A min-heap of backends by load with lazy invalidation.

    Heap entries are ints ``load_key << shift | pos``: ``pos`` is the backend's
    position in the eligible list (pool order, so it breaks ties) and ``load_key``
    is the load the entry was pushed with. Loads change without the heap being
    told (the client table adds clients after each choice), so an entry may be
    stale. The invariant is that every backend has at least one entry whose key is
    not above its current key:

    * the top entry, when current, is the minimum (every other backend's
      current key is at least its lowest entry, which is at least the top);
    * a top entry below the current key is replaced by the current key;
    * a decrease is announced with ``released`` (a fresh entry is pushed) or by a
      version bump (the heap is rebuilt), which keeps the invariant;
    * entries above the current key (left behind by ``released``) are popped when
      they surface and bounded by rebuilding when the heap grows past 2n + 16.
    """

    __slots__ = ("_backends", "_heap", "_mask", "_positions", "_shift")

    def __init__(self, pool: Pool) -> None:
        super().__init__(pool)
        self._backends: list[Backend] = []
        self._positions: dict[Backend, int] = {}
        self._heap: list[int] = []
        self._shift = 1
        self._mask = 0

    def _key(self, b: Backend, pos: int) -> int:
        raise NotImplementedError

    def released(self, backend: Backend) -> None:
        if self._version != self.pool.version:
            return  # the next choice rebuilds from the current counts anyway
        pos = self._positions.get(backend)
        if pos is None:
            return
        heap = self._heap
        heappush(heap, self._key(backend, pos))
        if len(heap) > 2 * len(self._backends) + 16:
            self._fill()

    def _rebuild(self) -> None:
        # Counts may have gone down in bulk: rebuild the heap even when the
        # eligible set is the same.
        if self._sync():
            backends = self._eligible()
            self._backends = backends
            self._positions = {b: pos for pos, b in enumerate(backends)}
            self._shift = max(1, len(backends).bit_length())
            self._mask = (1 << self._shift) - 1
        self._fill()

    def _fill(self) -> None:
        key = self._key
        heap = [key(b, pos) for pos, b in enumerate(self._backends)]
        heapify(heap)
        self._heap = heap

    def choose(self, client: bytes) -> Backend | None:
        if self._version != self.pool.version:
            self._rebuild()
        heap = self._heap
        backends = self._backends
        mask = self._mask
        key_of = self._key
        while heap:
            key = heap[0]
            pos = key & mask
            b = backends[pos]
            current = key_of(b, pos)
            if key == current:
                return b
            if key < current:  # its load went up since: back in at its place
                heapreplace(heap, current)
            else:  # a stale entry: the backend has a newer, smaller one
                heappop(heap)
        return self._recover() if backends else None

    def _recover(self) -> Backend | None:
        # Only reached when counts went down behind the heap's back (no
        # ``released``, no version bump): start again from the current counts.
        self._fill()
        heap = self._heap
        return self._backends[heap[0] & self._mask] if heap else None


class LeastClients(_LeastLoaded):
    """``weighted``: the backend with the fewest clients, weights ignored except 0.

    The original program's ``weighted`` strategy, which found the minimum by
    scanning the whole client table for every new client.
    """

    name = "weighted"
    __slots__ = ()

    def _key(self, b: Backend, pos: int) -> int:
        return b.clients << self._shift | pos


class WeightedLeastClients(_LeastLoaded):
    """``lc``: the backend with the least ``(clients + 1) / weight``.

    ``clients + 1`` is the load the backend would have once it takes this client.
    With plain ``clients / weight`` every idle backend ties at 0 and the first new
    client goes to the first backend in the pool whatever the weights; with + 1 it
    goes to the heaviest, and loads converge to the weights' proportions from the
    first client on.
    """

    name = "lc"
    __slots__ = ()

    def _key(self, b: Backend, pos: int) -> int:
        return ((b.clients + 1) << _FRACTION_BITS) // b.weight << self._shift | pos


class WeightedRoundRobin(Strategy):
    """``wrr``: smooth weighted round robin (EEVDF, Stoica et al. 1996, with unit requests).

    Backend i's k-th turn starts at virtual time (k - 1) / w_i and is due at
    k / w_i; after m choices the virtual time is m / W, W = sum(weights). A choice
    takes, among the turns already started, the one due first (ties to pool
    order). Plain earliest-deadline-first would also serve every backend its
    share, but in bursts (weights 5, 1, 1 give 0 0 0 0 0 1 2 at each start);
    waiting for a turn's start keeps every backend within one turn of its exact
    share m * w_i / W after any m choices, so it is never served twice while a
    lighter backend is owed a turn. Consequences:

    * after W choices every backend has had exactly w_i turns and the schedule
      repeats, so any W consecutive choices hold exactly w_i of backend i;
    * a started turn always exists while any backend is eligible (the shares
      and the turns taken both add up to m).

    Two heaps of ints make a choice O(log n): ``_ready`` (started turns by due
    time) and ``_waiting`` (the rest by start time). As the schedule repeats
    every W choices, a W of at most ``CYCLE_LIMIT`` is played once at rebuild
    and then replayed from a list, O(1) per choice, the same sequence. When the
    eligible backends or their weights change, the schedule starts again from
    nothing, so no backend is owed or denied turns for the time before the
    change.
    """

    name = "wrr"
    __slots__ = ("_backends", "_cycle", "_done", "_mask", "_next", "_ready", "_shift",
                 "_total", "_turns", "_waiting", "_weights")

    CYCLE_LIMIT: ClassVar[int] = 16384

    def __init__(self, pool: Pool) -> None:
        super().__init__(pool)
        self._backends: list[Backend] = []
        self._weights: list[int] = []
        self._turns: list[int] = []  # k of each backend's pending turn
        self._ready: list[int] = []
        self._waiting: list[int] = []
        self._done = 0  # m: choices since the schedule started
        self._total = 0  # W
        self._shift = 1
        self._mask = 0
        self._cycle: list[Backend] = []  # one period of the schedule, or empty: use the heaps
        self._next = 0

    def choose(self, client: bytes) -> Backend | None:
        if self._version != self.pool.version:
            self._rebuild()
        cycle = self._cycle
        if cycle:
            i = self._next
            b = cycle[i]
            i += 1
            self._next = i if i < len(cycle) else 0
            return b
        return self._step()

    def _step(self) -> Backend | None:
        ready = self._ready
        waiting = self._waiting
        turns = self._turns
        weights = self._weights
        shift = self._shift
        mask = self._mask
        m = self._done
        total = self._total
        # Admit the turns started by now: (k - 1) / w <= m / W.
        while waiting:
            pos = waiting[0] & mask
            if (turns[pos] - 1) * total > m * weights[pos]:
                break
            heappop(waiting)
            heappush(ready, ((turns[pos] << _FRACTION_BITS) // weights[pos]) << shift | pos)
        try:
            key = ready[0]
        except IndexError:
            return None
        pos = key & mask
        k = turns[pos] + 1
        turns[pos] = k
        w = weights[pos]
        m += 1
        self._done = m
        # The next turn starts when this one was due; most often it already has.
        if (k - 1) * total <= m * w:
            heapreplace(ready, ((k << _FRACTION_BITS) // w) << shift | pos)
        else:
            heappop(ready)
            heappush(waiting, (((k - 1) << _FRACTION_BITS) // w) << shift | pos)
        return self._backends[pos]

    def _rebuild(self) -> None:
        if not self._sync():
            return
        backends = self._eligible()
        weights = [b.weight for b in backends]
        shift = max(1, len(backends).bit_length())
        # Every first turn starts at 0 and is due at 1 / w.
        ready = [((1 << _FRACTION_BITS) // w) << shift | pos for pos, w in enumerate(weights)]
        heapify(ready)
        total = sum(weights)
        self._backends, self._weights, self._turns = backends, weights, [1] * len(backends)
        self._ready, self._waiting, self._done, self._total = ready, [], 0, total
        self._shift, self._mask = shift, (1 << shift) - 1
        self._cycle, self._next = [], 0
        if total <= self.CYCLE_LIMIT:
            cycle = []
            for _ in range(total):
                b = self._step()
                assert b is not None  # total > 0: there are backends
                cycle.append(b)
            self._cycle = cycle


class HashStrategy(Strategy):
    """A lookup table of ``table_size`` buckets indexed by the kernel's ``jhash``
    of the client: ``sh`` and ``maglev``, which differ only in how the table is
    built from the eligible backends (``hash_table``)."""

    resteers = True
    __slots__ = ("_size", "_table", "seed", "table_size")

    def __init__(self, pool: Pool, table_size: int = DEFAULT_TABLE_SIZE,
                 seed: int = DEFAULT_HASH_SEED) -> None:
        super().__init__(pool)
        if not 0 <= seed <= 0xFFFFFFFF:
            raise ValueError(f"hash seed {seed} is not a 32-bit number")
        self.table_size = table_size
        self.seed = seed
        # One slot holding None when nobody is eligible: choose needs no branch.
        self._table: list[Backend | None] = [None]
        self._size = 1

    def choose(self, client: bytes) -> Backend | None:
        if self._version != self.pool.version:
            self._rebuild()
        # A one-slot table (nobody eligible) is bucket 0 for every client.
        return self._table[jhash_bucket(client, self.seed, self._size)]

    def _rebuild(self) -> None:
        if not self._sync():
            return
        backends = self._eligible()
        table: list[Backend | None] = (hash_table(self.name, backends, self.table_size)
                                       if backends else [None])
        self._table, self._size = table, len(table)


class SourceHash(HashStrategy):
    """``sh``: a bucket table shared out by weight, each backend's buckets in one run
    in pool order (largest remainder, at least one bucket each). Any change of the
    eligible set or weights remaps most clients; maglev is the consistent
    alternative."""

    name = "sh"
    __slots__ = ()


class Maglev(HashStrategy):
    """``maglev``: a Maglev table of the eligible backends (``maglev_table``).

    Consistent: when a backend leaves, its clients are spread over the others and
    nearly everybody else keeps their backend; when one joins, it takes about its
    share, mostly from everybody evenly. The size must be prime and should be
    well above 100 times the number of backends for an even spread.
    """

    name = "maglev"
    __slots__ = ()

    def __init__(self, pool: Pool, table_size: int = DEFAULT_TABLE_SIZE,
                 seed: int = DEFAULT_HASH_SEED) -> None:
        if not is_prime(table_size):
            raise ValueError(f"maglev table size {table_size} is not prime")
        super().__init__(pool, table_size, seed)


def hash_table(strategy: str, backends: list[Backend], size: int) -> list[Backend | None]:
    """The bucket table (``size`` buckets, each a backend) of a hash strategy over
    ``backends`` (the eligible ones, in pool order): ``sh``'s runs, or for
    ``maglev`` (and as the kernel's fall-back table for every other strategy)
    Maglev's table. Pure and the same in every process: the daemon loads it into
    the kernel and every worker builds it for itself."""
    if strategy == "sh":
        counts = apportion([b.weight for b in backends], size)
        table: list[Backend | None] = []
        for b, count in zip(backends, counts, strict=True):
            table.extend([b] * count)
        return table
    return maglev_table(backends, size)


def apportion(weights: list[int], seats: int) -> list[int]:
    """Share ``seats`` in proportion to positive ``weights``, at least one each.

    Largest remainder: every weight gets one seat, the rest are shared by weight
    rounding down, and the seats left over go to the largest remainders (ties to
    the first).
    """
    n = len(weights)
    if seats < n:
        raise ValueError(f"{seats} seats cannot give one to each of {n} weights")
    spare = seats - n  # one seat each first, the rest by weight
    total = sum(weights)
    counts = []
    remainders = []
    for pos, w in enumerate(weights):
        q, r = divmod(spare * w, total)
        counts.append(1 + q)
        remainders.append((-r, pos))
    remainders.sort()
    for _, pos in remainders[:seats - sum(counts)]:
        counts[pos] += 1
    return counts


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


# Seeds of the two independent hashes of a backend's address (offset, skip).
MAGLEV_OFFSET_SEED = 0x6F6666736574  # "offset"
MAGLEV_SKIP_SEED = 0x736B6970  # "skip"


def maglev_table(backends: list[Backend], size: int) -> list[Backend | None]:
    """Maglev's lookup table (Eisenbud et al., NSDI 2016, pseudocode 1), weighted as in Envoy.

    Backend b's preference list is ``(offset + j * skip) % size`` for j = 0, 1, ...
    with offset = h1(addr) % size and skip = h2(addr) % (size - 1) + 1; as ``size``
    is prime, every skip is coprime to it and the list is a permutation of the
    slots. Backends take turns claiming their next free preferred slot; with
    weights, a backend takes its turn in round r only when r * weight has reached
    its target, which then grows by the largest weight, so it claims about
    weight / max_weight slots per round. The result depends only on the backends'
    addresses, weights and order, never on the process or the host.
    """
    if not is_prime(size):
        raise ValueError(f"maglev table size {size} is not prime")
    if not backends:
        raise ValueError("a maglev table needs at least one backend")
    if len(backends) > size:
        raise ValueError(f"{len(backends)} backends do not fit a maglev table of {size}")
    n = len(backends)
    slot = [stable_hash(b.addr, MAGLEV_OFFSET_SEED) % size for b in backends]
    skips = [stable_hash(b.addr, MAGLEV_SKIP_SEED) % (size - 1) + 1 for b in backends]
    weights = [b.weight for b in backends]
    max_weight = max(weights)
    targets = [0] * n
    table: list[Backend | None] = [None] * size
    filled = 0
    turn = 0
    while True:
        turn += 1
        for i in range(n):
            if turn * weights[i] < targets[i]:
                continue
            targets[i] += max_weight
            c = slot[i]
            skip = skips[i]
            while table[c] is not None:
                c += skip
                if c >= size:
                    c -= size
            table[c] = backends[i]
            c += skip
            slot[i] = c - size if c >= size else c
            filled += 1
            if filled == size:
                return table  # every slot holds a backend now


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (RoundRobin, LeastClients, WeightedLeastClients, WeightedRoundRobin,
                SourceHash, Maglev)
}


def make_strategy(name: str, pool: Pool, *, table_size: int = DEFAULT_TABLE_SIZE,
                  hash_seed: int = DEFAULT_HASH_SEED) -> Strategy:
    """The strategy called ``name`` (see ``STRATEGIES``) for ``pool``; ``table_size``
    and ``hash_seed`` are the hash strategies' (see ``hash_table``)."""
    cls = STRATEGIES.get(name)
    if cls is None:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    if issubclass(cls, HashStrategy):
        return cls(pool, table_size, hash_seed)
    return cls(pool)
