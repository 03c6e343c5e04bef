"""HTTP status server: Prometheus metrics, JSON status and history, a status page.

:class:`StatusServer` serves, from a daemon thread (stdlib
``http.server.ThreadingHTTPServer``, one thread per connection, within the
bounds below):

``GET /metrics``
    Prometheus text format (OpenMetrics when the scraper asks for it) from a
    :class:`~loaded.control.metrics.StatusCollector` in a registry of its own.
``GET /api/status``
    ``get_status()`` (a ``loaded.core.status.Status``) as its ``to_json()``, the
    shape ``loaded status --json`` prints and the page reads.
``GET /api/history``
    Per-backend packet and byte rates over the last ``history_seconds``
    (default 10 minutes), sampled by the server itself every
    ``sample_interval`` seconds (default 1 s) in a thread of its own, so a page
    opened now shows the minutes before. Rates come from counter deltas; a
    counter that went down (a restart) counts from zero. Shape::

        {"interval": 1.0, "window": 600.0, "now": <unix time>,
         "samples": [{"t": <unix time>,
                      "backends": [{"vip": "198.18.1.100", "backend": "198.19.0.11",
                                    "packets_per_s": 12.0, "bytes_per_s": 980.0,
                                    "packets": 1234, "bytes": 99999}]}]}

``GET /`` (also ``/index.html``)
    The status page (``status_page.html`` beside this module: one file, inline
    CSS and JS, no external resource), which polls ``/api/status`` every second
    and seeds its chart from ``/api/history``.

``HEAD`` works on each of these; any other method is 405, any other path 404.
If ``get_status()`` raises, the answer is 503 with a one-line reason; the
server and sampler threads go on. ``get_status`` is called from several
threads at once (the sampler and one per request): it must be thread-safe,
which returning a fresh or immutable snapshot is.

Bounds. The server runs inside the supervisor, so no client may make it grow
or hold it: the stdlib server, which the Python documentation calls unfit for
production as it is, has neither bound, and a few hundred slow connections
were a few hundred threads.

- At most ``max_connections`` (default ``MAX_CONNECTIONS``, 32) connections
  are served at once, one thread each. One above that is answered ``503``
  (``Retry-After: 1``, ``Connection: close``) from the accepting thread,
  without blocking and without a thread of its own, and closed: the page and
  scrapers need a few connections, never dozens.
- A request line and its headers must arrive within ``request_timeout``
  (default ``REQUEST_TIMEOUT``, 5 s) in total, counted from the connection's
  start or the end of the previous response on a kept-alive one; past it the
  connection is closed. A timeout per ``recv`` alone (the socket's) would
  let a client that sends one byte every few seconds (slowloris) hold its
  thread for ever. The page polls every second, so keep-alive still works;
  a connection idle for longer is closed and the browser opens another.
- Sending an answer to a client that does not read gives up after
  ``SEND_TIMEOUT`` (10 s, the socket's timeout, total per write).
- ``stop()`` shuts the open connections down instead of waiting for them.

Requests have no body (GET and HEAD only; another method is answered and
the connection closed), so nothing is read past the headers.

IPv4 and IPv6 hosts both work (``"::"`` also accepts IPv4 where the kernel
allows); port 0 picks a free port, see :attr:`StatusServer.address`.
"""

from __future__ import annotations

import collections
import io
import ipaddress
import json
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from prometheus_client.exposition import choose_encoder

from loaded.control.metrics import StatusSource, make_registry
from loaded.core.status import Status

__all__ = ["History", "StatusServer"]

log = logging.getLogger("loaded.control")

PAGE_RESOURCE = "status_page.html"
PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")
ALLOWED = "GET, HEAD"
MAX_CONNECTIONS = 32
REQUEST_TIMEOUT = 5.0
SEND_TIMEOUT = 10.0
_FULL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
         b"Content-Length: 26\r\nRetry-After: 1\r\nConnection: close\r\n"
         b"Cache-Control: no-store\r\n\r\ntoo many connections, retry\n")


