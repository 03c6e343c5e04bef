"""Who says what about each backend, and the state its pools take. Pure.

Three voices speak about every backend (one backend of one VIP, keyed by
``(vip, backend ip)``):

- the **file** (and the operator's ``add``): its *configured* state, ``up``,
  ``draining`` or ``down``, and its weight;
- the **operator** (``loaded backend drain|disable|enable|remove``): its
  *admin* state, ``enabled``, ``drain``, ``disabled`` or ``removing``;
- the **health checks**: their *verdict*, ``up``, ``down`` or ``unknown`` (no
  result yet, no checks, or failover off).

``BackendStates`` keeps the three and turns each thing that is said (a command
asked by the operator or the file, a health event) into the pool command the
workers must get, and keeps what the workers' pools hold (the pool *view*,
kept from the commands sent: ``sent``), from which a restarted worker is
brought up to date (``replay``). It sends nothing itself: the supervisor
sends what it returns, then tells it with ``sent``.

Rules
=====

The state the pools take (``RULES``, below; ``configured``: the configured
state; ``on_backend_down``: cut or keep, as the config says):

===========  ============  =================  ===================================
admin        verdict       pools take         why
===========  ============  =================  ===================================
enabled      up, unknown   configured         nothing to say against the file
enabled      down          down               cut or keep as on_backend_down says
drain        any           draining           the operator's word outranks health
disabled     any           down, cut          the operator said: now
removing     any           (no command)       it is leaving the pools
===========  ============  =================  ===================================

- A health verdict is always recorded (and counted as a transition), but it
  changes the pools only when the operator's word is ``enabled``
  (``HEALTH_FOLLOWS``): a drained or disabled backend stays so whatever its
  checks say, and ``enable`` gives it what its health and configured state
  call for (down while its checks fail).
- The operator's state commands are words (``ADMIN_OF``): up is ``enable``,
  draining ``drain``, down ``disable``; the command sent is the rule's.
- The file wins where it changed something: a reload's state command sets
  the configured state and ends a drain or disable (admin ``enabled``);
  health still decides what the pools take.
- ``add`` (operator or file) makes a backend ``enabled`` with the verdict
  ``unknown`` (it serves at once, as a configured backend does) and the
  configured state the command gives. ``remove`` makes it ``removing`` and
  graceful (as IPVS: its connections finish where they are), and forgets its
  verdict (no more checks).
- Discovery: a host added starts ``enabled``, configured ``up`` and verdict
  ``down`` (it joins the pools down and comes up with its checks); a host
  removed leaves the pools at once.
- The view follows each command sent as the engine applies it (``down``
  without cut is draining); ``running`` is the view as a reload must see it:
  the state without health (``RULES`` with verdict up), so that a backend
  down only because of its checks never reads as an order to bring it up.
- Indexes: configured backends are numbered in config order
  (``backend_indexes``); a backend added later gets the next free index of
  its VIP; a backend that leaves and comes back keeps its index. Every
  ``AddBackend`` sent carries it (``sent`` puts it in).
- ``replay``: for every backend a command was sent about, in the order first
  seen, the command that brings a worker built from the (reloaded) config to
  the view: an ``add`` with weight, state and index, or the ``remove`` that
  took it out. Backends no command touched are as the config has them; a
  reload that changes one sends a command about it.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from loaded.core.commands import AddBackend, PoolCommand, RemoveBackend, SetState, SetWeight
from loaded.core.config import Config
from loaded.core.engine import backend_indexes
from loaded.core.health import Event, HostAdded, HostRemoved, StateChanged, pool_command
from loaded.core.pool import MAX_INDEX, IPAddress, State, ct_mark

__all__ = [
    "ADMIN_OF",
    "HEALTH_FOLLOWS",
    "RULES",
    "Admin",
    "BackendStates",
    "Key",
    "PoolEntry",
    "Verdict",
    "effective",
]

Key = tuple[IPAddress, IPAddress]  # (vip, backend ip)


class Admin(enum.StrEnum):
    """The operator's word."""

    ENABLED = "enabled"
    DRAIN = "drain"
    DISABLED = "disabled"
    REMOVING = "removing"


