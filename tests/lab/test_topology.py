"""The namespace lab itself, on the real kernel: connectivity without the
balancer (lb as a plain router), path-MTU discovery, and that every run
cleans up after itself, also after failures and dead runs."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loaded.lab import Lab, LabError, cleanup_stale, list_netns
from loaded.lab import traffic as tr
from loaded.lab.netns import pid_alive, pids_in_netns
from loaded.lab.topology import RUN_DIR

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the lab builds network namespaces"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2 (`ip netns exec`)"),
    pytest.mark.timeout(120),
]

needs_ping = pytest.mark.skipif(
    shutil.which("ping") is None, reason="needs iputils-ping (installed by ./run setup)"
)

PORT = 8080
FAMILIES = ["v4", "v6"]


def _ip_netns_list() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def _assert_gone(names: list[str]) -> None:
    assert names, "the lab recorded no namespaces"
    assert not set(names) & set(list_netns())
    assert not set(names) & _ip_netns_list()


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """Two backends behind lb in router mode, client link with MTU 1280."""
    with Lab(backends=2, clients=2, client_mtu=1280) as lab:
        lab.setup_router_mode()
        lab.start_servers(PORT)
        names = lab.namespaces
        yield lab
    _assert_gone(names)


def _pairs(lab: Lab, family: str) -> list[tuple[str, str, str]]:
    """(client source, backend name, backend address) for every combination."""
    clients = lab.clients4 if family == "v4" else lab.clients6
    return [
        (src, b.name, b.addr4 if family == "v4" else b.addr6)
        for src in clients
        for b in lab.backends
    ]


def test_layout(lab: Lab) -> None:
    assert {"cl", "rt", "lb", "sw", "b1", "b2"} <= {n.split("-", 1)[1] for n in lab.namespaces}
    assert all(n.startswith(lab.prefix + "-") for n in lab.namespaces)
    assert set(lab.namespaces) <= set(list_netns())
    assert lab.clients4 == ["198.18.0.11", "198.18.0.12"]
    assert lab.clients6 == ["2001:db8:c::11", "2001:db8:c::12"]
    assert [(b.addr4, b.addr6) for b in lab.backends] == [
        ("198.19.0.11", "2001:db8:2::11"),
        ("198.19.0.12", "2001:db8:2::12"),
    ]
    assert lab.sysctl("b1", "net.ipv4.icmp_echo_ignore_broadcasts") == "0"
    assert lab.sysctl("rt", "net.ipv4.ip_forward") == "1"
    links = lab.run("lb", ["ip", "-br", "link"], check=True).stdout
    assert "pub0" in links and "priv0" in links
    mtu = lab.run("cl", ["ip", "link", "show", "eth0"], check=True).stdout
    assert "mtu 1280" in mtu
    # No address may be tentative: IPv6 must work at once.
    for ns in lab.namespaces:
        assert "tentative" not in lab.run(ns, ["ip", "-6", "addr"], check=True).stdout


@pytest.mark.parametrize("family", FAMILIES)
def test_tcp_sees_client_address(lab: Lab, family: str) -> None:
    for src, name, dst in _pairs(lab, family):
        assert tr.tcp_request(src, dst, PORT, ns=lab.ns_cl, timeout=3) == f"{name} {src}"


@pytest.mark.parametrize("family", FAMILIES)
def test_udp_sees_client_address(lab: Lab, family: str) -> None:
    for src, name, dst in _pairs(lab, family):
        assert tr.udp_request(src, dst, PORT, ns=lab.ns_cl, timeout=3) == f"{name} {src}"


@needs_ping
@pytest.mark.parametrize("family", FAMILIES)
def test_ping(lab: Lab, family: str) -> None:
    for src, _, dst in _pairs(lab, family):
        res = tr.ping(lab.ns_cl, src, dst, count=2, interval=0.1)
        assert res.ok, res.output


@pytest.mark.parametrize("family", FAMILIES)
def test_bulk_through_small_mtu_uses_pmtu_discovery(lab: Lab, family: str) -> None:
    src = lab.clients4[0] if family == "v4" else lab.clients6[0]
    b = lab.backends[0]
    dst = b.addr4 if family == "v4" else b.addr6
    n = 2_000_000
    assert tr.tcp_bulk(src, dst, PORT, n, ns=lab.ns_cl, timeout=15) == (f"b1 {src}", n)
    # The backend learnt the smaller path MTU from rt's ICMP error: proof
    # that the transfer did not just fit from the start.
    route = lab.run("b1", ["ip", "route", "get", src], check=True).stdout
    assert "mtu 1280" in route, route


def test_socket_lives_in_namespace(lab: Lab) -> None:
    # 198.18.1.1 exists only inside lb; binding it proves where the socket is.
    with lab.socket("lb", socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((lab.lb_pub4, 0))
    with pytest.raises(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((lab.lb_pub4, 0))


def test_hot_plug_and_link_cut(lab: Lab) -> None:
    b = lab.add_backend()
    try:
        assert b.name == "b3" and b.addr4 == "198.19.0.13"
        lab.start_server(b, PORT)
        src = lab.clients4[0]
        assert tr.tcp_request(src, b.addr4, PORT, ns=lab.ns_cl, timeout=3) == f"b3 {src}"
        lab.set_backend_link("b3", up=False)
        with pytest.raises(OSError):
            tr.tcp_request(src, b.addr4, PORT, ns=lab.ns_cl, timeout=0.5)
        lab.set_backend_link("b3", up=True)
        src6 = lab.clients6[0]
        assert tr.udp_request(src6, b.addr6, PORT, ns=lab.ns_cl, timeout=3) == f"b3 {src6}"
    finally:
        lab.remove_backend("b3")
    assert b.ns not in list_netns()
    assert [x.name for x in lab.backends] == ["b1", "b2"]


def test_config_file(lab: Lab, tmp_path: Path) -> None:
    path = lab.write_config(tmp_path / "loaded.conf", strategy="weighted", failover=True)
    lines = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]
    pairs = [ln.split("=", 1) for ln in lines if "=" in ln]
    assert all(" " not in ln for ln in lines)
    get = {k: v for k, v in pairs}
    assert get["VIP4"] == "198.18.1.100" and get["VIP6"] == "2001:db8:1::100"
    assert get["public_NIC"] == "pub0" and get["private_NIC"] == "priv0"
    assert get["strategy"] == "weighted"
    assert [v for k, v in pairs if k == "server4"] == ["198.19.0.11", "198.19.0.12"]
    assert [v for k, v in pairs if k == "server6"] == ["2001:db8:2::11", "2001:db8:2::12"]
    assert [v for k, v in pairs if k == "private_GW"] == ["198.19.0.1/24", "2001:db8:2::1/64"]
    assert "failover" in lines
    for key in ("VIP4net", "VIP6net", "RIP4", "RIP6", "FIRST_CORE", "LAST_CORE"):
        assert key in get
    assert "nfq_len" not in get  # the data path's default queue length
    # It is a shell script too: sourcing it must work and set the variables.
    # (`failover` is a bare word: drop it for the shell, as the original
    # keeps it commented out in its script part.)
    shell = lab.write_config(tmp_path / "sh.conf")
    out = subprocess.run(
        ["sh", "-c", f'. "{shell}" && echo "$VIP4 $RIP6 $public_NIC"'],
        capture_output=True,
        text=True,
        timeout=5,
        check=True,
    ).stdout
    assert out.split() == ["198.18.1.100", "2001:db8:2::/64", "pub0"]
    assert "server4" not in lab.config_text(server4=None)
    with_options = lab.config_text(server4=["198.19.0.11 weight=3 state=drain"])
    assert "\nserver4=198.19.0.11 weight=3 state=drain\n" in with_options
    for bad in ("rr; rm -rf /", "rr rm", " rr", "rr  weight=1", "$(id)", "a\nb"):
        with pytest.raises(ValueError):
            lab.config_text(strategy=bad)


def test_balancer_host_is_left_unconfigured() -> None:
    """Without router mode, lb has no VIP, private gateway, route to the
    real servers or forwarding: that is the balancer daemon's job."""
    with Lab(backends=1, clients=1) as lab:
        addrs = lab.run("lb", ["ip", "addr"], check=True).stdout
        assert lab.vip4 not in addrs and lab.vip6 not in addrs
        assert lab.private_gw4 not in addrs and lab.private_gw6 not in addrs
        assert "198.19." not in lab.run("lb", ["ip", "route"], check=True).stdout
        assert "2001:db8:2:" not in lab.run("lb", ["ip", "-6", "route"], check=True).stdout
        assert lab.sysctl("lb", "net.ipv4.ip_forward") == "0"
        assert lab.sysctl("lb", "net.ipv6.conf.all.forwarding") == "0"
        routes = lab.run("b1", ["ip", "route"], check=True).stdout
        assert "default via 198.19.0.1" in routes


