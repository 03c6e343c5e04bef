"""Operating a running daemon (issue: operate it): the control socket and CLI,
live changes under load without a failed connection, SIGHUP reload, saved
client tables, Prometheus metrics and the status page, on both data paths.

The load: steady clients open a new TCP connection each, one after another,
for the whole test (bounded in time and count); every failure is kept. New
clients (addresses that have not spoken yet) probe where new clients go after
each change.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from loaded.lab import traffic
from loaded.lab.topology import Lab
from tests.e2e.conftest import PORT, Daemon
from tests.e2e.load import Load

STEADY = 6  # clients of the load
ARTIFACTS = Path(os.environ.get("LOADED_ARTIFACTS", "artifacts"))


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    # More client addresses than the other suites: each change is probed by
    # clients the balancer has never seen.
    with Lab(backends=3, clients=40) as lab:
        lab.start_servers(PORT)
        yield lab


def who(lab: Lab, client: str, vip: str) -> str:
    return traffic.tcp_request(client, vip, PORT, timeout=5, ns=lab.ns("cl")).split()[0]


def steady_load(lab: Lab, vip: str, clients: list[str], limit: float = 120.0) -> Load:
    """New connections from ``clients`` in turn, as fast as they are answered."""
    return Load(lab, vip, clients, PORT, limit=limit, period=0.005, timeout=5.0)


def backend_named(lab: Lab, name: str) -> Any:
    return next(b for b in lab.backends if b.name == name)


def service(status: dict[str, Any], vip: str) -> dict[str, Any]:
    return next(s for s in status["services"] if s["vip"] == vip)


def row(status: dict[str, Any], vip: str, address: str) -> dict[str, Any]:
    return next(b for b in service(status, vip)["backends"] if b["address"] == address)


def test_live_changes_under_load_fail_no_connection(lab: Lab, daemon_factory: Any,
                                                    datapath: str) -> None:
    conf_name = "live.conf"
    d: Daemon = daemon_factory(conf_name, strategy="wrr").start()
    vip = lab.vip4
    b1, b2, b3 = (backend_named(lab, n) for n in ("b1", "b2", "b3"))
    fresh = iter(lab.clients4[STEADY:])
    with steady_load(lab, vip, lab.clients4[:STEADY]) as load:
        time.sleep(1.0)
        status = d.control("status")
        assert service(status, vip)["clients"] >= STEADY
        assert {b["address"] for b in service(status, vip)["backends"]} == {
            b.addr4 for b in lab.backends}

        # drain b1: new clients never get it, its clients stay
        preview = d.control("backend", "drain", b1.addr4, "--dry-run")
        assert preview["dry_run"] and preview["moved"] == 0
        on_b1 = [c for c, names in load.backends_since(0).items() if names == {"b1"}]
        assert on_b1, "wrr gave b1 a steady client"
        t = time.monotonic()
        result = d.control("backend", "drain", b1.addr4)
        assert result["after"]["state"] == "draining"
        assert all(who(lab, next(fresh), vip) != "b1" for _ in range(6))
        time.sleep(0.5)
        since = load.backends_since(t)
        assert all(since[c] == {"b1"} for c in on_b1 if c in since)

        # weight: the share of new clients follows (wrr, b2:b3 = 4:1)
        d.control("backend", "weight", b2.addr4, "--weight", "4")
        shares = Counter(who(lab, next(fresh), vip) for _ in range(10))
        assert shares["b2"] >= 7 and shares["b1"] == 0, shares

        # add a fourth backend, then take it out gracefully
        b4 = lab.add_backend()
        lab.start_server(b4.name, PORT)
        added = d.control("backend", "add", b4.addr4, "--weight", "4")
        assert added["before"] is None and added["after"]["state"] == "up"
        new_names = Counter(who(lab, next(fresh), vip) for _ in range(6))
        assert new_names[b4.name] >= 1, new_names
        removed = d.control("backend", "remove", b4.addr4)
        assert removed["after"] is None
        assert all(who(lab, next(fresh), vip) != b4.name for _ in range(4))

        # SIGHUP: the config file, changed, applied without a restart
        assert lab.workdir is not None
        conf = d.conf
        lab.write_config(conf, strategy="wrr", datapath=datapath,
                         server4=[f"{b1.addr4} weight=1", f"{b2.addr4} weight=4",
                                  f"{b3.addr4} weight=5"])
        pids = d.worker_pids()
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if row(d.control("status"), vip, b3.addr4)["weight"] == 5:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the reload was not applied")
        assert "event=reloaded" in d.log
        time.sleep(1.0)
        assert d.worker_pids() == pids  # no worker restarted
    assert load.failures == [], load.failures[:5]
    assert len(load.attempts) > 200
    lab.remove_backend(b4.name)
    assert d.stop() == 0, d.log[-3000:]
    assert d.problems() == []


def test_reload_dry_run_and_bad_config_change_nothing(lab: Lab, daemon_factory: Any,
                                                       datapath: str) -> None:
    d: Daemon = daemon_factory("reload.conf").start()
    b3 = backend_named(lab, "b3")
    lab.write_config(d.conf, server4=[b.addr4 for b in lab.backends if b.name != "b3"],
                     datapath=datapath)
    plan = d.control("reload", "--dry-run")
    assert not plan["applied"] and [c["op"] for c in plan["changes"]] == ["remove"]
    assert any(b["address"] == b3.addr4
               for b in service(d.control("status"), lab.vip4)["backends"])
    d.conf.write_text(d.conf.read_text() + "client_timeout=nonsense\n")
    proc = lab.run("lb", [sys.executable, "-m", "loaded", "reload", "-c", str(d.conf)])
    assert proc.returncode != 0 and "nonsense" in proc.stderr
    assert d.stop() == 0, d.log[-3000:]


def test_restart_keeps_clients_on_their_backends(lab: Lab, daemon_factory: Any,
                                                 datapath: str) -> None:
    d: Daemon = daemon_factory("persist.conf", client_timeout=600)
    d.start()
    clients = lab.clients4[:8] + lab.clients6[:4]
    before = {c: who(lab, c, lab.vip4 if ":" not in c else lab.vip6) for c in clients}
    assert len(set(before.values())) == 3
    assert d.stop() == 0, d.log[-3000:]
    saved = Path(f"{d.conf.resolve()}.clients.json")
    assert saved.exists() and "event=clients-saved" in d.log
    d.start()
    assert not saved.exists()  # restored once, never twice
    deadline = time.monotonic() + 5  # the workers report once a second
    while True:
        status = d.control("status")
        counts = (service(status, lab.vip4)["clients"], service(status, lab.vip6)["clients"])
        if counts == (8, 4) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert counts == (8, 4)
    found = d.control("clients", "lookup", clients[0])
    assert [s["backend"] for s in found["services"]] == [
        backend_named(lab, before[clients[0]]).addr4]
    after = {c: who(lab, c, lab.vip4 if ":" not in c else lab.vip6) for c in clients}
    assert after == before
    if datapath == "conntrack":  # the kernel's client map has learnt it again
        deadline = time.monotonic() + 5
        while (found := d.control("clients", "lookup", clients[0]))["kernel"] is None:
            assert time.monotonic() < deadline, found
            time.sleep(0.2)
        assert found["kernel"]["backend"] == backend_named(lab, before[clients[0]]).addr4
    else:
        assert "kernel" not in found
    listing = d.control("clients", "list", "--limit", "3")
    assert {s["vip"]: s["total"] for s in listing["services"]} == {lab.vip4: 8, lab.vip6: 4}
    assert all(len(s["clients"]) <= 3 for s in listing["services"])
    assert d.stop() == 0, d.log[-3000:]


@pytest.mark.parametrize("family", [4, 6])
def test_an_established_connection_survives_a_restart(lab: Lab, daemon_factory: Any,
                                                      family: int) -> None:
    d: Daemon = daemon_factory(f"survive{family}.conf")
    d.start()
    client = (lab.clients4 if family == 4 else lab.clients6)[33]
    vip = lab.vip4 if family == 4 else lab.vip6
    sock = lab.socket("cl", socket.AF_INET if family == 4 else socket.AF_INET6)
    try:
        sock.settimeout(5)
        sock.bind((client, 0))
        sock.connect((vip, PORT))  # established; the server waits for a line
        assert d.stop() == 0
        d.start()
        sock.sendall(b"HELLO\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(256)
            assert chunk, "the connection was closed"
            reply += chunk
    finally:
        sock.close()
    name, seen = reply.decode().split()
    assert name in {b.name for b in lab.backends} and seen == client
    assert d.stop() == 0


def test_restart_with_another_worker_count_still_keeps_clients(lab: Lab, daemon_factory: Any,
                                                              datapath: str) -> None:
    one = daemon_factory("persist1.conf", client_timeout=600, LAST_CORE=0)
    one.start()
    assert len(one.stats()["workers"]) == 1
    clients = lab.clients4[26:32]
    before = {c: who(lab, c, lab.vip4) for c in clients}
    assert one.stop() == 0
    # the same file, now with two workers: every worker gets every saved client
    lab.write_config(one.conf, client_timeout=600, datapath=datapath)
    one.start()
    assert len(one.stats()["workers"]) == min(2, os.cpu_count() or 1)
    assert "event=clients-restore-shared" in one.log or (os.cpu_count() or 1) == 1
    assert {c: who(lab, c, lab.vip4) for c in clients} == before
    assert one.stop() == 0


def test_metrics_match_the_traffic_sent(lab: Lab, daemon_factory: Any, datapath: str) -> None:
    d: Daemon = daemon_factory("metrics.conf").start()
    clients = lab.clients4[20:26]
    rounds = 5
    for c in clients:
        for _ in range(rounds):
            traffic.udp_request(c, lab.vip4, PORT, timeout=5, attempts=1, ns=lab.ns("cl"))
    status = d.control("status")
    assert status["daemon"]["datapath"] == datapath
    url = status["endpoints"]["metrics"]
    # each request and its reply pass the balancer once: two packets per request
    want = len(clients) * rounds * 2
    def scrape() -> tuple[dict[str, Any], tuple[float, float, float]]:
        families = {f.name: f for f in text_string_to_metric_families(d.http_get(url))}

        def total(name: str) -> float:
            return sum(s.value for s in families[name].samples
                       if s.name.endswith("_total") and s.labels["vip"] == lab.vip4)
        active = sum(s.value for s in families["loaded_service_active_clients"].samples
                     if s.labels["vip"] == lab.vip4)
        return families, (total("loaded_backend_packets"), total("loaded_backend_new_clients"),
                          active)

    # the workers report once a second, the kernel's counters are read as often:
    # scrape until they have all caught up
    deadline = time.monotonic() + 8
    while True:
        families, seen = scrape()
        if seen == (want, len(clients), len(clients)) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    # packets, new clients (each client once), active clients
    assert seen == (want, len(clients), len(clients))
    queues = families["loaded_kernel_queue_dropped"].samples
    assert queues and all(s.value == 0 for s in queues)
    page = d.http_get(status["endpoints"]["status"])
    assert "<svg" in page and "/api/status" in page
    api = json.loads(d.http_get(status["endpoints"]["status"] + "api/status"))
    assert service(api, lab.vip4)["clients"] == len(clients)
    assert d.stop() == 0, d.log[-3000:]


BROWSER_SCRIPT = r"""
import json, sys, time
from playwright.sync_api import sync_playwright
url, shot = sys.argv[1], sys.argv[2]
out = {}
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 375, "height": 800})
    page.goto(url)
    page.wait_for_selector("tr[data-backend]", timeout=10000)
    out["backends"] = sorted(set(page.eval_on_selector_all(
        "tr[data-backend]", "rows => rows.map(r => r.dataset.backend)")))
    first = page.get_attribute("svg#chart", "data-points")
    time.sleep(4)
    out["points"] = [first, page.get_attribute("svg#chart", "data-points")]
    out["max"] = page.get_attribute("svg#chart", "data-max")
    out["wide"] = page.evaluate("document.documentElement.scrollWidth")
    page.screenshot(path=shot, full_page=True)
    browser.close()
