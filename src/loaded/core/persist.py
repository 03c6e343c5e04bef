"""Keeping the client tables across a restart. Pure: the caller reads and writes files.

A restarted daemon starts with empty client tables, so every client is
balanced anew (``sh`` and ``maglev`` land them where they were, the other
strategies do not). Dumping the tables before the stop and restoring them at
the start keeps every client with its backend.

Rules
=====

- A dump is a JSON-able dict::

      {"format": "loaded-clients", "version": 1, "written_at": <wall-clock seconds>,
       "services": {"<vip>": [["<client ip>", "<backend ip>", <idle seconds>], ...]}}

  ``idle`` is the least time the entry can have been idle when it was dumped
  (``ClientTable.ages``: the table keeps generations, not a time per entry).
  Only entries that are alive at the time of the dump are written.
- Every worker dumps its own engine; ``merge_dumps`` makes one dump of them
  all, taking the latest ``written_at`` and adding to each entry's idle time
  the time between its own dump and that one, so the merge loses nothing. A
  client found in two dumps keeps the entry idle for the shortest time.
- ``restore_tables`` skips the whole dump when it is older than ``max_age``
  (wall clock; a dump from the future counts as written now). Otherwise each
  entry is idle ``idle + age`` now and is restored when:

  - its VIP is a service of the engine (else ``no-service``),
  - ``accept(client)`` is true (else ``not-mine``: another worker's client),
  - the addresses parse and are of the VIP's family (else ``malformed``),
  - its backend is in the pool (else ``no-backend``) and serves existing
    clients: up or draining (else ``backend-down``),
  - it has been idle less than the table's ``idle_timeout`` (else ``expired``),
  - the client has no entry yet (else ``present``: live traffic got there
    first and wins),
  - the table has room (else ``full``).

  A restored entry counts as the backend's client from then on, in the
  generation it would be in had the daemon not stopped, so it expires as it
  would have. A malformed dump (not the format, not the version) raises
  ``ValueError``.
- The saved file wraps the workers' dumps (``saved_document``)::

      {"format": "loaded-saved-tables", "version": 1, "written_at": ...,
       "workers": <how many ran>, "indexes": [<worker index>, ...],
       "dumps": [<dump>, ...]}

  The daemon deletes or overwrites that path only when what is there is
  recognisably such a file (``is_saved_document``: the format marker, or the
  marker-less shape version 1 wrote). Anything else at that path is the
  operator's, whatever the config says: ``read_saved`` raises
  ``NotSavedTables`` and the caller leaves it alone.
"""

from __future__ import annotations

import ipaddress
import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from loaded.core.engine import Engine
from loaded.core.pool import Backend

__all__ = [
    "FORMAT",
    "SAVED_FORMAT",
    "VERSION",
    "NotSavedTables",
    "RestoreReport",
    "SavedTables",
    "dump_tables",
    "is_saved_document",
    "list_clients",
    "merge_dumps",
    "read_saved",
    "restore_tables",
    "saved_document",
]

FORMAT = "loaded-clients"
SAVED_FORMAT = "loaded-saved-tables"
VERSION = 1

Entry = list[Any]  # [client ip, backend ip, idle seconds]


class NotSavedTables(ValueError):
    """What is at the path is not a saved table of ours: leave it alone."""


@dataclass(frozen=True)
class SavedTables:
    workers: int | None
    indexes: list[int]
    dumps: list[dict[str, Any]]


def saved_document(dumps: list[dict[str, Any]], indexes: list[int], workers: int,
                   written_at: float) -> dict[str, Any]:
    return {"format": SAVED_FORMAT, "version": VERSION, "written_at": written_at,
            "workers": workers, "indexes": indexes, "dumps": dumps}


def is_saved_document(doc: object) -> bool:
    if not isinstance(doc, dict):
        return False
    if doc.get("format") == SAVED_FORMAT:
        return True
    # Written by version 1 before the marker: the same keys, nothing else.
    return (doc.get("format") is None and doc.get("version") == VERSION
            and set(doc) == {"version", "written_at", "workers", "indexes", "dumps"})


