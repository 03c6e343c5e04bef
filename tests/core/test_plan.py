"""The kernel set-up plan, derived from a config alone."""

from __future__ import annotations

import pytest

from loaded.core.config import parse_config
from loaded.core.firewall import MARK_BASE
from loaded.core.plan import Plan, PlanError, describe, instance_tag, make_plan

BASE = """
VIP4=198.18.1.100
VIP4net=24
VIP6=2001:db8:1::100
VIP6net=64
server4=198.19.0.11
server4=198.19.0.12
server6=2001:db8:2::11
RIP4=198.19.0.0/24
RIP6=2001:db8:2::/64
public_NIC=pub0
private_NIC=priv0
private_GW=198.19.0.1
private_GW=2001:db8:2::1
FIRST_CORE=0
LAST_CORE=1
NS=198.18.5.53
"""


def plan(extra: str = "", families: tuple[int, ...] = (4, 6), cpus: int = 2) -> Plan:
    if "datapath=" not in extra:
        extra += "datapath=perpacket\n"
    config = parse_config(BASE + extra, "t.conf")
    return make_plan(config, families, "abc123", cpus)


def test_addresses_routes_and_neighbours() -> None:
    p = plan()
    addrs = {(a.ifname, str(a.ip), a.prefix) for a in p.addresses}
    assert addrs == {("pub0", "198.18.1.100", 24), ("pub0", "2001:db8:1::100", 64),
                     ("priv0", "198.19.0.1", 24), ("priv0", "2001:db8:2::1", 64)}
    assert p.routes == ()  # the gateways' prefixes give the routes
    assert {str(n.ip) for n in p.neighbours} == {"198.19.0.11", "198.19.0.12", "2001:db8:2::11"}
    assert ("net/ipv4/ip_forward", "1") in {(s.key, s.value) for s in p.sysctls}
    assert ("net/ipv6/conf/all/forwarding", "1") in {(s.key, s.value) for s in p.sysctls}


def test_gateway_outside_real_server_net_gets_a_route() -> None:
    config = parse_config(BASE.replace("private_GW=198.19.0.1\n", ""), "t.conf")
    p = make_plan(config, (4,), "abc123", 2)
    assert [str(r.dst) for r in p.routes] == ["198.19.0.0/24"]


def test_workers_clamped_to_cores() -> None:
    config = parse_config(BASE.replace("LAST_CORE=1", "LAST_CORE=7"), "t.conf")
    p = make_plan(config, (4, 6), "abc123", 2)
    assert p.cores == (0, 1) and p.queues == (0, 1)
    p1 = plan(cpus=1)
    assert p1.cores == (0,)


def test_rules_hash_clients_to_workers_and_exclude_dns() -> None:
    p = plan(families=(4,))
    chains = {c.table: c for c in p.chains}
    assert set(chains) == {"raw", "mangle", "filter", "nat"}
    mangle = chains["mangle"]
    assert mangle.jump_match == ("-d", "198.18.1.100")
    hmark = [r for r in mangle.rules if "HMARK" in r]
    assert len(hmark) == 1 and "src,dst" in hmark[0]
    queues = [r for r in mangle.rules if "NFQUEUE" in r]
    *marked, unhashed = queues
    assert [r[r.index("--mark") + 1] for r in marked] == [str(MARK_BASE), str(MARK_BASE + 1)]
    assert [r[r.index("--queue-num") + 1] for r in queues] == ["0", "1", "0"]
    # what HMARK could not hash (no mark) still meets a worker: the last rule
    assert "--mark" not in unhashed and mangle.rules[-1] is unhashed
    assert all("--queue-bypass" not in r for r in queues)  # fail-closed by default
    forward = chains["filter"].rules
    assert forward[0][:2] == ("-d", "198.18.5.53") and forward[-1][-1] == "0:1"
    assert chains["nat"].rules[0][-1] == "MASQUERADE"


def test_fail_open_adds_bypass() -> None:
    p = plan("fail_open=yes\n", families=(4,))
    assert all("--queue-bypass" in r for c in p.chains for r in c.rules if "NFQUEUE" in r)


def test_ipv6_keeps_neighbour_discovery_local() -> None:
    p = plan(families=(6,))
    mangle = next(c for c in p.chains if c.table == "mangle")
    assert mangle.rules[0][-1] == "RETURN" and "neighbour-solicitation" in mangle.rules[0]
    assert all(c.family == 6 for c in p.chains)
    assert not any(c.table == "nat" for c in p.chains)  # the only NS is IPv4


