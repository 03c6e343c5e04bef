"""Backend test server: tells each client who answered and whom it saw.

    python -m loaded.lab.server --name b1 [--port 8080] [--udp-port 8080]

TCP: reads one line. ``BULK <n>`` -> the line ``"<name> <client-ip>\\n"`` then
n payload bytes; anything else -> that line only; then the connection closes.
UDP: every datagram is answered with ``"<name> <client-ip>\\n"``; one that
starts with ``ECHO`` gets the datagram itself after that line (a datagram
larger than the path MTU tests fragments on the way back).
Prints ``ready`` on stdout once both sockets listen; exits 0 on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import signal
import socket
import sys
from typing import cast

MAX_BULK = 1 << 30  # a typo in a test must not stream forever
READ_TIMEOUT = 10.0
CHUNK = 64 * 1024


def client_ip(peer: tuple[object, ...] | None) -> str:
    """Text form of the peer address; IPv4 clients on the dual-stack socket
    arrive as ::ffff:a.b.c.d and are reported as plain IPv4."""
    if not peer:
        return "?"
    addr = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def dual_stack_socket(kind: int, port: int) -> socket.socket:
    # asyncio's own listeners set IPV6_V6ONLY=1 on "::"; one socket with it
    # off serves both families through a single port.
    sock = socket.socket(socket.AF_INET6, kind)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("::", port))
    sock.setblocking(False)
    return sock


def payload_block(size: int) -> bytes:
    # A recognisable repeating pattern: corruption shows up in captures.
    pattern = bytes(range(32, 127))
    return (pattern * (size // len(pattern) + 1))[:size]


class Server:
    def __init__(self, name: str) -> None:
        self.name = name
        self.block = payload_block(CHUNK)

    def reply_line(self, peer: tuple[object, ...] | None) -> bytes:
        return f"{self.name} {client_ip(peer)}\n".encode()

    async def handle_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
            except (TimeoutError, ValueError):
                line = b""
            writer.write(self.reply_line(peer))
            words = line.split()
            if len(words) == 2 and words[0] == b"BULK" and words[1].isdigit():
                remaining = min(int(words[1]), MAX_BULK)
                while remaining > 0:
                    n = min(remaining, CHUNK)
                    writer.write(self.block[:n])
                    remaining -= n
                    await writer.drain()
            await writer.drain()
        except (ConnectionError, OSError):
            pass  # the client went away; nothing to report to it
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


class UDPEcho(asyncio.DatagramProtocol):
    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector transport only duck-types DatagramTransport on 3.11.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if self.transport is not None:
            echo = data if data.startswith(b"ECHO") else b""
            self.transport.sendto(self.server.reply_line(addr) + echo, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors for earlier replies: irrelevant to the next datagram


async def serve(name: str, port: int, udp_port: int | None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    srv = Server(name)
    tcp = await asyncio.start_server(
        srv.handle_tcp, sock=dual_stack_socket(socket.SOCK_STREAM, port)
    )
    udp_transport: asyncio.BaseTransport | None = None
    if udp_port is not None:
        udp_transport, _ = await loop.create_datagram_endpoint(
            lambda: UDPEcho(srv), sock=dual_stack_socket(socket.SOCK_DGRAM, udp_port)
        )
    print("ready", flush=True)
    try:
        await stop.wait()
    finally:
        tcp.close()
        if udp_transport is not None:
            udp_transport.close()
        # Do not wait for open connections (a stalled BULK could hold the
        # exit forever); the kernel resets them when the process exits.


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loaded.lab.server", description=__doc__)
    ap.add_argument("--name", required=True, help="name reported to clients, e.g. b1")
    ap.add_argument("--port", type=int, default=8080, help="TCP port (default 8080)")
    ap.add_argument(
        "--udp-port", type=int, default=None, help="UDP port (default: same as --port; 0 = off)"
    )
    args = ap.parse_args(argv)
    udp_port = args.port if args.udp_port is None else (args.udp_port or None)
    try:
        asyncio.run(serve(args.name, args.port, udp_port))
    except OSError as exc:
        print(f"server {args.name}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
