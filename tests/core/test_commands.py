"""Pool commands and pipe messages: valid when built, one line each way, garbage
refused with ``MessageError`` and nothing else."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loaded.core.commands import (
    AddBackend,
    ClientsQuery,
    DumpQuery,
    LookupQuery,
    Message,
    MessageError,
    PoolCommand,
    PreviewQuery,
    RemoveBackend,
    Reply,
    Report,
    RestoreQuery,
    SetState,
    SetWeight,
    command_from_json,
    decode,
    encode,
)
from loaded.core.pool import MAX_INDEX, MAX_WEIGHT, State

V4 = ipaddress.IPv4Address("198.18.1.100")
B4 = ipaddress.IPv4Address("198.19.0.11")
V6 = ipaddress.IPv6Address("2001:db8:1::100")
B6 = ipaddress.IPv6Address("2001:db8:2::11")


def test_commands_are_checked_when_built() -> None:
    with pytest.raises(ValueError, match="different families"):
        SetState(V4, B6, State.UP)
    with pytest.raises(ValueError, match="weight"):
        SetWeight(V4, B4, MAX_WEIGHT + 1)
    with pytest.raises(ValueError, match="weight"):
        AddBackend(V4, B4, -1)
    with pytest.raises(ValueError, match="index"):
        AddBackend(V4, B4, index=MAX_INDEX + 1)
    # cut means something with down only: commands that do the same are equal
    assert SetState(V4, B4, State.UP, cut=False) == SetState(V4, B4, State.UP)
    assert SetState(V4, B4, State.DOWN, cut=False) != SetState(V4, B4, State.DOWN)
    assert SetState(V4, B4, State.DOWN, cut=False).pool_state is State.DRAINING
    assert SetState(V4, B4, State.DOWN).pool_state is State.DOWN


def test_to_json_is_the_control_sockets_form() -> None:
    v, b = str(V4), str(B4)
    assert AddBackend(V4, B4, 3, State.DRAINING).to_json() == {
        "op": "add", "vip": v, "backend": b, "weight": 3, "state": "draining"}
    assert AddBackend(V4, B4, index=4).to_json()["index"] == 4
    assert RemoveBackend(V4, B4).to_json() == {"op": "remove", "vip": v, "backend": b}
    assert RemoveBackend(V4, B4, graceful=True).to_json()["graceful"] is True
    assert SetState(V4, B4, State.UP).to_json() == {"op": "state", "vip": v, "backend": b,
                                                    "state": "up"}
    assert SetState(V4, B4, State.DOWN, cut=False).to_json()["cut"] is False
    assert SetWeight(V4, B4, 0).to_json() == {"op": "weight", "vip": v, "backend": b,
                                              "weight": 0}


ips = st.sampled_from([(V4, B4), (V6, B6)])
states = st.sampled_from(list(State))
weights = st.integers(0, MAX_WEIGHT)


@st.composite
def pool_commands(draw: st.DrawFn) -> PoolCommand:
    vip, ip = draw(ips)
    kind = draw(st.sampled_from(["add", "remove", "state", "weight"]))
    if kind == "add":
        return AddBackend(vip, ip, draw(weights), draw(states),
                          draw(st.none() | st.integers(0, MAX_INDEX)))
    if kind == "remove":
        return RemoveBackend(vip, ip, draw(st.booleans()))
    if kind == "state":
        return SetState(vip, ip, draw(states), draw(st.booleans()))
    return SetWeight(vip, ip, draw(weights))


json_data = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=10)
ids = st.integers(0, 2**40)


@st.composite
def messages(draw: st.DrawFn) -> Message:
    kind = draw(st.integers(0, 8))
    if kind == 0:
        return draw(pool_commands())
    if kind == 1:
        return PreviewQuery(draw(pool_commands()), draw(ids))
    if kind == 2:
        return LookupQuery(draw(st.sampled_from([B4, B6])), draw(ids))
    if kind == 3:
        return ClientsQuery(draw(st.none() | st.sampled_from([V4, V6])),
                            draw(st.none() | st.integers(1, 1000)), draw(ids))
    if kind == 4:
        return DumpQuery(draw(ids))
    if kind == 5:
        return RestoreQuery(draw(st.dictionaries(st.text(max_size=5), json_data, max_size=3)),
                            draw(st.floats(0, 1e9)), draw(ids))
    if kind == 6:
        return Report(draw(st.dictionaries(st.text(max_size=5), json_data, max_size=3)))
    if draw(st.booleans()):
        return Reply(draw(ids), draw(st.integers(0, 64)), error=draw(st.text(max_size=20)))
    return Reply(draw(ids), draw(st.integers(0, 64)), result=draw(json_data))


@given(messages())
def test_every_message_survives_the_pipe(message: Message) -> None:
    line = encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line)["type"]  # every line says what it is
    assert decode(line) == message


@given(pool_commands())
def test_a_command_read_back_from_its_json_form_does_the_same(command: PoolCommand) -> None:
    back = command_from_json(command.to_json())
    # to_json leaves out what does not matter (cut of a state other than down)
    assert back == command


@pytest.mark.parametrize("line", [
    b"", b"\xff\xfe", b"[]", b"null", b'{"op": "add"}', b'{"type": 3}',
    b'{"type": "explode"}', b'{"type": "add", "vip": "198.18.1.100"}',
    b'{"type": "add", "vip": "198.18.1.100", "backend": "2001:db8::1"}',
    b'{"type": "add", "vip": "198.18.1.100", "backend": "198.19.0.11", "weight": true}',
    b'{"type": "weight", "vip": "198.18.1.100", "backend": "198.19.0.11", "weight": 70000}',
    b'{"type": "state", "vip": "198.18.1.100", "backend": "198.19.0.11", "state": "gone"}',
    b'{"type": "state", "vip": "x", "backend": "198.19.0.11", "state": "up"}',
    b'{"type": "preview", "id": 1, "command": [1]}',
    b'{"type": "reply", "id": "1", "index": 0}',
    b'{"type": "learned", "clients": [["0a00", 1]]}',  # no such message since 0.4
    b'{"type": "restore", "id": 1, "data": {}, "max_age": "1"}',
    b'[' * 100000,
])
def test_garbage_is_a_message_error(line: bytes) -> None:
    with pytest.raises(MessageError):
        decode(line)


@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode)
       | json_data.map(lambda d: json.dumps(d).encode())
       | st.dictionaries(st.sampled_from(["type", "vip", "backend", "weight", "state", "cut",
                                          "id", "index", "clients", "command", "data"]),
                         json_data | st.sampled_from(["add", "state", "reply", "198.18.1.100",
                                                      "198.19.0.11", "up"]), max_size=6)
       .map(lambda d: json.dumps(d).encode()))
def test_decode_raises_only_message_error(line: bytes) -> None:
    try:
        decode(line)
    except MessageError:
        pass


def test_message_error_is_a_value_error() -> None:
    assert issubclass(MessageError, ValueError)
    bad: Any = {"op": "remove"}
    with pytest.raises(MessageError):
        command_from_json(bad)