def test_missing_interfaces_is_a_plan_error() -> None:
    config = parse_config(BASE.replace("public_NIC=pub0\n", ""), "t.conf")
    with pytest.raises(PlanError, match="public_NIC"):
        make_plan(config, (4,), "x", 2)


def test_describe_and_tag() -> None:
    lines = describe(plan())
    assert any(line.startswith("ip addr add 198.18.1.100/24 dev pub0") for line in lines)
    assert any("iptables -t mangle -I PREROUTING 1 -d 198.18.1.100 -j LOADED-IN-abc123" in line
               for line in lines)
    assert instance_tag("/etc/loaded.conf") == instance_tag("/etc/loaded.conf")
    assert instance_tag("/etc/a.conf") != instance_tag("/etc/b.conf")
    assert len(instance_tag("/x")) == 6 and int(instance_tag("/x"), 16) >= 0


def test_conntrack_path_queues_only_new_connections() -> None:
    p = plan("datapath=conntrack\n")
    assert p.datapath.name == "conntrack"
    tables = sorted((c.family, c.table) for c in p.chains)
    # no NOTRACK and no return-path queue: conntrack carries the flows
    assert tables == [(4, "mangle"), (4, "nat"), (6, "mangle")]
    for c in p.chains:
        if c.table == "mangle":
            assert c.jump_match[-4:] == ("-m", "conntrack", "--ctstate", "NEW")
            assert any("HMARK" in r for r in c.rules)


def _rules(p: Plan, chain: str) -> list[list[dict[str, object]]]:
    return [cmd["add"]["rule"]["expr"] for cmd in p.nft
            if "rule" in cmd.get("add", {}) and cmd["add"]["rule"]["chain"] == chain]


def test_conntrack_path_nft_table() -> None:
    p = plan("datapath=conntrack\nfail_open=no\n")
    assert p.hashing is None and not p.queue_bypass
    assert p.nft_table == "loaded_abc123"
    assert p.nft[0] == {"add": {"table": {"family": "inet", "name": "loaded_abc123"}}}
    chains = {cmd["add"]["chain"]["name"]: cmd["add"]["chain"] for cmd in p.nft
              if "chain" in cmd.get("add", {})}
    assert {n: (c["type"], c["hook"], c["prio"]) for n, c in chains.items()} == {
        # after conntrack (-200), before mangle: the one chain of every packet
        "recall": ("filter", "prerouting", -170),
        "steer": ("nat", "prerouting", -100),
        "tally": ("filter", "forward", 0)}
    steer = _rules(p, "steer")
    assert [r[0]["match"]["right"] for r in steer] == ["198.18.1.100", "2001:db8:1::100"]
    assert steer[0][1]["match"]["right"] == {"prefix": {"addr": 0x4C420000, "len": 17}}
    assert steer[1][1]["match"]["right"] == {"prefix": {"addr": 0x4C428000, "len": 17}}
    assert steer[1][3]["dnat"]["addr"]["map"]["data"] == "@backends6"
    recall = _rules(p, "recall")
    assert recall[0] == [{"match": {"op": "in", "left": {"ct": {"key": "state"}},
                                    "right": ["established", "related"]}}, {"accept": None}]
    guard = recall[1:]
    assert len(guard) == 2
    assert all(r[1]["match"]["right"] == "invalid" and r[-1] == {"drop": None} for r in guard)
    # every configured backend is in the maps, under its pool index
    elements = [cmd["add"]["element"] for cmd in p.nft if "element" in cmd.get("add", {})]
    assert [(e["name"], e["elem"][0]) for e in elements if e["name"] != "counters"] == [
        ("backends4", [0x4C420000, "198.19.0.11"]), ("backends4", [0x4C420001, "198.19.0.12"]),
        ("backends6", [0x4C428000, "2001:db8:2::11"])]
    assert "nftables table inet loaded_abc123" in "\n".join(describe(p))
    maps = {cmd["add"]["map"]["name"]: cmd["add"]["map"] for cmd in p.nft
            if "map" in cmd.get("add", {})}
    assert maps["clients4"]["type"] == "ipv4_addr" and maps["clients4"]["map"] == "mark"
    assert maps["clients6"]["flags"] == ["timeout"] and maps["clients6"]["size"] == 1_000_000
    # the recall rules, and the kernel learning every client from its mark at
    # the head of steer (before the DNAT), in nft's syntax (the map update has
    # no JSON form)
    assert p.nft_text == (
        "add rule inet loaded_abc123 recall ip daddr 198.18.1.100 ct state new ip saddr "
        "@clients4 meta mark set ip saddr map @clients4",
        "insert rule inet loaded_abc123 steer ip daddr 198.18.1.100 "
        "meta mark & 0xffff8000 == 0x4c420000 update @clients4 "
        "{ ip saddr timeout 300s : meta mark }",
        "add rule inet loaded_abc123 recall ip6 daddr 2001:db8:1::100 ct state new ip6 saddr "
        "@clients6 meta mark set ip6 saddr map @clients6",
        "insert rule inet loaded_abc123 steer ip6 daddr 2001:db8:1::100 "
        "meta mark & 0xffff8000 == 0x4c428000 update @clients6 "
        "{ ip6 saddr timeout 300s : meta mark }")
    # a recalled client's packet is not queued
    mangle = next(c for c in p.chains if c.table == "mangle" and c.family == 6)
    assert mangle.rules[0] == ("-m", "mark", "--mark", "0x4c428000/0xffff8000", "-j", "RETURN")