class Verdict(enum.StrEnum):
    """What the health checks say."""

    UP = "up"
    DOWN = "down"
    UNKNOWN = "unknown"


class From(enum.Enum):
    """A value the rules take from elsewhere."""

    CONFIGURED = "configured"  # the configured state
    POLICY = "on_backend_down"  # cut (true) or keep (false), as the config says


# (admin, verdict) -> (the state the pools take, whether going down cuts), or None:
# no state command at all.
RULES: dict[tuple[Admin, Verdict], tuple[State | From, bool | From] | None] = {
    (Admin.ENABLED, Verdict.UP): (From.CONFIGURED, True),
    (Admin.ENABLED, Verdict.UNKNOWN): (From.CONFIGURED, True),
    (Admin.ENABLED, Verdict.DOWN): (State.DOWN, From.POLICY),
    (Admin.DRAIN, Verdict.UP): (State.DRAINING, True),
    (Admin.DRAIN, Verdict.UNKNOWN): (State.DRAINING, True),
    (Admin.DRAIN, Verdict.DOWN): (State.DRAINING, True),
    (Admin.DISABLED, Verdict.UP): (State.DOWN, True),
    (Admin.DISABLED, Verdict.UNKNOWN): (State.DOWN, True),
    (Admin.DISABLED, Verdict.DOWN): (State.DOWN, True),
    (Admin.REMOVING, Verdict.UP): None,
    (Admin.REMOVING, Verdict.UNKNOWN): None,
    (Admin.REMOVING, Verdict.DOWN): None,
}

# The operator's words whose backends follow their health checks.
HEALTH_FOLLOWS: frozenset[Admin] = frozenset({Admin.ENABLED})

# The state an operator's state command asks for -> the word it stands for.
ADMIN_OF: dict[State, Admin] = {
    State.UP: Admin.ENABLED,
    State.DRAINING: Admin.DRAIN,
    State.DOWN: Admin.DISABLED,
}


def effective(admin: Admin, verdict: Verdict, configured: State, *,
              cut: bool) -> tuple[State, bool] | None:
    """``RULES`` for one backend: the state its pools take and whether going down
    cuts, or None for no state command. ``cut`` is ``on_backend_down=cut``."""
    rule = RULES[(admin, verdict)]
    if rule is None:
        return None
    state, cuts = rule
    return (state if isinstance(state, State) else configured,
            cuts if isinstance(cuts, bool) else cut)


@dataclass(frozen=True, slots=True)
class PoolEntry:
    """A backend as the workers' pools hold it."""

    weight: int
    state: State

    def to_json(self) -> dict[str, object]:
        return {"weight": self.weight, "state": self.state.value}


@dataclass(slots=True)
class _Backend:
    configured: State
    admin: Admin = Admin.ENABLED
    verdict: Verdict = Verdict.UNKNOWN
    transitions: int = 0  # health verdicts that changed
    pool: PoolEntry | None = None  # None: not in the pools
    removed: RemoveBackend | None = None  # what took it out, for replay
    changed: bool = False  # a command about it was sent: a new worker must hear it


