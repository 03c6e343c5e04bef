"""The data paths: one object each, saying everything that differs between them.

A data path decides, from the same config, pools and workers:

==================  ================================  ================================
                    ``perpacket``                     ``conntrack`` (the default)
==================  ================================  ================================
queued              every packet to a VIP and every   only what conntrack calls NEW,
                    packet from the real-server net   and not a recalled client's
                    (no conntrack for either)
worker's handler    ``on_packet``: every packet       ``on_first_packet``: a mark for
                    decided, steered by mark or       the first packet, its client
                    rewritten                         handed to the kernel
nft table           ``steer`` (mark -> destination),  ``recall``, ``steer``
                    ``reply`` (source -> VIP)         (DNAT), ``tally``
a backend target    ``@backends`` + reply counter     ``@backends`` + both-ways counter
kernel memory       none                              conntrack entries and the
                                                      ``@clients`` maps
cut / disable       nothing to forget                 its connections and clients,
                                                      again a moment later
graceful remove     nothing                           its clients (connections stay)
first backend up    nothing                           connections the stack took
                                                      unbalanced
status              ``reply_counters``                ``counters``, ``kernel_drops``
                                                      and the stats' ``conntrack``
==================  ================================  ================================

(``loaded.core.plan`` gives the tables' full rules.) A new data path is one
more subclass of ``DataPath`` in ``DATAPATHS``; the plan, kernel, supervisor,
operator and workers ask the object, never its name. Pure: rules and
decisions, no I/O; ``loaded.io.kernel`` and ``loaded.daemon`` carry them out.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from loaded.core.commands import AddBackend, PoolCommand, RemoveBackend, SetState
from loaded.core.firewall import (
    ADDR_TYPE,
    IP,
    Chain,
    IPAddress,
    IPNetwork,
    dns_pairs,
    mark_match,
    mark_target,
    nft_table_name,
    queue_target,
    to_workers,
)
from loaded.core.pool import CT_FAMILY_MASK, CT_MARK_BASE, State, ct_mark
from loaded.core.status import KernelHashStatus
from loaded.core.strategies import HASH_STRATEGIES

PacketHandler = Callable[[memoryview, bool], int]  # (payload, partial) -> verdict
Counters = Mapping[int, tuple[int, int]]  # mark -> (packets, bytes)
Backends = list[tuple[int, int, IPAddress]]  # (family, index, address)


class Worker(Protocol):
    """A worker's packet handlers, one per data path (``loaded.daemon.worker``)."""

    def on_packet(self, payload: memoryview, partial: bool) -> int: ...
    def on_first_packet(self, payload: memoryview, partial: bool) -> int: ...


@dataclass(frozen=True)
class Forget:
    """What the kernel must forget after a pool command (nothing by default)."""

    clients: bool = False  # the backend's clients in the kernel's client memory
    connections: bool = False  # the backend's connections (by their mark)
    again: bool = False  # both once more a moment later (a worker's late answer)
    unbalanced: bool = False  # connections to a VIP that carry no backend's mark

    @property
    def backend(self) -> bool:
        """Whether it concerns the command's backend (and so needs its mark)."""
        return self.clients or self.connections


NOTHING = Forget()


@dataclass(frozen=True)
class KernelView:
    """What the status and the stats file show of the kernel's counters."""

    counters: Counters | None = None  # per backend, both ways (replaces the workers')
    reply_counters: Counters | None = None  # per backend, the replies rewritten in the kernel
    kernel_drops: Mapping[str, int] | None = None  # dropped before any worker saw them
    kernel_hash: KernelHashStatus | None = None  # the kernel's hash table, if any
    stats: Mapping[str, Any] = field(default_factory=dict)  # extra keys of the stats file


@dataclass(frozen=True)
class KernelHash:
    """The kernel's hash table (``@hash4``/``@hash6``: bucket -> backend mark, looked
    up by ``jhash`` of the client's address) and who decides with it.

    ``decides``: the kernel picks every new TCP or UDP client's backend with it
    (``sh``, ``maglev`` on the conntrack path): no worker sees them. ``fallback``:
    only the new clients that no worker took (a full queue, no worker bound:
    ``fail_open=hash``). The daemon keeps the buckets equal to the table the
    workers build (``loaded.core.strategies.hash_table``)."""

    strategy: str
    size: int
    seed: int
    decides: bool = False
    fallback: bool = False


