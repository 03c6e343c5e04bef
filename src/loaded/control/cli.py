"""``loaded status``, ``loaded backend``, ``loaded clients``, ``loaded reload``: the
command line of the control socket.

Every command is a function of its parsed arguments and a ``request(cmd, args)``
callable that returns the daemon's ``result`` (``loaded.control.server.request``
bound to the socket), so that it can be tested without a daemon. Output is text
for people, or with ``--json`` the result exactly as the daemon sent it. The
answer to ``status`` is decoded into the daemon's own snapshot type
(``loaded.core.status.Status.from_json``) before anything is shown: one that
is not a snapshot is an error (``StatusError``), never a half-printed table.

Exit status: 0 done; 1 the daemon refused, could not be reached or answered
something malformed (the reason on stderr); 2 bad usage.

Which daemon (``socket_of``): ``--socket PATH``; else the socket of ``-c FILE``
(its ``control_socket``, or ``/run/loaded/<tag>.sock``); else that of
``loaded.conf``/``loaded.config`` in the working directory, as the daemon
itself would pick; else the daemon whose socket answers in the run directory
(``SOCKET_DIR``, ``$LOADED_RUN_DIR`` when set), so that a plain ``loaded
status`` works wherever the one daemon was started from. Several answering
is an error listing them (socket and config file) to choose from, none an
error saying no daemon runs.

Wiring into the main command line::

    parser = argparse.ArgumentParser(prog="loaded")
    add_subcommands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.control(args)          # or run(args)

or simply ``main(["status", ...])``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import stat
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

from loaded.control.protocol import (
    BACKEND_ACTIONS,
    DEFAULT_LIMIT,
    SOCKET_DIR,
    CommandFailed,
    ControlError,
    socket_path_for_config,
)
from loaded.core.status import LastCheck, Status, StatusError

__all__ = [
    "EXIT_FAILED",
    "EXIT_USAGE",
    "RequestFn",
    "add_subcommands",
    "cmd_backend",
    "cmd_clients",
    "cmd_reload",
    "cmd_status",
    "format_backend",
    "format_clients",
    "format_lookup",
    "format_preview",
    "format_reload",
    "format_status",
    "main",
    "run",
]

RequestFn = Callable[[str, dict[str, Any]], Any]

EXIT_FAILED = 1
EXIT_USAGE = 2
DEFAULT_TIMEOUT = 15.0
RUN_DIR_ENV = "LOADED_RUN_DIR"  # where to look for daemons (tests, unusual set-ups)
PROBE_TIMEOUT = 2.0  # per socket, asking a found daemon which config it serves


# --- the parser ---------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_mutually_exclusive_group()
    where.add_argument("-c", dest="config", metavar="FILE",
                       help="the daemon's config file, which names its socket "
                            "(default: loaded.conf or loaded.config here, else the one "
                            "daemon running)")
    where.add_argument("--socket", metavar="PATH",
                       help="the control socket (default: /run/loaded/<tag>.sock of -c FILE)")
    common.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    common.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"how long to wait for the daemon (default {DEFAULT_TIMEOUT:g})")
    return common


def add_subcommands(subparsers: Any) -> None:
    """Register ``status``, ``backend``, ``clients`` and ``reload`` on an argparse
    subparsers object; each sets ``args.control`` to the function that runs it."""
    common = _common()
    p = subparsers.add_parser(
        "status", parents=[common], help="the daemon's services, backends and workers",
        description="Every VIP with its strategy, every backend with its state, "
                    "weight, clients, traffic and health.")
    p.add_argument("--exact", action="store_true", help="counters in full, not as 1.2M")
    p.set_defaults(control=run, control_cmd="status")

    p = subparsers.add_parser(
        "backend", parents=[common], help="add, remove, reweight, drain, disable, enable",
        description="Change one backend of a running daemon. drain: no new clients, "
                    "existing ones stay; disable: down, its clients move now; enable: up.")
    p.add_argument("action", choices=BACKEND_ACTIONS)
    p.add_argument("address", help="the backend's address")
    p.add_argument("--vip", help="the VIP (default: the daemon's VIP of that family)")
    p.add_argument("--weight", type=int, metavar="N", help="weight 0..65535 (add, weight)")
    p.add_argument("--dry-run", action="store_true",
                   help="change nothing; say how many clients would move where")
    p.set_defaults(control=run, control_cmd="backend")

    p = subparsers.add_parser("clients", help="the client tables: list, or look one client up")
    sub = p.add_subparsers(dest="clients_action", required=True, metavar="list|lookup")
    q = sub.add_parser("list", parents=[common], help="clients and their backends")
    q.add_argument("--vip", help="only this VIP")
    q.add_argument("--limit", type=int, default=DEFAULT_LIMIT, metavar="N",
                   help=f"at most N clients per VIP (default {DEFAULT_LIMIT})")
    q.set_defaults(control=run, control_cmd="clients")
    q = sub.add_parser("lookup", parents=[common], help="which backend serves a client")
    q.add_argument("client", help="the client's address")
    q.add_argument("--vip", help="only this VIP")
    q.set_defaults(control=run, control_cmd="clients")

    p = subparsers.add_parser(
        "reload", parents=[common], help="read the config file again and apply it",
        description="Apply the config file's backend changes to the running daemon; "
                    "list what needs a restart.")
    p.add_argument("--dry-run", action="store_true", help="show what would change, change nothing")
    p.set_defaults(control=run, control_cmd="reload")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loaded", description="Control a running loaded daemon.")
    add_subcommands(p.add_subparsers(dest="command", required=True))
    return p


def main(argv: Sequence[str]) -> int:
    return run(parser().parse_args(list(argv)))


def run_dir() -> str:
    """The directory daemons' sockets are looked for in (``$LOADED_RUN_DIR``)."""
    return os.environ.get(RUN_DIR_ENV) or os.fspath(SOCKET_DIR)