_HASH4 = ("ip daddr 198.18.1.100 ct state new meta l4proto { tcp, udp } "
          "meta mark & 0xffff8000 != 0x4c420000 counter name hashed "
          "meta mark set jhash ip saddr mod 65537 seed 0x4c4f4144 "
          "meta mark set meta mark map @hash4")


def test_hash_strategies_let_the_kernel_decide() -> None:
    for strategy in ("sh", "maglev"):
        p = plan(f"datapath=conntrack\nstrategy={strategy}\n")
        assert p.hashing is not None and p.hashing.decides and not p.hashing.fallback
        assert p.hashing.strategy == strategy and p.hashing.size == 65537
        # after the recall rule: a remembered client keeps its backend
        rules = [r for r in p.nft_text if " recall " in r]
        assert rules[0].endswith("meta mark set ip saddr map @clients4")
        assert rules[2] == f"add rule inet loaded_abc123 recall {_HASH4}"
        assert rules[3].startswith("add rule inet loaded_abc123 recall ip6 daddr "
                                   "2001:db8:1::100 ct state new")
        assert "jhash ip6 saddr mod 65537 seed 0x4c4f4144" in rules[3]
        maps = {cmd["add"]["map"]["name"]: cmd["add"]["map"] for cmd in p.nft
                if "map" in cmd.get("add", {})}
        assert maps["hash4"]["type"] == "mark" and maps["hash4"]["map"] == "mark"
        # the kernel decides TCP and UDP; what it cannot (ICMP) still reaches a
        # worker, and a full queue lets it through (fail_open=hash)
        assert p.queue_bypass


def test_fail_open_hash_falls_back_to_the_kernels_table_after_the_queue() -> None:
    p = plan("datapath=conntrack\nstrategy=wrr\nhash_seed=0x1234\n")
    assert p.hashing is not None and p.hashing.fallback and not p.hashing.decides
    assert p.hashing.strategy == "maglev" and p.hashing.seed == 0x1234
    chains = {cmd["add"]["chain"]["name"] for cmd in p.nft if "chain" in cmd.get("add", {})}
    assert chains == {"recall", "steer", "tally"}  # no chain more for every packet
    # inserted last at the head of steer (after the queue, first packets only),
    # so before the rules that learn the client and DNAT
    fallback = [r for r in p.nft_text if "jhash" in r]
    assert fallback[0] == "insert rule inet loaded_abc123 steer " + _HASH4.replace(
        "0x4c4f4144", "0x1234")
    assert p.nft_text.index(fallback[0]) > max(
        i for i, r in enumerate(p.nft_text) if "update @clients" in r)
    assert p.queue_bypass
    assert all("--queue-bypass" in r for c in p.chains if c.table == "mangle"
               for r in c.rules if "NFQUEUE" in r)
    # fail_open=no: nothing through, no table
    p = plan("datapath=conntrack\nfail_open=no\n")
    assert p.hashing is None and not p.queue_bypass
    p = plan("datapath=conntrack\nfail_open=yes\n")
    assert p.hashing is None and p.queue_bypass


def test_queue_length_by_data_path_unless_configured() -> None:
    assert plan("datapath=conntrack\n").queue_length == 256  # fail_open=hash: a bound
    assert plan("datapath=conntrack\nfail_open=no\n").queue_length == 4096
    assert plan("datapath=perpacket\nstrategy=maglev\n").queue_length == 4096
    assert plan("datapath=conntrack\nnfq_len=77\n").queue_length == 77