class DataPath(ABC):
    name: ClassVar[str]
    # The kernel remembers the clients it sends to a backend (its client maps).
    remembers_clients: ClassVar[bool] = False
    # Only a connection's first packet reaches a worker (the rest is conntrack's).
    first_packets_only: ClassVar[bool] = False

    def __repr__(self) -> str:
        return f"<datapath {self.name}>"

    def kernel_hash(self, strategy: str, fail_open: str, size: int, seed: int
                    ) -> KernelHash | None:
        """The kernel's hash table on this path, or None when it needs none."""
        return None

    def queue_length(self, fail_open: str, hashing: KernelHash | None) -> int:
        """The queue length when the config gives none (``nfq_len``)."""
        return 4096

    def queue_bypass(self, fail_open: str, hashing: KernelHash | None) -> bool:
        """Whether a full queue, or one no worker reads, lets packets through
        (``--queue-bypass`` and the queue's fail-open flag): always with
        ``fail_open=yes``; with ``hash`` when the kernel has a table to take
        them, else ``hash`` is as ``no``."""
        return fail_open == "yes" or (fail_open == "hash" and hashing is not None)

    @abstractmethod
    def chains(self, family: int, tag: str, vip: IPAddress, rip: IPNetwork,
               nameservers: list[IPAddress], queues: tuple[int, ...],
               fail_open: bool) -> list[Chain]:
        """The iptables chains of one family that queue packets to the workers."""

    @abstractmethod
    def nft(self, tag: str, vips: dict[int, IPAddress], rips: dict[int, IPNetwork],
            nameservers: tuple[IPAddress, ...], backends: Backends, max_clients: int,
            client_timeout: int, hashing: KernelHash | None = None
            ) -> tuple[tuple[dict[str, Any], ...], tuple[str, ...]]:
        """The nftables table: JSON API commands, then rules in nft's own syntax
        (the hash table's buckets are loaded at run time: ``nft_hash_buckets``)."""

    @abstractmethod
    def backend_target(self, tag: str, version: int, index: int, ip: IPAddress
                       ) -> list[dict[str, Any]]:
        """The nft commands that make ``ip`` the target of its mark (a backend added
        at run time; again for the same mark: no-op)."""

    @abstractmethod
    def packet_handler(self, worker: Worker) -> PacketHandler:
        """The worker's handler for every queued packet."""

    def forgets(self, command: PoolCommand, was_empty: bool) -> Forget:
        """What ``command`` (as sent to the workers) makes the kernel forget;
        ``was_empty``: no backend of its VIP served before it."""
        return NOTHING

    def at_start(self) -> Forget:
        """What the kernel must forget once the rules are in place."""
        return NOTHING

    @abstractmethod
    def kernel_view(self, counters: Counters, invalid: int) -> KernelView:
        """The table's counters (per backend mark, and the invalid drops) as shown."""


