"""Tests of the health state machine and scheduler (loaded.core.health), on a fake clock."""

from __future__ import annotations

import itertools
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loaded.core.commands import AddBackend, RemoveBackend, SetState
from loaded.core.config import parse_config
from loaded.core.health import (
    ALL_NODES,
    NEEDED,
    TRANSITIONS,
    CheckResult,
    CheckSpec,
    Discover,
    DiscoveryFailed,
    DiscoverySpec,
    Health,
    HealthMonitor,
    HostAdded,
    HostIgnored,
    HostRemoved,
    Probe,
    ServiceSpec,
    Settings,
    StateChanged,
    Watch,
    describe,
    pool_command,
)
from loaded.core.pool import IPAddress, State

VIP = IPv4Address("198.18.1.100")
VIP6 = IPv6Address("2001:db8:1::100")
NET = IPv4Network("198.19.0.0/24")
NET6 = IPv6Network("2001:db8:2::/64")
GW = IPv4Address("198.19.0.1")
B1, B2, B3 = (IPv4Address(f"198.19.0.{i}") for i in (11, 12, 13))
OK = CheckResult(True, "ok", 0.001)
TIMEOUT = CheckResult(False, "timeout", 1.0)
REFUSED = CheckResult(False, "refused", 0.001)


def ip(s: str) -> IPAddress:
    return ip_address(s)


def monitor(*backends: IPAddress, rise: int = 2, fall: int = 3, interval: float = 2.0,
            now: float = 0.0, hotplug: bool = False, discovery: bool = False,
            forget_after: int = 3, max_hotplug: int = 1024, cycle: float = 30.0,
            unwatched: frozenset[IPAddress] = frozenset()) -> HealthMonitor:
    spec = ServiceSpec(VIP, tuple(Watch(b) for b in backends), unwatched, NET,
                       DiscoverySpec(IPv4Address("198.19.0.255"), "priv0", GW)
                       if discovery else None)
    s = Settings(check=CheckSpec("tcp", 80, min(1.0, interval)), interval=interval,
                 rise=rise, fall=fall, hotplug=hotplug, cycle=cycle,
                 forget_after=forget_after, max_hotplug=max_hotplug)
    return HealthMonitor([spec], s, now, own=[GW])


def feed(m: HealthMonitor, target: IPAddress, results: list[CheckResult],
         now: float = 1.0) -> list[StateChanged]:
    events = []
    for r in results:
        for e in m.result((VIP, target), r, now):
            assert isinstance(e, StateChanged)
            events.append(e)
    return events


# --------------------------------------------------------------------------
# The table


def test_table_is_complete_and_symmetric() -> None:
    assert set(TRANSITIONS) == {(h, ok) for h in Health for ok in (True, False)}
    # A result counts towards the state it speaks for, or confirms that state.
    for (state, ok), towards in TRANSITIONS.items():
        speaks_for = Health.UP if ok else Health.DOWN
        assert towards == (None if state is speaks_for else speaks_for)
    assert NEEDED == {Health.UP: "rise", Health.DOWN: "fall"}


# --------------------------------------------------------------------------
# Rise and fall


def test_configured_backends_start_up() -> None:
    m = monitor(B1, B2)
    assert m.health(VIP, B1) is Health.UP and m.health(VIP, B2) is Health.UP
    assert [s.up for s in m.status()] == [True, True]
    assert m.health(VIP, B3) is None


@pytest.mark.parametrize("fall", [1, 2, 3, 7])
def test_fall_failures_in_a_row_take_it_down_exactly(fall: int) -> None:
    m = monitor(B1, fall=fall)
    assert feed(m, B1, [TIMEOUT] * (fall - 1)) == []
    assert m.health(VIP, B1) is Health.UP
    (e,) = feed(m, B1, [TIMEOUT], now=5.0)
    assert e == StateChanged(VIP, B1, False, "timeout", 5.0, "tcp:80", fall, State.DOWN)
    assert m.health(VIP, B1) is Health.DOWN
    assert feed(m, B1, [TIMEOUT] * 10) == []