def test_teardown_on_exception_kills_and_removes_everything() -> None:
    names: list[str] = []
    procs: list[subprocess.Popen[bytes]] = []
    pids: list[int] = []
    with pytest.raises(ZeroDivisionError), Lab(backends=1, clients=1) as lab:
        names = lab.namespaces
        procs.append(lab.exec("b1", ["sleep", "60"]))
        procs.append(lab.start_server("b1"))
        # A grandchild the lab never saw: found by its namespace.
        procs.append(lab.exec("cl", ["sh", "-c", "setsid sleep 60 & wait"]))
        time.sleep(0.2)
        pids = [pid for ns in names for pid in pids_in_netns(ns)]
        assert len(pids) >= 4
        1 / 0  # noqa: B018 - the failure under test
    _assert_gone(names)
    assert all(p.poll() is not None for p in procs)
    assert not [pid for pid in pids if pid_alive(pid)]  # zombies of init count as dead
    assert not (RUN_DIR / f"{lab.prefix}.lock").exists()
    lab.teardown()  # idempotent


def test_start_failure_tears_down(monkeypatch: pytest.MonkeyPatch) -> None:
    lab = Lab(backends=1, clients=1)

    def boom(*args: object) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(Lab, "_backend_routes", boom)
    with pytest.raises(RuntimeError, match="injected"):
        lab.start()
    assert lab.prefix
    assert not [n for n in list_netns() if n.startswith(lab.prefix + "-")]
    with pytest.raises(LabError):
        lab.exec("cl", ["true"])