class PerPacket(DataPath):
    """Every packet through a worker; the kernel only steers and rewrites replies."""

    name = "perpacket"

    def chains(self, family: int, tag: str, vip: IPAddress, rip: IPNetwork,
               nameservers: list[IPAddress], queues: tuple[int, ...],
               fail_open: bool) -> list[Chain]:
        v, r = str(vip), str(rip)
        dns = dns_pairs(nameservers)
        raw_rules: list[tuple[str, ...]] = [("-d", v, "-j", "CT", "--notrack")]
        raw_rules += [("-s", r, "-d", ns, "-p", p, "--dport", "53", "-j", "RETURN")
                      for ns, p in dns]
        raw_rules.append(("-s", r, "-j", "CT", "--notrack"))
        out_rules: list[tuple[str, ...]] = [
            ("-d", ns, "-p", p, "--dport", "53", "-j", "RETURN") for ns, p in dns]
        out_rules.append(queue_target(queues, fail_open))
        return [
            Chain(family, "raw", "PREROUTING", f"LOADED-RAW-{tag}", (), tuple(raw_rules)),
            Chain(family, "mangle", "PREROUTING", f"LOADED-IN-{tag}", ("-d", v),
                  tuple(to_workers(family, tag, queues, fail_open))),
            Chain(family, "filter", "FORWARD", f"LOADED-OUT-{tag}", ("-s", r),
                  tuple(out_rules)),
        ]

    def kernel_hash(self, strategy: str, fail_open: str, size: int, seed: int
                    ) -> KernelHash | None:
        # Every packet of a flow is decided alone here: a packet that bypasses a
        # full queue may take the kernel's table only when the workers' choice
        # is that same table (a hash strategy); otherwise it would land a flow's
        # packets on two backends.
        if fail_open == "hash" and strategy in HASH_STRATEGIES:
            return KernelHash(strategy, size, seed, fallback=True)
        return None

    def nft(self, tag: str, vips: dict[int, IPAddress], rips: dict[int, IPNetwork],
            nameservers: tuple[IPAddress, ...], backends: Backends, max_clients: int,
            client_timeout: int, hashing: KernelHash | None = None
            ) -> tuple[tuple[dict[str, Any], ...], tuple[str, ...]]:
        cmds = nft_perpacket_ruleset(tag, vips, rips, nameservers, backends)
        if hashing is None:
            return cmds, ()
        # Before the steer rule (``insert``): the mark it sets is steered at once.
        return (cmds + nft_hash_maps(tag),
                tuple(f"insert rule inet {nft_table_name(tag)} steer "
                      f"{rule}" for rule in hash_rules(vips, hashing, new_only=False)))

    def backend_target(self, tag: str, version: int, index: int, ip: IPAddress
                       ) -> list[dict[str, Any]]:
        return nft_perpacket_backend(tag, version, index, ip)

    def packet_handler(self, worker: Worker) -> PacketHandler:
        return worker.on_packet

    def kernel_view(self, counters: Counters, invalid: int) -> KernelView:
        return KernelView(reply_counters=counters)


