"""The control CLI: exact text from fixture answers, the requests it makes, its errors."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
from typing import Any

import pytest

from loaded.control.cli import (
    EXIT_FAILED,
    EXIT_USAGE,
    add_subcommands,
    ago,
    count,
    duration,
    format_backend,
    format_clients,
    format_lookup,
    format_preview,
    format_reload,
    format_status,
    parser,
    run,
    socket_of,
)
from loaded.control.protocol import CommandFailed, ControlError
from loaded.core.config import KEYS, parse_config
from loaded.core.plan import instance_tag
from loaded.core.reload import diff_configs
from loaded.core.status import KernelHashStatus, Status

from . import snapshots as snap

NOW = 1700093785.0

STATUS = snap.status(
    daemon_info=snap.daemon(pid=4242, tag="3fa2c1", config="/etc/loaded/loaded.conf",
                            uptime=93784.5, datapath="perpacket", started_at=1700000000.0),
    services=[
        snap.service("198.18.1.100", strategy="maglev", clients=1523, backends=[
            snap.backend("198.19.0.11", weight=3, transitions=1, mark=0x4C420000,
                         last_check=snap.check(True, "", 1700093780.0),
                         clients=1020, new_clients=2048, packets=1234567, bytes=987654321),
            snap.backend("198.19.0.12", state="draining", admin="drain", mark=0x4C420001,
                         last_check=snap.check(True, "HTTP 200", 1700093783.0),
                         clients=503, new_clients=700, packets=99999, bytes=100000),
            snap.backend("198.19.0.13", state="down", health="down", transitions=4,
                         mark=0x4C420002,
                         last_check=snap.check(False, "connect: connection refused",
                                               1700093600.0),
                         new_clients=12)]),
        snap.service("2001:db8:1::100", family=6, strategy="maglev", clients=1, backends=[
            snap.backend("2001:db8:2::11", health="unknown", mark=0x4C420000, clients=1,
                         new_clients=1, packets=10, bytes=1200)])],
    workers=[
        snap.worker(0, report=snap.report(pid=4243, packets=700000, dropped=3)),
        snap.worker(1, alive=False, restarts=2,
                    report=snap.report(pid=4250, packets=534577))],
    kernel_queues={1: snap.queue(), 0: snap.queue(waiting=2, queue_dropped=17, user_dropped=1)},
    endpoints={"metrics": "http://127.0.0.1:9100/metrics",
               "status": "http://127.0.0.1:9100/"},
)

STATUS_TEXT = """\
loaded 0.1.0, pid 4242, config /etc/loaded/loaded.conf (tag 3fa2c1), datapath perpacket, up 1d 02:03:04
endpoints: metrics http://127.0.0.1:9100/metrics, status http://127.0.0.1:9100/

VIP 198.18.1.100 (IPv4), strategy maglev, 1523 clients
  BACKEND         STATE     ADMIN    WEIGHT  CLIENTS   NEW  PACKETS  BYTES  HEALTH   LAST CHECK
  198.19.0.11     up        enabled       3     1020  2048     1.2M   988M  up       ok 5s ago
  198.19.0.12     draining  drain         1      503   700    99999   100K  up       ok 2s ago: HTTP 200
  198.19.0.13     down      enabled       1        0    12        0      0  down     failed 3m ago: connect: connection refused

VIP 2001:db8:1::100 (IPv6), strategy maglev, 1 client
  BACKEND         STATE     ADMIN    WEIGHT  CLIENTS   NEW  PACKETS  BYTES  HEALTH   LAST CHECK
  2001:db8:2::11  up        enabled       1        1     1       10   1200  unknown  -

WORKER  QUEUE   PID  STATE  RESTARTS  PACKETS  DROPPED
     0      0  4243  alive         0     700K        3
     1      1  4250  dead          2     535K        0

QUEUE  WAITING  QUEUE DROPPED  USER DROPPED
    0        2             17             1
    1        0              0             0
