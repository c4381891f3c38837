"""The store conformance suite: what every adapter promises, run over every adapter.

A new adapter joins by adding its kind to conftest.STORES and an ``Adapter`` below: how to
open a second handle on the same data (another process, as far as the store can tell), and
how to make its data look as the previous schema version left it.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import (
    CHDB_LATER,
    STORES,
    empty_postgres,
    make_database,
    open_at_once,
    open_clickhouse,
    open_clickhouse_later,
    open_test_store,
)
from usagemeter.auth import authenticate, issue_key
from usagemeter.corrections import VoidSelector
from usagemeter.model import Account, AppendResult, Event, Scope
from usagemeter.store import open_store
from usagemeter.store.base import (
    OVERALL,
    TOTAL,
    AggregateSpec,
    Conflict,
    Measure,
    NotFound,
    Store,
    Window,
)
from usagemeter.store.pgschema import SCHEMA_VERSION as PG_VERSION
from usagemeter.store.postgres import PostgresStore
from usagemeter.store.schema import SCHEMA_VERSION as SQLITE_VERSION
from usagemeter.store.sqlite import SQLiteStore

BASE_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


@dataclass
class Adapter:
    kind: str
    reopen: Callable[[], Store]  # another handle on the same data
    age: Callable[[Store], None]  # leave the data as the previous schema version did
    version: Callable[[Store], int]


def _age_sqlite(store: Store) -> None:
    assert isinstance(store, SQLiteStore)
    # Version 1 kept no whole-day rollups and fewer keyed hours.
    store._writer.execute("DELETE FROM rollup_day")
    store._writer.execute("DELETE FROM rollup_hour_key")
    store._writer.execute("PRAGMA user_version = 1")


def _age_postgres(store: Store) -> None:
    assert isinstance(store, PostgresStore)
    # Version 1 had no hour or day rollups at all, and no events waiting to be folded: a
    # store of then folded every batch as it stored it.
    store.fold(wait=True)
    with store._pool.connection() as conn:
        conn.execute(
            "DROP TABLE rollup_hour_key, rollup_day_key, rollup_hour, rollup_day, unfolded,"
            " rollup_values"
        )
        conn.execute("DELETE FROM schema_version WHERE version > %s", (1,))


def _sqlite_version(store: Store) -> int:
    assert isinstance(store, SQLiteStore)
    return int(store._writer.execute("PRAGMA user_version").fetchone()[0])


def _no_schema_versions(store: Store) -> int:
    pytest.skip("ClickHouse's databases are upgraded table by table (chupgrade.py)")


def _postgres_version(store: Store) -> int:
    assert isinstance(store, PostgresStore)
    with store._pool.connection() as conn:
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    assert row is not None
    return int(row[0])


# The ClickHouse store's databases that fold their rollups after the acknowledgement too.
KINDS = [*STORES, CHDB_LATER]


@pytest.fixture(params=KINDS)
def adapter(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Adapter]:
    """An adapter whose first handle is empty; every handle it opens is closed after."""
    opened: list[Store] = []

    def track(store: Store) -> Store:
        opened.append(store)
        return store

    if request.param == "sqlite":
        path = tmp_path / "conformance.db"
        yield Adapter(
            "sqlite",
            lambda: track(SQLiteStore(path)),
            _age_sqlite,
            _sqlite_version,
        )
    elif request.param == "chdb":
        home = request.getfixturevalue("clickhouse_home")
        track(open_clickhouse(home))
        yield Adapter(
            "chdb", lambda: track(open_store(home)), _no_schema_versions, _no_schema_versions
        )
    elif request.param == CHDB_LATER:
        home = request.getfixturevalue("clickhouse_home")
        track(open_clickhouse_later(home))
        yield Adapter(
            CHDB_LATER,
            lambda: track(open_clickhouse_later(home, empty=False)),
            _no_schema_versions,
            _no_schema_versions,
        )
    else:
        url = request.getfixturevalue("postgres_url")
        empty_postgres(track(PostgresStore(url)))
        yield Adapter(
            "postgres", lambda: track(PostgresStore(url)), _age_postgres, _postgres_version
        )
    for store in opened:
        store.close()


def _accounts(store: Store) -> None:
    store.create_account(Account("a", "A"))
    store.create_account(Account("b", "B", "a"))
    issue_key(store, "a", key_id="ka", scopes=[Scope.READ])
    issue_key(store, "b", key_id="kb", scopes=[Scope.READ])


def _event(i: int | str, account: str = "a", ts: int = BASE_MS, **fields: object) -> Event:
    return Event(id=f"e{i}", account_id=account, metric="m", ts_ms=ts, **fields)  # type: ignore[arg-type]


def _count(store: Store, start: int = BASE_MS, end: int = BASE_MS + 40 * DAY_MS) -> float:
    rows = store.aggregate(
        AggregateSpec(("a", "b"), "m", (Window(0, start, end),), (Measure("count"),))
    )
    return sum(r.values[0] or 0 for r in rows)


# ---------------------------------------------------------------- batches


def test_a_batch_is_stored_whole_or_not_at_all(adapter: Adapter) -> None:
    store = adapter.reopen()
    _accounts(store)
    for bad in (
        [_event(1), _event(2, account="nobody")],
        [_event(1), _event(2, key_id="no-such-key")],
    ):
        with pytest.raises(NotFound):
            store.append(bad)
    assert store.count_events() == 0 and _count(store) == 0
    # Nothing of the failed batches was remembered: their ids are free.
    assert store.append([_event(1), _event(2)]) == AppendResult(2, 0)
    assert list(store.iter_events()) == [_event(1), _event(2)]


def test_an_id_counts_once_forever_whatever_its_month(adapter: Adapter) -> None:
    store = adapter.reopen()
    _accounts(store)
    assert store.append([_event(1), _event(2, ts=BASE_MS + 35 * DAY_MS)]).accepted == 2
    # The same ids months later (another partition, where there are partitions) are retries.
    later = [_event(1, ts=BASE_MS + 70 * DAY_MS), _event(2, ts=BASE_MS - 300 * DAY_MS)]
    assert store.append(later).duplicates == 2
    # The same id in another account is another event.
    assert store.append([_event(1, account="b")]).accepted == 1
    assert store.count_events() == 3


def test_a_second_handle_sees_every_acknowledged_event(adapter: Adapter) -> None:
    """Read-your-writes across handles (processes): acknowledged means visible everywhere."""
    first, second = adapter.reopen(), adapter.reopen()
    _accounts(first)
    for n in range(5):
        first.append([_event(f"{n}-{i}", ts=BASE_MS + i * HOUR_MS) for i in range(10)])
        assert _count(second) == (n + 1) * 10
        assert second.count_events() == (n + 1) * 10


def test_the_same_batches_racing_on_two_handles_count_once(adapter: Adapter) -> None:
    """Two processes get the same batches at the same moment (a client retrying against the
    other one); every event is stored and counted exactly once, and the results add up."""
    if adapter.kind in ("chdb", CHDB_LATER):
        # The ClickHouse store's documented window (clickhouse.py): batches sharing ids looked
        # up at two processes before either inserted, grouped differently, are both stored.
        pytest.skip("ClickHouse: route an account's ingest to one process (docs/clickhouse.md)")
    handles = [adapter.reopen(), adapter.reopen()]
    _accounts(handles[0])
    batches = [
        [_event(f"{b}-{i}", account="ab"[i % 2], ts=BASE_MS + i * 60_000) for i in range(40)]
        for b in range(8)
    ]
    results: list[AppendResult] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def send(store: Store, order: list[list[Event]]) -> None:
        start.wait()
        for batch in order:
            result = store.append(batch)
            with lock:
                results.append(result)

    threads = [
        threading.Thread(target=send, args=(handles[n % 2], batches[:: 1 if n < 2 else -1]))
        for n in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.accepted for r in results) == 8 * 40
    assert sum(r.duplicates for r in results) == 3 * 8 * 40
    for store in handles:
        assert store.count_events() == 8 * 40
        assert _count(store) == 8 * 40


# ---------------------------------------------------------------- conflicts


def test_a_gauge_keeps_the_latest_value_and_the_later_event_on_a_tie(adapter: Adapter) -> None:
    store = adapter.reopen()
    _accounts(store)
    hour = BASE_MS + 5 * HOUR_MS

    def latest() -> float | None:
        spec = AggregateSpec(
            ("a",), "m", (Window(0, BASE_MS, BASE_MS + DAY_MS),), (Measure("latest"),)
        )
        return store.aggregate(spec)[0].values[0]

    # Within one batch, the same ts: the later event wins, at every grain (the day's rows).
    store.append([_event(1, ts=hour, value=5.0), _event(2, ts=hour, value=7.0)])
    assert latest() == 7.0
    # A later batch: an older ts changes nothing; the same ts wins again.
    store.append([_event(3, ts=hour - 1, value=100.0)])
    assert latest() == 7.0
    store.append([_event(4, ts=hour, value=3.0), _event(5, ts=hour - HOUR_MS, value=9.0)])
    assert latest() == 3.0


def test_a_known_id_with_another_payload_is_a_conflict(adapter: Adapter) -> None:
    store = adapter.reopen()
    _accounts(store)
    assert store.append([_event(1, value=5.0), _event(2)]).conflicts == ()
    result = store.append(
        [
            _event(1, value=5.0),  # a plain retry
            _event(2, value=7.0),  # the same id, another value: a conflict
            _event(3, dimensions={"agent": "x"}),
            _event(3, dimensions={"agent": "y"}),  # repeats an id earlier in this batch
            _event(3, dimensions={"agent": "x"}),  # a retry within the batch
            _event(4, tags=frozenset({"t"})),
            _event(4, tags=frozenset({"u"})),
        ]
    )
    assert result == AppendResult(2, 5, (1, 3, 6))
    # The stored event stays as first received.
    kept = {e.id: e for e in store.iter_events()}
    assert kept["e2"].value == 1.0 and kept["e3"].dimensions == {"agent": "x"}
    assert kept["e4"].tags == frozenset({"t"})


def test_every_field_of_the_payload_counts_for_a_conflict(adapter: Adapter) -> None:
    store = adapter.reopen()
    _accounts(store)
    original = Event("e1", "a", "m", BASE_MS, 1.0, True, "ka", {"d": "1"}, frozenset({"t"}))
    store.append([original])
    variants = [
        Event("e1", "a", "m2", BASE_MS, 1.0, True, "ka", {"d": "1"}, frozenset({"t"})),
        Event("e1", "a", "m", BASE_MS + 1, 1.0, True, "ka", {"d": "1"}, frozenset({"t"})),
        Event("e1", "a", "m", BASE_MS, 2.0, True, "ka", {"d": "1"}, frozenset({"t"})),
        Event("e1", "a", "m", BASE_MS, 1.0, False, "ka", {"d": "1"}, frozenset({"t"})),
        Event("e1", "a", "m", BASE_MS, 1.0, True, None, {"d": "1"}, frozenset({"t"})),
        Event("e1", "a", "m", BASE_MS, 1.0, True, "ka", {"d": "2"}, frozenset({"t"})),
        Event("e1", "a", "m", BASE_MS, 1.0, True, "ka", {"d": "1"}, frozenset()),
    ]
    for variant in variants:
        assert store.append([variant]) == AppendResult(0, 1, (0,)), variant
    assert store.append([original]) == AppendResult(0, 1, ())


# ---------------------------------------------------------------- accounts and keys


def test_accounts_and_keys(adapter: Adapter) -> None:
    store, other = adapter.reopen(), adapter.reopen()
    _accounts(store)
    store.create_account(Account("c", "C", "b"))
    assert [a.id for a in other.list_accounts()] == ["a", "b", "c"]
    assert other.get_account("c").parent_id == "b"
    assert other.descendants("a") == ["a", "b", "c"] and other.ancestors("c") == ["c", "b", "a"]
    for missing in (other.get_account, other.descendants, other.ancestors):
        with pytest.raises(NotFound):
            missing("zzz")
    with pytest.raises(Conflict):
        other.create_account(Account("a", "again"))
    with pytest.raises(NotFound):
        other.create_account(Account("d", "D", "ghost"))

    _, secret = issue_key(store, "a", key_id="k2", scopes=[Scope.READ, Scope.INGEST])
    assert [k.id for k in other.list_keys("a")] == ["ka", "k2"]
    with pytest.raises(Conflict):
        issue_key(other, "a", key_id="k2")
    # A key revoked through one handle is revoked for every other at once: nothing caches it.
    found = authenticate(other, secret)
    assert found is not None and found.id == "k2"
    store.revoke_key("k2")
    assert other.get_key("k2").revoked_at is not None
    assert authenticate(other, secret) is None


# ---------------------------------------------------------------- schema


def test_a_database_of_the_previous_schema_is_migrated(adapter: Adapter) -> None:
    store = adapter.reopen()
    _accounts(store)
    store.append([_event(i, ts=BASE_MS + i * HOUR_MS, key_id="ka") for i in range(72)])
    adapter.age(store)
    store.close()
    reopened = adapter.reopen()
    assert adapter.version(reopened) == (
        PG_VERSION if adapter.kind == "postgres" else SQLITE_VERSION
    )
    # Whole days, hours and keyed questions: answered by the rebuilt rollups.
    assert _count(reopened, BASE_MS, BASE_MS + 3 * DAY_MS) == 72
    rows = reopened.aggregate(
        AggregateSpec(
            ("a",), "m", (Window(0, BASE_MS, BASE_MS + DAY_MS),), (Measure("count"),), key_id="ka"
        )
    )
    assert [r.values for r in rows] == [(24,)]


def test_processes_starting_at_once_migrate_once(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Several processes open a new PostgreSQL database together; the advisory lock queues
    them, and the schema is created exactly once."""
    url = make_database(request.getfixturevalue("postgres_server"), "usagemeter_race")
    stores = open_at_once(lambda: PostgresStore(url, pool_size=1), 4)
    assert len(stores) == 4
    with psycopg.connect(url) as conn:
        versions = conn.execute("SELECT version FROM schema_version ORDER BY 1").fetchall()
    assert versions == [(v,) for v in range(1, PG_VERSION + 1)]
    for store in stores:
        store.close()


