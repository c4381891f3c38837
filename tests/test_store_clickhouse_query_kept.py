"""Round 14: a range's boundaries and windows are kept by the engine for the ranges asked
lately (engine._kept_cuts, keyed by the instants in UTC), a question's statements by the
ClickHouse store for the very windows tuple they were planned for (ClickHouseStore.plans),
and the response's texts of the boundaries for the very cuts (api/native._kept_stamps).
Every answer asked again must be what a fresh planning gives: SQLite's, in any zone (New
York's changes, Kathmandu's +05:45, Lord Howe's half hour, Chatham's +12:45, Kolkata's
+05:30), hourly and daily, grouped and not; the boundaries those of timewindows.bucket_edges,
also for the two readings of a wall time a fall back repeats."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usagemeter.api.native import _bucket_dicts, buckets_json
from usagemeter.engine import Engine
from usagemeter.model import Account, Aggregation, Event, Query
from usagemeter.store import chplan
from usagemeter.store.base import AggregateSpec, Measure, Window
from usagemeter.store.clickhouse import ClickHouseStore
from usagemeter.store.sqlite import SQLiteStore
from usagemeter.timewindows import Granularity, bucket_edges

HOUR_MS = 3_600_000
# Days just before an offset change: New York falls back on 2025-11-02 and springs forward
# on 2026-03-08, Lord Howe goes from +10:30 to +11 on 2025-10-05, Chatham from +12:45 to
# +13:45 on 2025-09-28.
BASES = [datetime(2025, 11, 1), datetime(2026, 3, 7), datetime(2025, 10, 4), datetime(2025, 9, 27)]
ZONES = [
    "UTC",
    "America/New_York",
    "Asia/Kathmandu",
    "Australia/Lord_Howe",
    "Pacific/Chatham",
    "Asia/Kolkata",
]

_runs = itertools.count()

events_strategy = st.lists(
    st.tuples(
        st.integers(0, 4 * 24 * HOUR_MS - 1),  # within four days of the base
        st.integers(-3, 9),
        st.sampled_from([None, "200", "404", "500"]),
    ),
    max_size=40,
)
questions_strategy = st.fixed_dictionaries(
    {
        "tz": st.sampled_from(ZONES),
        "granularity": st.sampled_from([Granularity.HOUR, Granularity.DAY]),
        "group_by": st.sampled_from([(), ("status",)]),
        "aggregation": st.sampled_from([Aggregation.COUNT, Aggregation.SUM, Aggregation.MAX]),
        # On the hour, on the quarter hour, or anywhere; lasting an hour to three days.
        "start_ms": st.one_of(
            st.integers(0, 24).map(lambda h: h * HOUR_MS),
            st.integers(0, 96).map(lambda q: q * HOUR_MS // 4),
            st.integers(0, 24 * HOUR_MS),
        ),
        "length_ms": st.one_of(
            st.integers(1, 72).map(lambda h: h * HOUR_MS), st.integers(1, 72 * HOUR_MS)
        ),
    }
)


def _query(account: str, base: datetime, q: dict[str, Any]) -> Query:
    start = base + timedelta(milliseconds=q["start_ms"])
    return Query(
        (account,),
        "m",
        start,
        start + timedelta(milliseconds=q["length_ms"]),
        q["granularity"],
        q["tz"],
        aggregations=(q["aggregation"],),
        group_by=q["group_by"],
    )


def _answer(store: Any, query: Query) -> tuple[Any, ...]:
    result = Engine(store).run(query)
    return result.buckets, result.totals, result.total


def _fresh_cuts(query: Query) -> list[datetime]:
    return bucket_edges(query.start, query.end, query.granularity, ZoneInfo(query.tz))[0]


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    base=st.sampled_from(BASES),
    raw=events_strategy,
    asked=st.lists(questions_strategy, min_size=1, max_size=4),
)
def test_reports_asked_again_equal_sqlites_in_every_zone(
    sqlite_and_chstore: tuple[SQLiteStore, ClickHouseStore],
    base: datetime,
    raw: list[tuple[int, int, str | None]],
    asked: list[dict[str, Any]],
) -> None:
    """Each question asked of SQLite, then twice of ClickHouse with the others between (the
    second time from the kept cuts and statements): every answer SQLite's, every boundary
    the zone's, every response's boundaries written as the dicts' rendering writes them."""
    sqlite, chstore = sqlite_and_chstore
    account = f"k{next(_runs)}"
    base = base.replace(tzinfo=UTC)
    events = [
        Event(
            f"e{n}",
            account,
            "m",
            int(base.timestamp() * 1000) + at,
            float(v),
            dimensions={"status": status} if status else {},
        )
        for n, (at, v, status) in enumerate(raw)
    ]
    for store in (sqlite, chstore):
        store.create_account(Account(account, "K"))
        store.append(events)
    queries = [_query(account, base, q) for q in asked]
    expected = [_answer(sqlite, query) for query in queries]
    for _ in range(2):
        for query, answer in zip(queries, expected, strict=True):
            assert _answer(chstore, query) == answer
            result = Engine(chstore).run(query)
            assert list(result.cells.cuts) == _fresh_cuts(query)
            # The boundaries' texts kept with the cuts: the bytes of the dicts' rendering.
            assert buckets_json(result) == msgspec.json.encode(_bucket_dicts(result))


