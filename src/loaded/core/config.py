"""The configuration file: its format, every key, and how it is checked.

Format
======

One file is both a shell script, run once as root to set up addresses, routes,
iptables rules and sysctls, and the daemon's configuration (as with the
original ``loaded.config``). The daemon reads a line only when, after leading
blanks, it starts with ``key=`` for a key in the table below; every other line
(``iptables -F``, ``ip addr add $VIP4/$VIP4net dev $public_NIC``, ``if``/``fi``,
``echo 1 > /proc/...``) is shell for the set-up run and is ignored silently.

Rules, chosen so that the shell and the daemon read the same values:

- No blanks around ``=`` (the shell would run ``VIP4 = x`` as a command named
  ``VIP4``); a known key written that way is an error.
- Values may be quoted as in ``sh``: ``"..."`` or ``'...'``; a backslash
  escapes one character. Words are split at blanks only; ``#`` starts a
  comment only at the start of a word (``eth#0`` is one word, as in ``sh``).
- The daemon cannot evaluate shell, so a value holding an expansion (``$X``,
  ``${X}``, backquotes, unquoted or in double quotes) is an error, and so are
  unquoted operators (``;``, ``&``, ``|``, ``<``, ``>``, ``(``, ``)``) and a
  trailing ``\\`` (a line continuation) on a daemon line.
- Options of a key are further ``name=value`` words on the same line; the
  shell takes them for more assignments, so the file stays a valid script:
  ``server4=198.19.0.1 weight=3 state=drain``. Any other word is an error.
- A line holding just ``failover`` turns failover on (the original's form).
- A line that looks like an assignment to a key not listed here
  (``FOO=bar``) gives a warning and is otherwise ignored, so that a mistyped
  key (``Server4=...``) is noticed; ``export VIP4=...`` and the like give a
  warning too, since the daemon does not read them.
- A key read once may be given once: a second ``VIP4=`` line is an error.
  The shell keeps the *last* value of a repeated key, so a file that repeats
  ``NS`` or ``private_GW`` (one per family) must run the commands that use
  the first value before the second assignment.
- Lines are numbered from 1; a trailing carriage return is dropped (with a
  warning, since the shell part of such a file will not run).

Every problem found is collected; if at least one is an error, ``ConfigError``
carries them all (warnings included), each naming file, line and the bad value.

Keys
====

Every key is one row of ``KEY_TABLE`` (further down, with its rules): the
``Config`` fields it sets, how its value is read and checked, whether it may
be repeated, what a reload does when it changes, and its documentation, from
which the tables here are made when the module is imported.

Read by the original daemon:

<keys: original>

Used by the original only in its shell part; now checked as well:

<keys: shell>

New in this implementation:

<keys: new>

Health checks and failover
==========================

``failover`` turns checking on; the keys below then say how. Without it they
have no effect (a warning says so) and every backend keeps its configured
state. With it, every backend is probed every ``check_interval`` seconds, all
of them at once, and every ``check_cycle`` seconds hosts are discovered by an
ICMP echo to ``broadcast`` (IPv4) and to all-nodes ``ff02::1`` on
``private_NIC`` (IPv6). The meaning of the rise/fall counts is HAProxy's: a
backend that is down needs ``rise`` successes in a row to come up, one that is
up needs ``fall`` failures in a row to go down. Configured backends start up;
hosts found by discovery start down.

<keys: health>

Checks across lines
===================

Errors: no VIP at all; a VIP without any backend of its family; a backend
without the VIP of its family; a backend listed twice; a backend equal to the
VIP; ``private_GW`` equal to a VIP or a backend; FIRST_CORE > LAST_CORE.
VIPs and backends must be unicast: not unspecified, loopback, multicast,
IPv4 limited broadcast, or (IPv6) IPv4-mapped. Warnings: a backend,
``private_GW`` or ``broadcast`` outside RIP4/RIP6 when that is given;
``VIP4net``/``VIP6net`` without the VIP; a nameserver listed twice.

Health checks: ``check_timeout`` above ``check_interval`` is an error, and so
is ``hotplug=yes`` (with failover) with ``check=none``, without the RIP
network of a family that has a VIP, or, for IPv6, without ``private_NIC``.
Health keys, or a ``check=`` option on a server line, without failover give
one warning.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import posixpath
import re
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from loaded.core.datapath import DATAPATHS as _DATAPATH_OBJECTS
from loaded.core.errors import ConfigError, Problem
from loaded.core.pool import MAX_WEIGHT, IPAddress, State
from loaded.core.strategies import DEFAULT_HASH_SEED, HASH_STRATEGIES, is_prime
from loaded.core.strategies import STRATEGIES as _STRATEGY_CLASSES

__all__ = [
    "CHECKS",
    "DATAPATHS",
    "KEYS",
    "KEY_TABLE",
    "NO_BACKEND",
    "ON_BACKEND_DOWN",
    "STRATEGIES",
    "BackendSpec",
    "Config",
    "Field",
    "Key",
    "Reload",
    "load_config",
    "parse_config",
]

STRATEGIES: frozenset[str] = frozenset(_STRATEGY_CLASSES)
DATAPATHS: frozenset[str] = frozenset(_DATAPATH_OBJECTS)
# The names the original looks for in the current directory without -c.
DEFAULT_CONFIGS = ("loaded.conf", "loaded.config")
CHECKS: frozenset[str] = frozenset({"icmp", "tcp", "http", "https", "udp", "none"})
ON_BACKEND_DOWN: frozenset[str] = frozenset({"cut", "keep"})
NO_BACKEND: frozenset[str] = frozenset({"refuse", "drop"})

# Maglev needs a prime table size so that every backend's permutation visits
# every slot; the bounds keep the table from being uselessly small or huge.
MAGLEV_MIN_TABLE = 7
MAGLEV_MAX_TABLE = 1_000_003
MAGLEV_DEFAULT_TABLE = 65537
# NFQUEUE numbers are 16 bits, and FIRST_CORE..LAST_CORE name queues.
MAX_QUEUE = 65535
MAX_NFQ_LEN = 1_048_576
MAX_CHECK_CYCLE = 86400.0
MAX_CLIENT_TIMEOUT = 604800.0
MAX_CLIENT_TABLE = 100_000_000
MAX_CHECK_INTERVAL = 3600.0
MAX_RISE_FALL = 100
MAX_HTTP_PATH = 1024
# A probe that fits one datagram on any link: fragments are often filtered.
MAX_UDP_PAYLOAD = 1024
DEFAULT_CHECK_TIMEOUT = 1.0
IFNAMSIZ = 16  # Linux: 15 bytes and the terminating NUL


@dataclass(frozen=True)
class BackendSpec:
    """One ``server4``/``server6`` line. ``check`` None: the global ``check``."""

    ip: IPv4Address | IPv6Address
    weight: int = 1
    state: State = State.UP
    line: int = 0
    check: str | None = None


@dataclass(frozen=True)
class FamilyConfig:
    """The keys that come once per address family, for one family: what code that
    serves "the VIP of family f" reads, instead of choosing ``vip4`` or ``vip6``."""

    family: int
    vip: IPv4Address | IPv6Address | None
    vip_prefix: int | None
    servers: tuple[BackendSpec, ...]
    rip: IPv4Network | IPv6Network | None
    private_gw: IPv4Address | IPv6Address | None

    @property
    def full_prefix(self) -> int:
        """A host's prefix length in this family."""
        return 32 if self.family == 4 else 128