# ---------------------------------------------------------------- the invariant

events_strategy = st.lists(
    st.tuples(
        st.integers(0, 40),  # id
        st.sampled_from(["a", "b"]),
        st.integers(-DAY_MS, 3 * DAY_MS),  # offset: spans days, and a month boundary
        st.integers(-5, 100),  # value
        st.sampled_from([None, "x", "y"]),  # agent
        st.sampled_from(["s1", "s2", "s3"]),  # session
        st.booleans(),  # billable
    ),
    max_size=50,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    raw=events_strategy,
    batch_size=st.integers(1, 20),
    window=st.tuples(st.integers(-2 * DAY_MS, 3 * DAY_MS), st.integers(1, 3 * DAY_MS)),
    grouped=st.booleans(),
    billable=st.sampled_from([None, True, False]),
)
def test_aggregates_equal_a_naive_fold_of_the_events(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    store_kind: str,
    raw: list[tuple[int, str, int, int, str | None, str, bool]],
    batch_size: int,
    window: tuple[int, int],
    grouped: bool,
    billable: bool | None,
) -> None:
    store = open_test_store(store_kind, request, tmp_path_factory.mktemp("fold") / "f.db")
    try:
        _check_fold(store, raw, batch_size, window, grouped, billable)
    finally:
        store.close()


