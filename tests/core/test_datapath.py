"""The data path objects: what each one makes the kernel forget after a pool
command, and what its status shows (the supervisor carries both out)."""

from __future__ import annotations

import ipaddress

import pytest

from loaded.core.commands import AddBackend, PoolCommand, RemoveBackend, SetState, SetWeight
from loaded.core.config import DATAPATHS as CONFIG_DATAPATHS
from loaded.core.config import Config
from loaded.core.datapath import DATAPATHS, NOTHING, Conntrack, Forget, PerPacket, datapath
from loaded.core.pool import State

V = ipaddress.IPv4Address("198.18.1.100")
B = ipaddress.IPv4Address("198.19.0.11")

COMMANDS: list[tuple[PoolCommand, bool, Forget]] = [
    # command, was_empty, what the conntrack path forgets
    (SetState(V, B, State.DOWN, cut=True), False,
     Forget(clients=True, connections=True, again=True)),
    (RemoveBackend(V, B, graceful=False), False,
     Forget(clients=True, connections=True, again=True)),
    (RemoveBackend(V, B, graceful=True), False, Forget(clients=True)),
    (SetState(V, B, State.DOWN, cut=False), False, NOTHING),
    (SetState(V, B, State.DRAINING), False, NOTHING),
    (SetWeight(V, B, 3), False, NOTHING),
    (AddBackend(V, B, 1, State.UP, 0), False, NOTHING),
    (AddBackend(V, B, 1, State.UP, 0), True, Forget(unbalanced=True)),
    (SetState(V, B, State.UP), True, Forget(unbalanced=True)),
]


@pytest.mark.parametrize(("command", "was_empty", "forget"), COMMANDS)
def test_what_each_command_makes_the_kernel_forget(command: PoolCommand, was_empty: bool,
                                                    forget: Forget) -> None:
    assert Conntrack().forgets(command, was_empty) == forget
    assert PerPacket().forgets(command, was_empty) == NOTHING  # the kernel keeps no state


def test_the_config_knows_every_data_path_and_both_default_alike() -> None:
    assert set(DATAPATHS) == CONFIG_DATAPATHS
    assert datapath(Config.datapath) is DATAPATHS["conntrack"]
    with pytest.raises(ValueError, match="no data path 'xdp'"):
        datapath("xdp")


def test_what_the_status_shows() -> None:
    counters = {0x4C420000: (3, 300)}
    ct = Conntrack().kernel_view(counters, 7)
    assert (ct.counters, ct.reply_counters, ct.kernel_drops) == (
        counters, None, {"conntrack-invalid": 7})
    assert ct.stats == {"conntrack": {"invalid": 7, "backends": {"0x4c420000": [3, 300]}}}
    pp = PerPacket().kernel_view(counters, 7)
    assert (pp.counters, pp.reply_counters, pp.kernel_drops, dict(pp.stats)) == (
        None, counters, None, {})
    assert Conntrack().at_start() == Forget(unbalanced=True)
    assert PerPacket().at_start() == NOTHING
    assert Conntrack.remembers_clients and not PerPacket.remembers_clients


class Handlers:
    def on_packet(self, payload: memoryview, partial: bool) -> int:
        return 1

    def on_first_packet(self, payload: memoryview, partial: bool) -> int:
        return 2


def test_the_worker_handler_is_the_data_paths() -> None:
    w = Handlers()
    assert PerPacket().packet_handler(w)(memoryview(b""), False) == 1
    assert Conntrack().packet_handler(w)(memoryview(b""), False) == 2
