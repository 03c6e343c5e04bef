"""The supervisor's bookkeeping, without workers or a kernel: indexes and marks,
the operator's word against health, reloads, and what the conntrack path asks
the kernel to forget. Workers are absent (pid 0), so commands go nowhere but
into the backends' owner (its pool view and replay) and the fake kernel."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from loaded.core.backends import Admin
from loaded.core.commands import AddBackend, RemoveBackend
from loaded.core.config import load_config
from loaded.core.engine import build_engine
from loaded.core.health import StateChanged
from loaded.core.plan import make_plan
from loaded.core.pool import State, ct_mark
from loaded.daemon.supervisor import Supervisor

VIP = "198.18.1.100"
BASE = f"""VIP4={VIP}
RIP4=198.19.0.0/24
public_NIC=pub0
private_NIC=priv0
private_GW=198.19.0.1
"""


class FakeKernel:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.unresolved: list[Any] = []
        self.hash_updates: list[list[str]] = []

    def map_backend(self, version: int, index: int, ip: Any) -> None:
        self.calls.append(("map", index, str(ip)))

    def forget_connections(self, mark: int) -> int:
        self.calls.append(("connections", mark))
        return 0

    def forget_clients(self, mark: int) -> int:
        self.calls.append(("clients", mark))
        return 0

    def forget_unbalanced(self, vips: list[str]) -> int:
        self.calls.append(("unbalanced",))
        return 0

    def update_hash(self, commands: list[str]) -> None:
        self.hash_updates.append(commands)

    def own_addresses(self) -> list[Any]:
        return [ipaddress.ip_address("198.19.0.1")]


def supervisor(tmp_path: Path, servers: str, datapath: str = "conntrack",
               extra: str = "") -> Supervisor:
    conf = tmp_path / "s.conf"
    conf.write_text(BASE + servers + f"datapath={datapath}\n" + extra)
    config = load_config(conf)
    plan = make_plan(config, (4,), "7e57ab", 2)
    sup = Supervisor(config, (4,), plan, maxlen=16, user=None, journal_dir=tmp_path,
                     config_path=str(conf))
    sup.kernel.close()
    sup.kernel = sup.sync.kernel = FakeKernel()  # type: ignore[assignment]
    return sup


def servers(*last: int) -> str:
    return "".join(f"server4=198.19.0.{n}\n" for n in last)


def packed(ip: str) -> bytes:
    """A client address as the workers report it."""
    return ipaddress.ip_address(ip).packed


def mark(index: int) -> int:
    return ct_mark(4, index)


V = ipaddress.IPv4Address(VIP)


def ip(text: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(text)


def pool_state(sup: Supervisor, backend: str) -> str:
    """The state the workers' pools hold for ``backend``."""
    entry = sup.backends.entry(V, ip(backend))
    assert entry is not None
    return entry.state.value


def test_indexes_survive_a_reload_that_reorders_the_file(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, servers(11, 12, 13))
    Path(sup.config_path).write_text(BASE + servers(11, 13, 14) + "datapath=conntrack\n")
    result = sup.operator.reload(dry_run=False)
    assert result["applied"] and sorted(c["op"] for c in result["changes"]) == ["add", "remove"]
    indexes = sup.backends.indexes()
    assert indexes[(VIP, "198.19.0.13")] == 2 and indexes[(VIP, "198.19.0.14")] == 3
    assert ("map", 3, "198.19.0.14") in sup.kernel.calls  # type: ignore[attr-defined]
    # a worker (re)started now numbers its pool as the kernel's map does
    engine = build_engine(sup.config, 0.0, (4,), indexes=indexes)
    pool = engine.services[0].pool
    assert {str(b.ip): b.index for b in pool} == {
        "198.19.0.11": 0, "198.19.0.13": 2, "198.19.0.14": 3}
    # ... and replaying what was sent gives every worker the same pools
    replay = sup.backends.replay()
    assert RemoveBackend(V, ip("198.19.0.12"), graceful=True) in replay
    assert AddBackend(V, ip("198.19.0.14"), 1, State.UP, 3) in replay
    for command in replay:
        try:
            engine.apply(command, 0.0)
        except KeyError:
            pass  # the remove of a backend the new file no longer names
    assert {str(b.ip): b.index for b in pool} == {
        "198.19.0.11": 0, "198.19.0.13": 2, "198.19.0.14": 3}