"""  # noqa: E501


class Fake:
    """A ``request`` callable that records what it was asked and answers from a table."""

    def __init__(self, answer: Any = None, error: Exception | None = None) -> None:
        self.answer = answer
        self.error = error
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, cmd: str, args: dict[str, Any]) -> Any:
        self.calls.append((cmd, args))
        if self.error is not None:
            raise self.error
        return self.answer


def cli(argv: list[str], fake: Fake) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run(parser().parse_args(argv), request=fake, out=out, err=err, now=NOW)
    return code, out.getvalue(), err.getvalue()


# --- status --------------------------------------------------------------------------


def test_status_text() -> None:
    assert format_status(STATUS, NOW) == STATUS_TEXT
    code, out, err = cli(["status", "--socket", "/x.sock"], Fake(STATUS.to_json()))
    assert (code, out, err) == (0, STATUS_TEXT, "")


def test_status_kernel_drops() -> None:
    status = dataclasses.replace(STATUS, kernel_drops={"conntrack-invalid": 1_234_567})
    assert format_status(status, NOW) == STATUS_TEXT + (
        "\n"
        "KERNEL DROP        PACKETS\n"
        "conntrack-invalid     1.2M\n")
    assert format_status(status, NOW, exact=True).endswith("conntrack-invalid  1234567\n")
    zero = format_status(dataclasses.replace(STATUS, kernel_drops={"conntrack-invalid": 0}),
                         NOW)
    assert zero.endswith("conntrack-invalid        0\n")  # counted, and none


def test_status_kernel_hash_table() -> None:
    table = KernelHashStatus("maglev", 65537, 0x4C4F4144, True, False, 2_500_000)
    status = dataclasses.replace(STATUS, kernel_hash=table)
    assert format_status(status, NOW) == STATUS_TEXT + (
        "\n"
        "kernel hash table: maglev, 65537 buckets, seed 0x4c4f4144, decides every new "
        "client (2.5M new connections hashed)\n")
    back = Status.from_json(status.to_json())
    assert back.kernel_hash == table


def test_status_exact_counters() -> None:
    text = format_status(STATUS, NOW, exact=True)
    assert "  198.19.0.11     up        enabled       3     1020  2048  1234567  987654321  " \
           "up       ok 5s ago\n" in text
    assert "     1      1  4250  dead          2   534577        0\n" in text
    assert cli(["status", "--exact"], Fake(STATUS.to_json())) == (0, text, "")


def test_status_json_is_the_answer_unchanged() -> None:
    answer = dict(STATUS.to_json(), newer_key={"a": 1})  # a newer daemon's: printed as sent
    fake = Fake(answer)
    code, out, _ = cli(["status", "--json"], fake)
    assert code == 0 and json.loads(out) == answer
    assert fake.calls == [("status", {})]
    assert Status.from_json(json.loads(out)) == STATUS  # and it decodes to the same snapshot


def test_status_without_services_backends_or_worker_reports() -> None:
    empty = snap.status(daemon_info=snap.daemon(uptime=59, tag="t", config="a.conf"))
    assert format_status(empty, 0) == (
        "loaded 0.1.0, pid 4242, config a.conf (tag t), datapath perpacket, up 0:59\n\n"
        "no services\n")
    bare = dataclasses.replace(empty, services=(snap.service("192.0.2.1", []),),
                               workers=(snap.worker(0),))
    assert format_status(bare, 0).endswith(
        "VIP 192.0.2.1 (IPv4), strategy rr, 0 clients\n  no backends\n\n"
        "WORKER  QUEUE  PID  STATE  RESTARTS  PACKETS  DROPPED\n"
        "     0      0    ?  alive         0        -        -\n")


@pytest.mark.parametrize("answer, where", [
    (None, "status: expected an object, got null"),
    ({"daemon": {}}, "status.daemon: 'pid' is missing"),
    ("services", "services[0].backends[0].packets: expected an integer, got str"),
    ("workers", "status.workers[0].latency.buckets[0]: expected [bound, count]"),
])
def test_a_malformed_status_answer_is_one_error(answer: Any, where: str) -> None:
    if answer == "services":
        answer = STATUS.to_json()
        answer["services"][0]["backends"][0]["packets"] = "oops"
    elif answer == "workers":
        answer = STATUS.to_json()
        answer["workers"][0]["latency"]["buckets"] = [["inf", 3]]
    for argv in (["status"], ["status", "--json"]):
        code, out, err = cli(argv, Fake(answer))
        assert (code, out) == (EXIT_FAILED, "")
        assert err.startswith("loaded status: the daemon's answer is not a status snapshot: ")
        assert where in err


def test_numbers_and_durations() -> None:
    assert [count(n) for n in (0, 99999, 100000, 123456, 1_234_567, 99_949_999, 99_950_000,
                               999_499_999, 999_500_000, 12_345_678_901, -150_000,
                               10**21)] == [
        "0", "99999", "100K", "123K", "1.2M", "99.9M", "100M", "999M", "1.0G", "12.3G",
        "-150K", "1000E"]
    assert count(None) == "-" and count(True) == "-" and count(123456, exact=True) == "123456"
    assert [duration(s) for s in (0, 59, 61, 3600, 86399, 86400 + 3723)] == [
        "0:00", "0:59", "1:01", "01:00:00", "23:59:59", "1d 01:02:03"]
    assert duration(None) == "-"
    assert [ago(s) for s in (-5, 0, 119, 120, 7199, 7200, 172799, 172800)] == [
        "0s", "0s", "119s", "2m", "119m", "2h", "47h", "2d"]


# --- backend -------------------------------------------------------------------------

PREVIEW_HASH: dict[str, Any] = {
    "action": "disable", "vip": "198.18.1.100", "address": "198.19.0.12", "dry_run": True,
    "command": {"op": "state", "vip": "198.18.1.100", "backend": "198.19.0.12",
                "state": "down", "cut": True},
    "strategy": "maglev", "clients": 1523, "moved": 503, "stay": 0, "rehashed": 2,
    "moves": [{"from": "198.19.0.12", "to": "198.19.0.11", "clients": 380},
              {"from": "198.19.0.12", "to": "198.19.0.13", "clients": 123}],
    "state_after": "down", "accepts_new_after": False}


def test_backend_dry_run_with_hashing() -> None:
    fake = Fake(PREVIEW_HASH)
    code, out, _ = cli(["backend", "disable", "198.19.0.12", "--dry-run"], fake)
    assert code == 0
    assert fake.calls == [("backend", {"action": "disable", "address": "198.19.0.12",
                                       "dry_run": True})]
    assert out == """\
