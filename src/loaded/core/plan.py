"""What the daemon changes in the kernel, decided from the config alone.

The original's config file doubled as a shell script that flushed every firewall
rule and both interfaces' addresses. Instead, the daemon computes this plan,
applies exactly it (``loaded.io.kernel``), records each step that it really
made, and undoes exactly those steps on exit or, after a crash, on its next
start. ``loaded --dry-run`` prints the plan.

Rules of the plan:

- Addresses: each VIP (``VIP4``/``VIP4net``, ``VIP6``/``VIP6net``) on the
  public interface; the private gateway (``private_GW``) on the private
  interface, with the real-server network's prefix when it lies inside it
  (which also gives the route), else as a host address plus an explicit route
  to the real-server network.
- Sysctls: forwarding on; ICMP redirects neither sent nor accepted; broadcast
  pings ignored by the balancer itself. Old values are restored on exit.
- Neighbours: every backend gets a permanent neighbour entry on the private
  interface, its link-layer address found by the daemon.
- Firewall rules, only in chains of the daemon's own (named with the
  instance tag), each entered by one jump rule from a built-in chain:

  ======  ============  =========================================================
  table   hook          rules
  ======  ============  =========================================================
  raw     PREROUTING    no conntrack for traffic to a VIP or from the real-server
                        network (the per-packet path needs none), except DNS to
                        the nameservers, which is masqueraded
  mangle  PREROUTING    to a VIP: neighbour discovery stays local; HMARK hashes
                        the client and VIP (for an ICMP error: the quoted packet's
                        addresses, the same pair) into one mark per worker; each
                        mark goes to its worker's queue
  filter  FORWARD       from the real-server network, except DNS to the
                        nameservers: spread over the queues (stateless)
  nat     POSTROUTING   DNS from the real-server network to a nameserver:
                        masquerade out of the public interface
  ======  ============  =========================================================

  Hashing by client address pins every packet of a client, whatever its
  protocol, and every ICMP error about its flows, to one worker and so to one
  client table. NFQUEUE is the iptables target because this kernel has no
  nftables ``queue`` expression.
- The conntrack data path (``datapath=conntrack``) queues only what conntrack
  calls NEW: the mangle jump matches ``--ctstate NEW``, and there is no raw and
  no FORWARD chain. The worker answers with a packet mark naming the backend
  (``loaded.core.pool.ct_mark``); an nftables table of the daemon's own
  (``inet loaded_<tag>``, through the JSON API) does the rest:

  =======  =====================  ============================================
  chain    hook, priority         rules
  =======  =====================  ============================================
  guard    prerouting, -180       to a VIP, conntrack state invalid: count
                                  (counter ``invalid``) and drop
  recall   prerouting, -170       a new connection to a VIP from a client in
                                  ``@clients4``/``@clients6`` (client -> mark,
                                  filled from the workers' decisions, idle
                                  timeout ``client_timeout``): that mark, and
                                  the entry's timeout restarts
  steer    prerouting, dstnat     to a VIP with a backend's mark: copy the mark
                                  to the connection, DNAT to ``@backends4`` /
                                  ``@backends6`` (maps mark -> address)
  tally    forward, 0             connections with a backend's mark: count
                                  packets and bytes, both ways, in the
                                  backend's counter (map ``@counters``)
  =======  =====================  ============================================

  guard sits after conntrack (-200) and before mangle (-150), so the queue never
  sees an invalid packet. A recalled connection already has its backend's mark,
  which the mangle chain's first rule lets pass unqueued: a client the workers
  have decided for opens its next connections at the kernel's speed, and
  sticks to its backend as long as it keeps coming back within
  ``client_timeout``. Only a connection's first packet passes the NAT
  chain; conntrack carries every later one, the replies, RELATED ICMP errors
  and reassembled fragments. A packet accepted without a backend's mark (no
  backend up, ``no_backend=refuse``) stays addressed to the VIP and the
  balancer's own stack refuses it. Backends added later are added to the maps
  at run time; the connection mark lets the daemon delete a backend's
  connections (``on_backend_down=cut``) with one conntrack flush by mark.
- Fail-open (``fail_open=yes``): the queue rules carry ``--queue-bypass`` (no
  daemon: packets pass unbalanced, to the balancer's own stack, which refuses
  them at once) and queues are bound with the fail-open flag (a full queue
  accepts). Fail-closed (default): such packets are dropped.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any

from loaded.core.config import Config
from loaded.core.engine import backend_indexes
from loaded.core.pool import CT_FAMILY_MASK, CT_MARK_BASE, ct_mark

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MARK_BASE = 0x4C440000  # "LD" in the high half: recognisable in a trace


@dataclass(frozen=True)
class Address:
    ifname: str
    ip: IPAddress
    prefix: int
    purpose: str


@dataclass(frozen=True)
class Route:
    dst: IPNetwork
    ifname: str


@dataclass(frozen=True)
class Sysctl:
    key: str  # path under /proc/sys
    value: str


@dataclass(frozen=True)
class Neighbour:
    ifname: str
    ip: IPAddress


@dataclass(frozen=True)
class Chain:
    """A chain of our own, entered from ``hook`` by one jump rule."""

    family: int
    table: str
    hook: str
    name: str
    jump_match: tuple[str, ...]  # match of the jump rule in the built-in chain
    rules: tuple[tuple[str, ...], ...]  # each: iptables arguments after "-A <name>"


@dataclass(frozen=True)
class Plan:
    tag: str
    families: tuple[int, ...]
    queues: tuple[int, ...]  # queue number of each worker, in order
    cores: tuple[int, ...]  # core each worker is pinned to
    addresses: tuple[Address, ...] = ()
    routes: tuple[Route, ...] = ()
    sysctls: tuple[Sysctl, ...] = ()
    neighbours: tuple[Neighbour, ...] = ()
    chains: tuple[Chain, ...] = field(default=())
    datapath: str = "perpacket"
    # The conntrack data path's nftables table: JSON API commands that create it,
    # then the rules the JSON API cannot express (nft 1.0.6 has no JSON form of a
    # map ``update`` statement), in nft's own syntax, through the same library.
    nft: tuple[dict[str, Any], ...] = ()
    nft_text: tuple[str, ...] = ()

    @property
    def nft_table(self) -> str:
        return nft_table_name(self.tag)


class PlanError(ValueError):
    """The config lacks something the kernel set-up needs."""


def instance_tag(config_path: str) -> str:
    """A short, stable name for one daemon instance, from its config path."""
    return hashlib.sha1(config_path.encode()).hexdigest()[:6]


def worker_cores(config: Config, cpus: int) -> tuple[int, ...]:
    """One worker per core FIRST_CORE..LAST_CORE, clamped to the machine's cores.

    As in the original, the worker on core i binds queue i.
    """
    last = min(config.last_core, cpus - 1)
    first = min(config.first_core, last)
    return tuple(range(first, last + 1))


def make_plan(config: Config, families: tuple[int, ...], tag: str, cpus: int) -> Plan:
    missing = [k for k, v in (("public_NIC", config.public_nic),
                              ("private_NIC", config.private_nic)) if not v]
    for family in families:
        if config.family(family).rip is None:
            missing.append(f"RIP{family}")
    if missing:
        raise PlanError(f"{config.path}: the kernel set-up needs {', '.join(missing)}")
    assert config.public_nic is not None and config.private_nic is not None
    pub, priv = config.public_nic, config.private_nic
    cores = worker_cores(config, cpus)
    queues = cores
    addresses: list[Address] = []
    routes: list[Route] = []
    sysctls: list[Sysctl] = []
    neighbours: list[Neighbour] = []
    chains: list[Chain] = []
    conntrack = config.datapath == "conntrack"
    vips: dict[int, IPAddress] = {}
    rips: dict[int, IPNetwork] = {}
    initial: list[tuple[int, int, IPAddress]] = []  # (family, index, address)
    for family in families:
        fc = config.family(family)
        vip, vprefix, gw, rip, specs = fc.vip, fc.vip_prefix, fc.private_gw, fc.rip, fc.servers
        assert vip is not None and rip is not None
        full = fc.full_prefix
        addresses.append(Address(pub, vip, full if vprefix is None else vprefix, "VIP"))
        if gw is not None:
            if gw in rip:
                addresses.append(Address(priv, gw, rip.prefixlen, "private gateway"))
            else:
                addresses.append(Address(priv, gw, full, "private gateway"))
                routes.append(Route(rip, priv))
        else:
            routes.append(Route(rip, priv))
        sysctls.extend(_sysctls(family, pub, priv))
        neighbours.extend(Neighbour(priv, s.ip) for s in specs)
        nameservers = [ns for ns in config.nameservers if ns.version == family]
        chains.extend(_chains(family, tag, vip, rip, nameservers, queues, pub, config.fail_open,
                              conntrack))
        vips[family] = vip
        rips[family] = rip
        indexes = backend_indexes(config, (family,))
        initial.extend((family, indexes[(str(vip), str(s.ip))], s.ip) for s in specs)
    if conntrack:
        nft = nft_ruleset(tag, vips, initial, config.client_table_max)
        recall = nft_recall(tag, vips, int(config.client_timeout))
    else:
        nft = nft_perpacket_ruleset(tag, vips, rips, config.nameservers, initial)
        recall = ()
    return Plan(tag, families, queues, cores, tuple(addresses), tuple(routes),
                tuple(dict.fromkeys(sysctls)), tuple(neighbours), tuple(chains),
                config.datapath, nft, recall)


def nft_table_name(tag: str) -> str:
    return f"loaded_{tag}"


_COUNTER_PREFIX = "backend_"


def counter_name(mark: int) -> str:
    return f"{_COUNTER_PREFIX}{mark:08x}"


def counter_mark(name: str) -> int | None:
    """The mark a per-backend counter is named after (``counter_name``), or None."""
    if not name.startswith(_COUNTER_PREFIX):
        return None
    return int(name[len(_COUNTER_PREFIX):], 16)


def _mark_match(key: dict[str, Any], version: int) -> dict[str, Any]:
    """``key & CT_FAMILY_MASK == base``: a backend's mark of one family."""
    return {"match": {"op": "==", "left": key, "right": {
        "prefix": {"addr": ct_mark(version, 0), "len": CT_FAMILY_MASK.bit_count()}}}}


