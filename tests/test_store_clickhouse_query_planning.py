"""Round 14 (second step): planning a range asked the first time. The ClickHouse planner's
short road (chplan._split) finds an hourly report's windows that follow each other, one unit
each, by comparing whole columns, and hands them on as a UnitRun that knows its own
regularity and span; a question of one account says ``account = ...``. The pieces, their
regularity and span must be those the long road finds for any windows, and the answers
SQLite's for one account and for several.

Round 14 (third step): a range starting or ending inside an hour is asked as two statements
(chplan.RaggedPlan), its whole hours as a whole range's and its ragged ends from the raw
events; the answers SQLite's in zones of whole, half and quarter hours across their changes,
grouped, tagged and filtered, with events written into the ends between askings."""

from __future__ import annotations

import itertools
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usagemeter.engine import Engine
from usagemeter.model import Account, Aggregation, Event, Query
from usagemeter.store import chplan
from usagemeter.store.base import AggregateSpec, Measure, Window
from usagemeter.store.chschema import HOUR_SETS_GRAIN
from usagemeter.store.clickhouse import ClickHouseStore
from usagemeter.store.sqlite import SQLiteStore
from usagemeter.store.sqlplan import ACCOUNT_DAYS, SLOTS, Grain, split_windows
from usagemeter.timewindows import Granularity

HOUR_MS = 3_600_000
GRAIN_SETS = [(HOUR_SETS_GRAIN, SLOTS), (SLOTS,), (ACCOUNT_DAYS, HOUR_SETS_GRAIN, SLOTS)]


