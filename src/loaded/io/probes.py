"""Health probes and the runner that drives ``loaded.core.health`` with them.

Thin asyncio I/O: each probe opens its own socket, is bounded by its timeout,
and turns whatever happens into a ``CheckResult`` with a short, stable reason
(it never raises for a network failure). The decisions (rise/fall, schedule,
what discovery may add) are all in the pure ``HealthMonitor``.

Checks
======

``tcp``
    Connect to the port; success when the handshake completes. Closed with a
    reset (SO_LINGER 0), as HAProxy does, so that a thousand checks every two
    seconds leave no TIME_WAIT sockets behind.
``http``, ``https``
    ``GET path HTTP/1.1`` with ``Host`` and ``Connection: close``; success when
    the status is the expected one, else the reason is ``status N``. TLS is not
    verified: the check asks whether the service answers, not who it is.
``udp``
    A connected UDP socket sends the payload. An ICMP port unreachable that
    comes back is ``refused``. With a payload, only a reply is a success
    (``timeout`` otherwise). With no payload (the default) an empty datagram
    is sent, and success means *no error within the timeout*: a UDP service
    without a known application protocol owes no reply, so the only failure
    that can be seen is the host's "port unreachable" (or the host itself
    being unreachable). This is the usual meaning of a bare UDP check; it
    cannot tell a dead host that sends no ICMP error (a firewall dropping)
    from a live service. Use ``icmp`` besides, or a payload the service
    answers, where that matters.
``icmp``
    An ICMP or ICMPv6 echo on a raw socket, matched by identifier and
    sequence; needs CAP_NET_RAW. The socket is connected to the target and
    filters all but echo replies, so a thousand concurrent probes do not each
    see every reply.

Reasons: ``ok``, ``timeout``, ``refused``, ``unreachable``, ``reset``,
``status N``, ``error: <what>`` (an errno name such as ``error: EACCES``, or
``error: tls``, ``error: bad response``...).

Discovery (``discover``) pings the IPv4 broadcast address, or ICMPv6
all-nodes (ff02::1) on the private interface, and collects the source of every
matching echo reply for the given time.

Sockets come from a factory (default ``socket.socket``), so that the lab can
run probes inside a network namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from ipaddress import IPv6Address

from loaded.core.checksum import checksum
from loaded.core.health import (
    CheckResult,
    Discover,
    DiscoveryFailed,
    Event,
    HealthMonitor,
    HostRemoved,
    Probe,
    StateChanged,
    TargetStatus,
    describe,
)
from loaded.core.pool import IPAddress

__all__ = [
    "HealthRunner",
    "SocketFactory",
    "describe",
    "discover",
    "http_get",
    "icmp_echo",
    "run_probe",
    "tcp_connect",
    "udp_probe",
]

log = logging.getLogger("loaded.health")

SocketFactory = Callable[[int, int, int], socket.socket]

ICMP_ECHO_REQUEST = 8
ICMP_ECHO_REPLY = 0
ICMP6_ECHO_REQUEST = 128
ICMP6_ECHO_REPLY = 129
SOL_RAW = 255
ICMP_FILTER = 1  # <linux/icmp.h>, level SOL_RAW
ICMP6_FILTER = 1  # <linux/icmpv6.h>, level IPPROTO_ICMPV6
SIOCGIFINDEX = 0x8933
IP_RECVERR = 11
IPV6_RECVERR = 25
MAX_HTTP_STATUS_LINE = 8192
USER_AGENT = "loaded-health-check"

_UNREACHABLE = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN,
                          errno.ENETDOWN})
_RESET = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED})
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-9][0-9]{2})(?:[ \t][^\r\n]*)?\r?\n")


def _reason(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timeout"
    if isinstance(e, ssl.SSLError):
        return f"error: tls {e.reason or type(e).__name__}".rstrip()
    # asyncio raises some of these without an errno ("Connection lost").
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return "reset"
    if isinstance(e, OSError) and e.errno is not None:
        if e.errno == errno.ECONNREFUSED:
            return "refused"
        if e.errno in _UNREACHABLE:
            return "unreachable"
        if e.errno in _RESET:
            return "reset"
        if e.errno == errno.ETIMEDOUT:
            return "timeout"
        return f"error: {errno.errorcode.get(e.errno, str(e.errno))}"
    if isinstance(e, asyncio.IncompleteReadError | EOFError):
        return "reset"
    return f"error: {type(e).__name__}"


def _family(addr: IPAddress) -> int:
    return socket.AF_INET if addr.version == 4 else socket.AF_INET6


def _sockaddr(addr: IPAddress, port: int, scope: int = 0) -> tuple[str, int] | tuple[
        str, int, int, int]:
    if addr.version == 4:
        return (str(addr), port)
    return (str(addr), port, 0, scope)


def _socket(factory: SocketFactory | None, family: int, type: int, proto: int = 0
            ) -> socket.socket:
    sock = (factory or socket.socket)(family, type, proto)
    sock.setblocking(False)
    return sock


def _elapsed(loop: asyncio.AbstractEventLoop, start: float) -> float:
    return loop.time() - start


def _linger0(sock: socket.socket) -> None:
    # Close with a reset: no TIME_WAIT left on the balancer per check.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# --------------------------------------------------------------------------
# Probes


async def run_probe(probe: Probe, socket_factory: SocketFactory | None = None) -> CheckResult:
    """Run ``probe``'s check against its backend; never raises for network errors."""
    c = probe.check
    if c.kind == "tcp":
        return await tcp_connect(probe.ip, c.port, c.timeout, socket_factory=socket_factory)
    if c.kind in ("http", "https"):
        return await http_get(probe.ip, c.port, c.http_path, c.http_status, c.timeout,
                              tls=c.kind == "https", socket_factory=socket_factory)
    if c.kind == "udp":
        return await udp_probe(probe.ip, c.port, c.udp_payload, c.timeout,
                               socket_factory=socket_factory)
    if c.kind == "icmp":
        return await icmp_echo(probe.ip, c.timeout, socket_factory=socket_factory)
    return CheckResult(True, "ok", 0.0)  # "none"


