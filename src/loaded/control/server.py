"""The control socket's server, made to run inside the supervisor's ``select`` loop,
and the client the CLI uses.

Server rules:

- Nothing blocks and nothing raises out of ``on_readable``/``on_writable``/
  ``tick``: every socket is non-blocking, every failure of one connection
  closes that connection, every failure of a request is an error response.
- Requests are handled in the order they arrive on a connection, one at a
  time: the handler sees the next line only once the previous one is
  answered, so responses come back in order. Lines that arrive meanwhile are
  kept (reading stops while ``max_request`` bytes wait, and while 1 MiB of
  answers waits for a client that does not read them).
- The handler gets the checked request ``{"cmd", "args", "peer"}`` (``peer``:
  ``{"pid", "uid", "gid"}`` of the connecting process) and returns the
  ``result``, or raises (``ProtocolError``, ``ValueError``, ``KeyError``,
  ``LookupError``: their message is the error; anything else: "internal error",
  logged with its traceback), or returns a ``Pending`` for an answer that
  comes later (from the workers): the supervisor then calls
  ``respond(token, result)`` or ``fail(token, message)``. A pending request not
  answered within its timeout is answered with a timeout error; an answer that
  comes later is dropped (``respond`` returns False).
- A line longer than ``max_request`` gets an error response and the
  connection closes once it is sent. At end of input, a last line without a
  newline is still a request, and the connection closes once every answer is
  out. A connection with nothing going on for ``idle_timeout`` is closed; one
  above ``max_clients`` gets an error line and is closed.
- The socket file is created with ``mode`` (0600, or 0660 with a ``group``:
  a name, or a gid as a number or a string of digits)
  before the socket listens, so nobody connects through looser permissions.
  A stale socket file (nobody listens) is replaced; a live one, or a file that
  is not a socket, is an error (``OSError``). ``close`` removes the file only
  if it is still the one this server made.
"""

from __future__ import annotations

import errno
import grp
import itertools
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Callable, Mapping
from typing import Any

from loaded.control.protocol import (
    MAX_REQUEST,
    ControlError,
    ProtocolError,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    error,
    ok,
    validate_request,
)

__all__ = ["ControlServer", "Handler", "Pending", "request"]

log = logging.getLogger("loaded.control")

DEFAULT_TIMEOUT = 10.0
IDLE_TIMEOUT = 60.0
MAX_CLIENTS = 64
_RECV = 65536
OUTPUT_HIGH = 1 << 20  # answers waiting to be sent above which no further request is read
_CRED = struct.Struct("3i")
_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)

Handler = Callable[[dict[str, Any]], Any]

_tokens = itertools.count(1)


class Pending:
    """Returned by a handler whose answer comes later; ``token`` names it to
    ``ControlServer.respond``. ``timeout`` None: the server's default."""

    __slots__ = ("timeout", "token")

    def __init__(self, timeout: float | None = None) -> None:
        self.token = next(_tokens)
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"Pending({self.token})"


class _Conn:
    __slots__ = ("deadline", "eof", "inbuf", "last", "outbuf", "peer", "pending", "quit",
                 "sock")

    def __init__(self, sock: socket.socket, peer: dict[str, int], now: float) -> None:
        self.sock = sock
        self.peer = peer
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.pending: Pending | None = None
        self.deadline = 0.0  # of the pending request
        self.eof = False  # the peer sends nothing more
        self.quit = False  # close once outbuf is sent; read nothing more
        self.last = now