def _mark_target(tag: str, version: int, index: int, ip: IPAddress,
                 counted_by: tuple[str, object]) -> list[dict[str, Any]]:
    """``ip`` the destination of its mark (``@backends4``/``6``), with its counter,
    which the map ``counted_by`` = (name, key) points at."""
    t = {"family": "inet", "table": nft_table_name(tag)}
    mark = ct_mark(version, index)
    name = counter_name(mark)
    counters, key = counted_by
    return [
        {"add": {"counter": {**t, "name": name}}},
        {"add": {"element": {**t, "name": f"backends{version}", "elem": [[mark, str(ip)]]}}},
        {"add": {"element": {**t, "name": counters, "elem": [[key, name]]}}},
    ]


def nft_backend(tag: str, version: int, index: int, ip: IPAddress) -> list[dict[str, Any]]:
    """Commands that make ``ip`` a target of the conntrack path under its mark,
    its connections counted by their mark."""
    return _mark_target(tag, version, index, ip, ("counters", ct_mark(version, index)))


def nft_recall(tag: str, vips: dict[int, IPAddress], timeout: int) -> tuple[str, ...]:
    """The ``recall`` rules: a new connection from a client the workers have
    decided for gets that client's backend mark in the kernel, and refreshes it."""
    out = []
    for version, vip in sorted(vips.items()):
        ip = "ip" if version == 4 else "ip6"
        m = f"@clients{version}"
        out.append(f"add rule inet {nft_table_name(tag)} recall {ip} daddr {vip} ct state new "
                   f"{ip} saddr {m} meta mark set {ip} saddr map {m} "
                   f"update {m} {{ {ip} saddr timeout {timeout}s : meta mark }}")
    return tuple(out)