DEAD_RUN = textwrap.dedent(
    """
    import os, subprocess, sys
    from loaded.lab import Lab
    lab = Lab(backends=1, clients=1).start()
    p = lab.exec("b1", ["sleep", "60"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(lab.prefix, lab.workdir, p.pid, " ".join(lab.namespaces), flush=True)
    os.kill(os.getpid(), 9)  # die without any clean-up
    """
)


def test_cleanup_stale_removes_dead_runs() -> None:
    with Lab(backends=0, clients=1) as alive:  # a live run must survive
        out = subprocess.run(
            [sys.executable, "-c", DEAD_RUN], capture_output=True, text=True, timeout=30
        )
        assert out.returncode == -signal.SIGKILL, out.stderr
        prefix, workdir, pid, *names = out.stdout.split()
        assert Path(workdir).is_dir()
        assert set(names) <= set(list_netns())
        assert (RUN_DIR / f"{prefix}.lock").exists()

        removed = cleanup_stale()

        # A parallel run's own clean-up may have been first: then this call
        # finds nothing, but the leftovers must be gone either way.
        assert set(removed).isdisjoint(alive.namespaces)
        _assert_gone(names)
        assert not (RUN_DIR / f"{prefix}.lock").exists()
        assert not Path(workdir).exists()
        assert not pid_alive(int(pid)), "the dead run's process survived"
        assert set(alive.namespaces) <= set(list_netns())
        assert (RUN_DIR / f"{alive.prefix}.lock").exists()