@pytest.mark.parametrize("rise", [1, 2, 5])
def test_rise_successes_in_a_row_bring_it_up_exactly(rise: int) -> None:
    m = monitor(B1, rise=rise, fall=1)
    feed(m, B1, [REFUSED])
    assert feed(m, B1, [OK] * (rise - 1)) == []
    (e,) = feed(m, B1, [OK], now=9.0)
    assert (e.up, e.reason, e.since, e.count, e.pool_state) == (True, "ok", 9.0, rise, State.UP)
    assert feed(m, B1, [OK] * 10) == []


def test_a_success_restarts_the_failure_count() -> None:
    m = monitor(B1, fall=3)
    assert feed(m, B1, [TIMEOUT, TIMEOUT, OK, TIMEOUT, TIMEOUT]) == []
    assert m.health(VIP, B1) is Health.UP
    assert len(feed(m, B1, [TIMEOUT])) == 1


def test_a_failure_restarts_the_success_count() -> None:
    m = monitor(B1, rise=3, fall=1)
    feed(m, B1, [TIMEOUT])
    assert feed(m, B1, [OK, OK, TIMEOUT, OK, OK]) == []
    assert len(feed(m, B1, [OK])) == 1


@pytest.mark.parametrize(("rise", "fall"), [(2, 2), (2, 3), (3, 2), (5, 5)])
@pytest.mark.parametrize("start_down", [False, True])
def test_flapping_never_changes_state(rise: int, fall: int, start_down: bool) -> None:
    m = monitor(B1, rise=rise, fall=fall)
    if start_down:
        feed(m, B1, [TIMEOUT] * fall)
    before = m.health(VIP, B1)
    # The first result agrees with the state, then they alternate.
    pair = [OK, TIMEOUT] if before is Health.UP else [TIMEOUT, OK]
    assert feed(m, B1, pair * 100) == []
    assert m.health(VIP, B1) is before


def test_rise_and_fall_of_one_follow_every_result() -> None:
    m = monitor(B1, rise=1, fall=1)
    events = feed(m, B1, [TIMEOUT, OK, REFUSED, OK])
    assert [(e.up, e.reason) for e in events] == [
        (False, "timeout"), (True, "ok"), (False, "refused"), (True, "ok")]


def _model(results: list[bool], rise: int, fall: int) -> list[bool]:
    """An independent statement of the rule: the state changes when the last
    `fall` (or `rise`) results since the last change all disagree with it."""
    up, changes, run = True, [], 0
    for ok in results:
        run = run + 1 if ok != up else 0
        if run == (rise if not up else fall):
            up, run = not up, 0
            changes.append(up)
    return changes


@settings(max_examples=300, deadline=None)
@given(st.lists(st.booleans(), max_size=60), st.integers(1, 5), st.integers(1, 5))
def test_state_changes_match_the_model(results: list[bool], rise: int, fall: int) -> None:
    m = monitor(B1, rise=rise, fall=fall)
    events = feed(m, B1, [OK if ok else TIMEOUT for ok in results])
    assert [e.up for e in events] == _model(results, rise, fall)
    # A change is always decided by exactly the needed count.
    assert all(e.count == (rise if e.up else fall) for e in events)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), max_size=40), st.integers(2, 5), st.integers(2, 5))
def test_strictly_alternating_results_never_change_state(
        prefix: list[bool], rise: int, fall: int) -> None:
    m = monitor(B1, rise=rise, fall=fall)
    feed(m, B1, [OK if ok else TIMEOUT for ok in prefix])
    before = m.health(VIP, B1)
    pair = [OK, TIMEOUT] if before is Health.UP else [TIMEOUT, OK]
    assert feed(m, B1, pair * 30) == []
    assert m.health(VIP, B1) is before