def test_operator_outranks_health_and_enable_follows_it(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, servers(11, 12), datapath="perpacket")
    sup.operator.backend({"action": "drain", "address": "198.19.0.11"})
    assert pool_state(sup, "198.19.0.11") == "draining"
    ip = ipaddress.ip_address("198.19.0.11")
    vip = ipaddress.ip_address(VIP)
    sup._events.put(StateChanged(vip, ip, False, "refused", 1.0))
    sup._apply_health_events()
    assert pool_state(sup, "198.19.0.11") == "draining"  # not applied
    assert sup.backends.transitions(vip, ip) == 1
    assert sup.backends.admin(vip, ip) is Admin.DRAIN
    assert sup.status().services[0].backends[0].admin == "drain"
    result = sup.operator.backend({"action": "enable", "address": "198.19.0.11"})
    assert result["command"]["state"] == "down"  # health says so
    sup._events.put(StateChanged(vip, ip, True, "ok", 2.0))
    sup._apply_health_events()
    assert pool_state(sup, "198.19.0.11") == "up"


def test_health_rise_brings_the_reloaded_state_not_the_first_one(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, servers(11, 12), datapath="perpacket")
    Path(sup.config_path).write_text(BASE + "server4=198.19.0.11 state=drain\n"
                                     + servers(12) + "datapath=perpacket\n")
    sup.operator.reload(dry_run=False)
    assert pool_state(sup, "198.19.0.11") == "draining"
    vip, ip = ipaddress.ip_address(VIP), ipaddress.ip_address("198.19.0.11")
    sup._events.put(StateChanged(vip, ip, False, "refused", 1.0))
    sup._events.put(StateChanged(vip, ip, True, "ok", 2.0, pool_state=State.UP))
    sup._apply_health_events()
    assert pool_state(sup, "198.19.0.11") == "draining"


def test_conntrack_path_forgets_what_each_change_calls_for(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, servers(11, 12, 13))
    calls: list[tuple[Any, ...]] = sup.kernel.calls  # type: ignore[attr-defined]
    sup.operator.backend({"action": "disable", "address": "198.19.0.11"})
    assert calls[-2:] == [("connections", mark(0)), ("clients", mark(0))]
    calls.clear()
    sup.operator.backend({"action": "drain", "address": "198.19.0.12"})
    assert calls == []  # existing clients stay, in the kernel as in the workers
    sup.operator.backend({"action": "remove", "address": "198.19.0.13"})
    assert calls == [("clients", mark(2))]  # graceful: its connections stay


def _kernel_table(updates: list[list[str]], size: int) -> list[int]:
    """The kernel's ``@hash4`` after the update transactions, bucket -> mark (0: none)."""
    table = [0] * size
    for commands in updates:
        for c in commands:
            body = c[c.index("{") + 1:c.rindex("}")]
            for item in body.split(","):
                if c.startswith("delete"):
                    assert table[int(item)], "deleted a bucket that was empty"
                    table[int(item)] = 0
                else:
                    bucket, m = item.split(":")
                    assert not table[int(bucket)], "added over a bucket's element"
                    table[int(bucket)] = int(m, 16)
    return table


