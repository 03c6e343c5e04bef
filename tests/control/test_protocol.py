"""The control protocol: lines, strict argument checks, VIP resolution, pool commands."""

from __future__ import annotations

import ipaddress
import json
import os
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loaded.control.protocol import (
    BACKEND_ACTIONS,
    DEFAULT_LIMIT,
    CommandFailed,
    ControlError,
    ProtocolError,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    error,
    ok,
    pool_command,
    resolve_vip,
    socket_path,
    socket_path_for_config,
    validate_request,
)
from loaded.core.commands import AddBackend, RemoveBackend, SetState, SetWeight
from loaded.core.plan import instance_tag
from loaded.core.pool import State


def valid(cmd: str, **args: Any) -> dict[str, Any]:
    return validate_request({"cmd": cmd, "args": args})["args"]  # type: ignore[no-any-return]


def test_request_round_trip() -> None:
    line = encode_request("backend", {"action": "drain", "address": "198.19.0.11"})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_request(line[:-1]) == {
        "cmd": "backend", "args": {"action": "drain", "address": "198.19.0.11"}}
    assert decode_request(b'{"cmd": "status"}') == {"cmd": "status", "args": {}}
    assert decode_request(b'{"cmd": "status", "args": null}') == {"cmd": "status", "args": {}}


@pytest.mark.parametrize("line, message", [
    (b"not json", "not JSON"),
    (b"\xff\xfe", "not"),
    (b"[1, 2]", "JSON object"),
    (b'{"args": {}}', '"cmd"'),
    (b'{"cmd": 5}', '"cmd"'),
    (b'{"cmd": "status", "args": [1]}', '"args"'),
    (b'{"cmd": "status", "extra": 1}', "unknown request field"),
])
def test_bad_lines(line: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode_request(line)


@pytest.mark.parametrize("line", [
    b"[" * 60000,
    b"{" * 60000,
    b'{"a":' * 30000,
    b"[" * 5000 + b"]" * 5000,  # well-formed, but deeper than any request
    b'{"cmd": "status", "args": ' + b'{"a": ' * 40000,
    b"[" * 100 + b"\xff",
])
def test_deep_nesting_is_a_protocol_error(line: bytes) -> None:
    # json's recursion raises RecursionError, not ValueError: it must not escape.
    with pytest.raises(ProtocolError):
        decode_request(line)


def test_brackets_in_strings_do_not_count_as_nesting() -> None:
    line = json.dumps({"cmd": "[" * 5000, "args": {"x": "{" * 5000 + '\\"['}}).encode()
    assert decode_request(line)["cmd"] == "[" * 5000


_JSONISH = st.sampled_from([b"[", b"]", b"{", b"}", b'"', b"\\", b":", b",", b"1", b" ",
                            b'"cmd"', b'"args"', b'"status"', b"null", b"\xff", b"\x00"])


@given(st.one_of(
    st.binary(max_size=512),
    st.lists(_JSONISH, max_size=400).map(b"".join),
    st.tuples(st.integers(0, 20000), st.sampled_from([b"[", b"{", b'{"a":', b'[{"a":'])
              ).map(lambda t: t[1] * t[0]),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                 lambda inner: st.lists(inner, max_size=3)
                 | st.dictionaries(st.sampled_from(["cmd", "args", "x"]), inner, max_size=3),
                 max_leaves=30).map(lambda v: json.dumps(v).encode()),
))
def test_decoding_a_line_parses_or_is_the_protocol_error(line: bytes) -> None:
    # The invariant the server relies on: a request, or ProtocolError; nothing else.
    try:
        req = decode_request(line)
    except ProtocolError:
        return
    assert set(req) == {"cmd", "args"}
    assert isinstance(req["cmd"], str) and isinstance(req["args"], dict)


def test_responses() -> None:
    assert ok({"a": 1}) == {"ok": True, "result": {"a": 1}}
    assert error("two\nlines  here") == {"ok": False, "error": "two lines here"}
    assert decode_response(encode_response(ok([1]))) == [1]
    with pytest.raises(CommandFailed, match="nope"):
        decode_response(encode_response(error("nope")))
    with pytest.raises(ControlError, match="not JSON"):
        decode_response(b"garbage")
    with pytest.raises(ControlError, match="not a response"):
        decode_response(b'{"result": 1}')
    with pytest.raises(ValueError):
        encode_response(ok(float("nan")))
    with pytest.raises(TypeError):
        encode_response(ok({1, 2}))


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
                    max_leaves=20))
def test_any_json_result_is_one_line(result: Any) -> None:
    line = encode_response(ok(result))
    assert line.count(b"\n") == 1 and line.endswith(b"\n")
    assert decode_response(line) == result


def test_status_and_reload_args() -> None:
    assert valid("status") == {}
    assert valid("reload") == {"dry_run": False}
    assert valid("reload", dry_run=True) == {"dry_run": True}
    with pytest.raises(ProtocolError, match="unknown argument"):
        valid("status", verbose=True)
    with pytest.raises(ProtocolError, match="true or false"):
        valid("reload", dry_run="yes")
    with pytest.raises(ProtocolError, match="unknown command 'stats'; known: status"):
        valid("stats")


def test_backend_args() -> None:
    assert valid("backend", action="drain", address=" 2001:DB8::0011 ") == {
        "action": "drain", "address": "2001:db8::11", "vip": None, "dry_run": False}
    assert valid("backend", action="add", address="198.19.0.11", vip="198.18.1.100") == {
        "action": "add", "address": "198.19.0.11", "vip": "198.18.1.100", "dry_run": False,
        "weight": 1}
    assert valid("backend", action="weight", address="198.19.0.11", weight=0,
                 dry_run=True)["weight"] == 0
    for action in BACKEND_ACTIONS:
        valid("backend", action=action, address="198.19.0.11",
              **({"weight": 3} if action == "weight" else {}))