def test_draining_backend_returns_to_draining() -> None:
    spec = ServiceSpec(VIP, (Watch(B1, state=State.DRAINING),), real_net=NET)
    m = HealthMonitor([spec], Settings(rise=1, fall=1), 0.0)
    (down,) = m.result((VIP, B1), TIMEOUT, 1.0)
    (up,) = m.result((VIP, B1), OK, 2.0)
    assert isinstance(down, StateChanged) and isinstance(up, StateChanged)
    assert (down.pool_state, up.pool_state) == (State.DOWN, State.DRAINING)


def test_result_for_unknown_target_is_ignored() -> None:
    m = monitor(B1)
    assert m.result((VIP, B3), TIMEOUT, 1.0) == []


def test_result_accepts_the_probe_itself() -> None:
    m = monitor(B1, fall=1)
    (p,) = m.due(0.0)
    assert p == Probe(VIP, B1, CheckSpec("tcp", 80, 1.0)) and p.target == (VIP, B1)
    assert p.timeout == 1.0
    assert len(m.result(p, TIMEOUT, 1.0)) == 1


# --------------------------------------------------------------------------
# Scheduling


def run(m: HealthMonitor, until: float, answer: float = 0.0, ok: bool = True,
        start: float = 0.0) -> list[tuple[float, IPAddress]]:
    """Drive ``m`` as the runner does, on a fake clock, each probe answering
    after ``answer`` seconds; returns (start time, target) of every probe, and
    checks that no target ever has two probes running."""
    now = start
    started: list[tuple[float, IPAddress]] = []
    pending: list[tuple[float, Probe]] = []
    while now <= until:
        for done, p in sorted((x for x in pending if x[0] <= now), key=lambda x: x[0]):
            pending.remove((done, p))
            m.result(p, OK if ok else TIMEOUT, now)
        for p in m.due(now):
            assert all(q.ip != p.ip for _, q in pending), "two probes of one target at once"
            started.append((now, p.ip))
            pending.append((now + answer, p))
        deadline = m.next_deadline(now)
        assert deadline is None or deadline > now
        times = [d for d, _ in pending] + ([deadline] if deadline is not None else [])
        if not times:
            break
        now = min(times)
    return started


def test_first_probes_are_spread_over_the_interval() -> None:
    backends = [IPv4Address(f"198.19.0.{10 + i}") for i in range(8)]
    m = monitor(*backends, interval=2.0, now=100.0)
    assert m.next_deadline(100.0) == 100.0
    firsts: dict[IPAddress, float] = {}
    now = 100.0
    while len(firsts) < 8:
        for p in m.due(now):
            firsts[p.ip] = now
        d = m.next_deadline(now)
        assert d is not None and d > now
        now = d
    assert [firsts[b] for b in backends] == pytest.approx([100.0 + 0.25 * i for i in range(8)])


def test_every_target_is_probed_once_per_interval() -> None:
    backends = [IPv4Address(f"198.19.0.{10 + i}") for i in range(5)]
    m = monitor(*backends, interval=2.0)
    started = run(m, until=19.99, answer=0.3)
    for b in backends:
        times = [t for t, x in started if x == b]
        assert len(times) == 10
        gaps = {round(b - a, 9) for a, b in itertools.pairwise(times)}
        assert gaps == {2.0}


def test_slow_results_delay_but_never_double_a_probe() -> None:
    # Timeout equal to the interval: the next slot comes while the probe runs.
    m = monitor(B1, interval=1.0)
    started = run(m, until=10.0, answer=1.0, ok=False)
    times = [t for t, _ in started]
    assert times[:4] == pytest.approx([0.0, 1.0, 2.0, 3.0])
    # Never two probes of one target at once.
    assert all(b - a >= 1.0 - 1e-9 for a, b in itertools.pairwise(times))


