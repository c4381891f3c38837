"""Round 13: a report grouped by dimensions over one table of sets is read by the dimension
set's id (chplan.SetsPlan), each set's dimensions looked up once and kept by the store, and
by the values where the sets cannot answer (two sets of one group, too many rows or sets).
Every answer must be SQLite's, in any zone, also when a set first appears between two
questions (read-your-writes with dimensions already kept)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usagemeter.engine import Engine
from usagemeter.model import Account, Aggregation, Event, Query
from usagemeter.store import chplan
from usagemeter.store import clickhouse as clickhouse_module
from usagemeter.store.base import AggregateSpec, Measure, Window
from usagemeter.store.chplan import SetsPlan
from usagemeter.store.clickhouse import ClickHouseStore
from usagemeter.store.sqlite import SQLiteStore
from usagemeter.timewindows import Granularity

BASE = datetime(2025, 11, 1, tzinfo=UTC)  # New York falls back on the 2nd
BASE_MS = int(BASE.timestamp() * 1000)
HOUR_MS = 3_600_000

_runs = itertools.count()

events_strategy = st.lists(
    st.tuples(
        st.integers(0, 3 * 24 * HOUR_MS - 1),  # within three days
        st.integers(-3, 9),
        st.sampled_from([None, "200", "404", "500"]),  # status
        st.sampled_from([None, "eu", "us"]),  # region
    ),
    max_size=40,
)
questions_strategy = st.fixed_dictionaries(
    {
        "group_by": st.sampled_from([("status",), ("region",), ("status", "region")]),
        "aggregation": st.sampled_from(
            [Aggregation.COUNT, Aggregation.SUM, Aggregation.MIN, Aggregation.MAX]
        ),
        "granularity": st.sampled_from([Granularity.HOUR, Granularity.DAY]),
        "tz": st.sampled_from(["UTC", "America/New_York", "Asia/Kathmandu", "Australia/Lord_Howe"]),
    }
)


def _events(
    account: str, raw: list[tuple[int, int, str | None, str | None]], first: int
) -> list[Event]:
    return [
        Event(
            id=f"e{first + n}",
            account_id=account,
            metric="m",
            ts_ms=BASE_MS + offset,
            value=float(value),
            dimensions={
                **({"status": status} if status else {}),
                **({"region": region} if region else {}),
            },
        )
        for n, (offset, value, status, region) in enumerate(raw)
    ]


def _answer(store: Any, account: str, q: dict[str, Any]) -> tuple[Any, ...]:
    result = Engine(store).run(
        Query(
            (account,),
            "m",
            BASE,
            BASE + timedelta(days=3),
            q["granularity"],
            q["tz"],
            aggregations=(q["aggregation"],),
            group_by=q["group_by"],
        )
    )
    return result.buckets, result.totals, result.total


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    first=events_strategy,
    later=events_strategy,
    asked=st.lists(questions_strategy, min_size=1, max_size=3),
)
def test_reports_by_set_equal_sqlites_before_and_after_new_sets(
    sqlite_and_chstore: tuple[SQLiteStore, ClickHouseStore],
    first: list[tuple[int, int, str | None, str | None]],
    later: list[tuple[int, int, str | None, str | None]],
    asked: list[dict[str, Any]],
) -> None:
    """Each question asked after a first batch and again after a second, whose events may
    bring sets the store has not kept yet: equal to SQLite's answers each time."""
    account = f"s{next(_runs)}"
    sqlite, chstore = sqlite_and_chstore
    for store in (sqlite, chstore):
        store.create_account(Account(account, "S"))
    for batch, offset in ((first, 0), (later, len(first))):
        answers = []
        for store in (sqlite, chstore):
            store.append(_events(account, batch, offset))
            answers.append([_answer(store, account, q) for q in asked])
        assert answers[0] == answers[1]


def _rows(rows: Any) -> list[tuple[Any, ...]]:
    """A store's rows in one order (stores return them in any)."""
    return sorted(((r.window, r.group, r.values) for r in rows), key=repr)


def _hours(n: int) -> tuple[Window, ...]:
    return tuple(Window(i, BASE_MS + i * HOUR_MS, BASE_MS + (i + 1) * HOUR_MS) for i in range(n))


