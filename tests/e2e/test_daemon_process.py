"""The daemon as a system service: detached, logging to syslog (facility daemon)."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from loaded.lab import traffic
from loaded.lab.topology import Lab
from tests.e2e.conftest import PORT, Daemon, kernel_state

LOG_DAEMON_INFO = (3 << 3) | 6  # facility daemon, severity info


def test_detaches_and_logs_to_syslog(lab: Lab, tmp_path: Path, daemon_factory: Any) -> None:
    before = kernel_state(lab)
    d: Daemon = daemon_factory("detached.conf")  # writes the config; started by hand below
    sock_path = tmp_path / "log"
    syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    syslog.bind(str(sock_path))
    syslog.settimeout(10)
    try:
        t0 = time.monotonic()
        proc = lab.run("lb", ["env", f"LOADED_SYSLOG_SOCKET={sock_path}", sys.executable, "-m",
                              "loaded", "-c", str(d.conf)], timeout=20)
        assert proc.returncode == 0, proc.stderr
        assert time.monotonic() - t0 < 10  # the command returned: the daemon went on alone
        messages = []
        while not any("event=started" in m for m in messages):
            messages.append(syslog.recv(4096).decode())
        started = next(m for m in messages if "event=started" in m)
        assert started.startswith(f"<{LOG_DAEMON_INFO}>loaded[")
        stats = d.wait_stats(lambda s: bool(s.get("pid")))
        pid = stats["pid"]
        assert os.getsid(pid) != os.getsid(0)
        assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
        line = traffic.tcp_request(lab.clients4[0], lab.vip4, PORT, timeout=5, ns=lab.ns("cl"))
        assert line.split()[1] == lab.clients4[0]
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
            time.sleep(0.1)
        assert not os.path.exists(f"/proc/{pid}")
        while not any("event=stopped" in m for m in messages):
            messages.append(syslog.recv(4096).decode())
    finally:
        syslog.close()
    assert kernel_state(lab) == before
    # a clean stop takes the stats file with it; the workers' totals went to syslog
    assert not d.stats_path.exists()
    assert any("event=worker-stopped" in m for m in messages)
