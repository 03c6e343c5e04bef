"""StatusServer over real HTTP on loopback (ephemeral ports), and History."""

from __future__ import annotations

import dataclasses
import http.client
import json
import re
import socket
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from loaded.control.web import History, StatusServer
from loaded.core.status import Status

from . import snapshots as snap


class FakeStatus:
    """A status source whose backend counters grow at a fixed rate with time."""

    def __init__(self, rates: dict[str, float] | None = None) -> None:
        self.rates = rates or {"198.19.0.11": 1000.0, "198.19.0.12": 250.0}
        self.t0 = time.monotonic()
        self.fail: BaseException | None = None
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self) -> Status:
        with self.lock:
            self.calls += 1
        if self.fail is not None:
            raise self.fail
        elapsed = time.monotonic() - self.t0
        return snap.status(
            daemon_info=snap.daemon(pid=1, tag="test", config="test.conf", uptime=elapsed,
                                    started_at=time.time() - elapsed),
            services=[snap.service("198.18.1.100", clients=2, backends=[
                snap.backend(addr, clients=1, new_clients=1, packets=int(rate * elapsed),
                             bytes=int(rate * elapsed) * 100)
                for addr, rate in self.rates.items()])])


@pytest.fixture
def fake() -> FakeStatus:
    return FakeStatus()


