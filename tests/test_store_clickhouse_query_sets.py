"""Round 13: a report grouped by dimensions or tagged, over one table of sets, is read by the
dimension set's id and the tag set's (chplan.SetsPlan: grouped by ``dimset`` and
``tagset`` rather than reading each row's map or filtering by each row's tags), each set's
dimensions and tags looked up once and kept by the store, the rows of the tag sets holding
every tag asked kept; and by the values where the sets cannot answer (two sets of one group,
two tag sets holding the tags in one cell, too many rows or sets). Every answer must be
SQLite's, in any zone, also when a set first appears between two questions
(read-your-writes with sets already kept)."""

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
TAG_SETS = [frozenset(), frozenset({"prod"}), frozenset({"staging"}), frozenset({"prod", "eu"})]
# An event: its offset from BASE, value, dimensions and tags.
Raw = tuple[int, int, dict[str, str], frozenset[str]]

_runs = itertools.count()
_offsets = st.integers(0, 3 * 24 * HOUR_MS - 1)  # within three days
_values = st.integers(-3, 9)


def _dims(status: str | None, region: str | None = None) -> dict[str, str]:
    return {**({"status": status} if status else {}), **({"region": region} if region else {})}


events_strategy = st.lists(
    st.builds(
        lambda at, v, status, region: (at, v, _dims(status, region), frozenset()),
        _offsets,
        _values,
        st.sampled_from([None, "200", "404", "500"]),
        st.sampled_from([None, "eu", "us"]),
    ),
    max_size=40,
)
tagged_events_strategy = st.lists(
    st.builds(
        lambda at, v, status, tags: (at, v, _dims(status), tags),
        _offsets,
        _values,
        st.sampled_from([None, "200", "404"]),
        st.sampled_from(TAG_SETS),
    ),
    max_size=40,
)
_common = {
    "aggregation": st.sampled_from(
        [Aggregation.COUNT, Aggregation.SUM, Aggregation.MIN, Aggregation.MAX]
    ),
    "granularity": st.sampled_from([Granularity.HOUR, Granularity.DAY]),
    "tz": st.sampled_from(["UTC", "America/New_York", "Asia/Kathmandu", "Australia/Lord_Howe"]),
}
questions_strategy = st.fixed_dictionaries(
    {"group_by": st.sampled_from([("status",), ("region",), ("status", "region")]), **_common}
)
tagged_questions_strategy = st.fixed_dictionaries(
    {
        "tags": st.sampled_from([{"prod"}, {"eu"}, {"prod", "eu"}, {"staging"}]),
        "group_by": st.sampled_from([(), ("status",)]),
        **_common,
    }
)


def _events(account: str, raw: list[Raw], first: int) -> list[Event]:
    return [
        Event(f"e{first + n}", account, "m", BASE_MS + at, float(v), dimensions=d, tags=t)
        for n, (at, v, d, t) in enumerate(raw)
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
            tags=frozenset(q.get("tags", ())),
        )
    )
    return result.buckets, result.totals, result.total


def _equal_after_each_batch(
    stores: tuple[SQLiteStore, ClickHouseStore],
    first: list[Raw],
    later: list[Raw],
    asked: list[dict[str, Any]],
) -> None:
    """Each question asked after a first batch and again after a second, whose events may
    bring sets the store has not kept yet: equal to SQLite's answers each time."""
    account = f"s{next(_runs)}"
    for store in stores:
        store.create_account(Account(account, "S"))
    for batch, offset in ((first, 0), (later, len(first))):
        answers = []
        for store in stores:
            store.append(_events(account, batch, offset))
            answers.append([_answer(store, account, q) for q in asked])
        assert answers[0] == answers[1]


_examples = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_examples
@given(
    first=events_strategy,
    later=events_strategy,
    asked=st.lists(questions_strategy, min_size=1, max_size=3),
)
def test_reports_by_set_equal_sqlites_before_and_after_new_sets(
    sqlite_and_chstore: tuple[SQLiteStore, ClickHouseStore],
    first: list[Raw],
    later: list[Raw],
    asked: list[dict[str, Any]],
) -> None:
    _equal_after_each_batch(sqlite_and_chstore, first, later, asked)


@_examples
@given(
    first=tagged_events_strategy,
    later=tagged_events_strategy,
    asked=st.lists(tagged_questions_strategy, min_size=1, max_size=3),
)
def test_tagged_reports_by_set_equal_sqlites_before_and_after_new_tag_sets(
    sqlite_and_chstore: tuple[SQLiteStore, ClickHouseStore],
    first: list[Raw],
    later: list[Raw],
    asked: list[dict[str, Any]],
) -> None:
    """Tagged questions, grouped or not; the tag sets asked of may be new in either batch
    (one holding the tags asked among them)."""
    _equal_after_each_batch(sqlite_and_chstore, first, later, asked)


