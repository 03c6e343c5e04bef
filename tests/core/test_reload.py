"""Reload plans: the three-way merge of old file, new file and running pools."""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loaded.core.clients import ClientTable
from loaded.core.commands import (
    AddBackend,
    PoolCommand,
    RemoveBackend,
    SetState,
    SetWeight,
)
from loaded.core.config import KEY_TABLE, KEYS, BackendSpec, Config, parse_config
from loaded.core.engine import Engine, Service
from loaded.core.pool import Pool, State
from loaded.core.reload import (
    BACKEND_FIELDS,
    IGNORED_FIELDS,
    SETTINGS,
    diff_configs,
    running_from_config,
)
from loaded.core.strategies import make_strategy

VIP4 = "198.18.1.100"
VIP6 = "2001:db8:1::100"

BASE = f"""
VIP4={VIP4}
VIP6={VIP6}
RIP4=198.19.0.0/24
server6=2001:db8:2::11
"""


def conf(servers: str, extra: str = "") -> Config:
    return parse_config(BASE + servers + extra, "test.conf")


OLD = conf("server4=198.19.0.11\nserver4=198.19.0.12 weight=2\nserver4=198.19.0.13\n")


def cmds(old: Config, new: Config, families: tuple[int, ...] = (4, 6),
         running: Any = None) -> list[PoolCommand]:
    return diff_configs(old, new, families, running).commands


V4 = ipaddress.IPv4Address(VIP4)