dry run: disable 198.19.0.12 on 198.18.1.100 (strategy maglev); nothing was changed
  503 of 1523 clients would move:
    FROM             TO           CLIENTS
    198.19.0.12  ->  198.19.0.11      380
    198.19.0.12  ->  198.19.0.13      123
  198.19.0.12 would take no new clients (down)
  2 of the clients that stay would hash elsewhere: they move once their entry is gone (idle, worker restart)
"""  # noqa: E501


def test_backend_dry_run_remove_drain_weight() -> None:
    remove = dict(PREVIEW_HASH, action="remove", strategy="rr", rehashed=None,
                  moves=[{"from": "198.19.0.12", "to": None, "clients": 503}],
                  state_after=None)
    assert format_preview(remove) == """\
dry run: remove 198.19.0.12 on 198.18.1.100 (strategy rr); nothing was changed
  503 of 1523 clients would move:
    FROM             TO                                    CLIENTS
    198.19.0.12  ->  (balanced anew on their next packet)      503
  198.19.0.12 would leave the pool
"""
    drain = dict(PREVIEW_HASH, action="drain", strategy="rr", rehashed=None, moves=[],
                 moved=0, stay=503, state_after="draining")
    assert format_preview(drain) == """\
dry run: drain 198.19.0.12 on 198.18.1.100 (strategy rr); nothing was changed
  no client would move (1523 clients now)
  503 clients would stay with 198.19.0.12 until idle
  198.19.0.12 would take no new clients (draining)
"""
    weight0 = dict(drain, action="weight", state_after="up", stay=1, clients=1)
    assert format_preview(weight0) == """\
