"""The ClickHouse store's hour table with dimension and tag sets (read for the whole hours of
grouped and tagged questions) and its distinct-count states per hour (read for distinct
counts with no filter): each equal to a fold of the events after voids, amends and account
deletion, and built on an older database while another process ingests, each event counted
once (store/chupgrade.py)."""

from __future__ import annotations

import itertools
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from usagemeter.corrections import Amendment, VoidSelector
from usagemeter.engine import Engine
from usagemeter.model import Account, Event, Query
from usagemeter.store import chupgrade
from usagemeter.store.base import AggregateSpec, Measure, Window
from usagemeter.store.chplan import plan_aggregate
from usagemeter.store.chschema import (
    DISTINCT_VALUES,
    HOUR_SETS,
    HOUR_VALUES,
    LATEST,
    LEGACY_GRAINS,
    LEGACY_LATEST,
    LEGACY_STATEMENTS,
    TABLES,
)
from usagemeter.store.chtransport import ChdbTransport, HttpTransport, Transport
from usagemeter.store.clickhouse import ClickHouseStore
from usagemeter.store.sqlplan import Grain
from usagemeter.timewindows import Granularity

BASE_MS = 1_741_392_000_000  # 2025-03-08T00:00:00Z
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
COLUMNS = "account, metric, slot, key, billable, dimset, tagset"


def _events(first: int, count: int, account: str = "a") -> list[Event]:
    """Every 7 minutes and a few ms, in two statuses and two tag sets: values are whole, so
    sums are exact in any order."""
    return [
        Event(
            id=f"e{i}",
            account_id=account,
            metric="requests",
            ts_ms=BASE_MS + i * 7 * 60_000 + i % 5,
            value=float(i % 11),
            dimensions={"status": "200" if i % 3 else "500"},
            tags=frozenset({"prod"} if i % 4 else {"staging"}),
        )
        for i in range(first, first + count)
    ]


def _hour_table(store: ClickHouseStore) -> list[list[Any]]:
    return store.transport.query(
        f"SELECT {COLUMNS}, sum(cnt), sum(total), min(vmin), max(vmax), argMaxMerge(last)"
        f" FROM {HOUR_SETS} GROUP BY {COLUMNS} ORDER BY {COLUMNS}"
    )


def _folded_events(store: ClickHouseStore) -> list[list[Any]]:
    return store.transport.query(
        f"SELECT account, metric, intDiv(ts, {HOUR_MS}) AS slot, key, billable, dimset,"
        " tagset, count(), sum(value), min(value), max(value), argMax(value, (ts, seq))"
        f" FROM events GROUP BY {COLUMNS} ORDER BY {COLUMNS}"
    )


def _distinct_table(store: ClickHouseStore) -> list[list[Any]]:
    return store.transport.query(
        "SELECT account, metric, name, v, arraySort(groupUniqArrayArray(hours))"
        f" FROM {DISTINCT_VALUES} GROUP BY account, metric, name, v ORDER BY ALL"
    )


def _distinct_events(store: ClickHouseStore) -> list[list[Any]]:
    """Each dimension's values with their hours (2 * hour + billable), and '' wherever
    events are."""
    return store.transport.query(
        "SELECT account, metric, name, v,"
        f" arraySort(groupUniqArray(toInt32(2 * intDiv(ts, {HOUR_MS}) + billable)))"
        " FROM events ARRAY JOIN arrayConcat([''], mapKeys(dims)) AS name,"
        " arrayConcat([''], mapValues(dims)) AS v GROUP BY account, metric, name, v ORDER BY ALL"
    )


def _latest_table(store: ClickHouseStore) -> list[list[Any]]:
    return store.transport.query(
        "SELECT account, metric, slot, key, billable, sum(cnt), sum(total), min(vmin),"
        f" max(vmax), max(top) FROM {HOUR_VALUES}"
        " GROUP BY account, metric, slot, key, billable ORDER BY ALL"
    )