def test_the_two_readings_of_a_repeated_wall_time_are_two_ranges() -> None:
    """New York's 01:30 on 2025-11-02 is read twice (fold 0 at -04:00, fold 1 at -05:00):
    the two compare equal as datetimes of one zone, but are instants an hour apart, and
    each range keeps its own cuts (keyed by its instants in UTC, not by the datetimes)."""
    zone = ZoneInfo("America/New_York")
    first = datetime(2025, 11, 2, 1, 30, tzinfo=zone)
    second = first.replace(fold=1)
    assert first == second and first.astimezone(UTC) != second.astimezone(UTC)
    end = datetime(2025, 11, 2, 5, tzinfo=zone)
    for start in (first, second, first):
        query = Query(("a",), "m", start, end, Granularity.HOUR, "America/New_York")
        cuts = Engine._edges(query)[0]
        assert list(cuts) == _fresh_cuts(query)
        assert cuts[0].utcoffset() == start.utcoffset()


def _spec(windows: tuple[Window, ...]) -> AggregateSpec:
    return AggregateSpec(("a",), "m", windows, (Measure("count"),), group_by=("status",))


def _hours(first: int, count: int) -> tuple[Window, ...]:
    base = int(datetime(2025, 11, 1, tzinfo=UTC).timestamp() * 1000)
    return tuple(
        Window(i, base + (first + i) * HOUR_MS, base + (first + i + 1) * HOUR_MS)
        for i in range(count)
    )


def _sql(plans: list[Any]) -> list[str]:
    return [p.sql for p in plans]


def test_statements_are_kept_for_the_same_windows_only(
    chstore: ClickHouseStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A question asked over other windows (another range of the same length, equal
    windows in another tuple) is planned for them; over the same tuple, its statements are
    the kept ones, until a table the plan reads is no longer complete."""
    early, late = _spec(_hours(0, 6)), _spec(_hours(3, 6))
    fresh = {"hour_sets": True, "distinct_hours": True, "latest_hours": True}
    assert _sql(chstore.plans(early)) == _sql(chplan.plan_aggregate(early, **fresh))
    assert _sql(chstore.plans(late)) == _sql(chplan.plan_aggregate(late, **fresh))
    assert _sql(chstore.plans(early)) != _sql(chstore.plans(late))
    copy = _spec(tuple(Window(w.index, w.start_ms, w.end_ms) for w in early.windows))
    assert _sql(chstore.plans(copy)) == _sql(chstore.plans(early))
    planned: list[AggregateSpec] = []

    def recorded(spec: AggregateSpec, **tables: bool) -> list[Any]:
        planned.append(spec)
        return chplan.plan_aggregate(spec, **tables)

    monkeypatch.setattr("usagemeter.store.clickhouse.plan_aggregate", recorded)
    chstore.plans(early)
    assert not planned  # the same tuple: kept
    monkeypatch.setattr(chstore.hour_sets, "ready", lambda: False)
    assert _sql(chstore.plans(early)) == _sql(chplan.plan_aggregate(early, hour_sets=False))
    assert planned == [early]  # the hour table no longer complete: planned again