class Conntrack(DataPath):
    """First packets through a worker; kernel NAT and conntrack carry the rest, and
    the kernel recalls the clients the workers decided for."""

    name = "conntrack"
    first_packets_only = True
    remembers_clients = True

    def chains(self, family: int, tag: str, vip: IPAddress, rip: IPNetwork,
               nameservers: list[IPAddress], queues: tuple[int, ...],
               fail_open: bool) -> list[Chain]:
        # A client the kernel recalls (its backend's mark is set) is not queued.
        recalled = ("-m", "mark", "--mark", f"{ct_mark(family, 0):#x}/{CT_FAMILY_MASK:#x}",
                    "-j", "RETURN")
        return [Chain(family, "mangle", "PREROUTING", f"LOADED-IN-{tag}",
                      ("-d", str(vip), "-m", "conntrack", "--ctstate", "NEW"),
                      (recalled, *to_workers(family, tag, queues, fail_open)))]

    def kernel_hash(self, strategy: str, fail_open: str, size: int, seed: int
                    ) -> KernelHash | None:
        if strategy in HASH_STRATEGIES:
            return KernelHash(strategy, size, seed, decides=True)
        if fail_open == "hash":
            # rr, wrr, lc, weighted stay the workers'; the kernel's Maglev table
            # only catches what they cannot take, and the kernel remembers the
            # client's backend as it does theirs.
            return KernelHash("maglev", size, seed, fallback=True)
        return None

    def queue_length(self, fail_open: str, hashing: KernelHash | None) -> int:
        # Only first packets wait here, and with a table to take the overflow a
        # short queue is a bound on the delay: at the ~25,000 first packets a
        # second a worker decides, 256 wait at most ~10 ms; the flood's rest goes
        # to the kernel's table at once (docs/benchmarks.md, "New clients": during
        # a flood at top speed first-time clients waited 2.3-3.3 ms (median) with
        # 256 against 43-72 ms with 4096).
        if fail_open == "hash" and hashing is not None:
            return 256
        return 4096

    def nft(self, tag: str, vips: dict[int, IPAddress], rips: dict[int, IPNetwork],
            nameservers: tuple[IPAddress, ...], backends: Backends, max_clients: int,
            client_timeout: int, hashing: KernelHash | None = None
            ) -> tuple[tuple[dict[str, Any], ...], tuple[str, ...]]:
        cmds = nft_ruleset(tag, vips, backends, max_clients)
        text = nft_recall(tag, vips, client_timeout)
        if hashing is None:
            return cmds, text
        name = nft_table_name(tag)
        rules = hash_rules(vips, hashing, new_only=True)
        if hashing.decides:
            # After the recall rule: a client the kernel remembers keeps its backend.
            text += tuple(f"add rule inet {name} recall {r}" for r in rules)
            return cmds + nft_hash_maps(tag), text
        # At the head of steer, after the mangle chain (-150) that queues: what
        # the queue let through without a worker's mark; a NAT chain sees only a
        # connection's first packet, so the rest of the flow pays nothing.
        text += tuple(f"insert rule inet {name} steer {r}" for r in rules)
        return cmds + nft_hash_maps(tag), text

    def backend_target(self, tag: str, version: int, index: int, ip: IPAddress
                       ) -> list[dict[str, Any]]:
        return nft_backend(tag, version, index, ip)

    def packet_handler(self, worker: Worker) -> PacketHandler:
        return worker.on_first_packet

    def forgets(self, command: PoolCommand, was_empty: bool) -> Forget:
        if (isinstance(command, RemoveBackend) and not command.graceful) or (
                isinstance(command, SetState) and command.state is State.DOWN
                and command.cut):
            # The workers choose elsewhere from now on; the kernel must forget the
            # connections it still carries to this backend and its clients. Once
            # more a moment later, for a first packet a worker answered before it
            # heard the news.
            return Forget(clients=True, connections=True, again=True)
        if isinstance(command, RemoveBackend):
            # Leaving gracefully: its connections finish, and its clients stay as
            # long as the workers' tables keep them; the kernel, which refreshes a
            # client at each new connection, must not keep sending them there for
            # ever. (Draining needs nothing: the same rule holds in both.)
            return Forget(clients=True)
        if was_empty and (isinstance(command, AddBackend) or (
                isinstance(command, SetState) and command.state is State.UP)):
            return Forget(unbalanced=True)
        return NOTHING

    def at_start(self) -> Forget:
        # What conntrack took while no daemon ran (fail-open) is bound to the
        # balancer's own stack.
        return Forget(unbalanced=True)

    def kernel_view(self, counters: Counters, invalid: int) -> KernelView:
        return KernelView(
            counters=counters, kernel_drops={"conntrack-invalid": invalid},
            stats={"conntrack": {
                "invalid": invalid,
                "backends": {f"{mark:#x}": list(v) for mark, v in counters.items()}}})


DATAPATHS: dict[str, DataPath] = {p.name: p for p in (PerPacket(), Conntrack())}


def datapath(name: str) -> DataPath:
    try:
        return DATAPATHS[name]
    except KeyError:
        raise ValueError(f"no data path {name!r} (known: {', '.join(DATAPATHS)})") from None


# --- the conntrack path's table ---------------------------------------------------


def nft_backend(tag: str, version: int, index: int, ip: IPAddress) -> list[dict[str, Any]]:
    """Commands that make ``ip`` a target of the conntrack path under its mark,
    its connections counted by their mark."""
    return mark_target(tag, version, index, ip, ("counters", ct_mark(version, index)))


def nft_recall(tag: str, vips: dict[int, IPAddress], timeout: int) -> tuple[str, ...]:
    """The kernel's client memory. ``recall``: a new connection from a client in
    ``@clients4``/``@clients6`` gets that client's backend mark. ``steer`` (its
    first rule, before the DNAT): every new connection with a backend's mark,
    whoever chose it (a worker's verdict, the recall, the hash table), adds its
    client or restarts its timeout, so the daemon writes no client itself. The
    update is a rule of its own: when the map is full (``client_table_max``) the
    client is not remembered, but its connection still goes through."""
    out = []
    name = nft_table_name(tag)
    for version, vip in sorted(vips.items()):
        ip = IP[version]
        m = f"@clients{version}"
        out.append(f"add rule inet {name} recall {ip} daddr {vip} ct state new "
                   f"{ip} saddr {m} meta mark set {ip} saddr map {m}")
        out.append(f"insert rule inet {name} steer {ip} daddr {vip} "
                   f"meta mark & {CT_FAMILY_MASK:#x} == {ct_mark(version, 0):#x} "
                   f"update {m} {{ {ip} saddr timeout {timeout}s : meta mark }}")
    return tuple(out)