def test_overdue_probe_starts_when_its_result_comes_and_keeps_its_phase() -> None:
    m = monitor(B1, B2, interval=2.0)
    (p1,) = m.due(0.0)
    assert p1.ip == B1
    (p2,) = m.due(1.0)
    assert p2.ip == B2
    assert m.due(2.5) == []  # B1 is due at 2 but still in flight
    assert m.next_deadline(2.5) == 3.0  # B2's next slot; B1 waits for its result
    m.result(p1, OK, 2.7)
    assert m.next_deadline(2.7) == 2.7
    (again,) = m.due(2.7)
    assert again.ip == B1
    m.result(again, OK, 2.8)
    m.result(p2, OK, 2.8)
    (p2b,) = m.due(3.0)
    assert p2b.ip == B2
    assert m.next_deadline(3.0) == 4.0  # B1 back on its own phase


def test_a_late_runner_skips_slots_instead_of_bursting() -> None:
    m = monitor(B1, interval=2.0)
    (p,) = m.due(0.0)
    m.result(p, OK, 0.1)
    assert len(m.due(9.0)) == 1  # slots 2, 4, 6, 8 missed: one probe
    assert m.next_deadline(9.0) == 10.0


def test_nothing_to_do() -> None:
    m = HealthMonitor([ServiceSpec(VIP)], Settings(), 0.0)
    assert m.due(0.0) == [] and m.next_deadline(0.0) is None and len(m) == 0


def test_check_none_is_never_probed_and_stays_up() -> None:
    spec = ServiceSpec(VIP, (Watch(B1, CheckSpec("none")), Watch(B2)), real_net=NET)
    m = HealthMonitor([spec], Settings(), 0.0)
    assert [p.ip for p in m.due(0.0)] == [B2]
    assert m.next_deadline(0.0) == 2.0
    assert m.health(VIP, B1) is Health.UP


def test_per_backend_check_overrides_the_default() -> None:
    http = CheckSpec("http", 8080, 0.5, "/health", 204)
    spec = ServiceSpec(VIP, (Watch(B1, http), Watch(B2)), real_net=NET)
    m = HealthMonitor([spec], Settings(check=CheckSpec("icmp"), interval=1.0), 0.0)
    probes = m.due(0.0) + m.due(0.5)
    assert [(p.ip, p.check) for p in probes] == [(B1, http), (B2, CheckSpec("icmp"))]
    assert http.label == "http:8080/health"


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="interval"):
        Settings(interval=0)
    with pytest.raises(ValueError, match="rise"):
        Settings(rise=0)
    with pytest.raises(ValueError, match="unknown check"):
        CheckSpec("smtp")
    with pytest.raises(ValueError, match="port"):
        CheckSpec("tcp", 0)
    with pytest.raises(ValueError, match="longer than the interval"):
        HealthMonitor([ServiceSpec(VIP, (Watch(B1),))],
                      Settings(check=CheckSpec(timeout=3.0), interval=2.0), 0.0)
    with pytest.raises(ValueError, match="different families"):
        HealthMonitor([ServiceSpec(VIP, (Watch(VIP6),))], Settings(), 0.0)
    with pytest.raises(ValueError, match="twice"):
        HealthMonitor([ServiceSpec(VIP, (Watch(B1), Watch(B1)))], Settings(), 0.0)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 40), interval=st.sampled_from([0.5, 1.0, 2.0, 3.0]),
       answer_frac=st.floats(0.0, 0.99), start=st.floats(0, 1e6))
def test_schedule_properties(n: int, interval: float, answer_frac: float, start: float) -> None:
    backends = [IPv4Address(int(NET.network_address) + 10 + i) for i in range(n)]
    m = monitor(*backends, interval=interval, now=start)
    started = run(m, until=start + 5 * interval - 1e-6, answer=answer_frac * interval,
                  start=start)
    firsts = []
    for b in backends:
        ts = [t for t, x in started if x == b]
        assert len(ts) == 5
        firsts.append(ts[0])
        assert all(y - x == pytest.approx(interval) for x, y in itertools.pairwise(ts))
    # First probes spread evenly over the first interval, in configuration order.
    assert firsts == pytest.approx([start + interval * k / n for k in range(n)])


