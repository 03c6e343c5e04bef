"""Pool commands and the messages between the supervisor and its workers. Pure.

Every change of a pool is one of four frozen values, whoever decides it (health
checks, the operator, a reload, the state owner in ``loaded.core.backends``),
and ``Engine.apply`` carries out exactly these; every line on a worker's pipes
is one ``Message``. Nothing here knows a socket: ``encode`` and ``decode`` turn
messages into lines and back.

Rules
=====

Pool commands (``PoolCommand``), each naming one backend of one VIP:

=================  ========================================================
command            what a worker's pool does
=================  ========================================================
``AddBackend``     adds it with ``weight``, ``state`` and ``index`` (the pool
                   position every worker must agree on; None: the next free
                   one); one already there (or still leaving) takes the
                   weight and state given
``RemoveBackend``  takes it out now, its clients move; ``graceful``: as IPVS,
                   it drains and leaves once its last client has gone idle
``SetState``       ``state``; going ``down`` with ``cut`` its clients move at
                   once, without (keep) it serves them still, as draining
``SetWeight``      ``weight``, for new clients
=================  ========================================================

- A command is valid when it is built: the addresses are of one family,
  weights in 0..``MAX_WEIGHT``, indexes in 0..``MAX_INDEX``; else ValueError.
- ``SetState.cut`` means something with state ``down`` only; with any other
  state it is always true, so that commands that do the same compare equal.
- ``to_json()`` is the command as the control socket shows it
  (``{"op": ..., "vip": ..., "backend": ..., ...}``): ``cut`` only with state
  ``down`` (it means nothing otherwise), ``graceful`` only when true,
  ``index`` only when given.

Messages, told apart by their ``type`` tag on the wire:

==========  ===============  ==============================================
direction   type             message
==========  ===============  ==============================================
to worker   add remove       a pool command (``PoolCommand``)
            state weight
to worker   preview lookup   a question (``Query``), answered by one
            clients dump     ``Reply`` with the same ``id``
            restore
to super.   report           the worker's counters and pools (``Report``)
to super.   reply            ``Reply``: ``result`` or ``error``
==========  ===============  ==============================================

- One message per line: UTF-8 JSON, an object with a string ``type``.
- ``decode`` gives a ``Message`` or raises ``MessageError`` (a ValueError),
  never anything else, whatever the line: a pipe that carries garbage costs
  that line, not the reader.
- ``decode(encode(m)) == m`` for every message.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from loaded.core.pool import MAX_INDEX, MAX_WEIGHT, IPAddress, State

__all__ = [
    "POOL_OPS",
    "AddBackend",
    "ClientsQuery",
    "DumpQuery",
    "LookupQuery",
    "Message",
    "MessageError",
    "PoolCommand",
    "PreviewQuery",
    "Query",
    "RemoveBackend",
    "Reply",
    "Report",
    "RestoreQuery",
    "SetState",
    "SetWeight",
    "command_from_json",
    "decode",
    "encode",
]


class MessageError(ValueError):
    """A line or object that is no message (or no command); the text says why."""


def _check_pair(vip: IPAddress, backend: IPAddress) -> None:
    if vip.version != backend.version:
        raise ValueError(f"backend {backend} and VIP {vip} are of different families")


def _check_weight(weight: int) -> None:
    if not 0 <= weight <= MAX_WEIGHT:
        raise ValueError(f"weight {weight} out of range 0..{MAX_WEIGHT}")


# --- pool commands ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AddBackend:
    op: ClassVar[str] = "add"
    vip: IPAddress
    backend: IPAddress
    weight: int = 1
    state: State = State.UP
    index: int | None = None

    def __post_init__(self) -> None:
        _check_pair(self.vip, self.backend)
        _check_weight(self.weight)
        if self.index is not None and not 0 <= self.index <= MAX_INDEX:
            raise ValueError(f"backend index {self.index} out of range 0..{MAX_INDEX}")

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"op": self.op, "vip": str(self.vip),
                                  "backend": str(self.backend), "weight": self.weight,
                                  "state": self.state.value}
        if self.index is not None:
            out["index"] = self.index
        return out


@dataclass(frozen=True, slots=True)
class RemoveBackend:
    op: ClassVar[str] = "remove"
    vip: IPAddress
    backend: IPAddress
    graceful: bool = False

    def __post_init__(self) -> None:
        _check_pair(self.vip, self.backend)

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"op": self.op, "vip": str(self.vip),
                                  "backend": str(self.backend)}
        if self.graceful:
            out["graceful"] = True
        return out


@dataclass(frozen=True, slots=True)
class SetState:
    op: ClassVar[str] = "state"
    vip: IPAddress
    backend: IPAddress
    state: State
    cut: bool = True  # with state down: its clients move now (else it keeps them)

    def __post_init__(self) -> None:
        _check_pair(self.vip, self.backend)
        if self.state is not State.DOWN and not self.cut:
            # Meaningless but for down: one value, so that equal commands compare equal.
            object.__setattr__(self, "cut", True)

    @property
    def pool_state(self) -> State:
        """The state the pools take: down without ``cut`` serves its clients still."""
        if self.state is State.DOWN and not self.cut:
            return State.DRAINING
        return self.state

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"op": self.op, "vip": str(self.vip),
                                  "backend": str(self.backend), "state": self.state.value}
        if self.state is State.DOWN:
            out["cut"] = self.cut
        return out


@dataclass(frozen=True, slots=True)
class SetWeight:
    op: ClassVar[str] = "weight"
    vip: IPAddress
    backend: IPAddress
    weight: int

    def __post_init__(self) -> None:
        _check_pair(self.vip, self.backend)
        _check_weight(self.weight)

    def to_json(self) -> dict[str, object]:
        return {"op": self.op, "vip": str(self.vip), "backend": str(self.backend),
                "weight": self.weight}


PoolCommand = AddBackend | RemoveBackend | SetState | SetWeight
POOL_OPS = ("add", "remove", "state", "weight")


# --- questions to the workers, and what they send back ---------------------------


@dataclass(frozen=True, slots=True)
class PreviewQuery:
    """What ``command`` would do to the worker's clients (``loaded.core.preview``)."""

    type: ClassVar[str] = "preview"
    command: PoolCommand
    id: int = 0