def _short(exc: BaseException, limit: int = 200) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("\r", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


class History:
    """A ring buffer of per-backend packet/byte rates, one sample per :meth:`add`.

    The first time a backend is seen only sets its baseline; from the next
    sample on it has rates. ``window`` seconds of samples are kept (at most
    ``window / interval + 1`` of them).
    """

    def __init__(self, window: float = 600.0, interval: float = 1.0) -> None:
        if window <= 0 or interval <= 0:
            raise ValueError("window and interval must be positive")
        self.window = float(window)
        self.interval = float(interval)
        self._samples: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=int(window / interval) + 1)
        self._last: dict[tuple[str, str], tuple[float, float, float]] = {}
        self._lock = threading.Lock()

    def add(self, status: Status, wall: float, mono: float) -> None:
        """Record one snapshot taken at unix time ``wall``, monotonic time ``mono``."""
        rates: list[dict[str, Any]] = []
        seen: dict[tuple[str, str], tuple[float, float, float]] = {}
        for service in status.services:
            vip = service.vip
            for backend in service.backends:
                address = backend.address
                packets, octets = float(backend.packets), float(backend.bytes)
                key = (vip, address)
                seen[key] = (mono, packets, octets)
                before = self._last.get(key)
                if before is None or mono <= before[0]:
                    continue
                dt = mono - before[0]
                dp = packets - before[1] if packets >= before[1] else packets
                db = octets - before[2] if octets >= before[2] else octets
                rates.append({"vip": vip, "backend": address,
                              "packets_per_s": dp / dt, "bytes_per_s": db / dt,
                              "packets": int(packets), "bytes": int(octets)})
        with self._lock:
            self._last = seen
            if rates or self._samples:
                self._samples.append({"t": wall, "backends": rates})
            cutoff = wall - self.window
            while self._samples and self._samples[0]["t"] < cutoff:
                self._samples.popleft()

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """The JSON-ready history (``now`` defaults to the current unix time)."""
        with self._lock:
            samples = list(self._samples)
        return {"interval": self.interval, "window": self.window,
                "now": time.time() if now is None else now, "samples": samples}

    def __len__(self) -> int:
        with self._lock:
            return len(self._samples)


class _HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a per-instance address family, no FQDN lookup, and
    at most ``max_connections`` connections (threads) at once."""

    daemon_threads = True
    block_on_close = False  # stop() shuts connections down; it does not wait on clients
    allow_reuse_address = True
    request_queue_size = 64  # the default 5 drops SYNs (1 s retries) under a burst

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily,
                 owner: StatusServer, max_connections: int = MAX_CONNECTIONS) -> None:
        self.address_family = family
        self.owner = owner
        self._slots = threading.BoundedSemaphore(max_connections)
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        with self._open_lock:
            self._open.add(request)
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread: give the slot back here
            self._done(request)
            self.shutdown_request(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done(request)

    def _done(self, request: socket.socket) -> None:
        with self._open_lock:
            if request not in self._open:
                return
            self._open.discard(request)
        self._slots.release()

    def _refuse(self, sock: socket.socket) -> None:
        # On the accepting thread, which must never block: one non-blocking send
        # (a fresh socket's buffer has room), then close.
        try:
            sock.setblocking(False)
            # Take what the client already sent, so that closing does not reset
            # the connection before it reads the 503.
            try:
                sock.recv(65536)
            except OSError:
                pass
            sock.send(_FULL)
        except OSError:
            pass
        log.debug("event=http-refused reason=too-many-connections")
        self.shutdown_request(sock)

    def close_connections(self) -> None:
        """Shut every open connection down: their threads end at once."""
        with self._open_lock:
            conns = list(self._open)
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6 and self.server_address[0] in ("::", ""):
            try:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except OSError:
                pass
        # HTTPServer.server_bind would call socket.getfqdn (a DNS lookup): skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.socket.getsockname()[:2]
        self.server_name = str(host)
        self.server_port = int(port)


class _DeadlineReader(io.RawIOBase):
    """A socket's reading side that fails (TimeoutError) once ``deadline`` (monotonic)
    has passed, however the bytes trickle in: the total bound the socket's timeout,
    which is per ``recv``, does not give."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.deadline = time.monotonic() + REQUEST_TIMEOUT

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request not complete before its deadline")
        previous = self.sock.gettimeout()
        self.sock.settimeout(left if previous is None else min(left, previous))
        try:
            return self.sock.recv_into(buffer)
        finally:
            self.sock.settimeout(previous)


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = "loaded"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms stall
    timeout = SEND_TIMEOUT  # the socket's, per recv and per sendall

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the stdlib's file would keep the socket's descriptor open
        self._reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        # Every request line and its headers within request_timeout of the end of
        # the answer before (or of the connection's start).
        self._reader.deadline = time.monotonic() + self.server.owner.request_timeout
        super().handle_one_request()

    def parse_request(self) -> bool:
        # Every method but GET and HEAD gets 405 (not the default 501), and the
        # connection closes: a body we did not read must not pass for a request.
        if not super().parse_request():
            return False
        if self.command not in ("GET", "HEAD"):
            self.close_connection = True
            self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"method not allowed\n",
                       "text/plain; charset=utf-8", head=False,
                       extra={"Allow": ALLOWED, "Connection": "close"})
            return False
        return True

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("event=http-request client=%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def _dispatch(self, head: bool) -> None:
        owner = self.server.owner
        path = urlsplit(self.path).path
        try:
            if path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, owner.page, "text/html; charset=utf-8", head,
                           extra={"Content-Security-Policy": PAGE_CSP})
            elif path == "/metrics":
                self._metrics(head)
            elif path == "/api/status":
                self._json(lambda: owner.get_status().to_json(), head, status=True)
            elif path == "/api/history":
                self._json(owner.history.snapshot, head)
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8",
                           head)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # a bug here must not take the thread down unanswered
            log.warning("event=http-error path=%s error=%s", path, _short(e))
            try:
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error\n",
                           "text/plain; charset=utf-8", head)
            except OSError:
                self.close_connection = True

    def _unavailable(self, exc: BaseException, head: bool) -> None:
        # The page polls every second: warn once per outage, not once per request.
        owner = self.server.owner
        level = logging.DEBUG if owner.failing else logging.WARNING
        owner.failing = True
        log.log(level, "event=status-unavailable path=%s error=%s",
                urlsplit(self.path).path, _short(exc))
        body = f"status unavailable: {_short(exc)}\n".encode()
        self._send(HTTPStatus.SERVICE_UNAVAILABLE, body, "text/plain; charset=utf-8", head)

    def _metrics(self, head: bool) -> None:
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        try:
            body = encoder(self.server.owner.registry)
        except Exception as e:
            self._unavailable(e, head)
            return
        self.server.owner.failing = False
        self._send(HTTPStatus.OK, body, content_type, head)

    def _json(self, source: Callable[[], Any], head: bool, status: bool = False) -> None:
        try:
            data = source()
            body = json.dumps(data, allow_nan=False, default=str,
                              separators=(",", ":")).encode()
        except Exception as e:
            self._unavailable(e, head)
            return
        if status:
            self.server.owner.failing = False
        self._send(HTTPStatus.OK, body, "application/json", head)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, head: bool,
              extra: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)