# --------------------------------------------------------------------------
# Discovery


def test_discovery_runs_at_once_then_every_cycle() -> None:
    m = monitor(B1, discovery=True, cycle=30.0)
    (d,) = m.due_discovery(0.0)
    assert d == Discover(VIP, IPv4Address("198.19.0.255"), "priv0", GW, 3.0)
    assert d.family == 4
    assert m.due_discovery(1.0) == []  # in flight
    assert m.discovered(VIP, [B1], 3.0) == []
    assert m.due_discovery(29.0) == []
    assert len(m.due_discovery(30.0)) == 1
    m.discovery_failed(VIP, "error: boom", 31.0)
    # A late discovery skips cycles rather than catching up.
    assert len(m.due_discovery(100.0)) == 1
    assert m.due_discovery(100.0) == []


def test_next_deadline_includes_discovery() -> None:
    m = monitor(discovery=True, cycle=30.0)
    assert m.next_deadline(0.0) == 0.0
    m.due_discovery(0.0)
    assert m.next_deadline(0.0) is None  # in flight, nothing else
    m.discovered(VIP, [], 3.0)
    assert m.next_deadline(3.0) == 30.0


def test_discovery_failed_event() -> None:
    m = monitor(discovery=True)
    m.due_discovery(0.0)
    assert m.discovery_failed(VIP, "error: EPERM", 1.0) == [DiscoveryFailed(VIP, "error: EPERM")]


def test_discovery_filters_hosts() -> None:
    m = monitor(B1, hotplug=True, discovery=True)
    hosts = [
        VIP,  # the VIP: silently
        GW,  # the balancer's own address: silently
        IPv4Address("198.19.1.5"),  # outside RIP4
        IPv4Address("10.0.0.1"),  # outside RIP4
        IPv4Address("198.19.0.0"),  # the network's address
        IPv4Address("198.19.0.255"),  # its broadcast address
        IPv6Address("2001:db8:2::99"),  # other family: not this VIP's business
        B1,  # configured
    ]
    events = m.discovered(VIP, hosts, 3.0)
    assert events == [
        HostIgnored(VIP, IPv4Address("10.0.0.1"), "outside RIP4 198.19.0.0/24"),
        HostIgnored(VIP, IPv4Address("198.19.0.0"), "outside RIP4 198.19.0.0/24"),
        HostIgnored(VIP, IPv4Address("198.19.0.255"), "outside RIP4 198.19.0.0/24"),
        HostIgnored(VIP, IPv4Address("198.19.1.5"), "outside RIP4 198.19.0.0/24"),
    ]
    assert len(m) == 1
    # Reported once per host.
    assert m.discovered(VIP, hosts, 33.0) == []


def test_discovery_without_rip_takes_nothing() -> None:
    spec = ServiceSpec(VIP, (Watch(B1),), discovery=DiscoverySpec(IPv4Address("198.19.0.255")))
    m = HealthMonitor([spec], Settings(hotplug=True), 0.0)
    assert m.discovered(VIP, [B2], 1.0) == [HostIgnored(VIP, B2, "no RIP4 set")]


def test_hotplug_off_only_reports_once() -> None:
    m = monitor(B1, discovery=True)
    assert m.discovered(VIP, [B1, B2, B3], 3.0) == [
        HostIgnored(VIP, B2, "hotplug off"), HostIgnored(VIP, B3, "hotplug off")]
    assert m.discovered(VIP, [B1, B2, B3], 33.0) == []
    assert len(m) == 1


