"""The ClickHouse store's distinct values (round 13): a row per dimension value with the UTC
hours it was seen in, read for a distinct count of one account over whole hours. Its answers
must be SQLite's, in any zone, whatever the inserts, repeats, voids and merges; the table a
fold of the events after each correction; and a database made before it upgraded on open.
"""

from __future__ import annotations

import itertools
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.questions import answers_to
from tests.test_store_clickhouse_hours import _transport
from usagemeter.corrections import Amendment, VoidSelector
from usagemeter.engine import Engine
from usagemeter.meters import MeterRegistry
from usagemeter.model import Account, Aggregation, Event, Meter, Query
from usagemeter.store import chupgrade
from usagemeter.store.base import TOTAL, AggregateRow, AggregateSpec, Measure, Window
from usagemeter.store.chplan import plan_aggregate
from usagemeter.store.chschema import DISTINCT_VALUES
from usagemeter.store.clickhouse import ClickHouseStore
from usagemeter.store.sqlite import SQLiteStore
from usagemeter.timewindows import Granularity

BASE = datetime(2025, 11, 1, tzinfo=UTC)  # New York falls back on the 2nd: a 25-hour day
BASE_MS = int(BASE.timestamp() * 1000)
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
METERS = MeterRegistry({"m": Meter("m", Aggregation.UNIQUE_COUNT, "s")})


def _spec(windows: tuple[Window, ...], **fields: Any) -> AggregateSpec:
    accounts = fields.pop("accounts", ("a",))
    return AggregateSpec(accounts, "m", windows, (Measure("unique_count", "s"),), **fields)


def _days(count: int, first: int = BASE_MS) -> tuple[Window, ...]:
    return tuple(Window(n, first + n * DAY_MS, first + (n + 1) * DAY_MS) for n in range(count))


def _reads_values(spec: AggregateSpec) -> bool:
    (plan,) = plan_aggregate(spec, distinct_hours=True, distinct_values=True)
    return f"FROM {DISTINCT_VALUES} FINAL" in plan.sql


def test_a_distinct_count_of_one_account_over_whole_hours_counts_its_values() -> None:
    """Daily in UTC (arithmetic), days of 23 and 25 hours (each hour looked up), a range's
    total alone: read from the values' hours. Anything the table keeps no column for, or a
    window's ragged quarter hours, merges the distinct table's states as before."""
    assert _reads_values(_spec(_days(9), totals=True))
    assert _reads_values(_spec(_days(9)))
    uneven = (
        Window(0, BASE_MS, BASE_MS + 23 * HOUR_MS),
        *(
            Window(n, BASE_MS + (23 + 25 * (n - 1)) * HOUR_MS, BASE_MS + (23 + 25 * n) * HOUR_MS)
            for n in range(1, 12)
        ),
    )
    assert _reads_values(_spec(uneven, totals=True))
    (plan,) = plan_aggregate(_spec(uneven), distinct_hours=True, distinct_values=True)
    assert "[x - " in plan.sql  # looked up: not regular, more than a few pieces
    ragged = _days(3, BASE_MS + 45 * 60_000)  # Kathmandu's days start at :15 UTC
    for spec in (
        _spec(ragged),
        _spec(_days(3), accounts=("a", "b")),
        _spec(_days(3), group_by=("subaccount",)),
        _spec(_days(3), billable=True),
        _spec(_days(3), key_id="k"),
        _spec(_days(3), tags=frozenset({"t"})),
    ):
        assert not _reads_values(spec), spec
        (plan,) = plan_aggregate(spec, distinct_hours=True, distinct_values=True)
        (before,) = plan_aggregate(spec, distinct_hours=True)
        assert plan.sql == before.sql
    (without,) = plan_aggregate(_spec(_days(3)), distinct_hours=True, distinct_values=False)
    assert DISTINCT_VALUES not in without.sql


def _values_table(store: ClickHouseStore) -> list[list[Any]]:
    return store.transport.query(
        "SELECT account, metric, name, v, arraySort(groupUniqArrayArray(hours))"
        f" FROM {DISTINCT_VALUES} GROUP BY account, metric, name, v ORDER BY ALL"
    )