@dataclass(frozen=True)
class Config:
    """A checked configuration. ``warnings`` holds what was found but tolerated."""

    path: str
    vip4: IPv4Address | None = None
    vip4_prefix: int | None = None
    vip6: IPv6Address | None = None
    vip6_prefix: int | None = None
    servers4: tuple[BackendSpec, ...] = ()
    servers6: tuple[BackendSpec, ...] = ()
    strategy: str = "rr"
    hash_table_size: int = MAGLEV_DEFAULT_TABLE
    broadcast: IPv4Address | None = None
    port_alive: int = 80
    check_cycle: float = 30.0
    nfq_len: int | None = None  # None: the data path's (``Plan.queue_length``)
    failover: bool = False
    nameservers: tuple[IPv4Address | IPv6Address, ...] = ()
    first_core: int = 0
    last_core: int = 0
    rip4: IPv4Network | None = None
    rip6: IPv6Network | None = None
    public_nic: str | None = None
    private_nic: str | None = None
    private_gw4: IPv4Address | None = None
    private_gw6: IPv6Address | None = None
    client_timeout: float = 300.0
    client_table_max: int = 1_000_000
    datapath: str = "conntrack"
    fail_open: str = "hash"  # no | yes | hash
    hash_seed: int = DEFAULT_HASH_SEED
    gso: bool = True
    control_socket: str | None = None
    control_group: str | None = None
    status_listen: tuple[str, int] | None = ("127.0.0.1", 9180)
    persist_clients: bool = True
    persist_max_age: float = 600.0
    persist_file: str | None = None
    check: str = "tcp"
    check_port: int = 80
    check_interval: float = 2.0
    check_timeout: float = DEFAULT_CHECK_TIMEOUT
    rise: int = 2
    fall: int = 3
    http_path: str = "/"
    http_status: int = 200
    udp_payload: bytes = b""
    hotplug: bool = False
    on_backend_down: str = "cut"
    no_backend: str = "refuse"
    warnings: tuple[Problem, ...] = ()
    key_lines: tuple[tuple[str, int], ...] = ()  # (key, line it was set on), once-only keys

    def line_of(self, key: str) -> int:
        """The line that set ``key``; 0 when the default applies."""
        return next((no for k, no in self.key_lines if k == key), 0)

    def family(self, family: int) -> FamilyConfig:
        """The per-family keys of ``family`` (4 or 6)."""
        if family == 4:
            return FamilyConfig(4, self.vip4, self.vip4_prefix, self.servers4, self.rip4,
                                self.private_gw4)
        if family == 6:
            return FamilyConfig(6, self.vip6, self.vip6_prefix, self.servers6, self.rip6,
                                self.private_gw6)
        raise ValueError(f"family must be 4 or 6, not {family!r}")

    def families(self) -> tuple[int, ...]:
        """The address families that have a VIP: (4,), (6,) or (4, 6)."""
        return tuple(f for f, vip in ((4, self.vip4), (6, self.vip6)) if vip is not None)

    def restrict(self, family: int) -> Config:
        """A copy for one address family (``-4`` / ``-6``).

        The other family's VIP, prefix, backends, RIP network and private
        gateway are dropped, nameservers are kept only of this family, and for
        6 the (IPv4-only) ``broadcast`` too. A family without a VIP raises
        ``ConfigError``.
        """
        if family not in (4, 6):
            raise ValueError(f"family must be 4 or 6, not {family!r}")
        if family not in self.families():
            raise ConfigError([Problem(
                self.path, 0, f"-{family}: the configuration has no VIP{family}")])
        nameservers = tuple(ns for ns in self.nameservers if ns.version == family)
        if family == 4:
            return dataclasses.replace(
                self, vip6=None, vip6_prefix=None, servers6=(), rip6=None,
                private_gw6=None, nameservers=nameservers)
        return dataclasses.replace(
            self, vip4=None, vip4_prefix=None, servers4=(), rip4=None,
            private_gw4=None, broadcast=None, nameservers=nameservers)


# --------------------------------------------------------------------------
# Words of a line, split as sh splits them


class _Bad(Exception):
    """A value or line that cannot be used; its text becomes a Problem message."""


class _Expansion(_Bad):
    """sh would expand something in a word; ``word`` is its raw text."""

    def __init__(self, word: str) -> None:
        super().__init__(word)
        self.word = word


_BLANKS = " \t"
_OPERATORS = frozenset(";&|<>()")
_DQUOTE_ESCAPES = frozenset('$`"\\')


def _words(line: str) -> list[str]:
    """Split ``line`` into words with sh's quoting rules, up to a comment.

    Not ``shlex``: it ends a word at a ``#`` in its middle, where sh does not,
    so ``public_NIC=eth#0`` would silently become ``eth``. A ``$`` or backquote
    outside single quotes raises ``_Expansion`` at once: what follows it (a
    command substitution, say) need not be split as plain words are.
    """
    words: list[str] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in _BLANKS:
            i += 1
        if i >= n or line[i] == "#":
            return words
        start = i
        buf: list[str] = []
        while i < n and line[i] not in _BLANKS:
            c = line[i]
            if c == "\\":
                if i + 1 >= n:
                    raise _Bad("a '\\' at the end of a line continues it in sh, "
                               "which loaded does not support")
                buf.append(line[i + 1])
                i += 2
            elif c == "'":
                end = line.find("'", i + 1)
                if end < 0:
                    raise _Bad("unterminated ' quote")
                buf.append(line[i + 1:end])
                i = end + 1
            elif c == '"':
                i += 1
                while True:
                    if i >= n:
                        raise _Bad('unterminated " quote')
                    c = line[i]
                    if c == '"':
                        i += 1
                        break
                    if c == "\\" and i + 1 < n and line[i + 1] in _DQUOTE_ESCAPES:
                        buf.append(line[i + 1])
                        i += 2
                        continue
                    if c in "$`":
                        raise _Expansion(_raw_word(line, start))
                    buf.append(c)
                    i += 1
            elif c in "$`":
                raise _Expansion(_raw_word(line, start))
            elif c in _OPERATORS:
                raise _Bad(f"shell operator {c!r} is not allowed on a line loaded reads")
            else:
                buf.append(c)
                i += 1
        words.append("".join(buf))


def _raw_word(line: str, start: int) -> str:
    end = start
    while end < len(line) and line[end] not in _BLANKS:
        end += 1
    return line[start:end]


# --------------------------------------------------------------------------
# Values


_DIGITS = re.compile(r"[0-9]+")
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ASSIGN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
_SPACED_ASSIGN = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)[ \t]+=")
_DECLARED = re.compile(r"(export|readonly|local|declare|typeset)[ \t]+"
                       r"(?:-[A-Za-z]+[ \t]+)*([A-Za-z_][A-Za-z0-9_]*)=")
_FAILOVER_WORD = re.compile(r"failover(?:[ \t#]|\Z)")

_TRUE = frozenset({"yes", "1", "true", "on"})
_FALSE = frozenset({"no", "0", "false", "off"})
_STATES = {"up": State.UP, "down": State.DOWN, "drain": State.DRAINING,
           "draining": State.DRAINING}


def _q(value: str) -> str:
    """``value`` quoted for a message, cut short if it is long."""
    return repr(value) if len(value) <= 60 else repr(value[:57]) + "..."