dry run: weight 198.19.0.12 on 198.18.1.100 (strategy rr); nothing was changed
  no client would move (1 client now)
  1 client would stay with 198.19.0.12 until idle
  198.19.0.12 would take no new clients (weight 0)
"""


def test_backend_applied() -> None:
    def result(action: str, before: Any, after: Any) -> dict[str, Any]:
        return {"action": action, "vip": "198.18.1.100", "address": "198.19.0.12",
                "dry_run": False, "command": {}, "before": before, "after": after}

    up, down = {"weight": 1, "state": "up"}, {"weight": 1, "state": "down"}
    assert format_backend(result("disable", up, down)) == (
        "disable 198.19.0.12 on 198.18.1.100: up -> down\n")
    assert format_backend(result("weight", up, {"weight": 5, "state": "up"})) == (
        "weight 198.19.0.12 on 198.18.1.100: weight 1 -> 5\n")
    assert format_backend(result("add", None, up)) == (
        "add 198.19.0.12 on 198.18.1.100: added (weight 1, up)\n")
    assert format_backend(result("remove", down, None)) == (
        "remove 198.19.0.12 on 198.18.1.100: removed (was weight 1, down)\n")
    assert format_backend(result("enable", up, up)) == (
        "enable 198.19.0.12 on 198.18.1.100: unchanged (weight 1, up)\n")
    fake = Fake(result("weight", up, {"weight": 0, "state": "up"}))
    code, out, _ = cli(["backend", "weight", "198.19.0.12", "--weight", "0", "--vip",
                        "198.18.1.100", "-c", "/etc/loaded.conf"], fake)
    assert (code, out) == (0, "weight 198.19.0.12 on 198.18.1.100: weight 1 -> 0\n")
    assert fake.calls == [("backend", {"action": "weight", "address": "198.19.0.12",
                                       "dry_run": False, "vip": "198.18.1.100",
                                       "weight": 0})]


@pytest.mark.parametrize("argv, message", [
    (["backend", "weight", "198.19.0.12"], "loaded backend: weight needs --weight N\n"),
    (["backend", "drain", "198.19.0.12", "--weight", "2"],
     "loaded backend: --weight does not go with drain\n"),
    (["clients", "list", "--limit", "0"], "loaded clients: --limit must be at least 1\n"),
])
def test_usage_errors_ask_nothing(argv: list[str], message: str) -> None:
    fake = Fake({})
    assert cli(argv, fake) == (EXIT_USAGE, "", message)
    assert fake.calls == []


def test_daemon_errors() -> None:
    code, out, err = cli(["backend", "drain", "198.19.0.99"],
                         Fake(error=CommandFailed("backend 198.19.0.99 is not in the pool")))
    assert (code, out) == (EXIT_FAILED, "")
    assert err == "loaded backend: the daemon says: backend 198.19.0.99 is not in the pool\n"
    code, out, err = cli(["status"], Fake(error=ControlError(
        "no control socket at /run/loaded/abc.sock: is the daemon running?")))
    assert (code, out) == (EXIT_FAILED, "")
    assert err == ("loaded status: no control socket at /run/loaded/abc.sock: is the daemon "
                   "running?\n")


# --- clients -------------------------------------------------------------------------


def test_clients_list() -> None:
    fake = Fake({"services": [
        {"vip": "198.18.1.100", "total": 1523,
         "clients": [["203.0.113.5", "198.19.0.11", 0.0], ["203.0.113.17", "198.19.0.12",
                                                           125.5]]},
        {"vip": "2001:db8:1::100", "total": 0, "clients": []}]})
    code, out, _ = cli(["clients", "list", "--limit", "2"], fake)
    assert fake.calls == [("clients", {"action": "list", "limit": 2})]
    assert (code, out) == (0, """\
VIP 198.18.1.100: 1523 clients (showing 2)
  CLIENT        BACKEND      IDLE AT LEAST
  203.0.113.5   198.19.0.11             0s
  203.0.113.17  198.19.0.12             2m

