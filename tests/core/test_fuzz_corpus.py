"""The engine's fuzz corpus and a short fuzz run, in CI (issue 13).

Every packet of ``corpus/engine.json`` (seeds of every kind, the first packet of
every outcome of the 1,000,000-packet campaign, and every packet that ever
crashed the engine), and 64 KiB GSO packets built on the spot, go through
``Engine.handle`` (fast and general path, partial checksums off and on) and
``Engine.decide`` under several scenarios; ``tests.core.fuzzing.Checker`` holds
each run to the invariant. Then 20,000 generated packets from a fixed seed, the
campaign's generator in small (``bench/fuzz_engine.py`` is the long run).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.core.fuzzing import (
    TEMPLATES,
    Checker,
    Failure,
    Scenario,
    big_seeds,
    campaign,
    corpus_scenarios,
    partial_form,
    special_seeds,
)

CORPUS = Path(__file__).parent / "corpus" / "engine.json"


def corpus() -> list[tuple[str, bytes]]:
    doc = json.loads(CORPUS.read_text())
    return [(e["name"], bytes.fromhex(e["hex"])) for e in doc["entries"]]


def test_corpus_holds_every_kind_and_every_bug() -> None:
    names = [n for n, _ in corpus()]
    for template, _, _ in TEMPLATES:
        assert f"seed {template}" in names
    for special, _ in special_seeds():
        assert f"seed {special}" in names
    assert any(n.startswith("bug:") for n in names)
    assert any(n.startswith("first handle:accept") for n in names)


def _report(failures: list[tuple[str, Failure]]) -> str:
    return "\n".join(f"{name}: {f.entry}: {f.problem}\n  {f.data.hex()}\n  {f.detail}"
                     for name, f in failures[:5])


@pytest.mark.parametrize("scenario", corpus_scenarios(), ids=str)
@pytest.mark.parametrize("view", [True, False], ids=["memoryview", "bytearray"])
def test_corpus_keeps_the_invariant(scenario: Scenario, view: bool) -> None:
    checker = Checker(scenario, view)
    failures = []
    now = 1.0
    for name, data in corpus() + big_seeds():
        now += 0.01
        # partial on: what offload leaves, and a complete checksum flagged partial
        offloaded = bytes(partial_form(bytearray(data)))
        inputs = (offloaded, data) if offloaded != data else (data,)
        failures += [(name, f) for f in checker.check(data, now, inputs)]
        if failures:
            checker = Checker(scenario, view)  # unlike engine states after a divergence
    assert not failures, _report(failures)
    outcomes = {k.split(":", 1)[1] for k in checker.counts}
    assert {"accept", "pass"} <= outcomes


def test_short_fuzz_run() -> None:
    t0 = time.perf_counter()
    res = campaign(seed=2026, packets=20_000, deadline=t0 + 60.0, clock=time.perf_counter,
                   scenario_every=2_000)
    assert res.packets == 20_000
    assert not res.failures, "\n".join(
        f"{f['packet']} {f['entry']}: {f['problem']}\n  {f['hex']}\n  {f['detail']}"
        for f in res.failures[:5])
    # the run got deep: rewritten packets and most ways of being dropped, on each entry
    for entry in ("handle", "handle partial", "decide"):
        assert res.counts[f"{entry}:accept"] > 1000
        drops = {k for k in res.counts if k.startswith(f"{entry}:drop:")}
        assert len(drops) >= 15, drops
