"""The ClickHouse store's distinct values (rounds 13 and 14): a row per dimension value with
the UTC hours it was seen in (2 * hour + billable), read for every distinct count with no
filter, tag or key: counted as rows for one account while the table is one part, else each
value once per window, beside the ragged ends' values. Its answers must be SQLite's, in any
zone, whatever the inserts, repeats, voids and merges; the table a fold of the events after
each correction; a new database without the distinct states per hour; and a database made
before (with them, without the values) upgraded on open, its states still fed and refolded.
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
from usagemeter.store.chplan import FINAL_SETTINGS, plan_aggregate
from usagemeter.store.chschema import (
    DISTINCT,
    DISTINCT_GRAIN,
    DISTINCT_TABLE,
    DISTINCT_VALUES,
    backfilled_view,
)
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


def _plan(spec: AggregateSpec, merged: bool = True) -> str:
    (plan,) = plan_aggregate(spec, distinct_hours=True, distinct_values=True, count_rows=merged)
    return plan.sql


def _pruned(sql: str) -> bool:
    """Whether ``sql`` counts the values as rows, those with no entry in the range dropped
    before FINAL merges them (PREWHERE)."""
    return f"FROM {DISTINCT_VALUES} FINAL ARRAY JOIN " in sql and " AS idx PREWHERE " in sql


def _final_alone(sql: str) -> bool:
    """Whether ``sql`` counts the values as rows with FINAL alone."""
    return f"FROM {DISTINCT_VALUES} FINAL ARRAY JOIN " in sql and "PREWHERE" not in sql


def test_every_distinct_count_without_filter_tag_or_key_reads_the_values() -> None:
    """One account over whole UTC hours, the table one part: its rows counted (FINAL), a
    billable filter within the hours' entries, days of 23 and 25 hours looked up hour by
    hour. Several accounts, a subaccount group, the table in parts, or ragged quarter hours
    and milliseconds (their values from the slots and the raw events): each value counted
    once (no FINAL). A key, a tag or a filter: the tables of sets, as before."""
    counted = f"FROM {DISTINCT_VALUES} FINAL"
    assert counted in _plan(_spec(_days(9), totals=True))
    assert counted in _plan(_spec(_days(9)))
    assert counted in _plan(_spec(_days(3), billable=True)) and "bitAnd(x, 1) = 1" in _plan(
        _spec(_days(3), billable=True)
    )
    uneven = (
        Window(0, BASE_MS, BASE_MS + 23 * HOUR_MS),
        *(
            Window(n, BASE_MS + (23 + 25 * (n - 1)) * HOUR_MS, BASE_MS + (23 + 25 * n) * HOUR_MS)
            for n in range(1, 12)
        ),
    )
    assert counted in _plan(_spec(uneven, totals=True))
    assert "][intDiv(x - " in _plan(_spec(uneven))  # looked up: not regular
    once = f"FROM {DISTINCT_VALUES} ARRAY JOIN"
    ragged = _days(3, BASE_MS + 45 * 60_000)  # Kathmandu's days start at :15 UTC
    for spec, merged in (
        (_spec(_days(3)), False),
        (_spec(_days(3), accounts=("a", "b")), True),
        (_spec(_days(3), group_by=("subaccount",), totals=True), True),
        (_spec(_days(3), billable=False, accounts=("a", "b")), False),
        (_spec(ragged), True),
    ):
        sql = _plan(spec, merged)
        assert once in sql and counted not in sql and "uniqExactIf(v, has)" in sql, spec
    assert "FROM rollup " in _plan(_spec(ragged)) and "FROM events " not in _plan(_spec(ragged))
    off_the_slot = _plan(_spec(_days(3, BASE_MS + 45 * 60_000 + 3)))
    assert all(f"FROM {t} " in off_the_slot for t in ("rollup", "events"))
    for spec in (
        _spec(_days(3), key_id="k"),
        _spec(_days(3), tags=frozenset({"t"})),
        _spec(_days(3), filters=(("agent", "x"),)),
        _spec(
            tuple(Window(n, BASE_MS + n * 900_000, BASE_MS + (n + 1) * 900_000) for n in range(3))
        ),
    ):
        assert DISTINCT_VALUES not in _plan(spec), spec
    for spec in (_spec(_days(9), totals=True), _spec(uneven), _spec(_days(3), billable=True)):
        (pruned,) = plan_aggregate(spec, distinct_values=True, values_parts=True)
        assert _pruned(pruned.sql) and " AND notEmpty(arrayFilter(" in pruned.sql
        assert _final_alone(_plan(spec))
    (two,) = plan_aggregate(_spec(_days(3), accounts=("a", "b")), values_parts=True)
    assert "PREWHERE" not in two.sql
    (without,) = plan_aggregate(_spec(_days(3)), distinct_hours=True, distinct_values=False)
    assert DISTINCT_VALUES not in without.sql and "FROM distinct_hour" in without.sql


def test_a_new_database_has_no_distinct_states_per_hour(chstore: ClickHouseStore) -> None:
    """The values answer what the states did: a new database neither makes nor feeds them."""
    tables = chstore.transport.query(
        "SELECT name FROM system.tables WHERE database = currentDatabase()"
        f" AND name IN ('{DISTINCT}', '{DISTINCT}_mv')"
    )
    assert tables == [] and chstore.distinct_hours is None
    assert DISTINCT_GRAIN not in chstore.grains()


def _values_table(store: ClickHouseStore) -> list[list[Any]]:
    return store.transport.query(
        "SELECT account, metric, name, v, arraySort(groupUniqArrayArray(hours))"
        f" FROM {DISTINCT_VALUES} GROUP BY account, metric, name, v ORDER BY ALL"
    )


def _values_of_events(store: ClickHouseStore) -> list[list[Any]]:
    return store.transport.query(
        "SELECT account, metric, name, v,"
        f" arraySort(groupUniqArray(toInt32(2 * intDiv(ts, {HOUR_MS}) + billable)))"
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
        # Mostly whole hours in zones of whole-hour offsets (only the values' hours);
        # Kathmandu's and Lord Howe's days and a start off the hour add ragged ends.
        "tz": st.sampled_from([*_ZONES[:2], *_ZONES]),
        "granularity": st.sampled_from(list(Granularity)),
        "start": st.one_of(_WHOLE_HOURS, _WHOLE_HOURS, st.integers(-8 * HOUR_MS, DAY_MS)),
        "length": st.integers(1, 80).map(lambda h: h * HOUR_MS),
        "aggregation": st.just(Aggregation.UNIQUE_COUNT),
        # Grouped by a dimension or filtered: the tables of sets, beside the values' answers.
        "group_by": st.sampled_from([(), (), (), ("subaccount",), ("agent",)]),
        "filters": st.sampled_from([(), (), (), (("agent", "x"),)]),
        "tags": st.just(frozenset()),
        "billable": st.sampled_from([None, None, True, False]),
    }
)
_runs = itertools.count()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    raw=events_strategy,
    inserts=st.integers(1, 4),
    resent=st.integers(0, 10),
    voided=st.sets(st.integers(0, 59), max_size=5),
    amended=st.sets(st.integers(0, 59), max_size=3),
    merged=st.booleans(),
    as_rows=st.booleans(),
    pruned=st.booleans(),
    asked=st.lists(queries, min_size=1, max_size=4),
)
def test_distinct_counts_equal_sqlites(
    sqlite_and_chstore: tuple[SQLiteStore, ClickHouseStore],
    raw: list[tuple[int, str | None, bool]],
    inserts: int,
    resent: int,
    voided: set[int],
    amended: set[int],
    merged: bool,
    as_rows: bool,
    pruned: bool,
    asked: list[dict[str, Any]],
) -> None:
    """Events in several inserts (a part each), some sent again (counted once), some voided
    or amended, the values' table merged or not, its rows counted (FINAL, the rows with no
    entry in the range dropped first or not) or each value once: every distinct count of one
    account, of its parent (the two) and grouped by subaccount, billable or not, in UTC, New
    York across its fall back, Kathmandu (+05:45) and Lord Howe (+10:30), as SQLite answers.
    """
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
                dimensions={"s": session, **({"agent": "x"} if n % 3 else {})}
                if session
                else {"agent": "x" if n % 2 else "y"},
            )
            for n, (offset, session, billable) in enumerate(raw)
        ]
        step = -(-len(events) // inserts)
        for first in range(0, len(events), step):
            store.append(events[first : first + step])
        store.append(events[:resent])  # the same ids again: stored once
        for n in sorted(voided | amended):
            if n < len(events):
                event = events[n]
                selector = VoidSelector(event.account_id, ids=(event.id,))
                amend = Amendment(2.0) if n in amended and n not in voided else None
                store.void_events(selector, "test", None, BASE_MS + 9 * DAY_MS, amend=amend)
        if isinstance(store, ClickHouseStore):
            if merged:
                store.transport.command(f"OPTIMIZE TABLE {DISTINCT_VALUES} FINAL")
            # Counted as rows in any number of parts (FINAL), or each value once.
            store.count_value_rows = as_rows
            # Written moments ago (the rows out of the range dropped first), or long ago.
            store.values_written = time.monotonic() if pruned else float("-inf")
        engine = Engine(store, METERS)
        # b alone is one account (its rows may be counted); a, its parent, is two.
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
            spec = AggregateSpec(("z",), "m", _days(4), (Measure("unique_count", "s"),))
            (plan,) = store.plans(spec)
            assert f"FROM {DISTINCT_VALUES} FINAL" in plan.sql
        result = Engine(store, METERS).run(query)
        results.append((result.buckets, result.totals, result.total))
    assert results[0] == results[1]
    buckets = results[1][0]
    assert [[cell.values for cell in b.groups] for b in buckets] == [[(1,)], [(0,)], [(1,)], []]
    assert results[1][2] == (1,)


@pytest.mark.parametrize("as_rows", [True, False])
def test_billable_filters_accounts_and_subaccounts_as_sqlite(
    sqlite_and_chstore: tuple[SQLiteStore, ClickHouseStore], as_rows: bool
) -> None:
    """Values billable in some hours and not in others, one seen in both accounts: each
    billable filter, the parent with its subaccount (a value in both counted once) and
    grouped by subaccount, hourly and daily in New York and in Kathmandu, as SQLite."""
    results = []
    for store in sqlite_and_chstore:
        store.create_account(Account("p", "P"))
        store.create_account(Account("c", "C", "p"))
        store.append(
            [
                Event(
                    id=f"e{i}",
                    account_id="c" if i % 5 == 0 else "p",
                    metric="m",
                    ts_ms=BASE_MS + i * 10 * 60_000 + i % 3,
                    billable=i % 7 < 3 if i < 150 else i % 7 >= 3,
                    dimensions={"s": f"s{i % 7}"},
                )
                for i in range(300)
            ]
        )
        if isinstance(store, ClickHouseStore):
            store.count_value_rows = as_rows
        engine = Engine(store, METERS)
        answers = []
        for accounts, group_by, billable, tz, granularity in itertools.product(
            [("p",), ("c",)],
            [(), ("subaccount",)],
            [None, True, False],
            ["America/New_York", "Asia/Kathmandu"],
            [Granularity.HOUR, Granularity.DAY],
        ):
            query = Query(
                accounts,
                "m",
                BASE,
                BASE + timedelta(days=3),
                granularity,
                tz,
                group_by=group_by,
                billable=billable,
            )
            result = engine.run(query)
            answers.append((result.buckets, result.totals, result.total))
        results.append(answers)
    assert results[0] == results[1]


def _by_window(rows: list[AggregateRow]) -> list[AggregateRow]:
    return sorted(rows, key=lambda row: row.window)


def test_the_values_are_counted_as_rows_in_any_number_of_parts(
    chstore: ClickHouseStore,
) -> None:
    """FINAL makes a value's rows in several parts one: counted as rows, one part or three,
    the answer is each value counted once, and the tables of sets' answer. Written moments
    ago (history appended, or found complete after a backfill), the rows with no entry in
    the range are dropped before the merge: a range past the first part's rows answers the
    same; after a live service's recent events, FINAL alone."""
    chstore.create_account(Account("a", "A"))
    spec = _spec(_days(3), totals=True)
    chstore.append(_events(0, 100))
    chstore.transport.command(f"OPTIMIZE TABLE {DISTINCT_VALUES} FINAL")
    (one,) = chstore.plans(spec)
    assert f"FROM {DISTINCT_VALUES} FINAL" in one.sql
    answer = _by_window(chstore.aggregate(spec))
    chstore.append(_events(100, 50))
    chstore.append(_events(150, 50))  # three parts, values in each
    parts = chstore.transport.query(
        "SELECT count() FROM system.parts WHERE database = currentDatabase()"
        f" AND table = '{DISTINCT_VALUES}' AND active"
    )
    assert int(parts[0][0]) >= 2
    (three,) = chstore.plans(spec)
    # Written just now: the rows with no entry in the range dropped before the merge.
    assert _pruned(three.sql)
    assert f"SETTINGS {FINAL_SETTINGS})" in three.sql  # merged by one thread, its own setting
    as_rows = _by_window(chstore.aggregate(spec))
    assert as_rows != answer
    later = _spec(_days(2, BASE_MS + DAY_MS), totals=True)  # the first day's rows dropped
    pruned = _by_window(chstore.aggregate(later))
    chstore.values_written = float("-inf")  # long ago: FINAL alone
    (settled,) = chstore.plans(spec)
    assert _final_alone(settled.sql)
    assert _by_window(chstore.aggregate(spec)) == as_rows
    assert _by_window(chstore.aggregate(later)) == pruned
    chstore.count_value_rows = False
    (once,) = chstore.plans(spec)
    assert f"FROM {DISTINCT_VALUES} ARRAY JOIN" in once.sql
    assert as_rows == _by_window(chstore.aggregate(spec))  # each value once
    chstore.distinct_values.complete = False
    assert as_rows == _by_window(chstore.aggregate(spec))  # the tables of sets'
    chstore.distinct_values.complete = True
    chstore.count_value_rows = True
    (backfilled,) = chstore.plans(spec)  # found complete: the backfill's parts just written
    assert _pruned(backfilled.sql)
    chstore.count_value_rows = False
    assert pruned == _by_window(chstore.aggregate(later))  # each value once
    chstore.count_value_rows = True
    chstore.values_written = float("-inf")
    now = int(time.time() * 1000)
    chstore.append(  # a live service's tail: FINAL alone
        [Event(id=f"live{i}", account_id="a", metric="m", ts_ms=now - i) for i in range(5)]
    )
    assert chstore.values_written == float("-inf")
    assert _final_alone(chstore.plans(spec)[0].sql)
    chstore.append([Event(id="late", account_id="a", metric="m", ts_ms=now - 2 * DAY_MS)])
    assert _pruned(chstore.plans(spec)[0].sql)
    chstore.transport.command(f"OPTIMIZE TABLE {DISTINCT_VALUES} FINAL")
    assert _by_window(chstore.aggregate(spec)) == as_rows
    (plain,) = chstore.plans(AggregateSpec(("a",), "m", _days(3), (Measure("count"),)))
    assert DISTINCT_VALUES not in plain.sql


