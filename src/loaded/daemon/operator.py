"""The operator's side of the supervisor: control-socket commands, live changes,
reload and the saved client tables.

Rules:

- Every change becomes pool commands sent to every worker at once
  (``Supervisor.command``); nothing restarts, no queue is unbound.
- What each change sends is ``loaded.core.backends``' to decide (the
  operator's word outranks health, the file wins where it changed
  something); here it is asked, and what it answers is sent.
- Questions about clients (lookup, list, dry runs, the tables to save) go to
  every worker, because each worker owns the clients hashed to it; the answers
  are added up.
- Saved client tables: each worker's own dump goes back to the same worker
  when the number of workers is unchanged (HMARK hashes a client to the same
  worker again). Otherwise every worker gets every client: nothing is lost,
  but client counts are too high until the extra entries expire (finding each
  client's worker would mean recomputing HMARK's hash here).
- A reload reads the config file again and applies the backend changes
  (``loaded.core.reload``); settings that need a restart are reported, not
  applied. A config with errors changes nothing.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from loaded.control.protocol import ProtocolError, pool_command, resolve_vip
from loaded.control.server import ControlServer, Pending
from loaded.core.backends import BackendStates
from loaded.core.commands import (
    AddBackend,
    ClientsQuery,
    LookupQuery,
    PoolCommand,
    PreviewQuery,
    Query,
    RemoveBackend,
    Reply,
    RestoreQuery,
)
from loaded.core.config import Config, load_config
from loaded.core.errors import ConfigError
from loaded.core.persist import NotSavedTables, merge_dumps, saved_document
from loaded.core.plan import Plan
from loaded.core.pool import IPAddress
from loaded.core.preview import merge_previews
from loaded.core.reload import diff_configs
from loaded.core.status import Status
from loaded.io.files import write_atomic
from loaded.io.kernel import Kernel
from loaded.io.preflight import foreign_file, load_saved

log = logging.getLogger("loaded.control")

PERSIST_DIR = Path("/var/lib/loaded")
QUERY_TIMEOUT = 5.0


class _WorkerSlot(Protocol):
    @property
    def spec(self) -> _HasIndex: ...


class _HasIndex(Protocol):
    @property
    def index(self) -> int: ...


class Daemon(Protocol):
    """What the operator needs of the running daemon (the supervisor is one): a
    Protocol, so that this module never imports the supervisor, which imports it."""

    config: Config
    config_path: str
    families: tuple[int, ...]
    backends: BackendStates

    @property
    def plan(self) -> Plan: ...
    @property
    def kernel(self) -> Kernel: ...
    @property
    def control(self) -> ControlServer | None: ...
    @property
    def children(self) -> Sequence[_WorkerSlot]: ...

    def status(self) -> Status: ...
    def vips(self) -> list[str]: ...
    def own_addresses(self) -> Iterable[IPAddress]: ...
    def command(self, command: PoolCommand) -> None: ...
    def watch(self, vip: IPAddress, ip: IPAddress) -> None: ...
    def unwatch(self, vip: IPAddress, ip: IPAddress) -> None: ...
    def ask(self, query: Query | None, done: Callable[[list[Reply]], None],
            timeout: float, only: dict[int, Query] | None = None) -> None: ...


class Operator:
    def __init__(self, daemon: Daemon) -> None:
        self.sup = daemon

    # --- the control socket ---------------------------------------------------------

    def handle(self, request: dict[str, Any]) -> Any:
        cmd, args = request["cmd"], request.get("args", {})
        if cmd == "status":
            return self.sup.status().to_json()
        if cmd == "backend":
            return self.backend(args)
        if cmd == "clients":
            return self.clients(args)
        if cmd == "reload":
            return self.reload(bool(args.get("dry_run")))
        raise ProtocolError(f"unknown command {cmd!r}")

    def _deferred(self, query: Query, finish: Callable[[list[Any]], Any]) -> Pending:
        """Ask every worker; answer the request with ``finish(results)``."""
        server = self.sup.control
        pending = Pending(timeout=QUERY_TIMEOUT + 1.0)

        def done(replies: list[Reply]) -> None:
            if server is None:
                return
            errors = [r.error for r in replies if r.error is not None]
            if errors:
                server.fail(pending.token, errors[0])
                return
            try:
                server.respond(pending.token, finish([r.result for r in replies]))
            except Exception as e:  # a bad answer must fail the request, not the loop
                server.fail(pending.token, f"{type(e).__name__}: {e}")

        self.sup.ask(query, done, QUERY_TIMEOUT)
        return pending

    def backend(self, args: dict[str, Any]) -> Any:
        sup = self.sup
        action = str(args["action"])
        address = str(ipaddress.ip_address(str(args["address"])))
        vip = resolve_vip(address, sup.vips(), args.get("vip"))
        weight = args.get("weight")
        command = pool_command(action, vip, address, weight)
        before = sup.backends.entry(command.vip, command.backend)
        if action != "add" and before is None:
            raise LookupError(f"{address} is not a backend of {vip}")
        if action == "add" and before is not None:
            raise LookupError(f"{address} is a backend of {vip} already")
        if action == "add" and (address in sup.vips() or ipaddress.ip_address(address)
                                in sup.own_addresses()):
            raise ValueError(f"{address} is an address of the balancer itself")
        head = {"action": action, "vip": vip, "address": address}
        if args.get("dry_run"):
            return self._deferred(
                PreviewQuery(command),
                lambda results: dict(head, dry_run=True, command=command.to_json(),
                                     **_without(merge_previews(results), "vip", "backend",
                                                "op")))
        command = self._apply(sup.backends.operator(command, cut=self._cut()))
        shown = command.to_json()
        log.info("event=backend-changed action=%s vip=%s backend=%s command=%s", action, vip,
                 address, json.dumps(shown, sort_keys=True))
        after = sup.backends.entry(command.vip, command.backend)
        return dict(head, dry_run=False, command=shown,
                    before=None if before is None else before.to_json(),
                    after=None if after is None else after.to_json())

    def _cut(self) -> bool:
        return self.sup.config.on_backend_down == "cut"

    def _apply(self, command: PoolCommand) -> PoolCommand:
        """One change (as ``loaded.core.backends`` decided it) to every worker, with
        its bookkeeping: an added backend is health-checked, a removed one (it
        leaves gracefully, as IPVS: its connections, on the per-packet path its
        clients, finish where they are; `disable` first moves them at once) no
        longer. Returns the command."""
        sup = self.sup
        sup.command(command)
        if isinstance(command, AddBackend):
            sup.watch(command.vip, command.backend)
        elif isinstance(command, RemoveBackend):
            sup.unwatch(command.vip, command.backend)
        return command

    def clients(self, args: dict[str, Any]) -> Any:
        if args["action"] == "lookup":
            client = str(ipaddress.ip_address(str(args["client"])))
            return self._deferred(LookupQuery(ipaddress.ip_address(client)),
                                  lambda results: self._with_kernel(
                                      _merge_lookups(client, results)))
        limit = int(args.get("limit") or 100)
        vip = args.get("vip")
        return self._deferred(ClientsQuery(None if vip is None else ipaddress.ip_address(vip),
                                           limit),
                              lambda results: _merge_lists(results, limit))

    def _with_kernel(self, found: dict[str, Any]) -> dict[str, Any]:
        """On a data path that remembers clients in the kernel (conntrack), also what
        the kernel's client map says: it carries the client's new connections once
        a worker has decided for it."""
        sup = self.sup
        if not sup.plan.datapath.remembers_clients:
            return found
        ip = ipaddress.ip_address(found["client"])
        recalled = sup.kernel.recalled(ip)
        backend = None
        if recalled is not None:
            backend = next((str(addr) for (vip, addr), _ in sup.backends.pooled()
                            if addr.version == ip.version
                            and sup.backends.mark_of(vip, addr) == recalled[0]), None)
        found["kernel"] = None if recalled is None else {
            "mark": recalled[0], "backend": backend, "expires": recalled[1]}
        return found

    def reload(self, dry_run: bool) -> dict[str, Any]:
        sup = self.sup
        try:
            new = load_config(sup.config_path)
        except ConfigError as e:
            raise ValueError(f"the config has errors, nothing changed: {e}") from None
        # The administrative view: what the pools would be without health checks
        # (a backend that is down only because its checks fail is "up" here, so
        # a reload never reads as an order to bring it back).
        running = sup.backends.running(ipaddress.ip_address(v) for v in sup.vips())
        plan = diff_configs(sup.config, new, sup.families, running)
        result: dict[str, Any] = dict(plan.to_json(), config=sup.config_path,
                                      dry_run=dry_run, applied=False)
        if dry_run:
            return result
        cut = self._cut()
        for change in plan.commands:
            # A state from the file sets the configured state (and overrides a
            # runtime drain); health still decides what the workers do.
            self._apply(sup.backends.reloaded(change, cut=cut))
        sup.config = _live_config(sup.config, new, [c.field for c in plan.settings if c.live])
        result["applied"] = True
        log.info("event=reloaded config=%s commands=%d restart_needed=%s", sup.config_path,
                 len(plan.commands), plan.restart_needed)
        for s in plan.unapplied:
            log.warning("event=reload-needs-restart key=%s old=%s new=%s", s.key, s.old, s.new)
        return result

    # --- saved client tables ----------------------------------------------------------

    def persist_path(self) -> Path:
        return persist_path(self.sup.config, self.sup.plan.tag)

    def save_tables(self, replies: list[Reply]) -> None:
        dumps = sorted((r for r in replies if r.error is None), key=lambda r: r.index)
        if not dumps:
            log.warning("event=clients-not-saved reason=no-worker-answered")
            return
        data = saved_document([r.result for r in dumps], [r.index for r in dumps],
                              len(self.sup.children), time.time())
        path = self.persist_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            problem = foreign_file(path)
            if problem is not None:
                log.warning("event=clients-not-saved path=%s reason=%s", path,
                            problem.replace(" ", "-"))
                return
            write_atomic(path, json.dumps(data), mode=0o600)
        except OSError as e:
            log.warning("event=clients-not-saved path=%s error=%s", path, e)
            return
        total = sum(len(v) for r in dumps for v in r.result.get("services", {}).values())
        log.info("event=clients-saved path=%s clients=%d", path, total)

    def restore_queries(self) -> dict[int, Query]:
        """Per worker index, the restore query for its share of the saved tables."""
        path = self.persist_path()
        try:
            saved = load_saved(path)
        except FileNotFoundError:
            return {}
        except NotSavedTables as e:
            # Someone else's file (the config said persist_file= of it): left alone.
            log.warning("event=clients-not-restored path=%s reason=not-ours detail=%r",
                        path, str(e))
            return {}
        except OSError as e:  # unreadable: whose it is cannot be told, so it stays
            log.warning("event=clients-not-restored path=%s error=%s", path, e)
            return {}
        except ValueError as e:
            log.warning("event=clients-not-restored path=%s error=%s", path, e)
            saved = None
        # Ours: restored once (or broken), so a crash later must not bring it back.
        try:
            path.unlink()
        except OSError:
            pass
        if saved is None:
            return {}
        dumps, indexes = saved.dumps, saved.indexes
        max_age = self.sup.config.persist_max_age
        children = self.sup.children
        if saved.workers == len(children) and len(dumps) == len(indexes):
            # The same workers hash the same clients (HMARK, fixed seed): each
            # gets back its own share.
            return {i: RestoreQuery(d, max_age) for i, d in zip(indexes, dumps, strict=True)}
        log.info("event=clients-restore-shared reason=worker-count-changed was=%s now=%d",
                 saved.workers, len(children))
        merged = merge_dumps(dumps)
        return {c.spec.index: RestoreQuery(merged, max_age) for c in children}


def persist_path(config: Config, tag: str) -> Path:
    if config.persist_file:
        return Path(config.persist_file)
    return PERSIST_DIR / f"{tag}.clients.json"


def _without(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


def _merge_lookups(client: str, results: list[Any]) -> dict[str, Any]:
    """A client has an entry in one worker at most (the one its packets hash to)."""
    by_vip: dict[str, dict[str, Any]] = {}
    for result in results:
        for svc in result:
            seen = by_vip.get(svc["vip"])
            if seen is None or (seen.get("backend") is None and svc.get("backend")):
                by_vip[svc["vip"]] = svc
    return {"client": client, "services": list(by_vip.values())}


def _merge_lists(results: list[Any], limit: int) -> dict[str, Any]:
    by_vip: dict[str, dict[str, Any]] = {}
    for result in results:
        for svc in result:
            agg = by_vip.setdefault(svc["vip"], {"vip": svc["vip"], "total": 0, "clients": []})
            agg["total"] += svc["total"]
            agg["clients"].extend(svc["clients"])
    for agg in by_vip.values():
        agg["clients"].sort(key=lambda e: e[2])  # most recently seen first
        del agg["clients"][limit:]
    return {"services": list(by_vip.values())}


def _live_config(old: Config, new: Config, live: list[str]) -> Config:
    """The config the daemon runs with after a reload: the new backends and live
    settings, the old everything else (what needs a restart keeps its value)."""
    changes = {f: getattr(new, f) for f in live}
    return dataclasses.replace(old, servers4=new.servers4, servers6=new.servers6, **changes)