def _latest_events(store: ClickHouseStore) -> list[list[Any]]:
    return store.transport.query(
        f"SELECT account, metric, intDiv(ts, {HOUR_MS}) AS slot, key, billable, count(),"
        " sum(value), min(value), max(value), max((ts, seq, value)) FROM events"
        " GROUP BY account, metric, slot, key, billable ORDER BY ALL"
    )


def _legacy_table(store: ClickHouseStore, grain: Grain) -> list[list[Any]]:
    """A table of a database created before round 9, as its rows' folds."""
    if grain.table == LEGACY_LATEST:
        return store.transport.query(
            f"SELECT account, metric, slot, key, billable, max(top) FROM {LEGACY_LATEST}"
            " GROUP BY ALL ORDER BY ALL"
        )
    key = " key," if grain.keyed else ""
    return store.transport.query(
        f"SELECT account, metric,{key} slot, billable, sum(cnt), sum(total), min(vmin),"
        f" max(vmax), argMaxMerge(last) FROM {grain.table} GROUP BY ALL ORDER BY ALL"
    )


def _legacy_events(store: ClickHouseStore, grain: Grain) -> list[list[Any]]:
    slot = f"intDiv(ts, {grain.unit_ms}) AS slot"
    if grain.table == LEGACY_LATEST:
        return store.transport.query(
            f"SELECT account, metric, {slot}, key, billable, max((ts, seq, value))"
            " FROM events GROUP BY ALL ORDER BY ALL"
        )
    key = " key," if grain.keyed else ""
    return store.transport.query(
        f"SELECT account, metric,{key} {slot}, billable, count(), sum(value), min(value),"
        " max(value), argMax(value, (ts, seq)) FROM events GROUP BY ALL ORDER BY ALL"
    )


def _tables_equal_their_folds(store: ClickHouseStore) -> None:
    assert _hour_table(store) == _folded_events(store)
    assert _distinct_table(store) == _distinct_events(store)
    assert _latest_table(store) == _latest_events(store)


def _tagged_by_status(account: str = "a") -> AggregateSpec:
    start = BASE_MS + 15 * 60_000  # two-hour windows from :15: one whole hour each
    windows = tuple(
        Window(n, start + 2 * n * HOUR_MS, start + 2 * (n + 1) * HOUR_MS) for n in range(24)
    )
    return AggregateSpec(
        (account,),
        "requests",
        windows,
        (Measure("count"), Measure("sum")),
        group_by=("status",),
        tags=frozenset({"prod"}),
    )


def test_whole_hours_of_grouped_and_tagged_questions_read_the_hour_table() -> None:
    """Windows starting at :15, as Kathmandu's hours do: each window's whole UTC hours come from the
    hour table, its ragged quarter hours from the slots; without the hour table, slots."""
    (plan,) = plan_aggregate(_tagged_by_status(), hour_sets=True)
    assert f"FROM {HOUR_SETS} WHERE" in plan.sql and "FROM rollup WHERE" in plan.sql
    (before,) = plan_aggregate(_tagged_by_status(), hour_sets=False)
    assert HOUR_SETS not in before.sql and "FROM rollup WHERE" in before.sql
    plain = AggregateSpec(("a",), "requests", _tagged_by_status().windows, (Measure("count"),))
    (coarse,) = plan_aggregate(plain, hour_sets=True)
    assert HOUR_SETS not in coarse.sql  # the lean hour and day tables serve it