VIP 2001:db8:1::100: 0 clients
""")
    assert format_clients({"services": []}) == "no services\n"
    assert format_clients({"services": [{"vip": "192.0.2.1", "total": 1, "clients": [
        ["203.0.113.1", "198.19.0.11", 3.0]]}]}) == (
        "VIP 192.0.2.1: 1 client\n  CLIENT       BACKEND      IDLE AT LEAST\n"
        "  203.0.113.1  198.19.0.11             3s\n")


def test_clients_lookup() -> None:
    def svc(**kw: Any) -> dict[str, Any]:
        base = {"vip": "198.18.1.100", "strategy": "rr", "backend": "198.19.0.11",
                "idle": 12.0, "served": True, "hashed": None}
        return base | kw

    fake = Fake({"client": "203.0.113.5", "services": [
        svc(), svc(strategy="sh", backend=None, idle=None, served=False,
                   hashed="198.19.0.12"),
        svc(strategy="maglev", idle=0.0, hashed="198.19.0.12"),
        svc(backend="198.19.0.13", idle=3.0, served=False),
        svc(strategy="lc", backend=None, idle=None, served=False)]})
    code, out, _ = cli(["clients", "lookup", "203.0.113.5", "--vip", "198.18.1.100"], fake)
    assert fake.calls == [("clients", {"action": "lookup", "vip": "198.18.1.100",
                                       "client": "203.0.113.5"})]
    assert (code, out) == (0, """\
203.0.113.5 on 198.18.1.100 (rr): served by 198.19.0.11, idle at least 12s
203.0.113.5 on 198.18.1.100 (sh): not in the client table; its next packet goes to 198.19.0.12 (hash)
203.0.113.5 on 198.18.1.100 (maglev): served by 198.19.0.11 (its hash now gives 198.19.0.12)
203.0.113.5 on 198.18.1.100 (rr): its entry names 198.19.0.13, which no longer serves it: it moves on its next packet
203.0.113.5 on 198.18.1.100 (lc): not in the client table; its next packet is balanced like a new client's
""")  # noqa: E501
    assert format_lookup({"client": "2001:db8::5", "services": []}) == (
        "2001:db8::5: no VIP of its family\n")
    # the conntrack path: what the kernel's client map says too
    one = [svc()]
    assert format_lookup({"client": "198.18.0.7", "services": one, "kernel": {
        "mark": 0x4C420000, "backend": "198.19.0.11", "expires": 299.0}}).splitlines()[1] == (
        "198.18.0.7: the kernel sends its new connections to 198.19.0.11, for 4:59 unless "
        "it comes back")
    assert format_lookup({"client": "198.18.0.7", "services": one, "kernel": None}
                         ).splitlines()[1] == (
        "198.18.0.7: not in the kernel's client map (its next connection goes to a worker)")


# --- reload --------------------------------------------------------------------------

BASE = "VIP4=198.18.1.100\nRIP4=198.19.0.0/24\n"


def reload_result(dry_run: bool) -> dict[str, Any]:
    old = parse_config(BASE + "server4=198.19.0.11\nserver4=198.19.0.12\n"
                              "server4=198.19.0.13\n", "x")
    new = parse_config(BASE + "server4=198.19.0.11 weight=3\nserver4=198.19.0.12 state=drain\n"
                              "server4=198.19.0.14\nstrategy=sh\non_backend_down=keep\n", "x")
    running = {"198.18.1.100": {"198.19.0.11": (1, "up"), "198.19.0.12": (1, "down"),
                                "198.19.0.13": (1, "up"), "198.19.0.20": (1, "up")}}
    plan = diff_configs(old, new, (4,), running)
    return dict(plan.to_json(), config="/etc/loaded.conf", dry_run=dry_run,
                applied=not dry_run)


def test_reload_dry_run() -> None:
    fake = Fake(reload_result(True))
    code, out, _ = cli(["reload", "--dry-run"], fake)
    assert fake.calls == [("reload", {"dry_run": True})]
    assert (code, out) == (0, """\
