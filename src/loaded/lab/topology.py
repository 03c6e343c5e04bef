"""A network-namespace lab for the balancer: clients, a router, the balancer host
and a switch of backends, all built with netlink (pyroute2).

::

    [cl] eth0 ==(client_mtu)== cl0 [rt] lb0 ===== pub0 [lb] priv0 ===== p-lb [sw]
                                                                        br0
    [b1] eth0 ===== p-b1 [sw]    [b2] eth0 ===== p-b2 [sw]    ...

    cl  eth0   198.18.0.11.. /24, 2001:db8:c::11.. /64, default via rt
    rt  cl0    198.18.0.1/24, 2001:db8:c::1/64   lb0  198.18.1.2/24, 2001:db8:1::2/64
    lb  pub0   198.18.1.1/24, 2001:db8:1::1/64, default via rt
        priv0  nothing until the balancer (or setup_router_mode) configures it
    bN  eth0   198.19.0.(10+N)/24, 2001:db8:2::(10+N)/64, default via 198.19.0.1 / 2001:db8:2::1

Nothing is ever created in the root namespace: every veth is created from a
netlink socket that already lives in one of the lab namespaces, with its peer
placed directly in the other, so interface names cannot collide with the host
or with parallel labs.

Every namespace name starts with a per-run prefix ``ld<4 hex>-``. The prefix
is claimed by a marker file ``/run/loaded-lab/<prefix>.lock`` that the owner
keeps ``flock``-ed for its whole life: a marker whose lock can be taken
belongs to a dead run (robust against PID reuse), and :func:`cleanup_stale`
removes such leftovers.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from . import netns as nsutil

log = logging.getLogger(__name__)

RUN_DIR = Path("/run/loaded-lab")
WORKDIR_PREFIX = "loaded-lab-"  # + prefix: per-run directory (server logs) in $TMPDIR
PREFIX_RE = re.compile(r"^(ld[0-9a-f]{4})-")

IFA_F_NODAD = 0x02
IFA_F_TENTATIVE = 0x40
IFA_F_DADFAILED = 0x08

DEFAULT_SERVER_PORT = 8080


@dataclass(frozen=True)
class Backend:
    """One real server host: its own namespace with one NIC on the backend switch."""

    name: str  # short name, "b1"
    index: int
    ns: str  # full namespace name
    addr4: str
    addr6: str
    mac: str
    ifname: str = "eth0"
    switch_port: str = ""  # its veth peer's name in the switch namespace


@dataclass
class _Tracked:
    ns: str
    proc: subprocess.Popen[Any]
    log_path: Path | None = None


class LabError(RuntimeError):
    pass


class Lab:
    """Build, use and tear down the lab. Use as a context manager::

        with Lab(backends=2) as lab:
            lab.setup_router_mode()
            lab.start_servers()
            ...

    Construction does nothing to the system; :meth:`start` (or ``with``)
    builds, and :meth:`teardown` removes everything, also after a partial
    build.
    """

    # Suggested VIPs: on the balancer link, so the router reaches them by
    # ARP/ND on that link without any route.
    vip4 = "198.18.1.100"
    vip6 = "2001:db8:1::100"
    vip4_prefixlen = 24
    vip6_prefixlen = 64

    private_gw4 = "198.19.0.1"
    private_gw6 = "2001:db8:2::1"
    private_gw4_prefixlen = 24
    private_gw6_prefixlen = 64
    rip4 = "198.19.0.0/24"
    rip6 = "2001:db8:2::/64"
    broadcast4 = "198.19.0.255"

    client_net4 = "198.18.0.0/24"
    client_net6 = "2001:db8:c::/64"
    rt_client4 = "198.18.0.1"
    rt_client6 = "2001:db8:c::1"
    lb_pub4 = "198.18.1.1"
    lb_pub6 = "2001:db8:1::1"
    rt_pub4 = "198.18.1.2"
    rt_pub6 = "2001:db8:1::2"

    pub_nic = "pub0"
    priv_nic = "priv0"
    client_nic = "eth0"  # in cl
    rt_client_nic = "cl0"  # in rt, facing the clients
    rt_pub_nic = "lb0"  # in rt, facing the balancer
    bridge = "br0"  # in sw
    switch_lb_port = "p-lb"

    def __init__(
        self,
        backends: int = 3,
        clients: int = 4,
        client_mtu: int = 1500,
        *,
        pmtu_probe: bool = True,
        clean_stale: bool = True,
        keep_workdir: bool = False,
        settle_timeout: float = 5.0,
    ) -> None:
        """
        backends: number of backend hosts b1..bN.
        clients: number of client addresses (all on the single `cl` host).
        client_mtu: MTU of the cl<->rt link (both ends).
        pmtu_probe: when client_mtu < 1500, the clients' routes advertise a
            TCP MSS as for a 1500 link. Otherwise the MSS the client announces
            already fits the small link, no segment is ever too big and
            path-MTU discovery is never exercised (as for a client behind a
            tunnel further away).
        clean_stale: remove leftovers of dead runs before building.
        """
        if not 0 <= backends <= 200 or not 1 <= clients <= 200:
            raise ValueError("backends must be 0..200 and clients 1..200")
        if not 1280 <= client_mtu <= 9000:
            raise ValueError("client_mtu must be 1280..9000 (IPv6 needs 1280)")
        self.n_backends = backends
        self.n_clients = clients
        self.client_mtu = client_mtu
        self.pmtu_probe = pmtu_probe
        self.clean_stale = clean_stale
        self.keep_workdir = keep_workdir
        self.settle_timeout = settle_timeout

        self.prefix = ""
        self.ns_cl = self.ns_rt = self.ns_lb = self.ns_sw = ""
        self.backends: list[Backend] = []
        self.clients4 = [f"198.18.0.{10 + i}" for i in range(1, clients + 1)]
        # Same digits as the IPv4 last octet (read as hex) so the pairs are
        # easy to match by eye in captures.
        self.clients6 = [f"2001:db8:c::{10 + i}" for i in range(1, clients + 1)]
        self.router_mode = False
        self.workdir: Path | None = None

        self._roles: dict[str, str] = {}
        self._procs: list[_Tracked] = []
        self._lock_fd: int | None = None
        self._lock_path: Path | None = None
        self._started = False
        self._owner_pid = 0
        self._torn_down = False
        self._mutex = threading.RLock()

    # ----------------------------------------------------------------- naming

    @property
    def namespaces(self) -> list[str]:
        """Full names of every namespace this lab currently owns."""
        return list(self._roles.values())

    def ns(self, name: str) -> str:
        """Full namespace name for a role ("cl", "rt", "lb", "sw", "b1", ...) or full name."""
        if name in self._roles:
            return self._roles[name]
        if name in self._roles.values():
            return name
        raise KeyError(f"{name!r} is not a namespace of this lab ({sorted(self._roles)})")

    def backend(self, name: str) -> Backend:
        for b in self.backends:
            if name in (b.name, b.ns):
                return b
        raise KeyError(f"no backend {name!r}")

    # -------------------------------------------------------------- lifecycle

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def __repr__(self) -> str:
        return (
            f"Lab(prefix={self.prefix!r}, backends={[b.name for b in self.backends]}, "
            f"clients={self.n_clients}, client_mtu={self.client_mtu})"
        )

    def start(self) -> Lab:
        if self._started:
            raise LabError("lab already started")
        self._started = True
        self._owner_pid = os.getpid()
        if os.geteuid() != 0:
            raise PermissionError("the lab needs root (network namespaces)")
        if self.clean_stale:
            cleanup_stale()
        self._claim_prefix()
        atexit.register(self.teardown)
        try:
            self._build()
        except BaseException:
            self.teardown()
            raise
        return self

    def teardown(self) -> None:
        """Kill tracked processes and everything else left in the lab's
        namespaces, delete the namespaces and the marker. Idempotent."""
        if os.getpid() != self._owner_pid:
            # A forked child (pyroute2 forks to create namespaces) unwinding through
            # `with Lab()` must not tear down its parent's lab.
            return
        with self._mutex:
            if self._torn_down or not self._started:
                return
            self._torn_down = True
            with _sigint_deferred():
                errors = self._teardown()
            atexit.unregister(self.teardown)
        if errors:
            raise LabError("teardown incomplete: " + "; ".join(errors))

    def _teardown(self) -> list[str]:
        errors: list[str] = []
        self._stop_tracked(grace=2.0)
        owned = self._owned_namespaces()
        # Anything still in a lab namespace was started by this lab (children
        # of tracked processes, e.g. forked workers); nothing else can be there.
        for ns in owned:
            try:
                nsutil.kill_pids(nsutil.pids_in_netns(ns), grace=1.0)
            except OSError as exc:
                errors.append(f"killing processes in {ns}: {exc}")
        for ns in owned:
            try:
                nsutil.delete_netns(ns)
            except OSError as exc:
                errors.append(f"deleting {ns}: {exc}")
        for t in self._procs:
            for stream in (t.proc.stdout, t.proc.stderr, t.proc.stdin):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        self._procs.clear()
        left = self._owned_namespaces()
        if left:
            errors.append(f"namespaces left: {left}")
        if self.workdir is not None and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if self._lock_path is not None and not left:
            with contextlib.suppress(FileNotFoundError):
                self._lock_path.unlink()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self._roles.clear()
        self.backends = []
        return errors

    def _owned_namespaces(self) -> list[str]:
        # Listing /run/netns (not only self._roles) also catches a namespace
        # whose creation was interrupted before it was recorded.
        if not self.prefix:
            return []
        return [n for n in nsutil.list_netns() if n.startswith(self.prefix + "-")]

    def _claim_prefix(self) -> None:
        RUN_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        info = json.dumps({"pid": os.getpid(), "argv": sys.argv, "created": time.time()})
        existing = {m.group(1) for n in nsutil.list_netns() if (m := PREFIX_RE.match(n))}
        for _ in range(100):
            prefix = "ld" + secrets.token_hex(2)
            if prefix in existing:
                continue
            final = RUN_DIR / f"{prefix}.lock"
            # The marker must be locked *before* it becomes visible, or a
            # concurrent cleanup_stale() could take its lock and think the
            # owner dead: lock a private file, then link it into place
            # (link(2) fails instead of replacing an existing marker).
            fd, tmp = tempfile.mkstemp(dir=RUN_DIR, prefix=".claim-")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.write(fd, info.encode() + b"\n")
                try:
                    os.link(tmp, final)
                except FileExistsError:
                    os.close(fd)
                    continue
            except BaseException:
                os.close(fd)
                raise
            finally:
                os.unlink(tmp)
            self.prefix, self._lock_fd, self._lock_path = prefix, fd, final
            return
        raise LabError("could not claim a lab prefix")

    # ------------------------------------------------------------------ build

    def _new_ns(self, role: str) -> str:
        name = f"{self.prefix}-{role}"
        nsutil.create_netns(name)
        self._roles[role] = name
        # Defaults are copied into each interface when it is created, so
        # these must be set before any link exists in the namespace.
        for key, value in (
            ("net.ipv6.conf.all.accept_dad", 0),
            ("net.ipv6.conf.default.accept_dad", 0),
            # Nothing in the lab sends router advertisements; autoconf would
            # only risk routes the balancer did not choose (as the README warns).
            ("net.ipv6.conf.all.accept_ra", 0),
            ("net.ipv6.conf.default.accept_ra", 0),
            ("net.ipv6.conf.all.autoconf", 0),
            ("net.ipv6.conf.default.autoconf", 0),
            # Kernel defaults are 0 in a fresh namespace, but be explicit: the
            # balancer's return path is asymmetric by design.
            ("net.ipv4.conf.all.rp_filter", 0),
            ("net.ipv4.conf.default.rp_filter", 0),
        ):
            nsutil.write_sysctl(name, key, value)
        return name

    @contextlib.contextmanager
    def _ipr(self, ns: str) -> Iterator[IPRoute]:
        # flags=0: never let pyroute2 create a missing namespace implicitly.
        ipr = IPRoute(netns=self.ns(ns), flags=0)
        try:
            yield ipr
        finally:
            ipr.close()

    def _veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str, mtu: int = 1500) -> None:
        fd_b = os.open(nsutil.netns_path(self.ns(ns_b)), os.O_RDONLY | os.O_CLOEXEC)
        try:
            with self._ipr(ns_a) as ipr:
                ipr.link("add", ifname=if_a, kind="veth", peer={"ifname": if_b, "net_ns_fd": fd_b})
                if mtu != 1500:
                    ipr.link("set", index=ipr.link_lookup(ifname=if_a)[0], mtu=mtu)
        finally:
            os.close(fd_b)
        if mtu != 1500:
            with self._ipr(ns_b) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname=if_b)[0], mtu=mtu)

    @staticmethod
    def _addr(ipr: IPRoute, ifname: str, address: str, prefixlen: int) -> None:
        idx = ipr.link_lookup(ifname=ifname)[0]
        kw: dict[str, Any] = {}
        if ":" in address:
            kw["flags"] = IFA_F_NODAD
        ipr.addr("add", index=idx, address=address, prefixlen=prefixlen, **kw)

    @staticmethod
    def _up(ipr: IPRoute, *ifnames: str) -> None:
        for ifname in ifnames:
            ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], state="up")

    def _build(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{self.prefix}-"))
        self.ns_cl = self._new_ns("cl")
        self.ns_rt = self._new_ns("rt")
        self.ns_lb = self._new_ns("lb")
        # The backend switch is a bridge in its own namespace rather than in
        # lb: lb then looks like a real balancer host with exactly two NICs
        # (pub0, priv0) that the daemon's set-up may flush and reconfigure
        # freely, its netfilter hooks never see bridged frames (br_netfilter),
        # and failover tests can cut a backend's port without touching lb.
        self.ns_sw = self._new_ns("sw")

        nsutil.write_sysctl(self.ns_rt, "net.ipv4.ip_forward", 1)
        nsutil.write_sysctl(self.ns_rt, "net.ipv6.conf.all.forwarding", 1)
        # ICMP errors from the router are what PMTU and unreachable tests
        # observe; rate limiting would make repeated tests flaky.
        nsutil.write_sysctl(self.ns_rt, "net.ipv4.icmp_ratelimit", 0)
        nsutil.write_sysctl(self.ns_rt, "net.ipv6.icmp.ratelimit", 0)

        self._veth("cl", self.client_nic, "rt", self.rt_client_nic, mtu=self.client_mtu)
        self._veth("rt", self.rt_pub_nic, "lb", self.pub_nic)
        self._veth("lb", self.priv_nic, "sw", self.switch_lb_port)

        with self._ipr("sw") as ipr:
            # STP off and no forward delay: ports forward at once. Multicast
            # snooping off: without an MLD querier it can drop Neighbour
            # Solicitations to solicited-node groups.
            ipr.link(
                "add",
                ifname=self.bridge,
                kind="bridge",
                br_stp_state=0,
                br_forward_delay=0,
                br_mcast_snooping=0,
            )
            br = ipr.link_lookup(ifname=self.bridge)[0]
            ipr.link("set", index=ipr.link_lookup(ifname=self.switch_lb_port)[0], master=br)
            self._up(ipr, "lo", self.bridge, self.switch_lb_port)

        with self._ipr("cl") as ipr:
            for a4, a6 in zip(self.clients4, self.clients6, strict=True):
                self._addr(ipr, self.client_nic, a4, 24)
                self._addr(ipr, self.client_nic, a6, 64)
            self._up(ipr, "lo", self.client_nic)
        with self._ipr("rt") as ipr:
            self._addr(ipr, self.rt_client_nic, self.rt_client4, 24)
            self._addr(ipr, self.rt_client_nic, self.rt_client6, 64)
            self._addr(ipr, self.rt_pub_nic, self.rt_pub4, 24)
            self._addr(ipr, self.rt_pub_nic, self.rt_pub6, 64)
            self._up(ipr, "lo", self.rt_client_nic, self.rt_pub_nic)
        with self._ipr("lb") as ipr:
            self._addr(ipr, self.pub_nic, self.lb_pub4, 24)
            self._addr(ipr, self.pub_nic, self.lb_pub6, 64)
            self._up(ipr, "lo", self.pub_nic, self.priv_nic)

        pending = [self._add_backend_host(settle=False) for _ in range(self.n_backends)]
        # One wait for all links: an interface becomes usable only when the
        # kernel's link watcher runs (up to a second later), so waiting per
        # backend would add up.
        self._wait_settled(["cl", "rt", "lb", "sw", *(b.name for b in pending)])
        for b in pending:
            self._backend_routes(b)
        # IPv4 refuses a gateway route over a link that is not up yet, so
        # routes come after the links settled.
        metrics4: dict[str, int] = {}
        metrics6: dict[str, int] = {}
        if self.pmtu_probe and self.client_mtu < 1500:
            metrics4 = {"advmss": 1500 - 40}
            metrics6 = {"advmss": 1500 - 60}
        with self._ipr("cl") as ipr:
            ipr.route("add", dst="0.0.0.0/0", gateway=self.rt_client4, metrics=metrics4)
            ipr.route(
                "add", dst="::/0", gateway=self.rt_client6, family=socket.AF_INET6, metrics=metrics6
            )
        with self._ipr("lb") as ipr:
            ipr.route("add", dst="0.0.0.0/0", gateway=self.rt_pub4)
            ipr.route("add", dst="::/0", gateway=self.rt_pub6, family=socket.AF_INET6)

    def _next_backend_index(self) -> int:
        used = {b.index for b in self.backends}
        i = 1
        while i in used or f"b{i}" in self._roles:
            i += 1
        if i > 244:
            raise LabError("no backend address left")
        return i

    def _add_backend_host(self, settle: bool = True) -> Backend:
        i = self._next_backend_index()
        name = f"b{i}"
        ns = self._new_ns(name)
        # The original's failover finds backends by pinging the broadcast.
        nsutil.write_sysctl(ns, "net.ipv4.icmp_echo_ignore_broadcasts", 0)
        port = f"p-{name}"
        self._veth(name, "eth0", "sw", port)
        with self._ipr("sw") as ipr:
            br = ipr.link_lookup(ifname=self.bridge)[0]
            ipr.link("set", index=ipr.link_lookup(ifname=port)[0], master=br)
            self._up(ipr, port)
        addr4 = f"198.19.0.{10 + i}"
        addr6 = f"2001:db8:2::{10 + i}"
        with self._ipr(name) as ipr:
            self._addr(ipr, "eth0", addr4, 24)
            self._addr(ipr, "eth0", addr6, 64)
            self._up(ipr, "lo", "eth0")
            mac = ipr.link("get", index=ipr.link_lookup(ifname="eth0")[0])[0].get("IFLA_ADDRESS")
        b = Backend(name=name, index=i, ns=ns, addr4=addr4, addr6=addr6, mac=mac, switch_port=port)
        self.backends.append(b)
        self.backends.sort(key=lambda x: x.index)
        if settle:
            self._wait_settled([name, "sw"])
            self._backend_routes(b)
        return b

    def _backend_routes(self, b: Backend) -> None:
        with self._ipr(b.name) as ipr:
            # Via the balancer's private gateway, as the original requires, so
            # that replies traverse the balancer. The gateway address itself
            # only appears when the balancer (or router mode) configures it.
            ipr.route("add", dst="0.0.0.0/0", gateway=self.private_gw4)
            ipr.route("add", dst="::/0", gateway=self.private_gw6, family=socket.AF_INET6)

    def _wait_settled(self, roles: Sequence[str]) -> None:
        """Wait until every link is operationally up and no IPv6 address is tentative.

        Operational state matters, not just carrier: until the link watcher
        has attached the device's queueing discipline, everything sent on it
        is silently dropped.
        """
        deadline = time.monotonic() + self.settle_timeout
        with contextlib.ExitStack() as stack:
            iprs = {role: stack.enter_context(self._ipr(role)) for role in roles}
            while True:
                pending = [p for role, ipr in iprs.items() for p in self._unsettled(role, ipr)]
                if not pending:
                    return
                if time.monotonic() > deadline:
                    raise LabError("lab did not settle: " + ", ".join(pending))
                time.sleep(0.02)

    @staticmethod
    def _unsettled(role: str, ipr: IPRoute) -> list[str]:
        pending = []
        for link in ipr.link("dump"):
            ifname = link.get("IFLA_IFNAME")
            if ifname == "lo" or not link["flags"] & 1:  # IFF_UP: down on purpose
                continue
            if link.get("IFLA_OPERSTATE") != "UP":
                pending.append(f"{role}/{ifname} {link.get('IFLA_OPERSTATE')}")
        for addr in ipr.addr("dump", family=socket.AF_INET6):
            flags = addr.get("IFA_FLAGS") or addr["flags"]
            if flags & IFA_F_DADFAILED:
                raise LabError(f"DAD failed in {role}: {addr.get('IFA_ADDRESS')}")
            if flags & IFA_F_TENTATIVE:
                pending.append(f"{role} {addr.get('IFA_ADDRESS')} tentative")
        return pending

    # ------------------------------------------------------ topology changes

    def setup_router_mode(self, vip: bool = True) -> None:
        """Make lb a plain router (no balancer): what the daemon would set up
        for itself (private gateway addresses on priv0, forwarding on, and by
        default the VIPs on pub0), plus routes on rt to the real-server nets
        so clients can reach the backends directly."""
        with self._ipr("lb") as ipr:
            self._addr(ipr, self.priv_nic, self.private_gw4, self.private_gw4_prefixlen)
            self._addr(ipr, self.priv_nic, self.private_gw6, self.private_gw6_prefixlen)
            if vip:
                self._addr(ipr, self.pub_nic, self.vip4, self.vip4_prefixlen)
                self._addr(ipr, self.pub_nic, self.vip6, self.vip6_prefixlen)
        nsutil.write_sysctl(self.ns_lb, "net.ipv4.ip_forward", 1)
        nsutil.write_sysctl(self.ns_lb, "net.ipv6.conf.all.forwarding", 1)
        with self._ipr("rt") as ipr:
            ipr.route("add", dst=self.rip4, gateway=self.lb_pub4)
            ipr.route("add", dst=self.rip6, gateway=self.lb_pub6, family=socket.AF_INET6)
        self._wait_settled(["lb"])
        self.router_mode = True

    def add_backend(self) -> Backend:
        """Hot-plug a new backend host into the real-server net (b<next free index>)."""
        with self._mutex:
            self._check_running()
            return self._add_backend_host()

    def remove_backend(self, name: str) -> None:
        """Unplug a backend: kill its processes and delete its namespace."""
        with self._mutex:
            b = self.backend(name)
            self._stop_tracked(grace=1.0, ns=b.ns)
            nsutil.kill_pids(nsutil.pids_in_netns(b.ns), grace=1.0)
            nsutil.delete_netns(b.ns)
            self.backends.remove(b)
            del self._roles[b.name]

    def set_backend_link(self, name: str, up: bool) -> None:
        """Cut or restore a backend's switch port (it looks dead but keeps its state)."""
        b = self.backend(name)
        with self._ipr("sw") as ipr:
            ipr.link(
                "set", index=ipr.link_lookup(ifname=b.switch_port)[0], state="up" if up else "down"
            )
        if up:
            self._wait_settled([b.name, "sw"])

    # -------------------------------------------------------------- processes

    def _check_running(self) -> None:
        if not self._started or self._torn_down:
            raise LabError("lab is not running")

    def exec(self, ns: str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start `argv` inside namespace `ns` (role or full name); the process is
        killed (with its process group) at teardown.

        `ip netns exec` execs in place, so the Popen's pid is the program's.
        A new session by default, so that a Ctrl-C on the terminal reaches
        only the test process (which then tears down in order) and the whole
        group can be signalled.
        """
        self._check_running()
        name = self.ns(ns)
        popen_kwargs.setdefault("start_new_session", True)
        proc: subprocess.Popen[Any] = subprocess.Popen(
            ["ip", "netns", "exec", name, *argv], **popen_kwargs
        )
        self._procs.append(_Tracked(ns=name, proc=proc))
        self._wait_entered(proc, name)
        return proc

    @staticmethod
    def _wait_entered(proc: subprocess.Popen[Any], ns: str, timeout: float = 5.0) -> None:
        # Popen returns once `ip` is exec'd, before it has switched namespace.
        # Until then a namespace sweep (teardown, or cleanup_stale after this
        # process dies) cannot see the child, which could then slip into a
        # deleted namespace and live on there.
        ident = nsutil.netns_inode(ns)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                st = os.stat(f"/proc/{proc.pid}/ns/net")
            except FileNotFoundError:
                return
            if (st.st_dev, st.st_ino) == ident:
                return
            time.sleep(0.001)

    def run(
        self,
        ns: str,
        argv: Sequence[str],
        timeout: float = 10.0,
        check: bool = False,
        **kwargs: Any,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` in namespace `ns` to completion (text output captured)."""
        self._check_running()
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(
            ["ip", "netns", "exec", self.ns(ns), *argv], timeout=timeout, check=check, **kwargs
        )

    def _stop_tracked(self, grace: float, ns: str | None = None) -> None:
        procs = [t.proc for t in self._procs if ns is None or t.ns == ns]
        running = [p for p in procs if p.poll() is None]
        for p in running:
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.0, deadline - time.monotonic()))
        for p in running:
            if p.poll() is None:
                _signal_group(p, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(2.0)

    def start_server(
        self,
        backend: Backend | str,
        port: int = DEFAULT_SERVER_PORT,
        udp_port: int | None = None,
        timeout: float = 10.0,
    ) -> subprocess.Popen[bytes]:
        """Start `loaded.lab.server` on a backend and wait until it listens."""
        b = backend if isinstance(backend, Backend) else self.backend(backend)
        assert self.workdir is not None
        log_path = self.workdir / f"{b.name}-server.log"
        argv = [sys.executable, "-m", "loaded.lab.server", "--name", b.name, "--port", str(port)]
        argv += ["--udp-port", str(port if udp_port is None else udp_port)]
        with open(log_path, "ab") as logf:
            proc = self.exec(b.ns, argv, stdout=subprocess.PIPE, stderr=logf)
        self._procs[-1].log_path = log_path
        assert proc.stdout is not None
        try:
            line = _read_line(proc.stdout.fileno(), timeout)
        except TimeoutError:
            line = b""
        if line.strip() != b"ready":
            _signal_group(proc, signal.SIGKILL)
            proc.wait(2.0)
            raise LabError(
                f"server on {b.name} did not start: {line!r}; log: "
                + log_path.read_text(errors="replace")[-2000:]
            )
        return proc

    def start_servers(
        self, port: int = DEFAULT_SERVER_PORT, udp_port: int | None = None
    ) -> list[subprocess.Popen[bytes]]:
        return [self.start_server(b, port, udp_port) for b in self.backends]

    # ---------------------------------------------------------------- sockets

    def socket(
        self,
        ns: str,
        family: int = socket.AF_INET,
        type: int = socket.SOCK_STREAM,
        proto: int = 0,
    ) -> socket.socket:
        """A socket that lives in namespace `ns`, usable from any thread."""
        return nsutil.netns_socket(self.ns(ns), family, type, proto)

    def in_netns(self, ns: str) -> contextlib.AbstractContextManager[None]:
        """Switch the calling thread into `ns` for a `with` block (e.g. to
        let a C library such as libnetfilter_queue open its own sockets there)."""
        return nsutil.in_netns(self.ns(ns))

    def sysctl(self, ns: str, key: str, value: str | int | None = None) -> str:
        """Read (value None) or write a net.* sysctl inside `ns`."""
        if value is not None:
            nsutil.write_sysctl(self.ns(ns), key, value)
        return nsutil.read_sysctl(self.ns(ns), key)

    # ----------------------------------------------------------------- config

    def config_entries(self, **overrides: Any) -> list[tuple[str, str]]:
        """The balancer config for this lab as ordered (key, value) pairs.

        Overrides replace a key (a list/tuple value repeats the key, None
        drops it, True writes a bare word such as `failover`)."""
        ncpu = os.cpu_count() or 1
        values: dict[str, Any] = {
            "VIP4": self.vip4,
            "VIP4net": self.vip4_prefixlen,
            "VIP6": self.vip6,
            "VIP6net": self.vip6_prefixlen,
            "RIP4": self.rip4,
            "RIP6": self.rip6,
            "public_NIC": self.pub_nic,
            "private_NIC": self.priv_nic,
            "private_GW": [
                f"{self.private_gw4}/{self.private_gw4_prefixlen}",
                f"{self.private_gw6}/{self.private_gw6_prefixlen}",
            ],
            "broadcast": self.broadcast4,
            "FIRST_CORE": 0,
            "LAST_CORE": ncpu - 1,
            "nfq_len": None,  # the data path's default
            "server4": [b.addr4 for b in self.backends],
            "server6": [b.addr6 for b in self.backends],
            "strategy": "rr",
            "port_alive": DEFAULT_SERVER_PORT,
            "check_cycle": 30,
        }
        values.update(overrides)
        entries: list[tuple[str, str]] = []
        for key, value in values.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"bad config key {key!r}")
            if value is None or value is False:
                continue
            if value is True:
                entries.append((key, ""))
                continue
            items = value if isinstance(value, list | tuple) else [value]
            for item in items:
                text = str(item)
                # The file is also sourced by a shell and parsed by a
                # line-based reader: no quotes, comments, expansions or line
                # breaks. Further words must be options such as "weight=3",
                # which a shell takes for more assignments, never for commands.
                words = text.split(" ")
                if (
                    not all(words)
                    or re.search(r"[\t\r\n\v\f#'\"`$;&|<>()\\]", text)
                    or not all(re.fullmatch(r"[A-Za-z_]\w*=\S+", w) for w in words[1:])
                ):
                    raise ValueError(f"bad config value for {key}: {text!r}")
                entries.append((key, text))
        return entries

    def config_text(self, **overrides: Any) -> str:
        lines = [
            "#!/bin/sh",
            f"# loaded configuration for lab {self.prefix} (generated by loaded.lab)",
            "# key=value, no blanks around '='; repeated keys add list entries",
            "",
        ]
        for key, value in self.config_entries(**overrides):
            lines.append(key if value == "" else f"{key}={value}")
        return "\n".join(lines) + "\n"

    def write_config(self, path: str | os.PathLike[str], **overrides: Any) -> Path:
        p = Path(path)
        # Saved client tables beside the config, inside the lab's directory:
        # gone with the lab, never left in /var/lib/loaded.
        overrides.setdefault("persist_file", f"{p.resolve()}.clients.json")
        p.write_text(self.config_text(**overrides))
        return p

    # ---------------------------------------------------------------- summary

    def describe(self) -> Mapping[str, Any]:
        """Plain data about the lab (for the `loaded lab` command and logs)."""
        return {
            "prefix": self.prefix,
            "namespaces": dict(self._roles),
            "vip4": self.vip4,
            "vip6": self.vip6,
            "clients4": self.clients4,
            "clients6": self.clients6,
            "backends": [
                {"name": b.name, "ns": b.ns, "addr4": b.addr4, "addr6": b.addr6, "mac": b.mac}
                for b in self.backends
            ],
            "client_mtu": self.client_mtu,
            "router_mode": self.router_mode,
        }