def _fill(store: Any, account: str, dims: list[dict[str, str]]) -> None:
    store.create_account(Account(account, "S"))
    store.append(
        [
            Event(f"f{n}", account, "m", BASE_MS + (n % 5) * HOUR_MS, float(n), dimensions=d)
            for n, d in enumerate(dims)
        ]
    )


def test_a_set_per_group_is_read_by_set_and_its_dimensions_kept(
    sqlite_and_chstore: tuple[SQLiteStore, ClickHouseStore],
) -> None:
    sqlite, chstore = sqlite_and_chstore
    dims = [{"status": s} for s in ("200", "404", "200", "500", "404")] + [{}]
    for store in (sqlite, chstore):
        _fill(store, "one", dims)
    spec = AggregateSpec(("one",), "m", _hours(5), (Measure("sum"),), group_by=("status",))
    (plan,) = chstore.plans(spec)
    assert isinstance(plan, SetsPlan) and "GROUP BY idx, dimset" in plan.sql
    assert _rows(chstore.aggregate_columns(spec).rows()) == _rows(sqlite.aggregate(spec))
    kept = dict(chstore._sets)
    assert sorted(kept.values(), key=str) == sorted(
        [{"status": "200"}, {"status": "404"}, {"status": "500"}, {}], key=str
    )
    assert not chstore._by_value
    looked_up: list[str] = []
    query = chstore.transport.query
    chstore.transport.query = lambda sql: looked_up.append(sql) or query(sql)  # type: ignore[method-assign]
    try:
        assert _rows(chstore.aggregate_columns(spec).rows()) == _rows(sqlite.aggregate(spec))
    finally:
        chstore.transport.query = query  # type: ignore[method-assign]
    assert looked_up == []  # every set kept: no lookup


@pytest.mark.parametrize("cause", ["two sets of one group", "too many rows", "too many sets"])
def test_where_sets_cannot_answer_the_values_do_and_go_on_doing_so(
    sqlite_and_chstore: tuple[SQLiteStore, ClickHouseStore],
    monkeypatch: pytest.MonkeyPatch,
    cause: str,
) -> None:
    sqlite, chstore = sqlite_and_chstore
    dims = [{"status": s} for s in ("200", "404", "200", "500")]
    if cause == "two sets of one group":  # 200 in the eu and in the us: one group, two sets
        dims = [{**d, "region": r} for d, r in zip(dims, ["eu", "eu", "us", "us"], strict=True)]
    elif cause == "too many rows":
        monkeypatch.setattr(chplan, "SETS_ROWS", 2)
    else:
        monkeypatch.setattr(clickhouse_module, "SETS_LOOKED_UP", 1)
    for store in (sqlite, chstore):
        _fill(store, "two", dims)
    spec = AggregateSpec(("two",), "m", _hours(5), (Measure("count"),), group_by=("status",))
    assert isinstance(chstore.plans(spec)[0], SetsPlan)
    expected = sqlite.aggregate(spec)
    assert _rows(chstore.aggregate_columns(spec).rows()) == _rows(expected)
    assert (("two",), "m", ("status",), frozenset()) in chstore._by_value  # by values since
    assert _rows(chstore.aggregate_columns(spec).rows()) == _rows(expected)


def test_only_reports_grouped_by_dimensions_with_folding_measures_read_by_set() -> None:
    hours = _hours(24)
    by_set = AggregateSpec(("a",), "m", hours, (Measure("max"),), group_by=("status",))
    (plan,) = chplan.plan_aggregate(by_set, hour_sets=True)
    assert isinstance(plan, SetsPlan)
    assert plan.by_value.endswith(" ORDER BY g0, idx") and "dims.keys" in plan.by_value
    assert "dims.keys" not in plan.sql and " dims " in plan.lookup[0]
    others = [
        AggregateSpec(("a",), "m", hours, (Measure("count"),)),  # no group
        AggregateSpec(("a",), "m", hours, (Measure("count"),), group_by=("key",)),
        AggregateSpec(("a",), "m", hours, (Measure("latest"),), group_by=("status",), totals=True),
        AggregateSpec(
            ("a",), "m", hours, (Measure("unique_count", "s"),), group_by=("status",), totals=True
        ),
        AggregateSpec(("a",), "m", hours, (Measure("sum"),), group_by=("status",), totals=True),
    ]
    for spec in others:
        assert not any(isinstance(p, SetsPlan) for p in chplan.plan_aggregate(spec, hour_sets=True))