async def tcp_connect(addr: IPAddress, port: int, timeout: float, *,
                      socket_factory: SocketFactory | None = None) -> CheckResult:
    """Success when a TCP connection to ``addr``:``port`` is established."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        sock = _socket(socket_factory, _family(addr), socket.SOCK_STREAM)
    except OSError as e:
        return CheckResult(False, _reason(e), 0.0)
    try:
        _linger0(sock)
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, _sockaddr(addr, port))
        return CheckResult(True, "ok", _elapsed(loop, start))
    except (OSError, TimeoutError) as e:
        return CheckResult(False, _reason(e), _elapsed(loop, start))
    finally:
        sock.close()


def _tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


_TLS: ssl.SSLContext | None = None


def _host_header(addr: IPAddress, port: int, tls: bool) -> str:
    host = f"[{addr}]" if addr.version == 6 else str(addr)
    return host if port == (443 if tls else 80) else f"{host}:{port}"


async def http_get(addr: IPAddress, port: int, path: str = "/", expect_status: int = 200,
                   timeout: float = 1.0, tls: bool = False, *,
                   socket_factory: SocketFactory | None = None) -> CheckResult:
    """GET ``path``; success when the response's status is ``expect_status``.

    Only the status line is read; the connection is then reset, as the
    response body tells a health check nothing more.
    """
    global _TLS
    loop = asyncio.get_running_loop()
    start = loop.time()
    if not path.startswith("/") or any(not "!" <= c <= "~" for c in path):
        return CheckResult(False, "error: bad path", 0.0)
    try:
        sock = _socket(socket_factory, _family(addr), socket.SOCK_STREAM)
    except OSError as e:
        return CheckResult(False, _reason(e), 0.0)
    writer: asyncio.StreamWriter | None = None
    try:
        _linger0(sock)
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, _sockaddr(addr, port))
            if tls and _TLS is None:
                _TLS = _tls_context()
            reader, writer = await asyncio.open_connection(
                sock=sock, ssl=_TLS if tls else None,
                server_hostname="" if tls else None, limit=MAX_HTTP_STATUS_LINE)
            request = (f"GET {path} HTTP/1.1\r\nHost: {_host_header(addr, port, tls)}\r\n"
                       f"User-Agent: {USER_AGENT}\r\nAccept: */*\r\n"
                       f"Connection: close\r\n\r\n")
            writer.write(request.encode("ascii"))
            await writer.drain()
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as e:
                if not e.partial:
                    return CheckResult(False, "reset", _elapsed(loop, start))
                line = e.partial
            except asyncio.LimitOverrunError:
                return CheckResult(False, "error: bad response", _elapsed(loop, start))
        m = _STATUS_LINE.fullmatch(line)
        if m is None:
            return CheckResult(False, "error: bad response", _elapsed(loop, start))
        status = int(m.group(1))
        if status != expect_status:
            return CheckResult(False, f"status {status}", _elapsed(loop, start))
        return CheckResult(True, "ok", _elapsed(loop, start))
    except (OSError, TimeoutError, EOFError) as e:
        return CheckResult(False, _reason(e), _elapsed(loop, start))
    finally:
        if writer is not None:
            # abort, not close: no TLS close_notify exchange to wait for.
            writer.transport.abort()
        sock.close()


async def udp_probe(addr: IPAddress, port: int, payload: bytes, timeout: float, *,
                    socket_factory: SocketFactory | None = None) -> CheckResult:
    """Send ``payload`` (may be empty) from a connected UDP socket.

    A reply is a success; an ICMP port unreachable is ``refused``. Without a
    payload, silence for ``timeout`` seconds is a success too (see the module
    text); with one, silence is ``timeout``.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        sock = _socket(socket_factory, _family(addr), socket.SOCK_DGRAM)
    except OSError as e:
        return CheckResult(False, _reason(e), 0.0)
    try:
        sock.connect(_sockaddr(addr, port))
        async with asyncio.timeout(timeout):
            await loop.sock_sendall(sock, payload)
            await loop.sock_recv(sock, 65535)
        return CheckResult(True, "ok", _elapsed(loop, start))
    except TimeoutError:
        if payload:
            return CheckResult(False, "timeout", _elapsed(loop, start))
        return CheckResult(True, "ok", _elapsed(loop, start))
    except OSError as e:
        return CheckResult(False, _reason(e), _elapsed(loop, start))
    finally:
        sock.close()