def _check_fold(
    store: Store,
    raw: list[tuple[int, str, int, int, str | None, str, bool]],
    batch_size: int,
    window: tuple[int, int],
    grouped: bool,
    billable: bool | None,
) -> None:
    _accounts(store)
    # Around the new year: a window crosses a month boundary (and a partition's, where
    # there are partitions).
    base = BASE_MS
    events = [
        Event(
            f"e{i}",
            account,
            "m",
            base + offset,
            float(value),
            flag,
            "ka" if account == "a" and i % 3 == 0 else None,
            {"session_id": session, **({"agent": agent} if agent else {})},
        )
        for i, account, offset, value, agent, session, flag in raw
    ]
    for i in range(0, len(events), batch_size):
        store.append(events[i : i + batch_size])
    kept: dict[tuple[str, str], Event] = {}
    for e in events:
        kept.setdefault((e.account_id, e.id), e)
    start = base + window[0]
    end = start + window[1]
    inside = [
        e
        for e in kept.values()
        if start <= e.ts_ms < end and (billable is None or e.billable is billable)
    ]
    group_by = ("agent",) if grouped else ("key",)

    def group_of(e: Event) -> tuple[tuple[str, str | None], ...]:
        return (("agent", e.dimensions.get("agent")),) if grouped else (("key", e.key_id),)

    measures = [Measure("count"), Measure("sum"), Measure("min"), Measure("max")]
    if grouped:
        measures.append(Measure("unique_count", "session_id"))
    rows = store.aggregate(
        AggregateSpec(
            ("a", "b"),
            "m",
            (Window(0, start, end),),
            tuple(measures),
            group_by=group_by,
            billable=billable,
        )
    )
    expected = {}
    for group in {group_of(e) for e in inside}:
        members = [e for e in inside if group_of(e) == group]
        values: tuple[float, ...] = (
            len(members),
            sum(e.value for e in members),
            min(e.value for e in members),
            max(e.value for e in members),
        )
        if grouped:
            values += (len({e.dimensions["session_id"] for e in members}),)
        expected[group] = values
    assert {r.group: r.values for r in rows} == expected

    latest = store.aggregate(
        AggregateSpec(
            ("a", "b"), "m", (Window(0, start, end),), (Measure("latest"),), billable=billable
        )
    )
    if inside:
        newest = max(e.ts_ms for e in inside)
        assert latest[0].values[0] in {e.value for e in inside if e.ts_ms == newest}
    else:
        assert latest == []
    assert sorted(store.iter_events(), key=lambda e: (e.account_id, e.id)) == sorted(
        kept.values(), key=lambda e: (e.account_id, e.id)
    )