def read_saved(text: str | bytes) -> SavedTables:
    """The saved file's content; ``NotSavedTables`` when it is not ours, ``ValueError``
    when it is ours but unusable."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:  # bytes that do not decode included
        raise NotSavedTables(f"not a saved client table (not JSON: {e})") from None
    if not is_saved_document(doc):
        raise NotSavedTables("not a saved client table of loaded")
    dumps, indexes, workers = doc.get("dumps"), doc.get("indexes"), doc.get("workers")
    if (not isinstance(dumps, list) or not isinstance(indexes, list)
            or not all(isinstance(d, dict) for d in dumps)
            or not all(isinstance(i, int) for i in indexes)):
        raise ValueError("saved client table without valid dumps and indexes")
    return SavedTables(workers if isinstance(workers, int) else None, indexes, dumps)


@dataclass
class RestoreReport:
    restored: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    stale: bool = False  # the whole dump was older than max_age
    age: float = 0.0  # of the dump, seconds

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def to_json(self) -> dict[str, object]:
        return {"restored": self.restored, "skipped": dict(sorted(self.skipped.items())),
                "stale": self.stale, "age": self.age}


def _ip_str(packed: bytes) -> str:
    if len(packed) == 4:  # the common case, ten times quicker than ipaddress
        return f"{packed[0]}.{packed[1]}.{packed[2]}.{packed[3]}"
    return str(ipaddress.IPv6Address(packed))


def _packed(text: str) -> bytes:
    """The address ``text`` names, packed; ValueError when it names none. Dotted
    quads are read here (ipaddress's rules: four decimal octets, no leading zero),
    anything else by ipaddress."""
    parts = text.split(".")
    if len(parts) == 4:
        out = bytearray(4)
        for i, p in enumerate(parts):
            if not (p.isascii() and p.isdigit()) or len(p) > 3 or (p[0] == "0" and p != "0"):
                raise ValueError(f"{text!r} is not an IP address")
            v = int(p)
            if v > 255:
                raise ValueError(f"{text!r} is not an IP address")
            out[i] = v
        return bytes(out)
    return ipaddress.ip_address(text).packed


def dump_tables(engine: Engine, now_mono: float, now_wall: float) -> dict[str, Any]:
    """Every live client table entry of ``engine``; ``now_mono`` is the clock the
    engine runs on, ``now_wall`` the wall clock that dates the dump."""
    services: dict[str, list[Entry]] = {}
    for svc in engine.services:
        names: dict[Backend, str] = {}
        entries: list[Entry] = []
        for client, b, idle in svc.table.ages(now_mono):
            name = names.get(b)
            if name is None:
                name = names[b] = str(b.ip)
            entries.append([_ip_str(client), name, idle])
        services[str(svc.vip)] = entries
    return {"format": FORMAT, "version": VERSION, "written_at": float(now_wall),
            "services": services}


def _check(data: Mapping[str, Any]) -> None:
    if not isinstance(data, Mapping) or data.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} dump")
    if data.get("version") != VERSION:
        raise ValueError(f"{FORMAT} dump version {data.get('version')!r}, "
                         f"this daemon reads version {VERSION}")
    written = data.get("written_at")
    if isinstance(written, bool) or not isinstance(written, int | float):
        raise ValueError("dump without a valid written_at")
    if not isinstance(data.get("services"), Mapping):
        raise ValueError("dump without services")


def merge_dumps(dumps: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One dump of several (one per worker); see the module rules."""
    dumps = list(dumps)
    for d in dumps:
        _check(d)
    if not dumps:
        raise ValueError("nothing to merge")
    latest = max(float(d["written_at"]) for d in dumps)
    best: dict[str, dict[str, Entry]] = {}
    for d in dumps:
        shift = latest - float(d["written_at"])
        for vip, entries in d["services"].items():
            merged = best.setdefault(vip, {})
            for entry in entries:
                try:
                    client, backend, idle = entry
                    idle = float(idle) + shift
                except (TypeError, ValueError):
                    continue  # malformed entries are counted when restored, not merged
                prev = merged.get(client)
                if prev is None or idle < prev[2]:
                    merged[client] = [client, backend, idle]
    return {"format": FORMAT, "version": VERSION, "written_at": latest,
            "services": {vip: list(m.values()) for vip, m in best.items()}}


def restore_tables(engine: Engine, data: Mapping[str, Any], now_mono: float, now_wall: float,
                   max_age: float, accept: Callable[[bytes], bool] | None = None
                   ) -> RestoreReport:
    """Put the entries of a dump back into ``engine``'s tables; see the module rules."""
    _check(data)
    report = RestoreReport()
    age = now_wall - float(data["written_at"])
    report.age = max(0.0, age)
    services: Mapping[str, Any] = data["services"]
    if age > max_age:
        report.stale = True
        report.skipped["stale"] = sum(len(v) for v in services.values()
                                      if isinstance(v, list))
        return report
    age = report.age
    skipped = report.skipped
    by_vip = {str(svc.vip): svc for svc in engine.services}
    for vip_text, entries in services.items():
        if not isinstance(entries, list):
            continue
        try:
            svc = engine.service(ipaddress.ip_address(vip_text))
        except ValueError:
            svc = None
        if svc is None:
            svc = by_vip.get(vip_text)
        if svc is None:
            skipped["no-service"] += len(entries)
            continue
        table, pool = svc.table, svc.pool
        table.expire(now_mono)  # so that "present" means alive
        version = svc.version
        size = 4 if version == 4 else 16
        backends: dict[str, Backend | None] = {}
        for entry in entries:
            try:
                client_text, backend_text, idle = entry
                packed = _packed(client_text)
                idle = float(idle) + age
            except (TypeError, ValueError, AttributeError):
                skipped["malformed"] += 1
                continue
            if len(packed) != size or not idle >= 0:
                skipped["malformed"] += 1
                continue
            if accept is not None and not accept(packed):
                skipped["not-mine"] += 1
                continue
            if backend_text in backends:
                b = backends[backend_text]
            else:
                try:
                    bip = ipaddress.ip_address(backend_text)
                    b = pool.get(bip) if bip.version == version else None
                except ValueError:
                    b = None
                backends[backend_text] = b
            if b is None:
                skipped["no-backend"] += 1
            elif not b.serves_existing:
                skipped["backend-down"] += 1
            elif idle >= table.idle_timeout:
                skipped["expired"] += 1
            elif packed in table:
                skipped["present"] += 1
            elif table.restore(packed, b, idle, now_mono):
                report.restored += 1
            else:
                skipped["full"] += 1
    return report


def list_clients(engine: Engine, now: float, vip: str | None = None,
                 limit: int | None = None) -> list[dict[str, Any]]:
    """The live entries of each service (of ``vip`` only, when given), at most
    ``limit`` per service: ``[{"vip", "total", "clients": [[client, backend, idle]]}]``."""
    out: list[dict[str, Any]] = []
    want = None if vip is None else ipaddress.ip_address(vip)
    for svc in engine.services:
        if want is not None and svc.vip != want:
            continue
        entries: list[Entry] = []
        total = 0
        for client, b, idle in svc.table.ages(now):
            total += 1
            if limit is None or len(entries) < limit:
                entries.append([_ip_str(client), str(b.ip), idle])
        out.append({"vip": str(svc.vip), "total": total, "clients": entries})
    return out
