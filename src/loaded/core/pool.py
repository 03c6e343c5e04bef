"""Backends and the pool they live in.

A backend's ``state`` says which clients it takes:

==========  ============  ==================
state       new clients   existing clients
==========  ============  ==================
up          yes (weight)  yes
draining    no            yes
down        no            no (dropped or re-steered)
==========  ============  ==================

A weight of 0 on an ``up`` backend behaves like draining for new clients.

Every change that can alter a strategy's decision (members, states, weights, a
bulk change of client counts) bumps ``Pool.version``; strategies compare it with
the version they were built for and rebuild lazily, so a change costs nothing on
the packet path until the next new client.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterator

from loaded.core.checksum import address_delta

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# The conntrack data path tells the kernel which backend a new connection goes to
# by the packet mark: "LB" in the high half, the family in bit 15 (one conntrack
# table serves both families), the backend's index below.
CT_MARK_BASE = 0x4C420000
CT_MARK_V6 = 0x8000
CT_FAMILY_MASK = 0xFFFF8000  # what a backend's marks of one family share
MAX_INDEX = 0x7FFF


def ct_mark(version: int, index: int) -> int:
    return CT_MARK_BASE | (CT_MARK_V6 if version == 6 else 0) | index


def ct_mark_version(mark: int) -> int:
    """The address family of the backend a mark names."""
    return 6 if mark & CT_MARK_V6 else 4

MAX_WEIGHT = 65535


class State(enum.StrEnum):
    UP = "up"
    DRAINING = "draining"
    DOWN = "down"


class Backend:
    """A real server behind one VIP, with the per-VIP numbers the data path needs."""

    __slots__ = (
        "accepts_new",
        "addr",
        "bytes",
        "clients",
        "delta_in",
        "delta_out",
        "index",
        "ip",
        "mark",
        "new_clients",
        "packets",
        "serves_existing",
        "state",
        "weight",
    )

    def __init__(self, ip: IPAddress, vip: IPAddress, weight: int = 1,
                 state: State = State.UP, index: int = 0) -> None:
        if ip.version != vip.version:
            raise ValueError(f"backend {ip} and VIP {vip} are of different families")
        if not 0 <= weight <= MAX_WEIGHT:
            raise ValueError(f"weight {weight} out of range 0..{MAX_WEIGHT}")
        self.ip = ip
        self.addr: bytes = ip.packed
        # Checksum deltas for rewriting VIP -> backend and back: they depend only on
        # the pair of addresses, so they are computed once here, never per packet.
        self.delta_in = address_delta(vip.packed, self.addr)
        self.delta_out = address_delta(self.addr, vip.packed)
        self.weight = weight
        if not 0 <= index <= MAX_INDEX:
            raise ValueError(f"backend index {index} out of range 0..{MAX_INDEX}")
        self.index = index  # stable position in the pool, for tables and hashing
        self.mark = ct_mark(ip.version, index)
        self.new_clients = 0  # clients the strategy gave to this backend
        self.clients = 0  # entries in the client table pointing here
        self.packets = 0
        self.bytes = 0
        self.state = state
        self.accepts_new = False
        self.serves_existing = False
        self._refresh()

    def _refresh(self) -> None:
        self.accepts_new = self.state is State.UP and self.weight > 0
        self.serves_existing = self.state is not State.DOWN

    def __repr__(self) -> str:
        return f"Backend({self.ip}, weight={self.weight}, state={self.state.value})"


class Pool:
    """The backends of one VIP."""

    def __init__(self, vip: IPAddress) -> None:
        self.vip = vip
        self.version = 0
        self._by_addr: dict[bytes, Backend] = {}
        self._next_index = 0

    def __iter__(self) -> Iterator[Backend]:
        return iter(self._by_addr.values())

    def __len__(self) -> int:
        return len(self._by_addr)

    def __contains__(self, ip: object) -> bool:
        return isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address) and (
            ip.packed in self._by_addr)

    @property
    def backends(self) -> list[Backend]:
        return list(self._by_addr.values())

    def get(self, ip: IPAddress) -> Backend | None:
        return self._by_addr.get(ip.packed)

    def by_addr(self, addr: bytes) -> Backend | None:
        return self._by_addr.get(addr)

    def add(self, ip: IPAddress, weight: int = 1, state: State = State.UP,
            index: int | None = None) -> Backend:
        """Add a backend; ``index`` given by whoever keeps several pools alike (the
        supervisor, for its workers), else the next free one."""
        if ip.packed in self._by_addr:
            raise ValueError(f"backend {ip} is already in the pool of {self.vip}")
        if ip == self.vip:
            raise ValueError(f"backend {ip} is the VIP itself")
        if index is None:
            index = self._next_index
        elif any(b.index == index for b in self._by_addr.values()):
            raise ValueError(f"backend index {index} is taken in the pool of {self.vip}")
        b = Backend(ip, self.vip, weight, state, index)
        self._next_index = max(self._next_index, index + 1)
        self._by_addr[b.addr] = b
        self.changed()
        return b

    def remove(self, ip: IPAddress) -> Backend:
        b = self._by_addr.pop(ip.packed, None)
        if b is None:
            raise KeyError(f"backend {ip} is not in the pool of {self.vip}")
        # A removed backend must never be used again by stale references.
        b.state = State.DOWN
        b._refresh()
        self.changed()
        return b

    def set_state(self, ip: IPAddress, state: State) -> Backend:
        b = self._require(ip)
        if b.state is not state:
            b.state = state
            b._refresh()
            self.changed()
        return b

    def set_weight(self, ip: IPAddress, weight: int) -> Backend:
        if not 0 <= weight <= MAX_WEIGHT:
            raise ValueError(f"weight {weight} out of range 0..{MAX_WEIGHT}")
        b = self._require(ip)
        if b.weight != weight:
            b.weight = weight
            b._refresh()
            self.changed()
        return b

    def eligible(self) -> list[Backend]:
        """Backends that take new clients, in pool order."""
        return [b for b in self._by_addr.values() if b.accepts_new]

    def changed(self) -> None:
        self.version += 1

    def _require(self, ip: IPAddress) -> Backend:
        b = self._by_addr.get(ip.packed)
        if b is None:
            raise KeyError(f"backend {ip} is not in the pool of {self.vip}")
        return b