def test_hotplugged_host_starts_down_and_joins_after_rise() -> None:
    m = monitor(B1, hotplug=True, discovery=True, rise=2, interval=2.0)
    m.due(0.0)
    assert m.discovered(VIP, [B1, B2], 3.0) == [HostAdded(VIP, B2, 3.0)]
    assert m.health(VIP, B2) is Health.DOWN
    (p,) = m.due(3.0)  # probed at once
    assert p.ip == B2
    assert m.result(p, OK, 3.01) == []
    (p,) = m.due(5.0)
    (e,) = m.result(p, OK, 5.01)
    assert e == StateChanged(VIP, B2, True, "ok", 5.01, "tcp:80", 2, State.UP)
    st_b2 = next(s for s in m.status() if s.ip == B2)
    assert st_b2.hotplugged and st_b2.up and st_b2.checks == 2


def test_configured_backend_unseen_by_discovery_stays() -> None:
    m = monitor(B1, B2, hotplug=True, discovery=True, forget_after=1)
    feed(m, B1, [TIMEOUT] * 3)
    for cycle in range(5):
        assert m.discovered(VIP, [], 30.0 * cycle) == []
    assert m.health(VIP, B1) is Health.DOWN and m.health(VIP, B2) is Health.UP


def test_hotplugged_host_down_and_silent_is_removed_after_n_cycles() -> None:
    m = monitor(hotplug=True, discovery=True, forget_after=3)
    m.discovered(VIP, [B2], 0.0)
    assert m.discovered(VIP, [], 30.0) == []
    assert m.discovered(VIP, [], 60.0) == []
    assert m.discovered(VIP, [], 90.0) == [
        HostRemoved(VIP, B2, "down and silent for 3 discoveries", 90.0)]
    assert (VIP, B2) not in m
    assert m.result((VIP, B2), OK, 91.0) == []  # a late result is ignored
    # It may come back.
    assert m.discovered(VIP, [B2], 120.0) == [HostAdded(VIP, B2, 120.0)]


def test_answering_resets_the_silence_count() -> None:
    m = monitor(hotplug=True, discovery=True, forget_after=2)
    m.discovered(VIP, [B2], 0.0)
    for t in range(1, 20):
        # Answers the ping every other cycle, never passes its check: it stays a
        # (down) target rather than being removed and re-added.
        assert m.discovered(VIP, [B2] if t % 2 else [], 30.0 * t) == []
    assert m.health(VIP, B2) is Health.DOWN


def test_hotplugged_host_that_is_up_is_not_removed_by_silence() -> None:
    m = monitor(hotplug=True, discovery=True, forget_after=1, rise=1)
    m.discovered(VIP, [B2], 0.0)
    m.result((VIP, B2), OK, 1.0)
    assert m.discovered(VIP, [], 30.0) == []
    assert m.health(VIP, B2) is Health.UP
    m.result((VIP, B2), TIMEOUT, 31.0)
    m.result((VIP, B2), TIMEOUT, 33.0)
    (down,) = m.result((VIP, B2), TIMEOUT, 35.0)
    assert isinstance(down, StateChanged) and not down.up
    (removed,) = m.discovered(VIP, [], 60.0)
    assert isinstance(removed, HostRemoved)


def test_unwatched_backends_are_not_hotplugged() -> None:
    m = monitor(B1, hotplug=True, discovery=True, unwatched=frozenset({B2}))
    assert m.discovered(VIP, [B2], 1.0) == []
    assert (VIP, B2) not in m


def test_max_hotplug() -> None:
    m = monitor(hotplug=True, discovery=True, max_hotplug=1)
    assert m.discovered(VIP, [B2, B3], 1.0) == [
        HostAdded(VIP, B2, 1.0), HostIgnored(VIP, B3, "too many hot-plugged hosts")]


