"""The SQL planner: how windows are cut into grains, and the exact SQL of one plan."""

from __future__ import annotations

import itertools
from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from usagemeter.store.base import AggregateSpec, Measure, Window
from usagemeter.store.sqlplan import (
    ACCOUNT_GRAINS,
    KEY_DAYS,
    KEY_GRAINS,
    KEY_HOURS,
    POSTGRES,
    SLOTS,
    grains_for,
    plan_aggregate,
    split_windows,
)

MIN = 60_000
SLOT = 15 * MIN
HOUR = 60 * MIN
DAY = 24 * HOUR


def test_a_new_york_day_with_a_ragged_start() -> None:
    pieces, raw = split_windows([Window(0, 5 * HOUR + 7 * MIN, DAY + 5 * HOUR)], KEY_GRAINS)
    assert pieces[KEY_DAYS] == []
    assert pieces[KEY_HOURS] == [(0, 6, 29)]  # 06:00 to 05:00 the next day
    assert pieces[SLOTS] == [(0, 21, 24)]  # 05:15 to 06:00
    assert raw == [(0, 5 * HOUR + 7 * MIN, 5 * HOUR + 15 * MIN)]


def test_whole_utc_days_come_from_the_day_rollup() -> None:
    pieces, raw = split_windows([Window(3, 0, 3 * DAY)], KEY_GRAINS)
    assert pieces == {KEY_DAYS: [(3, 0, 3)], KEY_HOURS: [], SLOTS: []} and raw == []


@given(st.integers(0, 10 * DAY), st.integers(1, 5 * DAY))
def test_pieces_tile_the_window_exactly(start: int, length: int) -> None:
    pieces, raw = split_windows([Window(0, start, start + length)], KEY_GRAINS)
    spans = [(lo * g.unit_ms, hi * g.unit_ms) for g, found in pieces.items() for _, lo, hi in found]
    spans += [(lo, hi) for _, lo, hi in raw]
    spans.sort()
    assert spans[0][0] == start and spans[-1][1] == start + length
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))


def test_questions_about_dimensions_or_tags_use_the_detailed_grain_only() -> None:
    plain = AggregateSpec(("a",), "m", (), (Measure("count"),), group_by=("key", "subaccount"))
    assert grains_for(plain) == KEY_GRAINS
    by_account = AggregateSpec(("a",), "m", (), (Measure("sum"),), group_by=("subaccount",))
    assert grains_for(by_account) == ACCOUNT_GRAINS
    one_key = AggregateSpec(("a",), "m", (), (Measure("count"),), key_id="k")
    assert grains_for(one_key) == KEY_GRAINS
    for detailed in (
        AggregateSpec(("a",), "m", (), (Measure("count"),), group_by=("agent",)),
        AggregateSpec(("a",), "m", (), (Measure("count"),), filters=(("agent", "x"),)),
        AggregateSpec(("a",), "m", (), (Measure("count"),), tags=frozenset({"t"})),
        AggregateSpec(("a",), "m", (), (Measure("unique_count", "session_id"),)),
    ):
        assert grains_for(detailed) == (SLOTS,)


def test_golden_sql() -> None:
    spec = AggregateSpec(
        ("a",),
        "lookups",
        (Window(0, 5 * HOUR + 7 * MIN, DAY + 5 * HOUR),),
        (Measure("count"),),
        group_by=("key",),
        billable=True,
    )
    (plan,) = plan_aggregate(spec, 7, [1], None)
    columns = (
        "x.account AS account, x.key AS key, {dimset} AS dimset, x.cnt AS cnt, x.total AS total,"
        " x.vmin AS vmin, x.vmax AS vmax, x.last_ts AS last_ts, x.last_val AS last_val"
    )
    assert plan.sql == (
        "WITH w1(idx, lo, hi) AS (VALUES (?,?,?)), w2(idx, lo, hi) AS (VALUES (?,?,?)),"
        " rw(idx, lo, hi) AS (VALUES (?,?,?))"
        " SELECT s.idx, k.id AS g0, sum(s.cnt) FROM ("
        f"SELECT w1.idx AS idx, {columns.format(dimset='0')} FROM w1 JOIN rollup_hour_key x"
        " ON x.metric = ? AND x.account IN (?) AND x.slot >= w1.lo AND x.slot < w1.hi"
        " AND x.billable = ?"
        f" UNION ALL SELECT w1.idx AS idx, {columns.format(dimset='0')}"
        " FROM w1 JOIN rollup_hour_key_recent x"
        " ON x.metric = ? AND x.account IN (?) AND x.slot >= w1.lo AND x.slot < w1.hi"
        " AND x.billable = ?"
        " UNION ALL SELECT w2.idx AS idx,"
        f" {columns.format(dimset='x.dimset')} FROM w2 JOIN rollup x"
        " ON x.metric = ? AND x.account IN (?) AND x.slot >= w2.lo AND x.slot < w2.hi"
        " AND x.billable = ?"
        " UNION ALL SELECT w2.idx AS idx,"
        f" {columns.format(dimset='x.dimset')} FROM w2 JOIN rollup_recent x"
        " ON x.metric = ? AND x.account IN (?) AND x.slot >= w2.lo AND x.slot < w2.hi"
        " AND x.billable = ?"
        " UNION ALL SELECT rw.idx AS idx, x.account AS account, x.key AS key, x.dimset AS dimset,"
        " 1 AS cnt, x.value AS total, x.value AS vmin, x.value AS vmax, x.ts AS last_ts,"
        " x.value AS last_val FROM rw JOIN events x ON x.seq IN (SELECT t.seq"
        " FROM event_times_all t"
        " WHERE t.metric = ? AND t.account IN (?) AND t.ts >= rw.lo AND t.ts < rw.hi)"
        " AND x.billable = ?"
        ") AS s LEFT JOIN keys k ON k.rid = s.key GROUP BY s.idx, g0"
    )
    assert plan.params == (
        0,
        6,
        29,
        0,
        21,
        24,
        0,
        18_420_000,
        18_900_000,
        *(7, 1, 1) * 5,  # two levels of key hours, two of slots, the raw events
    )