def nft_hash_maps(tag: str) -> tuple[dict[str, Any], ...]:
    t = {"family": "inet", "table": nft_table_name(tag)}
    return tuple(
        [{"add": {"counter": {**t, "name": "hashed"}}}]
        + [{"add": {"map": {**t, "name": f"hash{v}", "type": "mark", "map": "mark"}}}
           for v in (4, 6)])


def hash_rules(vips: dict[int, IPAddress], hashing: KernelHash, new_only: bool
               ) -> list[str]:
    """The rules that give a new TCP or UDP client (``new_only``: a connection
    conntrack calls new; else any packet, not a fragment) to a VIP without a
    backend's mark the backend of its bucket: ``jhash`` of its address, with the
    explicit seed (without one, nft draws a random seed per rule and two nodes,
    or two runs, would disagree), then the bucket's mark from ``@hash4``/``6``.
    An empty bucket (nobody eligible) fails the lookup and leaves the bucket
    number as the mark, which names no backend: the packet stays addressed to
    the VIP, as a worker's "no backend" leaves it."""
    out = []
    for version, vip in sorted(vips.items()):
        ip = IP[version]
        state = "ct state new " if new_only else (
            "ip frag-off & 0x3fff == 0 " if version == 4 else "exthdr frag missing ")
        out.append(f"{ip} daddr {vip} {state}meta l4proto {{ tcp, udp }} "
                   f"meta mark & {CT_FAMILY_MASK:#x} != {ct_mark(version, 0):#x} "
                   f"counter name hashed "
                   f"meta mark set jhash {ip} saddr mod {hashing.size} seed {hashing.seed:#x} "
                   f"meta mark set meta mark map @hash{version}")
    return out


def nft_hash_buckets(tag: str, version: int, table: list[int], old: list[int] | None
                     ) -> list[str]:
    """The commands (one transaction) that turn the kernel's ``@hash<version>``
    from ``old`` (None: empty) into ``table`` (bucket -> backend mark, 0: empty),
    touching only the buckets that changed: an element is deleted and added
    again to change its value (nft refuses to overwrite a map's element)."""
    name = f"inet {nft_table_name(tag)} hash{version}"
    gone, added = bucket_changes(table, old)
    out = []
    for chunk in _chunks(gone):
        out.append(f"delete element {name} {{ {', '.join(map(str, chunk))} }}")
    for chunk in _chunks(added):
        out.append(f"add element {name} {{ "
                   f"{', '.join(f'{b} : {m:#x}' for b, m in chunk)} }}")
    return out


def bucket_changes(table: list[int], old: list[int] | None
                   ) -> tuple[list[int], list[tuple[int, int]]]:
    """(buckets to delete, (bucket, mark) to add) from ``old`` to ``table``."""
    if old is None or len(old) != len(table):
        return [], [(b, m) for b, m in enumerate(table) if m]
    gone = [b for b, (m, was) in enumerate(zip(table, old, strict=True)) if was and m != was]
    added = [(b, m) for b, (m, was) in enumerate(zip(table, old, strict=True))
             if m and m != was]
    return gone, added


def _chunks(items: list[Any], size: int = 8192) -> list[list[Any]]:
    # nft parses a long element list in one go; chunks keep each line moderate.
    return [items[i:i + size] for i in range(0, len(items), size)]


