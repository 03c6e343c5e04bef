"""``Engine.steer``: the per-packet path's common case decided without a rewrite
(the kernel rewrites by the backend's mark). A worker that tries ``steer`` first
and falls back to ``handle`` must choose exactly what a worker with ``handle``
alone chooses, packet for packet, whatever the packets are."""

from __future__ import annotations

import random

import pytest

from loaded.core.engine import Engine
from loaded.core.errors import PacketError, Reason
from loaded.core.pool import Backend
from tests.core.fuzzing import Generator, Scenario, corpus_scenarios, prime
from tests.core.test_fuzz_corpus import corpus


def _outcome(call: object) -> tuple[str, str | None]:
    try:
        b = call()  # type: ignore[operator]
    except PacketError as e:
        return f"drop:{e.reason.value}", None
    return ("pass", None) if b is None else ("accept", str(b.ip))


def _steered(e: Engine, data: bytes, now: float) -> tuple[tuple[str, str | None], bool]:
    """As the worker does it: (outcome, whether steer decided)."""
    buf = bytearray(data)
    try:
        b = e.steer(memoryview(buf), now)
    except PacketError as err:
        assert err.reason is Reason.NO_BACKEND, err  # steer parses nothing else
        return (f"drop:{err.reason.value}", None), True
    if b is not None:
        assert buf == data  # nothing rewritten: the kernel does it
        return ("accept", str(b.ip)), True
    return _outcome(lambda: e.handle(memoryview(buf), now)), False


def _same_choices(scenario: Scenario, packets: list[bytes]) -> int:
    with_steer, without = scenario.engine(), scenario.engine()
    prime((with_steer, without))
    steered = 0
    now = 1.0
    for data in packets:
        now += 0.01
        got, decided = _steered(with_steer, data, now)
        want = _outcome(lambda d=data, t=now: without.handle(memoryview(bytearray(d)), t))
        assert got == want, (data.hex(), got, want)
        steered += decided
    return steered


@pytest.mark.parametrize("scenario", corpus_scenarios(), ids=str)
def test_steer_chooses_as_handle_on_the_corpus(scenario: Scenario) -> None:
    packets = [data for _, data in corpus()]
    assert _same_choices(scenario, packets) > 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_steer_chooses_as_handle_on_generated_packets(seed: int) -> None:
    rng = random.Random(seed)
    gen = Generator(rng)
    packets = [bytes(gen.packet()[1]) for _ in range(4000)]
    assert _same_choices(Scenario(), packets) > 100


def test_steer_takes_only_plain_tcp_and_udp_to_a_vip() -> None:
    from tests.core.fuzzing import BACKENDS4, CLIENTS4, UDP, VIP4, ip, udp

    e = Scenario().engine()
    first = ip(4, CLIENTS4[0], VIP4, UDP, udp(CLIENTS4[0], VIP4, 1, 80))  # 28 bytes
    b = e.steer(memoryview(first), 1.0)
    assert isinstance(b, Backend) and b.packets == 1 and b.bytes == len(first)
    reply = ip(4, BACKENDS4[0], CLIENTS4[0], UDP, udp(BACKENDS4[0], CLIENTS4[0], 80, 1))
    assert e.steer(memoryview(reply), 1.0) is None  # the return path: handle's
    frag = bytearray(first)
    frag[6] |= 0x20  # more fragments
    assert e.steer(memoryview(frag), 1.0) is None
