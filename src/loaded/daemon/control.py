"""The operator's side of the supervisor: control-socket commands, live changes,
reload and the saved client tables.

Rules:

- Every change becomes pool commands sent to every worker at once
  (``Supervisor.command``); nothing restarts, no queue is unbound.
- The operator's word (``admin``: enabled, drain, disabled) outranks health:
  a disabled or draining backend stays so whatever its checks say, and health
  changes of such a backend are recorded, not applied. ``enable`` gives it the
  state its health calls for (down if its checks say so, else its configured
  state).
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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loaded.control.protocol import ProtocolError, pool_command, resolve_vip
from loaded.control.server import Pending
from loaded.core.config import Config, load_config
from loaded.core.errors import ConfigError
from loaded.core.persist import NotSavedTables, merge_dumps, saved_document
from loaded.core.pool import State
from loaded.core.preview import merge_previews
from loaded.core.reload import diff_configs
from loaded.io.files import write_atomic
from loaded.io.preflight import foreign_file, load_saved

if TYPE_CHECKING:
    from loaded.daemon.supervisor import Supervisor

log = logging.getLogger("loaded.control")

PERSIST_DIR = Path("/var/lib/loaded")
QUERY_TIMEOUT = 5.0
ADMIN_OF_ACTION = {"drain": "drain", "disable": "disabled", "enable": "enabled"}


class Operator:
    def __init__(self, supervisor: Supervisor) -> None:
        self.sup = supervisor

    # --- the control socket ---------------------------------------------------------

    def handle(self, request: dict[str, Any]) -> Any:
        cmd, args = request["cmd"], request.get("args", {})
        if cmd == "status":
            return self.sup.status()
        if cmd == "backend":
            return self.backend(args)
        if cmd == "clients":
            return self.clients(args)
        if cmd == "reload":
            return self.reload(bool(args.get("dry_run")))
        raise ProtocolError(f"unknown command {cmd!r}")

    def _deferred(self, query: dict[str, Any],
                  finish: Callable[[list[dict[str, Any]]], Any]) -> Pending:
        """Ask every worker; answer the request with ``finish(results)``."""
        server = self.sup.control
        pending = Pending(timeout=QUERY_TIMEOUT + 1.0)

        def done(replies: list[dict[str, Any]]) -> None:
            if server is None:
                return
            errors = [r["error"] for r in replies if "error" in r]
            if errors:
                server.fail(pending.token, errors[0])
                return
            try:
                server.respond(pending.token, finish([r["result"] for r in replies]))
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
        key = (vip, address)
        before = sup.pool_view.get(key)
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
                {"query": "preview", "command": command},
                lambda results: dict(head, dry_run=True, command=command,
                                     **_without(merge_previews(results), "vip", "backend",
                                                "op")))
        command = self._apply(command, ADMIN_OF_ACTION.get(action))
        log.info("event=backend-changed action=%s vip=%s backend=%s command=%s", action, vip,
                 address, json.dumps(command, sort_keys=True))
        return dict(head, dry_run=False, command=command, before=before,
                    after=sup.pool_view.get(key))

    def _apply(self, command: dict[str, object], admin: str | None = None
               ) -> dict[str, object]:
        """One change to every worker, with its bookkeeping: an added backend is
        enabled and health-checked; a removed one leaves gracefully (as IPVS: its
        connections, on the per-packet path its clients, finish where they are;
        `disable` first moves them at once) and is no longer checked; a state
        change records the operator's word ``admin`` and sends the state it adds
        up to with health. Returns the command sent."""
        sup = self.sup
        vip, ip, op = str(command["vip"]), str(command["backend"]), command["op"]
        key = (vip, ip)
        if op == "add":
            sup.admin[key] = "enabled"
            sup.configured_state[key] = State(str(command.get("state", "up")))
        elif op == "state":
            if admin is not None:
                sup.admin[key] = admin
            command = sup.effective_command(vip, ip)
        elif op == "remove":
            command = dict(command, graceful=True)
        sup.command(command)
        if op == "add":
            sup.watch(vip, ip)
        elif op == "remove":
            sup.admin[key] = "removing"
            sup.unwatch(vip, ip)
        return command

    def clients(self, args: dict[str, Any]) -> Any:
        if args["action"] == "lookup":
            client = str(ipaddress.ip_address(str(args["client"])))
            return self._deferred({"query": "lookup", "client": client},
                                  lambda results: self._with_kernel(
                                      _merge_lookups(client, results)))
        limit = int(args.get("limit") or 100)
        return self._deferred({"query": "clients", "vip": args.get("vip"), "limit": limit},
                              lambda results: _merge_lists(results, limit))

    def _with_kernel(self, found: dict[str, Any]) -> dict[str, Any]:
        """On the conntrack path, also what the kernel's client map says: it carries
        the client's new connections once a worker has decided for it."""
        sup = self.sup
        if not sup.conntrack:
            return found
        ip = ipaddress.ip_address(found["client"])
        recalled = sup.kernel.recalled(ip)
        backend = None
        if recalled is not None:
            backend = next((addr for (vip, addr) in sup.pool_view
                            if ipaddress.ip_address(addr).version == ip.version
                            and sup.mark_of(vip, addr) == recalled[0]), None)
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
        running = {v: {ip: (int(b["weight"]), sup.admin_state(v, ip))
                       for (vv, ip), b in sup.pool_view.items() if vv == v}
                   for v in sup.vips()}
        plan = diff_configs(sup.config, new, sup.families, running)
        result: dict[str, Any] = dict(plan.to_json(), config=sup.config_path,
                                      dry_run=dry_run, applied=False)
        if dry_run:
            return result
        for change_cmd in plan.commands:
            if change_cmd["op"] == "state":
                # The file sets the configured state (and overrides a runtime
                # drain); health still decides what the workers do.
                key = (str(change_cmd["vip"]), str(change_cmd["backend"]))
                sup.configured_state[key] = State(str(change_cmd["state"]))
                self._apply(change_cmd, "enabled")
            else:
                self._apply(change_cmd)
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

    def save_tables(self, replies: list[dict[str, Any]]) -> None:
        dumps = sorted((r for r in replies if "result" in r), key=lambda r: r["index"])
        if not dumps:
            log.warning("event=clients-not-saved reason=no-worker-answered")
            return
        data = saved_document([r["result"] for r in dumps], [r["index"] for r in dumps],
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
        total = sum(len(v) for r in dumps for v in r["result"].get("services", {}).values())
        log.info("event=clients-saved path=%s clients=%d", path, total)

    def restore_queries(self) -> dict[int, dict[str, Any]]:
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
            return {i: {"query": "restore", "data": d, "max_age": max_age}
                    for i, d in zip(indexes, dumps, strict=True)}
        log.info("event=clients-restore-shared reason=worker-count-changed was=%s now=%d",
                 saved.workers, len(children))
        merged = merge_dumps(dumps)
        return {c.spec.index: {"query": "restore", "data": merged, "max_age": max_age}
                for c in children}


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
