"""Round 13, second step: a tagged report over one table of sets is read by the tag set's id
(chplan.SetsPlan, grouped by ``tagset`` rather than filtered by each row's tags), each tag
set's tags looked up once and kept by the store, the rows of the sets holding every tag
asked kept; by the values where the sets cannot answer (two tag sets holding the tags in
one cell). Every answer must be SQLite's, in any zone, also when a tag set first appears
between two questions (read-your-writes with tags already kept)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usagemeter.engine import Engine
from usagemeter.model import Account, Aggregation, Event, Query
from usagemeter.store import chplan
from usagemeter.store.base import AggregateSpec, Measure, Window
from usagemeter.store.chplan import SetsPlan
from usagemeter.store.clickhouse import ClickHouseStore
from usagemeter.store.sqlite import SQLiteStore
from usagemeter.timewindows import Granularity

BASE = datetime(2025, 11, 1, tzinfo=UTC)  # New York falls back on the 2nd
BASE_MS = int(BASE.timestamp() * 1000)
HOUR_MS = 3_600_000
TAG_SETS = [frozenset(), frozenset({"prod"}), frozenset({"staging"}), frozenset({"prod", "eu"})]

_runs = itertools.count()

events_strategy = st.lists(
    st.tuples(
        st.integers(0, 3 * 24 * HOUR_MS - 1),  # within three days
        st.integers(-3, 9),
        st.sampled_from([None, "200", "404"]),  # status
        st.sampled_from(TAG_SETS),
    ),
    max_size=40,
)
questions_strategy = st.fixed_dictionaries(
    {
        "tags": st.sampled_from([{"prod"}, {"eu"}, {"prod", "eu"}, {"staging"}]),
        "group_by": st.sampled_from([(), ("status",)]),
        "aggregation": st.sampled_from(
            [Aggregation.COUNT, Aggregation.SUM, Aggregation.MIN, Aggregation.MAX]
        ),
        "granularity": st.sampled_from([Granularity.HOUR, Granularity.DAY]),
        "tz": st.sampled_from(["UTC", "America/New_York", "Asia/Kathmandu", "Australia/Lord_Howe"]),
    }
)


def _events(
    account: str, raw: list[tuple[int, int, str | None, frozenset[str]]], first: int
) -> list[Event]:
    return [
        Event(
            id=f"e{first + n}",
            account_id=account,
            metric="m",
            ts_ms=BASE_MS + offset,
            value=float(value),
            dimensions={"status": status} if status else {},
            tags=tags,
        )
        for n, (offset, value, status, tags) in enumerate(raw)
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
            tags=frozenset(q["tags"]),
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
def test_tagged_reports_by_set_equal_sqlites_before_and_after_new_tag_sets(
    sqlite_and_chstore: tuple[SQLiteStore, ClickHouseStore],
    first: list[tuple[int, int, str | None, frozenset[str]]],
    later: list[tuple[int, int, str | None, frozenset[str]]],
    asked: list[dict[str, Any]],
) -> None:
    """Each tagged question, grouped or not, asked after a first batch and again after a
    second, whose events may bring tag sets the store has not kept yet (one holding the
    tags asked among them): equal to SQLite's answers each time."""
    account = f"t{next(_runs)}"
    sqlite, chstore = sqlite_and_chstore
    for store in (sqlite, chstore):
        store.create_account(Account(account, "T"))
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


def _fill(store: Any, account: str, tags: list[frozenset[str]]) -> None:
    store.create_account(Account(account, "T"))
    store.append(
        [
            Event(f"f{n}", account, "m", BASE_MS + (n % 5) * HOUR_MS, float(n), tags=t)
            for n, t in enumerate(tags)
        ]
    )


