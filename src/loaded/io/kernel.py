"""Carries out a kernel set-up plan, and undoes exactly what it did.

Every step that really changed something is appended to a journal file
(``/run/loaded/<tag>.json``) the moment it is done; a step that found its
object already there (an address the administrator had added, a sysctl that
already had the value) is not recorded and so never undone. Undo replays the
journal backwards. A daemon that crashed leaves its journal behind; the next
start of the same instance undoes it first.

Addresses, routes and neighbours go through netlink (pyroute2); sysctls through
/proc/sys; firewall rules through iptables/ip6tables, the only interface to the
NFQUEUE and HMARK targets (argument vectors, never shell strings); the data
path's table through the nftables JSON API (libnftables); conntrack entries
through ctnetlink (pyroute2). What the table holds, and whether the kernel
remembers clients, is the data path's (``Plan.datapath``) to say.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import nftables
from pyroute2 import Conntrack, IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from loaded.core.firewall import Chain, IPAddress, counter_mark
from loaded.core.plan import Address, Neighbour, Plan, Route, Sysctl
from loaded.core.pool import ct_mark_version
from loaded.io.files import write_atomic
from loaded.io.nftcounters import read_counters

log = logging.getLogger("loaded.kernel")

JOURNAL_DIR = Path("/run/loaded")
NUD_PERMANENT = 0x80
_NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x80  # reachable, stale, delay, probe, permanent
IFA_F_NODAD = 0x02
RT_TABLE_MAIN = 254
RTPROT_STATIC = 4
# What `ip route add` would give a route without a metric: IPv6 needs it said,
# or an undo by destination alone could hit the operator's route of another metric.
ROUTE_METRIC = {4: 0, 6: 1024}


class KernelError(RuntimeError):
    pass


def _iptables(family: int, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    tool = "iptables" if family == 4 else "ip6tables"
    proc = subprocess.run([tool, "-w", "5", *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise KernelError(f"{tool} {' '.join(args)}: {proc.stderr.strip()}")
    return proc


class Nft:
    """The nftables JSON API; errors become KernelError with nft's own message."""

    def __init__(self) -> None:
        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._nft.set_handle_output(False)

    def run(self, commands: Iterable[dict[str, Any]]) -> Any:
        cmds = list(commands)
        rc, out, err = self._nft.json_cmd({"nftables": cmds})
        if rc != 0:
            raise KernelError(f"nftables: {str(err).strip()} (in {json.dumps(cmds)[:300]})")
        return out

    def text(self, command: str) -> None:
        """One command in nft's syntax, for what the JSON API cannot express."""
        rc, _, err = self._nft.cmd(command)
        if rc != 0:
            raise KernelError(f"nftables: {str(err).strip()} (in {command[:300]})")

    def table_exists(self, family: str, name: str) -> bool:
        # Only the table headers: listing the table itself prints its rules as
        # JSON, and libnftables writes "stmt ops map have no json callback" to
        # the daemon's stderr for the map update it cannot express.
        rc, out, _ = self._nft.json_cmd({"nftables": [{"list": {"tables": {"family": family}}}]})
        items = out.get("nftables", []) if rc == 0 and isinstance(out, dict) else []
        return any(item.get("table", {}).get("name") == name
                   and item["table"].get("family") == family for item in items)

    def map_elements(self, table: str, name: str) -> list[tuple[dict[str, Any], Any]]:
        """The elements of a map of an inet table: (key as {"val", "expires"...}, value)."""
        out = self.run([{"list": {"map": {"family": "inet", "table": table, "name": name}}}])
        found = []
        for item in out.get("nftables", []) if isinstance(out, dict) else []:
            for key, value in item.get("map", {}).get("elem", []) or []:
                found.append((key["elem"] if isinstance(key, dict) else {"val": key}, value))
        return found

    def delete_elements(self, table: str, name: str, keys: list[Any]) -> None:
        """Delete keys from a set or map; one already gone (expired since it was
        listed) fails the whole transaction, so then one by one, ignoring those."""
        where = {"family": "inet", "table": table, "name": name}
        try:
            self.run([{"delete": {"element": dict(where, elem=keys)}}])
        except KernelError:
            for key in keys:
                try:
                    self.run([{"delete": {"element": dict(where, elem=[key])}}])
                except KernelError:
                    pass


