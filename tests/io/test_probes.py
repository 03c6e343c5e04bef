"""Tests of the probes and the health runner (loaded.io.probes) on real sockets.

Loopback (127.0.0.1, ::1) for the checks; a namespace lab for what loopback
cannot show (broadcast and all-nodes discovery, timeouts, unreachable hosts).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Address, ip_address
from pathlib import Path
from typing import Any, ClassVar

import pytest

from loaded.core.checksum import checksum
from loaded.core.config import parse_config
from loaded.core.health import (
    CheckResult,
    CheckSpec,
    Discover,
    DiscoveryFailed,
    DiscoverySpec,
    Event,
    HealthMonitor,
    HostAdded,
    HostIgnored,
    Probe,
    ServiceSpec,
    Settings,
    StateChanged,
    Watch,
)
from loaded.core.pool import IPAddress
from loaded.io import probes
from loaded.io.probes import (
    HealthRunner,
    describe,
    discover,
    http_get,
    icmp_echo,
    run_probe,
    tcp_connect,
    udp_probe,
)

LO4 = IPv4Address("127.0.0.1")
LO6 = IPv6Address("::1")
LOOPBACKS = [pytest.param(LO4, id="v4"), pytest.param(LO6, id="v6")]
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (raw sockets, namespaces)")
T = 0.3  # probe timeout in these tests
SLACK = 0.3  # scheduling slack on a busy machine


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def fam(addr: IPAddress) -> int:
    return socket.AF_INET if addr.version == 4 else socket.AF_INET6


# --------------------------------------------------------------------------
# Servers


@pytest.fixture(scope="module")
def listeners() -> Iterator[dict[IPAddress, int]]:
    """A TCP listener per loopback address that never accepts: the kernel
    completes handshakes from its backlog, and a request gets no answer."""
    socks = {}
    for addr in (LO4, LO6):
        s = socket.socket(fam(addr), socket.SOCK_STREAM)
        s.bind((str(addr), 0))
        s.listen(64)
        socks[addr] = s
    yield {a: s.getsockname()[1] for a, s in socks.items()}
    for s in socks.values():
        s.close()


def free_port(addr: IPAddress, kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(fam(addr), kind) as s:
        s.bind((str(addr), 0))
        port: int = s.getsockname()[1]
    return port


class _Handler(http.server.BaseHTTPRequestHandler):
    seen: ClassVar[list[tuple[str, str | None, str | None]]] = []

    def do_GET(self) -> None:
        _Handler.seen.append((self.path, self.headers.get("Host"),
                              self.headers.get("Connection")))
        code = {"/ok": 200, "/bad": 503, "/": 200, "/nocontent": 204}.get(self.path, 404)
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # probes reset the connection after the status line


class _Server6(_Server):
    address_family = socket.AF_INET6


@contextlib.contextmanager
def http_server(addr: IPAddress, wrap: Callable[[socket.socket], socket.socket] | None = None
                ) -> Iterator[int]:
    cls = _Server if addr.version == 4 else _Server6
    srv = cls((str(addr), 0), _Handler)
    if wrap is not None:
        srv.socket = wrap(srv.socket)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(2)


@pytest.fixture(scope="module")
def http_ports() -> Iterator[dict[IPAddress, int]]:
    with http_server(LO4) as p4, http_server(LO6) as p6:
        yield {LO4: p4, LO6: p6}


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl to make a certificate")
    d = tmp_path_factory.mktemp("tls")
    key, crt = d / "key.pem", d / "cert.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(crt), "-days", "1", "-subj", "/CN=backend"],
                   check=True, capture_output=True, timeout=30)
    return key, crt


@pytest.fixture(scope="module")
def https_ports(cert: tuple[Path, Path]) -> Iterator[dict[IPAddress, int]]:
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert[1]), str(cert[0]))

    def wrap(s: socket.socket) -> socket.socket:
        return ctx.wrap_socket(s, server_side=True)

    with http_server(LO4, wrap) as p4, http_server(LO6, wrap) as p6:
        yield {LO4: p4, LO6: p6}


@contextlib.contextmanager
def raw_tcp_server(addr: IPAddress, answer: Callable[[socket.socket], None]) -> Iterator[int]:
    """Accepts connections and lets ``answer`` do what it likes with each."""
    srv = socket.socket(fam(addr), socket.SOCK_STREAM)
    srv.bind((str(addr), 0))
    srv.listen(8)
    srv.settimeout(0.05)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                answer(conn)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        t.join(2)
        srv.close()


@contextlib.contextmanager
def udp_server(addr: IPAddress, echo: bool = True) -> Iterator[int]:
    s = socket.socket(fam(addr), socket.SOCK_DGRAM)
    s.bind((str(addr), 0))
    s.settimeout(0.05)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                data, peer = s.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            if echo:
                s.sendto(data or b"empty", peer)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield s.getsockname()[1]
    finally:
        stop.set()
        t.join(2)
        s.close()


def bounded(result: CheckResult, timeout: float = T) -> CheckResult:
    assert 0 <= result.latency <= timeout + SLACK, result
    return result


# --------------------------------------------------------------------------
# TCP


@pytest.mark.parametrize("addr", LOOPBACKS)
def test_tcp_connect_ok(addr: IPAddress, listeners: dict[IPAddress, int]) -> None:
    r = bounded(run(tcp_connect(addr, listeners[addr], T)))
    assert (r.ok, r.reason) == (True, "ok")
    assert r.latency < T


@pytest.mark.parametrize("addr", LOOPBACKS)
def test_tcp_connect_refused(addr: IPAddress) -> None:
    r = bounded(run(tcp_connect(addr, free_port(addr), T)))
    assert (r.ok, r.reason) == (False, "refused")


def test_tcp_connect_socket_error_is_a_result() -> None:
    def factory(f: int, t: int, p: int) -> socket.socket:
        raise PermissionError(13, "Permission denied")
    r = run(tcp_connect(LO4, 80, T, socket_factory=factory))
    assert (r.ok, r.reason) == (False, "error: EACCES")


# --------------------------------------------------------------------------
# HTTP(S)


@pytest.mark.parametrize("addr", LOOPBACKS)
def test_http_status(addr: IPAddress, http_ports: dict[IPAddress, int]) -> None:
    port = http_ports[addr]
    r = bounded(run(http_get(addr, port, "/ok", 200, T)))
    assert (r.ok, r.reason) == (True, "ok")
    r = bounded(run(http_get(addr, port, "/bad", 200, T)))
    assert (r.ok, r.reason) == (False, "status 503")
    r = bounded(run(http_get(addr, port, "/bad", 503, T)))
    assert (r.ok, r.reason) == (True, "ok")
    r = bounded(run(http_get(addr, port, "/nocontent", 200, T)))
    assert (r.ok, r.reason) == (False, "status 204")


def test_http_request_has_host_and_connection_close(http_ports: dict[IPAddress, int]) -> None:
    _Handler.seen.clear()
    run(http_get(LO6, http_ports[LO6], "/ok?x=1", 200, T))
    run(http_get(LO4, http_ports[LO4], "/ok", 200, T))
    deadline = time.monotonic() + 2
    while len(_Handler.seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(_Handler.seen) == sorted([
        ("/ok?x=1", f"[::1]:{http_ports[LO6]}", "close"),
        ("/ok", f"127.0.0.1:{http_ports[LO4]}", "close")])


def test_host_header_omits_default_ports() -> None:
    assert probes._host_header(LO4, 80, False) == "127.0.0.1"
    assert probes._host_header(LO6, 443, True) == "[::1]"
    assert probes._host_header(LO6, 80, True) == "[::1]:80"


@pytest.mark.parametrize("addr", LOOPBACKS)
def test_http_refused_and_timeout(addr: IPAddress, listeners: dict[IPAddress, int]) -> None:
    r = bounded(run(http_get(addr, free_port(addr), "/", 200, T)))
    assert (r.ok, r.reason) == (False, "refused")
    # Connects, sends, gets no answer.
    r = bounded(run(http_get(addr, listeners[addr], "/", 200, T)))
    assert (r.ok, r.reason) == (False, "timeout")
    assert r.latency >= T - 0.05


@pytest.mark.parametrize(("answer", "reason"), [
    (b"garbage\r\n", "error: bad response"),
    (b"HTTP/1.1 20 OK\r\n", "error: bad response"),
    (b"HTTP/1.0 200\r\n", "ok"),
    (b"HTTP/1.1 200 OK", "error: bad response"),  # no end of line, then closed
    (b"", "reset"),
    (b"x" * 10000, "error: bad response"),
])
def test_http_odd_responses(answer: bytes, reason: str) -> None:
    def reply(conn: socket.socket) -> None:
        conn.recv(4096)
        conn.sendall(answer)

    with raw_tcp_server(LO4, reply) as port:
        r = bounded(run(http_get(LO4, port, "/", 200, T)))
    assert r.reason == reason and r.ok is (reason == "ok")


def test_http_reset_by_server() -> None:
    def rst(conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    with raw_tcp_server(LO4, rst) as port:
        r = bounded(run(http_get(LO4, port, "/", 200, T)))
    assert (r.ok, r.reason) == (False, "reset")


def test_http_bad_path_is_refused_before_sending() -> None:
    r = run(http_get(LO4, 80, "/a b\r\nX: y", 200, T))
    assert (r.ok, r.reason) == (False, "error: bad path")


@pytest.mark.parametrize("addr", LOOPBACKS)
def test_https(addr: IPAddress, https_ports: dict[IPAddress, int],
               http_ports: dict[IPAddress, int]) -> None:
    # Self-signed and for another name: not verified, on purpose.
    r = bounded(run(http_get(addr, https_ports[addr], "/ok", 200, T, tls=True)))
    assert (r.ok, r.reason) == (True, "ok")
    r = bounded(run(http_get(addr, https_ports[addr], "/bad", 200, T, tls=True)))
    assert r.reason == "status 503"
    # TLS to a plain HTTP server fails as a TLS error.
    r = bounded(run(http_get(addr, http_ports[addr], "/ok", 200, T, tls=True)))
    assert not r.ok and r.reason.startswith("error: tls"), r


# --------------------------------------------------------------------------
# UDP


@pytest.mark.parametrize("addr", LOOPBACKS)
def test_udp_reply(addr: IPAddress) -> None:
    with udp_server(addr) as port:
        for payload in (b"ping", b""):
            r = bounded(run(udp_probe(addr, port, payload, T)))
            assert (r.ok, r.reason) == (True, "ok")
            assert r.latency < T / 2  # the reply, not the timeout


@pytest.mark.parametrize("addr", LOOPBACKS)
@pytest.mark.parametrize("payload", [b"ping", b""])
def test_udp_port_unreachable_is_refused(addr: IPAddress, payload: bytes) -> None:
    r = bounded(run(udp_probe(addr, free_port(addr, socket.SOCK_DGRAM), payload, T)))
    assert (r.ok, r.reason) == (False, "refused")


@pytest.mark.parametrize("addr", LOOPBACKS)
def test_udp_silence(addr: IPAddress) -> None:
    t = 0.15
    with udp_server(addr, echo=False) as port:
        # Without a payload, silence is all a UDP service owes.
        r = bounded(run(udp_probe(addr, port, b"", t)), t)
        assert (r.ok, r.reason) == (True, "ok") and r.latency >= t - 0.02
        # With one, a reply is expected.
        r = bounded(run(udp_probe(addr, port, b"ping", t)), t)
        assert (r.ok, r.reason) == (False, "timeout")


# --------------------------------------------------------------------------
# ICMP


def test_echo_request_format() -> None:
    req = probes._echo_request(socket.AF_INET, 0x1234, 7, b"abc")
    assert req[:1] == b"\x08" and struct.unpack("!HH", req[4:8]) == (0x1234, 7)
    assert checksum(req) == 0
    req6 = probes._echo_request(socket.AF_INET6, 0x1234, 7, b"abc")
    assert req6[:1] == bytes([128]) and req6[2:4] == b"\0\0"  # the kernel sums it


def test_echo_reply_parsing() -> None:
    ip_header = bytes([0x45]) + bytes(19)
    reply = struct.pack("!BBHHH", 0, 0, 0, 5, 6) + b"x"
    assert probes._echo_reply(socket.AF_INET, ip_header + reply) == (5, 6)
    assert probes._echo_reply(socket.AF_INET, ip_header + b"\x08" + reply[1:]) is None
    assert probes._echo_reply(socket.AF_INET, b"\x45") is None
    assert probes._echo_reply(socket.AF_INET6, bytes([129, 0, 0, 0, 0, 5, 0, 6])) == (5, 6)
    assert probes._echo_reply(socket.AF_INET6, bytes([129, 1, 0, 0, 0, 5, 0, 6])) is None
    assert probes._echo_reply(socket.AF_INET6, bytes([129, 0])) is None


@needs_root
@pytest.mark.parametrize("addr", LOOPBACKS)
def test_icmp_echo_loopback(addr: IPAddress) -> None:
    r = bounded(run(icmp_echo(addr, T)))
    assert (r.ok, r.reason) == (True, "ok")
    assert r.latency < T / 2


@needs_root
def test_many_echoes_at_once_each_get_their_own_reply() -> None:
    async def many() -> list[CheckResult]:
        return list(await asyncio.gather(*(icmp_echo(a, T) for a in [LO4, LO6] * 50)))
    assert all(r.ok for r in run(many()))


# --------------------------------------------------------------------------
# Dispatch


def test_run_probe_dispatches(listeners: dict[IPAddress, int],
                              http_ports: dict[IPAddress, int]) -> None:
    vip = IPv4Address("198.18.1.100")

    def probe(check: CheckSpec) -> CheckResult:
        result: CheckResult = run(run_probe(Probe(vip, LO4, check)))
        return result

    assert probe(CheckSpec("tcp", listeners[LO4], T)).ok
    assert probe(CheckSpec("http", http_ports[LO4], T, "/bad", 200)).reason == "status 503"
    assert probe(CheckSpec("http", http_ports[LO4], T, "/bad", 503)).ok
    assert probe(CheckSpec("udp", free_port(LO4, socket.SOCK_DGRAM), T)).reason == "refused"
    assert probe(CheckSpec("none")) == CheckResult(True, "ok", 0.0)
    if ROOT:
        assert probe(CheckSpec("icmp", 0, T)).ok


def test_describe_is_reexported() -> None:
    e = StateChanged(IPv4Address("198.18.1.100"), IPv4Address("198.19.0.11"), False,
                     "refused", 1.0, "tcp:80", 3)
    assert describe(e).startswith("event=backend-down vip=198.18.1.100 backend=198.19.0.11")


# --------------------------------------------------------------------------
# The runner


VIP = IPv4Address("198.18.1.100")


class Collector:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.lock = threading.Lock()

    def __call__(self, e: Event) -> None:
        with self.lock:
            self.events.append(e)

    def wait(self, pred: Callable[[Event], bool], timeout: float) -> Event:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for e in self.events:
                    if pred(e):
                        return e
            time.sleep(0.01)
        raise AssertionError(f"no such event within {timeout}s: {self.events}")


def changed(ip: IPAddress, up: bool) -> Callable[[Event], bool]:
    return lambda e: isinstance(e, StateChanged) and e.ip == ip and e.up is up


def test_runner_with_real_probes_on_loopback() -> None:
    a, b = IPv4Address("127.0.0.1"), IPv4Address("127.0.0.2")
    with socket.socket() as live:
        live.bind((str(a), 0))
        live.listen(16)
        port = live.getsockname()[1]
        spec = ServiceSpec(VIP, (Watch(a), Watch(b)))
        settings = Settings(check=CheckSpec("tcp", port, 0.1), interval=0.1, rise=2, fall=2)
        got = Collector()
        start = time.monotonic()
        with HealthRunner(HealthMonitor([spec], settings, time.monotonic()), got) as runner:
            down = got.wait(changed(b, False), 2.0)
            assert isinstance(down, StateChanged) and down.reason == "refused"
            # fall x interval, plus the spread of the first probes.
            assert time.monotonic() - start < 2 * 0.1 + 0.1 + SLACK
            with socket.socket() as late:
                late.bind((str(b), port))
                late.listen(16)
                t0 = time.monotonic()
                up = got.wait(changed(b, True), 2.0)
                assert isinstance(up, StateChanged) and up.reason == "ok"
                assert time.monotonic() - t0 < 2 * 0.1 + SLACK
            status = {s.ip: s for s in runner.status()}
            assert status[a].up and status[a].checks >= 3
            assert not any(changed(a, False)(e) for e in got.events)
        assert not runner.running


def test_runner_probes_all_targets_concurrently() -> None:
    n = 300
    ips = [IPv4Address(int(IPv4Address("198.19.0.0")) + i) for i in range(1, n + 1)]
    spec = ServiceSpec(VIP, tuple(Watch(i) for i in ips))
    settings = Settings(check=CheckSpec("tcp", 80, 0.5), interval=0.5, rise=1, fall=1)
    probed: dict[IPAddress, int] = {}
    running = 0
    peak = 0

    async def slow_probe(p: Probe) -> CheckResult:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.4)  # every probe near its timeout
        running -= 1
        probed[p.ip] = probed.get(p.ip, 0) + 1
        return CheckResult(False, "timeout", 0.4)

    got = Collector()
    start = time.monotonic()
    with HealthRunner(HealthMonitor([spec], settings, time.monotonic()), got,
                      probe=slow_probe):
        for i in ips:
            got.wait(changed(i, False), 2.0)
        elapsed = time.monotonic() - start
    # One interval (spread) plus one probe: serially this would take 120 s.
    assert elapsed < 0.5 + 0.4 + SLACK * 2
    assert set(probed) == set(ips)
    assert peak > n / 2


def test_runner_discovery_and_hotplug() -> None:
    net = IPv4Network("198.19.0.0/24")
    b1, b2, out = (IPv4Address(x) for x in ("198.19.0.11", "198.19.0.12", "10.1.1.1"))
    spec = ServiceSpec(VIP, (Watch(b1),), real_net=net,
                       discovery=DiscoverySpec(IPv4Address("198.19.0.255"), "priv0"))
    settings = Settings(check=CheckSpec("tcp", 80, 0.05), interval=0.05, rise=2, fall=2,
                        hotplug=True, cycle=0.2, discovery_wait=0.05)
    calls: list[Discover] = []
    healthy = {b1, b2}

    async def fake_probe(p: Probe) -> CheckResult:
        return CheckResult(p.ip in healthy, "ok" if p.ip in healthy else "refused", 0.0)

    async def fake_discover(d: Discover) -> set[IPAddress]:
        calls.append(d)
        await asyncio.sleep(d.timeout)
        if len(calls) == 2:
            raise PermissionError(1, "Operation not permitted")
        return {b1, b2, out}

    got = Collector()
    with HealthRunner(HealthMonitor([spec], settings, time.monotonic()), got,
                      probe=fake_probe, discover_fn=fake_discover):
        added = got.wait(lambda e: isinstance(e, HostAdded), 1.0)
        assert isinstance(added, HostAdded) and (added.vip, added.ip) == (VIP, b2)
        got.wait(changed(b2, True), 1.0)
        got.wait(lambda e: isinstance(e, HostIgnored) and e.ip == out, 1.0)
        failed = got.wait(lambda e: isinstance(e, DiscoveryFailed), 1.0)
        assert failed == DiscoveryFailed(VIP, "error: EPERM")
        time.sleep(0.3)
    assert calls[0] == Discover(VIP, IPv4Address("198.19.0.255"), "priv0", None, 0.05)
    assert len(calls) >= 3
    # Each host is reported once.
    assert sum(isinstance(e, HostAdded) for e in got.events) == 1
    assert sum(isinstance(e, HostIgnored) for e in got.events) == 1


def test_runner_survives_a_failing_callback_and_a_failing_probe() -> None:
    spec = ServiceSpec(VIP, (Watch(IPv4Address("198.19.0.11")),))
    settings = Settings(check=CheckSpec("tcp", 80, 0.05), interval=0.05, rise=1, fall=1)
    calls = 0

    async def broken(p: Probe) -> CheckResult:
        nonlocal calls
        calls += 1
        raise RuntimeError("bug")

    def callback(e: Event) -> None:
        raise ValueError("callback bug")

    with HealthRunner(HealthMonitor([spec], settings, time.monotonic()), callback,
                      probe=broken) as runner:
        time.sleep(0.3)
        assert runner.running
        (s,) = runner.status()
        assert not s.up and s.reason == "error: RuntimeError"
    assert calls >= 3 and runner.error is None


def test_runner_stop_is_prompt_and_idempotent() -> None:
    spec = ServiceSpec(VIP, (Watch(IPv4Address("198.19.0.11")),))
    settings = Settings(check=CheckSpec("tcp", 80, 10.0), interval=60.0)
    started = threading.Event()

    async def hang(p: Probe) -> CheckResult:
        started.set()
        await asyncio.sleep(100)
        raise AssertionError("not cancelled")

    runner = HealthRunner(HealthMonitor([spec], settings, time.monotonic()), lambda e: None,
                          probe=hang).start()
    assert started.wait(2)
    t0 = time.monotonic()
    runner.stop()
    assert time.monotonic() - t0 < 1.0
    assert not runner.running
    runner.stop()
    with pytest.raises(RuntimeError):
        runner.start()


def test_runner_without_anything_to_do_sleeps_until_stopped() -> None:
    runner = HealthRunner(HealthMonitor([ServiceSpec(VIP)], Settings(), time.monotonic()),
                          lambda e: None).start()
    time.sleep(0.05)
    assert runner.running
    runner.stop()
    assert not runner.running


# --------------------------------------------------------------------------
# In a namespace lab: discovery, unreachable, timeouts


@pytest.fixture(scope="module")
def lab() -> Iterator[Any]:
    if not ROOT:
        pytest.skip("the lab needs root")
    from loaded.lab.topology import Lab
    with Lab(backends=2, clients=1) as lab:
        lab.setup_router_mode(vip=False)
        lab.start_servers(8080)
        yield lab


def lb_factory(lab: Any) -> probes.SocketFactory:
    def make(family: int, type: int, proto: int) -> socket.socket:
        s: socket.socket = lab.socket("lb", family, type, proto)
        return s
    return make


def test_discover_ipv4_broadcast(lab: Any) -> None:
    sock = lab.socket("lb", socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        t0 = time.monotonic()
        found = run(discover(4, IPv4Address(lab.broadcast4), lab.priv_nic, 0.3,
                             source=IPv4Address(lab.private_gw4), sock=sock))
        assert 0.3 <= time.monotonic() - t0 < 0.3 + SLACK
    finally:
        sock.close()
    assert found == {ip_address(b.addr4) for b in lab.backends}


def test_discover_ipv6_all_nodes(lab: Any) -> None:
    found = run(discover(6, IPv6Address("ff02::1"), lab.priv_nic, 0.3,
                         source=IPv6Address(lab.private_gw6),
                         socket_factory=lb_factory(lab)))
    # Global addresses (the source was global), and not the balancer itself.
    assert found == {ip_address(b.addr6) for b in lab.backends}


def test_discover_errors_raise(lab: Any) -> None:
    with pytest.raises(OSError):
        run(discover(4, IPv4Address(lab.broadcast4), "nosuchif0", 0.1,
                     socket_factory=lb_factory(lab)))
    with pytest.raises(ValueError):
        run(discover(4, IPv6Address("ff02::1"), None, 0.1))


@pytest.mark.parametrize("family", [4, 6])
def test_probes_from_the_balancer(lab: Any, family: int) -> None:
    make = lb_factory(lab)
    b = lab.backends[0]
    addr = ip_address(b.addr4 if family == 4 else b.addr6)
    assert run(tcp_connect(addr, 8080, T, socket_factory=make)).ok
    assert run(icmp_echo(addr, T, socket_factory=make)).ok
    assert run(udp_probe(addr, 8080, b"hello", T, socket_factory=make)).ok
    assert run(tcp_connect(addr, 8081, T, socket_factory=make)).reason == "refused"
    assert run(udp_probe(addr, 8081, b"", T, socket_factory=make)).reason == "refused"


@pytest.mark.parametrize("family", [4, 6])
def test_unreachable(lab: Any, family: int) -> None:
    dst = "198.18.99.1" if family == 4 else "2001:db8:99::1"
    net = "198.18.99.0/24" if family == 4 else "2001:db8:99::/64"
    lab.run("lb", ["ip", f"-{family}", "route", "add", "unreachable", net], check=True)
    try:
        make = lb_factory(lab)
        addr = ip_address(dst)
        for r in (run(tcp_connect(addr, 80, T, socket_factory=make)),
                  run(icmp_echo(addr, T, socket_factory=make)),
                  run(udp_probe(addr, 80, b"", T, socket_factory=make))):
            assert (r.ok, r.reason) == (False, "unreachable"), r
            assert r.latency < T / 2
    finally:
        lab.run("lb", ["ip", f"-{family}", "route", "del", "unreachable", net], check=True)


def test_dead_host_times_out(lab: Any) -> None:
    make = lb_factory(lab)
    b = lab.backends[1]
    lab.set_backend_link(b.name, False)
    try:
        async def all_of_them() -> list[CheckResult]:
            checks = []
            for a in (b.addr4, b.addr6):
                addr = ip_address(a)
                checks += [tcp_connect(addr, 8080, T, socket_factory=make),
                           icmp_echo(addr, T, socket_factory=make),
                           udp_probe(addr, 8080, b"hello", T, socket_factory=make)]
            return list(await asyncio.gather(*checks))

        for r in run(all_of_them()):
            assert (r.ok, r.reason) == (False, "timeout"), r
            assert T - 0.05 <= r.latency <= T + SLACK
    finally:
        lab.set_backend_link(b.name, True)


def test_runner_in_the_lab_from_config(lab: Any) -> None:
    """The whole chain on the wire: a config, discovery, hot-plug, a death."""
    text = lab.config_text(failover=True, hotplug="yes", check_interval="0.2",
                           check_timeout="0.2", rise=2, fall=2, check_cycle="0.5",
                           server4=[lab.backends[0].addr4], server6=[lab.backends[0].addr6])
    config = parse_config(text, "lab.conf")
    got = Collector()
    monitor = HealthMonitor.from_config(config, time.monotonic())
    b2 = lab.backends[1]
    with HealthRunner(monitor, got, socket_factory=lb_factory(lab)) as runner:
        # b2 runs the service but is not configured: discovered, then up.
        for addr in (b2.addr4, b2.addr6):
            got.wait(lambda e, a=addr: isinstance(e, HostAdded) and str(e.ip) == a, 3.0)
            got.wait(changed(ip_address(addr), True), 3.0)
        # The configured backend stays up throughout.
        assert not any(isinstance(e, StateChanged) and not e.up for e in got.events)
        assert {str(s.ip) for s in runner.status() if s.up} == {
            lab.backends[0].addr4, lab.backends[0].addr6, b2.addr4, b2.addr6}
    # Neither the VIPs, the gateway nor anything outside RIP was ever taken.
    added = {str(e.ip) for e in got.events if isinstance(e, HostAdded)}
    assert added == {b2.addr4, b2.addr6}


@pytest.mark.parametrize(("error", "reason"), [
    (TimeoutError(), "timeout"),
    (ConnectionResetError("Connection lost"), "reset"),  # asyncio's, without errno
    (BrokenPipeError(32, "Broken pipe"), "reset"),
    (ConnectionRefusedError(111, "refused"), "refused"),
    (OSError(113, "No route to host"), "unreachable"),
    (OSError(101, "Network is unreachable"), "unreachable"),
    (OSError(110, "Connection timed out"), "timeout"),
    (OSError(99, "Cannot assign requested address"), "error: EADDRNOTAVAIL"),
    (asyncio.IncompleteReadError(b"", 10), "reset"),
    (ValueError("x"), "error: ValueError"),
])
def test_reasons(error: BaseException, reason: str) -> None:
    assert probes._reason(error) == reason


def test_runner_in_the_lab_hotplug_off_only_reports(lab: Any) -> None:
    text = lab.config_text(failover=True, check_interval="0.2", check_timeout="0.2",
                           check_cycle="0.3", server4=[lab.backends[0].addr4],
                           server6=[lab.backends[0].addr6])
    got = Collector()
    monitor = HealthMonitor.from_config(parse_config(text, "lab.conf"), time.monotonic())
    b2 = lab.backends[1]
    with HealthRunner(monitor, got, socket_factory=lb_factory(lab)) as runner:
        for addr in (b2.addr4, b2.addr6):
            got.wait(lambda e, a=addr: isinstance(e, HostIgnored) and str(e.ip) == a
                     and e.reason == "hotplug off", 3.0)
        time.sleep(0.4)  # another discovery: no second report
        assert len(runner.status()) == 2
    assert sum(isinstance(e, HostIgnored) for e in got.events) == 2
    assert not any(isinstance(e, HostAdded) for e in got.events)
