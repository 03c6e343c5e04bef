"""A bounded load for end-to-end tests: new TCP connections from several client
addresses in turn, each recorded with the backend that answered or the error."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from loaded.lab import traffic
from loaded.lab.topology import Lab


@dataclass
class Attempt:
    t: float
    client: str
    backend: str | None  # None: the connection failed
    error: str = ""


class Load:
    """Stops when told (``with`` block), after ``limit`` seconds or after
    ``max_requests``, whichever comes first."""

    def __init__(self, lab: Lab, vip: str, clients: list[str], port: int, *,
                 limit: float = 30.0, period: float = 0.02, timeout: float = 1.0,
                 max_requests: int = 20000) -> None:
        self.lab, self.vip, self.clients, self.port = lab, vip, clients, port
        self.limit, self.period, self.timeout = limit, period, timeout
        self.max_requests = max_requests
        self.attempts: list[Attempt] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)

    def _run(self) -> None:
        end = time.monotonic() + self.limit
        i = 0
        while not self._stop.is_set() and time.monotonic() < end and i < self.max_requests:
            c = self.clients[i % len(self.clients)]
            i += 1
            t = time.monotonic()
            try:
                line = traffic.tcp_request(c, self.vip, self.port, timeout=self.timeout,
                                           ns=self.lab.ns("cl"))
                self.attempts.append(Attempt(t, c, line.split()[0]))
            except (OSError, ValueError, IndexError) as e:
                self.attempts.append(Attempt(t, c, None, f"{type(e).__name__}: {e}"))
            time.sleep(self.period)

    def since(self, t: float) -> list[Attempt]:
        return [a for a in self.attempts if a.t >= t]

    @property
    def failures(self) -> list[Attempt]:
        return [a for a in self.attempts if a.backend is None]

    def backends_since(self, t: float) -> dict[str, set[str]]:
        """Per client, the backends that served it from ``t`` on."""
        out: dict[str, set[str]] = {}
        for a in self.since(t):
            if a.backend is not None:
                out.setdefault(a.client, set()).add(a.backend)
        return out
