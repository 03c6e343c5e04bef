"""Health of backends: rise and fall, when to probe, what discovery may add. Pure.

Nothing here opens a socket or reads a clock: time comes in as ``now``, probe
results and discovered hosts come in as values, and what to do next goes out
as commands (``Probe``, ``Discover``) and a deadline (``next_deadline``), in
the manner of h11 and of mitmproxy's proxy core. ``loaded.io.probes`` runs the
commands.

Rules
=====

- A *target* is one backend of one VIP, keyed by ``(vip, backend ip)``.
- Health is ``up`` or ``down``; results count in a row (HAProxy's ``rise`` and
  ``fall``): a target that is down needs ``rise`` successes in a row to come
  up, one that is up needs ``fall`` failures in a row to go down. A result
  that agrees with the state starts the count over, so results that alternate
  never change the state while both counts are above 1.
- Configured backends start up, as in the original (they serve at once), and
  are probed from the start. Backends configured ``state=down`` are not
  probed, and discovery leaves them alone.
- A check of ``none`` is never probed: the target stays up.
- Every target is probed once per ``interval``, all of them concurrently. The
  first probes of the configured targets are spread evenly over the first
  interval, so that a thousand backends make no burst; each target then keeps
  its phase. A probe still running when the next is due delays that one until
  its result is in (the next result is never lost, only late), and slots
  missed by a late runner are skipped, not caught up in a burst.
- Discovery runs at once and then every ``cycle`` seconds per VIP. A host it
  reports is considered only when it is of the VIP's family, not the VIP, not
  one of the balancer's own addresses, and inside the real-server network; any
  other host is ignored (``HostIgnored`` once, for a log line; the VIP and
  own addresses silently, since the balancer answering itself is normal).
- With hot-plugging off, a new host inside the network is only reported
  (``HostIgnored``, once). With it on, it becomes a target that starts down
  (``HostAdded``); it joins the pool when it passes ``rise`` checks
  (``StateChanged`` up). At most ``max_hotplug`` hosts per VIP.
- Discovery never takes a target away on its own: a configured backend that no
  longer answers the ping stays as long as its check passes (the original
  removed it, so a host that merely stops answering pings was lost). A
  hot-plugged target is removed (``HostRemoved``) after ``forget_after``
  discoveries in a row in which it was down and did not answer; one that
  answers but fails its check stays a down target rather than being removed
  and re-added every few cycles.

State machine
=============

Each result either confirms the state (the count starts over) or counts
towards the other state; the table says which, and ``NEEDED`` how many in a
row the move takes.
"""

from __future__ import annotations

import enum
import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import TYPE_CHECKING

from loaded.core.commands import AddBackend, PoolCommand, RemoveBackend, SetState
from loaded.core.pool import IPAddress, State

if TYPE_CHECKING:
    from loaded.core.config import Config

__all__ = [
    "NEEDED",
    "TRANSITIONS",
    "CheckResult",
    "CheckSpec",
    "Discover",
    "DiscoveryFailed",
    "DiscoverySpec",
    "Event",
    "Health",
    "HealthMonitor",
    "HostAdded",
    "HostIgnored",
    "HostRemoved",
    "Probe",
    "ServiceSpec",
    "Settings",
    "StateChanged",
    "TargetStatus",
    "Watch",
    "describe",
    "pool_command",
]


class Health(enum.StrEnum):
    UP = "up"
    DOWN = "down"


# (state, result ok) -> the state this result counts towards, or None when it
# confirms the current state.
TRANSITIONS: dict[tuple[Health, bool], Health | None] = {
    (Health.UP, True): None,
    (Health.UP, False): Health.DOWN,
    (Health.DOWN, True): Health.UP,
    (Health.DOWN, False): None,
}

# The setting that says how many results in a row a move to each state takes.
NEEDED: dict[Health, str] = {Health.DOWN: "fall", Health.UP: "rise"}

CHECK_KINDS = frozenset({"icmp", "tcp", "http", "https", "udp", "none"})
ALL_NODES = IPv6Address("ff02::1")
# The original listened 3 s for echo replies; more only delays the next cycle.
DISCOVERY_WAIT = 3.0
# Hosts remembered as ignored, per VIP: enough for any real segment, and a
# bound on what a flood of forged replies can cost.
MAX_IGNORED = 4096

IPNetwork = IPv4Network | IPv6Network
TargetKey = tuple[IPAddress, IPAddress]  # (vip, backend ip)


