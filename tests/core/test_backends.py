"""The owner of backend state: the rule table, what each voice's word sends, and
the view and replay that keep every worker's pools alike."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loaded.core.backends import (
    ADMIN_OF,
    RULES,
    Admin,
    BackendStates,
    PoolEntry,
    Verdict,
    effective,
)
from loaded.core.commands import AddBackend, PoolCommand, RemoveBackend, SetState, SetWeight
from loaded.core.config import Config, parse_config
from loaded.core.engine import Engine, build_engine
from loaded.core.health import HostAdded, HostIgnored, HostRemoved, StateChanged
from loaded.core.pool import State, ct_mark

VIP = ipaddress.IPv4Address("198.18.1.100")
BASE = """VIP4=198.18.1.100
RIP4=198.19.0.0/24
"""


def b(last: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(f"198.19.0.{last}")


def config(servers: str = "server4=198.19.0.11\nserver4=198.19.0.12\n") -> Config:
    return parse_config(BASE + servers, "t.conf")


def states(servers: str = "server4=198.19.0.11\nserver4=198.19.0.12\n") -> BackendStates:
    return BackendStates(config(servers), (4,))


def send(s: BackendStates, command: PoolCommand | None) -> PoolCommand | None:
    """As the supervisor does: what the owner decided goes out, and it is told."""
    return None if command is None else s.sent(command)


def down(ip: ipaddress.IPv4Address) -> StateChanged:
    return StateChanged(VIP, ip, False, "timeout", 1.0)


def up(ip: ipaddress.IPv4Address, pool_state: State = State.UP) -> StateChanged:
    return StateChanged(VIP, ip, True, "ok", 2.0, pool_state=pool_state)


# --- the table -------------------------------------------------------------------


def test_the_table_covers_every_admin_and_verdict() -> None:
    assert set(RULES) == {(a, v) for a in Admin for v in Verdict}
    assert set(ADMIN_OF.values()) == set(Admin) - {Admin.REMOVING}


@pytest.mark.parametrize(("admin", "verdict", "configured", "cut", "expected"), [
    # enabled: the file's word unless the checks say down
    (Admin.ENABLED, Verdict.UP, State.UP, True, (State.UP, True)),
    (Admin.ENABLED, Verdict.UNKNOWN, State.DRAINING, True, (State.DRAINING, True)),
    (Admin.ENABLED, Verdict.UP, State.DOWN, False, (State.DOWN, True)),
    (Admin.ENABLED, Verdict.DOWN, State.UP, True, (State.DOWN, True)),
    (Admin.ENABLED, Verdict.DOWN, State.DRAINING, False, (State.DOWN, False)),  # keep
    # drain stays drain whatever health says
    (Admin.DRAIN, Verdict.UP, State.UP, True, (State.DRAINING, True)),
    (Admin.DRAIN, Verdict.DOWN, State.UP, False, (State.DRAINING, True)),
    (Admin.DRAIN, Verdict.UNKNOWN, State.DOWN, True, (State.DRAINING, True)),
    # disabled: down now, whatever on_backend_down says
    (Admin.DISABLED, Verdict.UP, State.UP, False, (State.DOWN, True)),
    (Admin.DISABLED, Verdict.DOWN, State.DRAINING, False, (State.DOWN, True)),
    # leaving: no state command at all
    (Admin.REMOVING, Verdict.UP, State.UP, True, None),
    (Admin.REMOVING, Verdict.DOWN, State.UP, False, None),
])
def test_effective(admin: Admin, verdict: Verdict, configured: State, cut: bool,
                   expected: tuple[State, bool] | None) -> None:
    assert effective(admin, verdict, configured, cut=cut) == expected


# --- the voices ------------------------------------------------------------------


def test_configured_backends_start_enabled_unknown_and_in_the_pools() -> None:
    s = states("server4=198.19.0.11 weight=3 state=drain\nserver4=198.19.0.12\n")
    assert s.entry(VIP, b(11)) == PoolEntry(3, State.DRAINING)
    assert s.configured(VIP, b(11)) is State.DRAINING
    assert s.admin(VIP, b(11)) is Admin.ENABLED and s.verdict(VIP, b(11)) is Verdict.UNKNOWN
    assert s.index_of(VIP, b(12)) == 1 and s.mark_of(VIP, b(12)) == ct_mark(4, 1)
    assert list(s.serving(VIP)) == [(VIP, b(11)), (VIP, b(12))]
    assert s.entry(VIP, b(99)) is None and s.admin(VIP, b(99)) is Admin.ENABLED


def test_the_operators_word_outranks_health_and_enable_follows_it() -> None:
    s = states()
    assert send(s, s.operator(SetState(VIP, b(11), State.DRAINING), cut=True)) == SetState(
        VIP, b(11), State.DRAINING)
    assert s.admin(VIP, b(11)) is Admin.DRAIN
    assert s.health(down(b(11)), cut=True) is None  # recorded, not applied
    assert s.verdict(VIP, b(11)) is Verdict.DOWN and s.transitions(VIP, b(11)) == 1
    assert s.entry(VIP, b(11)) == PoolEntry(1, State.DRAINING)
    # enable: what health calls for, cut or keep as on_backend_down says
    assert s.operator(SetState(VIP, b(11), State.UP), cut=False) == SetState(
        VIP, b(11), State.DOWN, cut=False)
    assert send(s, s.operator(SetState(VIP, b(11), State.UP), cut=True)) == SetState(
        VIP, b(11), State.DOWN, cut=True)
    assert send(s, s.health(up(b(11)), cut=True)) == SetState(VIP, b(11), State.UP)
    assert s.entry(VIP, b(11)) == PoolEntry(1, State.UP)
    # disable: down and cut, even with on_backend_down=keep, and health stays out
    assert send(s, s.operator(SetState(VIP, b(12), State.DOWN), cut=False)) == SetState(
        VIP, b(12), State.DOWN, cut=True)
    assert s.health(up(b(12)), cut=True) is None
    assert s.entry(VIP, b(12)) == PoolEntry(1, State.DOWN)


def test_health_brings_back_the_configured_state_not_the_monitors() -> None:
    s = states("server4=198.19.0.11 state=drain\n")
    assert send(s, s.health(down(b(11)), cut=False)) == SetState(VIP, b(11), State.DOWN,
                                                                 cut=False)
    assert s.entry(VIP, b(11)) == PoolEntry(1, State.DRAINING)  # keep: serves its clients
    # the monitor was built with state up; the configured state is drain
    assert send(s, s.health(up(b(11), State.UP), cut=False)) == SetState(
        VIP, b(11), State.DRAINING)


def test_the_file_wins_where_it_changed_something() -> None:
    s = states()
    send(s, s.operator(SetState(VIP, b(11), State.DRAINING), cut=True))
    send(s, s.health(down(b(12)), cut=True))
    # a reload's state: the configured state, and the end of the operator's drain
    assert send(s, s.reloaded(SetState(VIP, b(11), State.UP), cut=True)) == SetState(
        VIP, b(11), State.UP)
    assert s.admin(VIP, b(11)) is Admin.ENABLED
    # ... but health still decides: b12 is down by its checks, and stays so
    assert send(s, s.reloaded(SetState(VIP, b(12), State.DRAINING), cut=True)) == SetState(
        VIP, b(12), State.DOWN)
    assert s.configured(VIP, b(12)) is State.DRAINING
    assert send(s, s.health(up(b(12)), cut=True)) == SetState(VIP, b(12), State.DRAINING)


def test_running_is_the_state_without_health() -> None:
    s = states("server4=198.19.0.11\nserver4=198.19.0.12 weight=2\nserver4=198.19.0.13\n")
    send(s, s.health(down(b(11)), cut=True))
    send(s, s.operator(SetState(VIP, b(12), State.DRAINING), cut=True))
    send(s, s.operator(RemoveBackend(VIP, b(13)), cut=True))
    assert s.entry(VIP, b(11)) == PoolEntry(1, State.DOWN)
    assert s.running([VIP]) == {str(VIP): {"198.19.0.11": (1, State.UP),
                                           "198.19.0.12": (2, State.DRAINING)}}


def test_add_remove_and_indexes() -> None:
    s = states()
    add = s.operator(AddBackend(VIP, b(20), 2), cut=True)
    assert add == AddBackend(VIP, b(20), 2)  # the index goes in when it is sent
    assert s.sent(add) == AddBackend(VIP, b(20), 2, State.UP, 2)
    assert s.admin(VIP, b(20)) is Admin.ENABLED and s.verdict(VIP, b(20)) is Verdict.UNKNOWN
    remove = send(s, s.operator(RemoveBackend(VIP, b(11)), cut=True))
    assert remove == RemoveBackend(VIP, b(11), graceful=True)  # as IPVS
    assert s.admin(VIP, b(11)) is Admin.REMOVING and s.entry(VIP, b(11)) is None
    assert s.health(down(b(11)), cut=True) is None  # leaving: nothing more to say
    # back again: the same index, enabled
    assert s.sent(s.operator(AddBackend(VIP, b(11)), cut=True)) == AddBackend(
        VIP, b(11), 1, State.UP, 0)
    assert s.admin(VIP, b(11)) is Admin.ENABLED
    assert s.indexes() == {(str(VIP), "198.19.0.11"): 0, (str(VIP), "198.19.0.12"): 1,
                           (str(VIP), "198.19.0.20"): 2}
    with pytest.raises(KeyError):
        s.operator(SetWeight(VIP, b(99), 3), cut=True)
    with pytest.raises(KeyError):
        s.operator(SetState(VIP, b(99), State.UP), cut=True)


def test_discovered_hosts_join_down_and_come_up_with_their_checks() -> None:
    s = states()
    add = send(s, s.health(HostAdded(VIP, b(30), 1.0), cut=True))
    assert add == AddBackend(VIP, b(30), 1, State.DOWN, 2)
    assert s.verdict(VIP, b(30)) is Verdict.DOWN
    assert send(s, s.health(up(b(30)), cut=True)) == SetState(VIP, b(30), State.UP)
    assert s.entry(VIP, b(30)) == PoolEntry(1, State.UP)
    assert send(s, s.health(HostRemoved(VIP, b(30), "silent", 3.0), cut=True)) == (
        RemoveBackend(VIP, b(30)))  # not graceful: it is gone
    assert s.entry(VIP, b(30)) is None
    assert s.health(HostIgnored(VIP, b(31), "hotplug off"), cut=True) is None


def test_the_view_follows_what_is_sent_as_the_engine_does() -> None:
    s = states()
    s.sent(SetState(VIP, b(11), State.DOWN, cut=False))
    assert s.entry(VIP, b(11)) == PoolEntry(1, State.DRAINING)  # keep = drain
    s.sent(SetWeight(VIP, b(11), 5))
    assert s.entry(VIP, b(11)) == PoolEntry(5, State.DRAINING)
    s.sent(SetWeight(VIP, b(77), 5))  # not in the pools: the workers refuse it too
    assert s.entry(VIP, b(77)) is None
    assert list(s.serving()) == [(VIP, b(11)), (VIP, b(12))]
    s.sent(SetState(VIP, b(12), State.DOWN))
    assert list(s.serving()) == [(VIP, b(11))]


# --- every worker alike ------------------------------------------------------------

IPS = [b(n) for n in range(11, 17)]
verdicts = st.sampled_from(["down", "up"])


@st.composite
def steps(draw: st.DrawFn) -> tuple[str, Any]:
    ip = draw(st.sampled_from(IPS))
    kind = draw(st.sampled_from(["operator", "reload", "health", "host"]))
    if kind == "operator":
        command: PoolCommand = draw(st.sampled_from([
            AddBackend(VIP, ip, draw(st.integers(0, 3))), RemoveBackend(VIP, ip),
            SetWeight(VIP, ip, draw(st.integers(0, 3))), SetState(VIP, ip, State.UP),
            SetState(VIP, ip, State.DRAINING), SetState(VIP, ip, State.DOWN)]))
        return kind, command
    if kind == "reload":
        return kind, SetState(VIP, ip, draw(st.sampled_from(list(State))))
    if kind == "health":
        return kind, down(ip) if draw(verdicts) == "down" else up(ip)
    return kind, draw(st.sampled_from([HostAdded(VIP, ip, 1.0),
                                       HostRemoved(VIP, ip, "gone", 1.0)]))


def _pools(engine: Engine) -> dict[str, tuple[int, str, int]]:
    return {str(x.ip): (x.weight, x.state.value, x.index) for x in engine.services[0].pool}


@settings(max_examples=300, deadline=None)
@given(st.lists(steps(), max_size=30), st.booleans())
def test_view_and_replay_keep_every_worker_alike(script: list[tuple[str, Any]],
                                                 cut: bool) -> None:
    """A worker that ran from the start and one started at the end (built from the
    config, then the replay) hold the same pools, and the view says what they hold;
    the operator's drain and disable hold whatever health says."""
    conf = config("server4=198.19.0.11\nserver4=198.19.0.12 weight=2\n"
                  "server4=198.19.0.13 state=drain\n")
    s = BackendStates(conf, (4,))
    first = build_engine(conf, 0.0, (4,), indexes=s.indexes())
    for kind, what in script:
        try:
            if kind == "operator":
                if (s.entry(VIP, what.backend) is None) != isinstance(what, AddBackend):
                    continue  # refused by the operator's checks
                command = s.operator(what, cut=cut)
            elif kind == "reload":
                if s.entry(VIP, what.backend) is None:
                    continue  # a reload only changes what runs
                command = s.reloaded(what, cut=cut)
            else:
                if isinstance(what, HostAdded) and s.entry(VIP, what.ip) is not None:
                    continue  # discovery adds only hosts not in the pools
                if isinstance(what, HostRemoved) and s.entry(VIP, what.ip) is None:
                    continue
                if isinstance(what, StateChanged) and s.entry(VIP, what.ip) is None:
                    continue  # not watched
                command = s.health(what, cut=cut)
        except KeyError:
            continue
        if command is None:
            continue
        sent = s.sent(command)
        first.apply(sent, 1.0)
    later = build_engine(conf, 0.0, (4,), indexes=s.indexes())
    for command in s.replay():
        try:
            later.apply(command, 2.0)
        except KeyError:
            pass  # the remove of a backend this worker never had
    view = {str(ip): (e.weight, e.state.value, s.index_of(v, ip)) for (v, ip), e in s.pooled()}
    assert _pools(first) == _pools(later) == view
    for (v, ip), e in s.pooled():
        if s.admin(v, ip) is Admin.DRAIN:
            assert e.state is State.DRAINING
        elif s.admin(v, ip) is Admin.DISABLED:
            assert e.state is State.DOWN