def nft_ruleset(tag: str, vips: dict[int, IPAddress], backends: Backends,
                max_clients: int = 1_000_000) -> tuple[dict[str, Any], ...]:
    """The conntrack path's table (see ``loaded.core.plan``), as nftables JSON commands."""
    name = nft_table_name(tag)
    t = {"family": "inet", "table": name}
    ct_markkey = {"ct": {"key": "mark"}}
    meta_mark = {"meta": {"key": "mark"}}
    cmds: list[dict[str, Any]] = [
        {"add": {"table": {"family": "inet", "name": name}}},
        {"add": {"counter": {**t, "name": "invalid"}}},
        {"add": {"map": {**t, "name": "backends4", "type": "mark", "map": "ipv4_addr"}}},
        {"add": {"map": {**t, "name": "backends6", "type": "mark", "map": "ipv6_addr"}}},
        {"add": {"map": {**t, "name": "counters", "type": "mark", "map": "counter"}}},
    ]
    for version in (4, 6):
        cmds.append({"add": {"map": {
            **t, "name": f"clients{version}", "type": ADDR_TYPE[version],
            "map": "mark", "flags": ["timeout"], "size": max_clients}}})
    for chain, kind, hook, prio in (("recall", "filter", "prerouting", -170),
                                    ("steer", "nat", "prerouting", -100),
                                    ("tally", "filter", "forward", 0)):
        cmds.append({"add": {"chain": {**t, "name": chain, "type": kind, "hook": hook,
                                       "prio": prio, "policy": "accept"}}})
    # Every packet of every flow passes this chain: most are established and
    # leave it at the first compare (accept ends this chain only).
    cmds.append({"add": {"rule": {**t, "chain": "recall", "expr": [
        {"match": {"op": "in", "left": {"ct": {"key": "state"}},
                   "right": ["established", "related"]}},
        {"accept": None}]}}})
    for version, vip in sorted(vips.items()):
        proto = IP[version]
        to_vip = {"match": {"op": "==", "left": {"payload": {"protocol": proto,
                                                              "field": "daddr"}},
                            "right": str(vip)}}
        cmds.append({"add": {"rule": {**t, "chain": "recall", "expr": [
            to_vip,
            {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "invalid"}},
            {"counter": "invalid"},
            {"drop": None}]}}})
        cmds.append({"add": {"rule": {**t, "chain": "steer", "expr": [
            to_vip,
            mark_match(meta_mark, version),
            {"mangle": {"key": ct_markkey, "value": meta_mark}},
            {"dnat": {"family": proto, "addr": {"map": {
                "key": meta_mark, "data": f"@backends{version}"}}}}]}}})
    cmds.append({"add": {"rule": {**t, "chain": "tally", "expr": [
        {"match": {"op": "==", "left": ct_markkey,
                   "right": {"prefix": {"addr": CT_MARK_BASE, "len": 16}}}},
        {"counter": {"map": {"key": ct_markkey, "data": "@counters"}}}]}}})
    for version, index, ip in backends:
        cmds.extend(nft_backend(tag, version, index, ip))
    return tuple(cmds)


# --- the per-packet path's table --------------------------------------------------

_TCP_UDP = {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}},
                      "right": {"set": ["tcp", "udp"]}}}
# Fragments stay with the workers: only a first fragment carries the L4 header
# whose checksum covers the addresses, and the kernel refuses to fix it in any
# other (a rule that mangles a later fragment fails and does nothing).
_NOT_FRAGMENT = {
    4: {"match": {"op": "==", "right": 0, "left": {
        "&": [{"payload": {"protocol": "ip", "field": "frag-off"}}, 0x3FFF]}}},
    6: {"match": {"op": "==", "left": {"exthdr": {"name": "frag"}}, "right": False}},
}


def reply_counters(version: int) -> str:
    return f"reply_counters{version}"


def nft_perpacket_backend(tag: str, version: int, index: int, ip: IPAddress
                          ) -> list[dict[str, Any]]:
    """Commands that make ``ip`` the destination of its mark and count its replies,
    rewritten in the kernel, under that mark's counter (the per-packet path's
    counterpart of ``nft_backend``)."""
    return mark_target(tag, version, index, ip, (reply_counters(version), str(ip)))