# --------------------------------------------------------------------------
# Values in and out


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The outcome of one probe. ``reason`` is short and stable, for logs and
    tests: ``ok``, ``timeout``, ``refused``, ``unreachable``, ``reset``,
    ``status 503``, ``error: ...``."""

    ok: bool
    reason: str
    latency: float = 0.0


@dataclass(frozen=True, slots=True)
class CheckSpec:
    """How to probe a target. ``port`` is unused by ``icmp`` and ``none``."""

    kind: str = "tcp"
    port: int = 80
    timeout: float = 1.0
    http_path: str = "/"
    http_status: int = 200
    udp_payload: bytes = b""

    def __post_init__(self) -> None:
        if self.kind not in CHECK_KINDS:
            raise ValueError(f"unknown check {self.kind!r}")
        if not 0 < self.timeout < math.inf:
            raise ValueError(f"check timeout must be positive, not {self.timeout!r}")
        if self.kind not in ("icmp", "none") and not 1 <= self.port <= 65535:
            raise ValueError(f"check port {self.port} out of range 1..65535")

    @property
    def label(self) -> str:
        """``tcp:80``, ``http:8080/health``, ``icmp``: the check in a log line."""
        if self.kind in ("icmp", "none"):
            return self.kind
        if self.kind in ("http", "https"):
            return f"{self.kind}:{self.port}{self.http_path}"
        return f"{self.kind}:{self.port}"


@dataclass(frozen=True, slots=True)
class Probe:
    """Command: probe ``ip`` (a backend of ``vip``) with ``check``, and feed the
    result to ``HealthMonitor.result``."""

    vip: IPAddress
    ip: IPAddress
    check: CheckSpec

    @property
    def target(self) -> TargetKey:
        return (self.vip, self.ip)

    @property
    def timeout(self) -> float:
        return self.check.timeout


@dataclass(frozen=True, slots=True)
class Discover:
    """Command: ping ``target`` (a broadcast address, or all-nodes on
    ``ifname``) from ``source``, collect the repliers for ``timeout`` seconds,
    feed them to ``HealthMonitor.discovered`` (or report a failure to
    ``discovery_failed``)."""

    vip: IPAddress
    target: IPAddress
    ifname: str | None
    source: IPAddress | None
    timeout: float

    @property
    def family(self) -> int:
        return self.target.version


@dataclass(frozen=True, slots=True)
class StateChanged:
    """A target went up or down. ``pool_state`` is what its pool state becomes:
    its configured state (up or draining) when it comes up, down otherwise.
    ``count`` is how many results in a row decided it."""

    vip: IPAddress
    ip: IPAddress
    up: bool
    reason: str
    since: float
    check: str = ""
    count: int = 0
    pool_state: State = State.UP


@dataclass(frozen=True, slots=True)
class HostAdded:
    """Discovery found a new host and hot-plugging is on: it is a target now,
    down until it passes ``rise`` checks."""

    vip: IPAddress
    ip: IPAddress
    since: float


@dataclass(frozen=True, slots=True)
class HostRemoved:
    vip: IPAddress
    ip: IPAddress
    reason: str
    since: float


@dataclass(frozen=True, slots=True)
class HostIgnored:
    """Discovery found a host that is not taken; reported once per host."""

    vip: IPAddress
    ip: IPAddress
    reason: str


@dataclass(frozen=True, slots=True)
class DiscoveryFailed:
    vip: IPAddress
    reason: str


Event = StateChanged | HostAdded | HostRemoved | HostIgnored | DiscoveryFailed


@dataclass(frozen=True, slots=True)
class TargetStatus:
    """A snapshot of one target, for statistics."""

    vip: IPAddress
    ip: IPAddress
    up: bool
    since: float
    reason: str
    latency: float
    check: str
    hotplugged: bool
    checks: int
    last_ok: bool | None = None  # the latest probe's result; None before the first
    last_at: float | None = None  # when it came (monotonic)


# --------------------------------------------------------------------------
# What the monitor watches


@dataclass(frozen=True, slots=True)
class Watch:
    """A configured backend to watch. ``check`` None: the settings' check.
    ``state`` is the pool state it returns to when healthy (up or draining)."""

    ip: IPAddress
    check: CheckSpec | None = None
    state: State = State.UP


@dataclass(frozen=True, slots=True)
class DiscoverySpec:
    target: IPAddress
    ifname: str | None = None
    source: IPAddress | None = None


@dataclass(frozen=True)
class ServiceSpec:
    """One VIP: the backends to watch, the configured backends not to watch
    (``state=down``: discovery must not take them for new hosts either), the
    real-server network and how to discover hosts (None: no discovery)."""

    vip: IPAddress
    backends: tuple[Watch, ...] = ()
    unwatched: frozenset[IPAddress] = frozenset()
    real_net: IPNetwork | None = None
    discovery: DiscoverySpec | None = None


@dataclass(frozen=True)
class Settings:
    check: CheckSpec = field(default_factory=CheckSpec)
    interval: float = 2.0
    rise: int = 2
    fall: int = 3
    hotplug: bool = False
    cycle: float = 30.0
    discovery_wait: float = DISCOVERY_WAIT
    forget_after: int = 3
    max_hotplug: int = 1024

    def __post_init__(self) -> None:
        if not 0 < self.interval < math.inf:
            raise ValueError(f"interval must be positive, not {self.interval!r}")
        if not 0 < self.cycle < math.inf:
            raise ValueError(f"cycle must be positive, not {self.cycle!r}")
        if self.rise < 1 or self.fall < 1 or self.forget_after < 1:
            raise ValueError("rise, fall and forget_after must be at least 1")
        if self.max_hotplug < 0:
            raise ValueError("max_hotplug must not be negative")
        if not 0 < self.discovery_wait < math.inf:
            raise ValueError("discovery_wait must be positive")

    def needed(self, state: Health) -> int:
        return self.rise if NEEDED[state] == "rise" else self.fall


# --------------------------------------------------------------------------
# The monitor


class _Target:
    __slots__ = (
        "anchor", "check", "checks", "count", "health", "hotplugged", "in_flight",
        "ip", "last_at", "last_ok", "latency", "missed", "next_due", "overdue", "pool_state",
        "reason", "since", "vip",
    )

    def __init__(self, vip: IPAddress, ip: IPAddress, check: CheckSpec, health: Health,
                 now: float, first_due: float, hotplugged: bool,
                 pool_state: State) -> None:
        self.vip = vip
        self.ip = ip
        self.check = check
        self.health = health
        self.count = 0  # results in a row towards the other state
        self.since = now
        self.reason = "configured" if not hotplugged else "discovered"
        self.latency = 0.0
        self.checks = 0
        self.last_ok: bool | None = None
        self.last_at: float | None = None
        self.anchor = first_due  # the phase of this target's probes
        self.next_due = first_due
        self.in_flight = False
        self.overdue = False
        self.hotplugged = hotplugged
        self.missed = 0  # discoveries in a row down and unseen (hot-plugged only)
        self.pool_state = pool_state


class _Service:
    __slots__ = ("discovering", "ignored", "next_discovery", "spec")

    def __init__(self, spec: ServiceSpec, now: float) -> None:
        self.spec = spec
        self.next_discovery = now
        self.discovering = False
        self.ignored: set[IPAddress] = set()


class HealthMonitor:
    """Health of every backend of every VIP, driven by results and time.

    Not thread-safe: one owner calls it (``loaded.io.probes.HealthRunner``).
    """

    def __init__(self, services: Iterable[ServiceSpec], settings: Settings, now: float,
                 own: Iterable[IPAddress] = ()) -> None:
        self.settings = settings
        self._own = frozenset(_plain(ip) for ip in own)
        self._services: dict[IPAddress, _Service] = {}
        self._targets: dict[TargetKey, _Target] = {}
        self._heap: list[tuple[float, int, TargetKey]] = []
        self._serial = 0
        specs = list(services)
        watched = [(s, w) for s in specs for w in s.backends]
        probed = sum(1 for _, w in watched if (w.check or settings.check).kind != "none")
        k = 0
        for s in specs:
            if s.vip in self._services:
                raise ValueError(f"VIP {s.vip} given twice")
            self._services[s.vip] = _Service(s, now)
        for s, w in watched:
            if w.ip.version != s.vip.version:
                raise ValueError(f"backend {w.ip} and VIP {s.vip} are of different families")
            if (s.vip, w.ip) in self._targets:
                raise ValueError(f"backend {w.ip} of {s.vip} given twice")
            check = w.check or settings.check
            if check.timeout > settings.interval:
                raise ValueError(f"check timeout {check.timeout} is longer than the "
                                 f"interval {settings.interval}")
            first = now
            if check.kind != "none":
                first = now + settings.interval * k / probed
                k += 1
            self._add(_Target(s.vip, w.ip, check, Health.UP, now, first, False, w.state))

    @classmethod
    def from_config(cls, config: Config, now: float, families: Iterable[int] | None = None,
                    own: Iterable[IPAddress] = ()) -> HealthMonitor:
        """The monitor for ``config``'s health keys. ``own``: addresses of the
        balancer beyond the VIPs and ``private_GW``, which are always its own.

        IPv4 discovery pings ``broadcast``, or the broadcast address of RIP4
        when that is not given; IPv6 discovery pings ff02::1 on
        ``private_NIC``. Without a target, that family has no discovery.
        """
        check = CheckSpec(config.check, config.check_port, config.check_timeout,
                          config.http_path, config.http_status, config.udp_payload)
        settings = Settings(check=check, interval=config.check_interval, rise=config.rise,
                            fall=config.fall, hotplug=config.hotplug,
                            cycle=config.check_cycle,
                            discovery_wait=min(DISCOVERY_WAIT, config.check_cycle))
        services = []
        mine: set[IPAddress] = set(own)
        for family in families if families is not None else config.families():
            fc = config.family(family)
            vip, specs, rip, gw = fc.vip, fc.servers, fc.rip, fc.private_gw
            if vip is None:
                raise ValueError(f"no IPv{family} VIP in {config.path}")
            mine.add(vip)
            if gw is not None:
                mine.add(gw)
            watches = tuple(
                Watch(b.ip, None if b.check is None else
                      CheckSpec(b.check, check.port, check.timeout, check.http_path,
                                check.http_status, check.udp_payload), b.state)
                for b in specs if b.state is not State.DOWN)
            unwatched = frozenset(b.ip for b in specs if b.state is State.DOWN)
            target: IPAddress | None = None
            if family == 4:
                target = config.broadcast
                if target is None and isinstance(rip, IPv4Network) and rip.prefixlen < 31:
                    target = rip.broadcast_address
            elif config.private_nic is not None:
                target = ALL_NODES
            discovery = (DiscoverySpec(target, config.private_nic, gw)
                         if target is not None else None)
            services.append(ServiceSpec(vip, watches, unwatched, rip, discovery))
        return cls(services, settings, now, own=mine)

    # -- commands out

    def due(self, now: float) -> list[Probe]:
        """The probes to start now. Each target is marked in flight until its
        result comes back through ``result``."""
        probes: list[Probe] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            due, _, key = heapq.heappop(heap)
            t = self._targets.get(key)
            if t is None or t.next_due != due:
                continue  # removed, or rescheduled since
            if t.in_flight:
                t.overdue = True  # ``result`` reschedules it
                continue
            t.in_flight = True
            # A late runner skips slots instead of probing twice in a row.
            self._schedule(t, _next_slot(t.anchor, self.settings.interval, now))
            probes.append(Probe(t.vip, t.ip, t.check))
        return probes

    def due_discovery(self, now: float) -> list[Discover]:
        """The discoveries to start now; each is in flight until ``discovered``
        or ``discovery_failed`` is called for its VIP."""
        out: list[Discover] = []
        for svc in self._services.values():
            d = svc.spec.discovery
            if d is None or svc.discovering or svc.next_discovery > now:
                continue
            svc.discovering = True
            svc.next_discovery = _next_slot(svc.next_discovery, self.settings.cycle, now)
            out.append(Discover(svc.spec.vip, d.target, d.ifname, d.source,
                                self.settings.discovery_wait))
        return out

    def next_deadline(self, now: float) -> float | None:
        """When ``due`` or ``due_discovery`` next has something to start, or None
        if nothing is scheduled. May be <= now: something is due already."""
        heap = self._heap
        while heap:
            due, _, key = heap[0]
            t = self._targets.get(key)
            if t is not None and t.next_due == due:
                break
            heapq.heappop(heap)  # removed, or rescheduled since
        deadline = heap[0][0] if heap else None
        for svc in self._services.values():
            if svc.spec.discovery is not None and not svc.discovering and (
                    deadline is None or svc.next_discovery < deadline):
                deadline = svc.next_discovery
        return deadline

    # -- events in

    def result(self, target: TargetKey | Probe, result: CheckResult,
               now: float) -> list[Event]:
        """Feed the result of a probe; returns a ``StateChanged`` when it decides one.
        A result for a target removed meanwhile is ignored."""
        key = target.target if isinstance(target, Probe) else target
        t = self._targets.get(key)
        if t is None:
            return []
        t.in_flight = False
        t.checks += 1
        t.reason = result.reason
        t.latency = result.latency
        t.last_ok = result.ok
        t.last_at = now
        events: list[Event] = []
        towards = TRANSITIONS[(t.health, result.ok)]
        if towards is None:
            t.count = 0
        else:
            t.count += 1
            if t.count >= self.settings.needed(towards):
                t.health = towards
                t.since = now
                up = towards is Health.UP
                events.append(StateChanged(
                    t.vip, t.ip, up, result.reason, now, t.check.label, t.count,
                    t.pool_state if up else State.DOWN))
                t.count = 0
                if up:
                    t.missed = 0
        if t.overdue:
            t.overdue = False
            self._schedule(t, now)
        return events

    def discovered(self, vip: IPAddress, hosts: Iterable[IPAddress],
                   now: float) -> list[Event]:
        """Feed the hosts that answered a discovery of ``vip``."""
        svc = self._require(vip)
        svc.discovering = False
        spec = svc.spec
        net = spec.real_net
        events: list[Event] = []
        seen: set[IPAddress] = set()
        added: set[IPAddress] = set()
        hotplugged = sum(1 for t in self._targets.values() if t.vip == vip and t.hotplugged)
        mine = {_plain(h) for h in hosts if h.version == vip.version}
        for h in sorted(mine, key=int):
            if h == vip or h in self._own:
                continue
            if net is None:
                self._ignore(svc, h, f"no RIP{vip.version} set", events)
            elif h not in net or not _host_address(h, net):
                self._ignore(svc, h, f"outside RIP{vip.version} {net}", events)
            elif (vip, h) in self._targets or h in spec.unwatched:
                seen.add(h)
            elif not self.settings.hotplug:
                self._ignore(svc, h, "hotplug off", events)
            elif hotplugged >= self.settings.max_hotplug:
                self._ignore(svc, h, "too many hot-plugged hosts", events)
            else:
                self._add(_Target(vip, h, self.settings.check, Health.DOWN, now, now, True,
                                  State.UP))
                svc.ignored.discard(h)
                hotplugged += 1
                seen.add(h)
                added.add(h)
                events.append(HostAdded(vip, h, now))
        for t in [t for t in self._targets.values() if t.vip == vip and t.hotplugged]:
            if t.ip in added:
                continue
            if t.health is Health.DOWN and t.ip not in seen:
                t.missed += 1
            else:
                t.missed = 0
            if t.missed >= self.settings.forget_after:
                del self._targets[(vip, t.ip)]
                events.append(HostRemoved(vip, t.ip, f"down and silent for {t.missed} "
                                                     f"discoveries", now))
        return events

    def watch(self, vip: IPAddress, ip: IPAddress, now: float, *, up: bool = True,
              pool_state: State = State.UP) -> bool:
        """Start checking a backend the operator added at run time (probed at once).
        It starts ``up`` as a configured backend does: it is in service already.
        False if it is watched already."""
        self._require(vip)
        if (vip, ip) in self._targets:
            return False
        self._add(_Target(vip, ip, self.settings.check, Health.UP if up else Health.DOWN,
                          now, now, False, pool_state))
        return True

    def unwatch(self, vip: IPAddress, ip: IPAddress) -> bool:
        """Stop checking a backend that left the pool; a probe in flight is ignored."""
        return self._targets.pop((vip, ip), None) is not None

    def discovery_failed(self, vip: IPAddress, reason: str, now: float) -> list[Event]:
        """A discovery of ``vip`` could not run; the next one is tried on schedule.
        Hot-plugged targets are not counted as unseen for it."""
        svc = self._require(vip)
        svc.discovering = False
        return [DiscoveryFailed(vip, reason)]

    # -- inspection

    def status(self) -> list[TargetStatus]:
        return [TargetStatus(t.vip, t.ip, t.health is Health.UP, t.since, t.reason,
                             t.latency, t.check.label, t.hotplugged, t.checks, t.last_ok,
                             t.last_at)
                for t in self._targets.values()]

    def health(self, vip: IPAddress, ip: IPAddress) -> Health | None:
        t = self._targets.get((vip, ip))
        return None if t is None else t.health

    def __len__(self) -> int:
        return len(self._targets)

    def __contains__(self, key: object) -> bool:
        return key in self._targets

    # -- internals

    def _require(self, vip: IPAddress) -> _Service:
        svc = self._services.get(vip)
        if svc is None:
            raise KeyError(f"no service for VIP {vip}")
        return svc

    def _add(self, t: _Target) -> None:
        self._targets[(t.vip, t.ip)] = t
        if t.check.kind != "none":
            self._schedule(t, t.next_due)

    def _schedule(self, t: _Target, when: float) -> None:
        t.next_due = when
        self._serial += 1
        heapq.heappush(self._heap, (when, self._serial, (t.vip, t.ip)))

    @staticmethod
    def _ignore(svc: _Service, h: IPAddress, reason: str, events: list[Event]) -> None:
        if h in svc.ignored or len(svc.ignored) >= MAX_IGNORED:
            return
        svc.ignored.add(h)
        events.append(HostIgnored(svc.spec.vip, h, reason))


def _next_slot(anchor: float, period: float, now: float) -> float:
    """The first ``anchor + k * period`` after ``now``, k >= 1."""
    k = max(math.floor((now - anchor) / period) + 1, 1)
    # Rounding can land the division a hair short: 16.4 - 0.4 over 2 is
    # 7.999..., which would give a slot equal to now.
    while anchor + k * period <= now:
        k += 1
    return anchor + k * period


def _plain(ip: IPAddress) -> IPAddress:
    """``ip`` without an IPv6 zone (``fe80::1%eth0``), which would make equal
    addresses compare unequal."""
    if isinstance(ip, IPv6Address) and ip.scope_id is not None:
        return IPv6Address(ip.packed)
    return ip


def _host_address(ip: IPAddress, net: IPNetwork) -> bool:
    """Not the network's own or (IPv4) broadcast address: no host has them."""
    if isinstance(ip, IPv4Address) and net.prefixlen < 31:
        return ip not in (net.network_address, net.broadcast_address)
    return not (ip.is_multicast or ip.is_unspecified)