class BackendStates:
    """Every backend's configured state, admin state, verdict and pool view; see
    the module rules. One owner calls it (the supervisor's main loop)."""

    def __init__(self, config: Config, families: Iterable[int]) -> None:
        self._backends: dict[Key, _Backend] = {}
        self._indexes: dict[Key, int] = {}
        families = tuple(families)
        for (v, ip), index in backend_indexes(config, families).items():
            self._indexes[(ipaddress.ip_address(v), ipaddress.ip_address(ip))] = index
        for family in families:
            fc = config.family(family)
            vip = fc.vip
            if vip is None:
                continue
            for spec in fc.servers:
                self._backends[(vip, spec.ip)] = _Backend(
                    spec.state, pool=PoolEntry(spec.weight, spec.state))

    # --- reading -----------------------------------------------------------------

    def entry(self, vip: IPAddress, ip: IPAddress) -> PoolEntry | None:
        """The backend in the workers' pools; None: not there (or leaving)."""
        b = self._backends.get((vip, ip))
        return None if b is None else b.pool

    def pooled(self) -> Iterator[tuple[Key, PoolEntry]]:
        """Every backend in the pools, with its entry, in the order first seen."""
        for key, b in self._backends.items():
            if b.pool is not None:
                yield key, b.pool

    def keys(self) -> list[Key]:
        """Every backend known, in the pools or not (leaving, removed)."""
        return list(self._backends)

    def serving(self, vip: IPAddress | None = None) -> Iterator[Key]:
        """The backends whose pools serve clients (not down), of ``vip`` or all."""
        for key, entry in self.pooled():
            if entry.state is not State.DOWN and (vip is None or key[0] == vip):
                yield key

    def admin(self, vip: IPAddress, ip: IPAddress) -> Admin:
        b = self._backends.get((vip, ip))
        return Admin.ENABLED if b is None else b.admin

    def verdict(self, vip: IPAddress, ip: IPAddress) -> Verdict:
        b = self._backends.get((vip, ip))
        return Verdict.UNKNOWN if b is None else b.verdict

    def configured(self, vip: IPAddress, ip: IPAddress) -> State | None:
        b = self._backends.get((vip, ip))
        return None if b is None else b.configured

    def transitions(self, vip: IPAddress, ip: IPAddress) -> int:
        b = self._backends.get((vip, ip))
        return 0 if b is None else b.transitions

    def running(self, vips: Iterable[IPAddress]) -> dict[str, dict[str, tuple[int, State]]]:
        """The pools as a reload compares them (``loaded.core.reload.Running``): each
        backend's weight and its state without health."""
        out: dict[str, dict[str, tuple[int, State]]] = {str(v): {} for v in vips}
        for (vip, ip), entry in self.pooled():
            pool = out.get(str(vip))
            if pool is not None:
                b = self._backends[(vip, ip)]
                rule = effective(b.admin, Verdict.UP, b.configured, cut=True)
                pool[str(ip)] = (entry.weight, b.configured if rule is None else rule[0])
        return out

    def index_of(self, vip: IPAddress, ip: IPAddress) -> int:
        """The backend's index in its pool, the same in every worker (a new one: the
        next free index of its VIP, kept for good)."""
        key = (vip, ip)
        index = self._indexes.get(key)
        if index is None:
            index = max((i for (v, _), i in self._indexes.items() if v == vip),
                        default=-1) + 1
            if index > MAX_INDEX:
                raise ValueError(f"no free backend index left for {vip}")
            self._indexes[key] = index
        return index

    def mark_of(self, vip: IPAddress, ip: IPAddress) -> int:
        """The conntrack path's mark for the backend."""
        return ct_mark(ip.version, self.index_of(vip, ip))

    def indexes(self) -> dict[tuple[str, str], int]:
        """Every index given so far, as ``build_engine`` takes them."""
        return {(str(v), str(ip)): i for (v, ip), i in self._indexes.items()}

    def replay(self) -> list[PoolCommand]:
        """What a worker built from the config needs to hold the view."""
        out: list[PoolCommand] = []
        for (vip, ip), b in self._backends.items():
            if not b.changed:
                continue  # as the config has it
            if b.pool is not None:
                out.append(AddBackend(vip, ip, b.pool.weight, b.pool.state,
                                      self.index_of(vip, ip)))
            elif b.removed is not None:
                out.append(b.removed)
        return out

    # --- what is said -> what to send ------------------------------------------------

    def state_command(self, vip: IPAddress, ip: IPAddress, *, cut: bool) -> SetState | None:
        """The state command the rules give the backend now (None: it is leaving)."""
        b = self._require(vip, ip)
        rule = effective(b.admin, b.verdict, b.configured, cut=cut)
        return None if rule is None else SetState(vip, ip, rule[0], cut=rule[1])

    def operator(self, command: PoolCommand, *, cut: bool) -> PoolCommand:
        """The operator asked ``command``: the command to send."""
        if isinstance(command, SetState):
            self._require(command.vip, command.backend).admin = ADMIN_OF[command.state]
            return self._state_now(command.vip, command.backend, cut=cut)
        return self._membership(command)

    def reloaded(self, command: PoolCommand, *, cut: bool) -> PoolCommand:
        """The file asked ``command`` (``loaded.core.reload``): the command to send."""
        if isinstance(command, SetState):
            b = self._require(command.vip, command.backend)
            b.configured = command.state
            b.admin = Admin.ENABLED
            return self._state_now(command.vip, command.backend, cut=cut)
        return self._membership(command)

    def _state_now(self, vip: IPAddress, ip: IPAddress, *, cut: bool) -> SetState:
        command = self.state_command(vip, ip, cut=cut)
        assert command is not None  # only a backend removing has none, and none says so
        return command

    def health(self, event: Event, *, cut: bool) -> PoolCommand | None:
        """A health event: the command to send, or None (no change of the pools,
        or a verdict the operator's word outranks)."""
        command = pool_command(event, cut=cut)
        if isinstance(event, StateChanged):
            b = self._backends.get((event.vip, event.ip))
            if b is None:
                return None
            b.verdict = Verdict.UP if event.up else Verdict.DOWN
            b.transitions += 1
            if b.admin not in HEALTH_FOLLOWS:
                return None
            return self.state_command(event.vip, event.ip, cut=cut)
        if isinstance(event, HostAdded):
            b = self._backends.setdefault((event.vip, event.ip), _Backend(State.UP))
            b.configured, b.admin, b.verdict = State.UP, Admin.ENABLED, Verdict.DOWN
        elif isinstance(event, HostRemoved):
            b = self._backends.get((event.vip, event.ip))
            if b is not None:
                b.admin, b.verdict = Admin.ENABLED, Verdict.UNKNOWN
        return command

    def _membership(self, command: PoolCommand) -> PoolCommand:
        key = (command.vip, command.backend)
        if isinstance(command, AddBackend):
            b = self._backends.setdefault(key, _Backend(command.state))
            b.configured, b.admin, b.verdict = command.state, Admin.ENABLED, Verdict.UNKNOWN
            return command
        if isinstance(command, RemoveBackend):
            b = self._require(*key)
            b.admin, b.verdict = Admin.REMOVING, Verdict.UNKNOWN
            return dataclasses.replace(command, graceful=True)
        assert isinstance(command, SetWeight)
        self._require(*key)
        return command

    # --- what was sent ---------------------------------------------------------------

    def sent(self, command: PoolCommand) -> PoolCommand:
        """``command`` goes to every worker: the view follows it. Returns it as it
        must go out (an ``add`` with its index)."""
        key = (command.vip, command.backend)
        b = self._backends.get(key)
        if isinstance(command, AddBackend):
            command = dataclasses.replace(command, index=self.index_of(*key))
            if b is None:
                b = self._backends[key] = _Backend(command.state)
            b.changed = True
            b.pool = PoolEntry(command.weight, command.state)
            b.removed = None
        elif b is None or b.pool is None:
            pass  # not in the pools: the workers refuse it alike
        elif isinstance(command, RemoveBackend):
            b.pool, b.removed, b.changed = None, command, True
        elif isinstance(command, SetWeight):
            b.pool, b.changed = PoolEntry(command.weight, b.pool.state), True
        else:
            b.pool, b.changed = PoolEntry(b.pool.weight, command.pool_state), True
        return command

    def _require(self, vip: IPAddress, ip: IPAddress) -> _Backend:
        b = self._backends.get((vip, ip))
        if b is None:
            raise KeyError(f"backend {ip} is not known for {vip}")
        return b
