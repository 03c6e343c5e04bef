"""Questions to the workers: each answered once, when all replies are in, at the
deadline, or once the workers expected are gone."""

from __future__ import annotations

import time

from loaded.core.commands import ClientsQuery, DumpQuery, Query, Reply
from loaded.daemon.queries import Queries


def asked(queries: Queries, targets: list[int], timeout: float = 5.0,
          only: dict[int, Query] | None = None
          ) -> tuple[list[tuple[int, Query]], list[list[Reply]]]:
    sent: list[tuple[int, Query]] = []
    done: list[list[Reply]] = []
    queries.ask(targets, lambda i, q: sent.append((i, q)), None if only else DumpQuery(),
                done.append, timeout, only)
    return sent, done


def test_done_once_every_worker_answered() -> None:
    q = Queries()
    sent, done = asked(q, [0, 1])
    assert [i for i, _ in sent] == [0, 1] and sent[0][1].id == sent[1][1].id > 0
    qid = sent[0][1].id
    q.on_reply(0, Reply(qid, 0, {"a": 1}))
    assert done == [] and q
    q.on_reply(1, Reply(qid, 1, {"b": 2}))
    assert [[r.index for r in replies] for replies in done] == [[0, 1]] and not q
    q.on_reply(1, Reply(qid, 1, {}))  # late or repeated: dropped
    assert len(done) == 1


def test_each_worker_its_own_question() -> None:
    q = Queries()
    only: dict[int, Query] = {0: ClientsQuery(None, 1), 2: ClientsQuery(None, 2)}
    sent, _ = asked(q, [0, 2], only=only)
    assert [(i, query.limit) for i, query in sent] == [(0, 1), (2, 2)]  # type: ignore[attr-defined]


def test_no_worker_means_done_at_once() -> None:
    q = Queries()
    sent, done = asked(q, [])
    assert sent == [] and done == [[]] and not q


def test_the_deadline_and_dead_workers_finish_a_question() -> None:
    q = Queries()
    sent, done = asked(q, [0, 1], timeout=5.0)
    q.on_reply(0, Reply(sent[0][1].id, 0, {}))
    q.expire(time.monotonic(), alive={0, 1})
    assert done == []
    q.expire(time.monotonic() + 6.0, alive={0, 1})
    assert [[r.index for r in replies] for replies in done] == [[0]]
    sent, done = asked(q, [0, 1])
    q.expire(time.monotonic(), alive={0})  # worker 1 is gone, but 0 still owes an answer
    assert done == []
    q.expire(time.monotonic(), alive=set())
    assert done == [[]] and not q