@st.composite
def windows_strategy(draw: st.DrawFn) -> tuple[Window, ...]:
    """A run of windows one unit wide (an hour, a quarter hour or a day), from a unit's
    start or not, numbered from any index, then perhaps spoilt: one window moved, widened,
    renumbered, or two swapped, so the short road must tell a run from what is not one;
    and perhaps its first or last window ragged."""
    width = draw(st.sampled_from([HOUR_MS, HOUR_MS // 4, 24 * HOUR_MS]))
    start = 1_760_000_000_000 // width * width + draw(st.sampled_from([0, 0, 0, HOUR_MS // 4, 1]))
    count = draw(st.integers(1, 60))
    first = draw(st.sampled_from([0, 0, 3]))
    edges = [start + n * width for n in range(count + 1)]
    windows = [Window(first + n, lo, hi) for n, (lo, hi) in enumerate(pairwise(edges))]
    spoil = draw(st.sampled_from(["none", "none", "shift", "widen", "index", "swap"]))
    at = draw(st.integers(0, count - 1))
    w = windows[at]
    if spoil == "shift":  # a gap before it (and the windows after it follow on)
        windows[at:] = [Window(v.index, v.start_ms + width, v.end_ms + width) for v in windows[at:]]
    elif spoil == "widen":  # the last one a unit longer
        last = windows[-1]
        windows[-1] = Window(last.index, last.start_ms, last.end_ms + width)
    elif spoil == "index":
        windows[at] = Window(w.index + 1000, w.start_ms, w.end_ms)
    elif spoil == "swap" and count > 1:
        other = (at + 1) % count
        windows[at], windows[other] = windows[other], windows[at]
    # A range that starts or ends inside a unit (a dashboard's, ending now): its first or
    # last window ragged, cut by a slot, a minute or a millisecond.
    cut = draw(st.sampled_from([width // 4, 60_000, 1]))
    if draw(st.booleans()):
        w = windows[0]
        windows[0] = Window(w.index, min(w.start_ms + cut, w.end_ms - 1), w.end_ms)
    if draw(st.booleans()):
        w = windows[-1]
        windows[-1] = Window(w.index, w.start_ms, max(w.end_ms - cut, w.start_ms + 1))
    return tuple(windows)


@given(windows=windows_strategy(), grains=st.sampled_from(GRAIN_SETS))
def test_the_short_road_finds_the_long_roads_pieces(
    windows: tuple[Window, ...], grains: tuple[Grain, ...]
) -> None:
    """Whatever the windows, _split's pieces are split_windows', and a UnitRun's regularity
    and span are those found by looking at each of its pieces (a plain list of them)."""
    pieces, raw = chplan._split(windows, grains)
    long_pieces, long_raw = split_windows(windows, grains)
    assert {g: list(p) for g, p in pieces.items()} == long_pieces
    assert raw == long_raw
    for found in pieces.values():
        if not found:
            continue
        plain = list(found)
        assert chplan._regular(found) == chplan._regular(plain)
        assert chplan._span(found) == (min(p[1] for p in plain), max(p[2] for p in plain))
        assert chplan._index("slot", found) == chplan._index("slot", plain)


def test_a_run_of_hours_across_a_dst_change_is_one_unit_run() -> None:
    """New York's 90 days across its fall back: 2,161 hours in UTC, each one unit, found by
    the short road as one run (no piece looked at again), its statement arithmetic."""
    zone = "America/New_York"
    start = datetime(2025, 9, 3, 4, tzinfo=UTC)
    query = Query(("a",), "m", start, start + timedelta(days=90), Granularity.HOUR, zone)
    windows = Engine._edges(query)[2]
    pieces, raw = chplan._split(windows, (HOUR_SETS_GRAIN, SLOTS))
    run = pieces[HOUR_SETS_GRAIN]
    assert isinstance(run, chplan.UnitRun) and not raw and not pieces[SLOTS]
    assert len(run) == len(windows) == 90 * 24
    assert chplan._regular(run) == (windows[0].start_ms // HOUR_MS, 1, 0)


def test_a_range_starting_and_ending_inside_an_hour_is_a_run_between_its_ends() -> None:
    """A dashboard's 90 days ending now (seven minutes past an hour): the 2,159 whole hours
    between its ragged ends one UnitRun, the ends' slots and milliseconds beside it."""
    start = datetime(2025, 9, 3, 4, 7, tzinfo=UTC)
    query = Query(
        ("a",), "m", start, start + timedelta(days=90), Granularity.HOUR, "America/New_York"
    )
    windows = Engine._edges(query)[2]
    pieces, raw = chplan._split(windows, (HOUR_SETS_GRAIN, SLOTS))
    run = pieces[HOUR_SETS_GRAIN]
    assert isinstance(run, chplan.UnitRun) and len(run) == len(windows) - 2
    assert (pieces, raw) == split_windows(windows, (HOUR_SETS_GRAIN, SLOTS))


def test_one_account_and_several_answer_as_sqlite(
    sqlite_and_chstore: tuple[SQLiteStore, ClickHouseStore],
) -> None:
    """A question of one account (``account = ...``) and of several (``IN``), hourly by
    status and daily, each SQLite's answer; another account's events never counted."""
    sqlite, chstore = sqlite_and_chstore
    base = datetime(2025, 11, 1, tzinfo=UTC)
    base_ms = int(base.timestamp() * 1000)
    events = [
        Event(
            f"e{n}",
            account,
            "m",
            base_ms + n * 1_234_567,
            float(n % 7),
            dimensions={"status": ("200", "500")[n % 2]},
        )
        for n in range(60)
        for account in ("one", "two", "three")[: 1 + n % 3]
    ]
    for store in (sqlite, chstore):
        for account in ("one", "two", "three"):
            store.create_account(Account(account, account))
        store.append(events)
    end = base + timedelta(days=2)
    for accounts in (("one",), ("two",), ("one", "three"), ("one", "two", "three")):
        for granularity, group_by in ((Granularity.HOUR, ("status",)), (Granularity.DAY, ())):
            query = Query(
                accounts,
                "m",
                base,
                end,
                granularity,
                "America/New_York",
                aggregations=(Aggregation.COUNT, Aggregation.SUM),
                group_by=group_by,
            )
            ours, theirs = Engine(chstore).run(query), Engine(sqlite).run(query)
            assert ours.buckets == theirs.buckets
            assert (ours.totals, ours.total) == (theirs.totals, theirs.total)
    spec = Engine._spec(query, Engine._edges(query)[2], (Measure("count"),), ())
    (plan,) = chplan.plan_aggregate(spec)
    assert "account IN ('one', 'two', 'three')" in plan.sql
    one = Engine._spec(
        Query(("one",), "m", base, end), Engine._edges(query)[2], (Measure("count"),), ()
    )
    (plan,) = chplan.plan_aggregate(one)
    assert "account = 'one'" in plan.sql and "account IN" not in plan.sql


_accounts = itertools.count()
# Days before an offset change: New York falls back on 2025-11-02 and springs forward on
# 2026-03-08, Lord Howe goes from +10:30 to +11 on 2025-10-05.
RAGGED_BASES = [datetime(2025, 11, 1), datetime(2026, 3, 7), datetime(2025, 10, 4)]
RAGGED_ZONES = ["America/New_York", "Asia/Kathmandu", "Australia/Lord_Howe", "UTC"]


def _events(account: str, base_ms: int, raw: list[tuple[int, int, int]], tag: str) -> list[Event]:
    return [
        Event(
            f"{tag}{n}",
            account,
            "m",
            base_ms + at,
            float(v),
            dimensions={"status": ("200", "500", "404")[kind % 3]} if kind < 5 else {},
            tags=frozenset({"prod"}) if kind % 2 else frozenset(),
        )
        for n, (at, v, kind) in enumerate(raw)
    ]


def _answers(store: Any, query: Query) -> tuple[Any, ...]:
    result = Engine(store).run(query)
    return result.buckets, result.totals, result.total


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    base=st.sampled_from(RAGGED_BASES),
    zone=st.sampled_from(RAGGED_ZONES),
    raw=st.lists(
        st.tuples(st.integers(0, 3 * 24 * HOUR_MS - 1), st.integers(-3, 9), st.integers(0, 7)),
        max_size=40,
    ),
    start_ms=st.integers(0, 24 * HOUR_MS - 1),
    length_ms=st.integers(HOUR_MS, 48 * HOUR_MS),
    shape=st.sampled_from(["grouped", "tagged", "both", "filtered", "plain"]),
    aggregation=st.sampled_from([Aggregation.COUNT, Aggregation.SUM, Aggregation.MAX]),
)
def test_ragged_ranges_answer_as_sqlite_with_events_written_between_askings(
    sqlite_and_chstore: tuple[SQLiteStore, ClickHouseStore],
    base: datetime,
    zone: str,
    raw: list[tuple[int, int, int]],
    start_ms: int,
    length_ms: int,
    shape: str,
    aggregation: Aggregation,
) -> None:
    """An hourly report over a range starting and ending anywhere (most often inside an
    hour) equals SQLite's, asked, then asked again after events written at its very first
    and last milliseconds and inside its ends (each acknowledged event in the next answer),
    then once more after events elsewhere."""
    sqlite, chstore = sqlite_and_chstore
    account = f"r{next(_accounts)}"
    base = base.replace(tzinfo=UTC)
    base_ms = int(base.timestamp() * 1000)
    start = base + timedelta(milliseconds=start_ms)
    end = start + timedelta(milliseconds=length_ms)
    query = Query(
        (account,),
        "m",
        start,
        end,
        Granularity.HOUR,
        zone,
        aggregations=(aggregation,),
        group_by=("status",) if shape in ("grouped", "both") else (),
        tags=frozenset({"prod"}) if shape in ("tagged", "both") else frozenset(),
        filters=(("status", "500"),) if shape == "filtered" else (),
    )
    end_ms = start_ms + length_ms
    # At the range's first and last milliseconds, a minute inside each end, and just outside.
    ends = [start_ms, start_ms + 60_000, end_ms - 1, end_ms - 60_000, start_ms - 1, end_ms]
    batches = [
        _events(account, base_ms, raw, "a"),
        _events(account, base_ms, [(at, n, n) for n, at in enumerate(ends) if at >= 0], "b"),
        _events(account, base_ms, [(at + 7, v, k) for at, v, k in raw], "c"),
    ]
    for store in (sqlite, chstore):
        store.create_account(Account(account, "R"))
    for batch in batches:
        for store in (sqlite, chstore):
            store.append(batch)
        assert _answers(chstore, query) == _answers(sqlite, query)


def _ragged_spec(group_by: tuple[str, ...]) -> AggregateSpec:
    start = datetime(2025, 11, 1, 4, 7, tzinfo=UTC)
    zone = "America/New_York"
    query = Query(("a",), "m", start, start + timedelta(days=3), Granularity.HOUR, zone)
    return Engine._spec(query, Engine._edges(query)[2], (Measure("count"),), group_by)


def test_a_ragged_range_is_its_whole_hours_and_its_ends_from_the_raw_events() -> None:
    """A 3-day range from 04:07 (New York's fall back inside it): its 71 whole hours by the
    statement a whole range takes (by set, grouped), its two ragged ends from the events
    alone, found by their own instants; with totals, or a latest value, the one UNION ALL."""
    spec = _ragged_spec(("status",))
    (plan,) = chplan.plan_aggregate(spec, hour_sets=True)
    assert isinstance(plan, chplan.RaggedPlan)
    assert plan.whole is not None and plan.ends is not None
    whole = replace(spec, windows=spec.windows[1:-1])
    assert plan.whole.sql == chplan.plan_aggregate(whole, hour_sets=True)[0].sql
    assert isinstance(plan.whole, chplan.SetsPlan) and "UNION" not in plan.whole.sql
    first, last = spec.windows[0], spec.windows[-1]
    assert "FROM events" in plan.ends.sql and "rollup" not in plan.ends.sql
    # By set, as the whole hours: the events' set ids, not their dimensions' map.
    assert isinstance(plan.ends, chplan.SetsPlan) and "dims.keys" not in plan.ends.sql
    assert "FROM events" in plan.ends.by_value and "status" in plan.ends.by_value
    assert f"ts >= {first.start_ms} AND ts < {first.end_ms} OR" in plan.ends.sql
    assert f"ts >= {last.start_ms} AND ts < {last.end_ms})" in plan.ends.sql
    assert "UNION ALL" in plan.sql  # the same answer in one statement, beside a distinct
    (totals,) = chplan.plan_aggregate(replace(spec, totals=True), hour_sets=True)
    assert not isinstance(totals, chplan.RaggedPlan)
    latest = replace(spec, measures=(Measure("latest"),))
    assert not isinstance(chplan.plan_aggregate(latest, hour_sets=True)[0], chplan.RaggedPlan)


def test_a_ragged_range_answers_as_its_one_statement_and_sqlite(
    sqlite_and_chstore: tuple[SQLiteStore, ClickHouseStore],
) -> None:
    """The two statements' answer is the UNION ALL's (the plan's own sql) and SQLite's,
    events in every window, in the ends' seconds beside the whole hours, and at their
    edges; with a distinct count beside it, the UNION ALL answers in its place."""
    sqlite, chstore = sqlite_and_chstore
    spec = _ragged_spec(("status",))
    first, last = spec.windows[0], spec.windows[-1]
    instants = [first.start_ms - 1, first.start_ms, first.end_ms - 1, first.end_ms]
    instants += [last.start_ms - 1, last.start_ms, last.end_ms - 1, last.end_ms]
    instants += range(first.start_ms, last.end_ms, 997_000)
    events = [
        Event(f"e{n}", "a", "m", at, 1.0, dimensions={"status": ("200", "500")[n % 2]})
        for n, at in enumerate(instants)
    ]
    # A set seen only in the last end (a status new in the last minutes), tagged: its
    # members looked up among the ends' events, not the hour table's.
    events.append(
        Event(
            "new",
            "a",
            "m",
            last.end_ms - 2,
            1.0,
            dimensions={"status": "503"},
            tags=frozenset({"x"}),
        )
    )
    for store in (sqlite, chstore):
        store.create_account(Account("a", "A"))
        store.append(events)
    (plan,) = chstore.plans(spec)
    assert isinstance(plan, chplan.RaggedPlan)
    ours = sorted(chstore.aggregate_columns(spec).rows(), key=lambda r: (r.window, r.group))
    one = chplan.decode_columns(spec, plan, chstore.transport.query_columns(plan.sql))
    assert ours == sorted(one.rows(), key=lambda r: (r.window, r.group))
    assert ours == sorted(sqlite.aggregate(spec), key=lambda r: (r.window, r.group))
    assert {r.window for r in ours} >= {first.index, last.index}
    new = [r for r in ours if r.group == (("status", "503"),)]
    assert [(r.window, r.values) for r in new] == [(last.index, (1,))]
    # Read by set, not by the values after a lookup that missed it.
    assert {"status": "503"} in chstore._sets.values() and not chstore._by_value
    both = replace(spec, measures=(Measure("count"), Measure("unique_count", "status")))
    rows = sorted(chstore.aggregate(both), key=lambda r: (r.window, r.group))
    assert rows == sorted(sqlite.aggregate(both), key=lambda r: (r.window, r.group))
