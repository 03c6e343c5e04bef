"""The control protocol: how ``loaded status`` and friends talk to a running daemon.

Transport
=========

A Unix stream socket, ``/run/loaded/<tag>.sock`` (``<tag>`` is
``loaded.core.plan.instance_tag`` of the config file's absolute path), owned by
root with mode 0600; with a group, 0660 and that group. One request per line,
one response line per request, in order; a connection may carry any number of
requests (the next waits for the answer to the one before). UTF-8 JSON::

    request:   {"cmd": "<command>", "args": {...}}\\n        ("args" may be left out)
    response:  {"ok": true, "result": <value>}\\n
               {"ok": false, "error": "<one line for a human>"}\\n

A request line longer than ``MAX_REQUEST`` (64 KiB) gets an error response
and the connection is closed. A line that is not UTF-8 JSON, not an object, nested deeper than
``MAX_DEPTH`` (16) arrays and objects, or has no string ``cmd`` gets an error
response; the connection stays usable. Whatever the line, decoding it gives a
request or ``ProtocolError``, never another exception (json's parser recurses:
deep nesting would raise ``RecursionError`` in the supervisor).
Unknown commands and unknown or bad arguments are errors too: ``args`` are
checked strictly (``validate_request``) so that a typo is never ignored.
A request the daemon cannot answer within its timeout (10 s unless the
command says otherwise) gets ``{"ok": false, "error": "... timed out ..."}``.
Times: ``at``, ``started_at``, ``written_at`` are wall-clock Unix seconds;
``uptime``, ``idle`` are seconds.

Commands
========

``status``: args ``{}``. Result, a ``loaded.core.status.Status`` as its
``to_json()`` (``Status.from_json`` reads it back)::

    {"daemon": {"pid": int, "tag": str, "config": str, "version": str,
                "uptime": float, "datapath": "perpacket"|"conntrack",
                "started_at": float},
     "services": [{"vip": "198.18.1.100", "family": 4, "strategy": "rr",
                   "datapath": str, "clients": int, "client_table_max": int | null,
                   "backends": [{"address": "198.19.0.11", "weight": 1,
                                 "state": "up"|"draining"|"down", "mark": int | null,
                                 "admin": "enabled"|"drain"|"disabled",
                                 "health": "up"|"down"|"unknown",
                                 "transitions": int,
                                 "last_check": {"ok": bool, "detail": str,
                                                "at": float, "latency": float,
                                                "check": str} | null,
                                 "clients": int, "new_clients": int,
                                 "packets": int, "bytes": int}]}],
     "workers": [{"index": int, "queue": int, "alive": bool, "restarts": int,
                  "drops": {reason: int},
                  once it has reported: "pid": int, "packets": int,
                  "accepted": int, "dropped": int, "batches": int,
                  "overruns": int, "truncated": int,
                  "verdict_errors": {errno: int}, "refused": int,
                  "cpu_seconds": float,
                  "latency": {"buckets": [[bound, int]], "sum": float,
                              "count": int}}],
     "kernel_queues": {"<queue>": {"portid": int, "waiting": int, "copy_mode": int,
                                   "copy_range": int, "queue_dropped": int,
                                   "user_dropped": int, "id_sequence": int}},
     "kernel_drops": {"conntrack-invalid": int},          (conntrack path only)
     "endpoints": {"metrics": "http://127.0.0.1:9100/metrics",
                   "status": "http://127.0.0.1:9100/"}}

  ``state`` is what the workers do (the pool state), ``admin`` what the
  operator asked (``backend drain|disable|enable``), ``health`` what the
  checks say (``unknown`` without failover). ``kernel_drops``: packets the
  kernel dropped before any worker saw them, by reason (``conntrack-invalid``:
  conntrack found them invalid); absent on the per-packet path.

``backend``: args ``{"action": "add"|"remove"|"weight"|"drain"|"disable"|"enable",
"address": ip, "vip": ip (optional), "weight": 0..65535 (add: optional, default 1;
weight: required; others: not allowed), "dry_run": bool (default false)}``.
Without ``vip`` the daemon takes its one VIP of the address's family
(``resolve_vip``). The action becomes one pool command (``pool_command``,
a ``loaded.core.commands`` value, shown in answers in its ``to_json`` form):

    add      {"op": "add", "weight": w, "state": "up"}
    remove   {"op": "remove"}
    weight   {"op": "weight", "weight": w}
    drain    {"op": "state", "state": "draining"}   no new clients, existing stay
    disable  {"op": "state", "state": "down", "cut": true}   its clients move now
    enable   {"op": "state", "state": "up"}

  Result, applied::

    {"action": str, "vip": str, "address": str, "dry_run": false,
     "command": {pool command},
     "before": {"weight": int, "state": str} | null,     (null: was not in the pool)
     "after": {"weight": int, "state": str} | null}      (null: removed)

  Result, ``dry_run`` (nothing changes; the workers' previews added up, see
  ``loaded.core.preview``)::

    {"action": str, "vip": str, "address": str, "dry_run": true,
     "command": {pool command}, "strategy": str,
     "clients": int, "moved": int, "stay": int, "rehashed": int | null,
     "moves": [{"from": ip, "to": ip | null, "clients": int}],
     "state_after": str | null, "accepts_new_after": bool}

  ``to`` null: the clients are balanced anew on their next packet.

``clients``: args ``{"action": "list"|"lookup", "vip": ip (optional),
"client": ip (lookup: required), "limit": 1..1000000 (list: optional, default
100)}``. Result of list (at most ``limit`` clients per VIP, ``total`` all)::

    {"services": [{"vip": str, "total": int,
                   "clients": [[client ip, backend ip, idle seconds (at least)]]}]}

  Result of lookup::

    {"client": ip,
     "services": [{"vip": str, "strategy": str, "backend": ip | null,
                   "idle": float | null, "served": bool, "hashed": ip | null}]}

  ``backend`` null: the client has no entry; ``served`` false: its backend no
  longer serves it (it moves on its next packet); ``hashed``: for sh and
  maglev, the backend its hash gives.

``reload``: args ``{"dry_run": bool (default false)}``. The daemon reads its
config file again and applies what can be applied live
(``loaded.core.reload``). Result::

    {"config": str, "dry_run": bool, "applied": bool,
     "changes": [{"op": str, "vip": str, "backend": str,
                  "before": {"weight": int, "state": str} | null,
                  "after": {"weight": int, "state": str} | null,
                  "overrides_runtime": bool, "command": {pool command}}],
     "commands": [{pool command}],
     "settings": [{"field": str, "key": str, "old": str, "new": str,
                   "live": bool, "reason": str}],
     "unapplied": [same as settings, those with "live": false],
     "restart_needed": bool, "notes": [str]}

  A config file with errors is an error response listing them.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from loaded.core.commands import AddBackend, PoolCommand, RemoveBackend, SetState, SetWeight
from loaded.core.pool import State

__all__ = [
    "BACKEND_ACTIONS",
    "CLIENT_ACTIONS",
    "COMMANDS",
    "DEFAULT_LIMIT",
    "MAX_DEPTH",
    "MAX_REQUEST",
    "SOCKET_DIR",
    "CommandFailed",
    "ControlError",
    "ProtocolError",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "error",
    "ok",
    "pool_command",
    "resolve_vip",
    "socket_path",
    "socket_path_for_config",
    "validate_request",
]

MAX_REQUEST = 64 * 1024
MAX_DEPTH = 16  # a request is two levels deep; room for future args, far from recursion
SOCKET_DIR = Path("/run/loaded")
DEFAULT_LIMIT = 100
MAX_LIMIT = 1_000_000
MAX_WEIGHT = 65535

BACKEND_ACTIONS = ("add", "remove", "weight", "drain", "disable", "enable")
CLIENT_ACTIONS = ("list", "lookup")
COMMANDS = ("status", "backend", "clients", "reload")


class ControlError(Exception):
    """The control socket could not be used: no daemon, no permission, no answer."""


class CommandFailed(ControlError):
    """The daemon answered, with an error (``{"ok": false}``)."""


class ProtocolError(ValueError):
    """A request (or response) that breaks the protocol; the message is for the peer."""


def socket_path(tag: str, directory: str | os.PathLike[str] = SOCKET_DIR) -> str:
    return os.path.join(os.fspath(directory), f"{tag}.sock")


def socket_path_for_config(config: str, directory: str | os.PathLike[str] = SOCKET_DIR) -> str:
    """The control socket of the daemon started with ``-c config``."""
    from loaded.core.plan import instance_tag

    return socket_path(instance_tag(os.path.abspath(config)), directory)


# --- lines ---------------------------------------------------------------------


def encode_request(cmd: str, args: Mapping[str, Any] | None = None) -> bytes:
    return json.dumps({"cmd": cmd, "args": dict(args or {})},
                      separators=(",", ":")).encode() + b"\n"


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"?', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


def _too_deep(text: str, limit: int = MAX_DEPTH) -> bool:
    """Whether ``text`` opens more than ``limit`` arrays/objects at once (brackets
    inside strings do not count). Malformed text may be miscounted: json rejects it."""
    if text.count("[") + text.count("{") <= limit:  # every real request: no scan
        return False
    depth = 0
    for m in _BRACKET.finditer(_STRING.sub("", text)):
        if m.group() in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def decode_request(line: bytes) -> dict[str, Any]:
    """``{"cmd": str, "args": dict}`` from one line (without its newline); any other
    line raises ``ProtocolError``, and nothing else is raised."""
    try:
        # Strict UTF-8, as the protocol says: json.loads would guess UTF-16/32 too.
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError("request is not UTF-8") from e
    if _too_deep(text):
        raise ProtocolError(f"request is nested deeper than {MAX_DEPTH} levels")
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise ProtocolError(f"request is not JSON: {e}") from e
    except RecursionError as e:  # the depth check above should make this unreachable
        raise ProtocolError("request is nested too deeply") from e
    if not isinstance(obj, dict):
        raise ProtocolError("request must be a JSON object")
    cmd = obj.get("cmd")
    if not isinstance(cmd, str):
        raise ProtocolError('request needs a string "cmd"')
    args = obj.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ProtocolError('"args" must be a JSON object')
    extra = sorted(set(obj) - {"cmd", "args"})
    if extra:
        raise ProtocolError(f"unknown request field(s): {', '.join(extra)}")
    return {"cmd": cmd, "args": args}


def ok(result: Any) -> dict[str, Any]:
    return {"ok": True, "result": result}


def error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": " ".join(str(message).split()) or "error"}


def encode_response(response: Mapping[str, Any]) -> bytes:
    """One line; raises ValueError/TypeError when the response is not plain JSON."""
    return json.dumps(response, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def decode_response(line: bytes) -> Any:
    """The ``result`` of a response line; ``CommandFailed`` for an error response,
    ``ControlError`` for one that is not a response at all."""
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise ControlError(f"the daemon's answer is not JSON: {e}") from e
    if not isinstance(obj, dict) or not isinstance(obj.get("ok"), bool):
        raise ControlError("the daemon's answer is not a response")
    if not obj["ok"]:
        raise CommandFailed(str(obj.get("error") or "unknown error"))
    return obj.get("result")


# --- arguments -----------------------------------------------------------------


def _ip(args: Mapping[str, Any], key: str, required: bool) -> str | None:
    value = args.get(key)
    if value is None:
        if required:
            raise ProtocolError(f"{key!r} is required")
        return None
    if not isinstance(value, str):
        raise ProtocolError(f"{key!r} must be an IP address as a string")
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise ProtocolError(f"{key!r}: {value!r} is not an IP address") from None


def _int(args: Mapping[str, Any], key: str, lo: int, hi: int) -> int | None:
    value = args.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{key!r} must be an integer")
    if not lo <= value <= hi:
        raise ProtocolError(f"{key!r} must be in {lo}..{hi}, not {value}")
    return value


def _bool(args: Mapping[str, Any], key: str) -> bool:
    value = args.get(key, False)
    if not isinstance(value, bool):
        raise ProtocolError(f"{key!r} must be true or false")
    return value


def _only(args: Mapping[str, Any], allowed: Iterable[str], what: str) -> None:
    extra = sorted(set(args) - set(allowed))
    if extra:
        raise ProtocolError(f"{what}: unknown argument(s): {', '.join(extra)}")


def _choice(args: Mapping[str, Any], key: str, choices: tuple[str, ...]) -> str:
    value = args.get(key)
    if value not in choices:
        raise ProtocolError(f"{key!r} must be one of {', '.join(choices)}, not {value!r}")
    assert isinstance(value, str)
    return value


def validate_request(request: Mapping[str, Any]) -> dict[str, Any]:
    """The request with its args checked and put in canonical form (addresses
    normalised, defaults filled in); ``ProtocolError`` says what is wrong."""
    cmd = request.get("cmd")
    args: Mapping[str, Any] = request.get("args") or {}
    out: dict[str, Any]
    if cmd == "status":
        _only(args, (), "status")
        out = {}
    elif cmd == "backend":
        _only(args, ("action", "address", "vip", "weight", "dry_run"), "backend")
        action = _choice(args, "action", BACKEND_ACTIONS)
        address = _ip(args, "address", True)
        vip = _ip(args, "vip", False)
        assert address is not None
        if vip is not None and ipaddress.ip_address(vip).version != ipaddress.ip_address(
                address).version:
            raise ProtocolError(f"backend {address} and VIP {vip} are of different families")
        weight = _int(args, "weight", 0, MAX_WEIGHT)
        if action == "weight" and weight is None:
            raise ProtocolError("'weight' is required to change the weight")
        if action not in ("add", "weight") and weight is not None:
            raise ProtocolError(f"'weight' does not go with {action}")
        if action == "add" and weight is None:
            weight = 1
        out = {"action": action, "address": address, "vip": vip,
               "dry_run": _bool(args, "dry_run")}
        if weight is not None:
            out["weight"] = weight
    elif cmd == "clients":
        _only(args, ("action", "vip", "client", "limit"), "clients")
        action = _choice(args, "action", CLIENT_ACTIONS)
        out = {"action": action, "vip": _ip(args, "vip", False)}
        if action == "lookup":
            if "limit" in args:
                raise ProtocolError("'limit' does not go with lookup")
            out["client"] = _ip(args, "client", True)
        else:
            if "client" in args:
                raise ProtocolError("'client' does not go with list")
            limit = _int(args, "limit", 1, MAX_LIMIT)
            out["limit"] = DEFAULT_LIMIT if limit is None else limit
    elif cmd == "reload":
        _only(args, ("dry_run",), "reload")
        out = {"dry_run": _bool(args, "dry_run")}
    else:
        raise ProtocolError(f"unknown command {cmd!r}; known: {', '.join(COMMANDS)}")
    return {"cmd": cmd, "args": out}


def resolve_vip(address: str, vips: Iterable[str], vip: str | None = None) -> str:
    """The VIP a ``backend`` request means: ``vip`` when given (it must be one of
    ``vips``), else the only VIP of the address's family."""
    family = ipaddress.ip_address(address).version
    known = [str(ipaddress.ip_address(v)) for v in vips]
    if vip is not None:
        v = str(ipaddress.ip_address(vip))
        if v not in known:
            raise ProtocolError(f"no VIP {v} here; VIPs: {', '.join(known) or 'none'}")
        return v
    same = [v for v in known if ipaddress.ip_address(v).version == family]
    if not same:
        raise ProtocolError(f"no IPv{family} VIP for {address}")
    if len(same) > 1:
        raise ProtocolError(f"several IPv{family} VIPs ({', '.join(same)}): give --vip")
    return same[0]


def pool_command(action: str, vip: str, address: str, weight: int | None = None
                 ) -> PoolCommand:
    """The pool command for a ``backend`` action (as the operator asked it: the
    daemon's state owner may turn a state change into another state)."""
    v, ip = ipaddress.ip_address(vip), ipaddress.ip_address(address)
    if action == "add":
        return AddBackend(v, ip, 1 if weight is None else weight, State.UP)
    if action == "remove":
        return RemoveBackend(v, ip)
    if action == "weight":
        if weight is None:
            raise ProtocolError("'weight' is required to change the weight")
        return SetWeight(v, ip, weight)
    if action == "drain":
        return SetState(v, ip, State.DRAINING)
    if action == "disable":
        return SetState(v, ip, State.DOWN, cut=True)
    if action == "enable":
        return SetState(v, ip, State.UP)
    raise ProtocolError(f"unknown backend action {action!r}")