@pytest.fixture
def server(fake: FakeStatus) -> Iterator[StatusServer]:
    srv = StatusServer("127.0.0.1", 0, fake, sample_interval=0.05)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def request(srv: StatusServer, method: str, path: str,
            headers: dict[str, str] | None = None,
            body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    host, port = srv.address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_address_is_the_bound_ephemeral_port(server: StatusServer) -> None:
    host, port = server.address
    assert host == "127.0.0.1"
    assert 0 < port < 65536
    assert server.url == f"http://127.0.0.1:{port}"


def test_metrics_endpoint(server: StatusServer) -> None:
    status, headers, body = request(server, "GET", "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    packets = {s.labels["backend"]: s.value for s in families["loaded_backend_packets"].samples}
    assert set(packets) == {"198.19.0.11", "198.19.0.12"}
    assert packets["198.19.0.11"] > 0


def test_metrics_openmetrics_on_request(server: StatusServer) -> None:
    status, headers, body = request(
        server, "GET", "/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_api_status_is_the_snapshot(server: StatusServer, fake: FakeStatus) -> None:
    status, headers, body = request(server, "GET", "/api/status?x=1")
    assert status == 200
    assert headers["content-type"] == "application/json"
    data = json.loads(body)
    assert data["daemon"]["tag"] == "test"
    assert [b["address"] for b in data["services"][0]["backends"]] == list(fake.rates)


def test_status_page(server: StatusServer) -> None:
    status, headers, body = request(server, "GET", "/")
    assert status == 200
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in headers["content-security-policy"]
    page = body.decode()
    assert 'id="chart"' in page and "data-points" in page
    # self-contained: no external scripts, styles, fonts or images
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", page, re.I)
    assert not re.search(r"@import", page)
    assert request(server, "GET", "/index.html")[2] == body


def test_head_has_headers_but_no_body(server: StatusServer) -> None:
    for path in ("/", "/metrics", "/api/status", "/api/history"):
        status, headers, body = request(server, "HEAD", path)
        assert status == 200, path
        assert body == b""
        assert int(headers["content-length"]) > 0


def test_unknown_path_is_404(server: StatusServer) -> None:
    for path in ("/nope", "/api", "/api/status/x", "/metrics/"):
        assert request(server, "GET", path)[0] == 404, path
    assert request(server, "HEAD", "/nope")[0] == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE",
                                    "BREW"])
def test_other_methods_are_405(server: StatusServer, method: str) -> None:
    status, headers, _ = request(server, method, "/api/status", body=b'{"a": 1}')
    assert status == 405
    assert headers["allow"] == "GET, HEAD"


def test_status_errors_are_503_and_the_server_goes_on(server: StatusServer,
                                                     fake: FakeStatus) -> None:
    fake.fail = RuntimeError("supervisor not ready\nsecond line")
    for path in ("/metrics", "/api/status"):
        status, _, body = request(server, "GET", path)
        assert status == 503, path
        text = body.decode()
        assert "supervisor not ready" in text and text.count("\n") == 1
    # the page and the history do not need get_status
    assert request(server, "GET", "/")[0] == 200
    assert request(server, "GET", "/api/history")[0] == 200
    fake.fail = None
    assert request(server, "GET", "/api/status")[0] == 200
    assert request(server, "GET", "/metrics")[0] == 200


def test_unserialisable_status_is_503(server: StatusServer, fake: FakeStatus) -> None:
    broken = dataclasses.replace(fake(), daemon=snap.daemon(uptime=float("nan")))
    server.get_status = lambda: broken
    assert request(server, "GET", "/api/status")[0] == 503


def test_history_rates_from_growing_counters(server: StatusServer, fake: FakeStatus) -> None:
    deadline = time.monotonic() + 5
    samples: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        time.sleep(0.1)
        status, _, body = request(server, "GET", "/api/history")
        assert status == 200
        history = json.loads(body)
        samples = history["samples"]
        if len(samples) >= 10:
            break
    assert len(samples) >= 10
    assert history["interval"] == 0.05 and history["window"] == 600
    assert samples == sorted(samples, key=lambda s: s["t"])
    assert abs(history["now"] - time.time()) < 5
    for addr, rate in fake.rates.items():
        pps = [b["packets_per_s"] for s in samples for b in s["backends"]
               if b["backend"] == addr and b["vip"] == "198.18.1.100"]
        bps = [b["bytes_per_s"] for s in samples for b in s["backends"] if b["backend"] == addr]
        assert len(pps) == len(samples)
        assert statistics.median(pps) == pytest.approx(rate, rel=0.15)
        assert statistics.median(bps) == pytest.approx(rate * 100, rel=0.15)


def test_sampler_survives_errors(server: StatusServer, fake: FakeStatus) -> None:
    fake.fail = RuntimeError("boom")
    time.sleep(0.3)
    calls = fake.calls
    time.sleep(0.3)
    assert fake.calls > calls  # still sampling
    n = len(server.history)
    fake.fail = None
    deadline = time.monotonic() + 5
    while len(server.history) <= n and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(server.history) > n


def test_history_exact_rates_resets_and_window() -> None:
    def counted(**counters: tuple[int, int]) -> Status:
        return snap.status(services=[snap.service("v", [
            snap.backend(a, packets=p, bytes=b) for a, (p, b) in counters.items()])])

    h = History(window=10, interval=1)
    h.add(counted(a=(100, 1000)), wall=1000.0, mono=50.0)
    assert len(h) == 0  # a baseline only
    h.add(counted(a=(300, 5000), b=(7, 70)), wall=1002.0, mono=52.0)
    h.add(counted(a=(30, 300), b=(17, 170)), wall=1003.0, mono=53.0)  # a restarted
    h.add(counted(b=(17, 170)), wall=1004.0, mono=54.0)  # a gone
    out = h.snapshot(now=1004.5)
    assert out["now"] == 1004.5
    got = [(s["t"], [(b["backend"], b["packets_per_s"], b["bytes_per_s"]) for b in s["backends"]])
           for s in out["samples"]]
    assert got == [
        (1002.0, [("a", 100.0, 2000.0)]),
        (1003.0, [("a", 30.0, 300.0), ("b", 10.0, 100.0)]),
        (1004.0, [("b", 0.0, 0.0)]),
    ]
    h.add(counted(a=(1, 1), b=(20, 200)), wall=1013.5, mono=63.5)
    assert [s["t"] for s in h.snapshot()["samples"]] == [1004.0, 1013.5]


def test_history_ring_is_bounded() -> None:
    h = History(window=5, interval=1)
    for i in range(100):
        h.add(snap.status(services=[snap.service("v", [snap.backend("a", packets=i, bytes=i)])]),
              wall=float(i) / 100, mono=float(i))
    assert len(h) == 6


def test_ipv6_loopback(fake: FakeStatus) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback address on this machine")
    with StatusServer("::1", 0, fake) as srv:
        host, port = srv.address
        assert host == "::1"
        assert srv.url == f"http://[::1]:{port}"
        with urllib.request.urlopen(srv.url + "/api/status", timeout=10) as resp:
            assert json.load(resp)["daemon"]["tag"] == "test"


def test_hostname_and_lifecycle(fake: FakeStatus) -> None:
    srv = StatusServer("localhost", 0, fake)
    with pytest.raises(RuntimeError):
        _ = srv.address
    srv.start()
    try:
        with pytest.raises(RuntimeError):
            srv.start()
        url = srv.url
        with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
            assert resp.status == 200
    finally:
        srv.stop()
    srv.stop()  # idempotent
    assert not srv.running
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + "/metrics", timeout=2)