def test_rows_dropped_before_the_merge_only_when_nothing_in_the_range(
    sqlite_and_chstore: tuple[SQLiteStore, ClickHouseStore],
) -> None:
    """Written moments ago, a value's rows with no entry in the range are dropped before
    FINAL merges them: a value whose only entry in the range is in its first hour, or its
    last, in one part, its others out of the range in another; one billable only outside
    the range, another billable in it only in the second part; one never in the range
    (never counted). Each window and the total as SQLite's, billable or not."""
    first, last = 24, 24 + 2 * 24 - 1  # the range's first and last whole hours: days 1 and 2
    seen = {  # value: (hour, billable) of each part's events
        "lo": ([(first, True)], [(first - 1, True), (last + 1, True)]),
        "hi": ([(last, True)], [(2, True), (last + 9, True)]),
        "both": ([(10, True)], [(30, True)]),
        "bill": ([(40, False), (3, True)], [(41, True)]),
        "out": ([(first - 1, True)], [(0, True), (last + 1, True)]),
    }
    specs = [
        _spec(_days(2, BASE_MS + DAY_MS), accounts=("e",), totals=True, billable=billable)
        for billable in (None, True, False)
    ]
    answers = []
    for store in sqlite_and_chstore:
        store.create_account(Account("e", "E"))
        for part in (0, 1):
            store.append(
                [
                    Event(
                        id=f"{value}-{part}-{hour}",
                        account_id="e",
                        metric="m",
                        ts_ms=BASE_MS + hour * HOUR_MS + 7,
                        billable=billable,
                        dimensions={"s": value},
                    )
                    for value, parts in seen.items()
                    for hour, billable in parts[part]
                ]
            )
        if isinstance(store, ClickHouseStore):
            assert store.values_written > float("-inf")  # appended: taken to be in parts
            (plan,) = store.plans(specs[0])
            assert _pruned(plan.sql)
        answers.append([_by_window(store.aggregate(spec)) for spec in specs])
    assert answers[0] == answers[1]
    totals = [[r.values for r in rows if r.window == TOTAL] for rows in answers[1]]
    assert totals == [[(4,)], [(4,)], [(1,)]]


