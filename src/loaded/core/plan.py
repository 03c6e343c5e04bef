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
- What differs between the data paths is each one's object in
  ``loaded.core.datapath`` (chains, nft table, what a backend target is); the
  plan holds the object (``Plan.datapath``), looked up once by its name.
- The conntrack data path (``datapath=conntrack``) queues only what conntrack
  calls NEW: the mangle jump matches ``--ctstate NEW``, and there is no raw and
  no FORWARD chain. The worker answers with a packet mark naming the backend
  (``loaded.core.pool.ct_mark``); an nftables table of the daemon's own
  (``inet loaded_<tag>``, through the JSON API) does the rest:

  =======  =====================  ============================================
  chain    hook, priority         rules
  =======  =====================  ============================================
  recall   prerouting, -170       established or related: nothing more (most
                                  packets leave at this first compare); to a
                                  VIP, conntrack state invalid: count
                                  (counter ``invalid``) and drop; a new
                                  connection to a VIP from a client in
                                  ``@clients4``/``@clients6`` (client -> mark,
                                  idle timeout ``client_timeout``, at most
                                  ``client_table_max``): that mark; (sh,
                                  maglev) else its hash bucket's mark
  steer    prerouting, dstnat     (``fail_open=hash``, other strategies) a new
                                  connection the queue let through without a
                                  backend's mark: its hash bucket's mark; to
                                  a VIP with a backend's mark: the client
                                  added to (or refreshed in) the client map;
                                  copy the mark to the connection, DNAT to
                                  ``@backends4``/``@backends6`` (mark -> address)
  tally    forward, 0             connections with a backend's mark: count
                                  packets and bytes, both ways, in the
                                  backend's counter (map ``@counters``)
  =======  =====================  ============================================

  recall sits after conntrack (-200) and before mangle (-150), so the queue
  never sees an invalid packet, and is the only chain of the table that every
  packet of a flow passes in prerouting (one base chain costs as much as a
  few rules: guard and recall were two until 0.4). A recalled connection
  already has its backend's mark, which the mangle chain's first rule lets
  pass unqueued: a client the workers
  have decided for opens its next connections at the kernel's speed, and
  sticks to its backend as long as it keeps coming back within
  ``client_timeout``. Only a connection's first packet passes the NAT
  chain; conntrack carries every later one, the replies, RELATED ICMP errors
  and reassembled fragments. A packet accepted without a backend's mark (no
  backend up, ``no_backend=refuse``) stays addressed to the VIP and the
  balancer's own stack refuses it. Backends added later are added to the maps
  at run time; the connection mark lets the daemon delete a backend's
  connections (``on_backend_down=cut``) with one conntrack flush by mark.
- The kernel's hash table (``loaded.core.datapath.KernelHash``): with
  ``strategy=sh`` or ``maglev`` on the conntrack path, a rule in ``recall``,
  after the recall rule, gives every other new TCP or UDP connection to a VIP
  the mark of its bucket (``jhash`` of the client's address with the
  configured seed, bucket -> mark in ``@hash4``/``@hash6``, which the daemon
  keeps equal to the workers' table): the kernel decides and no worker sees
  the client. With ``fail_open=hash`` (the default) and any other strategy,
  the same rule at the head of ``steer`` (after the queue; a NAT chain sees
  only a connection's first packet) catches only what the queue let through
  without a worker's mark; on the per-packet path it sits at the head of its
  ``steer`` too and needs a hash strategy.
  Every new connection with a backend's mark passes ``steer``'s first rule,
  which adds its client to the client map or refreshes it: the kernel learns
  every client itself.
- Fail-open: the queue rules carry ``--queue-bypass`` (no worker bound) and
  queues are bound with the fail-open flag (a full queue accepts) with
  ``fail_open=yes`` (packets pass unbalanced, to the balancer's own stack,
  which refuses them at once) and with ``fail_open=hash`` when the kernel has
  a hash table (they take it). ``fail_open=no``: such packets are dropped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from loaded.core.config import Config
from loaded.core.datapath import DataPath, KernelHash, datapath
from loaded.core.engine import backend_indexes
from loaded.core.firewall import Chain, IPAddress, IPNetwork, dns_masquerade, nft_table_name


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
    datapath: DataPath = field(default_factory=lambda: datapath(Config.datapath))
    # The data path's nftables table: JSON API commands that create it, then the
    # rules the JSON API cannot express (nft 1.0.6 has no JSON form of a map
    # ``update`` statement), in nft's own syntax, through the same library.
    nft: tuple[dict[str, Any], ...] = ()
    nft_text: tuple[str, ...] = ()
    # The kernel's hash table (the data path's ``kernel_hash``), None without one.
    hashing: KernelHash | None = None
    # Whether a full queue, or one nobody reads, lets packets through.
    queue_bypass: bool = False
    # Each queue's length: ``nfq_len``, or the data path's default.
    queue_length: int = 4096

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
    path = datapath(config.datapath)
    hashing = path.kernel_hash(config.strategy, config.fail_open, config.hash_table_size,
                               config.hash_seed)
    bypass = path.queue_bypass(config.fail_open, hashing)
    qlen = config.nfq_len or path.queue_length(config.fail_open, hashing)
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
        chains.extend(path.chains(family, tag, vip, rip, nameservers, queues, bypass))
        chains.extend(dns_masquerade(family, tag, rip, nameservers, pub))
        vips[family] = vip
        rips[family] = rip
        indexes = backend_indexes(config, (family,))
        initial.extend((family, indexes[(str(vip), str(s.ip))], s.ip) for s in specs)
    nft, nft_text = path.nft(tag, vips, rips, config.nameservers, initial,
                             config.client_table_max, int(config.client_timeout), hashing)
    return Plan(tag, families, queues, cores, tuple(addresses), tuple(routes),
                tuple(dict.fromkeys(sysctls)), tuple(neighbours), tuple(chains),
                path, nft, nft_text, hashing, bypass, qlen)


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
