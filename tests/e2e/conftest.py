"""End-to-end fixtures: a namespace lab and the real daemon running in it.

Needs root (namespaces, NFQUEUE, iptables); skipped otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loaded.core.plan import instance_tag
from loaded.io.kernel import JOURNAL_DIR
from loaded.lab.topology import Lab

if os.geteuid() != 0:
    pytest.skip("end-to-end tests need root (namespaces, NFQUEUE)", allow_module_level=True)

PORT = 8080


class Daemon:
    """``loaded -D`` in the lab's balancer namespace."""

    def __init__(self, lab: Lab, conf: Path, args: tuple[str, ...] = ()) -> None:
        self.lab = lab
        self.conf = conf
        self.args = args
        self.tag = instance_tag(os.path.abspath(conf))
        self.stats_path = JOURNAL_DIR / f"{self.tag}.stats.json"
        assert lab.workdir is not None
        self.log_path = lab.workdir / f"daemon-{self.tag}-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> Daemon:
        try:
            self.stats_path.unlink()
        except FileNotFoundError:
            pass
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed with the process
        self.proc = self.lab.exec("lb", [sys.executable, "-m", "loaded", "-D", "-c",
                                         str(self.conf), *self.args],
                                  stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "event=started" in self.log:
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"daemon did not start:\n{self.log}")

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stats(self) -> dict[str, Any]:
        return json.loads(self.stats_path.read_text())  # type: ignore[no-any-return]

    def wait_stats(self, predicate: Any, timeout: float = 6.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                last = self.stats()
                if predicate(last):
                    return last
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"stats never matched: {json.dumps(last)[:2000]}")

    def drops(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for w in self.stats()["workers"]:
            for reason, n in w.get("drops", {}).items():
                total[reason] = total.get(reason, 0) + n
        return total

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.stats()["workers"] if w.get("alive") and "pid" in w]

    def stop(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill_all(self) -> None:
        """Simulate a crash: SIGKILL the supervisor and every worker, no clean-up."""
        pids = self.worker_pids()
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(5)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def kernel_state(lab: Lab) -> dict[str, Any]:
    """What the balancer namespace looks like, for before/after comparisons."""

    def out(*argv: str) -> str:
        return lab.run("lb", list(argv), check=True).stdout

    def rules(tool: str) -> list[str]:
        return sorted(line for line in out(tool).splitlines()
                      if line and not line.startswith("#"))

    addrs = sorted((a["ifname"], i["local"], i["prefixlen"])
                   for a in json.loads(out("ip", "-j", "addr", "show"))
                   for i in a.get("addr_info", []))
    sysctls = {k: lab.sysctl("lb", k) for k in (
        "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding",
        "net.ipv4.conf.all.send_redirects", "net.ipv4.icmp_echo_ignore_broadcasts")}
    return {
        "addresses": addrs,
        "routes4": sorted(out("ip", "-4", "route", "show", "table", "all").splitlines()),
        "routes6": sorted(line for line in out("ip", "-6", "route", "show", "table", "all")
                          .splitlines() if "expires" not in line),
        "neigh": sorted(out("ip", "neigh", "show", "nud", "permanent").splitlines()),
        "iptables": rules("iptables-save"),
        "ip6tables": rules("ip6tables-save"),
        "sysctls": sysctls,
    }


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(backends=3, clients=6) as lab:
        lab.start_servers(PORT)
        yield lab


@pytest.fixture
def daemon_factory(lab: Lab) -> Iterator[Any]:
    started: list[Daemon] = []

    def make(name: str = "lab.conf", args: tuple[str, ...] = (), text: str | None = None,
             **overrides: Any) -> Daemon:
        assert lab.workdir is not None
        conf = lab.workdir / name
        if text is not None:
            conf.write_text(text)
        else:
            lab.write_config(conf, **overrides)
        d = Daemon(lab, conf, args)
        started.append(d)
        return d

    yield make
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
