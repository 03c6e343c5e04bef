"""The status page in a real headless browser (Debian's chromium driven by Playwright).

Needs the Debian package ``chromium`` (binary ``/usr/bin/chromium``; another
path can be given in ``$LOADED_CHROMIUM``) and the PyPI package ``playwright``
(in the ``dev`` extra). ``playwright install`` is never run: it downloads a
browser, and these machines have no internet. Without either, the tests skip
and say which is missing.

Screenshots: each test writes its PNGs to pytest's ``tmp_path`` and, when
``$LOADED_ARTIFACTS`` is set, copies them to ``$LOADED_ARTIFACTS/browser/``
(e.g. ``LOADED_ARTIFACTS=artifacts``: ``/artifacts/`` is ignored by git).

Every request the page makes is checked: anything not to the test server is
blocked and fails the test (the page must be self-contained), and so does a
JavaScript error.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loaded.control.web import StatusServer
from loaded.core.status import BackendStatus, KernelHashStatus, Status

from . import snapshots as snap

CHROMIUM = os.environ.get("LOADED_CHROMIUM", "/usr/bin/chromium")

try:
    from playwright.sync_api import Browser, Page, Route, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    pytest.skip("playwright is not installed (pip install playwright, in the dev extra)",
                allow_module_level=True)
if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):  # pragma: no cover
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)",
                allow_module_level=True)

BACKENDS = {"198.19.0.11": 400.0, "198.19.0.12": 150.0, "198.19.0.13": 0.0}
DOWN = "198.19.0.13"


class GrowingStatus:
    """A status source for one IPv4 and one IPv6 VIP whose counters grow with time."""

    def __init__(self) -> None:
        self.started = time.time() - 3600.0
        self.t0 = time.monotonic()
        self.fail = False
        self.kernel_drops: dict[str, int] | None = None  # None: the per-packet path
        self.kernel_hash: KernelHashStatus | None = None
        self.lock = threading.Lock()

    def __call__(self) -> Status:
        if self.fail:
            raise RuntimeError("supervisor restarting")
        elapsed = time.monotonic() - self.t0
        now = time.time()

        def backend(addr: str, rate: float, down: bool = False) -> BackendStatus:
            packets = int(10_000 + rate * elapsed)
            return snap.backend(
                addr, weight=2 if addr.endswith("11") else 1, state="down" if down else "up",
                health="down" if down else "up", transitions=3 if down else 1,
                last_check=snap.check(not down, "connection refused" if down else "tcp/80 ok",
                                      now - 1.5),
                clients=0 if down else 12, new_clients=0 if down else 40,
                packets=packets, bytes=packets * 740)

        return snap.status(
            daemon_info=snap.daemon(pid=4242, tag="browser-test", config="/etc/loaded/test.conf",
                                    uptime=now - self.started, started_at=self.started),
            services=[
                snap.service("198.18.1.100", clients=24,
                             backends=[backend(a, r, a == DOWN) for a, r in BACKENDS.items()]),
                snap.service("2001:db8:1::100", family=6, strategy="maglev", clients=3,
                             backends=[backend("2001:db8:2::11", 80.0)]),
            ],
            workers=[
                snap.worker(i, drops={"no-backend": 2}, report=snap.report(
                    pid=5000 + i, packets=int(300 * elapsed), cpu_seconds=0.01 * elapsed,
                    latency=snap.latency([(0.0001, 10), (0.001, 20)], 0.01, 20)))
                for i in range(2)],
            kernel_queues={i: snap.queue(id_sequence=100) for i in range(2)},
            kernel_drops=None if self.kernel_drops is None else dict(self.kernel_drops),
            kernel_hash=self.kernel_hash)


@pytest.fixture(scope="module")
def source() -> GrowingStatus:
    return GrowingStatus()


@pytest.fixture(scope="module")
def server(source: GrowingStatus) -> Iterator[StatusServer]:
    srv = StatusServer("127.0.0.1", 0, source, sample_interval=0.5)
    srv.start()
    deadline = time.monotonic() + 10
    while len(srv.history) < 3 and time.monotonic() < deadline:  # some history to seed from
        time.sleep(0.1)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def artifacts(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    target = os.environ.get("LOADED_ARTIFACTS")
    if target:
        dest = Path(target) / "browser"
        dest.mkdir(parents=True, exist_ok=True)
        for png in tmp_path.glob("*.png"):
            shutil.copy2(png, dest / png.name)


class PageProblems:
    """Collects JavaScript errors and requests to anywhere but the test server."""

    def __init__(self, page: Page, origin: str) -> None:
        self.errors: list[str] = []
        self.external: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("console", lambda msg: self.errors.append(msg.text)
                if msg.type == "error" and "503" not in msg.text else None)

        def route(r: Route) -> None:
            if r.request.url.startswith(origin + "/"):
                r.continue_()
            else:
                self.external.append(r.request.url)
                r.abort()

        page.route("**/*", route)

    def check(self) -> None:
        assert self.external == [], "the page fetched outside resources"
        assert self.errors == [], "JavaScript errors"


def chart_state(page: Page) -> tuple[int, str]:
    chart = page.locator("svg#chart")
    paths = page.locator("svg#chart path.series")
    d = "|".join(paths.nth(i).get_attribute("d") or "" for i in range(paths.count()))
    return int(chart.get_attribute("data-points") or 0), d


def open_page(browser: Browser, server: StatusServer, width: int,
              height: int) -> tuple[Page, PageProblems]:
    context = browser.new_context(viewport={"width": width, "height": height},
                                  device_scale_factor=1)
    page = context.new_page()
    problems = PageProblems(page, server.url)
    page.goto(server.url + "/", wait_until="load")
    return page, problems


@pytest.mark.parametrize(("name", "width", "height"),
                         [("mobile", 375, 800), ("desktop", 1280, 900)])
def test_page_shows_backends_and_live_chart(browser: Browser, server: StatusServer,
                                            artifacts: Path, name: str, width: int,
                                            height: int) -> None:
    page, problems = open_page(browser, server, width, height)
    try:
        page.wait_for_selector('#conn[data-state="ok"]', timeout=10_000)
        # header
        assert page.inner_text("#daemon-tag") == "browser-test"
        assert page.inner_text("#daemon-datapath") == "perpacket"
        assert page.inner_text("#daemon-strategy") == "rr, maglev"
        assert page.inner_text("#daemon-uptime").startswith("1h ")
        # every backend has a row with its VIP, state and counters
        for addr in [*BACKENDS, "2001:db8:2::11"]:
            row = page.locator(f'tr[data-backend="{addr}"]')
            assert row.count() == 1, addr
            assert row.is_visible()
            packets = row.locator('td[data-field="packets"]')
            assert int(packets.get_attribute("data-value") or 0) >= 10_000
        down = page.locator(f'tr[data-backend="{DOWN}"]')
        assert down.get_attribute("data-state") == "down"
        assert down.get_attribute("data-health") == "down"
        assert "connection refused" in down.locator('td[data-field="last_check"]').inner_text()
        up = page.locator('tr[data-backend="198.19.0.11"]')
        assert up.get_attribute("data-vip") == "198.18.1.100"
        assert up.locator('td[data-field="weight"]').inner_text() == "2"
        assert page.locator("tr.worker-row").count() == 2

        # the chart was seeded from /api/history, then grows every second
        page.wait_for_function(
            "document.querySelector('svg#chart').dataset.series === '4'", timeout=10_000)
        points0, d0 = chart_state(page)
        assert points0 >= 3, "chart not seeded from /api/history"
        packets0 = int(up.locator('td[data-field="packets"]').get_attribute("data-value") or 0)
        page.wait_for_timeout(3200)
        points1, d1 = chart_state(page)
        assert points1 >= points0 + 2, (points0, points1)
        assert d1 != d0
        packets1 = int(up.locator('td[data-field="packets"]').get_attribute("data-value") or 0)
        assert packets1 > packets0
        rate = up.locator('td[data-field="rate"]').inner_text()
        assert 200 <= float(rate.replace(",", "")) <= 800, rate  # ~400/s
        assert page.locator("#legend li").count() == 4

        # usable at this width: nothing wider than the viewport
        overflow = page.evaluate("document.documentElement.scrollWidth")
        assert overflow <= width, f"page is {overflow}px wide in a {width}px viewport"
        if width <= 400:  # stacked cards: every value has its label
            assert page.locator("#backends thead").is_hidden()
            assert up.locator('td[data-field="packets"]').evaluate(
                "td => getComputedStyle(td, '::before').content") == '"Packets"'
        page.screenshot(path=str(artifacts / f"status-{name}.png"), full_page=True)
        problems.check()
    finally:
        page.context.close()


def test_page_reports_an_unavailable_status_and_recovers(browser: Browser,
                                                         server: StatusServer,
                                                         source: GrowingStatus,
                                                         artifacts: Path) -> None:
    page, problems = open_page(browser, server, 1024, 700)
    try:
        page.wait_for_selector('#conn[data-state="ok"]', timeout=10_000)
        source.fail = True
        try:
            page.wait_for_selector('#conn[data-state="error"]', timeout=5_000)
            assert "503" in page.inner_text("#error")
            assert "supervisor restarting" in page.inner_text("#error")
            # the table keeps the last known state
            assert page.locator('tr[data-backend="198.19.0.11"]').count() == 1
            page.screenshot(path=str(artifacts / "status-error.png"), full_page=True)
        finally:
            source.fail = False
        page.wait_for_selector('#conn[data-state="ok"]', timeout=5_000)
        assert page.locator("#error").is_hidden()
        problems.check()
    finally:
        page.context.close()


def test_page_shows_the_kernels_hash_table(browser: Browser, server: StatusServer,
                                           source: GrowingStatus) -> None:
    page, problems = open_page(browser, server, 375, 800)
    try:
        page.wait_for_selector('#conn[data-state="ok"]', timeout=10_000)
        assert page.locator("#kernel-hash").is_hidden()
        source.kernel_hash = KernelHashStatus("maglev", 65537, 7, True, False, 4321)
        try:
            page.wait_for_selector("#kernel-hash", state="visible", timeout=5_000)
            text = page.inner_text("#kernel-hash")
            assert "maglev, 65,537 buckets, decides every new client" in text
            assert page.inner_text('#kernel-hash [data-field="hashed"]') == "4,321"
            assert page.evaluate("document.documentElement.scrollWidth") <= 375
        finally:
            source.kernel_hash = None
        page.wait_for_selector("#kernel-hash", state="hidden", timeout=5_000)
        problems.check()
    finally:
        page.context.close()


def test_page_shows_kernel_drops_on_the_conntrack_path(browser: Browser, server: StatusServer,
                                                      source: GrowingStatus,
                                                      artifacts: Path) -> None:
    page, problems = open_page(browser, server, 375, 800)
    try:
        page.wait_for_selector('#conn[data-state="ok"]', timeout=10_000)
        assert page.locator("#kernel-drops").is_hidden()  # per-packet: nothing to show
        source.kernel_drops = {"conntrack-invalid": 12345}
        try:
            page.wait_for_selector("#kernel-drops", state="visible", timeout=5_000)
            cell = page.locator('#kernel-drops [data-reason="conntrack-invalid"]')
            assert cell.get_attribute("data-value") == "12345"
            assert "conntrack-invalid" in page.inner_text("#kernel-drops")
            assert "12,345" in page.inner_text("#kernel-drops")
            overflow = page.evaluate("document.documentElement.scrollWidth")
            assert overflow <= 375
            page.screenshot(path=str(artifacts / "status-kernel-drops.png"), full_page=True)
        finally:
            source.kernel_drops = None
        page.wait_for_selector("#kernel-drops", state="hidden", timeout=5_000)
        problems.check()
    finally:
        page.context.close()