def b4(last: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(f"198.19.0.{last}")


def test_same_file_no_command_no_setting() -> None:
    plan = diff_configs(OLD, OLD, (4, 6))
    assert plan.commands == [] and plan.settings == () and plan.notes == ()
    assert not plan.restart_needed
    assert plan.to_json()["commands"] == []


def test_add_remove_weight_state_in_order() -> None:
    new = conf("server4=198.19.0.11 state=down\nserver4=198.19.0.12 weight=5\n"
               "server4=198.19.0.14 weight=3 state=drain\nserver4=198.19.0.15\n")
    assert cmds(OLD, new) == [
        AddBackend(V4, b4(14), 3, State.DRAINING),
        AddBackend(V4, b4(15), 1, State.UP),
        SetWeight(V4, b4(12), 5),
        SetState(V4, b4(11), State.DOWN, cut=True),
        RemoveBackend(V4, b4(13)),
    ]
    # ... and as the control socket shows them
    assert diff_configs(OLD, new, (4, 6)).to_json()["commands"] == [
        {"op": "add", "vip": VIP4, "backend": "198.19.0.14", "weight": 3, "state": "draining"},
        {"op": "add", "vip": VIP4, "backend": "198.19.0.15", "weight": 1, "state": "up"},
        {"op": "weight", "vip": VIP4, "backend": "198.19.0.12", "weight": 5},
        {"op": "state", "vip": VIP4, "backend": "198.19.0.11", "state": "down", "cut": True},
        {"op": "remove", "vip": VIP4, "backend": "198.19.0.13"},
    ]
    changes = diff_configs(OLD, new, (4,)).changes
    assert [(c.before, c.after) for c in changes if c.op == "weight"] == [
        ((2, State.UP), (5, State.UP))]
    assert not any(c.overrides_runtime for c in changes)


def test_states_to_up_come_before_drains_and_downs() -> None:
    old = conf("server4=198.19.0.11 state=down\nserver4=198.19.0.12\nserver4=198.19.0.13\n")
    new = conf("server4=198.19.0.11\nserver4=198.19.0.12 state=down\n"
               "server4=198.19.0.13 state=drain\n")
    assert cmds(old, new) == [SetState(V4, b4(11), State.UP),
                              SetState(V4, b4(13), State.DRAINING),
                              SetState(V4, b4(12), State.DOWN)]


def test_runtime_changes_survive_where_the_file_did_not_change() -> None:
    running = {VIP4: {"198.19.0.11": (1, "draining"),  # drained by the operator
                      "198.19.0.12": (7, State.UP),  # reweighted by the operator
                      "198.19.0.20": (1, "up")},  # added by the operator
               VIP6: {"2001:db8:2::11": (1, "up")}}
    # 198.19.0.13 was removed by the operator.
    new = conf("server4=198.19.0.11 weight=4\nserver4=198.19.0.12 weight=2\n"
               "server4=198.19.0.13 weight=9\n")
    plan = diff_configs(OLD, new, (4, 6), running)
    assert plan.commands == [SetWeight(V4, b4(11), 4)]
    assert plan.changes[0].after == (4, State.DRAINING)  # the drain stands
    assert any("198.19.0.20" in n and "added at run time" in n for n in plan.notes)
    assert any("198.19.0.13" in n and "removed at run time" in n for n in plan.notes)


def test_the_file_overrides_a_runtime_change_of_what_it_changes() -> None:
    running = {VIP4: {"198.19.0.11": (1, "draining"), "198.19.0.12": (7, "up"),
                      "198.19.0.13": (1, "up")}}
    new = conf("server4=198.19.0.11 state=down\nserver4=198.19.0.12 weight=3\n"
               "server4=198.19.0.13\n")
    plan = diff_configs(OLD, new, (4,), running)
    assert [(c.op, c.before, c.after, c.overrides_runtime) for c in plan.changes] == [
        ("weight", (7, State.UP), (3, State.UP), True),
        ("state", (1, State.DRAINING), (1, State.DOWN), True)]
    # A backend the operator added first and the file adds now: the file's values.
    running[VIP4]["198.19.0.14"] = (5, "draining")
    newer = conf("server4=198.19.0.11\nserver4=198.19.0.12 weight=2\nserver4=198.19.0.13\n"
                 "server4=198.19.0.14 weight=2\n")
    assert cmds(OLD, newer, (4,), running) == [
        SetWeight(V4, b4(14), 2), SetState(V4, b4(14), State.UP)]


def test_addresses_are_compared_canonically() -> None:
    running = {VIP6.upper(): {"2001:DB8:2:0::11": (1, "up")},
               VIP4: running_from_config(OLD, (4,))[VIP4]}
    assert cmds(OLD, OLD, (4, 6), running) == []


def test_settings_that_need_a_restart() -> None:
    new = conf("server4=198.19.0.11\nserver4=198.19.0.12 weight=2\nserver4=198.19.0.13\n",
               "strategy=maglev table_size=251\nclient_timeout=60\non_backend_down=keep\n"
               "FIRST_CORE=0\nLAST_CORE=1\npublic_NIC=eth9\n")
    plan = diff_configs(OLD, new, (4, 6))
    got = {s.key: (s.old, s.new, s.live) for s in plan.settings}
    assert got == {"strategy": ("rr", "maglev", False), "table_size": ("65537", "251", False),
                   "client_timeout": ("300", "60", False),
                   "on_backend_down": ("cut", "keep", True),
                   "LAST_CORE": ("0", "1", False), "public_NIC": ("none", "eth9", False)}
    assert plan.restart_needed and len(plan.unapplied) == 5
    assert all("restart the daemon" in s.reason for s in plan.unapplied)
    live = [s for s in plan.settings if s.live]
    assert live[0].reason == "applies to backends that go down from now on"
    assert plan.commands == []
    j = plan.to_json()
    assert j["restart_needed"] is True and len(j["unapplied"]) == 5  # type: ignore[arg-type]


@pytest.mark.skipif("status_listen" not in KEYS, reason="no status_listen key")
def test_control_status_and_persist_settings() -> None:
    servers = "server4=198.19.0.11\nserver4=198.19.0.12 weight=2\nserver4=198.19.0.13\n"
    new = conf(servers, "status_listen=[::1]:9200\npersist_file=/var/tmp/c.json\n"
                        "control_group=adm\n")
    got = {s.key: (s.old, s.new, s.live) for s in diff_configs(OLD, new, (4,)).settings}
    assert got == {"status_listen": ("127.0.0.1:9180", "[::1]:9200", False),
                   "persist_file": ("none", "/var/tmp/c.json", True),
                   "control_group": ("none", "adm", False)}
    off = conf(servers, "status_listen=off\n")
    assert [(s.old, s.new) for s in diff_configs(OLD, off, (4,)).settings] == [
        ("127.0.0.1:9180", "off")]


def test_changed_vip_gets_no_backend_commands() -> None:
    new = parse_config(BASE.replace(VIP4, "198.18.1.101") + "server4=198.19.0.99\n", "t")
    plan = diff_configs(OLD, new, (4, 6))
    assert plan.commands == []
    assert [s.key for s in plan.settings] == ["VIP4"]
    assert any("VIP4 changed" in n for n in plan.notes)


def test_other_families_are_ignored() -> None:
    new = parse_config(BASE.replace(VIP6, "2001:db8:1::101").replace("::11", "::12")
                       + "server4=198.19.0.11\nserver4=198.19.0.12 weight=2\n"
                         "server4=198.19.0.13\nNS=2001:db8::53\n", "t")
    only4 = diff_configs(OLD, new, (4,))
    assert only4.commands == [] and only4.settings == () and only4.notes == ()
    both = diff_configs(OLD, new, (4, 6))
    assert {s.key for s in both.settings} == {"VIP6", "NS"}
    with pytest.raises(ValueError):
        diff_configs(OLD, new, (5,))


def test_check_and_order_notes() -> None:
    old = parse_config(BASE + "failover\nserver4=198.19.0.11\nserver4=198.19.0.12\n", "t")
    new = parse_config(BASE + "failover\nserver4=198.19.0.12 check=icmp\n"
                       "server4=198.19.0.11\n", "t")
    plan = diff_configs(old, new, (4,))
    assert plan.commands == []
    assert any("check of 198.19.0.12" in n for n in plan.notes)
    assert any("order of the backends" in n for n in plan.notes)


def test_missing_running_pool_is_a_note() -> None:
    plan = diff_configs(OLD, OLD, (4,), {})
    assert plan.commands == [] and "no running pool" in plan.notes[0]


def test_every_config_field_is_classified() -> None:
    fields = {f.name for f in dataclasses.fields(Config)}
    assert fields == set(SETTINGS) | set(BACKEND_FIELDS) | set(IGNORED_FIELDS)


# --- properties --------------------------------------------------------------------

IPS = [f"198.19.0.{i}" for i in range(10, 16)]
attrs = st.tuples(st.integers(0, 3), st.sampled_from(list(State)))
pools = st.dictionaries(st.sampled_from(IPS), attrs, max_size=6)


def config_of(pool: dict[str, tuple[int, State]], order: list[str]) -> Config:
    specs = tuple(BackendSpec(ipaddress.IPv4Address(ip), w, s)
                  for ip in order if ip in pool for w, s in (pool[ip],))
    return Config(path="t", vip4=ipaddress.IPv4Address(VIP4), servers4=specs)


def apply_to(running: dict[str, tuple[int, State]], commands: list[PoolCommand]
             ) -> dict[str, tuple[int, State]]:
    vip = ipaddress.IPv4Address(VIP4)
    pool = Pool(vip)
    for ip, (w, s) in running.items():
        pool.add(ipaddress.IPv4Address(ip), w, s)
    strategy = make_strategy("rr", pool)
    engine = Engine([Service(vip, pool, strategy, ClientTable(pool, strategy))])
    for c in commands:
        engine.apply(c, 0.0)
    return {str(b.ip): (b.weight, b.state) for b in pool}


def expected(old: dict[str, tuple[int, State]], new: dict[str, tuple[int, State]],
             running: dict[str, tuple[int, State]]) -> dict[str, tuple[int, State]]:
    """The module's rules, written out independently."""
    out: dict[str, tuple[int, State]] = {}
    for ip in set(old) | set(new) | set(running):
        if ip in new and ip not in old:
            out[ip] = new[ip]
        elif ip in new and ip in running:
            w = new[ip][0] if new[ip][0] != old[ip][0] else running[ip][0]
            s = new[ip][1] if new[ip][1] != old[ip][1] else running[ip][1]
            out[ip] = (w, s)
        elif ip not in old and ip not in new:
            out[ip] = running[ip]
    return out


@settings(max_examples=400, deadline=None)
@given(old=pools, new=pools, running=pools, order=st.permutations(IPS))
def test_applying_the_plan_gives_the_merge_and_then_nothing_to_do(
        old: dict[str, tuple[int, State]], new: dict[str, tuple[int, State]],
        running: dict[str, tuple[int, State]], order: list[str]) -> None:
    a, b = config_of(old, IPS), config_of(new, order)
    plan = diff_configs(a, b, (4,), {VIP4: running})
    after = apply_to(running, plan.commands)
    assert after == expected(old, new, running)
    # Idempotent: nothing left to do against the result.
    assert diff_configs(a, b, (4,), {VIP4: after}).commands == []
    # One command per (backend, op); ops in the documented order.
    ops = [(c.backend, c.op) for c in plan.commands]
    assert len(ops) == len(set(ops))
    rank = {"add": 0, "weight": 1, "state": 2, "remove": 3}
    assert [rank[c.op] for c in plan.commands] == sorted(rank[c.op] for c in plan.commands)
    # Without runtime changes, running = old: a plain two-way diff.
    assert apply_to(old, diff_configs(a, b, (4,)).commands) == new
    assert not any(c.overrides_runtime for c in diff_configs(a, b, (4,)).changes)


def test_settings_are_the_table_of_keys() -> None:
    # Every field a key sets, in the table's order, with its row's reload rule.
    rows = [(f, k) for k in KEY_TABLE for f in k.fields if f.name not in BACKEND_FIELDS]
    assert list(SETTINGS) == [f.name for f, _ in rows]
    for f, k in rows:
        assert SETTINGS[f.name] == (f.spelled or k.name, f.family, k.reload.live,
                                    k.reload.reason)
        assert not k.reload.backends
    assert BACKEND_FIELDS == ("servers4", "servers6")
    # The rows a row-per-key table needs most care for.
    assert SETTINGS["hash_table_size"][:2] == ("table_size", 0)
    assert SETTINGS["private_gw4"][:2] == ("private_GW", 4)
    assert SETTINGS["private_gw6"][:2] == ("private_GW", 6)
    assert SETTINGS["vip6_prefix"][:2] == ("VIP6net", 6)
    # As the module docstring says: live are only on_backend_down and persist_*.
    assert {k for k, (_, _, live, _) in SETTINGS.items() if live} == {
        "on_backend_down", "persist_clients", "persist_max_age", "persist_file"}
    assert all(reason for *_, reason in SETTINGS.values())
