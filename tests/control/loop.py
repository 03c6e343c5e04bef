"""The supervisor's way of running a ``ControlServer``, for tests that have no
supervisor: one ``select`` over the server's descriptors, then its handlers and
``tick``, in the order ``loaded.daemon.supervisor`` calls them."""

from __future__ import annotations

import select

from loaded.control.server import ControlServer


def poll(server: ControlServer, timeout: float | None) -> None:
    wait = server.next_timeout()
    if timeout is not None:
        wait = timeout if wait is None else min(wait, timeout)
    try:
        readable, writable, _ = select.select(server.read_fds(), server.write_fds(), [], wait)
    except InterruptedError:
        readable, writable = [], []
    for fd in readable:
        if fd in server.read_fds():
            server.on_readable(fd)
    for fd in writable:
        server.on_writable(fd)
    server.tick()
