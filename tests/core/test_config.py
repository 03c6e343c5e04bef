"""Tests of the configuration parser (loaded.core.config)."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loaded.core import config as config_module
from loaded.core.config import (
    KEY_TABLE,
    KEYS,
    STRATEGIES,
    BackendSpec,
    Config,
    load_config,
    parse_config,
)
from loaded.core.errors import ConfigError, Problem
from loaded.core.pool import State

EXAMPLES = Path(__file__).parents[2] / "examples"

V4 = "VIP4=198.18.0.10\nserver4=198.19.0.1\n"
V6 = "VIP6=2001:db8:1::10\nserver6=2001:db8:2::1\n"


def parse(text: str) -> Config:
    return parse_config(text, "t.conf")


def problems(text: str) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return info.value.problems


def errors(text: str) -> list[str]:
    return [str(p) for p in problems(text) if p.severity == "error"]


def only_error(text: str) -> Problem:
    errs = [p for p in problems(text) if p.severity == "error"]
    assert len(errs) == 1, errs
    return errs[0]


def warnings(text: str) -> list[str]:
    return [str(p) for p in parse(text).warnings]


# --------------------------------------------------------------------------
# Basics and defaults


def test_minimal_ipv4_and_defaults() -> None:
    c = parse(V4)
    assert c.path == "t.conf"
    assert c.vip4 == IPv4Address("198.18.0.10")
    assert c.servers4 == (BackendSpec(IPv4Address("198.19.0.1"), 1, State.UP, 2),)
    assert c.vip6 is None and c.servers6 == ()
    assert (c.strategy, c.hash_table_size) == ("rr", 65537)
    assert (c.port_alive, c.check_cycle, c.nfq_len, c.failover) == (80, 30.0, None, False)
    assert (c.first_core, c.last_core) == (0, 0)
    assert (c.client_timeout, c.client_table_max) == (300.0, 1_000_000)
    assert (c.datapath, c.fail_open, c.gso) == ("conntrack", "hash", True)
    assert c.hash_seed == 0x4C4F4144
    assert c.nameservers == () and c.warnings == ()
    assert c.families() == (4,)


def test_minimal_ipv6() -> None:
    c = parse(V6)
    assert c.vip6 == IPv6Address("2001:db8:1::10")
    assert c.servers6[0].ip == IPv6Address("2001:db8:2::1")
    assert c.families() == (6,)


def test_dual_families() -> None:
    assert parse(V4 + V6).families() == (4, 6)


def test_config_is_frozen() -> None:
    c = parse(V4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.strategy = "lc"  # type: ignore[misc]


# --------------------------------------------------------------------------
# Lines: shell, comments, quoting


SHELL = """#!/bin/sh
modprobe nfnetlink_queue || true
iptables -F
iptables -t mangle -A PREROUTING -d $VIP4 -j NFQUEUE --queue-balance $FIRST_CORE:$LAST_CORE
ip addr add $VIP4/$VIP4net dev $public_NIC 2>/dev/null || true
if [ -n "$VIP4" ]; then
\techo 1 > /proc/sys/net/ipv4/ip_forward
fi
for i in $public_NIC $private_NIC all default; do
\techo 0 > /proc/sys/net/ipv4/conf/$i/send_redirects
done
sysctl -w net.ipv4.ip_forward=1
[ -x /sbin/foo ] && /sbin/foo
"""


def test_shell_lines_are_ignored_silently() -> None:
    c = parse(SHELL + V4 + SHELL)
    assert c.vip4 == IPv4Address("198.18.0.10")
    assert c.warnings == ()


def test_comments_and_blank_lines() -> None:
    c = parse("# VIP4=1.2.3.4\n\n   \n\t# server4=nonsense\n" + V4 + "#failover\n  #failover\n")
    assert c.vip4 == IPv4Address("198.18.0.10")
    assert not c.failover
    assert c.warnings == ()


def test_trailing_comments_and_leading_blanks() -> None:
    c = parse("  VIP4=198.18.0.10\t\t# virtual IP\n\tserver4=198.19.0.1 # first\n"
              "port_alive=8080 #c\n")
    assert c.vip4 == IPv4Address("198.18.0.10")
    assert c.port_alive == 8080


@pytest.mark.parametrize("value", [
    '"198.18.0.10"', "'198.18.0.10'", '"198.18"\'.0.10\'', "198.18.0.1\\0",
    '"198.18.0.10" # comment',
])
def test_quoted_values(value: str) -> None:
    assert parse(f"VIP4={value}\nserver4=198.19.0.1\n").vip4 == IPv4Address("198.18.0.10")


def test_hash_inside_a_word_is_not_a_comment() -> None:
    # sh reads eth#0 as one word; shlex would have cut it to "eth".
    assert parse(V4 + "public_NIC=eth#0\n").public_nic == "eth#0"


def test_quoted_hash_and_blank() -> None:
    p = only_error(V4 + "public_NIC='eth 0'\n")
    assert "'eth 0'" in p.message and p.line == 3


@pytest.mark.parametrize("line", [
    "VIP4=$X", 'VIP4="$X"', "VIP4=${X}", "VIP4=`cat vip`", 'VIP4="$(cat vip)"',
    "VIP4=198.18.0.$N",
])
def test_shell_expansion_is_an_error(line: str) -> None:
    p = only_error(line + "\nserver4=198.19.0.1\n")
    assert p.line == 1
    assert "shell expansion" in p.message and p.message.startswith("VIP4: ")


def test_single_quoted_dollar_is_literal_and_invalid() -> None:
    p = only_error("VIP4='$X'\nserver4=198.19.0.1\n")
    assert p.message == "VIP4: '$X' is not a valid IPv4 address"


def test_escaped_dollar_is_literal() -> None:
    assert parse(V4 + "public_NIC=eth\\$0\n").public_nic == "eth$0"


def test_expansion_in_option_is_an_error() -> None:
    p = only_error("VIP4=198.18.0.10\nserver4=198.19.0.1 weight=$W\n")
    assert p.line == 2 and "weight=$W" in p.message and "expansion" in p.message


@pytest.mark.parametrize(("line", "fragment"), [
    ("VIP4=198.18.0.10;", "';'"),
    ("VIP4=198.18.0.10 && echo", "'&'"),
    ("VIP4=198.18.0.10 >/dev/null", "'>'"),
    ('VIP4="198.18.0.10', 'unterminated " quote'),
    ("VIP4='198.18.0.10", "unterminated ' quote"),
    ("VIP4=198.18.0.10 \\", "continues"),
])
def test_unusable_shell_on_a_key_line(line: str, fragment: str) -> None:
    p = only_error(line + "\nserver4=198.19.0.1\n")
    assert p.line == 1 and fragment in p.message


def test_extra_word_is_an_error() -> None:
    p = only_error("VIP4=198.18.0.10 198.18.0.11\nserver4=198.19.0.1\n")
    assert p.message.startswith("VIP4: unexpected word '198.18.0.11'")


def test_empty_value() -> None:
    p = only_error("VIP4=198.18.0.10\nserver4=198.19.0.1\nstrategy=\n")
    assert (p.line, p.message) == (3, "strategy: empty value")
    p = only_error("VIP4=198.18.0.10\nserver4=198.19.0.1\nstrategy= rr\n")
    assert p.message == "strategy: empty value (no blanks allowed after '=')"


def test_blanks_around_equals_on_known_key_is_an_error() -> None:
    p = only_error("VIP4 = 198.18.0.10\nVIP4=198.18.0.10\nserver4=198.19.0.1\n")
    assert p.line == 1 and "no blanks allowed around '='" in p.message


def test_blanks_around_equals_on_other_words_is_shell() -> None:
    assert parse(V4 + "test = 3\n").warnings == ()


def test_export_of_known_key_warns() -> None:
    w = warnings(V4 + "export VIP6=2001:db8:1::10\n")
    assert len(w) == 1 and w[0].startswith("t.conf:3: warning: VIP6:")


def test_crlf_line_endings_warn_once_and_parse() -> None:
    c = parse(V4.replace("\n", "\r\n") + "port_alive=81\r\n")
    assert c.port_alive == 81
    assert [p.line for p in c.warnings] == [1]
    assert "carriage return" in c.warnings[0].message


def test_byte_order_mark_is_ignored() -> None:
    assert parse("\ufeff" + V4).vip4 == IPv4Address("198.18.0.10")


def test_line_numbers_count_only_newlines() -> None:
    # A form feed is not a line break for an editor or for sh's line numbers.
    p = only_error("# a\x0cb\nVIP4=x\nserver4=198.19.0.1\n")
    assert p.line == 2


# --------------------------------------------------------------------------
# Unknown keys


def test_unknown_key_warns_with_file_and_line() -> None:
    c = parse(V4 + "FOO=bar\n  i=0\n")
    assert [str(w) for w in c.warnings] == [
        "t.conf:3: warning: unknown key 'FOO' ignored",
        "t.conf:4: warning: unknown key 'i' ignored",
    ]


@pytest.mark.parametrize(("key", "suggestion"), [
    ("vip4", "VIP4"), ("Server4", "server4"), ("nfq_lem", "nfq_len"),
])
def test_unknown_key_suggests_a_known_one(key: str, suggestion: str) -> None:
    (w,) = parse(V4 + f"{key}=1\n").warnings
    assert w.severity == "warning" and f"did you mean {suggestion!r}" in w.message


def test_warnings_travel_with_errors() -> None:
    ps = problems("FOO=1\nVIP4=bad\nserver4=198.19.0.1\n")
    assert [(p.line, p.severity) for p in ps] == [(1, "warning"), (2, "error")]


# --------------------------------------------------------------------------
# Every key, valid values


@pytest.mark.parametrize(("line", "field", "expected"), [
    ("VIP4net=24", "vip4_prefix", 24),
    ("VIP4net=0", "vip4_prefix", 0),
    ("VIP4net=32", "vip4_prefix", 32),
    ("strategy=weighted", "strategy", "weighted"),
    ("strategy=wrr", "strategy", "wrr"),
    ("strategy=lc", "strategy", "lc"),
    ("strategy=sh", "strategy", "sh"),
    ("strategy=maglev", "strategy", "maglev"),
    ("broadcast=198.19.0.255", "broadcast", IPv4Address("198.19.0.255")),
    ("broadcast=255.255.255.255", "broadcast", IPv4Address("255.255.255.255")),
    ("port_alive=1", "port_alive", 1),
    ("port_alive=65535", "port_alive", 65535),
    ("check_cycle=0.5", "check_cycle", 0.5),
    ("check_cycle=86400", "check_cycle", 86400.0),
    ("nfq_len=1", "nfq_len", 1),
    ("nfq_len=1048576", "nfq_len", 1048576),
    ("nfq_len=0001000", "nfq_len", 1000),
    ("failover", "failover", True),
    ("failover\t# on", "failover", True),
    ("NS=198.18.0.53", "nameservers", (IPv4Address("198.18.0.53"),)),
    ("NS=2001:db8:1::53", "nameservers", (IPv6Address("2001:db8:1::53"),)),
    ("FIRST_CORE=0", "first_core", 0),
    ("LAST_CORE=7", "last_core", 7),
    ("RIP4=198.19.0.0/24", "rip4", IPv4Network("198.19.0.0/24")),
    ("RIP4=198.19.0.1", "rip4", IPv4Network("198.19.0.1/32")),
    ("RIP6=2001:db8:2::/64", "rip6", IPv6Network("2001:db8:2::/64")),
    ("RIP6=2001:db8:2::1", "rip6", IPv6Network("2001:db8:2::1/128")),
    ("public_NIC=eth0", "public_nic", "eth0"),
    ("private_NIC=enp3s0f1.100", "private_nic", "enp3s0f1.100"),
    ("private_NIC=abcdefghijklmno", "private_nic", "abcdefghijklmno"),
    ("private_GW=198.19.0.254", "private_gw4", IPv4Address("198.19.0.254")),
    ("private_GW=198.19.0.254/24", "private_gw4", IPv4Address("198.19.0.254")),
    ("private_GW=2001:db8:2::fffe/64", "private_gw6", IPv6Address("2001:db8:2::fffe")),
    ("client_timeout=1", "client_timeout", 1.0),
    ("client_timeout=604800", "client_timeout", 604800.0),
    ("client_timeout=2.5", "client_timeout", 2.5),
    ("client_table_max=1", "client_table_max", 1),
    ("client_table_max=100000000", "client_table_max", 100_000_000),
    ("datapath=conntrack", "datapath", "conntrack"),
    ("datapath=perpacket", "datapath", "perpacket"),
    ("fail_open=yes", "fail_open", "yes"),
    ("fail_open=off", "fail_open", "no"),
    ("fail_open=HASH", "fail_open", "hash"),
    ("hash_seed=0x1234abcd", "hash_seed", 0x1234ABCD),
    ("hash_seed=4294967295", "hash_seed", 0xFFFFFFFF),
    ("hash_seed=0", "hash_seed", 0),
    ("gso=no", "gso", False),
    ("gso=TRUE", "gso", True),
])
def test_valid_value(line: str, field: str, expected: object) -> None:
    c = parse(V4 + line + "\n")
    assert getattr(c, field) == expected
    assert c.warnings == ()


def test_vip6_prefix() -> None:
    assert parse(V6 + "VIP6net=128\n").vip6_prefix == 128


@pytest.mark.parametrize(("word", "expected"), [
    ("yes", True), ("no", False), ("1", True), ("0", False), ("true", True),
    ("false", False), ("on", True), ("off", False), ("Yes", True),
])
def test_failover_values(word: str, expected: bool) -> None:
    assert parse(V4 + f"failover={word}\n").failover is expected


# --------------------------------------------------------------------------
# Every key, invalid values


@pytest.mark.parametrize(("line", "message"), [
    ("server4=198.19.0.300", "server4: '198.19.0.300' is not a valid IPv4 address"),
    ("server4=2001:db8:2::1", "server4: '2001:db8:2::1' is an IPv6 address, not IPv4"),
    ("server4=0.0.0.0", "server4: '0.0.0.0' is the unspecified address"),
    ("server4=127.0.0.1", "server4: '127.0.0.1' is a loopback address"),
    ("server4=224.0.0.1", "server4: '224.0.0.1' is a multicast address"),
    ("server4=255.255.255.255", "server4: '255.255.255.255' is the limited broadcast address"),
    ("server4=010.0.0.1", "server4: '010.0.0.1' is not a valid IPv4 address"),
    ("server6=198.19.0.1", "server6: '198.19.0.1' is an IPv4 address, not IPv6"),
    ("server6=::1", "server6: '::1' is a loopback address"),
    ("server6=ff02::1", "server6: 'ff02::1' is a multicast address"),
    ("server6=::", "server6: '::' is the unspecified address"),
    ("server6=fe80::1%eth1", "server6: 'fe80::1%eth1': a zone index ('%...') is not allowed"),
    ("server6=::ffff:198.19.0.9", "server6: '::ffff:198.19.0.9' is an IPv4-mapped address"),
    ("VIP4net=33", "VIP4net: '33' is out of range 0..32"),
    ("VIP4net=-1", "VIP4net: '-1' is not a whole number"),
    ("VIP6net=129", "VIP6net: '129' is out of range 0..128"),
    ("strategy=roundrobin", "strategy: 'roundrobin' is not a strategy (known: lc, maglev,"),
    ("strategy=RR", "strategy: 'RR' is not a strategy"),
    ("broadcast=2001:db8::ff", "broadcast: '2001:db8::ff' is an IPv6 address, not IPv4"),
    ("broadcast=0.0.0.0", "broadcast: '0.0.0.0' cannot be a broadcast address"),
    ("port_alive=0", "port_alive: '0' is out of range 1..65535"),
    ("port_alive=65536", "port_alive: '65536' is out of range 1..65535"),
    ("port_alive=http", "port_alive: 'http' is not a whole number"),
    ("port_alive=+80", "port_alive: '+80' is not a whole number"),
    ("port_alive=8_0", "port_alive: '8_0' is not a whole number"),
    ("check_cycle=0", "check_cycle: '0' is out of range 0 < s <= 86400"),
    ("check_cycle=-5", "check_cycle: '-5' is not a number of seconds"),
    ("check_cycle=inf", "check_cycle: 'inf' is not a number of seconds"),
    ("check_cycle=1e3", "check_cycle: '1e3' is not a number of seconds"),
    ("check_cycle=86401", "out of range"),
    ("nfq_len=0", "nfq_len: '0' is out of range 1..1048576"),
    ("nfq_len=1048577", "nfq_len: '1048577' is out of range 1..1048576"),
    ("failover=maybe", "failover: 'maybe' is not yes or no"),
    ("failover on", "failover: unexpected word 'on'"),
    ("NS=ns1.example.net", "NS: 'ns1.example.net' is not a valid IP address"),
    ("NS=0.0.0.0", "NS: '0.0.0.0' cannot be a nameserver address"),
    ("FIRST_CORE=-1", "FIRST_CORE: '-1' is not a whole number"),
    ("LAST_CORE=65536", "LAST_CORE: '65536' is out of range 0..65535"),
    ("RIP4=198.19.0.1/24",
     "RIP4: '198.19.0.1/24' has host bits set (the network is 198.19.0.0/24)"),
    ("RIP4=198.19.0.0/33", "RIP4: '198.19.0.0/33' is not a valid IPv4 network"),
    ("RIP4=2001:db8:2::/64", "RIP4: '2001:db8:2::/64' is an IPv6 network, not IPv4"),
    ("RIP4=2001:db8:2::1/64", "RIP4: '2001:db8:2::1/64' is an IPv6 network, not IPv4"),
    ("RIP6=2001:db8:2::1/64",
     "RIP6: '2001:db8:2::1/64' has host bits set (the network is 2001:db8:2::/64)"),
    ("RIP6=198.19.0.0/24", "RIP6: '198.19.0.0/24' is an IPv4 network, not IPv6"),
    ("public_NIC=abcdefghijklmnop", "public_NIC: 'abcdefghijklmnop' is too long"),
    ("public_NIC=ethé12345678901", "is too long"),
    ("public_NIC=eth0:1", "public_NIC: 'eth0:1' is not a valid interface name (':'"),
    ("public_NIC=a/b", "('/' is not allowed)"),
    ("public_NIC=.", "public_NIC: '.' is not a valid interface name"),
    ("private_NIC=..", "private_NIC: '..' is not a valid interface name"),
    ("private_NIC='eth\t1'", "private_NIC: 'eth\\t1' is not a valid interface name"),
    ("private_GW=198.19.0.254/33", "private_GW: '198.19.0.254/33': bad prefix length"),
    ("private_GW=gw", "private_GW: 'gw' is not a valid IP address"),
    ("private_GW=224.0.0.9/24", "private_GW: '224.0.0.9/24' is a multicast address"),
    ("client_timeout=0", "client_timeout: '0' is out of range 1 <= s <= 604800"),
    ("client_timeout=604801", "client_timeout: '604801' is out of range"),
    ("client_table_max=0", "client_table_max: '0' is out of range 1..100000000"),
    ("client_table_max=100000001", "client_table_max: '100000001' is out of range"),
    ("datapath=xdp", "datapath: 'xdp' is not a datapath (known: conntrack, perpacket)"),
    ("fail_open=2", "fail_open: '2' is not hash, yes or no"),
    ("hash_seed=0x123456789", "hash_seed: '0x123456789' is not a 32-bit hex number"),
    ("hash_seed=4294967296", "hash_seed: '4294967296' is out of range 0..4294967295"),
    ("hash_seed=-1", "hash_seed: '-1' is not a whole number"),
    ("gso=", "gso: empty value"),
    ("VIP4net=24 weight=1", "VIP4net: takes no options, got 'weight=1'"),
])
def test_invalid_value(line: str, message: str) -> None:
    p = only_error(V4 + V6 + line + "\n")
    assert p.line == 5
    assert p.severity == "error"
    assert message in p.message, p.message
    assert p.message.startswith(line.partition("=")[0].partition(" ")[0] + ": ")


def test_invalid_vip6() -> None:
    p = only_error("VIP6=2001:db8:1:::1\nserver6=2001:db8:2::1\n")
    assert (p.line, p.message) == (1, "VIP6: '2001:db8:1:::1' is not a valid IPv6 address")


def test_long_values_are_shortened_in_messages() -> None:
    p = only_error(V4 + "port_alive=" + "9" * 5000 + "\n")
    assert p.message == f"port_alive: '{'9' * 57}'... is out of range 1..65535"


def test_problem_text_names_file_line_and_value() -> None:
    text = "VIP4=198.18.0.10\n\n\n\n\n\nserver4=198.19.0.300\nserver4=198.19.0.1\n"
    assert errors(text) == [
        "t.conf:7: error: server4: '198.19.0.300' is not a valid IPv4 address"]


# --------------------------------------------------------------------------
# Several problems, duplicates, cross-line checks


def test_all_errors_are_reported_together_in_line_order() -> None:
    text = "\n".join([
        "#!/bin/sh",                 # 1
        "VIP4=198.18.0.300",         # 2
        "iptables -F",               # 3
        "server4=198.19.0.1",        # 4
        "server4=198.19.0.x",        # 5
        "port_alive=0",              # 6
        "strategy=fastest",          # 7
        "FOO=1",                     # 8
        "nfq_len=abc",               # 9
    ]) + "\n"
    ps = problems(text)
    assert [(p.line, p.severity) for p in ps] == [
        (2, "error"), (5, "error"), (6, "error"), (7, "error"), (8, "warning"),
        (9, "error")]
    # A bad VIP4 line still counts as "VIP4 given": no follow-on errors.
    assert not any("not set" in p.message or "nothing to balance" in p.message for p in ps)


def test_error_carries_problems_and_message() -> None:
    with pytest.raises(ConfigError) as info:
        parse("VIP4=x\nserver4=y\n")
    assert str(info.value) == "\n".join(str(p) for p in info.value.problems)
    assert len(info.value.problems) == 2


@pytest.mark.parametrize("key_line", [
    "strategy=lc", "port_alive=81", "public_NIC=eth9", "failover",
    "failover=no", "client_timeout=9", "gso=no",
])
def test_single_valued_key_set_twice(key_line: str) -> None:
    first = key_line.replace("=no", "=yes").replace("81", "80").replace("11", "10")
    first = first.replace("lc", "rr").replace("eth9", "eth0").replace("=9", "=10")
    key = key_line.split("=")[0]
    p = only_error(V4 + first + "\n" + key_line + "\n")
    assert (p.line, p.message) == (4, f"{key} set twice, first on line 3")


def test_vip_set_twice_message() -> None:
    p = only_error("VIP4=198.18.0.10\nserver4=198.19.0.1\nVIP4=198.18.0.10\n")
    assert str(p) == "t.conf:3: error: VIP4 set twice, first on line 1"


def test_private_gw_once_per_family() -> None:
    c = parse(V4 + V6 + "private_GW=198.19.0.254/24\nprivate_GW=2001:db8:2::fffe\n")
    assert c.private_gw4 == IPv4Address("198.19.0.254")
    assert c.private_gw6 == IPv6Address("2001:db8:2::fffe")
    p = only_error(V4 + "private_GW=198.19.0.254\nprivate_GW=198.19.0.253\n")
    assert p.line == 4 and "IPv4 address set twice, first on line 3" in p.message


def test_nameservers_repeat_and_duplicate_warns() -> None:
    c = parse(V4 + "NS=198.18.0.53\nNS=2001:db8:1::53\nNS=198.18.0.54\nNS=198.18.0.53\n")
    assert c.nameservers == (IPv4Address("198.18.0.53"), IPv6Address("2001:db8:1::53"),
                             IPv4Address("198.18.0.54"))
    assert [str(w) for w in c.warnings] == [
        "t.conf:6: warning: NS: 198.18.0.53 listed twice, first on line 3"]


def test_vip_equal_to_backend() -> None:
    p = only_error("VIP4=198.18.0.10\nserver4=198.19.0.1\nserver4=198.18.0.10\n")
    assert (p.line, p.message) == (3, "server4: 198.18.0.10 is VIP4 itself (line 1)")
    p = only_error("VIP6=2001:db8::1\nserver6=2001:db8:0::1\n")
    assert p.line == 2 and "is VIP6 itself" in p.message


def test_duplicate_backend_names_both_lines() -> None:
    p = only_error("VIP4=198.18.0.10\nserver4=198.19.0.1\nserver4=198.19.0.2\n"
                   "server4=198.19.0.1 weight=5\n")
    assert (p.line, p.message) == (4, "server4: 198.19.0.1 listed twice, first on line 2")
    # Same address, different spelling.
    p = only_error(V6 + "server6=2001:0db8:0002:0000::0001\n")
    assert p.line == 3 and "listed twice, first on line 2" in p.message


def test_backend_without_its_vip() -> None:
    p = only_error(V4 + "server6=2001:db8:2::1\nserver6=2001:db8:2::2\n")
    assert (p.line, p.message) == (3, "server6 given but VIP6 is not set")


def test_vip_without_backends() -> None:
    p = only_error(V4 + "VIP6=2001:db8:1::10\n")
    assert (p.line, p.message) == (3, "VIP6 2001:db8:1::10 has no backends: add server6 lines")


def test_vip_whose_backends_are_all_invalid_reports_only_those() -> None:
    assert errors("VIP4=198.18.0.10\nserver4=bad\n") == [
        "t.conf:2: error: server4: 'bad' is not a valid IPv4 address"]


def test_no_vip_at_all() -> None:
    p = only_error("#!/bin/sh\nstrategy=rr\n")
    assert str(p) == "t.conf: error: no VIP4 or VIP6 set: nothing to balance"
    assert p.line == 0


def test_empty_file() -> None:
    assert errors("") == ["t.conf: error: no VIP4 or VIP6 set: nothing to balance"]


def test_backend_outside_rip_warns() -> None:
    c = parse(V4 + "RIP4=198.19.1.0/24\nserver4=198.19.1.7\n")
    assert [str(w) for w in c.warnings] == [
        "t.conf:2: warning: server4: 198.19.0.1 is outside RIP4 198.19.1.0/24"]
    c = parse(V6 + "RIP6=2001:db8:3::/64\n")
    assert "server6: 2001:db8:2::1 is outside RIP6 2001:db8:3::/64" in c.warnings[0].message


def test_private_gw_checks() -> None:
    (w,) = parse(V4 + "RIP4=198.19.0.0/24\nprivate_GW=198.20.0.254/24\n").warnings
    assert (w.line, w.message) == (4, "private_GW: 198.20.0.254 is outside RIP4 198.19.0.0/24")
    p = only_error(V4 + "private_GW=198.19.0.1/24\n")
    assert (p.line, p.message) == (3, "private_GW: 198.19.0.1 is also a backend (line 2)")
    p = only_error(V4 + "private_GW=198.18.0.10\n")
    assert (p.line, p.message) == (3, "private_GW: 198.18.0.10 is also VIP4 (line 1)")


def test_broadcast_outside_rip_warns() -> None:
    (w,) = parse(V4 + "RIP4=198.19.0.0/24\nbroadcast=198.18.0.255\n").warnings
    assert w.line == 4 and "outside RIP4" in w.message
    assert parse(V4 + "RIP4=198.19.0.0/24\nbroadcast=255.255.255.255\n").warnings == ()


def test_prefix_without_vip_warns() -> None:
    (w,) = parse(V4 + "VIP6net=64\n").warnings
    assert (w.line, w.message) == (3, "VIP6net is set but VIP6 is not")


def test_cores() -> None:
    c = parse(V4 + "FIRST_CORE=1\nLAST_CORE=3\n")
    assert (c.first_core, c.last_core) == (1, 3)
    p = only_error(V4 + "FIRST_CORE=4\nLAST_CORE=3\n")
    assert (p.line, p.message) == (4, "FIRST_CORE 4 is greater than LAST_CORE 3")
    # LAST_CORE defaults to 0, so FIRST_CORE alone must be 0.
    p = only_error(V4 + "FIRST_CORE=2\n")
    assert (p.line, p.message) == (3, "FIRST_CORE 2 is greater than LAST_CORE 0")


# --------------------------------------------------------------------------
# Extensions


def test_backend_options() -> None:
    c = parse("VIP4=198.18.0.10\nserver4=198.19.0.1 weight=3 state=drain\n"
              "server4=198.19.0.2 state=down\nserver4=198.19.0.3 weight=0\n"
              "server4=198.19.0.4 state=draining weight=65535 # comment\n"
              "server4=198.19.0.5 state=up\n")
    assert [(b.weight, b.state, b.line) for b in c.servers4] == [
        (3, State.DRAINING, 2), (1, State.DOWN, 3), (0, State.UP, 4),
        (65535, State.DRAINING, 5), (1, State.UP, 6)]


@pytest.mark.parametrize(("options", "message"), [
    ("weight=65536", "server4: weight: '65536' is out of range 0..65535"),
    ("weight=-1", "server4: weight: '-1' is not a whole number"),
    ("weight=", "server4: weight: '' is not a whole number"),
    ("state=sleeping", "server4: state: 'sleeping' is not a state (known: up, down, drain"),
    ("state=UP", "server4: state: 'UP' is not a state"),
    ("color=red", "server4: unknown option 'color=red' (known: check, state, weight)"),
    ("check=smtp", "server4: check: 'smtp' is not a check (known: http, https, icmp"),
    ("weight=1 weight=2", "server4: option 'weight' given twice"),
    ("heavy", "server4: unexpected word 'heavy' (options are written name=value)"),
    ("=3", "server4: unexpected word '=3'"),
])
def test_backend_option_errors(options: str, message: str) -> None:
    p = only_error(f"VIP4=198.18.0.10\nserver4=198.19.0.9\nserver4=198.19.0.1 {options}\n")
    assert p.line == 3 and p.message.startswith(message), p.message


def test_backend_with_bad_address_and_bad_option_reports_both() -> None:
    assert errors("VIP4=198.18.0.10\nserver4=198.19.0.9\nserver4=x weight=z\n") == [
        "t.conf:3: error: server4: 'x' is not a valid IPv4 address",
        "t.conf:3: error: server4: weight: 'z' is not a whole number",
    ]


def test_strategies_constant() -> None:
    assert frozenset({"rr", "weighted", "wrr", "lc", "sh", "maglev"}) == STRATEGIES


@pytest.mark.parametrize("size", [7, 251, 65537, 1000003])
def test_hash_table_size(size: int) -> None:
    c = parse(V4 + f"strategy=maglev table_size={size}\n")
    assert (c.strategy, c.hash_table_size) == ("maglev", size)


@pytest.mark.parametrize(("line", "message"), [
    ("strategy=maglev table_size=65536", "strategy: table_size: '65536' is not a prime"),
    ("strategy=maglev table_size=5", "strategy: table_size: '5' is out of range 7..1000003"),
    ("strategy=maglev table_size=1000033", "out of range 7..1000003"),
    ("strategy=maglev table_size=big", "strategy: table_size: 'big' is not a whole number"),
    ("strategy=maglev seed=1", "strategy: unknown option 'seed=1' for maglev"),
    ("strategy=rr table_size=7", "strategy: rr takes no option 'table_size=7' (only sh and maglev"),
    ("strategy=lc foo=1", "strategy: lc takes no option 'foo=1'"),
])
def test_strategy_option_errors(line: str, message: str) -> None:
    p = only_error(V4 + line + "\n")
    assert p.line == 3 and message in p.message, p.message


# --------------------------------------------------------------------------
# Health checks and failover

F4 = V4 + "failover\n"
F46 = ("VIP4=198.18.0.10\nserver4=198.19.0.1\nVIP6=2001:db8:1::10\n"
       "server6=2001:db8:2::1\nfailover\n")


def test_health_defaults() -> None:
    c = parse(F4)
    assert (c.check, c.check_port, c.check_interval, c.check_timeout) == ("tcp", 80, 2.0, 1.0)
    assert (c.rise, c.fall) == (2, 3)
    assert (c.http_path, c.http_status, c.udp_payload) == ("/", 200, b"")
    assert (c.hotplug, c.on_backend_down, c.no_backend) == (False, "cut", "refuse")
    assert c.servers4[0].check is None
    assert c.warnings == ()
    # The dataclass's own defaults agree with the parser's.
    d = Config(path="x")
    assert (d.check, d.check_port, d.check_interval, d.check_timeout, d.rise, d.fall,
            d.http_path, d.http_status, d.udp_payload, d.hotplug, d.on_backend_down,
            d.no_backend) == ("tcp", 80, 2.0, 1.0, 2, 3, "/", 200, b"", False, "cut",
                              "refuse")


def test_check_port_defaults_to_port_alive() -> None:
    assert parse(F4 + "port_alive=8080\n").check_port == 8080
    assert parse(F4 + "port_alive=8080\ncheck_port=9000\n").check_port == 9000
    assert parse(F4 + "check_port=9000\n").port_alive == 80


@pytest.mark.parametrize(("line", "field", "expected"), [
    ("check=icmp", "check", "icmp"),
    ("check=tcp", "check", "tcp"),
    ("check=http", "check", "http"),
    ("check=https", "check", "https"),
    ("check=udp", "check", "udp"),
    ("check=none", "check", "none"),
    ("check_port=1", "check_port", 1),
    ("check_port=65535", "check_port", 65535),
    ("check_interval=0.1", "check_interval", 0.1),
    ("check_interval=3600", "check_interval", 3600.0),
    ("check_timeout=0.25", "check_timeout", 0.25),
    ("check_timeout=2", "check_timeout", 2.0),
    ("rise=1", "rise", 1),
    ("rise=100", "rise", 100),
    ("fall=1", "fall", 1),
    ("fall=100", "fall", 100),
    ("http_path='/healthz?full=1&x=%20'", "http_path", "/healthz?full=1&x=%20"),
    ("http_status=100", "http_status", 100),
    ("http_status=599", "http_status", 599),
    ("udp_payload=ping", "udp_payload", b"ping"),
    ("udp_payload='hello world'", "udp_payload", b"hello world"),
    ("udp_payload=hex:00ff10", "udp_payload", b"\x00\xff\x10"),
    ("udp_payload=hex:ABcd", "udp_payload", b"\xab\xcd"),
    ("hotplug=no", "hotplug", False),
    ("on_backend_down=cut", "on_backend_down", "cut"),
    ("on_backend_down=keep", "on_backend_down", "keep"),
    ("no_backend=refuse", "no_backend", "refuse"),
    ("no_backend=drop", "no_backend", "drop"),
])
def test_valid_health_value(line: str, field: str, expected: object) -> None:
    c = parse(F4 + line + "\n")
    assert getattr(c, field) == expected
    assert c.warnings == ()


@pytest.mark.parametrize(("line", "message"), [
    ("check=ping", "check: 'ping' is not a check (known: http, https, icmp, none, tcp, udp)"),
    ("check=TCP", "check: 'TCP' is not a check"),
    ("check_port=0", "check_port: '0' is out of range 1..65535"),
    ("check_port=65536", "check_port: '65536' is out of range 1..65535"),
    ("check_interval=0", "check_interval: '0' is out of range 0 < s <= 3600"),
    ("check_interval=3601", "check_interval: '3601' is out of range"),
    ("check_interval=-1", "check_interval: '-1' is not a number of seconds"),
    ("check_timeout=0", "check_timeout: '0' is out of range 0 < s"),
    ("check_timeout=2.5", "check_timeout 2.5 is longer than check_interval 2"),
    ("rise=0", "rise: '0' is out of range 1..100"),
    ("rise=101", "rise: '101' is out of range 1..100"),
    ("fall=0", "fall: '0' is out of range 1..100"),
    ("fall=1000", "fall: '1000' is out of range 1..100"),
    ("http_path=health", "http_path: 'health' does not start with '/'"),
    ("http_path='/a b'", "http_path: '/a b' holds a blank"),
    ("http_path=/é", "http_path: '/é' holds a blank, a control or a non-ASCII"),
    ("http_path=/" + "a" * 1024, "is longer than 1024 bytes"),
    ("http_status=99", "http_status: '99' is out of range 100..599"),
    ("http_status=600", "http_status: '600' is out of range 100..599"),
    ("udp_payload=hex:", "udp_payload: 'hex:': after 'hex:' an even number of hex digits"),
    ("udp_payload=hex:abc", "udp_payload: 'hex:abc': after 'hex:'"),
    ("udp_payload=hex:zz", "udp_payload: 'hex:zz': after 'hex:'"),
    ("udp_payload=" + "x" * 1025, "is longer than 1024 bytes"),
    ("hotplug=maybe", "hotplug: 'maybe' is not yes or no"),
    ("on_backend_down=drop", "on_backend_down: 'drop' is not a on_backend_down value "
                             "(known: cut, keep)"),
    ("no_backend=reset", "no_backend: 'reset' is not a no_backend value (known: drop, refuse)"),
    ("rise=2 fall=3", "rise: takes no options"),
])
def test_invalid_health_value(line: str, message: str) -> None:
    p = only_error(F4 + line + "\n")
    assert message in p.message, p.message


def test_check_timeout_may_equal_the_interval() -> None:
    c = parse(F4 + "check_interval=0.5\ncheck_timeout=0.5\n")
    assert (c.check_interval, c.check_timeout) == (0.5, 0.5)


def test_short_interval_shortens_the_default_timeout() -> None:
    # Not an error: the operator set only the interval.
    c = parse(F4 + "check_interval=0.4\n")
    assert (c.check_interval, c.check_timeout) == (0.4, 0.4)
    assert parse(F4 + "check_interval=5\n").check_timeout == 1.0


def test_check_timeout_above_interval_names_the_timeout_line() -> None:
    p = only_error(F4 + "check_timeout=3\ncheck_interval=2.5\n")
    assert p.line == 4
    assert p.message.startswith("check_timeout 3 is longer than check_interval 2.5")


@pytest.mark.parametrize("key_line", ["check=tcp", "rise=2", "hotplug=no", "no_backend=drop"])
def test_health_key_set_twice(key_line: str) -> None:
    p = only_error(F4 + f"{key_line}\n{key_line}\n")
    assert p.line == 5 and "set twice, first on line 4" in p.message


def test_per_backend_check() -> None:
    c = parse("VIP4=198.18.0.10\nserver4=198.19.0.1 weight=3 check=http\n"
              "server4=198.19.0.2\nserver4=198.19.0.3 check=none state=drain\nfailover\n")
    assert [(b.ip, b.weight, b.check) for b in c.servers4] == [
        (IPv4Address("198.19.0.1"), 3, "http"), (IPv4Address("198.19.0.2"), 1, None),
        (IPv4Address("198.19.0.3"), 1, "none")]
    assert c.servers4[2].state is State.DRAINING
    assert c.warnings == ()


def test_health_keys_without_failover_warn_once() -> None:
    c = parse(V4 + "rise=3\ncheck=http\nserver4=198.19.0.2 check=icmp\n")
    assert [str(w) for w in c.warnings] == [
        "t.conf:3: warning: check, rise, check= on server lines: no effect without "
        "failover (add a line 'failover')"]
    # Values are still read and checked.
    assert (c.rise, c.check, c.servers4[1].check) == (3, "http", "icmp")
    assert only_error(V4 + "rise=0\n").line == 3


def test_original_failover_keys_without_failover_do_not_warn() -> None:
    c = parse(V4 + "port_alive=8080\ncheck_cycle=10\nbroadcast=198.19.0.255\n")
    assert c.warnings == ()


@pytest.mark.parametrize("form", ["failover\n", "failover=yes\n", "failover=on\n"])
def test_failover_forms_silence_the_warning(form: str) -> None:
    assert parse(V4 + form + "check=icmp\n").warnings == ()


def test_hotplug_needs_rip_of_each_family_and_private_nic_for_ipv6() -> None:
    assert errors(F46 + "hotplug=yes\n") == [
        "t.conf:6: error: hotplug=yes needs RIP4: only hosts inside the real-server "
        "network are added",
        "t.conf:6: error: hotplug=yes needs RIP6: only hosts inside the real-server "
        "network are added",
        "t.conf:6: error: hotplug=yes needs private_NIC: IPv6 discovery pings all "
        "nodes on that link",
    ]
    c = parse(F46 + "hotplug=yes\nRIP4=198.19.0.0/24\nRIP6=2001:db8:2::/64\n"
                    "private_NIC=eth1\n")
    assert c.hotplug is True and c.warnings == ()
    # One family, one network.
    assert parse(F4 + "hotplug=yes\nRIP4=198.19.0.0/24\n").hotplug is True


def test_hotplug_needs_a_check() -> None:
    p = only_error(F4 + "RIP4=198.19.0.0/24\nhotplug=yes\ncheck=none\n")
    assert p.line == 5 and "check=none" in p.message


def test_hotplug_without_failover_only_warns() -> None:
    c = parse(V4 + "hotplug=yes\n")
    assert c.hotplug is True
    assert [w.message for w in c.warnings] == [
        "hotplug: no effect without failover (add a line 'failover')"]


def test_health_settings_survive_restrict() -> None:
    c = parse(F46 + "check=http\nrise=5\nserver6=2001:db8:2::2 check=icmp\n")
    r = c.restrict(6)
    assert (r.check, r.rise) == ("http", 5)
    assert [b.check for b in r.servers6] == [None, "icmp"]


def test_health_config_is_valid_shell() -> None:
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no sh")
    text = (F4 + "server4=198.19.0.2 weight=2 check=http\ncheck=https\n"
                 "udp_payload='hello world'\nhttp_path=/health?a=1\nrise=3 \n"
                 'echo "$check $udp_payload $http_path $rise $weight"\n')
    out = subprocess.run([sh, "-c", text], capture_output=True, text=True, check=True)
    assert out.stdout == "https hello world /health?a=1 3 2\n"
    c = parse(text)
    assert (c.check, c.udp_payload, c.http_path, c.rise) == ("https", b"hello world",
                                                             "/health?a=1", 3)


# --------------------------------------------------------------------------
# restrict()


def test_restrict() -> None:
    c = parse(V4 + V6 + "VIP4net=24\nVIP6net=64\nRIP4=198.19.0.0/24\nRIP6=2001:db8:2::/64\n"
              "private_GW=198.19.0.254\nprivate_GW=2001:db8:2::fffe\n"
              "NS=198.18.0.53\nNS=2001:db8:1::53\nbroadcast=198.19.0.255\nFOO=1\n")
    four = c.restrict(4)
    assert four.families() == (4,)
    assert (four.vip4, four.vip4_prefix, four.rip4, four.private_gw4, four.broadcast) == (
        c.vip4, 24, c.rip4, c.private_gw4, c.broadcast)
    assert (four.vip6, four.vip6_prefix, four.servers6, four.rip6, four.private_gw6) == (
        None, None, (), None, None)
    assert four.servers4 == c.servers4
    assert four.nameservers == (IPv4Address("198.18.0.53"),)
    assert four.warnings == c.warnings
    six = c.restrict(6)
    assert six.families() == (6,)
    assert (six.vip4, six.servers4, six.rip4, six.private_gw4, six.broadcast) == (
        None, (), None, None, None)
    assert six.servers6 == c.servers6 and six.vip6_prefix == 64
    assert six.nameservers == (IPv6Address("2001:db8:1::53"),)
    assert c.families() == (4, 6)  # the original is untouched


def test_restrict_to_a_family_without_vip() -> None:
    with pytest.raises(ConfigError) as info:
        parse(V4).restrict(6)
    (p,) = info.value.problems
    assert str(p) == "t.conf: error: -6: the configuration has no VIP6"
    with pytest.raises(ValueError):
        parse(V4).restrict(5)


# --------------------------------------------------------------------------
# Files


@pytest.mark.parametrize(("name", "families"), [
    ("loaded.conf", (4,)), ("loaded.conf6", (6,)), ("loaded-dual.conf", (4, 6)),
])
def test_example_files_parse_cleanly(name: str, families: tuple[int, ...]) -> None:
    path = EXAMPLES / name
    c = load_config(path)
    assert c.path == str(path)
    assert c.families() == families
    assert c.warnings == ()
    for f in families:
        assert c.restrict(f).families() == (f,)


def test_original_format_examples_use_no_extensions() -> None:
    for name in ("loaded.conf", "loaded.conf6"):
        c = load_config(EXAMPLES / name)
        assert c.strategy == "rr"
        assert all(b.weight == 1 and b.state is State.UP for b in c.servers4 + c.servers6)
        text = (EXAMPLES / name).read_text()
        for word in ("weight=", "state=", "table_size=", "client_", "datapath", "fail_open",
                     "gso="):
            assert word not in text


def test_dual_example_shows_the_extensions() -> None:
    c = load_config(EXAMPLES / "loaded-dual.conf")
    assert c.strategy == "maglev" and c.failover
    assert {b.state for b in c.servers4} == {State.UP, State.DRAINING, State.DOWN}
    assert any(b.weight != 1 for b in c.servers4)
    assert c.private_gw4 is not None and c.private_gw6 is not None


@pytest.mark.skipif(shutil.which("sh") is None, reason="no sh")
@pytest.mark.parametrize("name", ["loaded.conf", "loaded.conf6", "loaded-dual.conf"])
def test_example_files_are_valid_shell(name: str) -> None:
    subprocess.run(["sh", "-n", str(EXAMPLES / name)], check=True, timeout=10)


@pytest.mark.skipif(shutil.which("sh") is None, reason="no sh")
@pytest.mark.parametrize("value", [
    "eth0", '"eth 0"'.replace(" ", ""), "'eth1'", 'e"th"2', "eth\\#3", "eth#4",
    'eth5  # comment', "'et''h6'", '"e\\"t\\\\h7"', "eth\\$8", "'a$b'",
])
def test_values_read_as_sh_reads_them(value: str) -> None:
    out = subprocess.run(["sh", "-c", f"public_NIC={value}\nprintf %s \"$public_NIC\""],
                         capture_output=True, text=True, check=True, timeout=10).stdout
    c = parse(V4 + f"public_NIC={value}\n")
    assert c.public_nic == out


def test_load_config_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.conf"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    (p,) = info.value.problems
    assert (p.file, p.line) == (str(missing), 0)
    assert p.message.startswith("cannot read: ")


def test_load_config_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.problems[0].message.startswith("cannot read: ")


def test_load_config_bad_utf8(tmp_path: Path) -> None:
    f = tmp_path / "bad.conf"
    f.write_bytes(b"VIP4=198.18.0.10\n# caf\xe9\nserver4=198.19.0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(f))
    (p,) = info.value.problems
    assert (p.line, p.message) == (2, "not valid UTF-8 (byte 0xe9)")


def test_load_config_reads_and_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "x.conf"
    f.write_text(V4 + "server4=nope\n")
    with pytest.raises(ConfigError) as info:
        load_config(f)
    assert str(info.value) == f"{f}:3: error: server4: 'nope' is not a valid IPv4 address"


# --------------------------------------------------------------------------
# Arbitrary input


_KEY_LINES = st.builds(
    lambda indent, key, value: f"{indent}{key}={value}",
    st.sampled_from(["", " ", "\t"]),
    st.sampled_from([*sorted(KEYS), "FOO", "failover"]),
    st.text(alphabet=st.sampled_from(list("0123456789abcdef.:/ \t#'\"$\\;=%-wstupx")),
            max_size=30),
)
_LINES = st.lists(st.one_of(st.text(max_size=40), _KEY_LINES), max_size=12)


@settings(max_examples=300, deadline=None)
@given(_LINES)
def test_arbitrary_text_gives_config_or_config_error(lines: list[str]) -> None:
    text = "\n".join(lines)
    try:
        c = parse(text)
    except ConfigError as e:
        assert any(p.severity == "error" for p in e.problems)
        n = text.count("\n") + 1
        assert all(0 <= p.line <= n and p.file == "t.conf" for p in e.problems)
    else:
        assert c.families()
        assert all(p.severity == "warning" for p in c.warnings)


# --------------------------------------------------------------------------
# Operating: control socket, status server, saved client tables


def test_operating_keys_defaults() -> None:
    c = parse(V4)
    assert c.control_socket is None and c.control_group is None
    assert c.status_listen == ("127.0.0.1", 9180)
    assert c.persist_clients and c.persist_max_age == 600.0 and c.persist_file is None


@pytest.mark.parametrize("line,field,value", [
    ("status_listen=[2001:db8::1]:9300", "status_listen", ("2001:db8::1", 9300)),
    ("status_listen=198.18.0.1:0", "status_listen", ("198.18.0.1", 0)),
    ("status_listen=off", "status_listen", None),
    ("control_socket=/run/x.sock", "control_socket", "/run/x.sock"),
    ("control_group=loaded-ops", "control_group", "loaded-ops"),
    ("control_group=1001", "control_group", "1001"),
    ("persist_clients=no", "persist_clients", False),
    ("persist_max_age=30", "persist_max_age", 30.0),
    ("persist_file=/var/tmp/t.json", "persist_file", "/var/tmp/t.json"),
])
def test_operating_keys(line: str, field: str, value: object) -> None:
    assert getattr(parse(V4 + line + "\n"), field) == value


@pytest.mark.parametrize("line,reason", [
    ("status_listen=localhost:9180", "is not host:port"),
    ("status_listen=[::1]:70000", "out of range"),
    ("status_listen=[nope]:80", "is not host:port"),
    ("control_socket=run/x.sock", "not an absolute path"),
    ("control_group=a/b", "not a group"),
    ("persist_max_age=0", "out of range"),
    ("persist_file=x.json", "not an absolute path"),
])
def test_operating_keys_refused_with_line_and_reason(line: str, reason: str) -> None:
    p = only_error(V4 + line + "\n")
    assert p.line == V4.count("\n") + 1 and reason in p.message


@pytest.mark.parametrize("line,reason", [
    ("persist_file=/proc/self/mem", "under /proc, a kernel interface"),
    ("persist_file=/sys/kernel/x", "under /sys"),
    ("persist_file=//proc/self/mem", "under /proc"),
    ("persist_file=/var/../proc/1/environ", "under /proc"),
    ("control_socket=/dev/sda", "under /dev"),
    ("control_socket=/dev", "under /dev"),
    ("persist_file=/var/lib/loaded/", "names a directory"),
    ("persist_file=/", "names a directory"),
])
def test_daemon_files_never_in_kernel_trees(line: str, reason: str) -> None:
    p = only_error(V4 + line + "\n")
    assert p.line == V4.count("\n") + 1 and reason in p.message, p


def test_daemon_file_paths_are_normalised() -> None:
    assert parse(V4 + "persist_file=/var//lib/./loaded/x.json\n").persist_file == \
        "/var/lib/loaded/x.json"


def test_saved_tables_and_control_socket_cannot_share_a_path() -> None:
    p = only_error(V4 + "control_socket=/run/x\npersist_file=/run/x\n")
    assert p.line == 4 and "also the control_socket (line 3)" in p.message


@pytest.mark.parametrize("family,text,vip_line,rip_line", [
    (4, "VIP4=198.19.0.5\nRIP4=198.19.0.0/24\nserver4=198.19.0.11\n", 1, 2),
    (6, "RIP6=2001:db8:2::/64\nserver6=2001:db8:2::11\nVIP6=2001:db8:2::5\n", 3, 1),
])
def test_vip_inside_the_real_server_network_is_refused(family: int, text: str, vip_line: int,
                                                       rip_line: int) -> None:
    p = only_error(text)
    assert p.line == vip_line
    assert f"VIP{family}" in p.message and f"inside RIP{family}" in p.message
    assert f"(line {rip_line})" in p.message


def test_vip_outside_the_real_server_network_is_fine() -> None:
    parse("VIP4=198.18.0.5\nRIP4=198.19.0.0/24\nserver4=198.19.0.11\n")


@pytest.mark.parametrize("listen,warned", [
    ("0.0.0.0:9180", True), ("[::]:9180", True), ("198.18.0.1:9180", True),
    ("127.0.0.1:9180", False), ("[::1]:9180", False), ("127.0.0.2:80", False),
])
def test_status_server_beyond_loopback_warns(listen: str, warned: bool) -> None:
    found = [w for w in warnings(V4 + f"status_listen={listen}\n")
             if "no authentication" in w]
    assert bool(found) == warned, found
    if warned:
        assert found[0].startswith("t.conf:3: warning: status_listen:")


def test_line_of_names_the_line_of_a_key() -> None:
    c = parse(V4 + "\npersist_file=/var/tmp/t.json\n")
    assert c.line_of("persist_file") == 4 and c.line_of("control_socket") == 0


# --------------------------------------------------------------------------
# The table of keys: docs, defaults and parser agree with it

_BOOKKEEPING = {"path", "warnings", "key_lines"}


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int):
        return f"{value[0]}:{value[1]}"
    return str(value)


def _documented_keys() -> list[str]:
    """The keys the docstring's tables list, in order: a row starts ``name`` and two blanks."""
    return re.findall(r"^``(\w+)``  +\S", config_module.__doc__ or "", re.MULTILINE)