def test_per_packet_fallback_needs_a_hash_strategy() -> None:
    p = plan("datapath=perpacket\n")  # rr: a flow's packets must not hash elsewhere
    assert p.hashing is None and not p.queue_bypass and p.nft_text == ()
    p = plan("datapath=perpacket\nstrategy=maglev table_size=251\n")
    assert p.hashing is not None and p.hashing.fallback and p.hashing.size == 251
    assert p.queue_bypass
    # at the head of steer: not a fragment, no conntrack on this path
    assert p.nft_text[0] == (
        "insert rule inet loaded_abc123 steer ip daddr 198.18.1.100 ip frag-off & 0x3fff == 0 "
        "meta l4proto { tcp, udp } meta mark & 0xffff8000 != 0x4c420000 counter name hashed "
        "meta mark set jhash ip saddr mod 251 seed 0x4c4f4144 "
        "meta mark set meta mark map @hash4")
    assert "exthdr frag missing" in p.nft_text[1]


def test_hash_buckets_change_only_where_the_table_changed() -> None:
    from loaded.core.datapath import bucket_changes, nft_hash_buckets
    assert bucket_changes([1, 2, 0], None) == ([], [(0, 1), (1, 2)])
    assert bucket_changes([1, 3, 0, 2], [1, 2, 2, 0]) == ([1, 2], [(1, 3), (3, 2)])
    assert bucket_changes([1, 2], [1, 2]) == ([], [])
    cmds = nft_hash_buckets("t", 6, [5, 7, 0], [5, 5, 5])
    assert cmds == ["delete element inet loaded_t hash6 { 1, 2 }",
                    "add element inet loaded_t hash6 { 1 : 0x7 }"]
    assert nft_hash_buckets("t", 4, [0, 0], None) == []


def test_per_packet_plan_rewrites_in_the_kernel() -> None:
    p = plan("NS=198.18.5.53\n")
    assert p.datapath.name == "perpacket" and p.nft_text == ()
    chains = {cmd["add"]["chain"]["name"]: cmd["add"]["chain"] for cmd in p.nft
              if "chain" in cmd.get("add", {})}
    # steer after the mangle chain (-150) that queues; reply before iptables'
    # filter FORWARD (0), whose queue rule matches the backends' source: a
    # rewritten reply is no longer queued
    assert {n: (c["type"], c["hook"], c["prio"]) for n, c in chains.items()} == {
        "steer": ("filter", "prerouting", -140), "reply": ("filter", "forward", -10)}
    steer = _rules(p, "steer")
    assert [r[0]["match"]["right"] for r in steer] == ["198.18.1.100", "2001:db8:1::100"]
    assert steer[1][1]["match"]["right"] == {"prefix": {"addr": 0x4C428000, "len": 17}}
    assert steer[1][3]["mangle"]["value"]["map"]["data"] == "@backends6"
    maps = {cmd["add"]["map"]["name"]: cmd["add"]["map"] for cmd in p.nft
            if "map" in cmd.get("add", {})}
    assert maps["reply4"]["elem"] == [[{"prefix": {"addr": "198.19.0.0", "len": 24}},
                                       "198.18.1.100"]]
    assert maps["reply6"]["flags"] == ["interval"]
    assert maps["reply_counters6"]["map"] == "counter"
    rules = _rules(p, "reply")
    # DNS to the nameserver first, untouched; then per family: counted + rewritten
    # (backends), rewritten (other hosts of the net)
    assert rules[0][0]["match"]["right"] == {"set": ["198.18.5.53"]}
    assert rules[0][-1] == {"return": None}
    assert len(rules) == 5
    for r in rules[1:]:
        assert r[0]["match"]["right"] == {"set": ["tcp", "udp"]}
        assert "mangle" in r[-1]
    assert "counter" in rules[1][2] and "counter" not in str(rules[2])
    assert rules[1][1]["match"]["left"] == {"&": [
        {"payload": {"protocol": "ip", "field": "frag-off"}}, 0x3FFF]}
    assert rules[3][1]["match"]["left"] == {"exthdr": {"name": "frag"}}
    elements = [cmd["add"]["element"] for cmd in p.nft if "element" in cmd.get("add", {})]
    assert [(e["name"], e["elem"][0]) for e in elements] == [
        ("backends4", [0x4C420000, "198.19.0.11"]),
        ("reply_counters4", ["198.19.0.11", "backend_4c420000"]),
        ("backends4", [0x4C420001, "198.19.0.12"]),
        ("reply_counters4", ["198.19.0.12", "backend_4c420001"]),
        ("backends6", [0x4C428000, "2001:db8:2::11"]),
        ("reply_counters6", ["2001:db8:2::11", "backend_4c428000"])]
    assert not any(c.table == "filter" and "-s" not in c.jump_match for c in p.chains
                   if c.hook == "FORWARD")


def test_conntrack_is_the_default() -> None:
    assert make_plan(parse_config(BASE, "t.conf"), (4,), "abc123", 2).datapath.name == "conntrack"
