"""Client-table persistence, and the ClientTable methods it rests on (ages, age, restore)."""

from __future__ import annotations

import ipaddress
import json
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loaded.core.clients import ClientTable
from loaded.core.engine import Engine, Service
from loaded.core.persist import (
    FORMAT,
    VERSION,
    dump_tables,
    list_clients,
    merge_dumps,
    restore_tables,
)
from loaded.core.pool import Backend, Pool, State
from loaded.core.strategies import make_strategy

VIP4 = ipaddress.IPv4Address("198.18.1.100")
VIP6 = ipaddress.IPv6Address("2001:db8:1::100")
T = 8.0  # idle timeout: a power of two keeps the time arithmetic exact


def engine(strategy: str = "rr", n: int = 3, now: float = 0.0, max_size: int = 10_000,
           six: bool = True) -> Engine:
    services = []
    for vip in (VIP4, VIP6) if six else (VIP4,):
        pool = Pool(vip)
        for i in range(n):
            pool.add(ipaddress.ip_address(f"198.19.0.{11 + i}" if vip.version == 4
                                          else f"2001:db8:2::{11 + i:x}"))
        strat = make_strategy(strategy, pool, table_size=251)
        services.append(Service(vip, pool, strat, ClientTable(pool, strat, idle_timeout=T,
                                                              max_size=max_size, now=now)))
    return Engine(services)


def client4(i: int) -> bytes:
    return (0xCB007100 + i).to_bytes(4, "big")


def client6(i: int) -> bytes:
    return ipaddress.IPv6Address(f"2001:db8:9::{i + 1:x}").packed


def feed(e: Engine, clients: Sequence[int], now: float) -> None:
    for i in clients:
        e.services[0].table.backend_for(client4(i), now)
        if len(e.services) > 1:
            e.services[1].table.backend_for(client6(i), now)


def entries(e: Engine, now: float) -> dict[tuple[str, bytes], str]:
    return {(str(s.vip), c): str(b.ip) for s in e.services for c, b, _ in s.table.ages(now)}


def assert_counts(e: Engine) -> None:
    for s in e.services:
        counts = Counter(b for _, b in s.table.items())
        for b in s.pool:
            assert b.clients == counts[b], b


# --- ClientTable.ages / age / restore ------------------------------------------------------


def test_ages_follow_the_generations() -> None:
    t = engine(six=False).services[0].table
    t.backend_for(client4(0), 1.0)
    t.backend_for(client4(1), 9.0)  # rotates at 8: client 0 is old now
    assert sorted(t.ages(10.0)) == sorted([
        (client4(1), t.peek(client4(1)), 0.0), (client4(0), t.peek(client4(0)), 2.0)])
    assert t.age(client4(0), 10.0) == (t.peek(client4(0)), 2.0)
    # At 16 (not yet expired by a call) client 1 is old and client 0 gone, on paper...
    assert [(c, idle) for c, _, idle in t.ages(17.0)] == [(client4(1), 1.0)]
    assert t.age(client4(0), 17.0) is None and t.age(client4(9), 10.0) is None
    assert len(t) == 2  # ...and nothing changed
    assert list(t.ages(40.0)) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.sampled_from([0.0, 0.5, 3.0, 7.75, 8.0])),
                max_size=60),
       st.sampled_from([0.0, 0.25, 4.0, 8.0, 12.0, 16.0, 30.0]))
def test_ages_are_what_expire_keeps(steps: list[tuple[int, float]], later: float) -> None:
    t = engine(six=False, max_size=16).services[0].table
    now = 0.0
    for c, dt in steps:
        now += dt
        t.backend_for(client4(c), now)
    now += later
    seen = {c: b for c, b, _ in t.ages(now)}
    young_before = {c for c, b, idle in t.ages(now) if idle == 0.0}
    for key in seen:
        assert t.age(key, now) is not None
    t.expire(now)
    assert seen == dict(t.items())
    # the young ones were used in the current step: later than every old one
    assert young_before <= set(seen)


@settings(max_examples=300, deadline=None)
@given(started=st.sampled_from([0.0, 1.0, 4.0, 7.5]), idle=st.sampled_from(
    [0.0, 0.5, 1.0, 3.0, 4.0, 6.5, 7.5]), fill=st.integers(0, 3))
def test_restore_keeps_the_expiry_bounds(started: float, idle: float, fill: int) -> None:
    """A restored entry idle ``idle`` at ``now`` is forgotten no sooner than T - idle
    and no later than 2T - idle from now, as if it had never left."""
    t = engine(six=False, now=0.0).services[0].table
    for i in range(fill):
        t.backend_for(client4(100 + i), started)
    now = started + 0.25
    b = t.pool.backends[0]
    assert t.restore(client4(0), b, idle, now)
    assert b.clients == sum(1 for _, x in t.items() if x is b)
    last_use = now - idle
    assert t.age(client4(0), last_use + T - 0.125) is not None
    assert t.age(client4(0), last_use + 2 * T) is None
    t.expire(last_use + T - 0.125)
    assert client4(0) in t