def _family(host: str, port: int) -> tuple[socket.AddressFamily, str]:
    """Address family and literal address to bind for ``host`` (IP or name)."""
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "":
        return socket.AF_INET, ""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        info = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
        if not info:
            raise OSError(f"cannot resolve {host!r}") from None
        family, _, _, _, sockaddr = info[0]
        return socket.AddressFamily(family), str(sockaddr[0])
    return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET), str(ip)


def _load_page() -> bytes:
    """The status page; a one-line stand-in (and a warning) if it was not installed."""
    try:
        return resources.files("loaded.control").joinpath(PAGE_RESOURCE).read_bytes()
    except OSError as e:
        log.warning("event=status-page-missing error=%s", _short(e))
        return (b"<!DOCTYPE html><title>loaded</title><p>The status page is not installed; "
                b"see <a href=\"metrics\">metrics</a> and "
                b"<a href=\"api/status\">api/status</a>.</p>\n")


class StatusServer:
    """Serve metrics, status JSON, history and the status page for ``get_status``.

    ``start()`` binds and starts the server and sampler threads (daemon
    threads); ``stop()`` ends both and closes the socket. Usable as a context
    manager.
    """

    def __init__(self, host: str, port: int, get_status: StatusSource, *,
                 sample_interval: float = 1.0, history_seconds: float = 600.0,
                 max_connections: int = MAX_CONNECTIONS,
                 request_timeout: float = REQUEST_TIMEOUT) -> None:
        if max_connections < 1 or request_timeout <= 0:
            raise ValueError("max_connections and request_timeout must be positive")
        self.host = host
        self.port = port
        self.max_connections = int(max_connections)
        self.request_timeout = float(request_timeout)
        self.get_status = get_status
        self.sample_interval = float(sample_interval)
        self.history = History(window=history_seconds, interval=sample_interval)
        self.registry = make_registry(get_status)
        self.page = _load_page()
        self._httpd: _HTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self.failing = False  # the last get_status() for a request raised (logging only)

    @property
    def address(self) -> tuple[str, int]:
        """The bound host and port (the real port when 0 was asked); after start()."""
        if self._httpd is None:
            raise RuntimeError("StatusServer is not started")
        host, port = self._httpd.socket.getsockname()[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        """``http://host:port`` of the bound socket (IPv6 in brackets)."""
        host, port = self.address
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}"

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def fileno(self) -> int:
        """The listening socket (-1 when stopped): a forked child closes it."""
        return -1 if self._httpd is None else self._httpd.socket.fileno()

    def start(self) -> None:
        if self._httpd is not None:
            raise RuntimeError("StatusServer already started")
        family, host = _family(self.host, self.port)
        httpd = _HTTPServer((host, self.port), family, self, self.max_connections)
        self._httpd = httpd
        self._stopping.clear()
        self._threads = [
            threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                             name="loaded-status-http", daemon=True),
            threading.Thread(target=self._sample_loop, name="loaded-status-sampler",
                             daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        log.info("event=status-server-started address=%s", self.url)

    def stop(self) -> None:
        httpd = self._httpd
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        httpd.close_connections()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []
        self._httpd = None

    def sample(self) -> None:
        """Take one history sample now (the sampler thread calls this every interval)."""
        self.history.add(self.get_status(), time.time(), time.monotonic())

    def _sample_loop(self) -> None:
        failing = False
        next_at = time.monotonic()
        while not self._stopping.is_set():
            try:
                self.sample()
                failing = False
            except Exception as e:
                if not failing:  # log the first of a run of failures only
                    log.warning("event=status-sample-failed error=%s", _short(e))
                failing = True
            next_at += self.sample_interval
            delay = next_at - time.monotonic()
            if delay < 0:  # fell behind (slow get_status): skip, do not burst
                next_at = time.monotonic()
                delay = 0.0
            self._stopping.wait(delay)

    def __enter__(self) -> StatusServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
