"""Failover and health checks on the wire (issue: failover operators can trust).

Interval 1 s, rise 2, fall 3 (HAProxy's counts, a shorter interval to keep the
suite quick): a dead backend must be out of service within fall x interval + 1 s
and a revived one back within rise x interval + 1 s.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from loaded.lab import traffic
from loaded.lab.topology import Lab
from tests.e2e.conftest import PORT, Daemon
from tests.e2e.load import Load

INTERVAL, RISE, FALL = 1.0, 2, 3
HEALTH = {"failover": True, "check_interval": INTERVAL, "rise": RISE, "fall": FALL,
          "check_timeout": 0.5, "check_cycle": 1}


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """This module's own lab (it overrides conftest's), with more client addresses."""
    with Lab(backends=3, clients=12) as lab:
        yield lab


@pytest.fixture
def servers(lab: Lab) -> Iterator[dict[str, Any]]:
    procs = {b.name: lab.start_server(b, PORT) for b in lab.backends}
    yield procs
    for p in procs.values():
        _kill(p)


def _kill(proc: Any) -> float:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:  # e.g. blocked writing to a vanished client
            proc.kill()
            proc.wait(3)
    return time.monotonic()


@pytest.mark.parametrize("family", [4, 6])
def test_dead_backend_leaves_and_returns_under_load(lab: Lab, servers: dict[str, Any],
                                                    daemon_factory: Any, family: int) -> None:
    vip = lab.vip4 if family == 4 else lab.vip6
    clients = lab.clients4 if family == 4 else lab.clients6
    old, new = clients[:6], clients[6:]
    d: Daemon = daemon_factory(f"failover{family}.conf", **HEALTH).start()
    with Load(lab, vip, old, PORT) as load:
        time.sleep(1.5)
        assert {a.backend for a in load.attempts} == {"b1", "b2", "b3"}
        t_dead = _kill(servers["b1"])
        time.sleep(FALL * INTERVAL + 1 + 2)
    failed = [a for a in load.since(t_dead) if a.backend is None]
    settled = t_dead + FALL * INTERVAL + 1
    assert not [a for a in load.since(settled) if a.backend is None]
    assert not [a for a in load.since(settled) if a.backend == "b1"]
    assert len(load.since(settled)) > 20  # the load went on
    failover_time = max((a.t for a in failed), default=t_dead) - t_dead
    print(f"\nIPv{family}: failover {failover_time:.2f} s, {len(failed)} failed connections "
          f"of {len(load.since(t_dead))} after the backend died")
    assert "event=backend-down" in d.log and "reason=refused" in d.log

    servers["b1"] = lab.start_server(lab.backends[0], PORT)
    t_up = time.monotonic()
    # Clients stick to their backends: the ones that prove b1 is back are new ones,
    # arriving once it must be up again.
    time.sleep(max(0.0, t_up + RISE * INTERVAL + 1 - time.monotonic()))
    with Load(lab, vip, new, PORT) as load2:
        time.sleep(2)
    assert any(a.backend == "b1" for a in load2.attempts)
    assert not [a for a in load2.attempts if a.backend is None]
    assert "event=backend-up" in d.log
    assert d.stop() == 0
    assert d.problems() == []


@pytest.mark.parametrize("hotplug", [True, False])
def test_hotplugged_host_joins_only_when_allowed(lab: Lab, servers: dict[str, Any],
                                                 daemon_factory: Any, hotplug: bool) -> None:
    # weighted: a new client goes to the backend with the fewest clients (ties in
    # pool order), so a joined host gets one of the first new clients of a worker.
    d: Daemon = daemon_factory(f"hotplug-{hotplug}.conf", hotplug="yes" if hotplug else "no",
                               strategy="weighted", **HEALTH).start()
    for c in lab.clients4[:3]:
        traffic.tcp_request(c, lab.vip4, PORT, timeout=2, ns=lab.ns("cl"))
    host = lab.add_backend()
    try:
        lab.start_server(host, PORT)
        up = f"event=backend-up vip={lab.vip4} backend={host.addr4}"
        deadline = time.monotonic() + 1 + RISE * INTERVAL + 3  # a discovery cycle, rise
        while time.monotonic() < deadline and up not in d.log:
            time.sleep(0.1)
        # 9 new clients: at least 5 land in one worker; by its 4th new client
        # every other backend there has more clients than b4, so b4 is chosen.
        seen = {traffic.tcp_request(c, lab.vip4, PORT, timeout=2, ns=lab.ns("cl")).split()[0]
                for c in lab.clients4[3:12]}
        if hotplug:
            assert f"event=host-added vip={lab.vip4} backend={host.addr4}" in d.log
            assert up in d.log
            assert host.name in seen
        else:
            assert f"event=host-ignored vip={lab.vip4} host={host.addr4}" in d.log
            assert up not in d.log
            assert host.name not in seen
    finally:
        d.stop()
        lab.remove_backend(host.name)


@pytest.mark.parametrize("mode", ["refuse", "drop"])
def test_no_healthy_backend(lab: Lab, servers: dict[str, Any], daemon_factory: Any,
                            mode: str) -> None:
    d: Daemon = daemon_factory(f"empty-{mode}.conf", no_backend=mode, **HEALTH).start()
    for p in servers.values():
        _kill(p)
    time.sleep(FALL * INTERVAL + 1)
    t0 = time.monotonic()
    with pytest.raises(OSError) as err:
        traffic.tcp_request(lab.clients4[0], lab.vip4, PORT, timeout=2, ns=lab.ns("cl"))
    if mode == "refuse":
        assert isinstance(err.value, ConnectionRefusedError)
        assert time.monotonic() - t0 < 1
        assert sum(w.get("refused", 0) for w in d.wait_stats(
            lambda s: any(w.get("refused") for w in s["workers"]))["workers"]) > 0
    else:
        assert isinstance(err.value, TimeoutError)
    assert d.stop() == 0


@pytest.mark.parametrize("policy", ["cut", "keep"])
def test_connections_of_a_dead_backend_cut_or_kept(lab: Lab, servers: dict[str, Any],
                                                   daemon_factory: Any, policy: str) -> None:
    d: Daemon = daemon_factory(f"down-{policy}.conf", on_backend_down=policy, **HEALTH).start()
    sock = lab.socket("cl", socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((lab.clients4[3], 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect((lab.vip4, PORT))
    sock.sendall(b"BULK 500000000\n")
    name = sock.recv(64).split()[0].decode()
    lab.set_backend_link(name, up=False)  # the host vanishes, its connection with it
    try:
        time.sleep(FALL * INTERVAL + 1.5)  # the balancer has noticed
        # The client speaks again (a request on a keep-alive connection, an ACK):
        # cut, its packet goes to a live backend, which knows no such connection.
        sock.send(b"more\n")
        sock.settimeout(3)
        outcome = "open"
        try:
            while sock.recv(65536):
                pass
            outcome = "closed"
        except ConnectionResetError:
            outcome = "reset"
        except TimeoutError:
            outcome = "hanging"
        assert outcome == ("reset" if policy == "cut" else "hanging")
    finally:
        sock.close()
        lab.set_backend_link(name, up=True)
        d.stop()
