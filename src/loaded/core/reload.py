"""Reloading the configuration: what a running daemon must do to follow a new file. Pure.

``diff_configs(old, new, families, running)`` compares the configuration the
daemon started with (``old``), the file as it is now (``new``) and, when given,
the pools as they run now (``running``: operator commands and health checks
may have changed them since the start), and returns a ``ReloadPlan``: the pool
commands (``loaded.core.commands``) that make the running pools follow the new
file, and the settings that changed but cannot be changed while the daemon
runs.

Rules
=====

- Only the address families in ``families`` (those the daemon serves) are
  compared; a change that concerns only another family is ignored.
- A *backend* is one ``serverN=`` line, keyed by (VIP, address); its
  attributes are ``weight`` and ``state``. ``running`` maps each VIP to its
  backends' ``(weight, state)``; without it the running pools are taken to be
  ``old``'s. ``running`` is the administrative view (what the config and the
  operator set), not the health checks' verdict: a backend that is down only
  because it fails its check must appear with its configured state, or a
  reload would look like an order to bring it up.
- Three-way merge, per backend and per attribute. The file is the newer
  word where it changed, the running value stands where it did not:

  ================================  ==========================================
  old / new / running               result
  ================================  ==========================================
  in new only (not in old)          ``add`` when not running; when running (an
                                    operator added it first), a ``weight`` and
                                    ``state`` command for each attribute that
                                    differs from ``new``
  in old only (not in new)          ``remove`` when running, else nothing
  in old and new                    per attribute: old == new, the running
                                    value stands (an operator's drain
                                    survives a reload); old != new, ``new``'s
                                    value when the running one differs from it
                                    (``overrides_runtime`` when the running one
                                    was not ``old``'s either). Not running (an
                                    operator removed it): stays removed
  in neither (running only)         untouched: added at run time (operator or
                                    hot-plug), the file never named it
  ================================  ==========================================

- A backend whose running state and weight already equal the result gets no
  command. Applying the plan's commands to pools in the ``running`` state and
  diffing again (with ``running`` the result) gives no command.
- A ``state`` command to ``down`` carries ``cut: true``: a backend the file
  disables loses its clients at once (``cut: false`` would make it draining).
- Commands come in this order, each group in file order: ``add``, then
  ``weight``, then ``state`` (to up, then draining, then down), then
  ``remove``: capacity arrives before any is taken away.
- A VIP whose address changed, that appeared or that disappeared gets no
  backend command: the change needs a restart, and its backends' changes wait
  for it (a note says so).
- Every other setting that differs is a ``SettingChange``. Live are only
  ``on_backend_down`` (read at each health event) and the ``persist_*``
  settings (read when the daemon stops and starts), provided the supervisor
  keeps the new ``Config`` after a reload; every other one needs a restart
  and carries the reason. A backend's ``check=`` option belongs to the health
  checks, set up at start: a change of it needs a restart too. A change of the
  order of the backends kept is a note: ``sh`` and ``maglev`` tables depend on
  pool order, and reloaded pools keep their order (added ones go last).
- The reasons for each setting are the ``SETTINGS`` table below, made from
  the table of keys in ``loaded.core.config`` (each row says whether its key
  is live and why); a test checks that every field of ``Config`` is either
  there, a backend list, or neither compared nor applied (``path``,
  ``warnings``, ``key_lines``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from loaded.core.commands import AddBackend, PoolCommand, RemoveBackend, SetState, SetWeight
from loaded.core.config import KEY_TABLE, BackendSpec, Config
from loaded.core.pool import IPAddress, State

__all__ = [
    "SETTINGS",
    "BackendChange",
    "ReloadPlan",
    "Running",
    "SettingChange",
    "diff_configs",
    "running_from_config",
]

# VIP -> backend address -> (weight, state); addresses in any form ipaddress reads.
Running = Mapping[str, Mapping[str, tuple[int, State | str]]]

# Config field -> (the key as the file spells it, family or 0, live, reason), made
# from the table of keys (``loaded.core.config.KEY_TABLE``): every field a key sets
# but the backend lists, which pool commands reload.
SETTINGS: dict[str, tuple[str, int, bool, str]] = {
    f.name: (f.spelled or k.name, f.family, k.reload.live, k.reload.reason)
    for k in KEY_TABLE if not k.reload.backends for f in k.fields}

# Fields that are not settings: the backend lists (commands) and bookkeeping.
BACKEND_FIELDS = tuple(f.name for k in KEY_TABLE if k.reload.backends for f in k.fields)
IGNORED_FIELDS = ("path", "warnings", "key_lines")

# Why a change of a backend's check= option waits for a restart: the health
# keys' reason.
_HEALTH_REASON = SETTINGS["check"][3]

_STATE_ORDER = {State.UP: 0, State.DRAINING: 1, State.DOWN: 2}


@dataclass(frozen=True)
class BackendChange:
    """One pool command, with what it changes (``before`` the running values)."""

    op: str  # add, remove, weight, state
    vip: str
    backend: str
    before: tuple[int, State] | None  # None: not in the running pool
    after: tuple[int, State] | None  # None: removed
    overrides_runtime: bool = False  # the running value was set at run time, not by old

    def command(self) -> PoolCommand:
        """The command that makes the change."""
        vip, ip = ipaddress.ip_address(self.vip), ipaddress.ip_address(self.backend)
        if self.op == "remove":
            return RemoveBackend(vip, ip)
        assert self.after is not None
        weight, state = self.after
        if self.op == "add":
            return AddBackend(vip, ip, weight, state)
        if self.op == "weight":
            return SetWeight(vip, ip, weight)
        # Down by the file: its clients move at once.
        return SetState(vip, ip, state, cut=True)

    def to_json(self) -> dict[str, object]:
        def values(v: tuple[int, State] | None) -> dict[str, object] | None:
            return None if v is None else {"weight": v[0], "state": v[1].value}

        return {"op": self.op, "vip": self.vip, "backend": self.backend,
                "before": values(self.before), "after": values(self.after),
                "overrides_runtime": self.overrides_runtime,
                "command": self.command().to_json()}


@dataclass(frozen=True)
class SettingChange:
    """A setting that differs between the old and the new file."""

    field: str  # the Config field
    key: str  # the key as the file spells it
    old: str
    new: str
    live: bool
    reason: str

    def to_json(self) -> dict[str, object]:
        return {"field": self.field, "key": self.key, "old": self.old, "new": self.new,
                "live": self.live, "reason": self.reason}


@dataclass(frozen=True)
class ReloadPlan:
    changes: tuple[BackendChange, ...] = ()
    settings: tuple[SettingChange, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def commands(self) -> list[PoolCommand]:
        return [c.command() for c in self.changes]

    @property
    def unapplied(self) -> list[SettingChange]:
        """The settings that need a restart."""
        return [s for s in self.settings if not s.live]

    @property
    def restart_needed(self) -> bool:
        return any(not s.live for s in self.settings)

    def to_json(self) -> dict[str, object]:
        return {
            "changes": [c.to_json() for c in self.changes],
            "commands": [c.to_json() for c in self.commands],
            "settings": [s.to_json() for s in self.settings],
            "unapplied": [s.to_json() for s in self.unapplied],
            "restart_needed": self.restart_needed,
            "notes": list(self.notes),
        }


def running_from_config(config: Config, families: Iterable[int]) -> dict[str, dict[str, tuple[
        int, State | str]]]:
    """The running pools as a daemon started from ``config`` has them before any change."""
    out: dict[str, dict[str, tuple[int, State | str]]] = {}
    for family in families:
        vip = config.family(family).vip
        if vip is not None:
            out[str(vip)] = {str(s.ip): (s.weight, s.state) for s in config.family(family).servers}
    return out


def diff_configs(old: Config, new: Config, families: Iterable[int],
                 running: Running | None = None) -> ReloadPlan:
    """The plan that turns the running daemon (started from ``old``) into ``new``.

    See the module rules. ``running`` defaults to the pools of ``old``.
    """
    families = tuple(sorted(set(families)))
    for f in families:
        if f not in (4, 6):
            raise ValueError(f"family must be 4 or 6, not {f!r}")
    if running is None:
        running = running_from_config(old, families)
    pools = _normalise(running)
    changes: list[BackendChange] = []
    notes: list[str] = []
    for family in families:
        old_vip, new_vip = old.family(family).vip, new.family(family).vip
        if old_vip is None or new_vip is None or old_vip != new_vip:
            if old_vip is not None or new_vip is not None:
                notes.append(f"VIP{family} changed ({old_vip or 'none'} -> {new_vip or 'none'}):"
                             f" its backends are not reloaded; restart the daemon")
            continue
        pool = pools.get(new_vip)
        if pool is None:
            notes.append(f"VIP{family} {new_vip} has no running pool: nothing to reload")
            continue
        c, n = _diff_pool(new_vip, old.family(family).servers, new.family(family).servers, pool)
        changes += c
        notes += n
    return ReloadPlan(tuple(_ordered(changes)), tuple(_settings(old, new, families)),
                      tuple(notes))


# --- internals -----------------------------------------------------------------


def _normalise(running: Running) -> dict[IPAddress, dict[IPAddress, tuple[int, State]]]:
    out: dict[IPAddress, dict[IPAddress, tuple[int, State]]] = {}
    for vip, backends in running.items():
        pool = out.setdefault(ipaddress.ip_address(vip), {})
        for ip, (weight, state) in backends.items():
            pool[ipaddress.ip_address(ip)] = (int(weight), State(state))
    return out


def _diff_pool(vip: IPAddress, old: tuple[BackendSpec, ...], new: tuple[BackendSpec, ...],
               running: dict[IPAddress, tuple[int, State]]
               ) -> tuple[list[BackendChange], list[str]]:
    old_by = {s.ip: s for s in old}
    new_by = {s.ip: s for s in new}
    v = str(vip)
    changes: list[BackendChange] = []
    notes: list[str] = []
    for spec in new:
        ip = spec.ip
        target = (spec.weight, spec.state)
        cur = running.get(ip)
        before = old_by.get(ip)
        if cur is None:
            if before is None:
                changes.append(BackendChange("add", v, str(ip), None, target))
            elif (before.weight, before.state) != target:
                notes.append(f"{ip} on {v} was removed at run time and stays removed; "
                             f"the file's change of it waits for a restart")
            else:
                notes.append(f"{ip} on {v} was removed at run time and stays removed")
            continue
        # Per attribute: the file changed it (or newly names the backend) -> its value.
        want_w = spec.weight if before is None or before.weight != spec.weight else cur[0]
        want_s = spec.state if before is None or before.state != spec.state else cur[1]
        if want_w != cur[0]:
            runtime = before is None or cur[0] != before.weight
            changes.append(BackendChange("weight", v, str(ip), cur, (want_w, cur[1]), runtime))
        if want_s != cur[1]:
            runtime = before is None or cur[1] != before.state
            changes.append(BackendChange("state", v, str(ip), (want_w, cur[1]),
                                         (want_w, want_s), runtime))
    for spec in old:
        if spec.ip not in new_by and spec.ip in running:
            changes.append(BackendChange("remove", v, str(spec.ip), running[spec.ip], None))
    for ip in running:
        if ip not in old_by and ip not in new_by:
            notes.append(f"{ip} on {v} was added at run time and is kept")
    kept_old = [s.ip for s in old if s.ip in new_by and s.ip in running]
    kept_new = [s.ip for s in new if s.ip in old_by and s.ip in running]
    if kept_old != kept_new:
        notes.append(f"the order of the backends of {v} changed: it takes effect at the "
                     f"next restart (sh and maglev tables depend on it)")
    old_checks = {s.ip: s.check for s in old}
    for spec in new:
        if spec.ip in old_checks and old_checks[spec.ip] != spec.check:
            notes.append(f"check of {spec.ip} on {v} changed: {_HEALTH_REASON}; "
                         f"restart the daemon")
    return changes, notes


def _ordered(changes: list[BackendChange]) -> list[BackendChange]:
    adds = [c for c in changes if c.op == "add"]
    weights = [c for c in changes if c.op == "weight"]
    states = [c for c in changes if c.op == "state"]
    states.sort(key=lambda c: _STATE_ORDER[c.after[1]] if c.after else 3)  # stable
    removes = [c for c in changes if c.op == "remove"]
    return adds + weights + states + removes


def _show(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, tuple):
        return " ".join(_show(v) for v in value) or "none"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _listen(value: object) -> str:
    if isinstance(value, tuple) and len(value) == 2:
        host, port = value
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return "off" if value is None else str(value)


def _settings(old: Config, new: Config, families: tuple[int, ...]) -> list[SettingChange]:
    out: list[SettingChange] = []
    for name, (key, family, live, reason) in SETTINGS.items():
        if family and family not in families:
            continue
        # getattr with a default: a setting listed here may not exist in every Config.
        a: object = getattr(old, name, None)
        b: object = getattr(new, name, None)
        if name == "nameservers":
            a = tuple(ns for ns in old.nameservers if ns.version in families)
            b = tuple(ns for ns in new.nameservers if ns.version in families)
        if a != b:
            if name == "status_listen":
                a, b = _listen(a), _listen(b)
            if not live:
                reason = f"{reason}: restart the daemon"
            out.append(SettingChange(name, key, _show(a), _show(b), live, reason))
    return out