# --------------------------------------------------------------------------
# Events for logs and for the pools


def describe(event: Event) -> str:
    """One log line for ``event``: ``event=backend-down vip=... backend=...
    check=tcp:80 reason=timeout count=3``. Field names are stable; a value with
    a blank, a quote or ``=`` is double-quoted."""
    fields: list[tuple[str, object]]
    if isinstance(event, StateChanged):
        fields = [("event", "backend-up" if event.up else "backend-down"),
                  ("vip", event.vip), ("backend", event.ip), ("check", event.check),
                  ("reason", event.reason), ("count", event.count)]
    elif isinstance(event, HostAdded):
        fields = [("event", "host-added"), ("vip", event.vip), ("backend", event.ip),
                  ("state", "down")]
    elif isinstance(event, HostRemoved):
        fields = [("event", "host-removed"), ("vip", event.vip), ("backend", event.ip),
                  ("reason", event.reason)]
    elif isinstance(event, HostIgnored):
        fields = [("event", "host-ignored"), ("vip", event.vip), ("host", event.ip),
                  ("reason", event.reason)]
    else:
        fields = [("event", "discovery-failed"), ("vip", event.vip),
                  ("reason", event.reason)]
    return " ".join(f"{k}={_value(v)}" for k, v in fields)


def _value(v: object) -> str:
    s = str(v)
    if not s or any(c in s for c in ' \t"=\\') or not s.isprintable():
        escaped = s.replace("\\", "\\\\").replace('"', '\\"')
        return '"' + "".join(c if c.isprintable() else f"\\x{ord(c):02x}"
                             for c in escaped) + '"'
    return s


def pool_command(event: Event, *, cut: bool) -> PoolCommand | None:
    """The pool command for ``event``, or None when the pools need no change.
    ``cut`` is ``on_backend_down=cut``: without it a backend that went down keeps
    its existing clients (as draining)."""
    if isinstance(event, StateChanged):
        return SetState(event.vip, event.ip, event.pool_state, cut=cut)
    if isinstance(event, HostAdded):
        # Joins as down: the pool takes it only once it comes up.
        return AddBackend(event.vip, event.ip, weight=1, state=State.DOWN)
    if isinstance(event, HostRemoved):
        return RemoveBackend(event.vip, event.ip)
    return None
