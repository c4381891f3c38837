"""The ClickHouse store's questions, round 7: a question one table answers is folded once,
straight from that table (chplan._flat), and the engine lays its cells out by C loops
(bulk.made). Both must leave every answer as SQLite gives it, in any zone.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.questions import answers_to
from usagemeter.auth import issue_key
from usagemeter.bulk import made as _made
from usagemeter.engine import Engine
from usagemeter.meters import MeterRegistry
from usagemeter.model import (
    Account,
    Aggregation,
    Event,
    GroupValues,
    Meter,
    Query,
    ResultBucket,
    Scope,
)
from usagemeter.store.base import OVERALL, TOTAL, AggregateSpec, Measure, Window
from usagemeter.store.chplan import SetsPlan, TopsPlan, fold_tops, plan_aggregate
from usagemeter.store.chschema import LATEST
from usagemeter.store.clickhouse import ClickHouseStore
from usagemeter.store.sqlite import SQLiteStore
from usagemeter.timewindows import Granularity

BASE = datetime(2025, 11, 1, tzinfo=UTC)  # New York falls back on the 2nd: a 25-hour day
BASE_MS = int(BASE.timestamp() * 1000)
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


def _spec(windows: tuple[Window, ...], measure: str, **fields: Any) -> AggregateSpec:
    dimension = "s" if measure == "unique_count" else None
    return AggregateSpec(("a",), "m", windows, (Measure(measure, dimension),), **fields)


@pytest.mark.parametrize("measure", ["count", "sum", "max", "latest", "unique_count"])
@pytest.mark.parametrize("group_by", [(), ("agent",)])
@pytest.mark.parametrize("totals", [False, True])
def test_a_question_one_table_answers_reads_it_with_no_subquery(
    measure: str, group_by: tuple[str, ...], totals: bool
) -> None:
    """Whole days in a row (a daily report) and a few irregular hours (a range's total): the
    window is arithmetic or a multiIf over the table's own columns, named by WITH, and the
    statement has one SELECT. Windows with gaps between many of them still join."""
    days = tuple(Window(n, BASE_MS + n * DAY_MS, BASE_MS + (n + 1) * DAY_MS) for n in range(9))
    few = (
        Window(0, BASE_MS, BASE_MS + 3 * HOUR_MS),
        Window(1, BASE_MS + 5 * HOUR_MS, BASE_MS + DAY_MS),
    )
    for windows, index in ((days, "intDiv("), (few, "multiIf(")):
        spec = _spec(windows, measure, group_by=group_by, totals=totals)
        (plan,) = plan_aggregate(spec, hour_sets=True)
        assert plan.sql.startswith(f"WITH {index}"), plan.sql
        assert plan.sql.count("SELECT") == 1 and "ASOF" not in plan.sql
        assert ("GROUPING SETS" in plan.sql) == totals
    gapped = tuple(
        Window(n, BASE_MS + 2 * n * HOUR_MS, BASE_MS + (2 * n + 1) * HOUR_MS) for n in range(20)
    )
    (joined,) = plan_aggregate(_spec(gapped, measure, group_by=group_by), hour_sets=True)
    assert "ASOF" in joined.sql and not joined.sql.startswith("WITH")


def test_a_question_several_tables_answer_still_prefolds_each() -> None:
    """A New York day of ragged quarter hours (from 00:15) reads whole hours and slots: each
    pre-folded, then folded together, as before."""
    start = BASE_MS + 15 * 60_000
    windows = (Window(0, start, start + DAY_MS), Window(1, start + DAY_MS, start + 2 * DAY_MS))
    (plan,) = plan_aggregate(_spec(windows, "count", tags=frozenset({"t"})), hour_sets=True)
    assert "UNION ALL" in plan.sql and not plan.sql.startswith("WITH")


def test_a_distinct_count_reads_the_tables_of_sets_and_raw_events_only_for_ragged_ends() -> None:
    """Whole hours of a distinct count are counted over the hour table of sets (a value seen
    in many events of an hour is one row there), quarter hours over the slots, and only the
    ragged millisecond ends over the raw events: all in one count per window, never a fold."""
    days = tuple(Window(n, BASE_MS + n * DAY_MS, BASE_MS + (n + 1) * DAY_MS) for n in range(3))
    (whole,) = plan_aggregate(_spec(days, "unique_count", totals=True), hour_sets=True)
    assert "FROM rollup_hour_sets" in whole.sql and "events" not in whole.sql
    (slots,) = plan_aggregate(_spec(days, "unique_count", totals=True), hour_sets=False)
    assert "FROM rollup " in slots.sql and "events" not in slots.sql
    ragged = (Window(0, BASE_MS + 15 * 60_000 + 7, BASE_MS + DAY_MS), *days[1:])
    (plan,) = plan_aggregate(_spec(ragged, "unique_count", totals=True), hour_sets=True)
    assert plan.sql.count("UNION ALL") == 2 and "uniqExactIf(v, has)" in plan.sql
    assert all(f"FROM {t} " in plan.sql for t in ("rollup_hour_sets", "rollup", "events"))


def test_a_distinct_count_of_values_repeated_across_hours_and_ragged_ends(
    sqlite_and_chstore: tuple[SQLiteStore, ClickHouseStore],
) -> None:
    """The same sessions in many hours, slots and ragged milliseconds, counted once per
    window and once over the range, as SQLite counts them."""
    meters = MeterRegistry({"m": Meter("m", Aggregation.UNIQUE_COUNT, "s")})
    results = []
    for store in sqlite_and_chstore:
        store.create_account(Account("r", "R"))
        store.append(
            [
                Event(
                    id=f"r{n}",
                    account_id="r",
                    metric="m",
                    ts_ms=BASE_MS + n * 7 * 60_000 + n,
                    dimensions={"s": f"s{n % 4}"} if n % 5 else {},
                )
                for n in range(400)
            ]
        )
        engine = Engine(store, meters)
        answers = []
        for tz in ("UTC", "America/New_York", "Asia/Kathmandu"):
            start = BASE + timedelta(minutes=15, milliseconds=3)
            query = Query(("r",), "m", start, start + timedelta(hours=40), Granularity.DAY, tz)
            result = engine.run(query)
            answers.append((result.buckets, result.totals, result.total))
        results.append(answers)
    assert results[0] == results[1]
    assert results[1][0][2] == (4,)


def test_cells_made_without_their_init_equal_the_constructors() -> None:
    groups = [(("agent", "x"),), (("agent", None),), ()]
    values = [(1.0,), (2.0, 3.0), ()]
    made = _made(GroupValues, iter(groups), iter(values))
    assert made == [GroupValues(g, v) for g, v in zip(groups, values, strict=True)]
    assert hash(made[0]) == hash(GroupValues(groups[0], values[0]))  # frozen, hashable
    with pytest.raises(AttributeError):
        made[0].values = (9.0,)  # type: ignore[misc]
    bucket = _made(ResultBucket, [BASE], [BASE + timedelta(hours=1)], [tuple(made)])
    assert bucket == [ResultBucket(BASE, BASE + timedelta(hours=1), tuple(made))]
    assert _made(GroupValues, [], []) == []
    with pytest.raises(ValueError, match="one column of equal length per field"):
        _made(GroupValues, groups, values[:2])
    with pytest.raises(ValueError, match="one column of equal length per field"):
        _made(GroupValues, groups)


# ---------------------------------------------------------------- the same answers as SQLite

events_strategy = st.lists(
    st.tuples(
        st.integers(-6 * HOUR_MS, 3 * DAY_MS),  # ms after BASE: across New York's fall back
        st.integers(0, 20),
        st.sampled_from([None, "x", "y"]),
        st.sampled_from(["s1", "s2", "s3", None]),
        st.frozensets(st.sampled_from(["t1", "t2"])),
    ),
    min_size=5,
    max_size=50,
    unique_by=lambda e: e[0],  # distinct instants: "latest" then has one answer
)
# Whole hours from a whole hour: the questions one table answers (hours, days, months in
# zones of whole-hour offsets; a range's total by a multiIf) and some that need several
# (Kathmandu's and Kolkata's hours, which start at :15 and :30).
queries = st.fixed_dictionaries(
    {
        "tz": st.sampled_from(["UTC", "America/New_York", "Asia/Kathmandu", "Asia/Kolkata"]),
        "granularity": st.sampled_from(list(Granularity)),
        "start": st.integers(-8, 30).map(lambda h: h * HOUR_MS),
        "length": st.integers(1, 80).map(lambda h: h * HOUR_MS),
        "aggregation": st.sampled_from(list(Aggregation)),
        "group_by": st.sampled_from([(), ("agent",), ("subaccount",)]),
        "tags": st.sampled_from([frozenset(), frozenset({"t1"})]),
    }
)
_runs = itertools.count()


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=events_strategy, asked=st.lists(queries, min_size=1, max_size=4))
def test_whole_hour_questions_equal_sqlites(
    sqlite_and_chstore: tuple[SQLiteStore, ClickHouseStore],
    raw: list[tuple[Any, ...]],
    asked: list[dict[str, Any]],
) -> None:
    run = next(_runs)  # each example in accounts of its own: the stores are shared
    a, b = f"qa{run}", f"qb{run}"
    meters = MeterRegistry({"m": Meter("m", Aggregation.UNIQUE_COUNT, "s")})
    results = []
    for store in sqlite_and_chstore:
        store.create_account(Account(a, "A"))
        store.create_account(Account(b, "B", a))
        events = [
            Event(
                id=f"e{n}",
                account_id=a if n % 3 else b,
                metric="m",
                ts_ms=BASE_MS + offset,
                value=float(value),
                dimensions={
                    **({"agent": agent} if agent else {}),
                    **({"s": session} if session else {}),
                },
                tags=tags,
            )
            for n, (offset, value, agent, session, tags) in enumerate(raw)
        ]
        store.append(events)
        results.append(answers_to(Engine(store, meters), (a, b), BASE, asked))
    assert results[0] == results[1]


def test_cells_come_in_group_order_with_missing_values_last(chstore: ClickHouseStore) -> None:
    """Each bucket's cells and the totals are ordered by group, a missing value (None) after
    every present one; a distinct count's totals (not a fold of the buckets) too."""
    chstore.create_account(Account("o", "O"))
    chstore.append(
        [
            Event(
                id=f"o{n}",
                account_id="o",
                metric="m",
                ts_ms=BASE_MS + n * HOUR_MS,
                dimensions={**({"agent": agent} if agent else {}), "s": f"s{n % 2}"},
            )
            for n, agent in enumerate(["y", None, "x", "y", None, "x", "x"])
        ]
    )
    meters = MeterRegistry({"m": Meter("m", Aggregation.UNIQUE_COUNT, "s")})
    for aggregation in (Aggregation.COUNT, Aggregation.UNIQUE_COUNT):
        result = Engine(chstore, meters).run(
            Query(
                ("o",),
                "m",
                BASE,
                BASE + timedelta(hours=7),
                Granularity.HOUR,
                aggregations=(aggregation,),
                group_by=("agent",),
            )
        )
        assert [[c.group for c in b.groups] for b in result.buckets] == [
            [(("agent", "y"),)],
            [(("agent", None),)],
            [(("agent", "x"),)],
            [(("agent", "y"),)],
            [(("agent", None),)],
            [(("agent", "x"),)],
            [(("agent", "x"),)],
        ]
        assert [t.group for t in result.totals] == [
            (("agent", "x"),),
            (("agent", "y"),),
            (("agent", None),),
        ]
        totals = [t.values[0] for t in result.totals]
        assert totals == ([3, 2, 2] if aggregation is Aggregation.COUNT else [2, 2, 2])
        assert result.total == ((7,) if aggregation is Aggregation.COUNT else (2,))


def test_a_grouped_reports_rows_come_by_group_then_window(chstore: ClickHouseStore) -> None:
    """Round 11: a grouped statement without totals orders its rows by group (missing values
    last, as the engine ranks them) and by window within each, so that the engine's two sorts
    only merge runs; the answer is the same in any order (tests/test_engine_row_order.py)."""
    chstore.create_account(Account("r", "R"))
    agents = ["y", None, "x", "y", None, "x", "x", "z", "y"]
    chstore.append(
        [
            Event(
                id=f"r{n}",
                account_id="r",
                metric="m",
                ts_ms=BASE_MS + ((5 * n) % 9) * HOUR_MS,
                dimensions={"agent": agent} if agent else {},
            )
            for n, agent in enumerate(agents)
        ]
    )
    hours = tuple(Window(n, BASE_MS + n * HOUR_MS, BASE_MS + (n + 1) * HOUR_MS) for n in range(9))
    spec = AggregateSpec(("r",), "m", hours, (Measure("count"),), group_by=("agent",))
    (plan,) = chstore.plans(spec)
    # Round 13: read by dimension set first (SetsPlan), by the values where sets cannot.
    assert isinstance(plan, SetsPlan) and plan.by_value.endswith(" ORDER BY g0, idx")
    answer = chstore._by_values(spec, plan)
    ranked = [(("agent", v),) for v in ("x", "y", "z", None)]
    expected = sorted(
        zip(answer.groups, answer.windows, strict=True), key=lambda r: (ranked.index(r[0]), r[1])
    )
    assert list(zip(answer.groups, answer.windows, strict=True)) == expected
    assert len(expected) == len(agents)  # each event in an hour of its own
    ungrouped = AggregateSpec(("r",), "m", hours, (Measure("count"),))
    assert "ORDER BY" not in chstore.plans(ungrouped)[0].sql


# ------------------------------------------------- round 8: the distinct table's exact states


def test_a_plain_distinct_count_merges_the_distinct_tables_states() -> None:
    """A distinct count with no filter, tag or key merges the states of the distinct table's
    whole hours (straight from it for whole UTC days), with states of the slots and raw
    events of ragged ends; a filter, a tag, a key or a dimension group keeps the tables of
    sets, which hold them."""
    days = tuple(Window(n, BASE_MS + n * DAY_MS, BASE_MS + (n + 1) * DAY_MS) for n in range(3))
    spec = _spec(days, "unique_count", totals=True, group_by=("subaccount",), billable=True)
    (whole,) = plan_aggregate(spec, hour_sets=True, distinct_hours=True)
    assert whole.sql.startswith("WITH intDiv(") and "FROM distinct_hour WHERE" in whole.sql
    assert "name IN ('', 's')" in whole.sql and "billable = 1" in whole.sql
    assert "uniqExactMerge(u)" in whole.sql and "UNION ALL" not in whole.sql
    ragged = (Window(0, BASE_MS + 15 * 60_000 + 7, BASE_MS + DAY_MS), *days[1:])
    (plan,) = plan_aggregate(_spec(ragged, "unique_count", totals=True), distinct_hours=True)
    assert plan.sql.count("UNION ALL") == 2 and "uniqExactStateIf(v, has)" in plan.sql
    assert all(f"FROM {t} " in plan.sql for t in ("distinct_hour", "rollup", "events"))
    for narrowed in (
        {"filters": (("agent", "x"),)},
        {"tags": frozenset({"t"})},
        {"key_id": "k"},
        {"group_by": ("agent",)},
    ):
        (other,) = plan_aggregate(_spec(days, "unique_count", **narrowed), distinct_hours=True)
        assert "distinct_hour" not in other.sql, narrowed
    (before,) = plan_aggregate(_spec(days, "unique_count"), distinct_hours=False)
    assert "distinct_hour" not in before.sql


def test_the_distinct_table_answers_as_the_tables_of_sets_do(
    sqlite_and_chstore: tuple[SQLiteStore, ClickHouseStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows with events but none carrying the dimension answer 0 (the '' rows), not
    nothing; billable filters and subaccount groups; ragged ends in every zone. Equal to
    SQLite's answers and to the store's own without the table."""
    chstore = sqlite_and_chstore[1]
    meters = MeterRegistry({"m": Meter("m", Aggregation.UNIQUE_COUNT, "s")})
    start = BASE + timedelta(minutes=15, milliseconds=3)
    asked = [
        Query(("d", "d2"), "m", start, start + timedelta(hours=50), granularity, tz, **extra)
        for granularity, tz, extra in [
            (Granularity.DAY, "UTC", {}),
            (Granularity.HOUR, "America/New_York", {"group_by": ("subaccount",)}),
            (Granularity.DAY, "Asia/Kathmandu", {"billable": False}),
            (Granularity.TOTAL, "Asia/Kolkata", {"group_by": ("subaccount",)}),
            (Granularity.MONTH, "UTC", {"billable": True}),
        ]
    ]
    results = []
    for store in sqlite_and_chstore:
        store.create_account(Account("d", "D"))
        store.create_account(Account("d2", "D2", "d"))
        store.append(
            [
                Event(
                    id=f"d{n}",
                    account_id="d" if n % 3 else "d2",
                    metric="m",
                    ts_ms=BASE_MS + n * 11 * 60_000 + n % 7,
                    billable=n % 4 != 0,
                    # Hours 10 to 14 have events but no session: their buckets say 0.
                    dimensions={"s": f"s{n % 9}", "agent": "x"}
                    if not 55 <= n < 82
                    else {"agent": "y"},
                )
                for n in range(300)
            ]
        )
        results.append([Engine(store, meters).run(q) for q in asked])
    monkeypatch.setattr(chstore.distinct_values, "ready", lambda: False)
    without = [Engine(chstore, meters).run(q) for q in asked]
    for answers in (results[1], without):
        assert [(r.buckets, r.totals, r.total) for r in answers] == [
            (r.buckets, r.totals, r.total) for r in results[0]
        ]
    zero = [b for b in results[1][0].buckets if b.groups and b.groups[0].values == (0,)]
    assert not zero  # days hold sessions; the hours without any:
    hourly = results[1][1].buckets
    assert any(cell.values == (0,) for b in hourly for cell in b.groups)


# -------------------------------------------- round 8: the latest value as a tuple maximum


def test_a_plain_latest_value_is_a_maximum_over_the_latest_table() -> None:
    """A latest value with no filter, tag or dimension group is max((ts, seq, value)) over
    the latest table's hours, in a statement of its own beside the other measures; ragged
    ends from the raw events; a filter, a tag or a dimension group keeps the argMax states."""
    days = tuple(Window(n, BASE_MS + n * DAY_MS, BASE_MS + (n + 1) * DAY_MS) for n in range(3))
    spec = _spec(days, "latest", totals=True, group_by=("key",), key_id="k")
    (whole,) = plan_aggregate(spec, latest_hours=True)
    assert whole.sql.startswith("WITH intDiv(") and f"FROM {LATEST} WHERE" in whole.sql
    assert "max(top)" in whole.sql and "key = 'k'" in whole.sql and "argMax" not in whole.sql
    # Alone in its question, its totals are folded from its windows' maxima (fold_tops).
    assert isinstance(whole, TopsPlan) and "GROUPING SETS" not in whole.sql
    ragged = (Window(0, BASE_MS + 15 * 60_000 + 7, BASE_MS + DAY_MS), *days[1:])
    mixed = AggregateSpec(("a",), "m", ragged, (Measure("sum"), Measure("latest")))
    latest, summed = plan_aggregate(mixed, hour_sets=True, latest_hours=True)
    assert (latest.positions, summed.positions) == ((1,), (0,))
    assert not isinstance(latest, TopsPlan) and "max(top).3" in latest.sql
    # Alone with ragged ends: the hours' and the raw events' maxima, totals by fold_tops.
    (alone,) = plan_aggregate(_spec(ragged, "latest", totals=True), latest_hours=True)
    assert isinstance(alone, TopsPlan) and "UNION ALL" in alone.sql
    assert "GROUPING SETS" not in alone.sql and "(ts, seq, value) AS top" in alone.sql
    assert f"FROM {LATEST} " in latest.sql and "(ts, seq, value) AS top" in latest.sql
    assert "top" not in summed.sql and "argMax" not in summed.sql
    for narrowed in (
        {"filters": (("agent", "x"),)},
        {"tags": frozenset({"t"})},
        {"group_by": ("agent",)},
    ):
        (other,) = plan_aggregate(_spec(days, "latest", **narrowed), latest_hours=True)
        assert LATEST not in other.sql and "argMaxMerge" in other.sql, narrowed
    # Kathmandu's hours hold no whole UTC hour: the slots' states, not every raw event.
    quarter = BASE_MS + 15 * 60_000
    kathmandu = tuple(
        Window(n, quarter + n * HOUR_MS, quarter + (n + 1) * HOUR_MS) for n in range(9)
    )
    (hourly,) = plan_aggregate(_spec(kathmandu, "latest"), latest_hours=True)
    assert LATEST not in hourly.sql and "argMaxMerge" in hourly.sql


def test_the_latest_table_answers_as_the_argmax_states_do(
    sqlite_and_chstore: tuple[SQLiteStore, ClickHouseStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ties on the timestamp go to the later write; keys grouped and asked for; billable;
    subaccounts; ragged ends in every zone; the latest beside a sum. Equal to SQLite's
    answers and to the store's own without the table."""
    chstore = sqlite_and_chstore[1]
    start = BASE + timedelta(minutes=15, milliseconds=3)
    asked = [
        Query(("g", "g2"), "m", start, start + timedelta(hours=50), granularity, tz, **extra)
        for granularity, tz, extra in [
            (Granularity.DAY, "UTC", {}),
            (Granularity.HOUR, "America/New_York", {"group_by": ("key",)}),
            (Granularity.DAY, "Asia/Kathmandu", {"billable": False, "key_id": "kg"}),
            (Granularity.TOTAL, "Asia/Kolkata", {"group_by": ("subaccount",)}),
            (Granularity.DAY, "UTC", {"aggregations": (Aggregation.LATEST, Aggregation.SUM)}),
        ]
    ]
    results = []
    for store in sqlite_and_chstore:
        store.create_account(Account("g", "G"))
        store.create_account(Account("g2", "G2", "g"))
        issue_key(store, "g", key_id="kg", scopes=[Scope.READ])
        for first in (0, 200):  # two batches: the second's ties are later writes
            store.append(
                [
                    Event(
                        id=f"g{first}-{n}",
                        account_id="g" if n % 3 else "g2",
                        metric="m",
                        # Every instant twice (once per batch): a tie on the timestamp.
                        ts_ms=BASE_MS + n * 13 * 60_000 + n % 7,
                        value=float((n * 37 + first) % 101),
                        billable=n % 4 != 0,
                        key_id="kg" if n % 3 and n % 2 else None,
                    )
                    for n in range(200)
                ]
            )
        meters = MeterRegistry({"m": Meter("m", Aggregation.LATEST)})
        results.append([Engine(store, meters).run(q) for q in asked])
    monkeypatch.setattr(chstore.latest_hours, "ready", lambda: False)
    meters = MeterRegistry({"m": Meter("m", Aggregation.LATEST)})
    without = [Engine(chstore, meters).run(q) for q in asked]
    for answers in (results[1], without):
        assert [(r.buckets, r.totals, r.total) for r in answers] == [
            (r.buckets, r.totals, r.total) for r in results[0]
        ]
    assert results[1][0].total == (float((199 * 37 + 200) % 101),)  # the second write


# --------------------------------- round 10: a latest value's totals from its windows' maxima


tops_strategy = st.lists(
    st.tuples(
        st.integers(0, 5),  # the window
        st.sampled_from(["k1", "k2", None]),  # the group
        st.integers(0, 3),  # ts: ties on the instant are common
        st.integers(0, 3),  # seq
        st.floats(-1e6, 1e6, allow_nan=False),
    ),
    unique_by=lambda r: (r[0], r[1]),  # a window's maximum per group, as the statement gives
    max_size=20,
)


@given(rows=tops_strategy, grouped=st.booleans())
def test_a_latest_values_totals_are_the_greatest_of_its_windows(
    rows: list[tuple[int, str | None, int, int, float]], grouped: bool
) -> None:
    """Each group's total is the value of its greatest (ts, seq, value), the later write
    on a tie of the instant; the overall total the greatest of all; none without rows."""
    if not grouped:
        rows = list({r[0]: r for r in rows}.values())
    columns: list[list[object]] = [[r[0] for r in rows]]
    if grouped:
        columns.append([r[1] for r in rows])
    columns.append([[r[2], r[3], r[4]] for r in rows])
    out = fold_tops(columns, 1 if grouped else 0)
    assert [c[: len(rows)] for c in out[:-1]] == columns[:-1]
    assert out[-1][: len(rows)] == [r[4] for r in rows]
    found = list(zip(*out, strict=True))[len(rows) :]
    expected = []
    keys = list(dict.fromkeys(r[1] if grouped else None for r in rows))
    for key in keys:
        mine = [r for r in rows if not grouped or r[1] == key]
        top = max((r[2], r[3], r[4]) for r in mine)
        expected.append((TOTAL, key, top[2]) if grouped else (TOTAL, top[2]))
    if grouped and rows:
        expected.append((OVERALL, None, max((r[2], r[3], r[4]) for r in rows)[2]))
    assert found == expected
