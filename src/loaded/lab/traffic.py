"""Client-side traffic helpers for the lab (IPv4 and IPv6).

Every call is bounded: `timeout` is a deadline for the whole exchange, not
per system call. With ``ns=`` the socket is created inside that network
namespace (typically ``lab.ns_cl``) and bound to the chosen client source
address, so the backend sees exactly that address.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import subprocess
import time
from dataclasses import dataclass

from .netns import netns_socket

DEFAULT_TIMEOUT = 5.0
MAX_LINE = 4096


def _family(address: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def _open(ns: str | None, src: str | None, dst: str, kind: int) -> socket.socket:
    family = _family(dst)
    sock = netns_socket(ns, family, kind)
    try:
        if src is not None:
            if _family(src) != family:
                raise ValueError(f"source {src} and destination {dst} differ in family")
            sock.bind((src, 0))
    except BaseException:
        sock.close()
        raise
    return sock


class _Deadline:
    def __init__(self, timeout: float) -> None:
        self.end = time.monotonic() + timeout

    def apply(self, sock: socket.socket) -> None:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline exceeded")
        sock.settimeout(left)


def _recv_line(sock: socket.socket, deadline: _Deadline) -> tuple[bytes, bytes]:
    """(line without newline, bytes received after it)."""
    buf = b""
    while b"\n" not in buf:
        deadline.apply(sock)
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_LINE and b"\n" not in buf:
            raise ValueError("reply line too long")
    line, _, rest = buf.partition(b"\n")
    return line, rest


def tcp_request(
    src: str | None,
    dst: str,
    port: int,
    payload: bytes = b"HELLO\n",
    timeout: float = DEFAULT_TIMEOUT,
    *,
    ns: str | None = None,
) -> str:
    """Connect from `src` to `dst`:`port`, send `payload`, return the reply line."""
    deadline = _Deadline(timeout)
    with _open(ns, src, dst, socket.SOCK_STREAM) as sock:
        deadline.apply(sock)
        sock.connect((dst, port))
        deadline.apply(sock)
        sock.sendall(payload)
        line, _ = _recv_line(sock, deadline)
    return line.decode(errors="replace")


def tcp_bulk(
    src: str | None,
    dst: str,
    port: int,
    nbytes: int,
    timeout: float = 20.0,
    *,
    ns: str | None = None,
) -> tuple[str, int]:
    """Ask for `nbytes` of payload; return (server's reply line, payload bytes
    received). A short count means the transfer broke (e.g. a PMTU black hole
    shows as a timeout instead)."""
    deadline = _Deadline(timeout)
    with _open(ns, src, dst, socket.SOCK_STREAM) as sock:
        deadline.apply(sock)
        sock.connect((dst, port))
        deadline.apply(sock)
        sock.sendall(f"BULK {nbytes}\n".encode())
        line, rest = _recv_line(sock, deadline)
        received = len(rest)
        while True:
            deadline.apply(sock)
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            received += len(chunk)
    return line.decode(errors="replace"), received


def udp_request(
    src: str | None,
    dst: str,
    port: int,
    timeout: float = DEFAULT_TIMEOUT,
    *,
    payload: bytes = b"HELLO\n",
    attempts: int = 1,
    ns: str | None = None,
) -> str:
    """Send one datagram (re-sent up to `attempts` times within `timeout`) and
    return the reply line. The socket is connected, so an ICMP port
    unreachable surfaces as ConnectionRefusedError and replies from any
    other address than `dst` are ignored by the kernel."""
    deadline = _Deadline(timeout)
    per_try = timeout / max(1, attempts)
    with _open(ns, src, dst, socket.SOCK_DGRAM) as sock:
        sock.connect((dst, port))
        for attempt in range(max(1, attempts)):
            sock.send(payload)
            try:
                left = deadline.end - time.monotonic()
                if left <= 0:
                    break
                sock.settimeout(min(per_try, left))
                data = sock.recv(65536)
            except TimeoutError:
                if attempt == attempts - 1:
                    raise
                continue
            return data.split(b"\n", 1)[0].decode(errors="replace")
    raise TimeoutError(f"no UDP reply from {dst}:{port}")


def udp_exchange(src: str | None, dst: str, port: int, payload: bytes,
                 timeout: float = DEFAULT_TIMEOUT, *, ns: str | None = None) -> bytes:
    """One datagram out, the whole reply datagram back (``udp_request`` keeps only
    its first line)."""
    with _open(ns, src, dst, socket.SOCK_DGRAM) as sock:
        sock.connect((dst, port))
        sock.settimeout(timeout)
        sock.send(payload)
        return sock.recv(65536)


@dataclass(frozen=True)
class PingResult:
    transmitted: int
    received: int
    returncode: int
    output: str

    @property
    def ok(self) -> bool:
        """Every echo answered."""
        return self.transmitted > 0 and self.received == self.transmitted


_PING_STATS = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")


def ping(
    ns: str,
    src: str | None,
    dst: str,
    count: int = 3,
    *,
    interval: float = 0.2,
    size: int | None = None,
    timeout: float | None = None,
) -> PingResult:
    """iputils `ping` from `src` inside namespace `ns`, bounded by `-w`.

    A raw ICMP socket would work too, but ping's own statistics are what an
    operator would look at, and it needs no privileges juggling here."""
    if count < 1:
        raise ValueError("count must be >= 1")
    deadline = timeout if timeout is not None else count * interval + 2.0
    argv = ["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", "1"]
    argv += ["-w", str(max(1, int(deadline + 0.999)))]
    if src is not None:
        argv += ["-I", src]
    if size is not None:
        argv += ["-s", str(size)]
    argv += ["-6" if _family(dst) == socket.AF_INET6 else "-4", dst]
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, *argv],
        capture_output=True,
        text=True,
        timeout=deadline + 5.0,
    )
    m = _PING_STATS.search(proc.stdout)
    tx, rx = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    return PingResult(tx, rx, proc.returncode, proc.stdout + proc.stderr)
