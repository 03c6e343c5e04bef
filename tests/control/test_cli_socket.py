"""Which control socket a command without -c or --socket talks to: the config in
the working directory, else the one daemon that answers in the run directory."""

from __future__ import annotations

import io
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from loaded.control.cli import EXIT_FAILED, parser, run, socket_of
from loaded.control.protocol import ControlError
from loaded.control.server import ControlServer
from loaded.core.plan import instance_tag

from . import snapshots as snap
from .loop import poll


@pytest.fixture
def rundir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    # Short: a Unix socket path must fit in 108 bytes, pytest's tmp_path may not.
    d = tempfile.mkdtemp(prefix="ldr", dir="/tmp")
    monkeypatch.setenv("LOADED_RUN_DIR", d)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # no loaded.conf here
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Daemon:
    """A ControlServer answering ``status`` like a daemon serving ``config``,
    driven from a thread of its own."""

    def __init__(self, path: str, config: str) -> None:
        self.config = config
        self.server = ControlServer(path, self.handle)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def handle(self, req: dict[str, Any]) -> Any:
        return snap.status(daemon_info=snap.daemon(
            pid=1, tag="t", config=self.config, datapath="conntrack")).to_json()

    def loop(self) -> None:
        while not self.stop.is_set():
            poll(self.server, 0.02)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.server.close()


@pytest.fixture
def daemons() -> Iterator[Callable[[str, str], Daemon]]:
    started: list[Daemon] = []

    def start(path: str, config: str) -> Daemon:
        d = Daemon(path, config)
        started.append(d)
        return d

    yield start
    for d in started:
        d.close()


def status(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run(parser().parse_args(["status", "--timeout", "5", *argv]), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def leftovers(rundir: str) -> None:
    """What a run directory holds besides live sockets: a stale socket, other files."""
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.path.join(rundir, "dead01.sock"))
    stale.close()  # the file stays, nobody listens
    Path(rundir, "not-a-socket.sock").write_text("")
    Path(rundir, "abc123.clients.json").write_text("{}")


def test_the_one_running_daemon_is_found(rundir: str, daemons: Any) -> None:
    leftovers(rundir)
    path = os.path.join(rundir, "4d3504.sock")
    daemons(path, "/etc/loaded/lb.conf")
    assert socket_of(parser().parse_args(["status"])) == path
    code, out, err = status()
    assert code == 0, err
    assert "config /etc/loaded/lb.conf" in out


def test_several_daemons_ask_for_a_choice(rundir: str, daemons: Any) -> None:
    leftovers(rundir)
    a, b = os.path.join(rundir, "aaaaaa.sock"), os.path.join(rundir, "bbbbbb.sock")
    daemons(a, "/etc/loaded/a.conf")
    daemons(b, "/etc/loaded/b.conf")
    with pytest.raises(ControlError) as info:
        socket_of(parser().parse_args(["status"]))
    message = str(info.value)
    assert "2 daemons" in message and "-c" in message and "--socket" in message
    assert f"{a} (config /etc/loaded/a.conf)" in message
    assert f"{b} (config /etc/loaded/b.conf)" in message
    assert "dead01" not in message and "not-a-socket" not in message
    code, out, err = status()
    assert code == EXIT_FAILED and out == ""
    assert err.startswith("loaded status: ") and a in err and b in err
    # naming one still works
    assert status("--socket", b)[0] == 0


def test_no_daemon_running(rundir: str) -> None:
    leftovers(rundir)
    code, out, err = status()
    assert code == EXIT_FAILED and out == ""
    assert "no daemon is running" in err and rundir in err
    shutil.rmtree(rundir)  # no run directory at all: the same answer
    code, _, err = status()
    assert code == EXIT_FAILED and "no daemon is running" in err


def test_a_config_here_still_names_the_socket(rundir: str, daemons: Any) -> None:
    daemons(os.path.join(rundir, "aaaaaa.sock"), "/etc/loaded/a.conf")
    Path("loaded.conf").write_text("VIP4=198.18.1.100\nserver4=198.19.0.11\n")
    want = f"/run/loaded/{instance_tag(os.path.abspath('loaded.conf'))}.sock"
    assert socket_of(parser().parse_args(["status"])) == want