def test_ipv6_discovery_strips_zones_and_filters() -> None:
    gw6 = IPv6Address("2001:db8:2::1")
    b6 = IPv6Address("2001:db8:2::11")
    spec = ServiceSpec(VIP6, (), real_net=NET6, discovery=DiscoverySpec(ALL_NODES, "priv0", gw6))
    m = HealthMonitor([spec], Settings(hotplug=True), 0.0, own=[gw6])
    (d,) = m.due_discovery(0.0)
    assert (d.target, d.ifname, d.source, d.family) == (ALL_NODES, "priv0", gw6, 6)
    events = m.discovered(VIP6, [IPv6Address("2001:db8:2::11%priv0"), gw6,
                                 IPv6Address("fe80::1%priv0"), B1], 3.0)
    assert events == [HostAdded(VIP6, b6, 3.0),
                      HostIgnored(VIP6, IPv6Address("fe80::1"), "outside RIP6 2001:db8:2::/64")]
    assert m.health(VIP6, b6) is Health.DOWN


def test_discovered_for_unknown_vip() -> None:
    m = monitor()
    with pytest.raises(KeyError):
        m.discovered(IPv4Address("198.18.1.99"), [], 0.0)


# --------------------------------------------------------------------------
# From a configuration


def test_from_config() -> None:
    c = parse_config(
        "VIP4=198.18.1.100\nVIP6=2001:db8:1::100\nRIP4=198.19.0.0/24\nRIP6=2001:db8:2::/64\n"
        "private_NIC=priv0\nprivate_GW=198.19.0.1/24\nprivate_GW=2001:db8:2::1/64\n"
        "server4=198.19.0.11\nserver4=198.19.0.12 check=icmp state=drain\n"
        "server4=198.19.0.13 state=down\nserver6=2001:db8:2::11\n"
        "failover\ncheck=http\nport_alive=8080\nhttp_path=/h\ncheck_interval=1\n"
        "check_timeout=0.5\nrise=4\nfall=5\nhotplug=yes\ncheck_cycle=10\n", "t.conf")
    m = HealthMonitor.from_config(c, 0.0)
    assert m.settings.check == CheckSpec("http", 8080, 0.5, "/h", 200, b"")
    assert (m.settings.interval, m.settings.rise, m.settings.fall) == (1.0, 4, 5)
    assert (m.settings.hotplug, m.settings.cycle, m.settings.discovery_wait) == (True, 10.0, 3.0)
    assert sorted(str(s.ip) for s in m.status()) == ["198.19.0.11", "198.19.0.12",
                                                     "2001:db8:2::11"]
    probes = m.due(0.0) + m.due(0.34) + m.due(0.67)
    assert {str(p.ip): p.check.label for p in probes} == {
        "198.19.0.11": "http:8080/h", "198.19.0.12": "icmp", "2001:db8:2::11": "http:8080/h"}
    d4, d6 = m.due_discovery(0.0)
    assert (str(d4.target), d4.ifname, str(d4.source)) == ("198.19.0.255", "priv0", "198.19.0.1")
    assert (str(d6.target), d6.ifname, str(d6.source)) == ("ff02::1", "priv0", "2001:db8:2::1")
    # state=down is left alone; the private gateway is the balancer's own.
    assert m.discovered(c.vip4, [ip("198.19.0.13"), ip("198.19.0.1")], 1.0) == []
    # A drained backend comes back drained.
    m.result((ip("198.18.1.100"), ip("198.19.0.12")), TIMEOUT, 1.0)
    for _ in range(4):
        m.result((ip("198.18.1.100"), ip("198.19.0.12")), TIMEOUT, 1.0)
    events = [e for _ in range(4)
              for e in m.result((ip("198.18.1.100"), ip("198.19.0.12")), OK, 2.0)]
    assert [(e.up, e.pool_state) for e in events if isinstance(e, StateChanged)] == [
        (True, State.DRAINING)]