def nft_perpacket_ruleset(tag: str, vips: dict[int, IPAddress], rips: dict[int, IPNetwork],
                          nameservers: tuple[IPAddress, ...],
                          backends: Backends
                          ) -> tuple[dict[str, Any], ...]:
    """The per-packet path's rewrites that the kernel does for the workers.

    ======  ===================  ==================================================
    chain   hook, priority       rules
    ======  ===================  ==================================================
    steer   prerouting, -140     to a VIP with a backend's mark (the worker's
                                 verdict for a plain TCP or UDP packet): counted
                                 (``steered``), the destination from
                                 ``@backends4``/``@backends6`` (mark -> address)
    reply   forward, -10         DNS to a nameserver: unchanged (masqueraded
                                 later); TCP/UDP, not a fragment, from a backend:
                                 its counter (``@reply_counters4``/``6``: address
                                 -> the backend's counter), source set from
                                 ``@reply4``/``@reply6`` (real-server net ->
                                 VIP); the same without the counter for the
                                 net's other hosts
    ======  ===================  ==================================================

    ``steer`` runs after the mangle chain (-150) that queued the packet: the
    worker decided, the kernel rewrites (nftables fixes the IP and transport
    checksums, a partial checksum too), so the payload never comes back from
    user space. What a worker rewrites itself (ICMP, fragments, IPv4 options,
    IPv6 extension headers) comes back without a backend's mark and passes.

    ``reply`` runs before iptables' filter FORWARD (priority 0), whose queue rule
    matches the real-server source: a reply it rewrote is no longer queued. What
    it does not rewrite (ICMP, whose errors quote the client's packet and need
    the inner header changed too; fragments; what is too short to rewrite)
    keeps its source and is queued as before.
    """
    name = nft_table_name(tag)
    t = {"family": "inet", "table": name}
    meta_mark = {"meta": {"key": "mark"}}
    cmds: list[dict[str, Any]] = [{"add": {"table": {"family": "inet", "name": name}}},
                                  {"add": {"counter": {**t, "name": "steered"}}}]
    steer: list[list[dict[str, Any]]] = []
    rules: list[list[dict[str, Any]]] = []
    for version, vip in sorted(vips.items()):
        ip, rip = IP[version], rips[version]
        saddr = {"payload": {"protocol": ip, "field": "saddr"}}
        daddr = {"payload": {"protocol": ip, "field": "daddr"}}
        cmds.append({"add": {"map": {**t, "name": f"backends{version}", "type": "mark",
                                     "map": ADDR_TYPE[version]}}})
        steer.append([
            {"match": {"op": "==", "left": daddr, "right": str(vip)}},
            mark_match(meta_mark, version),
            {"counter": "steered"},
            {"mangle": {"key": daddr, "value": {"map": {
                "key": meta_mark, "data": f"@backends{version}"}}}}])
        cmds.append({"add": {"map": {
            **t, "name": f"reply{version}", "type": ADDR_TYPE[version],
            "map": ADDR_TYPE[version], "flags": ["interval"],
            "elem": [[{"prefix": {"addr": str(rip.network_address), "len": rip.prefixlen}},
                      str(vip)]]}}})
        cmds.append({"add": {"map": {**t, "name": reply_counters(version),
                                     "type": ADDR_TYPE[version], "map": "counter"}}})
        dns = [str(ns) for ns in nameservers if ns.version == version]
        if dns:
            rules.append([
                {"match": {"op": "==", "left": daddr, "right": {"set": dns}}},
                _TCP_UDP,
                {"match": {"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}},
                           "right": 53}},
                {"return": None}])
        rewrite = {"mangle": {"key": saddr, "value": {"map": {
            "key": saddr, "data": f"@reply{version}"}}}}
        # A backend's packet is counted and rewritten by the first rule; once
        # its source is the VIP (never inside the real-server net: the config
        # refuses that), the second rule's lookup misses and leaves it be.
        rules.append([_TCP_UDP, _NOT_FRAGMENT[version],
                      {"counter": {"map": {"key": saddr,
                                           "data": f"@{reply_counters(version)}"}}},
                      rewrite])
        rules.append([_TCP_UDP, _NOT_FRAGMENT[version], rewrite])
    cmds.append({"add": {"chain": {**t, "name": "steer", "type": "filter", "hook": "prerouting",
                                   "prio": -140, "policy": "accept"}}})
    cmds.append({"add": {"chain": {**t, "name": "reply", "type": "filter", "hook": "forward",
                                   "prio": -10, "policy": "accept"}}})
    cmds.extend({"add": {"rule": {**t, "chain": "steer", "expr": r}}} for r in steer)
    cmds.extend({"add": {"rule": {**t, "chain": "reply", "expr": r}}} for r in rules)
    for version, index, addr in backends:
        cmds.extend(nft_perpacket_backend(tag, version, index, addr))
    return tuple(cmds)