@pytest.mark.parametrize("args, message", [
    ({"address": "198.19.0.11"}, "'action' must be one of"),
    ({"action": "kill", "address": "198.19.0.11"}, "'action' must be one of"),
    ({"action": "drain"}, "'address' is required"),
    ({"action": "drain", "address": "host.example"}, "not an IP address"),
    ({"action": "drain", "address": 17}, "as a string"),
    ({"action": "drain", "address": "198.19.0.11", "vip": "2001:db8::1"}, "different famil"),
    ({"action": "weight", "address": "198.19.0.11"}, "'weight' is required"),
    ({"action": "weight", "address": "198.19.0.11", "weight": 65536}, "0..65535"),
    ({"action": "weight", "address": "198.19.0.11", "weight": True}, "integer"),
    ({"action": "weight", "address": "198.19.0.11", "weight": 1.5}, "integer"),
    ({"action": "drain", "address": "198.19.0.11", "weight": 2}, "does not go with drain"),
    ({"action": "drain", "address": "198.19.0.11", "force": True}, "unknown argument"),
])
def test_bad_backend_args(args: dict[str, Any], message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        validate_request({"cmd": "backend", "args": args})


def test_clients_args() -> None:
    assert valid("clients", action="list") == {"action": "list", "vip": None,
                                               "limit": DEFAULT_LIMIT}
    assert valid("clients", action="list", vip="198.18.1.100", limit=5)["limit"] == 5
    assert valid("clients", action="lookup", client="203.0.113.5") == {
        "action": "lookup", "vip": None, "client": "203.0.113.5"}
    for args, message in [({"action": "lookup"}, "'client' is required"),
                          ({"action": "list", "limit": 0}, "1..1000000"),
                          ({"action": "list", "client": "203.0.113.5"}, "does not go"),
                          ({"action": "lookup", "client": "203.0.113.5", "limit": 3},
                           "does not go"),
                          ({"action": "show"}, "one of list, lookup")]:
        with pytest.raises(ProtocolError, match=message):
            validate_request({"cmd": "clients", "args": args})


def test_resolve_vip() -> None:
    vips = ["198.18.1.100", "2001:db8:1::100"]
    assert resolve_vip("198.19.0.11", vips) == "198.18.1.100"
    assert resolve_vip("2001:db8:2::11", vips) == "2001:db8:1::100"
    assert resolve_vip("198.19.0.11", vips, "198.18.1.100") == "198.18.1.100"
    with pytest.raises(ProtocolError, match=r"no VIP 198\.18\.1\.9 here"):
        resolve_vip("198.19.0.11", vips, "198.18.1.9")
    with pytest.raises(ProtocolError, match="no IPv6 VIP"):
        resolve_vip("2001:db8:2::11", ["198.18.1.100"])
    with pytest.raises(ProtocolError, match="give --vip"):
        resolve_vip("198.19.0.11", ["198.18.1.100", "198.18.1.101"])


def test_pool_commands() -> None:
    v, b = "198.18.1.100", "198.19.0.11"
    vip, ip = ipaddress.IPv4Address(v), ipaddress.IPv4Address(b)
    assert pool_command("add", v, b) == AddBackend(vip, ip, 1, State.UP)
    assert pool_command("add", v, b, 4) == AddBackend(vip, ip, 4, State.UP)
    assert pool_command("remove", v, b) == RemoveBackend(vip, ip)
    assert pool_command("weight", v, b, 0) == SetWeight(vip, ip, 0)
    assert pool_command("drain", v, b) == SetState(vip, ip, State.DRAINING)
    assert pool_command("disable", v, b) == SetState(vip, ip, State.DOWN, cut=True)
    assert pool_command("enable", v, b) == SetState(vip, ip, State.UP)
    with pytest.raises(ProtocolError):
        pool_command("weight", v, b)
    with pytest.raises(ProtocolError):
        pool_command("explode", v, b)
    # As the answers show them (the "command" field of ``backend``)
    base = {"vip": v, "backend": b}
    assert pool_command("add", v, b).to_json() == {**base, "op": "add", "weight": 1,
                                                   "state": "up"}
    assert pool_command("remove", v, b).to_json() == {**base, "op": "remove"}
    assert pool_command("weight", v, b, 0).to_json() == {**base, "op": "weight", "weight": 0}
    assert pool_command("drain", v, b).to_json() == {**base, "op": "state",
                                                     "state": "draining"}
    assert pool_command("disable", v, b).to_json() == {**base, "op": "state", "state": "down",
                                                       "cut": True}
    assert pool_command("enable", v, b).to_json() == {**base, "op": "state", "state": "up"}
    json.dumps(pool_command("add", v, b).to_json())


def test_socket_paths() -> None:
    assert socket_path("abc123") == "/run/loaded/abc123.sock"
    assert socket_path("abc123", "/tmp/x") == "/tmp/x/abc123.sock"
    tag = instance_tag(os.path.abspath("loaded.conf"))
    assert socket_path_for_config("loaded.conf") == f"/run/loaded/{tag}.sock"
    assert socket_path_for_config("/etc/loaded.conf") == (
        f"/run/loaded/{instance_tag('/etc/loaded.conf')}.sock")
