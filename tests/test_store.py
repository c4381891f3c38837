"""The SQLite store: atomic, idempotent, durable appends, and rollups that agree with the raw
events for any window, aligned or not."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from msgspec.structs import replace

from usagemeter.auth import issue_key
from usagemeter.model import Account, Event, Scope
from usagemeter.store.base import AggregateSpec, Measure, NotFound, Window
from usagemeter.store.schema import SCHEMA_VERSION
from usagemeter.store.sqlite import SQLiteStore

BASE_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
HOUR_MS = 3_600_000


def _accounts(store: SQLiteStore) -> None:
    store.create_account(Account("a", "A"))
    store.create_account(Account("b", "B", "a"))
    issue_key(store, "a", key_id="ka", scopes=[Scope.READ])
    issue_key(store, "b", key_id="kb", scopes=[Scope.READ])


def _event(i: int, account: str = "a", ts: int = BASE_MS, **fields: object) -> Event:
    return Event(id=f"e{i}", account_id=account, metric="m", ts_ms=ts, **fields)  # type: ignore[arg-type]


def _count(store: SQLiteStore, start: int, end: int, **spec: object) -> float | None:
    rows = store.aggregate(
        AggregateSpec(
            accounts=("a", "b"),
            metric="m",
            windows=(Window(0, start, end),),
            measures=(Measure("count"),),
            **spec,  # type: ignore[arg-type]
        )
    )
    return sum(r.values[0] or 0 for r in rows) if rows else 0


def test_append_dedupes_within_and_across_batches(store: SQLiteStore) -> None:
    _accounts(store)
    first = store.append([_event(1), _event(2), _event(1)])
    assert (first.accepted, first.duplicates) == (2, 1)
    retry = store.append([_event(1), _event(2), _event(3)])
    assert (retry.accepted, retry.duplicates) == (1, 2)
    # The same id in another account is another event.
    other = store.append([_event(1, account="b")])
    assert (other.accepted, other.duplicates) == (1, 0)
    assert store.count_events() == 4
    assert _count(store, BASE_MS, BASE_MS + HOUR_MS) == 4


def test_a_failing_batch_stores_nothing(store: SQLiteStore) -> None:
    _accounts(store)
    with pytest.raises(NotFound):
        store.append([_event(1), _event(2, account="nobody")])
    assert store.count_events() == 0
    assert _count(store, BASE_MS, BASE_MS + HOUR_MS) == 0
    # The ids of the failed batch are free: nothing of it was remembered.
    assert store.append([_event(1)]).accepted == 1


def test_acknowledged_events_survive_reopening(db_path: Path) -> None:
    store = SQLiteStore(db_path)
    _accounts(store)
    store.append([_event(i, ts=BASE_MS + i * 1000) for i in range(50)])
    store.close()
    reopened = SQLiteStore(db_path)
    assert reopened.count_events() == 50
    assert _count(reopened, BASE_MS, BASE_MS + HOUR_MS) == 50
    assert reopened.append([_event(0)]).duplicates == 1
    reopened.close()


def test_millisecond_bounds_read_the_ragged_ends(store: SQLiteStore) -> None:
    _accounts(store)
    store.append([_event(i, ts=BASE_MS + i) for i in range(10)])  # 0..9 ms past midnight
    assert _count(store, BASE_MS + 3, BASE_MS + 7) == 4
    assert _count(store, BASE_MS, BASE_MS + 15 * 60_000) == 10
    assert _count(store, BASE_MS - 1, BASE_MS + 1) == 1


def test_filters_keys_tags_billable(store: SQLiteStore) -> None:
    _accounts(store)
    store.append(
        [
            _event(1, key_id="ka", tags=frozenset({"x", "y"}), dimensions={"licensee": "l1"}),
            _event(2, key_id="ka", tags=frozenset({"x"}), billable=False),
            _event(3, account="b", key_id="kb", tags=frozenset({"x", "y", "z"})),
        ]
    )
    window = (BASE_MS, BASE_MS + HOUR_MS)
    assert _count(store, *window, key_id="ka") == 2
    assert _count(store, *window, tags=frozenset({"x", "y"})) == 2
    assert _count(store, *window, tags=frozenset({"x"})) == 3
    assert _count(store, *window, tags=frozenset({"nope"})) == 0
    assert _count(store, *window, billable=True) == 2
    assert _count(store, *window, filters=(("licensee", "l1"),)) == 1


def test_account_tree(store: SQLiteStore) -> None:
    _accounts(store)
    store.create_account(Account("c", "C", "b"))
    assert store.descendants("a") == ["a", "b", "c"]
    assert store.ancestors("c") == ["c", "b", "a"]
    with pytest.raises(NotFound):
        store.descendants("zzz")


# ---------------------------------------------------------------- the invariant

events_strategy = st.lists(
    st.builds(
        dict,
        id=st.integers(0, 60),
        account=st.sampled_from(["a", "b"]),
        offset=st.integers(0, 6 * HOUR_MS),
        value=st.integers(-5, 100),
        agent=st.sampled_from([None, "x", "y"]),
        session=st.sampled_from(["s1", "s2", "s3", "s4"]),
    ),
    max_size=60,
)
bounds = st.tuples(st.integers(-HOUR_MS, 7 * HOUR_MS), st.integers(1, 7 * HOUR_MS))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=events_strategy, batch_size=st.integers(1, 20), window=bounds)
def test_rollups_agree_with_a_naive_fold_of_the_events(
    tmp_path_factory: pytest.TempPathFactory,
    raw: list[dict[str, object]],
    batch_size: int,
    window: tuple[int, int],
) -> None:
    store = SQLiteStore(tmp_path_factory.mktemp("prop") / "p.db")
    _accounts(store)
    events = [
        Event(
            id=f"e{r['id']}",
            account_id=str(r["account"]),
            metric="m",
            ts_ms=BASE_MS + int(r["offset"]),  # type: ignore[call-overload]
            value=float(r["value"]),  # type: ignore[arg-type]
            dimensions={
                "session_id": str(r["session"]),
                **({"agent": str(r["agent"])} if r["agent"] else {}),
            },
        )
        for r in raw
    ]
    for i in range(0, len(events), batch_size):
        store.append(events[i : i + batch_size])
    # What was stored: the first event of each (account, id), in order.
    kept: dict[tuple[str, str], Event] = {}
    for e in events:
        kept.setdefault((e.account_id, e.id), e)
    start = BASE_MS + window[0]
    end = start + window[1]
    inside = [e for e in kept.values() if start <= e.ts_ms < end]

    measures = (
        Measure("count"),
        Measure("sum"),
        Measure("min"),
        Measure("max"),
        Measure("unique_count", "session_id"),
    )
    rows = store.aggregate(
        AggregateSpec(("a", "b"), "m", (Window(0, start, end),), measures, group_by=("agent",))
    )
    got = {r.group: r.values for r in rows}
    expected = {}
    for agent in {e.dimensions.get("agent") for e in inside}:
        members = [e for e in inside if e.dimensions.get("agent") == agent]
        expected[(("agent", agent),)] = (
            len(members),
            sum(e.value for e in members),
            min(e.value for e in members),
            max(e.value for e in members),
            len({e.dimensions["session_id"] for e in members}),
        )
    assert got == expected

    latest = store.aggregate(
        AggregateSpec(("a", "b"), "m", (Window(0, start, end),), (Measure("latest"),))
    )
    if inside:
        newest = max(e.ts_ms for e in inside)
        assert latest[0].values[0] in {e.value for e in inside if e.ts_ms == newest}
    else:
        assert latest == []
    store.close()


DAY_MS = 24 * HOUR_MS


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    offsets=st.lists(st.tuples(st.integers(0, 4 * DAY_MS), st.integers(0, 50)), max_size=50),
    windows=st.lists(
        st.tuples(st.integers(-HOUR_MS, 4 * DAY_MS), st.integers(1, 2 * DAY_MS)),
        min_size=1,
        max_size=4,
    ),
    by_key=st.booleans(),
)
def test_day_and_hour_rollups_agree_with_the_events(
    tmp_path_factory: pytest.TempPathFactory,
    offsets: list[tuple[int, int]],
    windows: list[tuple[int, int]],
    by_key: bool,
) -> None:
    """Windows of any length and alignment, answered from days, hours, slots and raw
    events together, equal a naive fold; so do latest values across those pieces."""
    store = SQLiteStore(tmp_path_factory.mktemp("grains") / "g.db")
    _accounts(store)
    events = [
        Event(
            f"e{i}",
            "a" if i % 2 else "b",
            "m",
            BASE_MS + off,
            value=float(v),
            key_id=("ka" if i % 2 else "kb") if i % 3 else None,
        )
        for i, (off, v) in enumerate(offsets)
    ]
    store.append(events)
    # Disjoint windows, as the engine sends them.
    spans: list[Window] = []
    cursor = BASE_MS - HOUR_MS
    for n, (gap, length) in enumerate(windows):
        start = cursor + abs(gap) % DAY_MS
        spans.append(Window(n, start, start + length))
        cursor = start + length
    measures = (Measure("count"), Measure("sum"), Measure("max"))
    rows = store.aggregate(
        AggregateSpec(("a", "b"), "m", tuple(spans), measures, group_by=("key",) if by_key else ())
    )
    got = {(r.window, r.group): r.values for r in rows}
    expected = {}
    for w in spans:
        inside = [e for e in events if w.start_ms <= e.ts_ms < w.end_ms]
        for group in {(("key", e.key_id),) if by_key else () for e in inside}:
            members = [e for e in inside if not by_key or (("key", e.key_id),) == group]
            expected[(w.index, group)] = (
                len(members),
                sum(e.value for e in members),
                max(e.value for e in members),
            )
    assert got == expected
    latest = store.aggregate(AggregateSpec(("a", "b"), "m", tuple(spans), (Measure("latest"),)))
    for row in latest:
        w = spans[row.window]
        inside = [e for e in events if w.start_ms <= e.ts_ms < w.end_ms]
        newest = max(e.ts_ms for e in inside)
        assert row.values[0] in {e.value for e in inside if e.ts_ms == newest}
    store.close()


def test_concurrent_batches_commit_together_and_fail_alone(store: SQLiteStore) -> None:
    """Batches from many threads share commits; one bad batch fails alone, and a retried
    batch racing its first try is still counted once."""
    import threading

    _accounts(store)
    results: dict[int, object] = {}

    def send(n: int) -> None:
        account = "nobody" if n == 7 else "a"
        batch = [_event(n * 100 + i, account=account, ts=BASE_MS + i) for i in range(50)]
        if n == 9:  # a retry of batch 3
            batch = [_event(300 + i, ts=BASE_MS + i) for i in range(50)]
        try:
            results[n] = store.append(batch)
        except NotFound as exc:
            results[n] = exc

    threads = [threading.Thread(target=send, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert isinstance(results[7], NotFound)
    accepted = sum(r.accepted for r in results.values() if not isinstance(r, Exception))  # type: ignore[attr-defined]
    duplicates = sum(r.duplicates for r in results.values() if not isinstance(r, Exception))  # type: ignore[attr-defined]
    assert (accepted, duplicates) == (10 * 50, 50)
    assert store.count_events() == 500
    assert _count(store, BASE_MS, BASE_MS + HOUR_MS) == 500


def test_a_file_of_an_older_schema_gets_its_rollups_rebuilt(db_path: Path) -> None:
    store = SQLiteStore(db_path)
    _accounts(store)
    store.append([_event(i, ts=BASE_MS + i * HOUR_MS) for i in range(48)])
    store.fold()
    # As an older version left it: another user_version, and rollups it did not keep.
    store._writer.execute("DELETE FROM rollup_day")
    store._writer.execute("DELETE FROM rollup_hour_key")
    store._writer.execute("PRAGMA user_version = 1")
    store.close()
    reopened = SQLiteStore(db_path)
    assert reopened._writer.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert _count(reopened, BASE_MS, BASE_MS + 2 * 24 * HOUR_MS) == 48
    reopened.close()


@pytest.mark.parametrize(
    "change",
    [
        {"metric": "other"},
        {"ts_ms": BASE_MS + 1},
        {"value": 2.0},
        {"billable": False},
        {"key_id": "ka"},
        {"dimensions": {"agent": "x"}},
        {"tags": frozenset({"t"})},
    ],
)
def test_a_repeat_that_differs_in_any_field_is_a_conflict(
    store: SQLiteStore, change: dict[str, object]
) -> None:
    _accounts(store)
    original = _event(1, dimensions={"agent": "a"}, tags=frozenset({"s"}))
    assert store.append([original]).conflicts == ()
    changed = replace(original, **change)  # type: ignore[arg-type]
    result = store.append([_event(2), original, changed])
    assert (result.accepted, result.duplicates, result.conflicts) == (1, 2, (2,))
    # The stored event stays as first received.
    assert next(iter(store.iter_events())) == original
    # Within one batch too: the first of an id is stored, a later different one conflicts.
    fresh = replace(original, id="e9")
    inside = store.append([fresh, fresh, replace(changed, id="e9")])
    assert (inside.accepted, inside.duplicates, inside.conflicts) == (1, 2, (2,))
