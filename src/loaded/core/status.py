"""The status snapshot as values: what ``loaded status``, the metrics endpoint and
the status page show. Pure data.

``loaded.daemon.status.build_status`` makes one :class:`Status` from what the
supervisor knows; the metrics collector and the HTTP server read it as it is,
in the supervisor's process. Across a process boundary (the control socket,
``/api/status``) it travels as JSON: ``Status.to_json()`` there,
``Status.from_json()`` on the other side (the CLI), which gives the same
values back.

Rules
=====

- A snapshot is immutable (frozen dataclasses, tuples for lists); the HTTP
  server's threads read one while the supervisor builds the next.
- ``Status.from_json(s.to_json()) == s`` for every snapshot.
- The JSON is the shape the control protocol documents (``loaded.control.protocol``,
  command ``status``); the page (``status_page.html``) and the tests read it:

  =================  ========================================================
  JSON               value
  =================  ========================================================
  ``daemon``         :class:`DaemonInfo`
  ``services``       :class:`ServiceStatus` per VIP, backends :class:`BackendStatus`
                     (``last_check``: :class:`LastCheck`, null before a probe)
  ``workers``        :class:`WorkerStatus`; the counters of its :class:`WorkerReport`
                     in the same object, absent until the worker's first report
  ``kernel_queues``  :class:`QueueStatus` by queue number (a string in JSON)
  ``kernel_drops``   drops by reason; the key is absent on the per-packet path
  ``kernel_hash``    :class:`KernelHashStatus`; absent when the kernel has no hash
                     table
  ``endpoints``      name -> URL or socket path
  =================  ========================================================

- ``from_json`` raises :class:`StatusError` (a ValueError), and nothing else,
  for anything that is not such a snapshot: a missing key, a value of the wrong
  JSON type (a bool is not a number). Keys it does not know are ignored, so
  that a newer daemon may say more to an older command line.
- Times: ``started_at``, ``at`` are Unix time; ``uptime``, latencies seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BackendStatus",
    "DaemonInfo",
    "LastCheck",
    "Latency",
    "QueueStatus",
    "ServiceStatus",
    "Status",
    "StatusError",
    "WorkerReport",
    "WorkerStatus",
]


class StatusError(ValueError):
    """A status answer that is not a snapshot; the message says where and why."""


# --- reading JSON ---------------------------------------------------------------


def _name(value: object) -> str:
    return "null" if value is None else type(value).__name__


class _Reader:
    """Typed fields of one JSON object; ``where`` (``services[0].backends[1]``)
    goes into every error."""

    def __init__(self, value: object, where: str) -> None:
        if not isinstance(value, dict):
            raise StatusError(f"{where}: expected an object, got {_name(value)}")
        self.obj: dict[str, Any] = value
        self.where = where

    def _get(self, key: str) -> Any:
        try:
            return self.obj[key]
        except KeyError:
            raise StatusError(f"{self.where}: {key!r} is missing") from None

    def _bad(self, key: str, want: str, value: object) -> StatusError:
        return StatusError(f"{self.where}.{key}: expected {want}, got {_name(value)}")

    def integer(self, key: str) -> int:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, "an integer", value)
        return value

    def number(self, key: str) -> float:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._bad(key, "a number", value)
        return float(value)

    def text(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise self._bad(key, "a string", value)
        return value

    def flag(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            raise self._bad(key, "true or false", value)
        return value

    def optional_integer(self, key: str) -> int | None:
        return None if self._get(key) is None else self.integer(key)

    def child(self, key: str) -> _Reader:
        return _Reader(self._get(key), f"{self.where}.{key}")

    def optional_child(self, key: str) -> _Reader | None:
        return None if self._get(key) is None else self.child(key)

    def array(self, key: str) -> list[Any]:
        value = self._get(key)
        if not isinstance(value, list):
            raise self._bad(key, "a list", value)
        return value

    def items(self, key: str) -> list[_Reader]:
        """A list of objects."""
        return [_Reader(v, f"{self.where}.{key}[{i}]") for i, v in enumerate(self.array(key))]

    def counts(self, key: str) -> dict[str, int]:
        """An object of integers (drops by reason, and the like)."""
        inner = self.child(key)
        return {k: inner.integer(k) for k in inner.obj}


# --- the snapshot ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DaemonInfo:
    pid: int
    tag: str
    config: str
    version: str
    uptime: float
    started_at: float
    datapath: str

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "tag": self.tag, "config": self.config,
                "version": self.version, "uptime": self.uptime,
                "started_at": self.started_at, "datapath": self.datapath}

    @classmethod
    def _read(cls, r: _Reader) -> DaemonInfo:
        return cls(pid=r.integer("pid"), tag=r.text("tag"), config=r.text("config"),
                   version=r.text("version"), uptime=r.number("uptime"),
                   started_at=r.number("started_at"), datapath=r.text("datapath"))


@dataclass(frozen=True, slots=True)
class LastCheck:
    """A backend's latest health-probe result."""

    ok: bool
    detail: str
    at: float
    latency: float
    check: str  # which probe, as the health monitor names it ("tcp:80")

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail, "at": self.at,
                "latency": self.latency, "check": self.check}

    @classmethod
    def _read(cls, r: _Reader) -> LastCheck:
        return cls(ok=r.flag("ok"), detail=r.text("detail"), at=r.number("at"),
                   latency=r.number("latency"), check=r.text("check"))