def test_the_kernels_hash_table_follows_the_workers_pools(tmp_path: Path) -> None:
    from loaded.core.strategies import hash_table
    sup = supervisor(tmp_path, servers(11, 12, 13), extra="strategy=maglev table_size=251\n")
    kernel: FakeKernel = sup.kernel  # type: ignore[assignment]
    assert sup.plan.hashing is not None and sup.plan.hashing.decides
    sup.sync.start()

    def expected() -> list[int]:
        pool = sup.sync.mirror.services[0].pool  # type: ignore[union-attr]
        return [b.mark if b else 0 for b in hash_table("maglev", pool.eligible(), 251)]

    assert _kernel_table(kernel.hash_updates, 251) == expected()
    assert set(expected()) == {mark(0), mark(1), mark(2)}
    before = list(expected())
    n = len(kernel.hash_updates)
    sup.operator.backend({"action": "disable", "address": "198.19.0.12"})
    after = _kernel_table(kernel.hash_updates, 251)
    assert mark(1) not in after and after == expected()
    # consistent: the others' buckets nearly all stay theirs (Maglev moves a few)
    kept = [a == b for a, b in zip(before, after, strict=True) if a != mark(1)]
    assert sum(kept) > 0.9 * len(kept)
    # one transaction, touching only the buckets that changed
    assert len(kernel.hash_updates) == n + 1
    changed = sum(1 for a, b in zip(before, after, strict=True) if a != b)
    deleted = sum(len(c.split(",")) for c in kernel.hash_updates[-1] if c.startswith("delete"))
    assert deleted == changed
    # the hash table is loaded before the kernel forgets the backend's clients
    assert kernel.calls[-2:] == [("connections", mark(1)), ("clients", mark(1))]
    sup.operator.backend({"action": "add", "address": "198.19.0.14"})
    assert _kernel_table(kernel.hash_updates, 251) == expected()
    assert mark(3) in expected()
    # every backend down: every bucket empty
    for a in ("198.19.0.11", "198.19.0.13", "198.19.0.14"):
        sup.operator.backend({"action": "disable", "address": a})
    assert _kernel_table(kernel.hash_updates, 251) == [0] * 251


def test_rr_gets_no_hash_table_without_fail_open_hash(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, servers(11, 12), extra="fail_open=no\n")
    sup.sync.start()
    sup.operator.backend({"action": "disable", "address": "198.19.0.12"})
    assert sup.sync.mirror is None
    assert sup.kernel.hash_updates == []  # type: ignore[attr-defined]


def test_delayed_flush_skips_a_backend_enabled_again(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, servers(11, 12))
    calls: list[tuple[Any, ...]] = sup.kernel.calls  # type: ignore[attr-defined]
    sup.operator.backend({"action": "disable", "address": "198.19.0.11"})
    assert len(sup.sync.forget_again) == 1
    sup.operator.backend({"action": "enable", "address": "198.19.0.11"})
    assert mark(0) in sup.sync.serving_marks()
    calls.clear()
    sup.sync.forget_due(sup.sync.forget_again[0][0])
    assert calls == [] and sup.sync.forget_again == []
    # without the enable, the second forgetting happens
    sup.operator.backend({"action": "disable", "address": "198.19.0.11"})
    calls.clear()
    sup.sync.forget_due(sup.sync.forget_again[0][0])
    assert calls == [("connections", mark(0)), ("clients", mark(0))]


def test_backend_add_refuses_the_balancers_own_addresses(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, servers(11))
    with pytest.raises(ValueError, match="balancer itself"):
        sup.operator.backend({"action": "add", "address": "198.19.0.1"})
    with pytest.raises(LookupError, match="already"):
        sup.operator.backend({"action": "add", "address": "198.19.0.11"})
    with pytest.raises(LookupError, match="not a backend"):
        sup.operator.backend({"action": "weight", "address": "198.19.0.99", "weight": 2})


def test_counters_of_a_dead_worker_are_kept(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, servers(11), datapath="perpacket")
    last = {"services": {VIP: {"clients": 1, "backends": {"198.19.0.11": {
        "packets": 10, "bytes": 1000, "new_clients": 2, "clients": 1, "state": "up"}}}}}
    sup._retire(last)
    sup.children[0].last = {"services": {VIP: {"clients": 0, "backends": {"198.19.0.11": {
        "packets": 3, "bytes": 300, "new_clients": 1, "clients": 0, "state": "up"}}}}}
    b = sup.status().services[0].backends[0]
    assert (b.packets, b.bytes, b.new_clients, b.clients) == (13, 1300, 3, 0)


def test_a_configured_drain_still_goes_down_with_its_health(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, "server4=198.19.0.11 state=drain\n" + servers(12),
                     datapath="perpacket")
    vip, ip = ipaddress.ip_address(VIP), ipaddress.ip_address("198.19.0.11")
    sup._events.put(StateChanged(vip, ip, False, "refused", 1.0))
    sup._apply_health_events()
    assert pool_state(sup, "198.19.0.11") == "down"
    sup._events.put(StateChanged(vip, ip, True, "ok", 2.0))
    sup._apply_health_events()
    assert pool_state(sup, "198.19.0.11") == "draining"