def _int(value: str, lo: int, hi: int) -> int:
    if not _DIGITS.fullmatch(value):
        raise _Bad(f"{_q(value)} is not a whole number")
    digits = value.lstrip("0") or "0"
    # int() refuses strings over a few thousand digits; anything this long is
    # out of range anyway.
    n = int(digits) if len(digits) <= 20 else hi + 1
    if not lo <= n <= hi:
        raise _Bad(f"{_q(value)} is out of range {lo}..{hi}")
    return n


def _seconds(value: str, lo: float, hi: float, lo_inclusive: bool = True) -> float:
    if len(value) > 40 or not _DECIMAL.fullmatch(value):
        raise _Bad(f"{_q(value)} is not a number of seconds")
    s = float(value)
    low_ok = s >= lo if lo_inclusive else s > lo
    if not (low_ok and s <= hi and math.isfinite(s)):
        low = f"{lo:g} <= s" if lo_inclusive else f"{lo:g} < s"
        raise _Bad(f"{_q(value)} is out of range {low} <= {hi:g}")
    return s


FAIL_OPEN = ("hash", "no", "yes")
_HEX = re.compile(r"0[xX][0-9a-fA-F]{1,8}")


def _seed(value: str) -> int:
    """A 32-bit number, decimal or ``0x`` hex."""
    if _HEX.fullmatch(value):
        return int(value, 16)
    if value[:2] in ("0x", "0X"):
        raise _Bad(f"{_q(value)} is not a 32-bit hex number")
    return _int(value, 0, 0xFFFFFFFF)


def _fail_open(value: str) -> str:
    v = value.lower()
    if v == "hash":
        return v
    try:
        return "yes" if _bool(value) else "no"
    except _Bad:
        raise _Bad(f"{_q(value)} is not hash, yes or no") from None


def _bool(value: str) -> bool:
    v = value.lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise _Bad(f"{_q(value)} is not yes or no (also accepted: 1/0, true/false, on/off)")


# Kernel interfaces, not places for files: writing "a table" into /proc/self/mem
# or renaming over a device node is never what the operator meant.
_KERNEL_TREES = ("/proc", "/sys", "/dev")


def _abspath(value: str) -> str:
    if not value.startswith("/") or "\0" in value or len(value) > 4096:
        raise _Bad(f"{_q(value)} is not an absolute path")
    # POSIX keeps a leading "//" apart from "/"; Linux does not.
    norm = "/" + posixpath.normpath(value).lstrip("/")
    if norm == "/" or value.endswith("/"):
        raise _Bad(f"{_q(value)} names a directory, not a file")
    for tree in _KERNEL_TREES:
        if norm == tree or norm.startswith(tree + "/"):
            raise _Bad(f"{_q(value)} is under {tree}, a kernel interface: not a place "
                       f"for loaded's files")
    return norm


def _listen(value: str) -> tuple[str, int] | None:
    """``host:port`` (IPv6 in brackets), or ``off``."""
    if value.lower() in _FALSE or value.lower() == "off":
        return None
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:([0-9]{1,5})|([0-9.]+):([0-9]{1,5})", value)
    if m is None:
        raise _Bad(f"{_q(value)} is not host:port (IPv6 as [addr]:port) or off")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise _Bad(f"{_q(host)} is not an IP address") from None
    if not 0 <= port <= 65535:
        raise _Bad(f"port {port} is out of range 0..65535")
    return host, port


def _choice(value: str, choices: frozenset[str], what: str) -> str:
    if value not in choices:
        raise _Bad(f"{_q(value)} is not a {what} (known: {', '.join(sorted(choices))})")
    return value


def _address(value: str, family: int | None) -> IPAddress:
    """An address of ``family`` (4, 6, or None for either)."""
    want = {4: "IPv4 address", 6: "IPv6 address", None: "IP address"}[family]
    if "%" in value:
        raise _Bad(f"{_q(value)}: a zone index ('%...') is not allowed")
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise _Bad(f"{_q(value)} is not a valid {want}") from None
    if family is not None and ip.version != family:
        raise _Bad(f"{_q(value)} is an IPv{ip.version} address, not IPv{family}")
    return ip


def _check_unicast(value: str, ip: IPAddress, allow_loopback: bool = False) -> None:
    if ip.is_unspecified:
        raise _Bad(f"{_q(value)} is the unspecified address")
    if ip.is_multicast:
        raise _Bad(f"{_q(value)} is a multicast address")
    if ip.is_loopback and not allow_loopback:
        raise _Bad(f"{_q(value)} is a loopback address")
    if isinstance(ip, IPv4Address) and ip == IPv4Address("255.255.255.255"):
        raise _Bad(f"{_q(value)} is the limited broadcast address")
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        raise _Bad(f"{_q(value)} is an IPv4-mapped address; use the IPv4 form and key")


def _network(value: str, family: int) -> IPv4Network | IPv6Network:
    if "%" in value:
        raise _Bad(f"{_q(value)}: a zone index ('%...') is not allowed")
    try:
        net = ipaddress.ip_network(value)
    except ValueError:
        try:
            loose = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise _Bad(f"{_q(value)} is not a valid IPv{family} network "
                       f"(address/prefix)") from None
        if loose.version != family:
            raise _Bad(f"{_q(value)} is an IPv{loose.version} network, not IPv{family}") from None
        raise _Bad(f"{_q(value)} has host bits set (the network is {loose})") from None
    if net.version != family:
        raise _Bad(f"{_q(value)} is an IPv{net.version} network, not IPv{family}")
    return net


def _ifname(value: str) -> str:
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise _Bad(f"{_q(value)} is not valid text") from None
    if size >= IFNAMSIZ:
        raise _Bad(f"{_q(value)} is too long for an interface name (at most "
                   f"{IFNAMSIZ - 1} bytes)")
    if value in (".", ".."):
        raise _Bad(f"{_q(value)} is not a valid interface name")
    for c in value:
        if c in "/:\0" or c.isspace():
            raise _Bad(f"{_q(value)} is not a valid interface name ({c!r} is not allowed)")
    return value


# --------------------------------------------------------------------------
# Readers of the values the table's rows name: text -> value, or _Bad


@dataclass(frozen=True)
class _Int:
    """A whole number in ``lo..hi``."""

    lo: int
    hi: int

    def __call__(self, value: str) -> int:
        return _int(value, self.lo, self.hi)

    def __str__(self) -> str:
        return f"{self.lo}..{self.hi}"


@dataclass(frozen=True)
class _Seconds:
    """A number of seconds from ``lo`` (included or not) to ``hi``."""

    lo: float
    hi: float
    lo_inclusive: bool = True

    def __call__(self, value: str) -> float:
        return _seconds(value, self.lo, self.hi, self.lo_inclusive)

    def __str__(self) -> str:
        if self.lo_inclusive:
            return f"{self.lo:g}..{self.hi:g}"
        return f"{self.lo:g} < s <= {self.hi:g}"


@dataclass(frozen=True)
class _Choice:
    """One of ``choices``; ``what`` names them in the message."""

    choices: frozenset[str]
    what: str

    def __call__(self, value: str) -> str:
        return _choice(value, self.choices, self.what)

    def __str__(self) -> str:
        return "|".join(sorted(self.choices))


def _unicast(family: int) -> Callable[[str], IPAddress]:
    """A VIP: a unicast address of ``family``."""

    def read(value: str) -> IPAddress:
        ip = _address(value, family)
        _check_unicast(value, ip)
        return ip

    return read