def _values_of_events(store: ClickHouseStore) -> list[list[Any]]:
    return store.transport.query(
        "SELECT account, metric, name, v,"
        f" arraySort(groupUniqArray(toInt32(intDiv(ts, {HOUR_MS}))))"
        " FROM events ARRAY JOIN arrayConcat([''], mapKeys(dims)) AS name,"
        " arrayConcat([''], mapValues(dims)) AS v GROUP BY account, metric, name, v ORDER BY ALL"
    )


def _events(first: int, count: int, account: str = "a") -> list[Event]:
    return [
        Event(
            id=f"e{i}",
            account_id=account,
            metric="m",
            ts_ms=BASE_MS + i * 13 * 60_000 + i % 5,
            dimensions={"s": f"s{i % 17}", **({"agent": "x"} if i % 2 else {})},
        )
        for i in range(first, first + count)
    ]


def test_voids_amends_and_deletion_refold_the_values(chstore: ClickHouseStore) -> None:
    chstore.create_account(Account("a", "A"))
    chstore.create_account(Account("b", "B"))
    chstore.append(_events(0, 400))
    chstore.append(_events(0, 300, account="b"))
    assert _values_table(chstore) == _values_of_events(chstore)
    chstore.void_events(
        VoidSelector("a", metric="m", start_ms=BASE_MS, end_ms=BASE_MS + 5 * HOUR_MS),
        "test",
        None,
        BASE_MS + 9 * DAY_MS,
    )
    chstore.void_events(
        VoidSelector("a", ids=("e100",)), "test", None, BASE_MS + 9 * DAY_MS, amend=Amendment(4.0)
    )
    assert _values_table(chstore) == _values_of_events(chstore)
    chstore.delete_account("b")
    rows = _values_table(chstore)
    assert rows == _values_of_events(chstore)
    assert {row[0] for row in rows} == {"a"} and {row[2] for row in rows} == {"", "agent", "s"}


# ------------------------------------------------------------ the same answers as SQLite

_ZONES = ["UTC", "America/New_York", "Asia/Kathmandu", "Australia/Lord_Howe"]
events_strategy = st.lists(
    st.tuples(
        st.integers(-6 * HOUR_MS, 3 * DAY_MS),  # ms after BASE: across New York's fall back
        st.sampled_from(["s1", "s2", "s3", "s4", "s5", None]),  # repeated across hours
        st.booleans(),  # billable
    ),
    min_size=1,
    max_size=60,
)
_WHOLE_HOURS = st.integers(-8, 30).map(lambda h: h * HOUR_MS)
queries = st.fixed_dictionaries(
    {
        # Mostly whole hours in zones of whole-hour offsets (the values' table answers);
        # Kathmandu's and Lord Howe's days and a start off the hour read the states.
        "tz": st.sampled_from([*_ZONES[:2], *_ZONES]),
        "granularity": st.sampled_from(list(Granularity)),
        "start": st.one_of(_WHOLE_HOURS, _WHOLE_HOURS, st.integers(-8 * HOUR_MS, DAY_MS)),
        "length": st.integers(1, 80).map(lambda h: h * HOUR_MS),
        "aggregation": st.just(Aggregation.UNIQUE_COUNT),
        "group_by": st.sampled_from([(), (), (), ("subaccount",)]),
        "tags": st.just(frozenset()),
        "billable": st.sampled_from([None, None, None, True]),
    }
)
_runs = itertools.count()


