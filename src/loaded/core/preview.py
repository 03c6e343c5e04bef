"""Dry runs of pool commands: which clients a command would move. Pure.

``preview(engine, command, now)`` answers, for a pool command
(``loaded.core.commands``), what applying it at ``now`` would do to the clients
the engine's table holds, and changes nothing in the engine: the command is
applied to a scratch copy of the pool (so validation and semantics are
``Engine.apply``'s own), and the client table is only read.

Rules
=====

- The clients considered are the live entries of the VIP's table at ``now``
  (those ``expire(now)`` keeps) whose backend serves them now (up or
  draining). A client *moves* when its backend serves it before the command
  and does not after: the backend is removed, or goes down with ``cut``
  (``disable``), or is re-added with state down. Nothing else moves anybody
  at once: a backend that is added, gains or loses weight, comes up, or
  drains (state draining, or down without ``cut``) leaves every entry where
  it is, since entries stick while their backend serves them.
- Where a moving client goes: with a strategy that ``resteers`` (``sh``,
  ``maglev``) the table moves it at once to the backend the rebuilt hash
  table gives it, computed exactly here from the scratch pool (None when no
  backend is left); with the others (``rr``, ``wrr``, ``weighted``, ``lc``) it
  is dropped and balanced anew on its next packet (``to`` None), where depends
  on the order clients come back in.
- ``stay``: the clients of the command's backend that stay with it (all of
  them for a drain: they keep their backend until they go idle).
- ``rehashed`` (resteering strategies only): clients that stay with their
  backend now but whose hash, after the command, points elsewhere. They move
  when their entry is lost: after ``client_timeout`` of silence, a restart of
  their worker, or on another balancer. None for the other strategies.
- A command the engine would refuse raises what ``Engine.apply`` raises
  (``KeyError`` for an unknown VIP or backend, ``ValueError`` for a bad value;
  a command with a value out of range cannot be built at all).
- Previews of several workers add up with ``merge_previews``.
"""

from __future__ import annotations

import copy
import ipaddress
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from loaded.core.clients import ClientTable
from loaded.core.commands import PoolCommand
from loaded.core.engine import Engine, Service
from loaded.core.pool import Backend, IPAddress
from loaded.core.strategies import HashStrategy, make_strategy

__all__ = [
    "Move",
    "Preview",
    "lookup_client",
    "merge_previews",
    "preview",
]


@dataclass(frozen=True)
class Move:
    source: str  # backend the clients leave
    target: str | None  # backend they go to; None: balanced anew on their next packet
    clients: int

    def to_json(self) -> dict[str, object]:
        return {"from": self.source, "to": self.target, "clients": self.clients}


@dataclass(frozen=True)
class Preview:
    vip: str
    backend: str
    op: str
    strategy: str
    clients: int  # live clients of the VIP served now
    moves: tuple[Move, ...]
    stay: int
    rehashed: int | None
    state_after: str | None  # of the command's backend; None: removed
    accepts_new_after: bool

    @property
    def moved(self) -> int:
        return sum(m.clients for m in self.moves)

    def to_json(self) -> dict[str, object]:
        return {"vip": self.vip, "backend": self.backend, "op": self.op,
                "strategy": self.strategy, "clients": self.clients, "moved": self.moved,
                "moves": [m.to_json() for m in self.moves], "stay": self.stay,
                "rehashed": self.rehashed, "state_after": self.state_after,
                "accepts_new_after": self.accepts_new_after}


def _scratch(svc: Service, command: PoolCommand, now: float) -> Service:
    """A copy of ``svc``'s pool and strategy (no clients) with ``command`` applied."""
    pool = copy.deepcopy(svc.pool)
    old = svc.strategy
    strategy = (make_strategy(old.name, pool, table_size=old.table_size, hash_seed=old.seed)
                if isinstance(old, HashStrategy) else make_strategy(old.name, pool))
    table = ClientTable(pool, strategy, idle_timeout=svc.table.idle_timeout,
                        max_size=svc.table.max_size, now=now)
    scratch = Service(svc.vip, pool, strategy, table, svc.real_net)
    Engine([scratch]).apply(command, now)
    return scratch


def _service(engine: Engine, command: PoolCommand) -> Service:
    svc = engine.service(command.vip)
    if svc is None:
        raise KeyError(f"no service for VIP {command.vip}")
    return svc