def live_sockets(directory: str) -> list[str]:
    """The ``*.sock`` sockets in ``directory`` something listens on, sorted. A
    refused connection is a socket left from an earlier run; one we may not
    connect to (permission) may be live, and asking it says why it cannot be used."""
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".sock"))
    except OSError:  # no such directory: nothing runs
        return []
    live = []
    for name in names:
        path = os.path.join(directory, name)
        try:
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                continue
        except OSError:
            continue
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(PROBE_TIMEOUT)
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            continue
        except OSError:
            pass
        finally:
            probe.close()
        live.append(path)
    return live


def _served_config(path: str) -> str | None:
    from loaded.control.server import request

    try:
        config = Status.from_json(request(path, "status", timeout=PROBE_TIMEOUT)).daemon.config
    except (ControlError, StatusError):
        return None
    return config or None


def find_socket(directory: str | None = None) -> str:
    """The socket of the one daemon running, for a command that names none;
    ``ControlError`` when none or several answer."""
    directory = run_dir() if directory is None else directory
    live = live_sockets(directory)
    if len(live) == 1:
        return live[0]
    if not live:
        raise ControlError(f"no daemon is running: no control socket answers in {directory} "
                           f"(a daemon with its socket elsewhere: give -c FILE or "
                           f"--socket PATH)")
    lines = []
    for path in live:
        config = _served_config(path)
        lines.append(f"  {path}" + (f" (config {config})" if config else ""))
    raise ControlError(f"{len(live)} daemons are running; pick one with -c FILE or "
                       f"--socket PATH:\n" + "\n".join(lines))


def socket_of(args: argparse.Namespace) -> str:
    """``--socket``; else the config's ``control_socket`` when it sets one; else
    ``/run/loaded/<tag>.sock`` of the config (``-c``, or the daemon's default
    search); with no config here either, the one daemon running (``find_socket``)."""
    if getattr(args, "socket", None):
        return str(args.socket)
    config = getattr(args, "config", None)
    if not config:
        from loaded.core.config import DEFAULT_CONFIGS

        config = next((name for name in DEFAULT_CONFIGS if os.path.exists(name)), None)
        if config is None:
            return find_socket()
    from loaded.core.config import load_config
    from loaded.core.errors import ConfigError

    try:
        custom = getattr(load_config(config), "control_socket", None)
    except ConfigError:  # unreadable or broken now: the daemon may still run
        custom = None
    return str(custom) if custom else socket_path_for_config(config)