def test_from_config_discovery_targets() -> None:
    base = "VIP4=198.18.1.100\nserver4=198.19.0.11\nfailover\n"
    m = HealthMonitor.from_config(parse_config(base, "t"), 0.0)
    assert m.due_discovery(0.0) == []  # no broadcast, no RIP4: no discovery
    m = HealthMonitor.from_config(parse_config(base + "broadcast=198.19.0.255\n", "t"), 0.0)
    (d,) = m.due_discovery(0.0)
    assert (str(d.target), d.ifname, d.source) == ("198.19.0.255", None, None)
    m = HealthMonitor.from_config(parse_config(base + "RIP4=198.19.0.0/23\ncheck_cycle=1\n",
                                               "t"), 0.0)
    (d,) = m.due_discovery(0.0)
    assert (str(d.target), d.timeout) == ("198.19.1.255", 1.0)
    v6 = "VIP6=2001:db8:1::100\nserver6=2001:db8:2::11\nfailover\n"
    m = HealthMonitor.from_config(parse_config(v6, "t"), 0.0)
    assert m.due_discovery(0.0) == []  # no private_NIC to scope ff02::1
    with pytest.raises(ValueError, match="no IPv4 VIP"):
        HealthMonitor.from_config(parse_config(v6, "t"), 0.0, families=[4])


# --------------------------------------------------------------------------
# Log lines and pool commands


def test_describe() -> None:
    assert describe(StateChanged(VIP, B1, False, "timeout", 1.0, "tcp:80", 3)) == (
        "event=backend-down vip=198.18.1.100 backend=198.19.0.11 check=tcp:80 "
        "reason=timeout count=3")
    assert describe(StateChanged(VIP6, IPv6Address("2001:db8:2::11"), True, "ok", 1.0,
                                 "http:80/", 2)) == (
        "event=backend-up vip=2001:db8:1::100 backend=2001:db8:2::11 check=http:80/ "
        "reason=ok count=2")
    assert describe(StateChanged(VIP, B1, False, "status 503", 1.0, "http:80/", 3)) == (
        'event=backend-down vip=198.18.1.100 backend=198.19.0.11 check=http:80/ '
        'reason="status 503" count=3')
    assert describe(HostAdded(VIP, B2, 1.0)) == (
        "event=host-added vip=198.18.1.100 backend=198.19.0.12 state=down")
    assert describe(HostRemoved(VIP, B2, "down and silent for 3 discoveries", 1.0)) == (
        'event=host-removed vip=198.18.1.100 backend=198.19.0.12 '
        'reason="down and silent for 3 discoveries"')
    assert describe(HostIgnored(VIP, B2, "hotplug off")) == (
        'event=host-ignored vip=198.18.1.100 host=198.19.0.12 reason="hotplug off"')
    assert describe(DiscoveryFailed(VIP, 'error: "x"=1\n')) == (
        'event=discovery-failed vip=198.18.1.100 reason="error: \\"x\\"=1\\x0a"')


def test_pool_command() -> None:
    down = StateChanged(VIP, B1, False, "timeout", 1.0, "tcp:80", 3, State.DOWN)
    assert pool_command(down, cut=True) == SetState(VIP, B1, State.DOWN, cut=True)
    assert pool_command(down, cut=False) == SetState(VIP, B1, State.DOWN, cut=False)
    up = StateChanged(VIP, B1, True, "ok", 1.0, "tcp:80", 2, State.DRAINING)
    assert pool_command(up, cut=True) == SetState(VIP, B1, State.DRAINING)
    assert pool_command(up, cut=False) == SetState(VIP, B1, State.DRAINING)
    assert pool_command(HostAdded(VIP, B2, 1.0), cut=True) == AddBackend(
        VIP, B2, weight=1, state=State.DOWN)
    assert pool_command(HostRemoved(VIP, B2, "x", 1.0), cut=True) == RemoveBackend(VIP, B2)
    assert pool_command(HostIgnored(VIP, B2, "x"), cut=True) is None
    assert pool_command(DiscoveryFailed(VIP, "x"), cut=True) is None