def _echo_socket(factory: SocketFactory | None, family: int) -> socket.socket:
    if family == socket.AF_INET:
        sock = _socket(factory, family, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        try:
            # Bit set: type dropped. Keep only echo replies; errors about our
            # own echo still arrive through IP_RECVERR.
            sock.setsockopt(SOL_RAW, ICMP_FILTER,
                            struct.pack("I", ~(1 << ICMP_ECHO_REPLY) & 0xFFFFFFFF))
            sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        except BaseException:
            sock.close()
            raise
        return sock
    sock = _socket(factory, family, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    try:
        words = [0xFFFFFFFF] * 8
        words[ICMP6_ECHO_REPLY >> 5] &= ~(1 << (ICMP6_ECHO_REPLY & 31)) & 0xFFFFFFFF
        sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, struct.pack("8I", *words))
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def _echo_request(family: int, ident: int, seq: int, data: bytes) -> bytes:
    if family == socket.AF_INET:
        head = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq)
        csum = checksum(head + data)
        return struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, csum, ident, seq) + data
    # The kernel fills in the ICMPv6 checksum, which covers a pseudo-header.
    return struct.pack("!BBHHH", ICMP6_ECHO_REQUEST, 0, 0, ident, seq) + data


def _echo_reply(family: int, packet: bytes) -> tuple[int, int] | None:
    """(identifier, sequence) of an echo reply, or None for anything else."""
    if family == socket.AF_INET:
        # A raw IPv4 socket hands over the IP header too.
        if len(packet) < 20:
            return None
        packet = packet[(packet[0] & 0x0F) * 4:]
        want = ICMP_ECHO_REPLY
    else:
        want = ICMP6_ECHO_REPLY
    if len(packet) < 8 or packet[0] != want or packet[1] != 0:
        return None
    ident, seq = struct.unpack_from("!HH", packet, 4)
    return ident, seq


def _new_ident() -> tuple[int, int]:
    ident, seq = struct.unpack("!HH", os.urandom(4))
    return ident, seq