@dataclass(frozen=True, slots=True)
class BackendStatus:
    address: str
    weight: int
    state: str  # what the workers do: up, draining, down
    mark: int | None  # the packet mark of its connections; None before a worker has it
    clients: int
    new_clients: int
    packets: int
    bytes: int
    admin: str  # what the operator asked: enabled, drain, disabled
    transitions: int
    health: str  # what the checks say: up, down, unknown
    last_check: LastCheck | None

    def to_json(self) -> dict[str, Any]:
        return {"address": self.address, "weight": self.weight, "state": self.state,
                "mark": self.mark, "clients": self.clients, "new_clients": self.new_clients,
                "packets": self.packets, "bytes": self.bytes, "admin": self.admin,
                "transitions": self.transitions, "health": self.health,
                "last_check": None if self.last_check is None else self.last_check.to_json()}

    @classmethod
    def _read(cls, r: _Reader) -> BackendStatus:
        check = r.optional_child("last_check")
        return cls(address=r.text("address"), weight=r.integer("weight"), state=r.text("state"),
                   mark=r.optional_integer("mark"), clients=r.integer("clients"),
                   new_clients=r.integer("new_clients"), packets=r.integer("packets"),
                   bytes=r.integer("bytes"), admin=r.text("admin"),
                   transitions=r.integer("transitions"), health=r.text("health"),
                   last_check=None if check is None else LastCheck._read(check))


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    """One VIP."""

    vip: str
    family: int  # 4 or 6
    strategy: str
    datapath: str
    clients: int
    client_table_max: int | None  # over all workers; None when not known
    backends: tuple[BackendStatus, ...]

    def to_json(self) -> dict[str, Any]:
        return {"vip": self.vip, "family": self.family, "strategy": self.strategy,
                "datapath": self.datapath, "clients": self.clients,
                "client_table_max": self.client_table_max,
                "backends": [b.to_json() for b in self.backends]}

    @classmethod
    def _read(cls, r: _Reader) -> ServiceStatus:
        return cls(vip=r.text("vip"), family=r.integer("family"), strategy=r.text("strategy"),
                   datapath=r.text("datapath"), clients=r.integer("clients"),
                   client_table_max=r.optional_integer("client_table_max"),
                   backends=tuple(BackendStatus._read(b) for b in r.items("backends")))


@dataclass(frozen=True, slots=True)
class Latency:
    """A worker's verdict-latency histogram: cumulative ``(upper bound, count)``
    buckets, bounds ascending, and the sum and count of all observations."""

    buckets: tuple[tuple[float, int], ...]
    sum: float
    count: int

    def to_json(self) -> dict[str, Any]:
        return {"buckets": [[bound, n] for bound, n in self.buckets], "sum": self.sum,
                "count": self.count}

    @classmethod
    def _read(cls, r: _Reader) -> Latency:
        buckets = []
        for i, pair in enumerate(r.array("buckets")):
            ok = (isinstance(pair, list) and len(pair) == 2
                  and all(isinstance(x, int | float) and not isinstance(x, bool) for x in pair)
                  and isinstance(pair[1], int))
            if not ok:
                raise StatusError(f"{r.where}.buckets[{i}]: expected [bound, count], "
                                  f"got {pair!r}")
            buckets.append((float(pair[0]), int(pair[1])))
        return cls(buckets=tuple(buckets), sum=r.number("sum"), count=r.integer("count"))


@dataclass(frozen=True, slots=True)
class WorkerReport:
    """A worker's own counters, from its latest report (``loaded.daemon.worker``)."""

    pid: int
    packets: int
    accepted: int
    dropped: int
    batches: int
    overruns: int
    truncated: int
    verdict_errors: Mapping[str, int]  # by errno
    refused: int
    cpu_seconds: float
    latency: Latency

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "packets": self.packets, "accepted": self.accepted,
                "dropped": self.dropped, "batches": self.batches, "overruns": self.overruns,
                "truncated": self.truncated, "verdict_errors": dict(self.verdict_errors),
                "refused": self.refused,
                "cpu_seconds": self.cpu_seconds, "latency": self.latency.to_json()}

    @classmethod
    def from_json(cls, value: object) -> WorkerReport:
        """A worker's report as it sends it (``Worker.snapshot()``); the supervisor
        reads it with the same decoder as the CLI the whole snapshot."""
        return cls._read(_Reader(value, "report"))

    @classmethod
    def _read(cls, r: _Reader) -> WorkerReport:
        return cls(pid=r.integer("pid"), packets=r.integer("packets"),
                   accepted=r.integer("accepted"),
                   dropped=r.integer("dropped"), batches=r.integer("batches"),
                   overruns=r.integer("overruns"), truncated=r.integer("truncated"),
                   verdict_errors=r.counts("verdict_errors"), refused=r.integer("refused"),
                   cpu_seconds=r.number("cpu_seconds"),
                   latency=Latency._read(r.child("latency")))


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """One worker as the supervisor sees it. ``report`` is None until the worker's
    first report, and again once it died (its restart reports anew)."""

    index: int
    queue: int
    alive: bool
    restarts: int
    drops: Mapping[str, int]  # by reason; empty without a report
    report: WorkerReport | None

    def to_json(self) -> dict[str, Any]:
        # Flat, as the supervisor always sent it: the report's keys beside the rest.
        out: dict[str, Any] = {"index": self.index, "queue": self.queue}
        if self.report is not None:
            out.update(self.report.to_json())
        out.update(drops=dict(self.drops), restarts=self.restarts, alive=self.alive)
        return out

    @classmethod
    def _read(cls, r: _Reader) -> WorkerStatus:
        return cls(index=r.integer("index"), queue=r.integer("queue"), alive=r.flag("alive"),
                   restarts=r.integer("restarts"), drops=r.counts("drops"),
                   report=WorkerReport._read(r) if "pid" in r.obj else None)


