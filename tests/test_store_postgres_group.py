"""Group commit in the PostgreSQL store: batches arriving together in one process share one
statement and one transaction, and each still gets its own result, or its own error."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import empty_postgres
from usagemeter.model import Account, AppendResult, Event
from usagemeter.store.base import NotFound
from usagemeter.store.pgcommit import GroupCommit
from usagemeter.store.postgres import PostgresStore

BASE_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z


def test_threads_arriving_together_share_a_group_and_get_their_own_outcomes() -> None:
    groups: list[list[int]] = []
    started, release = threading.Event(), threading.Event()

    def write(items: Sequence[int]) -> list[int | BaseException]:
        if not groups:
            started.set()
            release.wait(5)  # the first group holds the writer while the others queue
        groups.append(list(items))
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]

    commit: GroupCommit[int, int] = GroupCommit(write, max_size=3)
    outcomes: dict[int, object] = {}

    def submit(i: int) -> None:
        try:
            outcomes[i] = commit.submit(i, 1)
        except ValueError as exc:
            outcomes[i] = str(exc)

    first = threading.Thread(target=submit, args=(0,))
    first.start()
    assert started.wait(5)
    others = [threading.Thread(target=submit, args=(i,)) for i in range(1, 8)]
    for t in others:
        t.start()
    while len(commit._queue) < 7:
        threading.Event().wait(0.001)
    release.set()
    for t in [first, *others]:
        t.join(5)
    assert outcomes == {i: (f"odd {i}" if i % 2 else i * 10) for i in range(8)}
    assert groups[0] == [0]
    # The seven queued meanwhile went in groups of at most three, oldest first.
    assert sorted(i for g in groups[1:] for i in g) == list(range(1, 8))
    assert all(len(g) <= 3 for g in groups)
    assert [g[0] for g in groups[1:]] == sorted(g[0] for g in groups[1:])


def test_a_group_that_fails_as_a_whole_fails_every_batch_in_it() -> None:
    def write(items: Sequence[int]) -> list[int | BaseException]:
        raise RuntimeError("database gone")

    commit: GroupCommit[int, int] = GroupCommit(write, max_size=10)
    with pytest.raises(RuntimeError, match="database gone"):
        commit.submit(1, 1)
    # The writer's place is free again: the next batch writes.
    with pytest.raises(RuntimeError, match="database gone"):
        commit.submit(2, 1)


@pytest.fixture
def store(postgres_url: str) -> Iterator[PostgresStore]:
    store = PostgresStore(postgres_url, pool_size=4)
    empty_postgres(store)
    store.create_account(Account("a", "A"))
    store.create_account(Account("b", "B"))
    try:
        yield store
    finally:
        store.close()


def _append_together(
    store: PostgresStore, batches: Sequence[Sequence[Event]]
) -> list[AppendResult | Exception]:
    """Every batch from its own thread, released at once."""
    results: list[AppendResult | Exception] = [Exception("not run")] * len(batches)
    start = threading.Barrier(len(batches))

    def run(n: int) -> None:
        start.wait()
        try:
            results[n] = store.append(batches[n])
        except Exception as exc:
            results[n] = exc

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    batches=st.lists(
        st.lists(
            st.tuples(st.sampled_from("ab"), st.integers(0, 9), st.integers(0, 3)),
            min_size=1,
            max_size=8,
        ),
        min_size=2,
        max_size=6,
    )
)
def test_concurrent_batches_count_each_id_once_and_report_their_own_repeats(
    store: PostgresStore, batches: list[list[tuple[str, int, int]]]
) -> None:
    empty_postgres(store)
    store.create_account(Account("a", "A"))
    store.create_account(Account("b", "B"))
    events = [
        [Event(f"e{n}", account, "m", BASE_MS + minute * 60_000) for account, n, minute in b]
        for b in batches
    ]
    results = _append_together(store, events)
    assert all(isinstance(r, AppendResult) for r in results)
    done = [r for r in results if isinstance(r, AppendResult)]
    distinct = {(e.account_id, e.id) for b in events for e in b}
    # Each id is accepted by exactly one batch; every other copy is that batch's duplicate.
    assert sum(r.accepted for r in done) == len(distinct) == store.count_events()
    for r, b in zip(done, events, strict=True):
        assert r.accepted + r.duplicates == len(b)
    # Whatever the grouping, a repeat with another timestamp is a conflict, and nothing else.
    first_ts: dict[tuple[str, str], int] = {}
    for b in events:
        for e in b:
            first_ts.setdefault((e.account_id, e.id), e.ts_ms)
    payloads = {
        k: {e.ts_ms for b in events for e in b if (e.account_id, e.id) == k} for k in distinct
    }
    conflicted = sum(len(r.conflicts) for r in done)
    assert (conflicted == 0) == all(len(v) == 1 for v in payloads.values())


def test_a_batch_naming_an_unknown_account_fails_alone(store: PostgresStore) -> None:
    good = [[Event(f"g{n}-{i}", "a", "m", BASE_MS) for i in range(50)] for n in range(4)]
    bad = [Event("x", "a", "m", BASE_MS), Event("y", "nobody", "m", BASE_MS)]
    results = _append_together(store, [*good, bad, *good[:1]])
    assert results[1:4] == [AppendResult(50, 0)] * 3
    assert isinstance(results[4], NotFound) and "'nobody'" in str(results[4])
    # The first batch and its repeat: whichever came first stored it, in a group or not.
    assert {results[0], results[5]} == {AppendResult(50, 0), AppendResult(0, 50)}
    assert store.count_events() == 200


def test_two_writers_write_two_groups_at_once() -> None:
    both = threading.Barrier(2, timeout=5)

    def write(items: Sequence[int]) -> list[int | BaseException]:
        both.wait()  # breaks (and fails the batches) unless a second group is being written
        return list(items)

    commit: GroupCommit[int, int] = GroupCommit(write, max_size=10, writers=2)
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda i=i: results.append(commit.submit(i, 1))) for i in (1, 2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(results) == [1, 2]