def _rows(rows: Any) -> list[tuple[Any, ...]]:
    """A store's rows in one order (stores return them in any)."""
    return sorted(((r.window, r.group, r.values) for r in rows), key=repr)


def _hours(n: int) -> tuple[Window, ...]:
    return tuple(Window(i, BASE_MS + i * HOUR_MS, BASE_MS + (i + 1) * HOUR_MS) for i in range(n))


def _fill(store: Any, account: str, sets: list[tuple[dict[str, str], frozenset[str]]]) -> None:
    """A new account's events, one per (dimensions, tags), over its first five hours."""
    store.create_account(Account(account, "S"))
    store.append(
        [
            Event(
                f"f{n}", account, "m", BASE_MS + (n % 5) * HOUR_MS, float(n), dimensions=d, tags=t
            )
            for n, (d, t) in enumerate(sets)
        ]
    )


def _asked_again(sqlite: SQLiteStore, chstore: ClickHouseStore, spec: AggregateSpec) -> list[str]:
    """The statements the store ran to answer ``spec`` again (SQLite's answer checked)."""
    looked_up: list[str] = []
    query = chstore.transport.query
    chstore.transport.query = lambda sql: looked_up.append(sql) or query(sql)  # type: ignore[method-assign]
    try:
        assert _rows(chstore.aggregate_columns(spec).rows()) == _rows(sqlite.aggregate(spec))
    finally:
        chstore.transport.query = query  # type: ignore[method-assign]
    return looked_up


def test_a_set_per_group_is_read_by_set_and_its_dimensions_kept(
    sqlite_and_chstore: tuple[SQLiteStore, ClickHouseStore],
) -> None:
    sqlite, chstore = sqlite_and_chstore
    dims = [{"status": s} for s in ("200", "404", "200", "500", "404")] + [{}]
    for store in (sqlite, chstore):
        _fill(store, "one", [(d, frozenset()) for d in dims])
    spec = AggregateSpec(("one",), "m", _hours(5), (Measure("sum"),), group_by=("status",))
    (plan,) = chstore.plans(spec)
    assert isinstance(plan, SetsPlan) and "GROUP BY idx, dimset" in plan.sql
    assert _rows(chstore.aggregate_columns(spec).rows()) == _rows(sqlite.aggregate(spec))
    kept = dict(chstore._sets)
    assert sorted(kept.values(), key=str) == sorted(
        [{"status": "200"}, {"status": "404"}, {"status": "500"}, {}], key=str
    )
    assert not chstore._by_value
    assert _asked_again(sqlite, chstore, spec) == []  # every set kept: no lookup


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
        _fill(store, "two", [(d, frozenset()) for d in dims])
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


def test_a_tagged_report_is_read_by_tag_set_and_its_tags_kept(
    sqlite_and_chstore: tuple[SQLiteStore, ClickHouseStore],
) -> None:
    sqlite, chstore = sqlite_and_chstore
    tags = [frozenset({"prod"}), frozenset({"staging"}), frozenset(), frozenset({"prod"})] * 3
    for store in (sqlite, chstore):
        _fill(store, "one", [({}, t) for t in tags])
    spec = AggregateSpec(("one",), "m", _hours(5), (Measure("sum"),), tags=frozenset({"prod"}))
    (plan,) = chstore.plans(spec)
    assert isinstance(plan, SetsPlan) and "GROUP BY idx, tagset" in plan.sql
    assert "hasAll" not in plan.sql and "hasAll" in plan.by_value
    assert _rows(chstore.aggregate_columns(spec).rows()) == _rows(sqlite.aggregate(spec))
    assert sorted(map(sorted, chstore._tagsets.values())) == [[], ["prod"], ["staging"]]
    assert not chstore._by_value
    assert _asked_again(sqlite, chstore, spec) == []  # every tag set kept: no lookup


def test_two_tag_sets_holding_the_tags_in_one_cell_answer_by_the_values(
    sqlite_and_chstore: tuple[SQLiteStore, ClickHouseStore],
) -> None:
    """prod and (prod, eu) in the same hours: both hold prod, their rows would be folded in
    Python (a float sum in another order than ClickHouse's), so the values answer, from
    then on; a question whose tag only one of them holds is still read by set."""
    sqlite, chstore = sqlite_and_chstore
    tags = [frozenset({"prod"}), frozenset({"prod", "eu"}), frozenset({"eu"})] * 5
    for store in (sqlite, chstore):
        _fill(store, "two", [({}, t) for t in tags])
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
