"""The status snapshot's JSON codec: it round-trips, and anything else is one error."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import pytest

from loaded.core.status import KernelHashStatus, Status, StatusError
from tests.control.test_cli_format import STATUS as PLAIN

# Every optional part present, so that the junk reaches each of its fields.
STATUS = dataclasses.replace(
    PLAIN, kernel_drops={"conntrack-invalid": 3},
    kernel_hash=KernelHashStatus("sh", 251, 7, False, True, 12))

JUNK: list[Any] = [None, True, -1, 2.5, "x", "", [], {}, [[1, 2]], {"a": 1}, "²"]


def _paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*path, i))


def test_round_trip() -> None:
    assert Status.from_json(json.loads(json.dumps(STATUS.to_json()))) == STATUS


def test_every_junk_value_anywhere_is_a_status_error_or_a_snapshot() -> None:
    good = STATUS.to_json()
    tried = 0
    for path in _paths(good):
        for junk in JUNK:
            broken = copy.deepcopy(good)
            if not path:
                broken = junk
            else:
                parent = broken
                for step in path[:-1]:
                    parent = parent[step]
                parent[path[-1]] = junk
            tried += 1
            try:
                Status.from_json(broken)
            except StatusError:
                pass
    assert tried > 1000


@pytest.mark.parametrize("queues", [{"²": {}}, {"q": {}}, {"-1": {}}])
def test_a_queue_is_a_number(queues: dict[str, Any]) -> None:
    with pytest.raises(StatusError, match="is not a queue number"):
        Status.from_json(dict(STATUS.to_json(), kernel_queues=queues))


def test_keys_it_does_not_know_are_ignored() -> None:
    data = STATUS.to_json()
    data["services"][0]["backends"][0]["future"] = 1
    data["daemon"]["future"] = {"x": [1]}
    assert Status.from_json(data) == STATUS