def run(args: argparse.Namespace, request: RequestFn | None = None,
        out: TextIO | None = None, err: TextIO | None = None, now: float | None = None) -> int:
    """Run the command ``args`` names (``args.control_cmd``)."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    name = str(args.control_cmd)
    if request is None:
        from loaded.control.server import request as send

        try:
            path = socket_of(args)
        except ControlError as e:
            print(f"loaded {name}: {e}", file=err)
            return EXIT_FAILED
        timeout = float(getattr(args, "timeout", DEFAULT_TIMEOUT))

        def request(cmd: str, body: dict[str, Any]) -> Any:
            return send(path, cmd, body, timeout=timeout)

    commands: dict[str, Callable[..., int]] = {
        "status": functools.partial(cmd_status, now=now),
        "backend": cmd_backend, "clients": cmd_clients, "reload": cmd_reload}
    try:
        return commands[name](args, request, out)
    except _Usage as e:
        print(f"loaded {name}: {e}", file=err)
        return EXIT_USAGE
    except CommandFailed as e:
        print(f"loaded {name}: the daemon says: {e}", file=err)
        return EXIT_FAILED
    except ControlError as e:
        print(f"loaded {name}: {e}", file=err)
        return EXIT_FAILED
    except StatusError as e:
        print(f"loaded {name}: the daemon's answer is not a status snapshot: {e}", file=err)
        return EXIT_FAILED


class _Usage(Exception):
    pass


def _emit(args: argparse.Namespace, out: TextIO, result: Any, text: Callable[[], str]) -> None:
    if getattr(args, "json", False):
        out.write(json.dumps(result, indent=2) + "\n")
    else:
        out.write(text())


# --- the commands -------------------------------------------------------------------


def cmd_status(args: argparse.Namespace, request: RequestFn, out: TextIO,
               now: float | None = None) -> int:
    result = request("status", {})
    status = Status.from_json(result)  # --json too: a malformed answer is an error either way
    when = time.time() if now is None else now
    _emit(args, out, result, lambda: format_status(status, when,
                                                   exact=getattr(args, "exact", False)))
    return 0


def cmd_backend(args: argparse.Namespace, request: RequestFn, out: TextIO) -> int:
    action = str(args.action)
    weight = getattr(args, "weight", None)
    if action == "weight" and weight is None:
        raise _Usage("weight needs --weight N")
    if weight is not None and action not in ("add", "weight"):
        raise _Usage(f"--weight does not go with {action}")
    body: dict[str, Any] = {"action": action, "address": args.address,
                            "dry_run": bool(getattr(args, "dry_run", False))}
    if getattr(args, "vip", None):
        body["vip"] = args.vip
    if weight is not None:
        body["weight"] = weight
    result = request("backend", body)
    _emit(args, out, result, lambda: format_preview(result) if result.get("dry_run")
          else format_backend(result))
    return 0


def cmd_clients(args: argparse.Namespace, request: RequestFn, out: TextIO) -> int:
    action = str(args.clients_action)
    body: dict[str, Any] = {"action": action}
    if getattr(args, "vip", None):
        body["vip"] = args.vip
    if action == "lookup":
        body["client"] = args.client
        result = request("clients", body)
        _emit(args, out, result, lambda: format_lookup(result))
    else:
        if args.limit < 1:
            raise _Usage("--limit must be at least 1")
        body["limit"] = args.limit
        result = request("clients", body)
        _emit(args, out, result, lambda: format_clients(result))
    return 0


def cmd_reload(args: argparse.Namespace, request: RequestFn, out: TextIO) -> int:
    result = request("reload", {"dry_run": bool(getattr(args, "dry_run", False))})
    _emit(args, out, result, lambda: format_reload(result))
    return 0


# --- formatting ---------------------------------------------------------------------

_UNITS = ("K", "M", "G", "T", "P", "E")


def count(n: Any, exact: bool = False) -> str:
    """A counter: in full below 100000 (or ``exact``), else 123K, 1.2M, 45.6G."""
    if isinstance(n, bool) or not isinstance(n, int | float):
        return "-"
    n = int(n)
    if exact or abs(n) < 100_000:
        return str(n)
    value = float(n)
    for unit in _UNITS:
        value /= 1000
        if abs(value) < 99.95:
            return f"{value:.1f}{unit}"
        if abs(value) < 999.5:
            return f"{value:.0f}{unit}"
    return f"{value:.0f}{_UNITS[-1]}"


def duration(seconds: Any) -> str:
    """1d 02:03:04, 02:03:04 or 3:04 (minutes)."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        return "-"
    s = max(0, int(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours:02d}:{minutes:02d}:{s:02d}"
    if hours:
        return f"{hours:02d}:{minutes:02d}:{s:02d}"
    return f"{minutes}:{s:02d}"


def ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool],
          indent: str = "  ") -> list[str]:
    """Columns as wide as their widest cell, two blanks apart; numbers to the right.
    The last column is never padded."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = []
    for row in [headers, *rows]:
        cells = []
        for i, cell in enumerate(row):
            last = i == len(row) - 1
            if right[i]:
                cells.append(str(cell).rjust(widths[i]))
            else:
                cells.append(str(cell) if last else str(cell).ljust(widths[i]))
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def _get(d: Any, key: str, default: Any = None) -> Any:
    return d.get(key, default) if isinstance(d, Mapping) else default


def _last_check(check: LastCheck | None, now: float) -> str:
    if check is None:
        return "-"
    text = ("ok" if check.ok else "failed") + f" {ago(now - check.at)} ago"
    detail = check.detail.strip()
    return f"{text}: {detail}" if detail else text


def format_status(status: Status, now: float, exact: bool = False) -> str:
    """``status`` as text, in the spirit of ``ipvsadm -Ln --stats``."""
    lines: list[str] = []
    d = status.daemon
    lines.append(
        f"loaded {d.version}, pid {d.pid}, config {d.config} (tag {d.tag}), "
        f"datapath {d.datapath}, up {duration(d.uptime)}")
    if status.endpoints:
        lines.append("endpoints: " + ", ".join(f"{k} {v}" for k, v in status.endpoints.items()))
    if not status.services:
        lines += ["", "no services"]
    # One table for every VIP, so that the columns line up across them.
    rows_of: list[list[list[str]]] = []
    for svc in status.services:
        rows_of.append([[
            b.address, b.state, b.admin, count(b.weight, True), count(b.clients, exact),
            count(b.new_clients, exact), count(b.packets, exact), count(b.bytes, exact),
            b.health, _last_check(b.last_check, now)]
            for b in svc.backends])
    grid = table(["BACKEND", "STATE", "ADMIN", "WEIGHT", "CLIENTS", "NEW", "PACKETS", "BYTES",
                  "HEALTH", "LAST CHECK"], [r for rows in rows_of for r in rows],
                 [False, False, False, True, True, True, True, True, False, False])
    at = 1
    for svc, rows in zip(status.services, rows_of, strict=True):
        n = svc.clients
        lines += ["", f"VIP {svc.vip} (IPv{svc.family}), strategy {svc.strategy}, "
                      f"{count(n, exact)} client{'' if n == 1 else 's'}"]
        if not rows:
            lines.append("  no backends")
            continue
        lines.append(grid[0])
        lines += grid[at:at + len(rows)]
        at += len(rows)
    if status.workers:
        rows = []
        for w in status.workers:
            report = w.report  # None before its first report: nothing counted yet
            rows.append([str(w.index), str(w.queue), "?" if report is None else str(report.pid),
                         "alive" if w.alive else "dead", count(w.restarts, True),
                         count(None if report is None else report.packets, exact),
                         count(None if report is None else report.dropped, exact)])
        lines.append("")
        lines += table(["WORKER", "QUEUE", "PID", "STATE", "RESTARTS", "PACKETS", "DROPPED"],
                       rows, [True, True, True, False, True, True, True], indent="")
    if status.kernel_queues:
        rows = [[str(q), count(v.waiting, exact), count(v.queue_dropped, exact),
                 count(v.user_dropped, exact)]
                for q, v in sorted(status.kernel_queues.items())]
        lines.append("")
        lines += table(["QUEUE", "WAITING", "QUEUE DROPPED", "USER DROPPED"], rows,
                       [True, True, True, True], indent="")
    if status.kernel_hash is not None:
        h = status.kernel_hash
        lines.append("")
        lines.append(f"kernel hash table: {h.strategy}, {h.buckets} buckets, seed "
                     f"{h.seed:#x}, {'decides every new client' if h.decides else 'fallback'}"
                     f" ({count(h.hashed, exact)} new connections hashed)")
    if status.kernel_drops:  # conntrack path: shown even when 0
        lines.append("")
        lines += table(["KERNEL DROP", "PACKETS"],
                       [[k, count(v, exact)] for k, v in sorted(status.kernel_drops.items())],
                       [False, True], indent="")
    return "\n".join(lines) + "\n"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _values(v: Any) -> str:
    if not isinstance(v, Mapping):
        return "-"
    return f"weight {_get(v, 'weight', '?')}, {_get(v, 'state', '?')}"


def format_backend(result: Mapping[str, Any]) -> str:
    """The answer to an applied ``backend`` action."""
    action, address, vip = (_get(result, k, "?") for k in ("action", "address", "vip"))
    before, after = _get(result, "before"), _get(result, "after")
    if after is None:
        change = f"removed (was {_values(before)})" if before else "removed"
    elif before is None:
        change = f"added ({_values(after)})"
    else:
        parts = []
        if _get(before, "weight") != _get(after, "weight"):
            parts.append(f"weight {_get(before, 'weight')} -> {_get(after, 'weight')}")
        if _get(before, "state") != _get(after, "state"):
            parts.append(f"{_get(before, 'state')} -> {_get(after, 'state')}")
        change = ", ".join(parts) if parts else f"unchanged ({_values(after)})"
    return f"{action} {address} on {vip}: {change}\n"


def format_preview(result: Mapping[str, Any]) -> str:
    """The answer to a ``backend --dry-run``: who would move where."""
    action, address, vip = (_get(result, k, "?") for k in ("action", "address", "vip"))
    strategy = _get(result, "strategy", "?")
    clients = int(_get(result, "clients", 0) or 0)
    moved = int(_get(result, "moved", 0) or 0)
    lines = [f"dry run: {action} {address} on {vip} (strategy {strategy}); nothing was changed"]
    if moved:
        lines.append(f"  {moved} of {_plural(clients, 'client')} would move:")
        rows = []
        for m in _get(result, "moves", []) or []:
            to = _get(m, "to")
            rows.append([str(_get(m, "from", "?")), "->",
                         str(to) if to else "(balanced anew on their next packet)",
                         count(_get(m, "clients"), True)])
        lines += table(["FROM", "", "TO", "CLIENTS"], rows, [False, False, False, True],
                       indent="    ")
    else:
        lines.append(f"  no client would move ({_plural(clients, 'client')} now)")
    stay = int(_get(result, "stay", 0) or 0)
    state_after = _get(result, "state_after")
    if state_after is None:
        lines.append(f"  {address} would leave the pool")
    else:
        if stay:
            lines.append(f"  {_plural(stay, 'client')} would stay with {address} "
                         f"until idle")
        if not _get(result, "accepts_new_after", True):
            why = "weight 0" if state_after == "up" else state_after
            lines.append(f"  {address} would take no new clients ({why})")
    rehashed = _get(result, "rehashed")
    if rehashed:
        lines.append(f"  {rehashed} of the clients that stay would hash elsewhere: they move "
                     f"once their entry is gone (idle, worker restart)")
    return "\n".join(lines) + "\n"


def format_clients(result: Mapping[str, Any]) -> str:
    """The answer to ``clients list``."""
    lines: list[str] = []
    services = _get(result, "services", []) or []
    if not services:
        return "no services\n"
    for svc in services:
        entries = _get(svc, "clients", []) or []
        total = int(_get(svc, "total", len(entries)) or 0)
        shown = f" (showing {len(entries)})" if len(entries) < total else ""
        if lines:
            lines.append("")
        lines.append(f"VIP {_get(svc, 'vip', '?')}: {_plural(total, 'client')}{shown}")
        if entries:
            rows = [[str(e[0]), str(e[1]), f"{ago(float(e[2]))}"] for e in entries
                    if isinstance(e, list | tuple) and len(e) >= 3]
            lines += table(["CLIENT", "BACKEND", "IDLE AT LEAST"], rows,
                           [False, False, True])
    return "\n".join(lines) + "\n"


def format_lookup(result: Mapping[str, Any]) -> str:
    """The answer to ``clients lookup``."""
    client = _get(result, "client", "?")
    services = _get(result, "services", []) or []
    if not services:
        return f"{client}: no VIP of its family\n"
    lines = []
    for svc in services:
        head = f"{client} on {_get(svc, 'vip', '?')} ({_get(svc, 'strategy', '?')}): "
        backend, hashed = _get(svc, "backend"), _get(svc, "hashed")
        if backend is None:
            text = "not in the client table; "
            text += (f"its next packet goes to {hashed} (hash)" if hashed
                     else "its next packet is balanced like a new client's")
        elif not _get(svc, "served", True):
            text = f"its entry names {backend}, which no longer serves it: it moves on " \
                   f"its next packet"
        else:
            idle = _get(svc, "idle")
            text = f"served by {backend}"
            if isinstance(idle, int | float) and idle > 0:
                text += f", idle at least {ago(idle)}"
            if hashed and hashed != backend:
                text += f" (its hash now gives {hashed})"
        lines.append(head + text)
    kernel = _get(result, "kernel")
    if isinstance(kernel, Mapping):
        expires = _get(kernel, "expires")
        left = f", for {duration(expires)} unless it comes back" if isinstance(
            expires, int | float) else ""
        lines.append(f"{client}: the kernel sends its new connections to "
                     f"{_get(kernel, 'backend') or hex(int(_get(kernel, 'mark', 0)))}{left}")
    elif "kernel" in result:
        lines.append(f"{client}: not in the kernel's client map (its next connection "
                     f"goes to a worker)")
    return "\n".join(lines) + "\n"


def _change_line(c: Mapping[str, Any]) -> list[str]:
    op, backend, vip = (_get(c, k, "?") for k in ("op", "backend", "vip"))
    before, after = _get(c, "before"), _get(c, "after")
    if op == "add":
        text = f"{backend} to {vip} ({_values(after)})"
    elif op == "remove":
        text = f"{backend} from {vip}"
    elif op == "weight":
        text = f"{backend} on {vip}: {_get(before, 'weight')} -> {_get(after, 'weight')}"
    else:
        text = f"{backend} on {vip}: {_get(before, 'state')} -> {_get(after, 'state')}"
    if _get(c, "overrides_runtime"):
        text += " (overrides a change made at run time)"
    return [op, text]


def format_reload(result: Mapping[str, Any]) -> str:
    """The answer to ``reload``."""
    changes = _get(result, "changes", []) or []
    dry = bool(_get(result, "dry_run"))
    config = _get(result, "config", "?")
    n = len(changes)
    if not n:
        head = "no change to the pools"
    elif dry:
        head = f"would apply {_plural(n, 'change')}"
    else:
        head = f"applied {_plural(n, 'change')}" if _get(result, "applied", True) else \
            f"{_plural(n, 'change')} not applied"
    lines = [f"reload {config}{' (dry run)' if dry else ''}: {head}"]
    if changes:
        lines += table(["", ""], [_change_line(c) for c in changes], [False, False])[1:]
    settings = _get(result, "settings", []) or []
    live = [s for s in settings if _get(s, "live")]
    later = [s for s in settings if not _get(s, "live")]
    if live:
        lines.append("settings applied live:" if not dry else "settings that would apply live:")
        lines += [f"  {_get(s, 'key')}: {_get(s, 'old')} -> {_get(s, 'new')} "
                  f"({_get(s, 'reason')})" for s in live]
    if later:
        lines.append("not applied, need a restart:")
        lines += [f"  {_get(s, 'key')}: {_get(s, 'old')} -> {_get(s, 'new')} "
                  f"({_get(s, 'reason')})" for s in later]
    notes = _get(result, "notes", []) or []
    if notes:
        lines.append("notes:")
        lines += [f"  {note}" for note in notes]
    return "\n".join(lines) + "\n"