reload /etc/loaded.conf (dry run): would apply 4 changes
  add     198.19.0.14 to 198.18.1.100 (weight 1, up)
  weight  198.19.0.11 on 198.18.1.100: 1 -> 3
  state   198.19.0.12 on 198.18.1.100: down -> draining (overrides a change made at run time)
  remove  198.19.0.13 from 198.18.1.100
settings that would apply live:
  on_backend_down: cut -> keep (applies to backends that go down from now on)
not applied, need a restart:
  strategy: rr -> sh (every worker builds its strategy and client tables at start: restart the daemon)
notes:
  198.19.0.20 on 198.18.1.100 was added at run time and is kept
""")  # noqa: E501


def test_reload_applied_and_nothing_to_do() -> None:
    text = format_reload(reload_result(False))
    assert text.startswith("reload /etc/loaded.conf: applied 4 changes\n")
    assert "settings applied live:\n" in text
    assert format_reload({"config": "/etc/loaded.conf", "dry_run": False, "applied": True,
                          "changes": [], "settings": [], "notes": []}) == (
        "reload /etc/loaded.conf: no change to the pools\n")


# --- wiring --------------------------------------------------------------------------


def test_add_subcommands_on_another_parser() -> None:
    p = argparse.ArgumentParser(prog="loaded")
    add_subcommands(p.add_subparsers(dest="command"))
    args = p.parse_args(["backend", "drain", "198.19.0.11", "--socket", "/tmp/x.sock",
                         "--json", "--timeout", "3"])
    assert args.control is run and args.control_cmd == "backend"
    assert (args.socket, args.json, args.timeout, args.dry_run) == ("/tmp/x.sock", True,
                                                                    3.0, False)
    args = p.parse_args(["clients", "lookup", "203.0.113.5", "--json"])
    assert args.control_cmd == "clients" and args.clients_action == "lookup" and args.json
    with pytest.raises(SystemExit):
        p.parse_args(["status", "-c", "a.conf", "--socket", "/x"])  # one or the other
    with pytest.raises(SystemExit):
        p.parse_args(["backend", "explode", "198.19.0.11"])


def test_socket_path_from_config(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "lb.conf"
    args = parser().parse_args(["status", "-c", str(conf)])
    assert socket_of(args) == f"/run/loaded/{instance_tag(str(conf))}.sock"
    monkeypatch.chdir(tmp_path)
    args = parser().parse_args(["status", "-c", "lb.conf"])
    assert socket_of(args) == f"/run/loaded/{instance_tag(os.path.join(tmp_path, 'lb.conf'))}.sock"
    (tmp_path / "loaded.config").write_text("")
    args = parser().parse_args(["status"])  # the daemon's own default search
    assert socket_of(args) == (
        f"/run/loaded/{instance_tag(os.path.join(tmp_path, 'loaded.config'))}.sock")
    assert socket_of(parser().parse_args(["status", "--socket", "/s"])) == "/s"


@pytest.mark.skipif("control_socket" not in KEYS, reason="no control_socket key")
def test_socket_path_set_in_the_config(tmp_path: Any) -> None:
    conf = tmp_path / "lb.conf"
    conf.write_text("VIP4=198.18.1.100\nserver4=198.19.0.11\n"
                    "control_socket=/run/lb/ctl.sock\n")
    assert socket_of(parser().parse_args(["status", "-c", str(conf)])) == "/run/lb/ctl.sock"
    conf.write_text("VIP4=nonsense\ncontrol_socket=/run/lb/ctl.sock\n")  # broken: default
    assert socket_of(parser().parse_args(["status", "-c", str(conf)])) == (
        f"/run/loaded/{instance_tag(str(conf))}.sock")


def test_real_request_without_daemon(tmp_path: Any) -> None:
    out, err = io.StringIO(), io.StringIO()
    args = parser().parse_args(["status", "--socket", str(tmp_path / "none.sock")])
    assert run(args, out=out, err=err) == EXIT_FAILED
    assert err.getvalue().startswith("loaded status: no control socket at ")
    assert "is the daemon running" in err.getvalue()
