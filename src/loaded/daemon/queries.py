"""Questions to the workers (for the control socket, the saved client tables),
and their answers collected.

Rules:

- A question goes to every worker that runs (or, per worker index, its own
  question: ``only``), under an id of its own; each worker answers once, with
  a ``Reply`` carrying that id. This module owns the questions in flight.
- ``done(replies)`` runs exactly once, in the supervisor's loop: when every
  worker asked has answered, or at the deadline, or once none of the workers
  still expected runs, with the replies that came (``query-incomplete`` logged).
  A question to no worker is done at once, with no replies.
- A reply with an unknown id (its question timed out) is dropped.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from loaded.core.commands import Query, Reply

log = logging.getLogger("loaded.supervisor")

Done = Callable[[list[Reply]], None]


@dataclass
class _Query:
    """A question to every worker; ``done`` gets the replies when all are in, or
    those that came by the deadline."""

    expected: set[int]
    done: Done
    deadline: float
    replies: list[Reply] = field(default_factory=list)


class Queries:
    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._pending: dict[int, _Query] = {}

    def __bool__(self) -> bool:
        """Whether some question still waits for answers."""
        return bool(self._pending)

    def ask(self, targets: Collection[int], send: Callable[[int, Query], None],
            query: Query | None, done: Done, timeout: float,
            only: dict[int, Query] | None = None) -> None:
        """``query`` (or ``only[index]``) to each worker index in ``targets``,
        through ``send``."""
        qid = next(self._ids)
        q = _Query(set(targets), done, time.monotonic() + timeout)
        if not targets:
            done([])
            return
        self._pending[qid] = q
        for index in targets:
            body = query if only is None else only[index]
            assert body is not None
            send(index, dataclasses.replace(body, id=qid))

    def on_reply(self, index: int, reply: Reply) -> None:
        q = self._pending.get(reply.id)
        if q is None:
            return
        q.replies.append(reply)
        q.expected.discard(index)
        if not q.expected:
            del self._pending[reply.id]
            q.done(q.replies)

    def expire(self, now: float, alive: Collection[int]) -> None:
        """Finish the questions past their deadline, or whose workers are all gone."""
        for qid, q in list(self._pending.items()):
            if now >= q.deadline or not any(i in alive for i in q.expected):
                del self._pending[qid]
                log.warning("event=query-incomplete missing=%s", sorted(q.expected))
                q.done(q.replies)