@dataclass(frozen=True, slots=True)
class LookupQuery:
    """Where ``client`` is served."""

    type: ClassVar[str] = "lookup"
    client: IPAddress
    id: int = 0


@dataclass(frozen=True, slots=True)
class ClientsQuery:
    """The clients of ``vip`` (None: every VIP), at most ``limit`` per VIP."""

    type: ClassVar[str] = "clients"
    vip: IPAddress | None = None
    limit: int | None = None
    id: int = 0


@dataclass(frozen=True, slots=True)
class DumpQuery:
    """The worker's client tables, to save (``loaded.core.persist``)."""

    type: ClassVar[str] = "dump"
    id: int = 0


@dataclass(frozen=True, slots=True)
class RestoreQuery:
    """Saved client tables (a dump, JSON data) to load, entries up to ``max_age`` old."""

    type: ClassVar[str] = "restore"
    data: Mapping[str, Any]
    max_age: float
    id: int = 0


Query = PreviewQuery | LookupQuery | ClientsQuery | DumpQuery | RestoreQuery


@dataclass(frozen=True, slots=True)
class Report:
    """A worker's counters and pools (``Worker.snapshot``): JSON data."""

    type: ClassVar[str] = "report"
    snapshot: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to the query ``id`` from worker ``index``: ``result`` (JSON data)
    or ``error``, a line for the operator."""

    type: ClassVar[str] = "reply"
    id: int
    index: int
    result: Any = None
    error: str | None = None


Message = PoolCommand | Query | Report | Reply


# --- the wire --------------------------------------------------------------------


def _command_fields(c: PoolCommand) -> dict[str, object]:
    out = c.to_json()
    del out["op"]
    if isinstance(c, SetState):
        out["cut"] = c.cut  # on the wire always: the value is kept exactly
    return out


def _fields(m: Message) -> dict[str, Any]:
    if isinstance(m, AddBackend | RemoveBackend | SetState | SetWeight):
        return _command_fields(m)
    if isinstance(m, PreviewQuery):
        return {"id": m.id, "command": dict(_command_fields(m.command), op=m.command.op)}
    if isinstance(m, LookupQuery):
        return {"id": m.id, "client": str(m.client)}
    if isinstance(m, ClientsQuery):
        return {"id": m.id, "vip": None if m.vip is None else str(m.vip), "limit": m.limit}
    if isinstance(m, DumpQuery):
        return {"id": m.id}
    if isinstance(m, RestoreQuery):
        return {"id": m.id, "data": m.data, "max_age": m.max_age}
    if isinstance(m, Report):
        return {"snapshot": m.snapshot}
    if isinstance(m, Reply):
        out: dict[str, Any] = {"id": m.id, "index": m.index}
        if m.error is not None:
            out["error"] = m.error
        else:
            out["result"] = m.result
        return out
    return {"clients": [[client.hex(), mark] for client, mark in m.clients]}


def _tag(m: Message) -> str:
    if isinstance(m, AddBackend | RemoveBackend | SetState | SetWeight):
        return m.op
    return m.type


def encode(message: Message) -> bytes:
    """One line (with its newline) for ``message``."""
    return json.dumps(dict(_fields(message), type=_tag(message)),
                      separators=(",", ":")).encode() + b"\n"


# --- reading: strict, one error type ---------------------------------------------


def _get(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...],
         default: Any = ..., none: bool = False) -> Any:
    """``obj[key]`` of type ``kind`` (bools are not ints); ``default`` when absent."""
    if key not in obj:
        if default is ...:
            raise MessageError(f"{key!r} is missing")
        return default
    value = obj[key]
    if value is None and none:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise MessageError(f"{key!r} must be {kinds[0].__name__}, not a boolean")
    if not isinstance(value, kinds):
        raise MessageError(f"{key!r} must be {kinds[0].__name__}, not {type(value).__name__}")
    return value


def _ip(obj: Mapping[str, Any], key: str, none: bool = False) -> Any:
    value = _get(obj, key, str, none=none)
    if value is None:
        return None
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise MessageError(f"{key!r}: {value!r} is not an IP address") from None


def _state(obj: Mapping[str, Any], key: str, default: Any = ...) -> State:
    value = _get(obj, key, str, default)
    if isinstance(value, State):
        return value
    try:
        return State(value)
    except ValueError:
        raise MessageError(f"{key!r}: {value!r} is not a backend state") from None


def _command(obj: Mapping[str, Any], op: object) -> PoolCommand:
    vip, backend = _ip(obj, "vip"), _ip(obj, "backend")
    try:
        if op == "add":
            return AddBackend(vip, backend, _get(obj, "weight", int, 1),
                              _state(obj, "state", State.UP),
                              _get(obj, "index", int, None, none=True))
        if op == "remove":
            return RemoveBackend(vip, backend, _get(obj, "graceful", bool, False))
        if op == "state":
            return SetState(vip, backend, _state(obj, "state"), _get(obj, "cut", bool, True))
        if op == "weight":
            return SetWeight(vip, backend, _get(obj, "weight", int))
    except MessageError:
        raise
    except ValueError as e:  # out of range, families apart
        raise MessageError(str(e)) from None
    raise MessageError(f"unknown pool command {op!r}")


def command_from_json(obj: object) -> PoolCommand:
    """A pool command from its ``to_json()`` form; ``MessageError`` for anything else."""
    if not isinstance(obj, dict):
        raise MessageError("a pool command must be a JSON object")
    return _command(obj, obj.get("op"))


def _query_id(obj: Mapping[str, Any]) -> int:
    return int(_get(obj, "id", int))


def _preview(obj: Mapping[str, Any]) -> Message:
    return PreviewQuery(command_from_json(obj.get("command")), _query_id(obj))


def _lookup(obj: Mapping[str, Any]) -> Message:
    return LookupQuery(_ip(obj, "client"), _query_id(obj))


def _clients(obj: Mapping[str, Any]) -> Message:
    return ClientsQuery(_ip(obj, "vip", none=True), _get(obj, "limit", int, None, none=True),
                        _query_id(obj))


def _dump(obj: Mapping[str, Any]) -> Message:
    return DumpQuery(_query_id(obj))


def _restore(obj: Mapping[str, Any]) -> Message:
    return RestoreQuery(_get(obj, "data", dict), float(_get(obj, "max_age", (int, float))),
                        _query_id(obj))


def _report(obj: Mapping[str, Any]) -> Message:
    return Report(_get(obj, "snapshot", dict))


def _reply(obj: Mapping[str, Any]) -> Message:
    return Reply(_query_id(obj), _get(obj, "index", int), obj.get("result"),
                 _get(obj, "error", str, None))


_READERS: dict[str, Callable[[Mapping[str, Any]], Message]] = {
    "preview": _preview, "lookup": _lookup, "clients": _clients, "dump": _dump,
    "restore": _restore, "report": _report, "reply": _reply,
}


def decode(line: bytes | str) -> Message:
    """The message on one line (its newline may be there); ``MessageError`` for any
    other line, and nothing else is raised."""
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise MessageError(f"not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise MessageError("a message must be a JSON object")
    tag = obj.get("type")
    if not isinstance(tag, str):
        raise MessageError('a message needs a string "type"')
    if tag in POOL_OPS:
        return _command(obj, tag)
    reader = _READERS.get(tag)
    if reader is None:
        raise MessageError(f"unknown message type {tag!r}")
    try:
        return reader(obj)
    except MessageError:
        raise
    except (ValueError, TypeError, OverflowError) as e:  # e.g. a float too large
        raise MessageError(str(e)) from None
