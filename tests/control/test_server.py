"""The control socket with real Unix sockets: many clients, partial lines, garbage,
oversized requests, deferred answers, timeouts, permissions, and the client's errors."""

from __future__ import annotations

import grp
import json
import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from loaded.control.protocol import CommandFailed, ControlError, ProtocolError
from loaded.control.server import ControlServer, Pending, request

from .loop import poll


@pytest.fixture
def sockdir() -> Iterator[str]:
    # Short: a Unix socket path must fit in 108 bytes, pytest's tmp_path may not.
    d = tempfile.mkdtemp(prefix="ldc", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def echo(req: dict[str, Any]) -> Any:
    return {"cmd": req["cmd"], "args": req["args"]}


def pump(server: ControlServer, until: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "timed out"
        poll(server, 0.01)


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.setblocking(False)
    return s


def read_lines(server: ControlServer, s: socket.socket, n: int, timeout: float = 5.0
               ) -> list[dict[str, Any]]:
    """n response lines from ``s``, pumping the server meanwhile."""
    buf = bytearray()
    lines = 0
    deadline = time.monotonic() + timeout
    while lines < n:
        assert time.monotonic() < deadline, f"timed out with {bytes(buf[:200])!r}"
        poll(server, 0.01)
        try:
            data = s.recv(1 << 20)
        except BlockingIOError:
            continue
        if not data:
            break
        buf += data
        lines += data.count(b"\n")
    return [json.loads(line) for line in bytes(buf).split(b"\n")[:n]]


def closed(server: ControlServer, s: socket.socket, timeout: float = 5.0) -> bool:
    """True once the server closed ``s`` (EOF after whatever was pending)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        poll(server, 0.01)
        try:
            if s.recv(65536) == b"":
                return True
        except BlockingIOError:
            continue
        except ConnectionResetError:
            return True
    return False


def in_thread(server: ControlServer, fns: Sequence[Callable[[], Any]]) -> list[Any]:
    """Run blocking client calls in threads while this thread drives the server."""
    with ThreadPoolExecutor(len(fns)) as pool:
        futures: list[Future[Any]] = [pool.submit(fn) for fn in fns]
        pump(server, lambda: all(f.done() for f in futures), timeout=20.0)
        out = []
        for f in futures:
            exc = f.exception()
            out.append(exc if exc is not None else f.result())
        return out


# --- the basics ------------------------------------------------------------------


def test_request_and_socket_mode(sockdir: str) -> None:
    path = os.path.join(sockdir, "a.sock")
    with ControlServer(path, echo) as server:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.geteuid()
        [result] = in_thread(server, [lambda: request(path, "backend", {
            "action": "drain", "address": " 198.19.0.11"}, timeout=5)])
        assert result == {"cmd": "backend", "args": {
            "action": "drain", "address": "198.19.0.11", "vip": None, "dry_run": False}}
    assert not os.path.exists(path)


def test_group_makes_it_0660(sockdir: str) -> None:
    path = os.path.join(sockdir, "g.sock")
    group = grp.getgrgid(os.getegid()).gr_name
    with ControlServer(path, echo, group=group):
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getegid()
    with ControlServer(path, echo, group=os.getegid(), mode=0o640):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    with ControlServer(path, echo, group=str(os.getegid())):  # a number, as the config has it
        assert os.stat(path).st_gid == os.getegid()
    with pytest.raises(KeyError):
        ControlServer(path, echo, group="no-such-group-here")
    assert not os.path.exists(path)


def test_handler_sees_the_peer(sockdir: str) -> None:
    path = os.path.join(sockdir, "p.sock")
    seen: list[dict[str, Any]] = []

    def handler(req: dict[str, Any]) -> Any:
        seen.append(req)
        return "ok"

    with ControlServer(path, handler) as server:
        s = connect(path)
        s.send(b'{"cmd": "status"}\n')
        assert read_lines(server, s, 1) == [{"ok": True, "result": "ok"}]
        s.close()
    assert seen == [{"cmd": "status", "args": {},
                     "peer": {"pid": os.getpid(), "uid": os.geteuid(), "gid": os.getegid()}}]


def test_many_concurrent_clients(sockdir: str) -> None:
    path = os.path.join(sockdir, "m.sock")
    with ControlServer(path, echo) as server:
        calls = [lambda i=i: request(path, "clients", {"action": "lookup",
                                                       "client": f"203.0.113.{i}"}, timeout=10)
                 for i in range(24)]
        results = in_thread(server, calls)
        assert [r["args"]["client"] for r in results] == [f"203.0.113.{i}" for i in range(24)]
        pump(server, lambda: server.connections == 0)


def test_partial_lines_and_pipelining(sockdir: str) -> None:
    path = os.path.join(sockdir, "b.sock")
    with ControlServer(path, echo) as server:
        s = connect(path)
        line = b'{"cmd": "reload", "args": {"dry_run": true}}\n'
        for i in range(len(line)):  # a byte at a time
            s.send(line[i:i + 1])
            poll(server, 0.001)
        # three requests in one write, the last split across two
        s.send(b'{"cmd":"status"}\n{"cmd":"reload"}\n{"cmd":"sta')
        poll(server, 0.01)
        s.send(b'tus"}\n')
        got = read_lines(server, s, 4)
        assert [r["result"]["cmd"] for r in got] == ["reload", "status", "reload", "status"]
        assert got[0]["result"]["args"] == {"dry_run": True}
        s.close()


@pytest.mark.parametrize("garbage, message", [
    (b"hello\n", "not JSON"),
    (b"\xff\xfe\xfd\n", "not"),
    (b"[]\n", "JSON object"),
    (b'{"cmd": "frobnicate"}\n', "unknown command"),
    (b'{"cmd": "backend", "args": {"action": "drain"}}\n', "'address' is required"),
])
def test_garbage_gets_an_error_and_the_connection_stays(sockdir: str, garbage: bytes,
                                                        message: str) -> None:
    path = os.path.join(sockdir, "x.sock")
    with ControlServer(path, echo) as server:
        s = connect(path)
        s.send(garbage + b'\n \n{"cmd": "status"}\n')  # blank lines are ignored
        bad, good = read_lines(server, s, 2)
        assert bad["ok"] is False and message in bad["error"]
        assert good == {"ok": True, "result": {"cmd": "status", "args": {}}}
        s.close()


def test_deep_nesting_gets_an_error_and_one_log_line(sockdir: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    path = os.path.join(sockdir, "deep.sock")
    with ControlServer(path, echo) as server, caplog.at_level("DEBUG", "loaded.control"):
        s = connect(path)
        s.send(b"[" * 60000 + b'\n{"cmd": "status"}\n')
        bad, good = read_lines(server, s, 2)
        assert bad["ok"] is False and "nested" in bad["error"]
        assert good["ok"] is True
        s.close()
    # Garbage is the peer's problem: no traceback in the daemon's log.
    assert all(r.exc_info is None for r in caplog.records)
    assert all("\n" not in r.getMessage() for r in caplog.records)


def test_any_decoder_failure_is_an_answer(sockdir: str, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    import loaded.control.server as server_module

    def broken(line: bytes) -> dict[str, Any]:
        raise RuntimeError("a bug\nover lines")

    monkeypatch.setattr(server_module, "decode_request", broken)
    path = os.path.join(sockdir, "bug.sock")
    with ControlServer(path, echo) as server, caplog.at_level("DEBUG", "loaded.control"):
        s = connect(path)
        s.send(b'{"cmd": "status"}\n{"cmd": "status"}\n')
        assert read_lines(server, s, 2) == [{"ok": False, "error": "malformed request"}] * 2
        s.close()
    assert [r.exc_info for r in caplog.records] == [None, None]
    assert all("\n" not in r.getMessage() for r in caplog.records)


def test_oversized_request_is_refused_and_closed(sockdir: str) -> None:
    path = os.path.join(sockdir, "o.sock")
    with ControlServer(path, echo, max_request=1024) as server:
        s = connect(path)
        s.setblocking(True)
        s.sendall(b'{"cmd": "status", "args": {"x": "' + b"a" * 5000)
        s.setblocking(False)
        [resp] = read_lines(server, s, 1)
        assert resp == {"ok": False, "error": "request longer than 1024 bytes"}
        assert closed(server, s)
        # a line of exactly the limit is fine
        s = connect(path)
        line = b'{"cmd":"status"}'
        s.send(line + b" " * (1024 - len(line)) + b"\n")
        assert read_lines(server, s, 1)[0]["ok"] is True
        # one byte more is not, even with its newline in the same write
        s2 = connect(path)
        s2.send(line + b" " * (1025 - len(line)) + b"\n")
        assert read_lines(server, s2, 1)[0]["error"] == "request longer than 1024 bytes"
        assert closed(server, s2)
        s.close()


def test_last_line_without_newline_at_eof(sockdir: str) -> None:
    path = os.path.join(sockdir, "e.sock")
    with ControlServer(path, echo) as server:
        s = connect(path)
        s.send(b'{"cmd": "status"}\n{"cmd": "reload"}')
        s.shutdown(socket.SHUT_WR)
        got = read_lines(server, s, 2)
        assert [r["result"]["cmd"] for r in got] == ["status", "reload"]
        assert closed(server, s)
        pump(server, lambda: server.connections == 0)


def test_handler_errors_become_error_responses(sockdir: str) -> None:
    path = os.path.join(sockdir, "h.sock")
    answers: dict[str, Callable[[], Any]] = {
        "status": lambda: (_ for _ in ()).throw(ValueError("bad value")),
        "reload": lambda: dict[str, int]()["missing"],
        "backend": lambda: 1 / 0,
        "clients": lambda: {"not json": {1, 2}},
    }

    def handler(req: dict[str, Any]) -> Any:
        return answers[req["cmd"]]()

    with ControlServer(path, handler) as server:
        s = connect(path)
        s.send(b'{"cmd":"status"}\n{"cmd":"reload"}\n'
               b'{"cmd":"backend","args":{"action":"drain","address":"198.19.0.11"}}\n'
               b'{"cmd":"clients","args":{"action":"list"}}\n')
        got = read_lines(server, s, 4)
        assert got[0] == {"ok": False, "error": "bad value"}
        assert got[1] == {"ok": False, "error": "missing"}
        assert got[2] == {"ok": False,
                          "error": "internal error: ZeroDivisionError: division by zero"}
        assert got[3]["ok"] is False and "not JSON" in got[3]["error"]
        s.close()
    answers["status"] = lambda: (_ for _ in ()).throw(ProtocolError("told you"))
    with ControlServer(path, handler) as server:
        [exc] = in_thread(server, [lambda: request(path, "status", timeout=5)])
    assert isinstance(exc, CommandFailed) and str(exc) == "told you"


def test_no_validation_passes_requests_as_they_are(sockdir: str) -> None:
    path = os.path.join(sockdir, "n.sock")
    with ControlServer(path, echo, validate=False) as server:
        [r] = in_thread(server, [lambda: request(path, "anything", {"x": 1}, timeout=5)])
        assert r == {"cmd": "anything", "args": {"x": 1}}


# --- deferred answers -------------------------------------------------------------------


def test_deferred_answers_in_order(sockdir: str) -> None:
    path = os.path.join(sockdir, "d.sock")
    waiting: list[Pending] = []

    def handler(req: dict[str, Any]) -> Any:
        if req["cmd"] == "status":
            p = Pending()
            waiting.append(p)
            return p
        return "now"

    with ControlServer(path, handler) as server:
        s = connect(path)
        s.send(b'{"cmd":"status"}\n{"cmd":"reload"}\n')
        pump(server, lambda: len(waiting) == 1)
        for _ in range(5):
            poll(server, 0.01)
        assert server.pending == [waiting[0].token]
        with pytest.raises(BlockingIOError):  # nothing yet: the second waits its turn
            s.recv(100)
        other = connect(path)  # meanwhile, another client is served
        other.send(b'{"cmd":"reload"}\n')
        assert read_lines(server, other, 1) == [{"ok": True, "result": "now"}]
        assert server.respond(waiting[0].token, {"workers": 2})
        assert not server.respond(waiting[0].token, "again")  # answered already
        assert read_lines(server, s, 2) == [{"ok": True, "result": {"workers": 2}},
                                            {"ok": True, "result": "now"}]
        s.send(b'{"cmd":"status"}\n')
        pump(server, lambda: len(waiting) == 2)
        assert server.fail(waiting[1].token, "worker 1 is gone")
        assert read_lines(server, s, 1) == [{"ok": False, "error": "worker 1 is gone"}]
        assert server.pending == []
        s.close()
        other.close()


def test_deferred_timeout(sockdir: str) -> None:
    path = os.path.join(sockdir, "t.sock")
    clock = Clock()

    def handler(req: dict[str, Any]) -> Any:
        if req["cmd"] == "status":
            return Pending(timeout=2.0)
        return Pending()  # the server's default timeout

    with ControlServer(path, handler, timeout=5.0, clock=clock) as server:
        s = connect(path)
        s.send(b'{"cmd":"status"}\n')
        pump(server, lambda: len(server.pending) == 1)
        token = server.pending[0]
        assert server.next_timeout() == 2.0
        clock.now += 1.9
        server.tick()
        assert server.pending == [token]
        clock.now += 0.1
        server.tick()
        assert read_lines(server, s, 1) == [
            {"ok": False, "error": "timed out after 2s waiting for the workers"}]
        assert not server.respond(token, "late")  # dropped
        s.send(b'{"cmd":"reload"}\n')
        pump(server, lambda: len(server.pending) == 1)
        clock.now += 4.9
        server.tick()
        assert len(server.pending) == 1
        clock.now += 0.1
        server.tick()
        assert read_lines(server, s, 1) == [
            {"ok": False, "error": "timed out after 5s waiting for the workers"}]
        s.close()


def test_client_gone_while_pending(sockdir: str) -> None:
    path = os.path.join(sockdir, "g.sock")
    with ControlServer(path, lambda req: Pending()) as server:
        s = connect(path)
        s.send(b'{"cmd":"status"}\n')
        pump(server, lambda: len(server.pending) == 1)
        token = server.pending[0]
        s.close()
        for _ in range(5):
            poll(server, 0.01)
        server.respond(token, "nobody listens")  # must not raise
        pump(server, lambda: server.connections == 0)
        assert server.pending == []


def test_idle_connections_are_closed(sockdir: str) -> None:
    path = os.path.join(sockdir, "i.sock")
    clock = Clock()
    with ControlServer(path, echo, idle_timeout=30.0, clock=clock) as server:
        s = connect(path)
        pump(server, lambda: server.connections == 1)
        assert server.next_timeout() == 30.0
        clock.now += 29.0
        server.tick()
        assert server.connections == 1
        clock.now += 1.0
        server.tick()
        assert server.connections == 0
        assert closed(server, s)
        assert server.next_timeout() is None


def test_too_many_clients(sockdir: str) -> None:
    path = os.path.join(sockdir, "c.sock")
    with ControlServer(path, echo, max_clients=2) as server:
        a, b = connect(path), connect(path)
        pump(server, lambda: server.connections == 2)
        c = connect(path)
        [resp] = read_lines(server, c, 1)
        assert resp == {"ok": False, "error": "too many control connections"}
        assert closed(server, c)
        a.send(b'{"cmd":"status"}\n')
        assert read_lines(server, a, 1)[0]["ok"] is True
        a.close()
        b.close()


def test_a_big_answer_goes_out_in_pieces(sockdir: str) -> None:
    path = os.path.join(sockdir, "big.sock")
    big = "x" * 3_000_000
    with ControlServer(path, lambda req: big) as server:
        s = connect(path)
        s.send(b'{"cmd":"status"}\n')
        pump(server, lambda: bool(server.write_fds()))  # the socket buffer is full
        got = read_lines(server, s, 1, timeout=20)
        assert got == [{"ok": True, "result": big}]
        s.close()


def test_never_raises_out_of_the_loop(sockdir: str) -> None:
    path = os.path.join(sockdir, "n.sock")
    with ControlServer(path, echo) as server:
        server.on_readable(12345)  # not ours
        server.on_writable(12345)
        s = connect(path)
        pump(server, lambda: server.connections == 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.send(b'{"cmd":"status"}\n')
        s.close()  # reset: the answer has nowhere to go
        pump(server, lambda: server.connections == 0)
        server.tick()


# --- the socket file --------------------------------------------------------------------


def test_stale_socket_is_replaced_live_one_refused(sockdir: str) -> None:
    path = os.path.join(sockdir, "s.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    with ControlServer(path, echo), pytest.raises(OSError, match="another daemon listens"):
        ControlServer(path, echo)
    with open(path, "w") as f:
        f.write("precious")
    with pytest.raises(OSError, match="not a socket"):
        ControlServer(path, echo)
    with open(path) as f:
        assert f.read() == "precious"


def test_close_removes_only_its_own_file(sockdir: str) -> None:
    path = os.path.join(sockdir, "own.sock")
    server = ControlServer(path, echo)
    os.unlink(path)
    with open(path, "w") as f:
        f.write("someone else's")
    server.close()
    assert os.path.exists(path)
    server.close()  # twice is fine


def test_creates_its_directory(sockdir: str) -> None:
    path = os.path.join(sockdir, "run", "loaded", "x.sock")
    with ControlServer(path, echo):
        assert os.path.exists(path)


# --- the client's errors ------------------------------------------------------------------


def test_client_no_socket(sockdir: str) -> None:
    path = os.path.join(sockdir, "none.sock")
    with pytest.raises(ControlError, match=r"no control socket at .*none\.sock: is the "
                                           r"daemon running"):
        request(path, "status")


def test_client_nobody_listens(sockdir: str) -> None:
    path = os.path.join(sockdir, "dead.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    try:
        with pytest.raises(ControlError, match=r"nobody listens on .*not running"):
            request(path, "status")
    finally:
        s.close()


def test_client_timeout(sockdir: str) -> None:
    path = os.path.join(sockdir, "slow.sock")
    with ControlServer(path, lambda req: Pending()):  # never driven: no answer
        t = time.monotonic()
        with pytest.raises(ControlError, match=r"no answer from the daemon within 0.3s"):
            request(path, "status", timeout=0.3)
        assert time.monotonic() - t < 2


def test_client_closed_without_answer(sockdir: str) -> None:
    path = os.path.join(sockdir, "rude.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def rude() -> None:
        conn, _ = listener.accept()
        conn.recv(100)
        conn.close()

    with ThreadPoolExecutor(1) as pool:
        f = pool.submit(rude)
        with pytest.raises(ControlError, match="closed the connection without answering"):
            request(path, "status", timeout=5)
        f.result()
    listener.close()


def test_client_error_answer(sockdir: str) -> None:
    path = os.path.join(sockdir, "err.sock")
    with ControlServer(path, echo) as server:
        [exc] = in_thread(server, [lambda: request(path, "bogus", timeout=5)])
        assert isinstance(exc, CommandFailed) and "unknown command 'bogus'" in str(exc)


def test_client_shows_the_full_servers_answer(sockdir: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # The server answers "too many" and closes before reading: the client's send
    # fails (EPIPE) but the answer is in its buffer, and that is what it must show.
    import loaded.control.server as server_module
    from loaded.control.server import MAX_CLIENTS

    path = os.path.join(sockdir, "full.sock")
    with ControlServer(path, echo) as server:
        idle = [connect(path) for _ in range(MAX_CLIENTS)]
        pump(server, lambda: server.connections == MAX_CLIENTS)
        encode = server_module.encode_request

        def late(cmd: str, args: Any = None) -> bytes:
            for _ in range(5):  # the server accepts, answers and closes first
                poll(server, 0.01)
            return encode(cmd, args)

        monkeypatch.setattr(server_module, "encode_request", late)
        with pytest.raises(CommandFailed, match="too many control connections"):
            request(path, "status", timeout=5)
        monkeypatch.undo()
        # and in whatever order things happen with the server in its own loop
        results = in_thread(server, [lambda: request(path, "status", timeout=5)] * 8)
        assert all(isinstance(r, CommandFailed) and "too many control connections" in str(r)
                   for r in results), results
        for s in idle:
            s.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")
def test_client_permission_denied(sockdir: str) -> None:
    path = os.path.join(sockdir, "root.sock")
    os.chmod(sockdir, 0o755)
    with ControlServer(path, echo):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                os.close(r)
                os.setgid(65534)
                os.setuid(65534)
                try:
                    request(path, "status", timeout=2)
                except ControlError as e:
                    os.write(w, str(e).encode())
                    code = 0
            finally:
                os._exit(code)
        os.close(w)
        _, status = os.waitpid(pid, 0)
        message = os.read(r, 1000).decode()
        os.close(r)
    assert os.WEXITSTATUS(status) == 0
    assert message == (f"permission denied on {path}: run as root, or as a member of "
                       f"the socket's group")


def test_a_client_that_does_not_read_is_not_buffered_without_end(sockdir: str) -> None:
    path = os.path.join(sockdir, "flood.sock")
    answer = "y" * 50_000
    handled: list[int] = []

    def handler(req: dict[str, Any]) -> Any:
        handled.append(1)
        return answer

    with ControlServer(path, handler) as server:
        s = connect(path)
        s.setblocking(True)
        s.sendall(b'{"cmd":"status"}\n' * 100)  # 1.7 KB of requests, 5 MB of answers
        s.setblocking(False)
        for _ in range(50):
            poll(server, 0.01)
        assert len(handled) < 50  # held back: about 1 MiB plus the socket buffer
        got = read_lines(server, s, 100, timeout=30)
        assert len(got) == 100 and all(r == {"ok": True, "result": answer} for r in got)
        assert len(handled) == 100
        s.close()