class Kernel:
    """Applies one plan; keeps its journal."""

    def __init__(self, plan: Plan, journal_dir: Path = JOURNAL_DIR) -> None:
        self.plan = plan
        self.journal_path = journal_dir / f"{plan.tag}.json"
        self.steps: list[dict[str, Any]] = []
        self.unresolved: list[Neighbour] = []
        self._ipr = IPRoute()
        self._nft: Nft | None = None
        self._ct: Conntrack | None = None

    @property
    def nft(self) -> Nft:
        if self._nft is None:
            self._nft = Nft()
        return self._nft

    @property
    def ct(self) -> Conntrack:
        if self._ct is None:
            self._ct = Conntrack()
        return self._ct

    # --- journal -------------------------------------------------------------

    def _record(self, step: dict[str, Any]) -> None:
        self.steps.append(step)
        self.journal_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.journal_path, json.dumps({"pid": os.getpid(), "steps": self.steps}))

    def recover(self) -> int:
        """Undo what a crashed run of this instance left; returns how many steps."""
        try:
            data = json.loads(self.journal_path.read_text())
        except FileNotFoundError:
            data = {"steps": []}
        except (OSError, ValueError) as e:
            log.warning("event=journal-unreadable path=%s error=%r", self.journal_path, e)
            data = {"steps": []}
        pid = data.get("pid")
        if pid and pid != os.getpid() and _alive(pid):
            # Not ours to touch: the journal and everything it lists belong to it.
            raise KernelError(f"instance {self.plan.tag} is running as pid {pid}")
        steps = data.get("steps", [])
        self.steps = list(steps)
        self.undo()
        # Chains of this instance that a journal-less crash left behind.
        for chain in self.plan.chains:
            self._remove_chain(chain.family, chain.table, chain.hook, chain.name,
                               list(chain.jump_match))
        if self.plan.nft and self.nft.table_exists("inet", self.plan.nft_table):
            self._undo({"kind": "nft-table", "name": self.plan.nft_table})
        return len(steps)

    # --- apply ---------------------------------------------------------------

    def apply_base(self) -> None:
        """Sysctls, addresses and routes: what must exist before the workers run."""
        for s in self.plan.sysctls:
            self._sysctl(s)
        for a in self.plan.addresses:
            self._address(a)
        for r in self.plan.routes:
            self._route(r)

    def apply_rules(self) -> None:
        """The rules that send packets to the queues, then the neighbour entries."""
        if self.plan.nft:
            # The NAT table before the queue rules: no first packet is marked
            # before its mark means something.
            self._record({"kind": "nft-table", "name": self.plan.nft_table})
            self.nft.run(self.plan.nft)
            for command in self.plan.nft_text:
                self.nft.text(command)
        for c in self.plan.chains:
            self._chain(c)
        self.unresolved = self.pin_neighbours(self.plan.neighbours)

    # --- the nftables table at run time ---------------------------------------------

    def map_backend(self, version: int, index: int, ip: IPAddress) -> None:
        """A backend added at run time: the destination of its mark, its traffic
        counted (the same mark again: no-op); what that takes is the data path's."""
        if not self.plan.nft:
            return
        self.nft.run(self.plan.datapath.backend_target(self.plan.tag, version, index, ip))

    def update_hash(self, commands: list[str]) -> None:
        """Buckets of the kernel's hash table (``nft_hash_buckets``): one transaction."""
        self.nft.text("\n".join(commands))

    def recalled(self, ip: IPAddress) -> tuple[int, float | None] | None:
        """The kernel's memory of one client: (mark, seconds until it expires)."""
        if not self.plan.datapath.remembers_clients:
            return None
        # nft 1.0.6 has no JSON "get element": the map is listed (a CLI lookup only).
        for key, value in self.nft.map_elements(self.plan.nft_table, f"clients{ip.version}"):
            if ipaddress.ip_address(str(key.get("val"))) == ip:
                expires = key.get("expires")
                return int(value), None if expires is None else float(expires)
        return None

    def forget_clients(self, mark: int) -> int:
        """Drop the kernel's memory of the clients of one backend (it went down)."""
        if not self.plan.datapath.remembers_clients:
            return 0
        name = f"clients{ct_mark_version(mark)}"
        gone = [key["val"] for key, value in self.nft.map_elements(self.plan.nft_table, name)
                if value == mark]
        if gone:
            self.nft.delete_elements(self.plan.nft_table, name, gone)
        return len(gone)

    def forget_unbalanced(self, vips: Iterable[str]) -> int:
        """Delete conntrack entries to a VIP that carry no backend's mark (taken by
        the balancer's own stack while no backend was up, or with no daemon)."""
        wanted = {ipaddress.ip_address(v) for v in vips}
        n = 0
        for entry in list(self.ct.dump_entries(mark=0, mark_mask=0xFFFFFFFF)):
            daddr = getattr(entry.tuple_orig, "daddr", None)
            if daddr is not None and ipaddress.ip_address(daddr) in wanted:
                try:
                    self.ct.delete(entry)
                    n += 1
                except NetlinkError as e:
                    if e.code != errno.ENOENT:
                        raise
        return n

    def kernel_counters(self) -> tuple[dict[int, tuple[int, int]], dict[str, int]]:
        """Packets and bytes each backend's traffic took through the table (by
        mark; conntrack path: both directions, per-packet path: the replies
        rewritten in the kernel), and the packets of the table's other counters
        (``invalid``: dropped as invalid, ``hashed``: given to the hash table):
        read at once."""
        if not self.plan.nft:
            return {}, {}
        backends: dict[int, tuple[int, int]] = {}
        named: dict[str, int] = {}
        for name, value in read_counters(self.plan.nft_table).items():
            mark = counter_mark(name)
            if mark is not None:
                backends[mark] = value
            else:
                named[name] = value[0]
        return backends, named

    def forget_connections(self, mark: int) -> int:
        """Delete the conntrack entries of one backend (by connection mark): their
        next packet is NEW again and goes to the worker. Returns how many there were."""
        count = sum(1 for _ in self.ct.dump(mark=mark, mark_mask=0xFFFFFFFF))
        if count:
            self.ct.flush(mark=mark, mark_mask=0xFFFFFFFF)
        return count

    def _sysctl(self, s: Sysctl) -> None:
        path = Path("/proc/sys") / s.key
        try:
            old = path.read_text().strip()
        except FileNotFoundError:
            raise KernelError(f"no sysctl {s.key} (is the interface there?)") from None
        if old != s.value:
            path.write_text(s.value)
            self._record({"kind": "sysctl", "key": s.key, "old": old})

    def _index(self, ifname: str) -> int:
        found = self._ipr.link_lookup(ifname=ifname)
        if not found:
            raise KernelError(f"no interface {ifname}")
        return int(found[0])

    def _address(self, a: Address) -> None:
        idx = self._index(a.ifname)
        kwargs: dict[str, Any] = {"index": idx, "address": str(a.ip), "prefixlen": a.prefix}
        if a.ip.version == 6:
            kwargs["flags"] = IFA_F_NODAD  # a VIP must answer at once, not after DAD
        try:
            self._ipr.addr("add", **kwargs)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise KernelError(f"address {a.ip}/{a.prefix} on {a.ifname}: {e}") from None
            return
        self._record({"kind": "address", "ifname": a.ifname, "ip": str(a.ip),
                      "prefix": a.prefix})

    def _route(self, r: Route) -> None:
        """Our route to the real-server net, unless the operator's (or the kernel's,
        for an address in that net) already sends it out of the same device."""
        idx = self._index(r.ifname)
        family = socket.AF_INET if r.dst.version == 4 else socket.AF_INET6
        for existing in self._ipr.get_routes(family=family, table=RT_TABLE_MAIN):
            if (existing.get_attr("RTA_DST") == str(r.dst.network_address)
                    and existing["dst_len"] == r.dst.prefixlen
                    and existing.get_attr("RTA_OIF") == idx):
                return
        step = {"kind": "route", "dst": str(r.dst), "ifname": r.ifname,
                "table": RT_TABLE_MAIN, "proto": RTPROT_STATIC,
                "priority": ROUTE_METRIC[r.dst.version]}
        try:
            self._ipr.route("add", dst=str(r.dst), oif=idx, table=RT_TABLE_MAIN,
                            proto=RTPROT_STATIC, priority=step["priority"])
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise KernelError(f"route {r.dst} dev {r.ifname}: {e}") from None
            return
        self._record(step)

    def _chain(self, c: Chain) -> None:
        fam, t = c.family, c.table
        # iptables-nft creates a whole table on first use; if it was not there
        # before, it goes again on exit, or "nothing else changed" would not hold.
        new_table = _iptables_nft() and not self.nft.table_exists(_nft_family(fam), t)
        _iptables(fam, "-t", t, "-N", c.name)
        self._record({"kind": "chain", "family": fam, "table": t, "hook": c.hook,
                      "name": c.name, "jump": list(c.jump_match), "new_table": new_table})
        for rule in c.rules:
            _iptables(fam, "-t", t, "-A", c.name, *rule)
        _iptables(fam, "-t", t, "-I", c.hook, "1", *c.jump_match, "-j", c.name)

    def pin_neighbours(self, wanted: Iterable[Neighbour], wait: float = 3.0) -> list[Neighbour]:
        """Permanent neighbour entries for ``wanted``; returns those not resolved yet.

        Resolution is triggered by a datagram to the discard port, which makes
        the kernel run ARP or neighbour discovery as for any packet.
        """
        pending = list(wanted)
        for nb in pending:
            _poke(str(nb.ip))
        deadline = time.monotonic() + wait
        left: list[Neighbour] = []
        while pending:
            left = []
            for nb in pending:
                if not self._pin(nb):
                    left.append(nb)
            pending = left
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        for nb in left:
            log.warning("event=neighbour-unresolved ip=%s dev=%s", nb.ip, nb.ifname)
        return left

    def _pin(self, nb: Neighbour) -> bool:
        idx = self._index(nb.ifname)
        family = socket.AF_INET if nb.ip.version == 4 else socket.AF_INET6
        for entry in self._ipr.get_neighbours(family=family, dst=str(nb.ip), ifindex=idx):
            mac = entry.get_attr("NDA_LLADDR")
            state = entry["state"]
            if mac and state & _NUD_USABLE:
                if state & NUD_PERMANENT:
                    return True  # someone pinned it already: theirs, leave it
                self._ipr.neigh("replace", dst=str(nb.ip), lladdr=mac, ifindex=idx,
                                state=NUD_PERMANENT, family=family)
                self._record({"kind": "neighbour", "ifname": nb.ifname, "ip": str(nb.ip)})
                log.info("event=neighbour-pinned ip=%s lladdr=%s dev=%s", nb.ip, mac, nb.ifname)
                return True
        return False

    def own_addresses(self) -> list[IPAddress]:
        """Every address of this host (network namespace): never a backend."""
        out: list[IPAddress] = []
        for msg in self._ipr.get_addr():
            addr = msg.get_attr("IFA_ADDRESS")
            if addr:
                out.append(ipaddress.ip_address(addr.split("%")[0]))
        return out

    # --- undo ----------------------------------------------------------------

    def undo(self) -> None:
        """Undo every recorded step, newest first; keep going past failures."""
        while self.steps:
            step = self.steps.pop()
            try:
                self._undo(step)
            except Exception as e:  # an undo that fails must not stop the others
                log.warning("event=undo-failed step=%s error=%r", json.dumps(step), e)
        try:
            self.journal_path.unlink()
        except FileNotFoundError:
            pass

    def _undo(self, step: dict[str, Any]) -> None:
        kind = step["kind"]
        if kind == "sysctl":
            (Path("/proc/sys") / step["key"]).write_text(step["old"])
        elif kind == "address":
            idx = self._ipr.link_lookup(ifname=step["ifname"])
            if idx:
                self._ignore_missing(lambda: self._ipr.addr(
                    "del", index=idx[0], address=step["ip"], prefixlen=step["prefix"]))
        elif kind == "route":
            idx = self._ipr.link_lookup(ifname=step["ifname"])
            if idx:
                # Exactly the route added: the kernel deletes the first match of
                # what is given, so table, protocol and metric are all given.
                # (A journal from before they were recorded has none: dst and
                # device then, as that version added them.)
                exact = {k: step[k] for k in ("table", "proto", "priority") if k in step}
                self._ignore_missing(lambda: self._ipr.route(
                    "del", dst=step["dst"], oif=idx[0], **exact))
        elif kind == "neighbour":
            idx = self._ipr.link_lookup(ifname=step["ifname"])
            if idx:
                family = socket.AF_INET6 if ":" in step["ip"] else socket.AF_INET
                self._ignore_missing(lambda: self._ipr.neigh(
                    "del", dst=step["ip"], ifindex=idx[0], family=family))
        elif kind == "nft-table":
            if self.nft.table_exists("inet", step["name"]):
                self.nft.run([{"delete": {"table": {"family": "inet", "name": step["name"]}}}])
        elif kind == "chain":
            self._remove_chain(step["family"], step["table"], step["hook"], step["name"],
                               step["jump"])
            if step.get("new_table"):
                _drop_table_if_empty(self.nft, step["family"], step["table"])

    @staticmethod
    def _remove_chain(family: int, table: str, hook: str, name: str, jump: list[str]) -> None:
        while _iptables(family, "-t", table, "-D", hook, *jump, "-j", name,
                        check=False).returncode == 0:
            pass
        _iptables(family, "-t", table, "-F", name, check=False)
        _iptables(family, "-t", table, "-X", name, check=False)

    @staticmethod
    def _ignore_missing(action: Any) -> None:
        try:
            action()
        except NetlinkError as e:
            if e.code not in (errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL, errno.ENODEV):
                raise

    def close(self) -> None:
        self._ipr.close()
        if self._ct is not None:
            self._ct.close()


def _nft_family(family: int) -> str:
    return "ip" if family == 4 else "ip6"


@functools.cache
def _iptables_nft() -> bool:
    """Whether iptables is the nf_tables variant (whose tables appear on first use
    and so are ours to remove), not legacy (whose tables always exist)."""
    try:
        version = subprocess.run(["iptables", "-V"], capture_output=True, text=True,
                                 check=False).stdout
    except FileNotFoundError:
        return False
    return "nf_tables" in version


def _drop_table_if_empty(nft: Nft, family: int, table: str) -> None:
    listing = _iptables(family, "-t", table, "-S", check=False).stdout.splitlines()
    if all(line.startswith("-P ") for line in listing if line.strip()):
        try:
            nft.run([{"delete": {"table": {"family": _nft_family(family), "name": table}}}])
        except KernelError:
            pass


def _poke(ip: str) -> None:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.sendto(b"", (ip, 9))
    except OSError:
        pass


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a running loaded process (not a stranger that reused the pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"loaded" in cmdline