def test_an_older_database_gets_the_values_on_open(
    clickhouse_home: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database made before round 14 (the distinct states per hour and their view, no
    values' table), another process of that version ingesting: the store that opens it
    creates the values' table and its view, backfills what came before once its boundary
    settles, and until then merges the distinct table's states: the same answers all
    along. The states stay fed (the older process reads them) and are refolded by voids."""
    monkeypatch.setattr(chupgrade, "SETTLE_NS", 200_000_000)
    monkeypatch.setattr(chupgrade, "CHECK_EVERY", 0.05)
    database = f"round13_{time.time_ns()}"
    side = str(tmp_path / "side.sqlite")
    older = ClickHouseStore(_transport(clickhouse_home, database), side)
    upgraded: ClickHouseStore | None = None
    try:
        older.transport.command(f"DROP VIEW {DISTINCT_VALUES}_mv")
        older.transport.command(f"DROP TABLE {DISTINCT_VALUES}")
        older.transport.command(DISTINCT_TABLE)
        older.transport.command(backfilled_view(DISTINCT, 0))
        older.create_account(Account("a", "A"))
        older.append(_events(0, 300))
        spec = _spec(_days(3), totals=True)
        upgraded = ClickHouseStore(_transport(clickhouse_home, database), side)
        assert upgraded.distinct_hours is not None and upgraded.distinct_hours.ready()
        assert DISTINCT_GRAIN in upgraded.grains()
        assert upgraded.distinct_values.boundary > 0 and not upgraded.distinct_values.ready()
        (before,) = upgraded.plans(spec)
        assert DISTINCT_VALUES not in before.sql and f"FROM {DISTINCT} " in before.sql
        answer = upgraded.aggregate(spec)
        older.append(_events(300, 100))  # the other process goes on
        deadline = time.monotonic() + 30
        while not upgraded.distinct_values.ready():
            assert time.monotonic() < deadline, "the backfill never ran"
            time.sleep(0.05)
        (after,) = upgraded.plans(spec)
        assert DISTINCT_VALUES in after.sql and DISTINCT not in after.sql.replace(
            DISTINCT_VALUES, ""
        )
        assert _values_table(upgraded) == _values_of_events(upgraded)
        with_values = _by_window(upgraded.aggregate(spec))
        upgraded.distinct_values.complete = False
        assert _by_window(upgraded.aggregate(spec)) == with_values  # the states' answer
        upgraded.distinct_values.complete = True
        assert _by_window(answer) == with_values  # s0 to s16 every day: none added later
        assert with_values[0] == AggregateRow(TOTAL, (), (17,))
        upgraded.void_events(VoidSelector("a", ids=("e3", "e350")), "t", None, BASE_MS)
        assert _values_table(upgraded) == _values_of_events(upgraded)
        assert _states_table(upgraded) == _states_of_events(upgraded)
    finally:
        (upgraded or older).transport.command(f"DROP DATABASE {database}")
        if upgraded is not None:
            upgraded.close()
        older.close()


def _states_table(store: ClickHouseStore) -> list[list[Any]]:
    return store.transport.query(
        f"SELECT account, metric, name, slot, billable, uniqExactMerge(u) FROM {DISTINCT}"
        " GROUP BY account, metric, name, slot, billable ORDER BY ALL"
    )


def _states_of_events(store: ClickHouseStore) -> list[list[Any]]:
    return store.transport.query(
        f"SELECT account, metric, name, intDiv(ts, {HOUR_MS}) AS slot, billable,"
        " uniqExactIf(v, name != '') FROM events ARRAY JOIN arrayConcat([''], mapKeys(dims))"
        " AS name, arrayConcat([''], mapValues(dims)) AS v"
        " GROUP BY account, metric, name, slot, billable ORDER BY ALL"
    )


@pytest.mark.parametrize("pruned", [False, True])
def test_window_keys_of_one_and_two_bytes_as_sqlite(
    sqlite_and_chstore: tuple[SQLiteStore, ClickHouseStore], pruned: bool
) -> None:
    """The rows counted name each window by the narrowest unsigned key that holds every
    window, the total's marker (one past the last) and a lookup's hour in no window (two
    past): 254 hourly windows fit one byte, 255 take two (the gap would be 256), in order
    or with an hour left out (looked up). Values in the first and last window, only in the
    hour left out, after the range, billable or not, an hour with events but no value:
    every window and the total as SQLite's, with and without the rows out of the range
    dropped before the merge. A key one byte too narrow wraps the marker or the gap onto
    window 0, and fails this."""
    events = []
    for value, hours in {
        "first": [0, 0, 1],
        "last": [253, 254],
        "gap": [100],
        "after": [400],
        "unbilled": [7],
    }.items():
        events += [
            Event(
                id=f"{value}-{n}",
                account_id="w",
                metric="m",
                ts_ms=BASE_MS + hour * HOUR_MS + n,
                billable=value != "unbilled",
                dimensions={"s": value},
            )
            for n, hour in enumerate(hours)
        ]
    events.append(Event(id="bare", account_id="w", metric="m", ts_ms=BASE_MS + 50 * HOUR_MS))
    specs = []
    for count, gap, totals, billable in itertools.product(
        (254, 255), (False, True), (True, False), (None, True, False)
    ):
        hours = [h for h in range(count + 1) if h != 100] if gap else range(count)
        windows = tuple(
            Window(n, BASE_MS + h * HOUR_MS, BASE_MS + (h + 1) * HOUR_MS)
            for n, h in enumerate(hours)
        )
        specs.append(_spec(windows, accounts=("w",), totals=totals, billable=billable))
    answers = []
    for store in sqlite_and_chstore:
        store.create_account(Account("w", "W"))
        store.append(events[:6])
        store.append(events[6:])  # two parts
        if isinstance(store, ClickHouseStore):
            store.values_written = time.monotonic() if pruned else float("-inf")
            for spec in specs:
                (plan,) = store.plans(spec)
                assert (_pruned if pruned else _final_alone)(plan.sql)
                narrow = len(spec.windows) == 254
                assert ("toUInt8(" if narrow else "toUInt16(") in plan.sql, len(spec.windows)
        answers.append([_by_window(store.aggregate(spec)) for spec in specs])
    assert answers[0] == answers[1]
    totals = [rows[0].values for rows in answers[1][:3]]  # 254 windows in order, TOTAL first
    assert totals == [(4,), (3,), (1,)]  # first, last, gap, unbilled; billable; not billable