@pytest.fixture(params=KINDS)
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    raw=events_strategy,
    cuts=st.lists(st.integers(-2 * DAY_MS, 3 * DAY_MS), min_size=2, max_size=6, unique=True),
    gaps=st.lists(st.booleans(), min_size=5, max_size=5),
    grouped=st.booleans(),
)
def test_totals_asked_beside_the_windows_equal_a_naive_fold(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    store_kind: str,
    raw: list[tuple[int, str, int, int, str | None, str, bool]],
    cuts: list[int],
    gaps: list[bool],
    grouped: bool,
) -> None:
    """A spec with ``totals`` answers each window, each group over all the windows (TOTAL)
    and, grouped, everything together (OVERALL): a distinct count and a latest value over
    the windows, never a fold of the windows' own."""
    store = open_test_store(store_kind, request, tmp_path_factory.mktemp("totals") / "t.db")
    try:
        _accounts(store)
        events = [
            Event(f"e{i}", account, "m", BASE_MS + offset, float(value), flag, None, dims)
            for i, account, offset, value, agent, session, flag in raw
            for dims in [{"session_id": session, **({"agent": agent} if agent else {})}]
        ]
        store.append(events)
        kept: dict[tuple[str, str], Event] = {}
        for e in events:
            kept.setdefault((e.account_id, e.id), e)
        # Consecutive stretches between the cut points, some left out (a gap between
        # windows), each a window of the spec.
        edges = sorted(BASE_MS + c for c in cuts)
        spans = [
            (lo, hi)
            for (lo, hi), gap in zip(itertools.pairwise(edges), gaps, strict=False)
            if not gap
        ]
        spans = spans or [(edges[0], edges[1])]
        windows = tuple(Window(n, lo, hi) for n, (lo, hi) in enumerate(spans))
        group_by = ("agent",) if grouped else ()
        measures = (Measure("count"), Measure("sum"), Measure("unique_count", "session_id"))
        spec = AggregateSpec(("a", "b"), "m", windows, measures, group_by, totals=True)
        rows = store.aggregate(spec)
        latest = store.aggregate(replace(spec, measures=(Measure("latest"),)))

        def group_of(e: Event) -> tuple[tuple[str, str | None], ...]:
            return (("agent", e.dimensions.get("agent")),) if grouped else ()

        expected: dict[tuple[int, Any], tuple[float, ...]] = {}
        newest: dict[tuple[int, Any], set[float]] = {}

        def fold(cell: tuple[int, Any], members: list[Event]) -> None:
            if not members:
                return
            sessions = {e.dimensions["session_id"] for e in members}
            expected[cell] = (len(members), sum(e.value for e in members), len(sessions))
            last = max(e.ts_ms for e in members)
            newest[cell] = {e.value for e in members if e.ts_ms == last}

        inside = [
            e for e in kept.values() if any(w.start_ms <= e.ts_ms < w.end_ms for w in windows)
        ]
        for group in {group_of(e) for e in inside}:
            members = [e for e in inside if group_of(e) == group]
            fold((TOTAL, group), members)
            for w in windows:
                fold((w.index, group), [e for e in members if w.start_ms <= e.ts_ms < w.end_ms])
        if grouped:
            fold((OVERALL, ()), inside)
        assert {(r.window, r.group): r.values for r in rows} == expected
        assert {(r.window, r.group) for r in latest} == set(newest)
        for r in latest:
            assert r.values[0] in newest[(r.window, r.group)]
    finally:
        store.close()


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    raw=st.lists(
        st.tuples(
            st.sampled_from(["a", "b"]),
            st.integers(-DAY_MS, 2 * DAY_MS),  # offset
            st.sampled_from(
                [None, "s1", "s2", "s3", "s4", "s5"]
            ),  # session (None: no such dimension)
            st.sampled_from([None, "x"]),  # another dimension, never counted
            st.booleans(),  # billable
        ),
        max_size=40,
    ),
    cuts=st.lists(st.integers(-DAY_MS, 2 * DAY_MS), min_size=2, max_size=5, unique=True),
    folded=st.integers(0, 40),
    billable=st.sampled_from([None, True, False]),
    by_subaccount=st.booleans(),
)
# Raw events at a ragged end while events wait: the raw rows once carried a column the value
# rows did not (a statement PostgreSQL refused).
@example(
    raw=[("a", 0, None, None, False)],
    cuts=[0, 900_001],
    folded=0,
    billable=None,
    by_subaccount=False,
)
def test_a_distinct_count_alone_equals_a_naive_fold(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    store_kind: str,
    raw: list[tuple[str, int, str | None, str | None, bool]],
    cuts: list[int],
    folded: int,
    billable: bool | None,
    by_subaccount: bool,
) -> None:
    """One distinct count, alone, of the whole account or per subaccount: the question
    PostgreSQL answers from its distinct values per hour (whole hours) with slots and raw
    events at ragged ends, and events still waiting to be folded beside them. Windows whose
    events all lack the dimension count 0, as a fold of the events says."""
    store = open_test_store(store_kind, request, tmp_path_factory.mktemp("distinct") / "d.db")
    try:
        _accounts(store)
        events = [
            Event(
                f"e{i}",
                account,
                "m",
                BASE_MS + offset,
                1.0,
                flag,
                None,
                {
                    **({"session_id": session} if session else {}),
                    **({"agent": agent} if agent else {}),
                },
            )
            for i, (account, offset, session, agent, flag) in enumerate(raw)
        ]
        # Some events folded into the rollups, the rest still waiting (where a store folds
        # later, as PostgreSQL's does).
        store.append(events[:folded])
        if isinstance(store, PostgresStore):
            store.fold(wait=True)
        store.append(events[folded:])
        edges = sorted(BASE_MS + c for c in cuts)
        windows = tuple(Window(n, lo, hi) for n, (lo, hi) in enumerate(itertools.pairwise(edges)))
        group_by = ("subaccount",) if by_subaccount else ()
        spec = AggregateSpec(
            ("a", "b"),
            "m",
            windows,
            (Measure("unique_count", "session_id"),),
            group_by,
            billable=billable,
            totals=True,
        )
        rows = store.aggregate(spec)

        def group_of(e: Event) -> tuple[tuple[str, str], ...]:
            return (("subaccount", e.account_id),) if by_subaccount else ()

        inside = [
            e
            for e in events
            if any(w.start_ms <= e.ts_ms < w.end_ms for w in windows)
            and (billable is None or e.billable is billable)
        ]
        expected: dict[tuple[int, Any], tuple[float, ...]] = {}

        def fold(cell: tuple[int, Any], members: list[Event]) -> None:
            if members:
                sessions = {e.dimensions.get("session_id") for e in members}
                expected[cell] = (len(sessions - {None}),)

        for group in {group_of(e) for e in inside}:
            members = [e for e in inside if group_of(e) == group]
            fold((TOTAL, group), members)
            for w in windows:
                fold((w.index, group), [e for e in members if w.start_ms <= e.ts_ms < w.end_ms])
        if by_subaccount:
            fold((OVERALL, ()), inside)
        assert {(r.window, r.group): r.values for r in rows} == expected
    finally:
        store.close()


