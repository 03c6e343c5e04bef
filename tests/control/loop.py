"""The supervisor's way of running a ``ControlServer``, for tests that have no
supervisor: one ``select`` over the server's descriptors, then ``on_ready``, as
``loaded.daemon.supervisor`` does."""

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
    server.on_ready(readable, writable)