class ControlServer:
    def __init__(self, path: str, handler: Handler, *, mode: int | None = None,
                 group: str | int | None = None, max_request: int = MAX_REQUEST,
                 max_clients: int = MAX_CLIENTS, timeout: float = DEFAULT_TIMEOUT,
                 idle_timeout: float = IDLE_TIMEOUT, validate: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.handler = handler
        self.max_request = max_request
        self.max_clients = max_clients
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self.validate = validate
        self.clock = clock
        self._conns: dict[int, _Conn] = {}
        self._pending: dict[int, _Conn] = {}  # token -> connection
        self._listener = self._listen(path, 0o660 if mode is None and group is not None
                                      else 0o600 if mode is None else mode, group)
        self._ino = os.stat(path).st_ino

    # --- set-up ----------------------------------------------------------------

    @staticmethod
    def _listen(path: str, mode: int, group: str | int | None) -> socket.socket:
        gid = -1
        if isinstance(group, int) or (isinstance(group, str) and group.isdigit()):
            gid = int(group)
        elif group is not None:
            gid = grp.getgrnam(group).gr_gid  # KeyError: no such group
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        _remove_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            # Nobody can connect before listen(): the mode is right by then.
            os.chmod(path, mode)
            if gid >= 0:
                os.chown(path, -1, gid)
            sock.listen(64)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            try:
                os.unlink(path)
            except OSError:
                pass
            raise
        return sock

    def close(self) -> None:
        for conn in list(self._conns.values()):
            self._close(conn)
        if self._listener.fileno() >= 0:
            self._listener.close()
            try:
                if os.stat(self.path).st_ino == self._ino:
                    os.unlink(self.path)
            except OSError:
                pass

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- what the loop needs -------------------------------------------------------

    def fileno(self) -> int:
        """The listening socket."""
        return self._listener.fileno()

    def read_fds(self) -> list[int]:
        """Every descriptor to watch for reading: the listener and the connections."""
        fds = [self._listener.fileno()]
        for fd, conn in self._conns.items():
            if not (conn.eof or conn.quit or len(conn.inbuf) > self.max_request
                    or len(conn.outbuf) >= OUTPUT_HIGH):
                fds.append(fd)
        return fds

    def write_fds(self) -> list[int]:
        """The connections with an answer not yet sent in full."""
        return [fd for fd, conn in self._conns.items() if conn.outbuf]

    def next_timeout(self, now: float | None = None) -> float | None:
        """Seconds until ``tick`` has something to do, or None."""
        if not self._conns:
            return None
        now = self.clock() if now is None else now
        due = min(conn.deadline if conn.pending is not None else conn.last + self.idle_timeout
                  for conn in self._conns.values())
        return max(0.0, due - now)

    @property
    def connections(self) -> int:
        return len(self._conns)

    @property
    def pending(self) -> list[int]:
        """Tokens of the requests waiting for ``respond``."""
        return list(self._pending)

    def on_readable(self, fd: int) -> None:
        try:
            if fd == self._listener.fileno():
                self._accept()
                return
            conn = self._conns.get(fd)
            if conn is not None:
                self._read(conn)
        except Exception:  # never out of the loop
            log.exception("event=control-error fd=%d", fd)
            conn = self._conns.get(fd)
            if conn is not None:
                self._close(conn)

    def on_writable(self, fd: int) -> None:
        conn = self._conns.get(fd)
        if conn is None:
            return
        try:
            self._flush(conn)
            if not conn.outbuf:  # requests held back while the answers piled up
                self._process(conn)
        except Exception:
            log.exception("event=control-error fd=%d", fd)
            self._close(conn)

    def on_ready(self, readable: list[int], writable: list[int]) -> None:
        """After the owner's ``select`` (over ``read_fds`` and ``write_fds`` among its
        own descriptors): serve this server's ready descriptors, then ``tick``."""
        for fd in readable:
            if fd in self.read_fds():
                self.on_readable(fd)
        for fd in writable:
            if fd in self.write_fds():
                self.on_writable(fd)
        self.tick()

    def tick(self, now: float | None = None) -> None:
        """Answer pending requests past their timeout; close idle connections."""
        now = self.clock() if now is None else now
        for conn in list(self._conns.values()):
            try:
                if conn.pending is not None:
                    if now >= conn.deadline:
                        self._expire(conn)
                elif now - conn.last >= self.idle_timeout:
                    self._close(conn)
            except Exception:
                log.exception("event=control-error")
                self._close(conn)

    # --- deferred answers ---------------------------------------------------------

    def respond(self, token: int, result: Any) -> bool:
        """Answer the pending request ``token`` with ``result``; False when it is not
        pending any more (timed out, or its client went away)."""
        return self._complete(token, ok(result))

    def fail(self, token: int, message: str) -> bool:
        """Answer the pending request ``token`` with an error."""
        return self._complete(token, error(message))

    def _complete(self, token: int, response: dict[str, Any]) -> bool:
        conn = self._pending.pop(token, None)
        if conn is None:
            return False
        conn.pending = None
        conn.last = self.clock()
        try:
            self._send(conn, response)
            self._process(conn)
        except Exception:
            log.exception("event=control-error")
            self._close(conn)
        return True

    def _expire(self, conn: _Conn) -> None:
        p = conn.pending
        assert p is not None
        self._pending.pop(p.token, None)
        conn.pending = None
        conn.last = self.clock()
        waited = self.timeout if p.timeout is None else p.timeout
        response = error(f"timed out after {waited:g}s waiting for the workers")
        self._send(conn, response)
        self._process(conn)

    # --- connections ----------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: try again on the next round
                log.warning("event=control-accept-failed error=%s", e)
                return
            sock.setblocking(False)
            if len(self._conns) >= self.max_clients:
                try:
                    sock.send(encode_response(error("too many control connections")),
                              _SEND_FLAGS)
                except OSError:
                    pass
                sock.close()
                continue
            conn = _Conn(sock, _peer(sock), self.clock())
            self._conns[sock.fileno()] = conn

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(_RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        conn.last = self.clock()
        if data:
            conn.inbuf += data
        else:
            conn.eof = True
        self._process(conn)

    def _process(self, conn: _Conn) -> None:
        """Handle the complete lines waiting, one at a time, until one is pending."""
        while (conn.pending is None and not conn.quit and conn.sock.fileno() >= 0
               and len(conn.outbuf) < OUTPUT_HIGH):
            buf = conn.inbuf
            end = buf.find(b"\n", 0, self.max_request + 1)
            if end < 0:
                if len(buf) > self.max_request:
                    self._oversize(conn)
                    return
                if not (conn.eof and buf):
                    break
                end = len(buf)  # the last line, without its newline
            line = bytes(buf[:end])
            del buf[:end + 1]
            if line.strip():
                self._request(conn, line)
        if conn.eof and not conn.inbuf and conn.pending is None:
            conn.quit = True
        if conn.quit and not conn.outbuf and conn.pending is None:
            self._close(conn)

    def _oversize(self, conn: _Conn) -> None:
        conn.inbuf.clear()
        self._send(conn, error(f"request longer than {self.max_request} bytes"))
        conn.quit = True
        if not conn.outbuf:
            self._close(conn)

    def _request(self, conn: _Conn, line: bytes) -> None:
        try:
            req = decode_request(line)
            if self.validate:
                req = validate_request(req)
        except ProtocolError as e:
            self._send(conn, error(str(e)))
            return
        except Exception as e:  # a decoder bug: the peer still gets its one answer
            log.warning("event=control-bad-request error=%.200r", e)
            self._send(conn, error("malformed request"))
            return
        req["peer"] = dict(conn.peer)
        response = self._call(lambda: self.handler(req))
        if isinstance(response, Pending):
            conn.pending = response
            timeout = self.timeout if response.timeout is None else response.timeout
            conn.deadline = self.clock() + timeout
            self._pending[response.token] = conn
            return
        self._send(conn, response)

    @staticmethod
    def _call(fn: Callable[[], Any]) -> Any:
        """``fn()`` as a response (or the Pending it returns); never raises."""
        try:
            result = fn()
        except (ProtocolError, ValueError, LookupError) as e:
            message = e.args[0] if isinstance(e, KeyError) and e.args else e
            return error(str(message))
        except Exception as e:
            log.exception("event=control-handler-failed")
            return error(f"internal error: {type(e).__name__}: {e}")
        if isinstance(result, Pending):
            return result
        return ok(result)

    def _send(self, conn: _Conn, response: Mapping[str, Any]) -> None:
        try:
            data = encode_response(response)
        except (TypeError, ValueError) as e:
            log.error("event=control-bad-result error=%s", e)
            data = encode_response(error(f"internal error: the answer is not JSON: {e}"))
        conn.outbuf += data
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        while conn.outbuf:
            try:
                n = conn.sock.send(conn.outbuf, _SEND_FLAGS)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # the peer is gone
                self._close(conn)
                return
            del conn.outbuf[:n]
            conn.last = self.clock()
        if conn.quit and conn.pending is None:
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if fd >= 0:
            self._conns.pop(fd, None)
        else:  # already closed: find it by identity
            for k, c in list(self._conns.items()):
                if c is conn:
                    del self._conns[k]
        if conn.pending is not None:
            self._pending.pop(conn.pending.token, None)
            conn.pending = None
        conn.outbuf.clear()
        conn.quit = True
        try:
            conn.sock.close()
        except OSError:
            pass


def _peer(sock: socket.socket) -> dict[str, int]:
    try:
        pid, uid, gid = _CRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    except (OSError, AttributeError, struct.error):
        return {"pid": 0, "uid": -1, "gid": -1}
    return {"pid": pid, "uid": uid, "gid": gid}


def _remove_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        pass  # nobody listens: stale
    except OSError as e:
        raise OSError(errno.EADDRINUSE, f"{path}: cannot tell whether it is in use ({e})"
                      ) from e
    else:
        raise OSError(errno.EADDRINUSE, f"{path}: another daemon listens there")
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# --- the client -------------------------------------------------------------------


def request(path: str, cmd: str, args: Mapping[str, Any] | None = None,
            timeout: float = DEFAULT_TIMEOUT + 5.0) -> Any:
    """Send one request to the daemon at ``path`` and return its ``result``.

    ``CommandFailed`` when the daemon answers with an error, ``ControlError`` with
    a plain explanation when it cannot be asked (no socket, no permission,
    nobody listening, no answer in ``timeout`` seconds). An answer the daemon
    sent before closing counts even when sending the request failed: a daemon
    with too many connections says so and closes without reading.
    """
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise ControlError(f"no control socket at {path}: is the daemon running "
                               f"(with this config file)?") from None
        except PermissionError:
            raise ControlError(f"permission denied on {path}: run as root, or as a "
                               f"member of the socket's group") from None
        except ConnectionRefusedError:
            raise ControlError(f"nobody listens on {path}: the daemon is not running "
                               f"(the socket is left from an earlier run)") from None
        except TimeoutError:
            raise ControlError(f"{path}: the daemon does not accept connections "
                               f"(timed out after {timeout:g}s)") from None
        except OSError as e:
            raise ControlError(f"cannot connect to {path}: {e.strerror or e}") from None
        sent: OSError | None = None
        try:
            sock.sendall(encode_request(cmd, args))
        except TimeoutError:
            raise ControlError(f"no answer from the daemon within {timeout:g}s") from None
        except OSError as e:
            # A daemon that refuses the connection (too many of them) answers and
            # closes before it reads: that answer is what the user must see, and it
            # is still waiting in our buffer.
            sent = e
        try:
            buf = bytearray()
            while True:
                end = buf.find(b"\n")
                if end >= 0:
                    return decode_response(bytes(buf[:end]))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                data = sock.recv(_RECV)
                if not data:
                    if buf:
                        return decode_response(bytes(buf))
                    if sent is not None:
                        raise sent
                    raise ControlError("the daemon closed the connection without answering")
                buf += data
        except TimeoutError:
            raise ControlError(f"no answer from the daemon within {timeout:g}s") from None
        except OSError as e:
            cause = sent or e  # the send's error says more than the read's after it
            raise ControlError(f"lost the connection to the daemon: "
                               f"{cause.strerror or cause}") from None
    finally:
        sock.close()
