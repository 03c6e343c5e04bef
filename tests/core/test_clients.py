"""The client table: stickiness, expiry bounds, the size bound and exact counts."""

from __future__ import annotations

import ipaddress
from collections import Counter
from fractions import Fraction

import pytest
from hypothesis import assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from loaded.core.clients import ClientTable
from loaded.core.pool import Backend, Pool, State
from loaded.core.strategies import STRATEGIES, make_strategy

VIP = ipaddress.IPv4Address("192.0.2.1")


def ip(i: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(f"10.0.0.{i + 1}")


def client(i: int) -> bytes:
    return (0xC6336400 + i).to_bytes(4, "big")  # 198.51.100.0 + i


def table_for(n: int, strategy: str = "rr", weights: list[int] | None = None,
              **kwargs: float) -> ClientTable:
    pool = Pool(VIP)
    for i in range(n):
        pool.add(ip(i), weight=weights[i] if weights else 1)
    return ClientTable(pool, make_strategy(strategy, pool, table_size=251),
                       **kwargs)  # type: ignore[arg-type]


def recount(table: ClientTable) -> Counter[Backend]:
    return Counter(b for _, b in table.items())


def assert_counts(table: ClientTable, backends: list[Backend]) -> None:
    counts = recount(table)
    for b in backends:
        assert b.clients == counts[b], b


def test_rejects_bad_parameters() -> None:
    pool = Pool(VIP)
    s = make_strategy("rr", pool)
    with pytest.raises(ValueError):
        ClientTable(pool, s, idle_timeout=0)
    with pytest.raises(ValueError):
        ClientTable(pool, s, max_size=1)
    with pytest.raises(ValueError):
        ClientTable(Pool(VIP), s)


def test_sticky_and_counted() -> None:
    t = table_for(3)
    first = [t.backend_for(client(i), 1.0) for i in range(6)]
    assert [b.index for b in first] == [0, 1, 2, 0, 1, 2]  # type: ignore[union-attr]
    assert [t.backend_for(client(i), 2.0) for i in range(6)] == first
    assert len(t) == 6
    assert [b.clients for b in t.pool] == [2, 2, 2]
    assert t.peek(client(0)) is first[0]
    assert t.peek(client(99)) is None
    assert client(0) in t and client(99) not in t


def test_no_backend_means_none_and_no_entry() -> None:
    t = table_for(0)
    assert t.backend_for(client(0), 0.0) is None
    assert len(t) == 0
    b = t.pool.add(ip(0))
    assert t.backend_for(client(0), 0.0) is b


def test_draining_keeps_existing_clients_and_gets_no_new_ones() -> None:
    t = table_for(2)
    a = t.backend_for(client(0), 0.0)
    assert a is not None
    t.pool.set_state(a.ip, State.DRAINING)
    assert t.backend_for(client(0), 1.0) is a
    assert all(t.backend_for(client(i), 1.0) is not a for i in range(1, 10))
    t.pool.set_weight(a.ip, 0)  # weight 0 on an up backend: the same
    t.pool.set_state(a.ip, State.UP)
    assert t.backend_for(client(0), 2.0) is a
    assert all(t.backend_for(client(i), 2.0) is not a for i in range(10, 20))
    assert_counts(t, t.pool.backends)


def test_a_down_backend_is_replaced_on_the_next_packet() -> None:
    t = table_for(2)
    a = t.backend_for(client(0), 0.0)
    assert a is not None
    t.pool.set_state(a.ip, State.DOWN)  # backend_down not called: still correct
    b = t.backend_for(client(0), 1.0)
    assert b is not None and b is not a
    assert (a.clients, b.clients) == (0, 1)
    t.pool.remove(b.ip)
    assert t.backend_for(client(0), 2.0) is None  # nobody left
    assert len(t) == 0 and b.clients == 0


@pytest.mark.parametrize("name", ["rr", "weighted", "lc", "wrr"])
def test_backend_down_drops_entries_without_resteering(name: str) -> None:
    t = table_for(3, name)
    got = [t.backend_for(client(i), 0.0) for i in range(30)]
    a = got[0]
    assert a is not None
    version = t.pool.version
    t.pool.set_state(a.ip, State.DOWN)
    assert t.backend_down(a, 1.0) == got.count(a)
    assert t.pool.version > version + 1  # the count drop is announced
    assert a.clients == 0 and len(t) == 30 - got.count(a)
    assert all(t.peek(client(i)) is (None if b is a else b) for i, b in enumerate(got))
    assert_counts(t, t.pool.backends)
    assert t.backend_down(a, 1.0) == 0


@pytest.mark.parametrize("name", ["sh", "maglev"])
def test_backend_down_resteers_with_hashing_strategies(name: str) -> None:
    t = table_for(4, name)
    got = [t.backend_for(client(i), 0.0) for i in range(200)]
    t.expire(50.0)  # keep some entries in each generation
    t.backend_for(client(0), 400.0)
    t.backend_for(client(1), 400.0)
    a = got[0]
    assert a is not None
    t.pool.remove(a.ip)
    moved = t.backend_down(a, 400.0)
    assert moved == got.count(a)
    assert len(t) == 200 and a.clients == 0
    for i, b in enumerate(got):
        now = t.peek(client(i))
        assert now is not a
        # Where the strategy sends a new client now: the same as a fresh choice.
        assert now is t.strategy.choose(client(i)) if b is a else now is b
    assert_counts(t, t.pool.backends)


def test_backend_down_on_a_backend_that_still_takes_clients_keeps_them() -> None:
    t = table_for(1, "sh")
    a = t.backend_for(client(0), 0.0)
    assert a is not None
    assert t.backend_down(a, 0.0) == 0
    assert t.peek(client(0)) is a and a.clients == 1


def test_assign_forget_peek_items() -> None:
    t = table_for(3)
    a, b, _ = t.pool.backends
    t.assign(client(0), a, 0.0)
    t.assign(client(0), a, 0.0)
    assert (a.clients, len(t)) == (1, 1)
    t.assign(client(0), b, 0.0)
    assert (a.clients, b.clients, t.peek(client(0))) == (0, 1, b)
    t.expire(10_000.0)  # rotations: the entry must be young again after assign
    assert len(t) == 0 and b.clients == 0
    t.assign(client(1), a, 10_000.0)
    t.expire(10_300.0)  # now in old
    t.assign(client(1), b, 10_300.0)  # moved out of old
    assert (a.clients, b.clients) == (0, 1)
    assert list(t.items()) == [(client(1), b)]
    assert t.forget(client(1)) is b
    assert t.forget(client(1)) is None
    assert (len(t), b.clients) == (0, 0)


@pytest.mark.parametrize("timeout", [10.0, 0.25, 300.0])
def test_idle_expiry_bounds(timeout: float) -> None:
    """Never forgotten within idle_timeout of the last packet, always by twice that."""
    start = 1000.0
    for touch in [0.0, 0.1, 0.5, 0.99, 1.0, 1.5, 2.7]:
        for later in [0.0, 0.5, 0.99, 0.999, 1.0, 1.01, 1.5, 1.99, 2.0, 2.01, 3.5, 10.0]:
            t = table_for(1, idle_timeout=timeout, now=start)
            touched = start + touch * timeout
            t.backend_for(client(0), touched)
            t.expire(touched + later * timeout)
            present = t.peek(client(0)) is not None
            if later < 1.0:
                assert present, (touch, later)
            if later >= 2.0:
                assert not present, (touch, later)
            assert t.pool.backends[0].clients == int(present)


def test_use_refreshes_an_entry() -> None:
    t = table_for(1, idle_timeout=10.0)
    for now in range(0, 100, 9):  # a packet every 9 s: never expires
        assert t.backend_for(client(0), float(now)) is not None
        assert len(t) == 1
    t.expire(99.0 + 20.0)
    assert len(t) == 0


def test_rotation_announces_the_count_drop() -> None:
    t = table_for(2, idle_timeout=10.0)
    t.backend_for(client(0), 0.0)
    v = t.pool.version
    t.expire(10.0)  # young -> old, nothing dropped
    assert t.pool.version == v
    t.expire(20.0)
    assert t.pool.version == v + 1 and len(t) == 0


def test_size_bound_drops_the_least_recently_used_half() -> None:
    t = table_for(3, max_size=10)
    for i in range(5):
        t.backend_for(client(i), 0.0)
    for i in range(5, 8):  # young full: 0..4 become old
        t.backend_for(client(i), 1.0)
    t.backend_for(client(0), 2.0)  # promoted
    assert len(t) == 8
    for i in range(8, 10):  # young full again: old (1..4) goes
        t.backend_for(client(i), 3.0)
    assert {c for c, _ in t.items()} == {client(i) for i in (0, 5, 6, 7, 8, 9)}
    assert_counts(t, t.pool.backends)
    for i in range(10, 1000):
        t.backend_for(client(i), 4.0)
        assert len(t) <= 10
    assert_counts(t, t.pool.backends)


def test_weighted_sees_expiry() -> None:
    t = table_for(2, "weighted", idle_timeout=10.0)
    a, b = t.pool.backends
    for i in range(4):
        t.assign(client(i), a, 0.0)
    t.backend_for(client(100), 0.0)
    assert b.clients == 1
    t.backend_for(client(100), 15.0)  # b's client stays fresh, a's age
    t.expire(25.0)
    assert (a.clients, b.clients) == (0, 1)
    assert t.backend_for(client(200), 25.0) is a


def test_weighted_sees_reassignment() -> None:
    t = table_for(2, "weighted")
    a, b = t.pool.backends
    t.assign(client(0), a, 0.0)
    t.assign(client(1), a, 0.0)
    t.assign(client(2), b, 0.0)
    assert t.backend_for(client(3), 0.0) is b
    t.assign(client(0), b, 0.0)
    t.assign(client(1), b, 0.0)  # a: 0, b: 4
    assert t.backend_for(client(4), 0.0) is a


def test_weighted_sees_forget() -> None:
    t = table_for(2, "weighted")
    a, b = t.pool.backends
    t.assign(client(0), a, 0.0)
    t.assign(client(1), b, 0.0)
    t.assign(client(2), b, 0.0)
    assert t.backend_for(client(3), 0.0) is a
    t.forget(client(1))
    t.forget(client(2))
    assert t.backend_for(client(4), 0.0) is b


class TableMachine(RuleBasedStateMachine):
    """Random traffic, time and pool changes; counts must match a recount throughout."""

    clients = Bundle("clients")
    names = st.sampled_from(sorted(STRATEGIES))

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.everyone: list[Backend] = []  # every backend ever created, removed too
        self.ever_added = 0

    @initialize(data=st.data(), n=st.integers(0, 4),
                timeout=st.sampled_from([1.0, 5.0]), max_size=st.integers(2, 12))
    def setup(self, data: st.DataObject, n: int, timeout: float, max_size: int) -> None:
        name = data.draw(self.names)
        self.pool = Pool(VIP)
        for _ in range(n):
            self.add_backend(1, State.UP)
        self.table = ClientTable(self.pool, make_strategy(name, self.pool, table_size=13),
                                 idle_timeout=timeout, max_size=max_size)
        self.last_seen: dict[bytes, float] = {}

    @rule(target=clients, i=st.integers(0, 20))
    def new_client(self, i: int) -> bytes:
        return client(i)

    @rule(weight=st.integers(0, 3), state=st.sampled_from(list(State)))
    def add_backend(self, weight: int, state: State) -> None:
        assume(self.ever_added < 200)
        self.everyone.append(self.pool.add(ip(self.ever_added), weight, state))
        self.ever_added += 1

    def _pick(self, i: int) -> Backend | None:
        backends = self.pool.backends
        return backends[i % len(backends)] if backends else None

    @rule(i=st.integers(0, 10))
    def remove_backend(self, i: int) -> None:
        b = self._pick(i)
        if b is not None:
            self.pool.remove(b.ip)
            self.table.backend_down(b, self.now)
            assert b.clients == 0

    @rule(i=st.integers(0, 10), state=st.sampled_from(list(State)), tell=st.booleans())
    def set_state(self, i: int, state: State, tell: bool) -> None:
        b = self._pick(i)
        if b is not None:
            self.pool.set_state(b.ip, state)
            if state is State.DOWN and tell:
                self.table.backend_down(b, self.now)
                assert b.clients == 0

    @rule(i=st.integers(0, 10), weight=st.integers(0, 3))
    def set_weight(self, i: int, weight: int) -> None:
        b = self._pick(i)
        if b is not None:
            self.pool.set_weight(b.ip, weight)

    @rule(dt=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0, 2.5]))
    def advance(self, dt: float) -> None:
        self.now += dt
        self.table.expire(self.now)

    @rule(c=clients)
    def lookup(self, c: bytes) -> None:
        self.table.expire(self.now)
        sticky = self.table.peek(c)
        eligible = self.pool.eligible()
        got = self.table.backend_for(c, self.now)
        if sticky is not None and sticky.serves_existing:
            assert got is sticky
        elif got is None:
            assert not eligible
        else:
            assert got.accepts_new and got in eligible
        if got is not None:
            self.last_seen[c] = self.now
            assert self.table.peek(c) is got

    @rule(c=clients, i=st.integers(0, 10))
    def assign(self, c: bytes, i: int) -> None:
        b = self._pick(i)
        if b is not None and b.accepts_new:
            self.table.assign(c, b, self.now)
            self.last_seen[c] = self.now

    @rule(c=clients)
    def forget(self, c: bytes) -> None:
        had = self.table.peek(c)
        assert self.table.forget(c) is had
        assert self.table.peek(c) is None

    @precondition(lambda self: self.table.strategy.name in ("weighted", "lc"))
    @rule()
    def least_loaded_is_exact(self) -> None:
        eligible = self.pool.eligible()
        if self.table.strategy.name == "weighted":
            best = min(eligible, key=lambda b: (b.clients, b.index), default=None)
        else:
            best = min(eligible, key=lambda b: (Fraction(b.clients + 1, b.weight), b.index),
                       default=None)
        assert self.table.strategy.choose(b"probe") is best

    @invariant()
    def counts_match(self) -> None:
        counts = recount(self.table)
        for b in self.everyone:
            assert b.clients == counts[b]
        # The per-generation bookkeeping too.
        young = Counter(self.table._young.values())
        old = Counter(self.table._old.values())
        assert {b: n for b, n in self.table._young_counts.items() if n} == young
        assert {b: n for b, n in self.table._old_counts.items() if n} == old

    @invariant()
    def bounded(self) -> None:
        assert len(self.table) <= self.table.max_size

    @invariant()
    def idle_bound(self) -> None:
        # Nothing outlives twice the idle timeout after its last use.
        for c, _ in self.table.items():
            assert self.now - self.last_seen[c] < 2 * self.table.idle_timeout


class LeastLoadedMachine(TableMachine):
    """The same, for the strategies whose choice depends on the counts."""

    names = st.sampled_from(["weighted", "lc"])


TableMachine.TestCase.settings = settings(max_examples=120, stateful_step_count=40,
                                          deadline=None)
LeastLoadedMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=40,
                                                deadline=None)
TestTable = TableMachine.TestCase
TestTableLeastLoaded = LeastLoadedMachine.TestCase