def test_restore_refuses() -> None:
    t = engine(six=False, max_size=4).services[0].table
    a, b, c = t.pool.backends
    assert t.restore(client4(0), a, 1.0, 2.0)
    assert not t.restore(client4(0), b, 1.0, 2.0)  # present
    assert not t.restore(client4(1), a, T, 2.0)  # too idle
    assert t.restore(client4(1), a, 0.0, 2.0)
    assert not t.restore(client4(2), a, 0.0, 2.0)  # young full (max_size // 2)
    t.pool.set_state(c.ip, State.DOWN)
    with pytest.raises(ValueError):
        t.restore(client4(3), c, 0.0, 2.0)
    other = Backend(ipaddress.IPv4Address("198.19.0.99"), VIP4)
    with pytest.raises(ValueError):
        t.restore(client4(3), other, 0.0, 2.0)
    assert (a.clients, b.clients) == (2, 0)


# --- dump and restore -------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["rr", "lc", "maglev"])
def test_round_trip_through_json(strategy: str) -> None:
    e = engine(strategy)
    feed(e, range(0, 50), 1.0)
    feed(e, range(50, 80), 9.0)  # a rotation: two generations
    feed(e, range(0, 10), 10.0)
    dump = json.loads(json.dumps(dump_tables(e, 11.0, 1000.0)))
    assert dump["format"] == FORMAT and dump["version"] == VERSION
    assert dump["written_at"] == 1000.0
    assert len(dump["services"][str(VIP4)]) == 80
    fresh = engine(strategy, now=500.0)
    report = restore_tables(fresh, dump, 500.0, 1001.0, max_age=60.0)
    assert report.restored == 160 and report.total_skipped == 0 and report.age == 1.0
    assert entries(fresh, 500.0) == entries(e, 11.0)
    assert_counts(fresh)
    # Ages carried over: idle 1 s or more at restore, in a table whose step began
    # just now, means old: forgotten at the next step, T from now.
    assert len(list(fresh.services[0].table.ages(500.0 + T - 0.5))) == 80
    assert list(fresh.services[0].table.ages(500.0 + T)) == []
    # Restored at once (age 0), the young ones stay young: a step longer.
    again = engine(strategy, now=500.0)
    restore_tables(again, dump, 500.0, 1000.0, max_age=60.0)
    assert len(list(again.services[0].table.ages(500.0 + T))) == 40
    # The restored clients keep their backend on their next packet.
    for s_old, s_new in zip(e.services, fresh.services, strict=True):
        for c, b in s_old.table.items():
            got = s_new.table.backend_for(c, 500.5)
            assert got is not None and got.ip == b.ip


def test_stale_dump_is_skipped_whole() -> None:
    e = engine()
    feed(e, range(10), 1.0)
    dump = dump_tables(e, 1.0, 1000.0)
    fresh = engine()
    report = restore_tables(fresh, dump, 0.0, 1000.0 + 301.0, max_age=300.0)
    assert report.stale and report.restored == 0 and report.skipped == {"stale": 20}
    assert len(fresh.services[0].table) == 0
    # A dump from the future (clock stepped back) counts as written now.
    report = restore_tables(fresh, dump, 0.0, 900.0, max_age=300.0)
    assert report.restored == 20 and report.age == 0.0


def test_skip_reasons() -> None:
    e = engine(six=False)
    dump = {"format": FORMAT, "version": VERSION, "written_at": 100.0, "services": {
        str(VIP4): [
            ["203.0.113.1", "198.19.0.11", 0.0],  # restored
            ["203.0.113.2", "198.19.0.99", 0.0],  # no-backend
            ["203.0.113.3", "198.19.0.12", 0.0],  # backend-down
            ["203.0.113.4", "198.19.0.13", 7.5],  # expired (7.5 + age 1 >= 8)
            ["203.0.113.5", "198.19.0.11", 0.0],  # present
            ["203.0.113.6", "198.19.0.13", 1.0],  # not-mine
            ["2001:db8::1", "198.19.0.11", 0.0],  # malformed: family
            ["203.0.113.7", "198.19.0.11"],  # malformed: shape
            ["nonsense", "198.19.0.11", 0.0],  # malformed: address
            ["203.0.113.8", "198.19.0.11", -5],  # malformed: idle
            ["203.0.113.9", "2001:db8:2::11", 0.0],  # no-backend: family
            ["203.0.113.10", "198.19.0.13", 0.0],  # restored, draining
        ],
        "192.0.2.1": [["203.0.113.1", "198.19.0.11", 0.0]] * 2,  # no-service
        str(VIP6): [["2001:db8:9::1", "2001:db8:2::11", 0.0]],  # no-service (not served)
    }}
    pool = e.services[0].pool
    pool.set_state(ipaddress.IPv4Address("198.19.0.12"), State.DOWN)
    pool.set_state(ipaddress.IPv4Address("198.19.0.13"), State.DRAINING)
    e.services[0].table.backend_for(bytes([203, 0, 113, 5]), 1.0)
    report = restore_tables(e, dump, 1.0, 101.0, 60.0,
                            accept=lambda c: c != bytes([203, 0, 113, 6]))
    assert report.restored == 2
    assert dict(report.skipped) == {"no-backend": 2, "backend-down": 1, "expired": 1,
                                    "present": 1, "not-mine": 1, "malformed": 4,
                                    "no-service": 3}
    assert report.to_json()["restored"] == 2
    assert_counts(e)