def test_a_distinct_count_of_events_without_the_dimension_is_zero(store: Store) -> None:
    """Whole hours of events that lack the counted dimension: the window counts 0 (it had
    events), and a window without events has no row, on every store and grain."""
    _accounts(store)
    store.append([_event(i, ts=BASE_MS + i * HOUR_MS, dimensions={"agent": "x"}) for i in range(3)])
    store.append([_event("s", ts=BASE_MS + 5 * HOUR_MS, dimensions={"session_id": "s1"})])
    windows = tuple(
        Window(n, BASE_MS + n * 3 * HOUR_MS, BASE_MS + (n + 1) * 3 * HOUR_MS) for n in range(3)
    )
    spec = AggregateSpec(
        ("a",), "m", windows, (Measure("unique_count", "session_id"),), totals=True
    )
    for _ in range(2):  # waiting, then folded (where a store folds later)
        rows = store.aggregate(spec)
        assert {(r.window, r.values) for r in rows} == {(0, (0,)), (1, (1,)), (TOTAL, (1,))}
        if isinstance(store, PostgresStore):
            store.fold(wait=True)


# ---------------------------------------------------------------- a latest value tied across cells

# Times near one another, so that events of different dimension sets, tag sets and keys tie
# at one millisecond: in one quarter hour, the next one, the next hour.
TIE_HOUR = BASE_MS + 5 * HOUR_MS
TIE_TIMES = (TIE_HOUR + 2, TIE_HOUR + 2, TIE_HOUR + 900_002, TIE_HOUR + HOUR_MS + 7)
TIE_WINDOWS = {
    "hours": (
        Window(0, TIE_HOUR, TIE_HOUR + HOUR_MS),
        Window(1, TIE_HOUR + HOUR_MS, TIE_HOUR + 2 * HOUR_MS),
    ),
    "ragged": (Window(0, TIE_HOUR + 1, TIE_HOUR + HOUR_MS + 8),),
    "day": (Window(0, BASE_MS, BASE_MS + DAY_MS),),
}
# Questions read by the slots (a group by a dimension, a tag), the key hours and days (by
# key), the account hours and days (neither).
TIE_QUESTIONS: dict[str, dict[str, Any]] = {
    "status": {"group_by": ("status",)},
    "key": {"group_by": ("key",)},
    "tagged": {"tags": frozenset({"x"})},
    "plain": {},
}