def _asks_distinct(spec: AggregateSpec) -> bool:
    return any(m.aggregation == "unique_count" for m in spec.measures)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    raw=events_strategy,
    inserts=st.integers(1, 4),
    resent=st.integers(0, 10),
    voided=st.sets(st.integers(0, 59), max_size=5),
    merged=st.booleans(),
    asked=st.lists(queries, min_size=1, max_size=4),
)
def test_distinct_counts_equal_sqlites(
    sqlite_and_chstore: tuple[SQLiteStore, ClickHouseStore],
    raw: list[tuple[int, str | None, bool]],
    inserts: int,
    resent: int,
    voided: set[int],
    merged: bool,
    asked: list[dict[str, Any]],
) -> None:
    """Events in several inserts (a part each), some sent again (counted once), some voided,
    the values' table merged or not: every distinct count of one account or of its parent
    (the two), in UTC, New York across its fall back, Kathmandu (+05:45) and Lord Howe
    (+10:30), as SQLite answers."""
    run = next(_runs)  # each example in accounts of its own: the stores are shared
    a, b = f"da{run}", f"db{run}"
    results = []
    for store in sqlite_and_chstore:
        store.create_account(Account(a, "A"))
        store.create_account(Account(b, "B", a))
        events = [
            Event(
                id=f"e{n}",
                account_id=b if n % 4 else a,
                metric="m",
                ts_ms=BASE_MS + offset,
                billable=billable,
                dimensions={"s": session} if session else {"agent": "x"},
            )
            for n, (offset, session, billable) in enumerate(raw)
        ]
        step = -(-len(events) // inserts)
        for first in range(0, len(events), step):
            store.append(events[first : first + step])
        store.append(events[:resent])  # the same ids again: stored once
        for n in sorted(voided):
            if n < len(events):
                event = events[n]
                selector = VoidSelector(event.account_id, ids=(event.id,))
                store.void_events(selector, "test", None, BASE_MS + 9 * DAY_MS)
        if isinstance(store, ClickHouseStore):
            if merged:
                store.transport.command(f"OPTIMIZE TABLE {DISTINCT_VALUES} FINAL")
            # Read in any number of parts (FINAL), not only once settled (OnePart).
            store.values_settled = _asks_distinct  # type: ignore[assignment]
        engine = Engine(store, METERS)
        # b alone is one account (the values' table answers); a, its parent, is two.
        results.append(
            answers_to(engine, (b,), BASE, asked) + answers_to(engine, (a,), BASE, asked)
        )
    assert results[0] == results[1]


def test_a_day_with_events_but_no_value_answers_zero(
    sqlite_and_chstore: tuple[SQLiteStore, ClickHouseStore],
) -> None:
    """Hours whose events lack the dimension answer 0, not nothing (the PRESENT row), and
    a value seen in two hours of a day once in it, on two days on each, and once in the
    range's total."""
    results = []
    for store in sqlite_and_chstore:
        store.create_account(Account("z", "Z"))
        store.append(
            [
                Event(id="1", account_id="z", metric="m", ts_ms=BASE_MS + 5, dimensions={"s": "q"}),
                Event(
                    id="0",
                    account_id="z",
                    metric="m",
                    ts_ms=BASE_MS + 7 * HOUR_MS,
                    dimensions={"s": "q"},
                ),
                Event(id="2", account_id="z", metric="m", ts_ms=BASE_MS + DAY_MS + 9),
                Event(
                    id="3",
                    account_id="z",
                    metric="m",
                    ts_ms=BASE_MS + 2 * DAY_MS,
                    dimensions={"s": "q"},
                ),
            ]
        )
        query = Query(("z",), "m", BASE, BASE + timedelta(days=4), Granularity.DAY)
        if isinstance(store, ClickHouseStore):
            store.transport.command(f"OPTIMIZE TABLE {DISTINCT_VALUES} FINAL")
            store.values_settled.every_s = 0.0
            spec = AggregateSpec(("z",), "m", _days(4), (Measure("unique_count", "s"),))
            (plan,) = store.plans(spec)
            assert f"FROM {DISTINCT_VALUES} FINAL" in plan.sql
        result = Engine(store, METERS).run(query)
        results.append((result.buckets, result.totals, result.total))
    assert results[0] == results[1]
    buckets = results[1][0]
    assert [[cell.values for cell in b.groups] for b in buckets] == [[(1,)], [(0,)], [(1,)], []]
    assert results[1][2] == (1,)


def _by_window(rows: list[AggregateRow]) -> list[AggregateRow]:
    return sorted(rows, key=lambda row: row.window)


def test_the_values_are_read_while_they_are_one_part(chstore: ClickHouseStore) -> None:
    """FINAL over one part reads it as it is; over several it merges them as it reads, more
    slowly than the distinct table's states: the store reads the values only as one part,
    looked up at most every OnePart.every_s, and only for a distinct count."""
    chstore.values_settled.every_s = 0.0
    chstore.create_account(Account("a", "A"))
    spec = _spec(_days(3), totals=True)
    chstore.append(_events(0, 100))
    chstore.transport.command(f"OPTIMIZE TABLE {DISTINCT_VALUES} FINAL")
    (one,) = chstore.plans(spec)
    assert f"FROM {DISTINCT_VALUES} FINAL" in one.sql
    answer = _by_window(chstore.aggregate(spec))
    chstore.append(_events(100, 50))  # a second part
    (two,) = chstore.plans(spec)
    assert DISTINCT_VALUES not in two.sql
    answer_two = _by_window(chstore.aggregate(spec))
    assert answer_two != answer
    chstore.transport.command(f"OPTIMIZE TABLE {DISTINCT_VALUES} FINAL")
    assert _by_window(chstore.aggregate(spec)) == answer_two
    (plain,) = chstore.plans(AggregateSpec(("a",), "m", _days(3), (Measure("count"),)))
    assert DISTINCT_VALUES not in plain.sql
    chstore.values_settled.every_s = 3600.0  # looked up an hour ago: not again
    chstore.append(_events(150, 50))
    (cached,) = chstore.plans(spec)
    assert f"FROM {DISTINCT_VALUES} FINAL" in cached.sql  # still exact: FINAL merges
    cached_answer = _by_window(chstore.aggregate(spec))
    chstore.values_settled = lambda spec: False  # type: ignore[assignment,method-assign]
    assert cached_answer == _by_window(chstore.aggregate(spec))  # the states' answer


def test_an_older_database_gets_the_values_on_open(
    clickhouse_home: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database made before round 13 (no values' table): the store that opens it creates
    the table and its view, backfills what came before once its boundary settles, and
    until then merges the distinct table's states: the same answers all along."""
    monkeypatch.setattr(chupgrade, "SETTLE_NS", 200_000_000)
    monkeypatch.setattr(chupgrade, "CHECK_EVERY", 0.05)
    database = f"round12_{time.time_ns()}"
    side = str(tmp_path / "side.sqlite")
    older = ClickHouseStore(_transport(clickhouse_home, database), side)
    upgraded: ClickHouseStore | None = None
    try:
        older.transport.command(f"DROP VIEW {DISTINCT_VALUES}_mv")
        older.transport.command(f"DROP TABLE {DISTINCT_VALUES}")
        older.create_account(Account("a", "A"))
        older.append(_events(0, 300))
        spec = _spec(_days(3), totals=True)
        upgraded = ClickHouseStore(_transport(clickhouse_home, database), side)
        assert upgraded.distinct_values.boundary > 0 and not upgraded.distinct_values.ready()
        (before,) = upgraded.plans(spec)
        assert DISTINCT_VALUES not in before.sql
        answer = upgraded.aggregate(spec)
        older.append(_events(300, 100))  # the other process goes on
        deadline = time.monotonic() + 30
        while not upgraded.distinct_values.ready():
            assert time.monotonic() < deadline, "the backfill never ran"
            time.sleep(0.05)
        (after,) = upgraded.plans(spec)
        assert f"FROM {DISTINCT_VALUES} FINAL" in after.sql
        assert _values_table(upgraded) == _values_of_events(upgraded)
        with_values = _by_window(upgraded.aggregate(spec))
        monkeypatch.setattr(upgraded.distinct_values, "ready", lambda: False)
        assert _by_window(upgraded.aggregate(spec)) == with_values  # the states' answer
        assert _by_window(answer) == with_values  # s0 to s16 every day: none added later
        assert with_values[0] == AggregateRow(TOTAL, (), (17,))
    finally:
        (upgraded or older).transport.command(f"DROP DATABASE {database}")
        if upgraded is not None:
            upgraded.close()
        older.close()