def test_full_table() -> None:
    e = engine(six=False, max_size=4)
    dump = {"format": FORMAT, "version": VERSION, "written_at": 0.0, "services": {
        str(VIP4): [[f"203.0.113.{i}", "198.19.0.11", 0.0] for i in range(5)]}}
    report = restore_tables(e, dump, 0.0, 0.0, 60.0)
    assert report.restored == 2 and report.skipped == {"full": 3}


@pytest.mark.parametrize("bad", [
    {}, {"format": "other"}, {"format": FORMAT, "version": 2},
    {"format": FORMAT, "version": VERSION, "written_at": "x", "services": {}},
    {"format": FORMAT, "version": VERSION, "written_at": 1.0},
    [],
])
def test_malformed_dumps_raise(bad: object) -> None:
    with pytest.raises(ValueError):
        restore_tables(engine(), bad, 0.0, 0.0, 60.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        merge_dumps([bad])  # type: ignore[list-item]


def test_per_worker_restore_with_accept() -> None:
    e = engine(six=False)
    feed(e, range(40), 1.0)
    dump = dump_tables(e, 1.0, 10.0)
    workers = [engine(six=False) for _ in range(3)]
    total = 0
    for i, w in enumerate(workers):
        def mine(c: bytes, i: int = i) -> bool:
            return c[-1] % 3 == i

        r = restore_tables(w, dump, 0.0, 10.0, 60.0, accept=mine)
        assert r.restored + r.skipped["not-mine"] == 40
        total += r.restored
    assert total == 40
    merged = merge_dumps([dump_tables(w, 0.0, 10.0) for w in workers])
    assert sorted(map(tuple, merged["services"][str(VIP4)])) == sorted(
        map(tuple, dump["services"][str(VIP4)]))


def test_merge_shifts_idle_and_keeps_the_freshest() -> None:
    a = {"format": FORMAT, "version": VERSION, "written_at": 100.0, "services": {
        "198.18.1.100": [["203.0.113.1", "198.19.0.11", 1.0],
                         ["203.0.113.2", "198.19.0.11", 0.0]]}}
    b = {"format": FORMAT, "version": VERSION, "written_at": 102.5, "services": {
        "198.18.1.100": [["203.0.113.1", "198.19.0.12", 5.0], ["bad"]],
        "2001:db8:1::100": [["2001:db8:9::1", "2001:db8:2::11", 0.0]]}}
    m = merge_dumps([a, b])
    assert m["written_at"] == 102.5
    assert m["services"] == {
        "198.18.1.100": [["203.0.113.1", "198.19.0.11", 3.5],
                         ["203.0.113.2", "198.19.0.11", 2.5]],
        "2001:db8:1::100": [["2001:db8:9::1", "2001:db8:2::11", 0.0]]}
    with pytest.raises(ValueError):
        merge_dumps([])


def test_list_clients() -> None:
    e = engine()
    feed(e, range(5), 1.0)
    out = list_clients(e, 1.0, limit=2)
    assert [(s["vip"], s["total"], len(s["clients"])) for s in out] == [
        (str(VIP4), 5, 2), (str(VIP6), 5, 2)]
    assert out[0]["clients"][0] == ["203.0.113.0", "198.19.0.11", 0.0]
    only6 = list_clients(e, 1.0, vip="2001:DB8:1::100")
    assert len(only6) == 1 and only6[0]["total"] == 5 and len(only6[0]["clients"]) == 5


@given(st.ip_addresses())
def test_address_text_round_trip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    from loaded.core.persist import _ip_str, _packed

    assert _ip_str(ip.packed) == str(ip)
    assert _packed(str(ip)) == ip.packed


@pytest.mark.parametrize("text", ["1.2.3", "1.2.3.4.5", "1.2.3.256", "01.2.3.4", "1.2.3.-4",
                                  "1.2.3. 4", "1.2.3.٤", "1.2.3.+4", "", "host", "1.2.3.4/32"])
def test_bad_address_text(text: str) -> None:
    from loaded.core.persist import _packed

    with pytest.raises(ValueError):
        _packed(text)
    with pytest.raises(ValueError):
        ipaddress.ip_address(text)  # the same verdict as ipaddress