def _tie_cells(
    events: list[Event], windows: tuple[Window, ...], question: dict[str, Any]
) -> dict[tuple[int, tuple[tuple[str, str | None], ...]], float]:
    """The latest value of each (window, group), TOTAL per group and OVERALL: the greatest
    (timestamp, order stored), as tests/reference.py folds it."""
    tags = question.get("tags", frozenset())
    grouped = question.get("group_by", ())

    def group_of(e: Event) -> tuple[tuple[str, str | None], ...]:
        if grouped == ("status",):
            return (("status", e.dimensions["status"]),)
        return (("key", e.key_id),) if grouped == ("key",) else ()

    cells: dict[tuple[int, tuple[tuple[str, str | None], ...]], tuple[int, int, float]] = {}
    for order, e in enumerate(events):
        if not tags <= e.tags:
            continue
        for w in windows:
            if w.start_ms <= e.ts_ms < w.end_ms:
                group = group_of(e)
                cells_of = [(w.index, group), (TOTAL, group)]
                if grouped:
                    cells_of.append((OVERALL, ()))
                for cell in cells_of:
                    cells[cell] = max(cells.get(cell, (-1, -1, 0.0)), (e.ts_ms, order, e.value))
    return {cell: value for cell, (_, _, value) in cells.items()}


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sent=st.lists(
        st.tuples(
            st.integers(0, len(TIE_TIMES) - 1),
            st.sampled_from(["200", "500"]),
            st.sampled_from([(), ("x",), ("x", "y")]),
            st.sampled_from([None, "ka"]),
        ),
        min_size=1,
        max_size=12,
    ),
    batch_size=st.integers(1, 12),
)
# Two dimension sets tied at one millisecond in one quarter hour, sent in two batches: the
# total's latest value is the later write's (SQLite's slots answered the earlier one's).
@example(
    sent=[(2, "200", (), None)] + [(0, "200", (), None)] * 8 + [(1, "500", (), None)] * 2,
    batch_size=5,
)
# The same across keys and tag sets, in one batch, the later event's cell sorting first.
@example(sent=[(0, "500", ("x", "y"), "ka"), (1, "200", ("x",), None)], batch_size=2)
def test_a_latest_value_tied_across_cells_goes_to_the_later_event(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    store_kind: str,
    sent: list[tuple[int, str, tuple[str, ...], str | None]],
    batch_size: int,
) -> None:
    """Events of several dimension sets, tag sets and keys tied at one millisecond: wherever
    a question folds their rows together (a total across groups, a question without the
    group, a key's hours without a key, a ragged end beside whole units, the waiting events
    beside the folded), the latest value is the later event's, before and after the store
    merges, folds and voids."""
    store = open_test_store(store_kind, request, tmp_path_factory.mktemp("tie") / "t.db")
    try:
        _accounts(store)
        events = [
            Event(
                f"e{i}",
                "a",
                "m",
                TIE_TIMES[time],
                float(i + 1),
                key_id=key,
                dimensions={"status": status},
                tags=frozenset(tags),
            )
            for i, (time, status, tags, key) in enumerate(sent)
        ]

        def check(stage: str, stored: list[Event]) -> None:
            for shape, windows in TIE_WINDOWS.items():
                for name, question in TIE_QUESTIONS.items():
                    spec = AggregateSpec(
                        ("a",), "m", windows, (Measure("latest"),), totals=True, **question
                    )
                    rows = {(r.window, r.group): r.values[0] for r in store.aggregate(spec)}
                    assert rows == _tie_cells(stored, windows, question), (stage, shape, name)

        for i in range(0, len(events), batch_size):
            store.append(events[i : i + batch_size])
            check(f"after batch {i // batch_size}", events[: i + batch_size])
        if isinstance(store, SQLiteStore):
            store.merge()  # the recent level's cells into the big tables
            check("merged", events)
        # A void folds the voided event's days again, from the events left.
        store.void_events(VoidSelector("a", ids=(events[0].id,)), "tie", None, BASE_MS)
        check("after a void", events[1:])
    finally:
        store.close()