def test_every_key_is_documented_once_and_every_documented_key_is_in_the_table() -> None:
    documented = _documented_keys()
    assert sorted(documented) == sorted(KEYS)
    assert len(documented) == len(set(documented))
    assert "<keys:" not in (config_module.__doc__ or "")


def test_docs_give_the_range_choices_and_default_of_each_key() -> None:
    derived = {"check_port"}  # its default is port_alive's
    for key in KEY_TABLE:
        if isinstance(key.value, config_module._Int | config_module._Seconds):
            assert str(key.value) in key.doc, key.name
        if isinstance(key.value, config_module._Choice):
            for choice in key.value.choices:
                assert f"``{choice}``" in key.doc, (key.name, choice)
        for name, default in key.defaults.items():
            if default is None or default in ((), b"") or name in derived:
                continue
            assert _shown(default) in key.doc, (key.name, name, default)


def test_the_table_sets_every_config_field_once() -> None:
    set_by_keys = [f.name for k in KEY_TABLE for f in k.fields]
    assert len(set_by_keys) == len(set(set_by_keys))
    assert set(set_by_keys) | _BOOKKEEPING == {f.name for f in dataclasses.fields(Config)}
    assert {k.name for k in KEY_TABLE if k.repeat} == {"server4", "server6", "NS",
                                                       "private_GW"}