print(json.dumps(out))
"""


def test_status_page_in_a_real_browser(lab: Lab, daemon_factory: Any, tmp_path: Path) -> None:
    pytest.importorskip("playwright")
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("Debian's chromium is not installed (./run installs it)")
    d: Daemon = daemon_factory("browser.conf").start()
    url = d.control("status")["endpoints"]["status"]
    script = tmp_path / "browse.py"
    script.write_text(BROWSER_SCRIPT)
    shot = tmp_path / "status-page.png"
    with steady_load(lab, lab.vip4, lab.clients4[:STEADY], limit=30):
        time.sleep(2)  # some history for the chart
        proc = lab.run("lb", [sys.executable, str(script), url, str(shot)], timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out["backends"]) >= {b.addr4 for b in lab.backends}
    assert int(out["points"][1]) > int(out["points"][0])  # the chart moves with traffic
    assert float(out["max"]) > 0  # and shows packets
    assert out["wide"] <= 375  # nothing sticks out of a phone's screen
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"status-page-{d.conf.name}.png").write_bytes(shot.read_bytes())
    assert d.stop() == 0, d.log[-3000:]


def test_cli_without_a_daemon_says_so(lab: Lab, tmp_path: Path) -> None:
    conf = lab.write_config(tmp_path / "none.conf")
    proc = subprocess.run([sys.executable, "-m", "loaded", "status", "-c", str(conf)],
                          capture_output=True, text=True, timeout=20)
    assert proc.returncode == 1 and "running" in proc.stderr