def test_the_hour_table_answers_as_the_slots_do(
    chstore: ClickHouseStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    chstore.create_account(Account("a", "A"))
    chstore.append(_events(0, 600))
    chstore.append(_events(600, 600))  # rows of one hour from two inserts
    assert chstore.hour_sets.ready()
    engine = Engine(chstore)
    queries = [
        Query(
            ("a",),
            "requests",
            _utc(BASE_MS + 1234),
            _utc(BASE_MS + 5 * DAY_MS - 77),
            granularity,
            tz,
            group_by=group_by,
            tags=tags,
        )
        for granularity, tz, group_by, tags in [
            (Granularity.HOUR, "America/New_York", ("status",), frozenset()),
            (Granularity.DAY, "Asia/Kathmandu", (), frozenset({"prod"})),
            (Granularity.TOTAL, "UTC", ("status",), frozenset({"staging"})),
        ]
    ]
    with_hours = [engine.run(q) for q in queries]
    monkeypatch.setattr(chstore.hour_sets, "ready", lambda: False)  # the slots answer
    for query, answer in zip(queries, with_hours, strict=True):
        result = engine.run(query)
        assert (answer.buckets, answer.totals, answer.total) == (
            result.buckets,
            result.totals,
            result.total,
        )
    assert with_hours[0].total[0]  # something was counted


def test_voids_amends_and_deletion_recompute_the_hour_distinct_and_latest_tables(
    chstore: ClickHouseStore,
) -> None:
    chstore.create_account(Account("a", "A"))
    chstore.create_account(Account("b", "B"))
    chstore.append(_events(0, 400))
    chstore.append(_events(0, 300, account="b"))
    chstore.void_events(
        VoidSelector("a", metric="requests", start_ms=BASE_MS, end_ms=BASE_MS + 5 * HOUR_MS),
        "test",
        None,
        BASE_MS + 9 * DAY_MS,
    )
    chstore.void_events(
        VoidSelector("a", ids=("e100",)),
        "test",
        None,
        BASE_MS + 9 * DAY_MS,
        amend=Amendment(value=40.0),
    )
    _tables_equal_their_folds(chstore)
    chstore.delete_account("b")
    _tables_equal_their_folds(chstore)
    assert {row[0] for row in _hour_table(chstore)} == {"a"}
    assert {row[0] for row in _distinct_table(chstore)} == {"a"}
    assert {row[2] for row in _distinct_table(chstore)} == {"", "status"}
    assert {row[0] for row in _latest_table(chstore)} == {"a"}


def _utc(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _transport(home: str, database: str) -> Transport:
    if home.startswith("chdb:"):
        return ChdbTransport(home.split("://", 1)[1][1:], database)
    return HttpTransport(home.rsplit("/", 1)[0] + "/" + database)


@pytest.mark.parametrize(
    ("table", "backfilled"),
    [(HOUR_SETS, "hour_sets"), (DISTINCT_VALUES, "distinct_values"), (LATEST, "latest_hours")],
)
def test_an_older_database_is_upgraded_while_another_process_ingests(
    clickhouse_home: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    table: str,
    backfilled: str,
) -> None:
    """A database from before the hour table (or the distinct or latest table, round 8), its
    ingest running on: the store that opens it creates the table and its view, folds what came
    before once the boundary has settled, and only then plans with it. A void in between
    refolds only what the view counted. Every event is in the table once, none is lost."""
    monkeypatch.setattr(chupgrade, "SETTLE_NS", 1_000_000_000)  # 1 s instead of 30
    monkeypatch.setattr(chupgrade, "CHECK_EVERY", 0.05)
    database = f"older_{time.time_ns()}"
    side = str(tmp_path / "side.sqlite")
    older = ClickHouseStore(_transport(clickhouse_home, database), side)
    upgraded: ClickHouseStore | None = None
    try:
        # What an older version left: no hour table, no view, events already stored.
        older.transport.command(f"DROP VIEW {table}_mv")
        older.transport.command(f"DROP TABLE {table}")
        older.create_account(Account("a", "A"))
        older.append(_events(0, 500))

        stop = threading.Event()
        appended = [500]

        def ingest() -> None:  # the other process: batches of 50 until told to stop
            while not stop.is_set() and appended[0] < 10_000:
                older.append(_events(appended[0], 50))
                appended[0] += 50

        other = threading.Thread(target=ingest)
        other.start()
        try:
            time.sleep(0.05)
            upgraded = ClickHouseStore(_transport(clickhouse_home, database), side)
            upgrade = getattr(upgraded, backfilled)
            assert upgrade.boundary > 0 and not upgrade.ready()
            # A void before the backfill: its refold of the hour table counts only what the
            # view counted, the backfill the rest.
            upgraded.void_events(VoidSelector("a", ids=("e3", "e400")), "t", None, BASE_MS)
            deadline = time.monotonic() + 30
            while not upgrade.ready():
                assert time.monotonic() < deadline, "the backfill never ran"
                time.sleep(0.05)
            time.sleep(0.1)  # ingest goes on after the backfill too
        finally:
            stop.set()
            other.join()
        assert appended[0] > 500
        assert upgraded.count_events() == appended[0] - 2
        _tables_equal_their_folds(upgraded)
        # A second store on it reads the same boundary and finds the backfill done.
        again = ClickHouseStore(_transport(clickhouse_home, database), side)
        assert getattr(again, backfilled).boundary == upgrade.boundary
        assert getattr(again, backfilled).ready()
        again.close()
    finally:
        (upgraded or older).transport.command(f"DROP DATABASE {database}")
        if upgraded is not None:
            upgraded.close()
        older.close()


def test_a_store_closed_during_its_backfill_lets_it_finish(
    clickhouse_home: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: closing a store between two months of its backfill left the claim without
    its row, and the hour table unread by every process from then on."""
    monkeypatch.setattr(chupgrade, "SETTLE_NS", 100_000_000)
    monkeypatch.setattr(chupgrade, "CHECK_EVERY", 0.05)
    first_month = threading.Event()
    real = chupgrade.backfill

    def slow_backfill(table: str, boundary: int, lo: int, hi: int, *layout: bool) -> str:
        if table == HOUR_SETS:
            first_month.set()
            time.sleep(0.3)  # close() arrives while the first month is being folded
        return real(table, boundary, lo, hi, *layout)

    monkeypatch.setattr(chupgrade, "backfill", slow_backfill)
    database = f"closed_{time.time_ns()}"
    side = str(tmp_path / "side.sqlite")
    older = ClickHouseStore(_transport(clickhouse_home, database), side)
    try:
        older.transport.command(f"DROP VIEW {HOUR_SETS}_mv")
        older.transport.command(f"DROP TABLE {HOUR_SETS}")
        older.create_account(Account("a", "A"))
        # Three months of events, so the backfill takes three statements.
        older.append(
            [Event(f"m{i}", "a", "requests", BASE_MS + i * 40 * DAY_MS, float(i)) for i in range(3)]
        )
        upgraded = ClickHouseStore(_transport(clickhouse_home, database), side)
        assert first_month.wait(10), "the backfill never began"
        upgraded.close()
        again = ClickHouseStore(_transport(clickhouse_home, database), side)
        assert again.hour_sets.ready()
        assert _hour_table(again) == _folded_events(again)
        again.close()
    finally:
        older.transport.command(f"DROP DATABASE {database}")
        older.close()


@given(
    first=st.integers(-(10**12), 4 * 10**12),
    span=st.integers(0, 5 * 366 * DAY_MS),
)
def test_the_backfill_months_cover_the_events_without_gaps(first: int, span: int) -> None:
    months = chupgrade._months(first, first + span)
    assert months[0][0] <= first < months[0][1] and months[-1][0] <= first + span < months[-1][1]
    for (_, end), (start, _) in itertools.pairwise(months):
        assert end == start
    for start, end in months:
        opened = datetime.fromtimestamp(start / 1000, UTC)
        assert (opened.day, opened.hour, opened.minute) == (1, 0, 0)
        assert 28 * DAY_MS <= end - start <= 31 * DAY_MS


def test_a_new_database_feeds_only_the_tables_this_version_reads(
    chstore: ClickHouseStore,
) -> None:
    """An INSERT writes a part into every table it feeds: a database created by this version
    has none of the older tables (chschema.LEGACY_GRAINS), whose rows its hour table of
    values holds, and its plain reports read that table."""
    chstore.create_account(Account("a", "A"))
    chstore.append(_events(0, 300))
    fed = chstore.transport.query(
        "SELECT DISTINCT table FROM system.parts WHERE database = currentDatabase() AND active"
        " AND table NOT IN ('accounts', 'keys') ORDER BY table"
    )
    assert [row[0] for row in fed] == sorted(t for t in TABLES if t not in ("accounts", "keys"))
    assert chstore.legacy == ()
    daily = tuple(Window(n, BASE_MS + n * DAY_MS, BASE_MS + (n + 1) * DAY_MS) for n in range(3))
    plain = AggregateSpec(("a",), "requests", daily, (Measure("count"), Measure("max")))
    (plan,) = chstore.plans(plain)
    assert f"FROM {HOUR_VALUES} WHERE" in plan.sql
    _tables_equal_their_folds(chstore)


def test_an_older_databases_tables_stay_right_for_its_older_processes(
    clickhouse_home: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database created before round 9 keeps its hour and day tables and its latest table,
    fed by their views as every insert lands (older processes read them): the store that
    upgrades it backfills the hour table of values, reads the older tables until then, and
    its voids, amends and account deletions refold and empty them too."""
    monkeypatch.setattr(chupgrade, "SETTLE_NS", 200_000_000)
    monkeypatch.setattr(chupgrade, "CHECK_EVERY", 0.05)
    database = f"round8_{time.time_ns()}"
    side = str(tmp_path / "side.sqlite")
    older = ClickHouseStore(_transport(clickhouse_home, database), side)
    upgraded: ClickHouseStore | None = None
    try:
        # What round 8 left: its six coarser tables, no hour table of values.
        older.transport.command(f"DROP VIEW {HOUR_VALUES}_mv")
        older.transport.command(f"DROP TABLE {HOUR_VALUES}")
        for statement in LEGACY_STATEMENTS:
            older.transport.command(statement)
        older.create_account(Account("a", "A"))
        older.create_account(Account("b", "B"))
        older.append(_events(0, 400))
        older.append(_events(0, 200, account="b"))

        upgraded = ClickHouseStore(_transport(clickhouse_home, database), side)
        assert upgraded.legacy == LEGACY_GRAINS and not upgraded.hour_values.ready()
        daily = tuple(Window(n, BASE_MS + n * DAY_MS, BASE_MS + (n + 1) * DAY_MS) for n in range(3))
        plain = AggregateSpec(("a",), "requests", daily, (Measure("count"), Measure("sum")))
        (before,) = upgraded.plans(plain)
        assert "FROM rollup_day WHERE" in before.sql and HOUR_VALUES not in before.sql
        answer = upgraded.aggregate(plain)
        deadline = time.monotonic() + 30
        while not upgraded.hour_values.ready():
            assert time.monotonic() < deadline, "the backfill never ran"
            time.sleep(0.05)
        (after,) = upgraded.plans(plain)
        assert f"FROM {HOUR_VALUES} WHERE" in after.sql
        assert upgraded.aggregate(plain) == answer

        upgraded.append(_events(400, 300))
        older.append(_events(700, 100))
        upgraded.void_events(
            VoidSelector("a", metric="requests", start_ms=BASE_MS, end_ms=BASE_MS + 5 * HOUR_MS),
            "test",
            None,
            BASE_MS + 9 * DAY_MS,
        )
        upgraded.void_events(
            VoidSelector("a", ids=("e450",)),
            "test",
            None,
            BASE_MS + 9 * DAY_MS,
            amend=Amendment(value=40.0),
        )
        _tables_equal_their_folds(upgraded)
        for grain in LEGACY_GRAINS:
            assert _legacy_table(upgraded, grain) == _legacy_events(upgraded, grain), grain
        upgraded.delete_account("b")
        for grain in LEGACY_GRAINS:
            rows = _legacy_table(upgraded, grain)
            assert {row[0] for row in rows} == {"a"}, grain
            assert rows == _legacy_events(upgraded, grain), grain
        _tables_equal_their_folds(upgraded)
        # Once no older process runs, the older tables are dropped beside the running store:
        # its voids go on without them.
        for grain in LEGACY_GRAINS:
            upgraded.transport.command(f"DROP VIEW {grain.table}_mv")
            upgraded.transport.command(f"DROP TABLE {grain.table}")
        upgraded.void_events(VoidSelector("a", ids=("e500",)), "test", None, BASE_MS + 9 * DAY_MS)
        assert upgraded.legacy == ()
        _tables_equal_their_folds(upgraded)
    finally:
        older.transport.command(f"DROP DATABASE {database}")
        if upgraded is not None:
            upgraded.close()
        older.close()