def test_a_tagged_report_is_read_by_tag_set_and_its_tags_kept(
    sqlite_and_chstore: tuple[SQLiteStore, ClickHouseStore],
) -> None:
    sqlite, chstore = sqlite_and_chstore
    tags = [frozenset({"prod"}), frozenset({"staging"}), frozenset(), frozenset({"prod"})] * 3
    for store in (sqlite, chstore):
        _fill(store, "one", tags)
    spec = AggregateSpec(("one",), "m", _hours(5), (Measure("sum"),), tags=frozenset({"prod"}))
    (plan,) = chstore.plans(spec)
    assert isinstance(plan, SetsPlan) and "GROUP BY idx, tagset" in plan.sql
    assert "hasAll" not in plan.sql and "hasAll" in plan.by_value
    assert _rows(chstore.aggregate_columns(spec).rows()) == _rows(sqlite.aggregate(spec))
    assert sorted(map(sorted, chstore._tagsets.values())) == [[], ["prod"], ["staging"]]
    assert not chstore._by_value
    looked_up: list[str] = []
    query = chstore.transport.query
    chstore.transport.query = lambda sql: looked_up.append(sql) or query(sql)  # type: ignore[method-assign]
    try:
        assert _rows(chstore.aggregate_columns(spec).rows()) == _rows(sqlite.aggregate(spec))
    finally:
        chstore.transport.query = query  # type: ignore[method-assign]
    assert looked_up == []  # every tag set kept: no lookup


def test_two_tag_sets_holding_the_tags_in_one_cell_answer_by_the_values(
    sqlite_and_chstore: tuple[SQLiteStore, ClickHouseStore],
) -> None:
    """prod and (prod, eu) in the same hours: both hold prod, their rows would be folded in
    Python (a float sum in another order than ClickHouse's), so the values answer, from
    then on; a question whose tag only one of them holds is still read by set."""
    sqlite, chstore = sqlite_and_chstore
    tags = [frozenset({"prod"}), frozenset({"prod", "eu"}), frozenset({"eu"})] * 5
    for store in (sqlite, chstore):
        _fill(store, "two", tags)
    both = AggregateSpec(("two",), "m", _hours(5), (Measure("sum"),), tags=frozenset({"prod"}))
    expected = sqlite.aggregate(both)
    assert _rows(chstore.aggregate_columns(both).rows()) == _rows(expected)
    assert (("two",), "m", (), frozenset({"prod"})) in chstore._by_value
    assert _rows(chstore.aggregate_columns(both).rows()) == _rows(expected)
    one = AggregateSpec(
        ("two",), "m", _hours(5), (Measure("count"),), tags=frozenset({"prod", "eu"})
    )
    assert _rows(chstore.aggregate_columns(one).rows()) == _rows(sqlite.aggregate(one))
    assert (("two",), "m", (), frozenset({"prod", "eu"})) not in chstore._by_value


def test_which_tagged_reports_read_by_set() -> None:
    hours = _hours(24)
    prod = frozenset({"prod"})
    tagged = AggregateSpec(("a",), "m", hours, (Measure("count"),), tags=prod)
    (plan,) = chplan.plan_aggregate(tagged, hour_sets=True)
    assert isinstance(plan, SetsPlan) and plan.lookup == ("", "") and plan.tag_lookup[0]
    grouped = AggregateSpec(("a",), "m", hours, (Measure("min"),), group_by=("s",), tags=prod)
    (plan,) = chplan.plan_aggregate(grouped, hour_sets=True)
    assert isinstance(plan, SetsPlan) and "GROUP BY idx, dimset, tagset" in plan.sql
    assert plan.lookup[0] and plan.tag_lookup[0]
    others = [
        AggregateSpec(("a",), "m", hours, (Measure("latest"),), tags=prod, totals=True),
        AggregateSpec(("a",), "m", hours, (Measure("sum"),), tags=prod, totals=True),
        AggregateSpec(("a",), "m", hours, (Measure("count"),), group_by=("key",), tags=prod),
        AggregateSpec(("a",), "m", hours, (Measure("unique_count", "s"),), tags=prod, totals=True),
    ]
    for spec in others:
        assert not any(isinstance(p, SetsPlan) for p in chplan.plan_aggregate(spec, hour_sets=True))