def test_config_defaults_are_the_parsers() -> None:
    # A file that sets only what it must gives Config's defaults everywhere else.
    for text, set_here in ((V4, {"vip4", "servers4"}), (V6, {"vip6", "servers6"})):
        c = parse(text)
        d = Config(path="t.conf")
        for f in dataclasses.fields(Config):
            if f.name not in set_here | _BOOKKEEPING:
                assert getattr(c, f.name) == getattr(d, f.name), f.name
    for key in KEY_TABLE:
        for name, default in key.defaults.items():
            assert getattr(Config(path="x"), name) == default


@pytest.mark.parametrize("key", [k for k in KEY_TABLE if k.value is not None],
                         ids=lambda k: k.name)
def test_a_key_read_by_its_row_takes_no_options(key: config_module.Key) -> None:
    assert f"t.conf:1: error: {key.name}: takes no options, got 'x=y'" in errors(
        f"{key.name}=1 x=y\n")


@pytest.mark.parametrize("key", [k for k in KEY_TABLE if not k.repeat], ids=lambda k: k.name)
def test_a_key_given_once_may_not_repeat(key: config_module.Key) -> None:
    errs = errors(f"{key.name}=@\n{key.name}=@\n")
    assert f"t.conf:2: error: {key.name} set twice, first on line 1" in errs