def _compute(engine: Engine, command: PoolCommand, now: float, rehash: bool
             ) -> tuple[dict[bytes, tuple[IPAddress, IPAddress | None]], int, int, Service,
                        Service]:
    svc = _service(engine, command)
    scratch = _scratch(svc, command, now)
    after = scratch.pool
    choose = scratch.strategy.choose if svc.strategy.resteers else None
    served = 0
    rehashed = 0
    moves: dict[bytes, tuple[IPAddress, IPAddress | None]] = {}
    # Per backend of the live pool: does its copy after the command serve existing clients?
    keeps: dict[Backend, bool] = {}
    for b in svc.pool:
        copy_after = after.by_addr(b.addr)
        keeps[b] = copy_after is not None and copy_after.serves_existing
    for client, b, _ in svc.table.ages(now):
        if not b.serves_existing:
            continue  # already stale: it moves on its next packet, command or not
        served += 1
        if keeps.get(b, False):
            if rehash and choose is not None:
                new = choose(client)
                if new is None or new.addr != b.addr:
                    rehashed += 1
            continue
        target = choose(client) if choose is not None else None
        moves[client] = (b.ip, None if target is None else target.ip)
    return moves, served, rehashed, svc, scratch


def preview(engine: Engine, command: PoolCommand, now: float) -> Preview:
    """What ``engine.apply(command, now)`` would do to the clients; see the module rules."""
    moves, served, rehashed, svc, scratch = _compute(engine, command, now, rehash=True)
    ip = command.backend
    counts = Counter((str(src), None if dst is None else str(dst))
                     for src, dst in moves.values())
    stay = 0
    target = svc.pool.get(ip)
    if target is not None and target.serves_existing:
        total = sum(1 for _, b, _ in svc.table.ages(now) if b is target)
        stay = total - sum(n for (src, _), n in counts.items() if src == str(ip))
    after = scratch.pool.get(ip)
    return Preview(
        vip=str(svc.vip), backend=str(ip), op=command.op,
        strategy=svc.strategy.name, clients=served,
        moves=tuple(Move(src, dst, n) for (src, dst), n in sorted(
            counts.items(), key=lambda kv: (kv[0][0], kv[0][1] is None, kv[0][1] or ""))),
        stay=stay, rehashed=rehashed if svc.strategy.resteers else None,
        state_after=None if after is None else after.state.value,
        accepts_new_after=after is not None and after.accepts_new)


def merge_previews(previews: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One preview (``Preview.to_json`` form) of several workers' previews of one command."""
    previews = list(previews)
    if not previews:
        raise ValueError("nothing to merge")
    first = previews[0]
    moves: Counter[tuple[str, str | None]] = Counter()
    rehashed: int | None = None
    for p in previews:
        for m in p["moves"]:
            moves[(m["from"], m["to"])] += int(m["clients"])
        if p.get("rehashed") is not None:
            rehashed = (rehashed or 0) + int(p["rehashed"])
    ordered = sorted(moves.items(), key=lambda kv: (kv[0][0], kv[0][1] is None,
                                                    kv[0][1] or ""))
    return {
        "vip": first["vip"], "backend": first["backend"], "op": first["op"],
        "strategy": first["strategy"],
        "clients": sum(int(p["clients"]) for p in previews),
        "moved": sum(n for _, n in ordered),
        "moves": [{"from": src, "to": dst, "clients": n} for (src, dst), n in ordered],
        "stay": sum(int(p["stay"]) for p in previews),
        "rehashed": rehashed,
        "state_after": first["state_after"],
        "accepts_new_after": first["accepts_new_after"],
    }


def lookup_client(engine: Engine, client: str, now: float) -> list[dict[str, Any]]:
    """Where ``client`` is served, per service of its family: its entry (backend,
    idle at least, whether that backend still serves it) and, for resteering
    strategies, the backend its hash gives (where it goes if it has no entry).

    Reads only; for ``sh`` and ``maglev`` the strategy may rebuild its table, as
    it would on the next new client anyway.
    """
    addr = ipaddress.ip_address(client)
    out: list[dict[str, Any]] = []
    for svc in engine.services:
        if svc.version != addr.version:
            continue
        found = svc.table.age(addr.packed, now)
        hashed: str | None = None
        if svc.strategy.resteers:
            b = svc.strategy.choose(addr.packed)
            hashed = None if b is None else str(b.ip)
        out.append({
            "vip": str(svc.vip), "strategy": svc.strategy.name,
            "backend": None if found is None else str(found[0].ip),
            "idle": None if found is None else found[1],
            "served": found is not None and found[0].serves_existing,
            "hashed": hashed,
        })
    return out