async def icmp_echo(addr: IPAddress, timeout: float, *,
                    socket_factory: SocketFactory | None = None) -> CheckResult:
    """One ICMP/ICMPv6 echo to ``addr``; success on the matching reply."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    family = _family(addr)
    try:
        sock = _echo_socket(socket_factory, family)
    except OSError as e:
        return CheckResult(False, _reason(e), 0.0)
    ident, seq = _new_ident()
    try:
        # Connected: the kernel gives this socket only packets from ``addr``.
        sock.connect(_sockaddr(addr, 0))
        async with asyncio.timeout(timeout):
            await loop.sock_sendall(sock, _echo_request(family, ident, seq, b"loaded"))
            while True:
                data = await loop.sock_recv(sock, 65535)
                if _echo_reply(family, data) == (ident, seq):
                    return CheckResult(True, "ok", _elapsed(loop, start))
    except (OSError, TimeoutError) as e:
        return CheckResult(False, _reason(e), _elapsed(loop, start))
    finally:
        sock.close()


def _ifindex(sock: socket.socket, ifname: str) -> int:
    """The index of ``ifname`` in the network namespace of ``sock`` (which need
    not be the caller's: ``socket.if_nametoindex`` would look in the caller's)."""
    req = struct.pack("16si20x", ifname.encode(), 0)
    res = fcntl.ioctl(sock.fileno(), SIOCGIFINDEX, req)
    index: int = struct.unpack_from("16si", res)[1]
    return index


async def discover(family: int, target: IPAddress, ifname: str | None, timeout: float, *,
                   source: IPAddress | None = None, sock: socket.socket | None = None,
                   socket_factory: SocketFactory | None = None) -> set[IPAddress]:
    """Ping ``target`` (the IPv4 broadcast address, or ff02::1 on ``ifname``)
    and return the source of every matching echo reply within ``timeout``.

    ``family`` is 4 or 6. ``sock``, if given, is a raw ICMP socket of that
    family that the caller made (in another namespace, say) and still owns;
    otherwise one is made with ``socket_factory``. ``source`` binds the
    request's source: for IPv6, a global address makes the hosts answer from
    their global addresses, where a link-local source would get link-local
    answers. Errors (no CAP_NET_RAW, no such interface) raise ``OSError``.
    """
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    if target.version != family:
        raise ValueError(f"{target} is not an IPv{family} address")
    own = sock is None
    s = _echo_socket(socket_factory, af) if sock is None else sock
    loop = asyncio.get_running_loop()
    try:
        if not own:
            s.setblocking(False)
            _filter_replies(s, af)
        if ifname is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
        if source is not None:
            s.bind(_sockaddr(source, 0))
        scope = 0
        if af == socket.AF_INET:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        else:
            if ifname is not None:
                scope = _ifindex(s, ifname)
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, scope)
            # Our own stack would answer too; it is not a backend.
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
        ident, seq = _new_ident()
        await loop.sock_sendto(s, _echo_request(af, ident, seq, b"loaded-discover"),
                               _sockaddr(target, 0, scope))
        found: set[IPAddress] = set()
        deadline = loop.time() + timeout
        while (left := deadline - loop.time()) > 0:
            try:
                async with asyncio.timeout(left):
                    data, addr = await loop.sock_recvfrom(s, 65535)
            except TimeoutError:
                break
            except OSError as e:
                # An ICMP error about the request (one host unreachable) says
                # nothing about the others: keep listening.
                if e.errno in _UNREACHABLE or e.errno == errno.ECONNREFUSED:
                    continue
                raise
            if _echo_reply(af, data) == (ident, seq):
                ip = ipaddress.ip_address(str(addr[0]).partition("%")[0])
                found.add(IPv6Address(ip.packed) if ip.version == 6 else ip)
        return found
    finally:
        if own:
            s.close()


def _filter_replies(sock: socket.socket, af: int) -> None:
    """Best effort on a socket made by the caller: the filter only saves work."""
    try:
        if af == socket.AF_INET:
            sock.setsockopt(SOL_RAW, ICMP_FILTER,
                            struct.pack("I", ~(1 << ICMP_ECHO_REPLY) & 0xFFFFFFFF))
        else:
            words = [0xFFFFFFFF] * 8
            words[ICMP6_ECHO_REPLY >> 5] &= ~(1 << (ICMP6_ECHO_REPLY & 31)) & 0xFFFFFFFF
            sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, struct.pack("8I", *words))
    except OSError:
        pass


# --------------------------------------------------------------------------
# The runner


ProbeFn = Callable[[Probe], Awaitable[CheckResult]]
DiscoverFn = Callable[[Discover], Awaitable[Iterable[IPAddress]]]


class HealthRunner:
    """Runs a ``HealthMonitor`` on an asyncio loop in a background thread.

    It starts the probes and discoveries the monitor asks for, all at once up
    to ``max_concurrent`` (each holds one socket), feeds their results back,
    and sleeps until the monitor's next deadline or a result. Every event is
    logged (logger ``loaded.health``, one ``describe`` line) and handed to
    ``on_event`` in the runner's thread: that function must be thread-safe
    and quick (queue the event, write to a pipe). An exception it raises is
    logged and does not stop the runner.

    The monitor must have been made with ``clock()`` as its ``now``, and after
    ``start`` belongs to the runner: read it through ``status``.
    """

    def __init__(self, monitor: HealthMonitor, on_event: Callable[[Event], None], *,
                 clock: Callable[[], float] = time.monotonic,
                 socket_factory: SocketFactory | None = None,
                 max_concurrent: int = 512,
                 probe: ProbeFn | None = None,
                 discover_fn: DiscoverFn | None = None,
                 name: str = "loaded-health") -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        self.monitor = monitor
        self.on_event = on_event
        self.clock = clock
        self.socket_factory = socket_factory
        self.max_concurrent = max_concurrent
        self._probe = probe or self._default_probe
        self._discover = discover_fn or self._default_discover
        self._name = name
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._ready = threading.Event()
        self.error: BaseException | None = None

    # -- control, from any thread

    def start(self) -> HealthRunner:
        if self._thread is not None:
            raise RuntimeError("already started")
        self._thread = threading.Thread(target=self._thread_main, name=self._name, daemon=True)
        self._thread.start()
        self._ready.wait()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel running probes, end the loop and join the thread."""
        thread, loop = self._thread, self._loop
        if thread is None:
            return
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(self._request_stop)
        thread.join(timeout)
        if thread.is_alive():
            log.warning("event=health-stop-timeout thread=%s", self._name)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def watch(self, vip: IPAddress, ip: IPAddress, up: bool = True) -> bool:
        with self._lock:
            added = self.monitor.watch(vip, ip, self.clock(), up=up)
        self._poke()
        return added

    def unwatch(self, vip: IPAddress, ip: IPAddress) -> bool:
        with self._lock:
            return self.monitor.unwatch(vip, ip)

    def _poke(self) -> None:
        """Wake the probe loop from another thread: a new target is due now."""
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(wake.set)

    def status(self) -> list[TargetStatus]:
        with self._lock:
            return self.monitor.status()

    def __enter__(self) -> HealthRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the loop thread

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as e:
            self.error = e
            log.exception("event=health-runner-failed")
        finally:
            self._ready.set()
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _request_stop(self) -> None:
        self._stopping = True
        if self._wake is not None:
            self._wake.set()

    async def _main(self) -> None:
        wake = self._wake = asyncio.Event()
        sem = asyncio.Semaphore(self.max_concurrent)
        tasks: set[asyncio.Task[None]] = set()
        self._ready.set()
        try:
            while not self._stopping:
                wake.clear()
                now = self.clock()
                with self._lock:
                    probes = self.monitor.due(now)
                    discoveries = self.monitor.due_discovery(now)
                    deadline = self.monitor.next_deadline(now)
                for p in probes:
                    self._spawn(tasks, self._one_probe(p, sem))
                for d in discoveries:
                    self._spawn(tasks, self._one_discovery(d))
                if probes or discoveries:
                    # Let them start before deciding how long to sleep.
                    await asyncio.sleep(0)
                    continue
                delay = None if deadline is None else max(0.0, deadline - self.clock())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await wake.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    def _spawn(tasks: set[asyncio.Task[None]], coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _one_probe(self, p: Probe, sem: asyncio.Semaphore) -> None:
        async with sem:
            try:
                result = await self._probe(p)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug in a probe must not lose the target
                log.exception("event=probe-failed backend=%s", p.ip)
                result = CheckResult(False, f"error: {type(e).__name__}", 0.0)
        with self._lock:
            events = self.monitor.result(p, result, self.clock())
        self._emit(events)

    async def _one_discovery(self, d: Discover) -> None:
        try:
            hosts = await self._discover(d)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            with self._lock:
                events = self.monitor.discovery_failed(d.vip, _reason(e), self.clock())
        else:
            with self._lock:
                events = self.monitor.discovered(d.vip, hosts, self.clock())
        self._emit(events)

    def _emit(self, events: list[Event]) -> None:
        if self._wake is not None:
            self._wake.set()  # a result may make an overdue probe due
        for e in events:
            bad = (isinstance(e, StateChanged) and not e.up) or isinstance(
                e, HostRemoved | DiscoveryFailed)
            log.log(logging.WARNING if bad else logging.INFO, "%s", describe(e))
            try:
                self.on_event(e)
            except Exception:
                log.exception("event=health-callback-failed")

    async def _default_probe(self, p: Probe) -> CheckResult:
        return await run_probe(p, self.socket_factory)

    async def _default_discover(self, d: Discover) -> set[IPAddress]:
        return await discover(d.family, d.target, d.ifname, d.timeout, source=d.source,
                              socket_factory=self.socket_factory)
