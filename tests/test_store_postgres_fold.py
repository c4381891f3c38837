"""The PostgreSQL store's waiting events: a batch only inserts, a fold moves what waits into
the rollups later, and every answer reads both, so that each event counts exactly once
whether it waits or was folded, on every handle, and through every correction."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import empty_postgres
from tests.test_store_postgres import two_handles
from usagemeter.corrections import Amendment, VoidSelector
from usagemeter.model import Account, Event
from usagemeter.store.base import AggregateSpec, Measure, Window
from usagemeter.store.pgfold import FOLD_SHARDS, SHARD_FOLD_SQL
from usagemeter.store.pgschema import FOLD_LOCK, FOLD_SHARD_LOCK, SCHEMA_VERSION
from usagemeter.store.postgres import PostgresStore

BASE_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
MEASURES = (Measure("count"), Measure("sum"), Measure("min"), Measure("max"))


def _open(url: str) -> PostgresStore:
    """A handle whose events wait until the test folds them."""
    return PostgresStore(url, pool_size=2, background_fold=False)


@pytest.fixture
def pair(postgres_url: str) -> Iterator[tuple[PostgresStore, PostgresStore]]:
    """Two handles on one empty database, as two processes would be, neither folding."""
    with two_handles(postgres_url, ["a", "b"], background_fold=False) as handles:
        yield handles


def _waiting(store: PostgresStore) -> int:
    with store._pool.connection() as conn:
        row = conn.execute("SELECT count(*) FROM unfolded").fetchone()
    assert row is not None
    return int(row[0])


def _answer(
    store: PostgresStore, start: int, end: int, group_by: tuple[str, ...] = ()
) -> dict[tuple[tuple[str, str | None], ...], tuple[float | None, ...]]:
    spec = AggregateSpec(("a",), "m", (Window(0, start, end),), MEASURES, group_by=group_by)
    return {r.group: r.values for r in store.aggregate(spec)}


def _naive(
    events: list[Event], start: int, end: int, grouped: bool = False
) -> dict[tuple[tuple[str, str | None], ...], tuple[float | None, ...]]:
    inside = [e for e in events if e.account_id == "a" and start <= e.ts_ms < end]
    groups: dict[tuple[tuple[str, str | None], ...], list[float]] = {}
    for e in inside:
        group = (("agent", e.dimensions.get("agent")),) if grouped else ()
        groups.setdefault(group, []).append(e.value)
    return {g: (len(v), sum(v), min(v), max(v)) for g, v in groups.items()}


def _latest(store: PostgresStore, start: int, end: int) -> float | None:
    spec = AggregateSpec(("a",), "m", (Window(0, start, end),), (Measure("latest"),))
    rows = store.aggregate(spec)
    return rows[0].values[0] if rows else None


steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("append"),
            st.lists(
                st.tuples(
                    st.integers(0, 30),  # id: repeats are duplicates
                    st.integers(-HOUR_MS, 2 * DAY_MS),  # offset
                    st.integers(-5, 50),  # value
                    st.sampled_from([None, "x", "y"]),  # agent
                ),
                min_size=1,
                max_size=8,
            ),
            st.booleans(),  # which handle appends
        ),
        st.tuples(st.just("fold"), st.booleans(), st.booleans()),  # which handle, waiting
        st.tuples(
            st.just("query"),
            st.tuples(st.integers(-HOUR_MS, 2 * DAY_MS), st.integers(1, 2 * DAY_MS)),
            st.booleans(),  # grouped by agent (the slots) or not (hours and days)
        ),
    ),
    max_size=14,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=steps)
def test_appends_folds_and_queries_interleaved_equal_a_naive_fold(
    postgres_url: str, steps: list[tuple[object, ...]]
) -> None:
    first, second = _open(postgres_url), _open(postgres_url)
    try:
        empty_postgres(first)
        first.create_account(Account("a", "A"))
        kept: dict[str, Event] = {}
        for step in steps:
            if step[0] == "append":
                _, raw, which = step
                batch = [
                    Event(f"e{i}", "a", "m", BASE_MS + offset, float(value), True, None, dims)
                    for i, offset, value, agent in raw  # type: ignore[attr-defined]
                    for dims in [{"agent": agent} if agent else {}]
                ]
                (first if which else second).append(batch)
                for e in batch:
                    kept.setdefault(e.id, e)
            elif step[0] == "fold":
                _, which, wait = step
                (first if which else second).fold(wait=bool(wait))
            else:
                _, (offset, length), grouped = step  # type: ignore[misc]
                start = BASE_MS + offset
                group_by = ("agent",) if grouped else ()
                expected = _naive(list(kept.values()), start, start + length, grouped)
                for handle in (first, second):
                    assert _answer(handle, start, start + length, group_by) == expected
        # Whatever waited, folded: the same answers from the rollups alone.
        everything = _naive(list(kept.values()), BASE_MS - HOUR_MS, BASE_MS + 3 * DAY_MS)
        assert _answer(second, BASE_MS - HOUR_MS, BASE_MS + 3 * DAY_MS) == everything
        first.fold(wait=True)
        assert _waiting(first) == 0
        assert _answer(second, BASE_MS - HOUR_MS, BASE_MS + 3 * DAY_MS) == everything
    finally:
        first.close()
        second.close()


def test_one_handle_folds_while_the_other_ingests_and_queries(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    folder, writer = pair
    stop = threading.Event()
    folds: list[int] = []
    failures: list[BaseException] = []

    def fold_all_the_time() -> None:
        try:
            while not stop.is_set():
                moved = folder.fold()
                folds.append(moved or 0)
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=fold_all_the_time)
    thread.start()
    try:
        stored: list[Event] = []
        for n in range(40):
            # The busy account's current hour and day, as live traffic does; a retry of the
            # previous batch's last event now and then.
            batch = [
                Event(f"e{n}-{i}", "a", "m", BASE_MS + (n * 50 + i) * 1000, float(i % 7))
                for i in range(50)
            ]
            if n:
                batch.append(stored[-1])
            writer.append(batch)
            stored.extend(batch[:50])
            for handle in (writer, folder):
                expected = _naive(stored, BASE_MS, BASE_MS + DAY_MS)
                assert _answer(handle, BASE_MS, BASE_MS + DAY_MS) == expected
    finally:
        stop.set()
        thread.join()
    assert failures == []
    assert sum(folds) > 0  # the folder did move events while they were asked for
    writer.fold(wait=True)
    assert _waiting(writer) == 0
    assert _answer(folder, BASE_MS, BASE_MS + DAY_MS) == _naive(stored, BASE_MS, BASE_MS + DAY_MS)


def test_folds_racing_on_two_handles_move_each_event_once(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    first, second = pair
    stop = threading.Event()

    def fold(handle: PostgresStore) -> None:
        while not stop.is_set():
            handle.fold(wait=True)

    threads = [threading.Thread(target=fold, args=(h,)) for h in pair]
    for t in threads:
        t.start()
    try:
        events = [Event(f"e{i}", "a", "m", BASE_MS + i * 60_000, 1.0) for i in range(2_000)]
        for n in range(0, len(events), 100):
            (first if n % 200 else second).append(events[n : n + 100])
    finally:
        stop.set()
        for t in threads:
            t.join()
    first.fold(wait=True)
    assert _answer(second, BASE_MS, BASE_MS + 3 * DAY_MS) == {(): (2000, 2000.0, 1.0, 1.0)}


def _waiting_on_advisory_lock(url: str) -> None:
    """Return once some backend waits on an advisory lock (fail after 30 s)."""
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(3000):
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'advisory'"
            ).fetchone()
            if row and row[0]:
                return
            threading.Event().wait(0.01)
    raise AssertionError("no backend waited on the fold lock")


def test_folds_of_two_shards_run_at_once_and_a_correction_waits_for_both(
    pair: tuple[PostgresStore, PostgresStore], postgres_url: str
) -> None:
    first, second = pair
    of_a = [Event(f"a{i}", "a", "m", BASE_MS + i * HOUR_MS, float(i)) for i in range(10)]
    of_b = [Event(f"b{i}", "b", "m", BASE_MS + i * HOUR_MS, 2.0) for i in range(7)]
    first.append(of_a)
    second.append(of_b)
    with psycopg.connect(postgres_url) as holder:
        row = holder.execute("SELECT rid FROM accounts WHERE id = 'a'").fetchone()
        assert row is not None
        shard = int(row[0]) % FOLD_SHARDS
        row = holder.execute("SELECT rid FROM accounts WHERE id = 'b'").fetchone()
        assert row is not None and int(row[0]) % FOLD_SHARDS != shard
        # Another process folding a's shard, its transaction still open...
        holder.execute(
            "SELECT pg_advisory_xact_lock_shared(%s), pg_advisory_xact_lock(%s)",
            (FOLD_LOCK, FOLD_SHARD_LOCK + shard),
        )
        assert holder.execute(SHARD_FOLD_SQL, (shard,)).fetchone() == (10,)
        # ...this one folds the others meanwhile, and both see a's events still waiting.
        assert second.fold() == 7
        assert _waiting(first) == 10
        for handle in (first, second):
            expected = _naive(of_a, BASE_MS, BASE_MS + DAY_MS)
            assert _answer(handle, BASE_MS, BASE_MS + DAY_MS) == expected
        # A correction clears and refolds rollup cells: it waits for every fold to commit.
        voided: list[object] = []
        void = threading.Thread(
            target=lambda: voided.append(
                second.void_events(VoidSelector("a", ids=("a3",)), "test", None, BASE_MS)
            )
        )
        void.start()
        _waiting_on_advisory_lock(postgres_url)
        assert voided == []
        holder.commit()
    void.join()
    assert len(voided) == 1
    kept = [e for e in of_a if e.id != "a3"]
    assert _waiting(first) == 0
    for handle in (first, second):
        assert _answer(handle, BASE_MS, BASE_MS + DAY_MS) == _naive(kept, BASE_MS, BASE_MS + DAY_MS)


def test_a_tie_of_timestamps_goes_to_the_event_still_waiting(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    first, _ = pair
    hour = BASE_MS + 5 * HOUR_MS
    first.append([Event("e1", "a", "m", hour, 5.0), Event("e2", "a", "m", hour, 7.0)])
    assert _latest(first, BASE_MS, BASE_MS + DAY_MS) == 7.0
    first.fold(wait=True)
    # The later batch waits; the folded one has the same timestamp: the later one wins, as
    # it does once folded.
    first.append([Event("e3", "a", "m", hour, 3.0)])
    assert _latest(first, BASE_MS, BASE_MS + DAY_MS) == 3.0
    first.fold(wait=True)
    assert _latest(first, BASE_MS, BASE_MS + DAY_MS) == 3.0


def test_a_void_and_an_amend_of_events_still_waiting(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    first, second = pair
    folded = [Event(f"f{i}", "a", "m", BASE_MS + i * HOUR_MS, 10.0) for i in range(4)]
    waiting = [Event(f"w{i}", "a", "m", BASE_MS + i * HOUR_MS + 60_000, 1.0) for i in range(4)]
    first.append(folded)
    first.fold(wait=True)
    first.append(waiting)
    assert _waiting(first) == 4
    second.void_events(VoidSelector("a", ids=("w1", "f2")), "test", None, BASE_MS)
    kept = [e for e in folded + waiting if e.id not in ("w1", "f2")]
    assert _waiting(first) == 0  # the void folded what waited before its refold
    assert _answer(first, BASE_MS, BASE_MS + DAY_MS) == _naive(kept, BASE_MS, BASE_MS + DAY_MS)
    second.append([Event("w9", "a", "m", BASE_MS + 30 * 60_000, 2.0)])
    second.void_events(VoidSelector("a", ids=("w9",)), "test", None, BASE_MS, Amendment(5.0, "w9b"))
    amended = Event("w9b", "a", "m", BASE_MS + 30 * 60_000, 5.0)
    expected = _naive([*kept, amended], BASE_MS, BASE_MS + DAY_MS)
    assert _answer(first, BASE_MS, BASE_MS + DAY_MS) == expected
    # A retry of a voided event waiting when it was voided stays a duplicate.
    assert first.append([waiting[1]]).duplicates == 1
    first.fold(wait=True)
    assert _answer(second, BASE_MS, BASE_MS + DAY_MS) == expected


def test_retention_and_deletion_with_events_waiting(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    first, second = pair
    events = [Event(f"e{i}", "a", "m", BASE_MS + i * HOUR_MS, 1.0) for i in range(24)]
    first.append(events)
    first.append([Event("b1", "b", "m", BASE_MS, 1.0)])
    # Retention drops raw events, not usage: what waited still counts, folded or not.
    assert second.retain(BASE_MS + 12 * HOUR_MS) == 13
    assert _answer(first, BASE_MS, BASE_MS + DAY_MS) == _naive(events, BASE_MS, BASE_MS + DAY_MS)
    first.fold(wait=True)
    assert _answer(first, BASE_MS, BASE_MS + DAY_MS) == _naive(events, BASE_MS, BASE_MS + DAY_MS)
    # Deleting an account takes what of its usage waits too.
    first.append([Event("b2", "b", "m", BASE_MS, 1.0)])
    second.delete_account("b")
    with first._pool.connection() as conn:
        row = conn.execute("SELECT count(*) FROM unfolded WHERE account = 2").fetchone()
    assert row == (0,)
    assert first.metrics_seen(["a"]) == {"m": []}


def test_a_metric_seen_only_in_events_still_waiting(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    first, second = pair
    first.append([Event("e1", "a", "m", BASE_MS, dimensions={"agent": "x"})])
    assert _waiting(first) == 1
    assert second.metrics_seen(["a"]) == {"m": ["agent"]}
    assert second.metrics_seen(["b"]) == {}


def test_a_database_of_version_4_upgrades_with_its_usage(postgres_url: str) -> None:
    store = _open(postgres_url)
    empty_postgres(store)
    store.create_account(Account("a", "A"))
    events = [Event(f"e{i}", "a", "m", BASE_MS + i * HOUR_MS, 2.0) for i in range(30)]
    store.append(events)
    # Version 4 folded every batch as it stored it: its rollups hold everything.
    store.fold(wait=True)
    with store._pool.connection() as conn:
        conn.execute("DROP TABLE unfolded")
        conn.execute("DELETE FROM schema_version WHERE version > 4")
    store.close()
    store = _open(postgres_url)
    try:
        with psycopg.connect(postgres_url) as conn:
            row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        assert row == (SCHEMA_VERSION,)
        more = [Event(f"n{i}", "a", "m", BASE_MS + i * HOUR_MS, 1.0) for i in range(5)]
        store.append(more)
        expected = _naive(events + more, BASE_MS, BASE_MS + 2 * DAY_MS)
        assert _answer(store, BASE_MS, BASE_MS + 2 * DAY_MS) == expected
    finally:
        store.close()


def test_a_fold_leaves_the_global_random_state_alone(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    # A folder thread runs beside whatever the process does, property tests included, which
    # Hypothesis fails when the global random state moves under them.
    first, _ = pair
    first.append([Event("e1", "a", "m", BASE_MS), Event("e2", "b", "m", BASE_MS)])
    state = random.getstate()
    assert first.fold() == 2
    assert random.getstate() == state