def _broadcast(value: str) -> IPv4Address:
    ip = _address(value, 4)
    if ip.is_unspecified or ip.is_loopback or ip.is_multicast:
        raise _Bad(f"{_q(value)} cannot be a broadcast address")
    assert isinstance(ip, IPv4Address)
    return ip


def _group(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?|[0-9]{1,10}", value):
        raise _Bad(f"{_q(value)} is not a group name or number")
    return value


def _http_path(path: str) -> str:
    if not path.startswith("/"):
        raise _Bad(f"{_q(path)} does not start with '/'")
    # The path goes into the request line as it is: a blank or a control
    # character would end it or smuggle a header in.
    if not all("!" <= c <= "~" for c in path):
        raise _Bad(f"{_q(path)} holds a blank, a control or a non-ASCII character "
                   f"(write it percent-encoded)")
    if len(path) > MAX_HTTP_PATH:
        raise _Bad(f"{_q(path)} is longer than {MAX_HTTP_PATH} bytes")
    return path


def _udp_payload(value: str) -> bytes:
    if value.startswith("hex:"):
        digits = value[4:]
        if not digits or len(digits) % 2 or not re.fullmatch(r"[0-9A-Fa-f]+", digits):
            raise _Bad(f"{_q(value)}: after 'hex:' an even number of hex digits, "
                       f"at least two")
        payload = bytes.fromhex(digits)
    else:
        payload = value.encode("utf-8", "surrogateescape")
    if len(payload) > MAX_UDP_PAYLOAD:
        raise _Bad(f"{_q(value)} is longer than {MAX_UDP_PAYLOAD} bytes")
    return payload


# --------------------------------------------------------------------------
# The keys: one table
#
# Rules of the table:
#
# - One row per key, in the order of the docstring's tables (its ``group``
#   says which) and of a reload's list of changed settings.
# - ``field``: the ``Config`` field the key sets (``family`` says whether it
#   concerns one address family), or a tuple of ``Field`` when it sets more
#   than one. Its default is ``Config``'s, the only place defaults are written;
#   the parser starts from it.
# - ``value`` reads and checks the text after ``key=`` (raising ``_Bad``, whose
#   text follows ``key: `` in the message); such a key takes no options. None:
#   the key needs more than a row can say (options, once per family,
#   duplicates, backend lists) and ``_Parser.handlers`` names its handler.
# - ``repeat``: ONCE, a second line is an error; MANY, the key may repeat
#   (its handler decides what a repetition means).
# - ``reload``: whether a running daemon follows a change (``live``) or the
#   change needs a restart, and why (``loaded.core.reload.SETTINGS`` is made
#   from it); the backend lists are reloaded by pool commands instead.
# - ``doc``: the text of the docstring's table. Its range and choices must be
#   those of ``value``, and its default ``Config``'s (a test checks).
#
# Cross-line checks (``_Parser.cross_check``) and the bare ``failover`` word
# (``_Parser._other``) are not rows: they are written out in the parser.
# Adding a key: a row, a ``Config`` field with its default, and its use.


@dataclass(frozen=True)
class Field:
    """A ``Config`` field that a key sets."""

    name: str
    family: int = 0  # 4 or 6: the field concerns that address family only
    spelled: str = ""  # the option that sets it, when not the key itself


@dataclass(frozen=True)
class Reload:
    """What a running daemon does when the key changes (see ``loaded.core.reload``)."""

    live: bool  # it follows the new value; else the change waits for a restart
    reason: str
    backends: bool = False  # a backend list: pool commands, not a setting


_VIP_SETUP = Reload(False, "the VIP is set up at start (address, firewall rules, client tables)")
_KERNEL_SETUP = Reload(False, "the kernel set-up (addresses, routes, firewall rules) is made "
                              "at start")
_QUEUE_SETUP = Reload(False, "the queues and their workers are set up at start")
_HEALTH_SETUP = Reload(False, "health checks and discovery are set up at start")
_TABLE_SETUP = Reload(False, "every worker builds its strategy and client tables at start")
_PATH_SETUP = Reload(False, "the data path (queues, firewall rules, NAT) is chosen at start")
_WORKER_SETUP = Reload(False, "the workers read it at start")
_SOCKET_SETUP = Reload(False, "the control socket is opened at start")
_STATUS_SETUP = Reload(False, "the status server is started at start")
_NEXT_START = Reload(True, "applies at the next stop and start")
_FROM_NOW = Reload(True, "applies to backends that go down from now on")
_POOLS = Reload(True, "the running pools follow the file by pool commands", backends=True)

# Key.group: which of the docstring's tables lists the key.
_ORIGINAL, _SHELL, _NEW, _HEALTH = "original", "shell", "new", "health"
# Key.repeat
ONCE, MANY = False, True


@dataclass(frozen=True)
class Key:
    """One row of ``KEY_TABLE``: a key of the file and all that follows from it."""

    name: str  # as the file spells it
    field: str | tuple[Field, ...]  # the Config field(s) it sets
    value: Callable[[str], object] | None  # None: a handler in _Parser.handlers
    repeat: bool  # ONCE or MANY
    reload: Reload
    group: str  # the docstring table that lists it
    doc: str
    family: int = 0  # of ``field``, when that is one name

    @property
    def fields(self) -> tuple[Field, ...]:
        if isinstance(self.field, str):
            return (Field(self.field, self.family),)
        return self.field

    @property
    def defaults(self) -> dict[str, object]:
        """Each field's default, which is ``Config``'s."""
        return {f.name: _CONFIG_DEFAULTS[f.name] for f in self.fields}


_CONFIG_DEFAULTS: dict[str, object] = {
    f.name: f.default for f in dataclasses.fields(Config)
    if f.default is not dataclasses.MISSING}

KEY_TABLE: tuple[Key, ...] = (
    # Key(name, field, value, repeat, reload, group, doc, family=0)
    Key("VIP4", "vip4", _unicast(4), ONCE, _VIP_SETUP, _ORIGINAL,
        "the IPv4 virtual address clients connect to", family=4),
    Key("VIP4net", "vip4_prefix", _Int(0, 32), ONCE, _KERNEL_SETUP, _SHELL,
        "prefix length of VIP4 on the public side, 0..32", family=4),
    Key("VIP6", "vip6", _unicast(6), ONCE, _VIP_SETUP, _ORIGINAL,
        "the IPv6 virtual address", family=6),
    Key("VIP6net", "vip6_prefix", _Int(0, 128), ONCE, _KERNEL_SETUP, _SHELL,
        "prefix length of VIP6, 0..128", family=6),
    Key("server4", "servers4", None, MANY, _POOLS, _ORIGINAL,
        f"an IPv4 backend; repeat the line for each one. Options: "
        f"``weight=0..{MAX_WEIGHT}`` (default 1; 0 takes no new clients), "
        f"``state=up|down|drain|draining`` (default up), "
        f"``check=icmp|tcp|http|https|udp|none`` (this backend's health check, "
        f"default the global ``check``)", family=4),
    Key("server6", "servers6", None, MANY, _POOLS, _ORIGINAL,
        "an IPv6 backend; same options", family=6),
    Key("strategy", (Field("strategy"), Field("hash_table_size", spelled="table_size")),
        None, ONCE, _TABLE_SETUP, _ORIGINAL,
        f"``rr`` (default), ``weighted``, ``wrr``, ``lc``, ``sh``, ``maglev``. Option, "
        f"sh and maglev only: ``table_size``, the buckets of the hash table (the "
        f"kernel's too), a prime in {MAGLEV_MIN_TABLE}..{MAGLEV_MAX_TABLE} "
        f"(default {MAGLEV_DEFAULT_TABLE})"),
    Key("broadcast", "broadcast", _broadcast, ONCE, _HEALTH_SETUP, _ORIGINAL,
        "IPv4 address failover pings to discover hosts (default: the broadcast "
        "address of RIP4, when that is given)", family=4),
    Key("port_alive", "port_alive", _Int(1, 65535), ONCE, _HEALTH_SETUP, _ORIGINAL,
        "the service port the health check probes, 1..65535 (80)"),
    Key("check_cycle", "check_cycle", _Seconds(0.0, MAX_CHECK_CYCLE, lo_inclusive=False),
        ONCE, _HEALTH_SETUP, _ORIGINAL,
        "seconds between two discoveries, 0 < s <= 86400 (30)"),
    Key("nfq_len", "nfq_len", _Int(1, MAX_NFQ_LEN), ONCE, _QUEUE_SETUP, _ORIGINAL,
        "NFQUEUE length in packets, 1..1048576 (default: 256 on the conntrack path "
        "with ``fail_open=hash``, where only first packets wait and beyond 256 the "
        "kernel's hash table takes new clients, which bounds the delay a flood adds "
        "to about 10 ms; 4096 otherwise, as the per-packet path queues every packet)"),
    Key("failover", "failover", _bool, ONCE, _HEALTH_SETUP, _ORIGINAL,
        "the bare word, or ``failover=yes|no|1|0|true|false|on|off`` (default off)"),
    Key("NS", "nameservers", None, MANY, _KERNEL_SETUP, _SHELL,
        "nameserver (IPv4 or IPv6) whose DNS traffic is not balanced; may repeat"),
    Key("FIRST_CORE", "first_core", _Int(0, MAX_QUEUE), ONCE, _QUEUE_SETUP, _SHELL,
        "first core / NFQUEUE number, 0..65535 (0)"),
    Key("LAST_CORE", "last_core", _Int(0, MAX_QUEUE), ONCE, _QUEUE_SETUP, _SHELL,
        "last core / NFQUEUE number, 0..65535 and at least FIRST_CORE (0)"),
    Key("RIP4", "rip4", lambda value: _network(value, 4), ONCE, _KERNEL_SETUP, _SHELL,
        "the real-server network, e.g. ``198.19.0.0/24``; a bare address means /32; "
        "host bits set is an error", family=4),
    Key("RIP6", "rip6", lambda value: _network(value, 6), ONCE, _KERNEL_SETUP, _SHELL,
        "the same for IPv6 (a bare address means /128)", family=6),
    Key("public_NIC", "public_nic", _ifname, ONCE, _KERNEL_SETUP, _SHELL,
        f"interface facing the clients (Linux name rules: 1 to {IFNAMSIZ - 1} bytes, "
        f"no ``/``, ``:`` or blanks, not ``.`` or ``..``)"),
    Key("private_NIC", "private_nic", _ifname, ONCE, _KERNEL_SETUP, _SHELL,
        "interface facing the backends (the same rules)"),
    Key("private_GW", (Field("private_gw4", 4), Field("private_gw6", 6)), None, MANY,
        _KERNEL_SETUP, _SHELL,
        "the balancer's own address on the private side, the backends' default "
        "gateway; ``addr`` or ``addr/prefix`` (the prefix is for ``ip addr add`` and "
        "is not kept); once per family"),
    Key("client_timeout", "client_timeout", _Seconds(1.0, MAX_CLIENT_TIMEOUT), ONCE,
        _TABLE_SETUP, _NEW,
        "seconds a client stays in the client table after its last packet, "
        "1..604800 (300)"),
    Key("client_table_max", "client_table_max", _Int(1, MAX_CLIENT_TABLE), ONCE,
        _TABLE_SETUP, _NEW,
        "most clients remembered per VIP, over all workers (each holds an equal "
        "share, at least 2), 1..100000000 (1000000); on the conntrack path also the "
        "size of the kernel's client map"),
    Key("datapath", "datapath", _Choice(DATAPATHS, "datapath"), ONCE, _PATH_SETUP, _NEW,
        "``conntrack`` (default) or ``perpacket`` (see the README)"),
    Key("fail_open", "fail_open", _fail_open, ONCE, _QUEUE_SETUP, _NEW,
        "what the kernel does with a new client when a queue is full or no worker "
        "reads it: ``hash`` (default: the kernel's hash table picks its backend, "
        "as ``maglev`` would), ``no`` (drop), ``yes`` (let it through unbalanced, "
        "to the balancer's own stack); on the per-packet path ``hash`` needs "
        "``strategy=sh`` or ``maglev`` and is ``no`` otherwise (every packet of a "
        "flow would have to hash alike)"),
    Key("hash_seed", "hash_seed", _seed, ONCE, _TABLE_SETUP, _NEW,
        f"the seed of the kernel's ``jhash`` of a client's address (sh, maglev and "
        f"the ``fail_open=hash`` table), 0..4294967295, decimal or 0x hex (default "
        f"{DEFAULT_HASH_SEED}, that is {DEFAULT_HASH_SEED:#x}); the same on every node "
        f"that shares a VIP"),
    Key("gso", "gso", _bool, ONCE, _QUEUE_SETUP, _NEW,
        "``yes|no`` (yes): take GSO super-packets from the queue"),
    Key("check", "check", _Choice(CHECKS, "check"), ONCE, _HEALTH_SETUP, _HEALTH,
        "``tcp`` (default: connect to ``check_port``, the original's check), "
        "``http``, ``https`` (GET ``http_path``, expect ``http_status``; no "
        "certificate verification), ``udp`` (see ``udp_payload``), ``icmp`` (echo), "
        "``none`` (never probed: always up)"),
    Key("check_port", "check_port", _Int(1, 65535), ONCE, _HEALTH_SETUP, _HEALTH,
        "port of the tcp/http/https/udp check, 1..65535 (default: ``port_alive``)"),
    Key("check_interval", "check_interval",
        _Seconds(0.0, MAX_CHECK_INTERVAL, lo_inclusive=False), ONCE, _HEALTH_SETUP, _HEALTH,
        "seconds between two probes of one backend, 0 < s <= 3600 (2)"),
    Key("check_timeout", "check_timeout",
        _Seconds(0.0, MAX_CHECK_INTERVAL, lo_inclusive=False), ONCE, _HEALTH_SETUP, _HEALTH,
        "seconds a probe may take, 0 < s <= 3600 and at most ``check_interval`` (1, "
        "or ``check_interval`` when that is shorter); a timeout above the interval is "
        "an error"),
    Key("rise", "rise", _Int(1, MAX_RISE_FALL), ONCE, _HEALTH_SETUP, _HEALTH,
        "successes in a row that bring a backend up, 1..100 (2)"),
    Key("fall", "fall", _Int(1, MAX_RISE_FALL), ONCE, _HEALTH_SETUP, _HEALTH,
        "failures in a row that take a backend down, 1..100 (3)"),
    Key("http_path", "http_path", _http_path, ONCE, _HEALTH_SETUP, _HEALTH,
        f"path of the http/https check: starts with ``/``, printable ASCII without "
        f"blanks, at most {MAX_HTTP_PATH} bytes (/)"),
    Key("http_status", "http_status", _Int(100, 599), ONCE, _HEALTH_SETUP, _HEALTH,
        "the status the http/https check expects, 100..599 (200)"),
    Key("udp_payload", "udp_payload", _udp_payload, ONCE, _HEALTH_SETUP, _HEALTH,
        f"what the udp check sends: text (sent as UTF-8), or ``hex:`` and an even "
        f"number of hex digits; at most {MAX_UDP_PAYLOAD} bytes. Given, only a reply "
        f"counts as success. Not given (default): an empty datagram, and success "
        f"unless an ICMP port unreachable comes back within ``check_timeout`` (no "
        f"application protocol: silence is all a UDP service owes)"),
    Key("hotplug", "hotplug", _bool, ONCE, _HEALTH_SETUP, _HEALTH,
        "``yes|no`` (no): whether a host that discovery finds in RIP4/RIP6, and that "
        "is not a backend, becomes one (once it passes ``rise`` checks); off, it is "
        "only logged. Needs the RIP network of every family with a VIP, "
        "``private_NIC`` for IPv6, and a check other than ``none``"),
    Key("on_backend_down", "on_backend_down", _Choice(ON_BACKEND_DOWN, "on_backend_down value"),
        ONCE, _FROM_NOW, _HEALTH,
        "``cut`` (default): the clients of a backend that went down move to others at "
        "once (their connections are reset by the new backend); ``keep``: they stay "
        "with it until it comes back or they go idle"),
    Key("no_backend", "no_backend", _Choice(NO_BACKEND, "no_backend value"), ONCE,
        _WORKER_SETUP, _HEALTH,
        "when no backend is up: ``refuse`` (default), the packet goes to the "
        "balancer's own stack, which refuses it at once (TCP reset, ICMP port "
        "unreachable); ``drop``: silence, the client retries until it times out"),
    Key("control_socket", "control_socket", _abspath, ONCE, _SOCKET_SETUP, _NEW,
        "path of the control socket (default ``/run/loaded/<instance tag>.sock``); "
        "absolute, not under /proc, /sys or /dev; what is there must be a socket or "
        "nothing (``--check`` looks)"),
    Key("control_group", "control_group", _group, ONCE, _SOCKET_SETUP, _NEW,
        "a group whose members may use the control socket (default: none, root "
        "only); a name or a number"),
    Key("status_listen", "status_listen", _listen, ONCE, _STATUS_SETUP, _NEW,
        "``host:port`` of the metrics and status page server (``127.0.0.1:9180``; "
        "IPv6 as ``[::1]:9180``), or ``off``; beyond loopback a warning (it has no "
        "authentication)"),
    Key("persist_clients", "persist_clients", _bool, ONCE, _NEXT_START, _NEW,
        "``yes|no`` (yes): save the client tables on a clean stop and restore them on "
        "the next start"),
    Key("persist_max_age", "persist_max_age", _Seconds(1.0, MAX_CLIENT_TIMEOUT), ONCE,
        _NEXT_START, _NEW,
        "seconds a saved table stays good, 1..604800 (600)"),
    Key("persist_file", "persist_file", _abspath, ONCE, _NEXT_START, _NEW,
        "where the tables are saved (default "
        "``/var/lib/loaded/<instance tag>.clients.json``); absolute, not under /proc, "
        "/sys or /dev; what is there must be a table loaded saved or nothing: the "
        "daemon never deletes or overwrites another file"),
)

_BY_NAME: dict[str, Key] = {k.name: k for k in KEY_TABLE}
assert len(_BY_NAME) == len(KEY_TABLE), "a key has two rows"
KEYS: frozenset[str] = frozenset(_BY_NAME)
# Keys that may be given once. private_GW is once per family, checked apart.
_SINGLE = frozenset(k.name for k in KEY_TABLE if not k.repeat)
# Keys that configure checks: without failover they do nothing, which a
# warning says.
_HEALTH_KEYS = tuple(k.name for k in KEY_TABLE if k.group == _HEALTH)
_SERVER_OPTIONS = ("check", "state", "weight")
_FAMILY_KEY = {"server4": 4, "server6": 6}


# --------------------------------------------------------------------------
# The parser


@dataclass(frozen=True, slots=True)
class _Line:
    no: int
    key: str
    value: str
    options: tuple[tuple[str, str], ...]


class _Parser:
    def __init__(self, path: str) -> None:
        self.path = path
        self.problems: list[Problem] = []
        self.first_line: dict[str, int] = {}  # key -> line it was first set on
        self.crlf_warned = False
        # Config field -> value: Config's defaults, then what the file sets.
        self.values: dict[str, Any] = {
            f.name: _CONFIG_DEFAULTS[f.name] for k in KEY_TABLE for f in k.fields}
        self.given: set[str] = set()  # the fields a valid line set
        # What the keys that a row cannot express keep.
        self.servers: dict[int, list[BackendSpec]] = {4: [], 6: []}
        self.server_lines: dict[int, list[int]] = {4: [], 6: []}  # even invalid ones
        self.server_check_lines: list[int] = []
        self.nameservers: list[tuple[IPAddress, int]] = []
        self.gw_lines: dict[int, int] = {}

        # The keys whose row has no value reader.
        self.handlers: dict[str, Callable[[_Line], None]] = {
            "server4": self._server, "server6": self._server,
            "strategy": self._strategy,
            "NS": self._ns,
            "private_GW": self._private_gw,
        }
        assert set(self.handlers) == {k.name for k in KEY_TABLE if k.value is None}

    def set(self, field: str, value: object) -> None:
        self.values[field] = value
        self.given.add(field)

    # -- reporting

    def error(self, line: int, message: str) -> None:
        self.problems.append(Problem(self.path, line, message))

    def warn(self, line: int, message: str) -> None:
        self.problems.append(Problem(self.path, line, message, "warning"))

    # -- lines

    def feed(self, text: str) -> None:
        text = text.removeprefix("\ufeff")
        # Split on newlines only: str.splitlines also splits on form feeds and
        # Unicode separators, which would shift line numbers from an editor's.
        for no, raw in enumerate(text.split("\n"), 1):
            if raw.endswith("\r"):
                raw = raw[:-1]
                if not self.crlf_warned:
                    self.crlf_warned = True
                    self.warn(no, "line ends in a carriage return (DOS line endings): "
                                  "the shell part of this file will not run")
            line = raw.lstrip(_BLANKS)
            if not line or line.startswith("#"):
                continue
            m = _ASSIGN.match(line)
            if m is None:
                self._other(no, line)
                continue
            key = m.group()[:-1]
            if key not in KEYS:
                self.warn(no, f"unknown key {_q(key)} ignored{_suggest(key)}")
                continue
            # Record the line before its value is checked, so that a bad value
            # does not also cause "VIP4 is not set" or "no backends" errors.
            if key in _SINGLE:
                first = self.first_line.get(key)
                if first is not None:
                    self.error(no, f"{key} set twice, first on line {first}")
                    continue
                self.first_line[key] = no
            elif key in _FAMILY_KEY:
                self.server_lines[_FAMILY_KEY[key]].append(no)
            parsed = self._split(no, key, line)
            if parsed is None:
                continue
            try:
                self._read(parsed)
            except _Bad as e:
                self.error(no, f"{key}: {e}")

    def _split(self, no: int, key: str, line: str) -> _Line | None:
        """The value and options of a ``key=`` line, or None after reporting why not."""
        try:
            words = _words(line)
        except _Expansion as e:
            word = e.word.removeprefix(f"{key}=")
            self.error(no, f"{key}: {_q(word)} uses shell expansion, which loaded cannot "
                           f"evaluate; write the value itself")
            return None
        except _Bad as e:
            self.error(no, f"{key}: {e}")
            return None
        value = words[0][len(key) + 1:]
        if not value:
            hint = " (no blanks allowed after '=')" if len(words) > 1 else ""
            self.error(no, f"{key}: empty value{hint}")
            return None
        ok = True
        options: list[tuple[str, str]] = []
        seen: set[str] = set()
        for w in words[1:]:
            name, eq, val = w.partition("=")
            if not eq or not _NAME.fullmatch(name):
                self.error(no, f"{key}: unexpected word {_q(w)} "
                               f"(options are written name=value)")
                ok = False
            elif name in seen:
                self.error(no, f"{key}: option {_q(name)} given twice")
                ok = False
            else:
                seen.add(name)
                options.append((name, val))
        return _Line(no, key, value, tuple(options)) if ok else None

    def _other(self, no: int, line: str) -> None:
        """A line that is not ``name=...``: shell, unless it is clearly meant for us."""
        if _FAILOVER_WORD.match(line):
            try:
                words = _words(line)
            except _Expansion as e:
                self.error(no, f"failover: {_q(e.word)} uses shell expansion, which loaded "
                               f"cannot evaluate")
                return
            except _Bad as e:
                self.error(no, f"failover: {e}")
                return
            if len(words) > 1:
                self.error(no, f"failover: unexpected word {_q(words[1])} (write "
                               f"'failover' alone or failover=yes)")
                return
            first = self.first_line.get("failover")
            if first is not None:
                self.error(no, f"failover set twice, first on line {first}")
                return
            self.first_line["failover"] = no
            self.set("failover", True)
            return
        m = _SPACED_ASSIGN.match(line)
        if m and m.group(1) in KEYS:
            key = m.group(1)
            self.error(no, f"{key}: no blanks allowed around '=' (sh runs {key!r} as a "
                           f"command, and loaded reads only {key}=value)")
            return
        m = _DECLARED.match(line)
        if m and m.group(2) in KEYS:
            self.warn(no, f"{m.group(2)}: loaded reads only lines starting with "
                          f"'{m.group(2)}=', so this '{m.group(1)}' line is ignored")

    @staticmethod
    def _no_options(ln: _Line, allowed: Sequence[str] = ()) -> None:
        for name, val in ln.options:
            if name not in allowed:
                if allowed:
                    raise _Bad(f"unknown option '{name}={val}' (known: {', '.join(allowed)})")
                raise _Bad(f"takes no options, got '{name}={val}'")

    # -- keys

    def _read(self, ln: _Line) -> None:
        handler = self.handlers.get(ln.key)
        if handler is not None:
            handler(ln)
            return
        key = _BY_NAME[ln.key]
        assert key.value is not None
        self._no_options(ln)
        (field,) = key.fields
        self.set(field.name, key.value(ln.value))

    def _server(self, ln: _Line) -> None:
        family = _FAMILY_KEY[ln.key]
        ip: IPAddress | None = None
        weight, state = 1, State.UP
        check: str | None = None
        try:
            ip = _address(ln.value, family)
            _check_unicast(ln.value, ip)
        except _Bad as e:
            self.error(ln.no, f"{ln.key}: {e}")
            ip = None
        ok = True
        for name, val in ln.options:
            try:
                if name == "weight":
                    weight = _int(val, 0, MAX_WEIGHT)
                elif name == "state":
                    if val not in _STATES:
                        raise _Bad(f"{_q(val)} is not a state (known: up, down, drain, "
                                   f"draining)")
                    state = _STATES[val]
                elif name == "check":
                    check = _choice(val, CHECKS, "check")
                else:
                    raise _Bad(f"unknown option '{name}={val}' "
                               f"(known: {', '.join(_SERVER_OPTIONS)})")
            except _Bad as e:
                what = f"{ln.key}: {name}: {e}" if name in _SERVER_OPTIONS else f"{ln.key}: {e}"
                self.error(ln.no, what)
                ok = False
        if check is not None:
            self.server_check_lines.append(ln.no)
        if ip is not None and ok:
            self.servers[family].append(BackendSpec(ip, weight, state, ln.no, check))

    def _strategy(self, ln: _Line) -> None:
        strategy = _choice(ln.value, STRATEGIES, "strategy")
        self.set("strategy", strategy)
        if strategy not in HASH_STRATEGIES:
            for name, val in ln.options:
                extra = " (only sh and maglev have one)" if name == "table_size" else ""
                self.error(ln.no, f"strategy: {strategy} takes no option "
                                  f"'{name}={val}'{extra}")
            return
        for name, val in ln.options:
            if name != "table_size":
                self.error(ln.no, f"strategy: unknown option '{name}={val}' for {strategy} "
                                  f"(known: table_size)")
                continue
            try:
                size = _int(val, MAGLEV_MIN_TABLE, MAGLEV_MAX_TABLE)
                if not is_prime(size):
                    raise _Bad(f"{_q(val)} is not a prime")
            except _Bad as e:
                self.error(ln.no, f"strategy: table_size: {e}")
            else:
                self.set("hash_table_size", size)

    def _ns(self, ln: _Line) -> None:
        self._no_options(ln)
        ip = _address(ln.value, None)
        if ip.is_unspecified or ip.is_multicast:
            raise _Bad(f"{_q(ln.value)} cannot be a nameserver address")
        for other, first in self.nameservers:
            if other == ip:
                self.warn(ln.no, f"NS: {ip} listed twice, first on line {first}")
                return
        self.nameservers.append((ip, ln.no))

    def _private_gw(self, ln: _Line) -> None:
        self._no_options(ln)
        addr, slash, prefix = ln.value.partition("/")
        ip = _address(addr, None)
        if slash:
            try:
                _int(prefix, 0, ip.max_prefixlen)
            except _Bad as e:
                raise _Bad(f"{_q(ln.value)}: bad prefix length: {e}") from None
        _check_unicast(ln.value, ip)
        first = self.gw_lines.get(ip.version)
        if first is not None:
            raise _Bad(f"IPv{ip.version} address set twice, first on line {first}")
        self.gw_lines[ip.version] = ln.no
        self.set(f"private_gw{ip.version}", ip)

    # -- checks across lines

    def cross_check(self, c: Config) -> None:
        vips: dict[int, IPAddress | None] = {4: c.vip4, 6: c.vip6}
        rips: dict[int, IPv4Network | IPv6Network | None] = {4: c.rip4, 6: c.rip6}
        gws: dict[int, IPAddress | None] = {4: c.private_gw4, 6: c.private_gw6}
        if not any(f"VIP{f}" in self.first_line for f in (4, 6)):
            self.error(0, "no VIP4 or VIP6 set: nothing to balance")
        for f in (4, 6):
            vip_line = self.first_line.get(f"VIP{f}")
            vip = vips[f]
            lines = self.server_lines[f]
            if vip_line is None and lines:
                self.error(lines[0], f"server{f} given but VIP{f} is not set")
            if vip is not None and vip_line is not None and not lines:
                self.error(vip_line, f"VIP{f} {vip} has no backends: add server{f} lines")
            rip = rips[f]
            if vip is not None and rip is not None and vip in rip:
                self.error(vip_line or 0,
                           f"VIP{f} {vip} is inside RIP{f} {rip} (line "
                           f"{self.first_line.get(f'RIP{f}', 0)}): the same prefix would be "
                           f"on both sides, and traffic to the VIP could not be told from "
                           f"the backends' replies")
            seen: dict[IPAddress, int] = {}
            for b in self.servers[f]:
                if vip is not None and b.ip == vip:
                    self.error(b.line, f"server{f}: {b.ip} is VIP{f} itself "
                                       f"(line {vip_line})")
                if b.ip in seen:
                    self.error(b.line, f"server{f}: {b.ip} listed twice, first on line "
                                       f"{seen[b.ip]}")
                else:
                    seen[b.ip] = b.line
                if rip is not None and b.ip not in rip:
                    self.warn(b.line, f"server{f}: {b.ip} is outside RIP{f} {rip}")
            gw = gws[f]
            if gw is not None:
                gw_line = self.gw_lines[f]
                if gw == vip:
                    self.error(gw_line, f"private_GW: {gw} is also VIP{f} (line {vip_line})")
                if gw in seen:
                    self.error(gw_line, f"private_GW: {gw} is also a backend "
                                        f"(line {seen[gw]})")
                rip = rips[f]
                if rip is not None and gw not in rip:
                    self.warn(gw_line, f"private_GW: {gw} is outside RIP{f} {rip}")
            prefix_line = self.first_line.get(f"VIP{f}net")
            if prefix_line is not None and vip_line is None:
                self.warn(prefix_line, f"VIP{f}net is set but VIP{f} is not")
        if (c.broadcast is not None and c.rip4 is not None
                and c.broadcast not in c.rip4
                and c.broadcast != IPv4Address("255.255.255.255")):
            self.warn(self.first_line["broadcast"],
                      f"broadcast: {c.broadcast} is outside RIP4 {c.rip4}, so the "
                      f"failover check will not reach the backends")
        self.check_daemon_files(c)
        if c.first_core > c.last_core:
            line = self.first_line.get("LAST_CORE") or self.first_line.get("FIRST_CORE", 0)
            self.error(line, f"FIRST_CORE {c.first_core} is greater than LAST_CORE "
                             f"{c.last_core}")
        self.check_health(c, vips, rips)

    def check_daemon_files(self, c: Config) -> None:
        if c.persist_file is not None and c.persist_file == c.control_socket:
            self.error(self.first_line["persist_file"],
                       f"persist_file: {c.persist_file} is also the control_socket "
                       f"(line {self.first_line['control_socket']})")
        listen = c.status_listen
        if listen is not None and "status_listen" in self.first_line:
            host = listen[0]
            if not ipaddress.ip_address(host).is_loopback:
                self.warn(self.first_line["status_listen"],
                          f"status_listen: {host}:{listen[1]} is reachable beyond this host "
                          f"and the status server has no authentication: anyone who can "
                          f"reach it reads the backends, their health and the metrics; "
                          f"listen on 127.0.0.1 behind an authenticating proxy, or "
                          f"firewall the port")

    def check_health(self, c: Config, vips: dict[int, IPAddress | None],
                     rips: dict[int, IPv4Network | IPv6Network | None]) -> None:
        timeout_line = self.first_line.get("check_timeout")
        if "check_timeout" in self.given and c.check_timeout > c.check_interval:
            self.error(timeout_line or 0,
                       f"check_timeout {c.check_timeout:g} is longer than "
                       f"check_interval {c.check_interval:g}: a probe must end "
                       f"before the next one starts")
        given = [k for k in _HEALTH_KEYS if k in self.first_line]
        if not c.failover:
            lines = [self.first_line[k] for k in given] + self.server_check_lines
            if lines:
                names = given + (["check= on server lines"] if self.server_check_lines
                                 else [])
                self.warn(min(lines), f"{', '.join(names)}: no effect without failover "
                                      f"(add a line 'failover')")
            return
        hotplug_line = self.first_line.get("hotplug", 0)
        if c.hotplug and c.check == "none":
            self.error(hotplug_line, "hotplug=yes needs a check: with check=none a "
                                     "discovered host could never come up")
        if c.hotplug:
            for f in (4, 6):
                if vips[f] is not None and rips[f] is None:
                    self.error(hotplug_line, f"hotplug=yes needs RIP{f}: only hosts "
                                             f"inside the real-server network are added")
            if vips[6] is not None and c.private_nic is None:
                self.error(hotplug_line, "hotplug=yes needs private_NIC: IPv6 discovery "
                                         "pings all nodes on that link")

    def result(self) -> Config:
        values = dict(self.values)
        values["servers4"], values["servers6"] = tuple(self.servers[4]), tuple(self.servers[6])
        values["nameservers"] = tuple(ip for ip, _ in self.nameservers)
        # Defaults that follow other keys.
        if "check_port" not in self.given:
            values["check_port"] = values["port_alive"]
        if "check_timeout" not in self.given:
            # An interval below the default timeout needs no second key.
            values["check_timeout"] = min(DEFAULT_CHECK_TIMEOUT, values["check_interval"])
        config = Config(path=self.path, **values)
        self.cross_check(config)
        # Whole-file problems (line 0) go last, after those with a place.
        problems = sorted(self.problems, key=lambda p: (p.line == 0, p.line))
        if any(p.severity == "error" for p in problems):
            raise ConfigError(problems)
        return dataclasses.replace(config, warnings=tuple(problems),
                                   key_lines=tuple(self.first_line.items()))


def _suggest(key: str) -> str:
    for known in sorted(KEYS):
        if known.lower() == key.lower():
            return f" (did you mean {known!r}?)"
    close = difflib.get_close_matches(key, sorted(KEYS), n=1, cutoff=0.8)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_config(text: str, path: str = "<config>") -> Config:
    """Parse and check a configuration; raise ``ConfigError`` listing every problem."""
    parser = _Parser(path)
    parser.feed(text)
    return parser.result()


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read ``path`` (UTF-8) and parse it; unreadable files raise ``ConfigError`` too."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError([Problem(name, 0, f"cannot read: {e.strerror or e}")]) from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError([Problem(
            name, line, f"not valid UTF-8 (byte 0x{data[e.start]:02x})")]) from e
    return parse_config(text, name)


# --------------------------------------------------------------------------
# The docstring's tables of keys, made from KEY_TABLE

_DOC_WIDTH = 79


def _doc_table(group: str) -> str:
    """The reStructuredText table of the keys of ``group``, as the docstring shows it."""
    rows = [k for k in KEY_TABLE if k.group == group]
    names = [f"``{k.name}``" for k in rows]
    width = max(len(n) for n in names) + 2
    rule = "=" * (width - 2) + "  " + "=" * (_DOC_WIDTH - width)
    lines = [rule, "key".ljust(width) + "value", rule]
    for name, key in zip(names, rows, strict=True):
        text = textwrap.wrap(key.doc, _DOC_WIDTH - width, break_long_words=False,
                             break_on_hyphens=False)
        lines.append(name.ljust(width) + text[0])
        lines += [" " * width + t for t in text[1:]]
    lines.append(rule)
    return "\n".join(lines)


def _document(doc: str) -> str:
    for group in (_ORIGINAL, _SHELL, _NEW, _HEALTH):
        marker = f"<keys: {group}>"
        assert doc.count(marker) == 1, marker
        doc = doc.replace(marker, _doc_table(group))
    return doc


if __doc__:  # None under python -OO
    __doc__ = _document(__doc__)