def _signal_group(proc: subprocess.Popen[Any], sig: int) -> None:
    # Only signal a group we know is ours: the child is still unreaped, so
    # its pid (= its pgid with start_new_session) cannot have been reused.
    if proc.poll() is not None:
        return
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except ProcessLookupError:
        pass


def _read_line(fd: int, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf.split(b"\n", 1)[0]


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold back Ctrl-C while tearing down, so a second Ctrl-C cannot leave
    half-deleted namespaces behind; it is delivered afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[bool] = []
    old = signal.signal(signal.SIGINT, lambda *_: pending.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if pending:
        raise KeyboardInterrupt


def cleanup_stale() -> list[str]:
    """Remove namespaces and processes of lab runs whose owner is gone.

    Returns the names of the namespaces removed. Labs of live processes
    (their marker is still locked) are left alone.
    """
    removed: list[str] = []
    if not RUN_DIR.is_dir():
        markers: list[Path] = []
    else:
        markers = sorted(RUN_DIR.glob("ld????.lock"))
    for marker in markers:
        try:
            fd = os.open(marker, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # owner alive
            # Holding the dead owner's lock keeps other cleaners out meanwhile.
            removed += _remove_prefix(marker.stem)
            # Only dead runs' directories: a lab torn down with keep_workdir
            # has no marker any more and keeps its logs.
            tmp_root = Path(tempfile.gettempdir())
            for d in tmp_root.glob(f"{WORKDIR_PREFIX}{marker.stem}-*"):
                shutil.rmtree(d, ignore_errors=True)
            if not [n for n in nsutil.list_netns() if n.startswith(marker.stem + "-")]:
                with contextlib.suppress(FileNotFoundError):
                    marker.unlink()
        finally:
            os.close(fd)
    # A namespace with a lab prefix but no marker at all is an orphan: markers
    # are created before the first namespace and removed after the last.
    orphans = {m.group(1) for n in nsutil.list_netns() if (m := PREFIX_RE.match(n))}
    for prefix in sorted(orphans):
        if not (RUN_DIR / f"{prefix}.lock").exists():
            removed += _remove_prefix(prefix)
    for tmp in RUN_DIR.glob(".claim-*") if RUN_DIR.is_dir() else []:
        # Claim files live only for microseconds, but a crash in between leaves one.
        with contextlib.suppress(OSError):
            if time.time() - tmp.stat().st_mtime > 60:
                tmp.unlink()
    if removed:
        log.info("removed stale lab namespaces: %s", removed)
    return removed


def _remove_prefix(prefix: str) -> list[str]:
    names = [n for n in nsutil.list_netns() if n.startswith(prefix + "-")]
    for ns in names:
        nsutil.kill_pids(nsutil.pids_in_netns(ns), grace=1.0)
    for ns in names:
        try:
            nsutil.delete_netns(ns)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("could not delete %s: %s", ns, exc)
    return names


def sigterm_as_exit() -> None:
    """Make SIGTERM raise SystemExit in the main thread, so `with Lab()` tears
    down when a long-running lab command is terminated."""

    owner = os.getpid()

    def handler(signum: int, frame: object) -> None:
        if os.getpid() != owner:
            # A forked helper process (pyroute2's) inherits this handler: it must
            # just die, not unwind its copy of the caller's stack.
            os._exit(128 + signum)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