@dataclass(frozen=True, slots=True)
class QueueStatus:
    """One NFQUEUE as the kernel counts it (``/proc/net/netfilter/nfnetlink_queue``)."""

    portid: int
    waiting: int
    copy_mode: int
    copy_range: int
    queue_dropped: int
    user_dropped: int
    id_sequence: int

    def to_json(self) -> dict[str, int]:
        return {"portid": self.portid, "waiting": self.waiting, "copy_mode": self.copy_mode,
                "copy_range": self.copy_range, "queue_dropped": self.queue_dropped,
                "user_dropped": self.user_dropped, "id_sequence": self.id_sequence}

    @classmethod
    def _read(cls, r: _Reader) -> QueueStatus:
        return cls(portid=r.integer("portid"), waiting=r.integer("waiting"),
                   copy_mode=r.integer("copy_mode"), copy_range=r.integer("copy_range"),
                   queue_dropped=r.integer("queue_dropped"), user_dropped=r.integer("user_dropped"),
                   id_sequence=r.integer("id_sequence"))


@dataclass(frozen=True, slots=True)
class KernelHashStatus:
    """The kernel's hash table: whose table, whether it decides every new client
    (``decides``) or only those no worker took (``fallback``), and how many new
    connections it has given a bucket so far (``hashed``: it counts a lookup
    that found no backend too)."""

    strategy: str
    buckets: int
    seed: int
    decides: bool
    fallback: bool
    hashed: int

    def to_json(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "buckets": self.buckets, "seed": self.seed,
                "decides": self.decides, "fallback": self.fallback, "hashed": self.hashed}

    @classmethod
    def _read(cls, r: _Reader) -> KernelHashStatus:
        return cls(strategy=r.text("strategy"), buckets=r.integer("buckets"),
                   seed=r.integer("seed"), decides=r.flag("decides"),
                   fallback=r.flag("fallback"), hashed=r.integer("hashed"))


@dataclass(frozen=True, slots=True)
class Status:
    daemon: DaemonInfo
    services: tuple[ServiceStatus, ...]
    workers: tuple[WorkerStatus, ...]
    kernel_queues: Mapping[int, QueueStatus]
    endpoints: Mapping[str, str]
    kernel_drops: Mapping[str, int] | None = None  # None: the per-packet path counts none
    kernel_hash: KernelHashStatus | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "daemon": self.daemon.to_json(),
            "services": [s.to_json() for s in self.services],
            "workers": [w.to_json() for w in self.workers],
            "kernel_queues": {str(q): v.to_json() for q, v in self.kernel_queues.items()},
            "endpoints": dict(self.endpoints),
        }
        if self.kernel_drops is not None:
            out["kernel_drops"] = dict(self.kernel_drops)
        if self.kernel_hash is not None:
            out["kernel_hash"] = self.kernel_hash.to_json()
        return out

    @classmethod
    def from_json(cls, value: object) -> Status:
        """The snapshot ``value`` (parsed JSON) describes; else :class:`StatusError`."""
        r = _Reader(value, "status")
        # In the order of the JSON, so that the first error named is the first one.
        info = DaemonInfo._read(r.child("daemon"))
        services = tuple(ServiceStatus._read(s) for s in r.items("services"))
        workers = tuple(WorkerStatus._read(w) for w in r.items("workers"))
        queues = r.child("kernel_queues")
        kernel_queues = {}
        for key in queues.obj:
            if not (key.isascii() and key.isdigit()):
                raise StatusError(f"status.kernel_queues: {key!r} is not a queue number")
            kernel_queues[int(key)] = QueueStatus._read(queues.child(key))
        endpoints = r.child("endpoints")
        return cls(daemon=info, services=services, workers=workers,
                   kernel_queues=kernel_queues,
                   endpoints={k: endpoints.text(k) for k in endpoints.obj},
                   kernel_drops=r.counts("kernel_drops") if "kernel_drops" in r.obj else None,
                   kernel_hash=(KernelHashStatus._read(r.child("kernel_hash"))
                                if "kernel_hash" in r.obj else None))