def test_golden_postgres_sql_reads_dimension_sets_by_key_and_tag_sets_once() -> None:
    # On PostgreSQL a plain join to dimsets hashed every set ever stored (they grow with the
    # sessions), and the tags' IN (subquery) was scanned again for every slot row; the
    # statement now says how to read both. Parameters are binary (%b): one prepared plan.
    spec = AggregateSpec(
        ("a",),
        "requests",
        (Window(0, 0, 2 * SLOT), Window(1, 2 * SLOT, 4 * SLOT)),
        (Measure("count"),),
        group_by=("status",),
        tags=frozenset({"prod", "web"}),
    )
    (plan,) = plan_aggregate(spec, 7, [1], None, POSTGRES, pending="unfolded")
    assert "?" not in plan.sql and "%s" not in plan.sql
    assert (
        "x.tagset = ANY(ARRAY(SELECT tagset FROM tagset_tags WHERE tag IN (%b,%b)"
        " GROUP BY tagset HAVING count(*) = %b))"
    ) in plan.sql
    assert plan.sql.count("tagset_tags") == 2  # the slots, and the events waiting
    assert (
        ") AS s CROSS JOIN LATERAL (SELECT y.dims FROM dimsets y WHERE y.id = s.dimset"
        " OFFSET 0) d GROUP BY s.idx, g0"
    ) in plan.sql
    assert "JOIN dimsets" not in plan.sql
    assert plan.params[:3] == ([0, 1], [0, 2], [2, 4])  # each window's slots, as arrays


def test_a_distinct_count_alone_reads_the_values_per_hour_on_postgres_only() -> None:
    # A New York day with a ragged start: whole hours from rollup_values (with rollup_hour
    # beside them, so that hours of events without the dimension count 0), slots and raw
    # events at the ends, the range's total in the same pass (GROUPING SETS).
    spec = AggregateSpec(
        ("a",),
        "Sessions",
        (Window(0, 5 * HOUR + 7 * MIN, DAY + 5 * HOUR),),
        (Measure("unique_count", "session_id"),),
        totals=True,
    )
    (plan,) = plan_aggregate(spec, 7, [1], None, POSTGRES, pending="unfolded")
    assert "FROM rollup_values x WHERE x.metric = %b AND x.name = %b" in plan.sql
    assert "FROM rollup_hour x" in plan.sql and "count(DISTINCT s.v)" in plan.sql
    assert "GROUP BY GROUPING SETS ((s.idx), ())" in plan.sql
    assert plan.params.count("session_id") == 4  # the values, slots, raw events, waiting
    # SQLite keeps no such table: the same question reads its slots, both passes.
    (lite,) = plan_aggregate(spec, 7, [1], None)
    assert "rollup_values" not in lite.sql and "GROUPING" not in lite.sql
    assert lite.sql.count("JOIN rollup x ON") == 2
    # A distinct count with anything else to it reads the slots on PostgreSQL too.
    for other in (
        replace(spec, filters=(("status", "200"),)),
        replace(spec, group_by=("agent",)),
        replace(spec, measures=(Measure("count"), Measure("unique_count", "session_id"))),
    ):
        assert all(
            "rollup_values" not in p.sql for p in plan_aggregate(other, 7, [1], None, POSTGRES)
        )
    assert all("rollup_values" not in p.sql for p in plan_aggregate(spec, 7, [1], 3, POSTGRES))
