"""The packet engine: one queued packet in, a verdict and a rewritten packet out.

Rules, in the order they are applied to a packet (``Engine.handle``):

1. The packet is parsed (``loaded.core.packet``); garbage raises ``PacketError``.
2. Destination is a VIP -> **inbound**:

   - TCP, UDP, ICMP/ICMPv6 echo request: the client's source address picks the
     backend through the VIP's client table (sticky) and strategy; the
     destination becomes the backend. Later fragments follow their client, so
     every fragment of a datagram reaches the same backend without reassembly.
   - ICMP/ICMPv6 error (unreachable, fragmentation needed / packet too big,
     time exceeded, parameter problem): it belongs to the flow of the packet it
     quotes, which the balancer sent from the VIP to a client; it goes to the
     backend serving that client, with the outer destination and the quoted
     source rewritten to the backend and every checksum fixed. This is what makes
     path-MTU discovery work through the balancer.
   - ICMPv6 neighbour discovery for the VIP is the balancer's own business: it
     is accepted unchanged, for the local stack.
   - Anything else is dropped (``unsupported-protocol``, ``unsupported-icmp-type``).

3. Source is a backend of a VIP, or lies in a VIP's real-server network ->
   **return path**: the source becomes the VIP (stateless, as the original);
   an ICMP error from the real-server side also gets its quoted destination
   rewritten to the VIP, so the client's socket recognises it. Traffic to a
   nameserver, multicast and neighbour discovery pass unchanged.
4. Anything else passes unchanged.

A dropped packet raises ``PacketError`` with its reason; ``handle`` returns the
backend that served the packet (inbound or return; ``Service.unlisted`` for a
real-server host that is not a backend), or None exactly when the packet passes
unchanged. The common shapes (IPv4 without options or fragments, IPv6
without extension headers, TCP or UDP, checksums complete) take a fast path
that gives exactly the result of the general one; tests hold them equal.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Mapping, Sequence

from loaded.core.checksum import address_delta
from loaded.core.clients import ClientTable
from loaded.core.commands import AddBackend, PoolCommand, RemoveBackend, SetState
from loaded.core.config import Config
from loaded.core.errors import PacketError, Reason
from loaded.core.packet import (
    ICMP,
    ICMP4_ECHO_REQUEST,
    ICMP6_ECHO_REQUEST,
    ICMP6_NDP,
    ICMPV6,
    TCP,
    UDP,
    Buf,
    Packet,
    icmp_checksum_ok,
    parse,
    parse_embedded,
    rewrite,
    rewrite_embedded,
    set_icmp_checksum,
)
from loaded.core.pool import Backend, IPAddress, Pool, State
from loaded.core.strategies import Strategy, make_strategy

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_ADDR4 = struct.Struct("4s4s").unpack_from
_ADDR6 = struct.Struct("16s16s").unpack_from


class Service:
    """One VIP with its backends, strategy and client table."""

    def __init__(self, vip: IPAddress, pool: Pool, strategy: Strategy, table: ClientTable,
                 real_net: IPNetwork | None = None) -> None:
        self.vip = vip
        self.addr = vip.packed
        self.pool = pool
        self.strategy = strategy
        self.table = table
        self.real_net = real_net
        # Stands for the hosts of the real-server network that are not backends:
        # their replies get the VIP as source too (the original's stateless
        # return path), and are counted here.
        self.unlisted = Backend(real_net.network_address if real_net is not None else vip, vip)
        # Backends removed gracefully: draining, gone from the pool once their
        # last client is (``Engine.settle``).
        self.leaving: set[Backend] = set()

    @property
    def version(self) -> int:
        return self.vip.version


class Engine:
    """Turns queued packets into verdicts; one per worker, no shared state."""

    def __init__(self, services: Sequence[Service],
                 nameservers: Iterable[IPAddress] = ()) -> None:
        self.services = list(services)
        self._vip4 = {s.addr: s for s in self.services if s.version == 4}
        self._vip6 = {s.addr: s for s in self.services if s.version == 6}
        if len(self._vip4) + len(self._vip6) != len(self.services):
            raise ValueError("two services share a VIP")
        self._svc4 = [s for s in self.services if s.version == 4]
        self._svc6 = [s for s in self.services if s.version == 6]
        self._nameservers = frozenset(ns.packed for ns in nameservers)

    def service(self, vip: IPAddress) -> Service | None:
        return (self._vip4 if vip.version == 4 else self._vip6).get(vip.packed)

    # --- changes of the pools, from health checks or the operator ---------------

    def _require(self, vip: IPAddress) -> Service:
        svc = self.service(vip)
        if svc is None:
            raise KeyError(f"no service for VIP {vip}")
        return svc

    def set_state(self, vip: IPAddress, ip: IPAddress, state: State, now: float,
                  cut: bool = True) -> Backend:
        """Change a backend's state. Going down with ``cut``, its clients move at once
        (their connections get reset by their new backend); without, they stay
        with it (it keeps serving existing clients, as if draining) until it
        comes back or they go idle."""
        svc = self._require(vip)
        if state is State.DOWN and not cut:
            state = State.DRAINING
        b = svc.pool.set_state(ip, state)
        if state is State.DOWN:
            svc.table.backend_down(b, now)
        return b

    def add_backend(self, vip: IPAddress, ip: IPAddress, weight: int = 1,
                    state: State = State.UP, index: int | None = None) -> Backend:
        """Add a backend; one already there (or still leaving) takes the weight and
        state given."""
        svc = self._require(vip)
        pool = svc.pool
        if ip in pool:
            b = pool.set_weight(ip, weight)
            svc.leaving.discard(b)
            return pool.set_state(ip, state)
        return pool.add(ip, weight, state, index)

    def remove_backend(self, vip: IPAddress, ip: IPAddress, now: float,
                       graceful: bool = False) -> Backend:
        """Take a backend out of the pool. ``graceful``: as IPVS does, it takes no new
        client but keeps the ones it has (drains) and leaves once the last of them
        has gone idle; else it leaves now and its clients move."""
        svc = self._require(vip)
        b = svc.pool.get(ip)
        if graceful and b is not None and b.clients > 0:
            svc.pool.set_state(ip, State.DRAINING)
            svc.leaving.add(b)
            return b
        b = svc.pool.remove(ip)
        svc.leaving.discard(b)
        svc.table.backend_down(b, now)
        return b

    def settle(self, now: float) -> list[Backend]:
        """Expire idle clients, then let go of leaving backends without clients."""
        gone: list[Backend] = []
        for svc in self.services:
            svc.table.expire(now)
            for b in [b for b in svc.leaving if b.clients == 0]:
                svc.leaving.discard(b)
                gone.append(svc.pool.remove(b.ip))
        return gone

    def set_weight(self, vip: IPAddress, ip: IPAddress, weight: int) -> Backend:
        return self._require(vip).pool.set_weight(ip, weight)

    def apply(self, command: PoolCommand, now: float) -> Backend:
        """Carry out one pool command (``loaded.core.commands``) as every worker does."""
        if isinstance(command, SetState):
            return self.set_state(command.vip, command.backend, command.state, now,
                                  cut=command.cut)
        if isinstance(command, AddBackend):
            return self.add_backend(command.vip, command.backend, command.weight,
                                    command.state, command.index)
        if isinstance(command, RemoveBackend):
            return self.remove_backend(command.vip, command.backend, now,
                                       graceful=command.graceful)
        return self.set_weight(command.vip, command.backend, command.weight)

    # --- the hot path -----------------------------------------------------------

    def handle(self, buf: Buf, now: float, partial: bool = False) -> Backend | None:
        """Decide and rewrite ``buf`` in place; see the module rules."""
        n = len(buf)
        # Fast path: the shapes nearly all traffic has. Anything unusual, or any
        # check that fails, falls through to the general path, which re-checks
        # and raises the precise error.
        if n >= 40 and not partial:
            b0 = buf[0]
            if b0 == 0x45:
                proto = buf[9]
                total = (buf[2] << 8) | buf[3]
                if (proto == TCP or proto == UDP) and total <= n and not (
                        buf[6] & 0x3F or buf[7]):
                    if proto == TCP:
                        co = 36
                        ok = total >= 40 and 20 <= (buf[32] >> 4) << 2 <= total - 20
                    else:
                        co = 26
                        ok = 8 <= ((buf[24] << 8) | buf[25]) <= total - 20
                    if ok:
                        src, dst = _ADDR4(buf, 12)
                        svc = self._vip4.get(dst)
                        if svc is not None:
                            b = svc.table.backend_for(src, now)
                            if b is None:
                                raise PacketError(Reason.NO_BACKEND, str(svc.vip))
                            buf[16:20] = b.addr
                            _fix4(buf, co, b.delta_in, proto)
                            b.packets += 1
                            b.bytes += n
                            return b
                        if dst[0] < 224 and (not self._nameservers
                                             or dst not in self._nameservers):
                            for svc in self._svc4:
                                b = svc.pool.by_addr(src)
                                if b is not None:
                                    buf[12:16] = svc.addr
                                    _fix4(buf, co, b.delta_out, proto)
                                    b.packets += 1
                                    b.bytes += n
                                    return b
            elif b0 >> 4 == 6:
                proto = buf[6]
                if (proto == TCP or proto == UDP) and 40 + ((buf[4] << 8) | buf[5]) <= n:
                    plen = (buf[4] << 8) | buf[5]
                    if proto == TCP:
                        co = 56
                        ok = plen >= 20 and 20 <= (buf[52] >> 4) << 2 <= plen
                    else:
                        co = 46
                        # plen first: a packet of 40..45 bytes has no UDP length field
                        ok = plen >= 8 and 8 <= ((buf[44] << 8) | buf[45]) <= plen
                    if ok:
                        src, dst = _ADDR6(buf, 8)
                        svc = self._vip6.get(dst)
                        if svc is not None:
                            b = svc.table.backend_for(src, now)
                            if b is None:
                                raise PacketError(Reason.NO_BACKEND, str(svc.vip))
                            buf[24:40] = b.addr
                            _fix6(buf, co, b.delta_in, proto)
                            b.packets += 1
                            b.bytes += n
                            return b
                        if dst[0] != 0xFF and (not self._nameservers
                                               or dst not in self._nameservers):
                            for svc in self._svc6:
                                b = svc.pool.by_addr(src)
                                if b is not None:
                                    buf[8:24] = svc.addr
                                    _fix6(buf, co, b.delta_out, proto)
                                    b.packets += 1
                                    b.bytes += n
                                    return b
        return self.handle_general(buf, now, partial)

    def steer(self, buf: Buf, now: float) -> Backend | None:
        """The per-packet path's common case, decided without a rewrite: a TCP or UDP
        packet to a VIP, not a fragment, with a sane header (the shapes ``handle``'s
        fast path takes). Returns its backend, chosen and counted exactly as
        ``handle`` would; the kernel then sets the destination from the backend's
        mark and fixes the checksums (any checksum state, a GSO packet's too), so
        the payload need not come back from user space. None: anything else,
        which ``handle`` must rewrite (ICMP, fragments, options or extension
        headers, the return path, garbage with its precise error)."""
        n = len(buf)
        if n < 28:  # IPv4 + UDP headers
            return None
        b0 = buf[0]
        if b0 == 0x45:
            proto = buf[9]
            if (proto != TCP and proto != UDP) or buf[6] & 0x3F or buf[7]:
                return None
            total = (buf[2] << 8) | buf[3]
            if total > n:
                return None
            if proto == TCP:
                if not (total >= 40 and 20 <= (buf[32] >> 4) << 2 <= total - 20):
                    return None
            elif not 8 <= ((buf[24] << 8) | buf[25]) <= total - 20:
                return None
            src, dst = _ADDR4(buf, 12)
            svc = self._vip4.get(dst)
            return None if svc is None else self._chosen(svc, src, n, now)
        if b0 >> 4 == 6 and n >= 48:
            proto = buf[6]
            if proto != TCP and proto != UDP:
                return None
            plen = (buf[4] << 8) | buf[5]
            if plen + 40 > n:
                return None
            if proto == TCP:
                if not (plen >= 20 and 20 <= (buf[52] >> 4) << 2 <= plen):
                    return None
            elif not 8 <= ((buf[44] << 8) | buf[45]) <= plen:
                return None
            src, dst = _ADDR6(buf, 8)
            svc = self._vip6.get(dst)
            return None if svc is None else self._chosen(svc, src, n, now)
        return None

    # --- the conntrack data path --------------------------------------------------

    def decide(self, buf: Buf, now: float) -> Backend | None:
        """The first packet of a connection (conntrack state NEW): the backend it goes
        to, by the same rules as ``handle`` for inbound packets, with nothing
        rewritten: kernel NAT does that, for this packet and the rest of the flow.
        None: not to a VIP, or neighbour discovery (pass unchanged).

        Replies, ICMP errors (RELATED) and later fragments never come here: conntrack
        carries them. An ICMP error that is NEW quotes no known connection.

        The shapes ``steer`` takes (plain TCP or UDP to a VIP: nearly every first
        packet) are decided there, without building a parsed packet: the same
        choice, a third of the cost.
        """
        b = self.steer(buf, now)
        if b is not None:
            return b
        p = parse(buf)
        svc = (self._vip4 if p.version == 4 else self._vip6).get(p.dst)
        if svc is None:
            return None
        kind = _inbound_kind(p)
        if kind is _ICMP_ERROR:
            raise PacketError(Reason.UNKNOWN_FLOW, "ICMP error about no known connection")
        if kind is _LOCAL:
            return None
        return self._chosen(svc, p.src, len(buf), now)

    @staticmethod
    def _chosen(svc: Service, client: bytes, size: int, now: float) -> Backend:
        b = svc.table.backend_for(client, now)
        if b is None:
            raise PacketError(Reason.NO_BACKEND, str(svc.vip))
        b.packets += 1
        b.bytes += size
        return b

    # --- the general path -------------------------------------------------------

    def handle_general(self, buf: Buf, now: float, partial: bool = False) -> Backend | None:
        """``handle`` without the fast path: every shape, every check."""
        p = parse(buf)
        vips = self._vip4 if p.version == 4 else self._vip6
        svc = vips.get(p.dst)
        if svc is not None:
            return self._inbound(buf, p, svc, now, partial)
        if p.dst[0] >= (224 if p.version == 4 else 0xFF):
            return None  # multicast and broadcast are never rewritten
        for svc in self._svc4 if p.version == 4 else self._svc6:
            b = svc.pool.by_addr(p.src)
            if b is not None or (svc.real_net is not None and _in_net(p.src, svc.real_net)):
                return self._outbound(buf, p, svc, b, partial)
        return None

    def _inbound(self, buf: Buf, p: Packet, svc: Service, now: float,
                 partial: bool) -> Backend | None:
        kind = _inbound_kind(p)
        if kind is _ICMP_ERROR:
            return self._inbound_icmp_error(buf, p, svc, now)
        if kind is _LOCAL:
            return None
        b = svc.table.backend_for(p.src, now)
        if b is None:
            raise PacketError(Reason.NO_BACKEND, str(svc.vip))
        rewrite(buf, p, p.dst_off, b.addr, b.delta_in, partial)
        b.packets += 1
        b.bytes += len(buf)
        return b

    def _inbound_icmp_error(self, buf: Buf, p: Packet, svc: Service,
                            now: float) -> Backend:
        q = _checked_error(buf, p)
        if q.src != svc.addr:
            raise PacketError(Reason.BAD_EMBEDDED, "quoted packet was not sent from the VIP")
        client = q.dst
        b = svc.table.peek(client)
        if b is None and svc.strategy.resteers:
            # A hashing strategy would pick the same backend again: the flow is known.
            b = svc.table.backend_for(client, now)
        if b is None or not b.serves_existing:
            raise PacketError(Reason.UNKNOWN_FLOW, "no backend serves the quoted client")
        rewrite(buf, p, p.dst_off, b.addr, b.delta_in)
        rewrite_embedded(buf, q, q.src_off, b.addr, b.delta_in)
        set_icmp_checksum(buf, p)
        b.packets += 1
        b.bytes += len(buf)
        return b

    def _outbound(self, buf: Buf, p: Packet, svc: Service, b: Backend | None,
                  partial: bool) -> Backend | None:
        """The return path; ``b`` None for a host of the real-server network that is
        not a backend (rewritten all the same, counted on ``svc.unlisted``)."""
        proto = p.proto
        if self._nameservers and p.dst in self._nameservers:
            return None  # the backends' own DNS is not balanced traffic
        if b is None:
            delta = address_delta(p.src, svc.addr)
            b = svc.unlisted
        else:
            delta = b.delta_out
        if proto == (ICMP if p.version == 4 else ICMPV6):
            if p.first and p.is_icmp_error:
                q = _checked_error(buf, p)
                inner = svc.pool.by_addr(q.dst)
                if inner is None:
                    raise PacketError(Reason.UNKNOWN_FLOW,
                                      "quoted packet was not sent to a backend")
                rewrite(buf, p, p.src_off, svc.addr, delta)
                rewrite_embedded(buf, q, q.dst_off, svc.addr, inner.delta_out)
                set_icmp_checksum(buf, p)
                return inner if b is svc.unlisted else b
            if proto == ICMPV6 and p.first and p.icmp_type in ICMP6_NDP:
                return None
        elif proto != TCP and proto != UDP:
            raise PacketError(Reason.UNSUPPORTED_PROTOCOL, f"protocol {proto}")
        rewrite(buf, p, p.src_off, svc.addr, delta, partial)
        b.packets += 1
        b.bytes += len(buf)
        return b


_BALANCE, _ICMP_ERROR, _LOCAL = "balance", "icmp-error", "local"


def _inbound_kind(p: Packet) -> str:
    """What a packet to a VIP is: traffic to balance (TCP, UDP, echo request, a
    later fragment), an ICMP error about a flow, or neighbour discovery for the
    balancer itself; anything else raises."""
    proto = p.proto
    # ICMPv6 carried by IPv4 (or ICMP by IPv6) is no ICMP of that family: it
    # falls to "unsupported protocol" like any other stranger.
    if proto == (ICMP if p.version == 4 else ICMPV6):
        if p.first:
            t = p.icmp_type
            if p.is_icmp_error:
                return _ICMP_ERROR
            if proto == ICMPV6 and t in ICMP6_NDP:
                return _LOCAL
            if t != (ICMP4_ECHO_REQUEST if proto == ICMP else ICMP6_ECHO_REQUEST):
                raise PacketError(Reason.UNSUPPORTED_ICMP, f"type {t}")
    elif proto != TCP and proto != UDP:
        raise PacketError(Reason.UNSUPPORTED_PROTOCOL, f"protocol {proto}")
    return _BALANCE


def _checked_error(buf: Buf, p: Packet) -> Packet:
    """The quoted packet of an ICMP error, once the error's own checksum is verified."""
    if p.fragmented:
        raise PacketError(Reason.BAD_EMBEDDED, "fragmented ICMP error")
    if not icmp_checksum_ok(buf, p):
        raise PacketError(Reason.BAD_ICMP_CHECKSUM)
    return parse_embedded(buf, p)


def _in_net(addr: bytes, net: IPNetwork) -> bool:
    value = int.from_bytes(addr, "big")
    return (value & int(net.netmask)) == int(net.network_address)


def _fix4(buf: Buf, co: int, d: int, proto: int) -> None:
    """Checksums after an IPv4 address change by ``d``: header, then TCP/UDP."""
    s = (~((buf[10] << 8) | buf[11]) & 0xFFFF) + d
    s = ~((s & 0xFFFF) + (s >> 16)) & 0xFFFF
    buf[10] = s >> 8
    buf[11] = s & 0xFF
    c = (buf[co] << 8) | buf[co + 1]
    if c == 0 and proto == UDP:
        return
    s = (~c & 0xFFFF) + d
    s = ~((s & 0xFFFF) + (s >> 16)) & 0xFFFF
    if s == 0 and proto == UDP:
        s = 0xFFFF
    buf[co] = s >> 8
    buf[co + 1] = s & 0xFF


def _fix6(buf: Buf, co: int, d: int, proto: int) -> None:
    """The TCP/UDP checksum after an IPv6 address change by ``d``."""
    c = (buf[co] << 8) | buf[co + 1]
    if c == 0 and proto == UDP:
        return
    s = (~c & 0xFFFF) + d
    s = ~((s & 0xFFFF) + (s >> 16)) & 0xFFFF
    if s == 0 and proto == UDP:
        s = 0xFFFF
    buf[co] = s >> 8
    buf[co + 1] = s & 0xFF


def backend_indexes(config: Config, families: Iterable[int]) -> dict[tuple[str, str], int]:
    """Every configured backend's index in its pool, (VIP, backend) -> index: config
    order from 0. The one numbering rule that the kernel set-up (the conntrack
    path's marks), the supervisor and every worker start from."""
    out: dict[tuple[str, str], int] = {}
    for family in families:
        fc = config.family(family)
        for i, spec in enumerate(fc.servers):
            out[(str(fc.vip), str(spec.ip))] = i
    return out


def table_share(client_table_max: int, workers: int) -> int:
    """Each worker's bound on a VIP's client table. The workers' tables are
    disjoint (every client hashes to one worker), so equal shares keep the VIP's
    total within ``client_table_max`` (2 at least: a table's two generations)."""
    return max(2, client_table_max // max(1, workers))


def build_engine(config: Config, now: float, families: Iterable[int] | None = None,
                 worker: int = 0,
                 indexes: Mapping[tuple[str, str], int] | None = None,
                 workers: int = 1) -> Engine:
    """An engine for ``config``: one service per VIP, each with a fresh client table.

    ``worker`` staggers cursor strategies so that workers do not all start alike;
    ``workers`` is how many there are, which share ``client_table_max``.
    ``indexes`` numbers the backends (``backend_indexes`` of the config the daemon
    started from: after a reload, the file's order is not the pools' order).
    """
    services = []
    for family in families if families is not None else config.families():
        fc = config.family(family)
        vip, specs, real_net = fc.vip, fc.servers, fc.rip
        if vip is None:
            raise ValueError(f"no IPv{family} VIP in {config.path}")
        pool = Pool(vip)
        for spec in specs:
            pool.add(spec.ip, spec.weight, spec.state,
                     None if indexes is None else indexes.get((str(vip), str(spec.ip))))
        strategy = make_strategy(config.strategy, pool, table_size=config.hash_table_size,
                                 hash_seed=config.hash_seed)
        strategy.stagger(worker)
        table = ClientTable(pool, strategy, idle_timeout=config.client_timeout,
                            max_size=table_share(config.client_table_max, workers),
                            now=now)
        services.append(Service(vip, pool, strategy, table, real_net))
    return Engine(services, config.nameservers)