def test_port_in_use_raises(server: StatusServer, fake: FakeStatus) -> None:
    host, port = server.address
    other = StatusServer(host, port, fake)
    with pytest.raises(OSError):
        other.start()
    assert not other.running


def test_concurrent_requests(server: StatusServer) -> None:
    results: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        for path in ("/metrics", "/api/status", "/api/history", "/"):
            status = request(server, "GET", path)[0]
            with lock:
                results.append(status)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert results == [200] * 32


# --- bounds: connections and the time to send a request ------------------------------


def _idle(srv: StatusServer, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.create_connection(srv.address, timeout=5)
        out.append(s)
    return out


def _closed_within(s: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed ``s`` (EOF or reset), None if it did not."""
    t = time.monotonic()
    s.settimeout(seconds)
    try:
        while s.recv(4096):
            pass
    except TimeoutError:
        return None
    except OSError:
        pass
    return time.monotonic() - t


def test_idle_connections_do_not_take_a_thread_each(fake: FakeStatus) -> None:
    with StatusServer("127.0.0.1", 0, fake, sample_interval=0.05, max_connections=8,
                      request_timeout=3.0) as srv:
        before = threading.active_count()
        t = time.monotonic()
        idle = _idle(srv, 200)
        try:
            time.sleep(0.3)
            assert threading.active_count() - before <= 8
            # full: answered at once (503) rather than queued behind the idle ones
            status, headers, _ = request(srv, "GET", "/metrics")
            if time.monotonic() - t < 2.5:  # else the first idle ones may be cut already
                assert status == 503 and headers.get("retry-after")
            # the idle ones are cut at the deadline; then it answers again
            deadline = time.monotonic() + 5
            while request(srv, "GET", "/metrics")[0] != 200:
                assert time.monotonic() < deadline, "still full after the idle ones' deadline"
                time.sleep(0.1)
            assert threading.active_count() - before <= 8
        finally:
            for s in idle:
                s.close()


def test_slowloris_is_cut_at_the_total_deadline(fake: FakeStatus) -> None:
    with StatusServer("127.0.0.1", 0, fake, sample_interval=0.05,
                      request_timeout=1.0) as srv:
        s = socket.create_connection(srv.address, timeout=5)
        stop = threading.Event()

        def drip() -> None:  # a byte every 0.2 s: never a pause long enough per recv
            for ch in b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 500:
                if stop.wait(0.2):
                    return
                try:
                    s.send(bytes([ch]))
                except OSError:
                    return

        t = threading.Thread(target=drip, daemon=True)
        t.start()
        try:
            took = _closed_within(s, 6.0)
            assert took is not None and took < 2.5, took
        finally:
            stop.set()
            t.join(5)
            s.close()
        assert request(srv, "GET", "/metrics")[0] == 200


def test_a_request_in_time_is_served_and_keep_alive_works(fake: FakeStatus) -> None:
    with StatusServer("127.0.0.1", 0, fake, sample_interval=0.05,
                      request_timeout=1.0) as srv:
        host, port = srv.address
        conn = http.client.HTTPConnection(host, port, timeout=5)
        try:
            for _ in range(3):  # each request gets its own deadline
                conn.request("GET", "/api/status")
                resp = conn.getresponse()
                assert resp.status == 200
                resp.read()
                time.sleep(0.6)
        finally:
            conn.close()


def test_stop_does_not_wait_for_slow_clients(fake: FakeStatus) -> None:
    srv = StatusServer("127.0.0.1", 0, fake, sample_interval=0.05, request_timeout=30.0)
    srv.start()
    idle = _idle(srv, 4)
    time.sleep(0.2)
    t = time.monotonic()
    srv.stop()
    assert time.monotonic() - t < 2.0
    for s in idle:
        assert _closed_within(s, 2.0) is not None
        s.close()