def nft_ruleset(tag: str, vips: dict[int, IPAddress],
                backends: list[tuple[int, int, IPAddress]],
                max_clients: int = 1_000_000) -> tuple[dict[str, Any], ...]:
    """The conntrack path's table (see the module rules), as nftables JSON commands."""
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
            **t, "name": f"clients{version}", "type": "ipv4_addr" if version == 4 else "ipv6_addr",
            "map": "mark", "flags": ["timeout"], "size": max_clients}}})
    for chain, kind, hook, prio in (("guard", "filter", "prerouting", -180),
                                    ("recall", "filter", "prerouting", -170),
                                    ("steer", "nat", "prerouting", -100),
                                    ("tally", "filter", "forward", 0)):
        cmds.append({"add": {"chain": {**t, "name": chain, "type": kind, "hook": hook,
                                       "prio": prio, "policy": "accept"}}})
    for version, vip in sorted(vips.items()):
        proto = "ip" if version == 4 else "ip6"
        to_vip = {"match": {"op": "==", "left": {"payload": {"protocol": proto,
                                                              "field": "daddr"}},
                            "right": str(vip)}}
        cmds.append({"add": {"rule": {**t, "chain": "guard", "expr": [
            to_vip,
            {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "invalid"}},
            {"counter": "invalid"},
            {"drop": None}]}}})
        cmds.append({"add": {"rule": {**t, "chain": "steer", "expr": [
            to_vip,
            _mark_match(meta_mark, version),
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


_ADDR_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}
_IP = {4: "ip", 6: "ip6"}
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
    return _mark_target(tag, version, index, ip, (reply_counters(version), str(ip)))


def nft_perpacket_ruleset(tag: str, vips: dict[int, IPAddress], rips: dict[int, IPNetwork],
                          nameservers: tuple[IPAddress, ...],
                          backends: list[tuple[int, int, IPAddress]]
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
        ip, rip = _IP[version], rips[version]
        saddr = {"payload": {"protocol": ip, "field": "saddr"}}
        daddr = {"payload": {"protocol": ip, "field": "daddr"}}
        cmds.append({"add": {"map": {**t, "name": f"backends{version}", "type": "mark",
                                     "map": _ADDR_TYPE[version]}}})
        steer.append([
            {"match": {"op": "==", "left": daddr, "right": str(vip)}},
            _mark_match(meta_mark, version),
            {"counter": "steered"},
            {"mangle": {"key": daddr, "value": {"map": {
                "key": meta_mark, "data": f"@backends{version}"}}}}])
        cmds.append({"add": {"map": {
            **t, "name": f"reply{version}", "type": _ADDR_TYPE[version],
            "map": _ADDR_TYPE[version], "flags": ["interval"],
            "elem": [[{"prefix": {"addr": str(rip.network_address), "len": rip.prefixlen}},
                      str(vip)]]}}})
        cmds.append({"add": {"map": {**t, "name": reply_counters(version),
                                     "type": _ADDR_TYPE[version], "map": "counter"}}})
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


def _sysctls(family: int, pub: str, priv: str) -> list[Sysctl]:
    if family == 4:
        out = [Sysctl("net/ipv4/ip_forward", "1"),
               Sysctl("net/ipv4/icmp_echo_ignore_broadcasts", "1")]
        for dev in ("all", pub, priv):
            out.append(Sysctl(f"net/ipv4/conf/{dev}/send_redirects", "0"))
            out.append(Sysctl(f"net/ipv4/conf/{dev}/accept_redirects", "0"))
        return out
    out = [Sysctl("net/ipv6/conf/all/forwarding", "1")]
    for dev in ("all", pub, priv):
        out.append(Sysctl(f"net/ipv6/conf/{dev}/accept_redirects", "0"))
    return out


def _queue_target(queues: tuple[int, ...], fail_open: bool) -> tuple[str, ...]:
    if len(queues) == 1:
        target: tuple[str, ...] = ("-j", "NFQUEUE", "--queue-num", str(queues[0]))
    else:
        target = ("-j", "NFQUEUE", "--queue-balance", f"{queues[0]}:{queues[-1]}")
    return (*target, "--queue-bypass") if fail_open else target


def _chains(family: int, tag: str, vip: IPAddress, rip: IPNetwork,
            nameservers: list[IPAddress], queues: tuple[int, ...], pub: str,
            fail_open: bool, conntrack: bool = False) -> list[Chain]:
    v = str(vip)
    r = str(rip)
    dns = [(str(ns), proto) for ns in nameservers for proto in ("udp", "tcp")]
    icmp = "icmp" if family == 4 else "ipv6-icmp"
    raw_rules: list[tuple[str, ...]] = [("-d", v, "-j", "CT", "--notrack")]
    raw_rules += [("-s", r, "-d", ns, "-p", p, "--dport", "53", "-j", "RETURN") for ns, p in dns]
    raw_rules.append(("-s", r, "-j", "CT", "--notrack"))
    in_rules: list[tuple[str, ...]] = []
    if family == 6:
        in_rules += [("-p", icmp, "--icmpv6-type", t, "-j", "RETURN")
                     for t in ("neighbour-solicitation", "neighbour-advertisement")]
    n = len(queues)
    rnd = int(tag, 16) | 1
    in_rules.append(("-j", "HMARK", "--hmark-tuple", "src,dst", "--hmark-mod", str(n),
                     "--hmark-offset", str(MARK_BASE), "--hmark-rnd", hex(rnd)))
    for i, q in enumerate(queues):
        in_rules.append(("-m", "mark", "--mark", str(MARK_BASE + i),
                         *_queue_target((q,), fail_open)))
    out_rules: list[tuple[str, ...]] = [
        ("-d", ns, "-p", p, "--dport", "53", "-j", "RETURN") for ns, p in dns]
    out_rules.append(_queue_target(queues, fail_open))
    if conntrack:
        # A client the kernel recalls (its backend's mark is set) is not queued.
        recalled = ("-m", "mark", "--mark", f"{ct_mark(family, 0):#x}/{CT_FAMILY_MASK:#x}",
                    "-j", "RETURN")
        chains = [Chain(family, "mangle", "PREROUTING", f"LOADED-IN-{tag}",
                        ("-d", v, "-m", "conntrack", "--ctstate", "NEW"),
                        (recalled, *in_rules))]
    else:
        chains = [
            Chain(family, "raw", "PREROUTING", f"LOADED-RAW-{tag}", (), tuple(raw_rules)),
            Chain(family, "mangle", "PREROUTING", f"LOADED-IN-{tag}", ("-d", v),
                  tuple(in_rules)),
            Chain(family, "filter", "FORWARD", f"LOADED-OUT-{tag}", ("-s", r),
                  tuple(out_rules)),
        ]
    if dns:
        nat = tuple(("-s", r, "-d", ns, "-p", p, "--dport", "53", "-o", pub, "-j", "MASQUERADE")
                    for ns, p in dns)
        chains.append(Chain(family, "nat", "POSTROUTING", f"LOADED-NAT-{tag}", (), nat))
    return chains


def describe(plan: Plan) -> list[str]:
    """The plan as the commands an administrator would recognise."""
    lines = [f"# loaded instance {plan.tag}: IPv{'+'.join(map(str, plan.families))}, "
             f"workers on cores {', '.join(map(str, plan.cores))}, "
             f"queues {', '.join(map(str, plan.queues))}"]
    for s in plan.sysctls:
        lines.append(f"sysctl -w {s.key.replace('/', '.')}={s.value}")
    for a in plan.addresses:
        lines.append(f"ip addr add {a.ip}/{a.prefix} dev {a.ifname}  # {a.purpose}")
    for r in plan.routes:
        lines.append(f"ip route add {r.dst} dev {r.ifname}")
    for nb in plan.neighbours:
        lines.append(f"ip neigh replace {nb.ip} lladdr <resolved> dev {nb.ifname} nud permanent")
    for c in plan.chains:
        tool = "iptables" if c.family == 4 else "ip6tables"
        lines.append(f"{tool} -t {c.table} -N {c.name}")
        for rule in c.rules:
            lines.append(f"{tool} -t {c.table} -A {c.name} {' '.join(rule)}")
        lines.append(f"{tool} -t {c.table} -I {c.hook} 1 {' '.join(c.jump_match)}"
                     f"{' ' if c.jump_match else ''}-j {c.name}")
    if plan.nft:
        lines.append(f"# nftables table inet {plan.nft_table}, JSON API commands:")
        lines.extend(json.dumps(cmd) for cmd in plan.nft)
        lines.extend(f"nft {cmd}" for cmd in plan.nft_text)
    return lines
