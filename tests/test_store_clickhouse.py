"""The ClickHouse store (on chDB): the same answers as SQLite for any question, in any zone;
dedupe and conflicts as on the other stores, also between two stores on one database (what
two processes do); the SQL it sends, and the URLs that open it.

The whole store suite and every contract test also run on it, through the ``store`` fixture.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.questions import answers_to
from usagemeter.auth import issue_key
from usagemeter.engine import Engine
from usagemeter.meters import MeterRegistry
from usagemeter.model import Account, Aggregation, Event, Meter, Query, Scope
from usagemeter.store import open_store, rows
from usagemeter.store.base import AggregateSpec, Measure, NotFound, Window
from usagemeter.store.chappend import digest_v1 as _digest_v1
from usagemeter.store.chplan import _regular as chplan_regular
from usagemeter.store.chplan import _split as chplan_split
from usagemeter.store.chplan import plan_aggregate
from usagemeter.store.chschema import HOUR_SETS_GRAIN
from usagemeter.store.chtransport import literal
from usagemeter.store.clickhouse import ClickHouseStore
from usagemeter.store.postgres import _digest as pg_digest
from usagemeter.store.sqlite import SQLiteStore
from usagemeter.store.sqlplan import ACCOUNT_GRAINS, KEY_GRAINS, SLOTS, split_windows
from usagemeter.timewindows import Granularity

BASE = datetime(2025, 3, 8, tzinfo=UTC)  # New York springs forward on the 9th
BASE_MS = int(BASE.timestamp() * 1000)
DAY_MS = 86_400_000
HOUR_MS = 3_600_000


def _event(i: int, account: str = "a", id_suffix: str = "", **fields: Any) -> Event:
    return Event(id=f"e{i}{id_suffix}", account_id=account, metric="m", ts_ms=BASE_MS + i, **fields)


def test_conflicts_are_reported_by_index(chstore: ClickHouseStore) -> None:
    chstore.create_account(Account("a", "A"))
    first = chstore.append([_event(1), _event(2), _event(1, value=5.0)])
    assert (first.accepted, first.duplicates, first.conflicts) == (2, 1, (2,))
    retry = chstore.append([_event(2), _event(1, value=7.0), _event(3)])
    assert (retry.accepted, retry.duplicates, retry.conflicts) == (1, 2, (1,))
    assert chstore.count_events() == 3


def test_a_retry_of_an_event_stored_with_the_earlier_digest_is_a_duplicate(
    chstore: ClickHouseStore,
) -> None:
    """Events stored before the digest's encoding changed keep their digests: a retry of
    one is still counted once and is not reported as a conflict."""
    chstore.create_account(Account("a", "A"))
    event = _event(1, value=3, dimensions={"route": "/x"}, tags=("t",))
    chstore.append([event])
    earlier = _digest_v1(event)
    assert earlier == pg_digest(event).hex()  # what this store stored before
    chstore.transport.command(
        f"ALTER TABLE event_ids UPDATE digest = {literal(earlier)} WHERE id = 'e1'"
        " SETTINGS mutations_sync = 1"
    )
    retry = chstore.append([event, _event(1, value=4)])
    assert (retry.accepted, retry.duplicates, retry.conflicts) == (0, 2, (1,))


def test_a_batch_of_the_largest_size_is_stored_and_deduplicated(chstore: ClickHouseStore) -> None:
    """Regression: the dedupe lookup of 10,000 events was longer than ClickHouse's default
    query size limit, and the batch failed."""
    chstore.create_account(Account("a", "A"))
    batch = [_event(i, id_suffix="x" * 40) for i in range(10_000)]
    assert chstore.append(batch).accepted == 10_000
    assert chstore.append(batch).duplicates == 10_000


def test_two_stores_on_one_database_count_a_retry_once(
    chstore: ClickHouseStore, clickhouse_home: str
) -> None:
    """Two stores on one database have their own locks, as two processes would: a batch
    acknowledged by one is recognised by the other, and by a store opened later."""
    other = open_store(clickhouse_home)
    try:
        chstore.create_account(Account("a", "A"))
        assert chstore.append([_event(i) for i in range(10)]).accepted == 10
        again = other.append([_event(i) for i in range(5, 15)])
        assert (again.accepted, again.duplicates) == (5, 5)
        assert other.count_events() == chstore.count_events() == 15
        # Read-your-writes across stores: the rollups already hold the other's events.
        spec = AggregateSpec(
            ("a",), "m", (Window(0, BASE_MS, BASE_MS + DAY_MS),), (Measure("count"),)
        )
        assert chstore.aggregate(spec)[0].values == (15,)
    finally:
        other.close()


def test_one_batch_racing_at_two_processes_is_stored_once(
    chstore: ClickHouseStore, clickhouse_home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race the lookup cannot see: the second process looked the ids up before the
    first inserted them. The insert's dedupe token keeps the second copy out, rollups too."""
    other = open_store(clickhouse_home)
    assert isinstance(other, ClickHouseStore)
    try:
        chstore.create_account(Account("a", "A"))
        batch = [_event(i, value=float(i)) for i in range(20)]
        assert chstore.append(batch).accepted == 20
        monkeypatch.setattr(other, "_stored_digests", lambda events: {})  # looked too early
        other.append(batch)
        assert chstore.count_events() == 20
        spec = AggregateSpec(
            ("a",), "m", (Window(0, BASE_MS, BASE_MS + DAY_MS),), (Measure("sum"),)
        )
        assert chstore.aggregate(spec)[0].values == (190.0,)
        # A different batch is never taken for the first one. This is also the window that
        # remains (docs/clickhouse.md): another batch sharing some of the ids, looked up
        # before they were inserted, stores those again.
        assert other.append([*batch[:10], _event(99)]).accepted == 11
        assert chstore.count_events() == 31
    finally:
        other.close()


def test_revoked_keys_and_accounts_as_stored(chstore: ClickHouseStore) -> None:
    chstore.create_account(Account("a", "A"))
    chstore.create_account(Account("b", "B", "a"))
    issue_key(chstore, "b", key_id="kb", scopes=[Scope.READ])
    first = chstore.revoke_key("kb").revoked_at
    assert first is not None
    assert chstore.revoke_key("kb").revoked_at == first  # revoked once, the date kept
    assert [k.id for k in chstore.list_keys("b")] == ["kb"]
    assert chstore.list_keys("a") == []
    assert [a.id for a in chstore.list_accounts()] == ["a", "b"]


def test_the_sql_quotes_every_value() -> None:
    assert literal("it's \\ here") == "'it\\'s \\\\ here'"
    spec = AggregateSpec(
        accounts=("a'); DROP TABLE events; --",),
        metric="m",
        windows=(Window(0, 0, 1000),),
        measures=(Measure("count"),),
        filters=(("agent", "x'y"),),
    )
    (plan,) = plan_aggregate(spec)
    assert "account = 'a\\'); DROP TABLE events; --'" in plan.sql
    assert "= 'x\\'y'" in plan.sql


def test_windows_of_one_width_in_a_row_find_their_window_by_arithmetic() -> None:
    """An hourly report's windows are single hours in a row, a UTC daily report's 24 hours
    each: a row's window is arithmetic on its hour, no join; windows with a gap between them
    are joined."""
    hours = tuple(Window(n, BASE_MS + n * HOUR_MS, BASE_MS + (n + 1) * HOUR_MS) for n in range(48))
    (plan,) = plan_aggregate(AggregateSpec(("a",), "m", hours, (Measure("count"),)))
    first = BASE_MS // HOUR_MS
    assert "ASOF" not in plan.sql and f"intDiv(slot - {first}, 1) + 0" in plan.sql
    days = tuple(Window(n, BASE_MS + n * DAY_MS, BASE_MS + (n + 1) * DAY_MS) for n in range(9))
    tagged = AggregateSpec(("a",), "m", days, (Measure("count"),), tags=frozenset({"t"}))
    (by_day,) = plan_aggregate(tagged, hour_sets=True)
    assert "ASOF" not in by_day.sql and f"intDiv(slot - {first}, 24) + 0" in by_day.sql
    gapped = hours[:10] + tuple(
        Window(n, w.start_ms + HOUR_MS, w.end_ms + HOUR_MS) for n, w in enumerate(hours[10:], 10)
    )
    (joined,) = plan_aggregate(AggregateSpec(("a",), "m", gapped, (Measure("count"),)))
    assert "ASOF" in joined.sql


def test_urls_say_what_is_wrong(tmp_path: Path, clickhouse_home: str) -> None:
    with pytest.raises(ValueError, match="chDB's directory"):
        open_store("chdb://")
    if clickhouse_home.startswith("chdb:"):  # chDB's session is open for the tests
        with pytest.raises(ValueError, match="one directory per process"):
            open_store(f"chdb:///{tmp_path}/another")


def test_a_server_that_is_not_there_is_named_without_the_password() -> None:
    with pytest.raises(ConnectionError) as down:
        open_store("clickhouse://bob:hunter2@127.0.0.1:1/usage")
    assert "hunter2" not in str(down.value) and "127.0.0.1" in str(down.value)


# ---------------------------------------------------------------- the same answers as SQLite

ZONES = ["UTC", "America/New_York", "Asia/Kathmandu", "Asia/Kolkata", "Europe/Berlin"]
events_strategy = st.lists(
    st.tuples(
        st.integers(0, 2 * DAY_MS),  # ms after BASE
        st.sampled_from(["a", "b"]),
        st.integers(-5, 50),
        st.sampled_from([None, "x", "y"]),
        st.sampled_from(["s1", "s2", "s3"]),
        st.frozensets(st.sampled_from(["t1", "t2"])),
        st.booleans(),
        st.sampled_from([None, "ka"]),
    ),
    min_size=10,
    max_size=60,
    unique_by=lambda e: e[0],  # distinct instants: "latest" then has one answer
)
queries = st.fixed_dictionaries(
    {
        "tz": st.sampled_from(ZONES),
        "granularity": st.sampled_from(list(Granularity)),
        # Whole hours or not, at a ragged millisecond or not: every piece of the plan.
        "start": st.integers(-12, 24).map(lambda h: h * HOUR_MS) | st.integers(0, DAY_MS),
        "length": st.integers(1, 72).map(lambda h: h * HOUR_MS) | st.integers(1, 3 * DAY_MS),
        "aggregation": st.sampled_from(list(Aggregation)),
        "group_by": st.sampled_from([(), ("agent",), ("key",), ("subaccount",)]),
        "filters": st.sampled_from([(), (), (("agent", "x"),)]),
        "tags": st.sampled_from([frozenset(), frozenset(), frozenset({"t1"})]),
        "billable": st.sampled_from([None, None, True]),
    }
)
_runs = itertools.count()


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=events_strategy, asked=st.lists(queries, min_size=1, max_size=3))
def test_answers_equal_sqlites_in_any_zone(
    sqlite_and_chstore: tuple[SQLiteStore, ClickHouseStore],
    raw: list[tuple[Any, ...]],
    asked: list[dict[str, Any]],
) -> None:
    run = next(_runs)  # each example in accounts of its own: the stores are shared
    a, b, key = f"a{run}", f"b{run}", f"ka{run}"
    meters = MeterRegistry({"m": Meter("m", Aggregation.UNIQUE_COUNT, "session_id")})
    results = []
    for store in sqlite_and_chstore:
        store.create_account(Account(a, "A"))
        store.create_account(Account(b, "B", a))
        issue_key(store, a, key_id=key, scopes=[Scope.READ])
        events = [
            Event(
                id=f"e{n}",
                account_id=a if account == "a" else b,
                metric="m",
                ts_ms=BASE_MS + offset,
                value=float(value),
                billable=billable,
                key_id=key if key_name else None,
                dimensions={"session_id": session, **({"agent": agent} if agent else {})},
                tags=tags,
            )
            for n, (offset, account, value, agent, session, tags, billable, key_name) in (
                enumerate(raw)
            )
        ]
        # Two batches, so rollup rows of one slot come from two inserts.
        store.append(events[: len(events) // 2])
        store.append(events[len(events) // 2 :])
        results.append(answers_to(Engine(store, meters), (a, b), BASE, asked))
    assert results[0] == results[1]


@pytest.mark.parametrize("aggregation", [Aggregation.COUNT, Aggregation.LATEST, Aggregation.SUM])
def test_pieces_found_by_comparison_or_by_join_give_the_same_answers(
    chstore: ClickHouseStore, monkeypatch: pytest.MonkeyPatch, aggregation: Aggregation
) -> None:
    """A row finds its piece by arithmetic when the pieces are of one width in a row
    (chplan._regular), else by a multiIf when there are few pieces and by an ASOF JOIN
    when there are many (chplan.FEW_PIECES): every way gives every question the same answer."""
    chstore.create_account(Account("a", "A"))
    chstore.append(
        [
            Event(
                id=f"e{i}",
                account_id="a",
                metric="m",
                ts_ms=BASE_MS + i * 7 * 60_000 + i,  # every 7 minutes and a few ms
                value=float(i % 13),
                dimensions={"agent": "x" if i % 3 else "y"},
            )
            for i in range(2_000)
        ]
    )
    engine = Engine(chstore)
    asked = [
        (Granularity.HOUR, "America/New_York", ()),
        (Granularity.DAY, "Asia/Kathmandu", ("agent",)),
        (Granularity.TOTAL, "UTC", ()),
    ]
    for granularity, tz, group_by in asked:
        query = Query(
            accounts=("a",),
            metric="m",
            start=BASE + timedelta(milliseconds=1234),  # ragged ends: raw pieces too
            end=BASE + timedelta(days=9, milliseconds=-77),
            granularity=granularity,
            tz=tz,
            aggregations=(aggregation,),
            group_by=group_by,
        )
        answers = []
        # By arithmetic where the pieces are regular; else always joined; never joined.
        for few, by_unit in ((0, True), (0, False), (1_000_000, False)):
            monkeypatch.setattr("usagemeter.store.chplan.FEW_PIECES", few)
            regular = chplan_regular if by_unit else lambda pieces: None
            monkeypatch.setattr("usagemeter.store.chplan._regular", regular)
            chstore._plans.clear()  # planned again, not the statements kept for these windows
            result = engine.run(query)
            answers.append((result.buckets, result.totals, result.total))
        assert answers[0] == answers[1] == answers[2]
        assert answers[0][2][0]  # something was counted


def test_accounts_and_keys_seen_before_do_not_let_an_unknown_one_through(
    chstore: ClickHouseStore,
) -> None:
    """The store remembers accounts and keys it found for a while: a batch that names them
    beside an unknown one is still refused whole."""
    chstore.create_account(Account("a", "A"))
    issue_key(chstore, "a", key_id="ka", scopes=[Scope.INGEST])
    assert chstore.append([_event(1, key_id="ka")]).accepted == 1  # both now remembered
    for _ in range(2):  # and refused again: what was not found is not remembered
        with pytest.raises(NotFound, match="'nobody'"):
            chstore.append([_event(2, key_id="ka"), _event(3, account="nobody")])
        with pytest.raises(NotFound, match="'kz'"):
            chstore.append([_event(4, key_id="ka"), _event(5, key_id="kz")])
    assert chstore.count_events() == 1
    chstore.create_account(Account("nobody", "Now someone"))
    assert chstore.append([_event(3, account="nobody")]).accepted == 1


def test_a_deleted_account_takes_no_more_events_in_any_process(
    chstore: ClickHouseStore, clickhouse_home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The account deleted here is forgotten here at once, and by another process on the
    same database once what it remembers has expired."""
    other = open_store(clickhouse_home)
    assert isinstance(other, ClickHouseStore)
    try:
        chstore.create_account(Account("gone", "Gone"))
        assert chstore.append([_event(1, account="gone")]).accepted == 1
        assert other.append([_event(2, account="gone")]).accepted == 1  # both remember it
        chstore.delete_account("gone")
        with pytest.raises(NotFound, match="'gone'"):
            chstore.append([_event(3, account="gone")])
        monkeypatch.setattr(rows, "ROW_IDS_KEPT_FOR", 0.0)
        with pytest.raises(NotFound, match="'gone'"):
            other.append([_event(4, account="gone")])
        assert chstore.count_events() == 0
    finally:
        other.close()


def test_answers_read_by_columns_equal_sqlites_with_two_groups_and_several_measures(
    sqlite_and_chstore: tuple[SQLiteStore, ClickHouseStore],
) -> None:
    """The engine reads ClickHouse's answers by columns (ClickHouseStore.aggregate_columns),
    SQLite's by rows: two group columns (the OVERALL row's group is empty), an average (two
    measures of one statement), a distinct count beside a sum (two statements merged), a
    latest value per hour across New York's DST change."""
    meters = MeterRegistry({"m": Meter("m", Aggregation.UNIQUE_COUNT, "session_id")})
    asked = [
        (Granularity.DAY, "UTC", (Aggregation.COUNT,), ("agent", "region")),
        (Granularity.DAY, "Asia/Kathmandu", (Aggregation.UNIQUE_COUNT,), ("key", "agent")),
        (Granularity.HOUR, "UTC", (Aggregation.AVG, Aggregation.MAX), ("region",)),
        (Granularity.MONTH, "UTC", (Aggregation.UNIQUE_COUNT, Aggregation.SUM), ("agent",)),
        (Granularity.HOUR, "America/New_York", (Aggregation.LATEST,), ("agent",)),
        (Granularity.TOTAL, "UTC", (Aggregation.MIN,), ("subaccount", "region")),
    ]
    answers = []
    for store in sqlite_and_chstore:
        store.create_account(Account("cols", "A"))
        store.create_account(Account("cols-sub", "B", "cols"))
        issue_key(store, "cols", key_id="kcols", scopes=[Scope.READ])
        store.append(
            [
                Event(
                    id=f"c{i}",
                    account_id="cols" if i % 4 else "cols-sub",
                    metric="m",
                    ts_ms=BASE_MS + i * 37 * 60_000 + i,  # every 37 minutes, over DST
                    value=float(i % 11 - 3),
                    key_id="kcols" if i % 3 else None,
                    dimensions={
                        "session_id": f"s{i % 9}",
                        **({"agent": "xy"[i % 2]} if i % 5 else {}),
                        **({"region": "eu"} if i % 7 < 3 else {}),
                    },
                )
                for i in range(300)
            ]
        )
        engine = Engine(store, meters)
        found = []
        for granularity, tz, aggregations, group_by in asked:
            result = engine.run(
                Query(
                    accounts=("cols", "cols-sub"),
                    metric="m",
                    start=BASE + timedelta(minutes=7),
                    end=BASE + timedelta(days=3, minutes=-11),
                    granularity=granularity,
                    tz=tz,
                    aggregations=aggregations,
                    group_by=group_by,
                )
            )
            assert result.total[0]  # something was counted
            found.append((result.buckets, result.totals, result.total))
        answers.append(found)
    assert answers[0] == answers[1]


@settings(max_examples=200, deadline=None)
@given(
    unit=st.sampled_from([15 * 60_000, HOUR_MS, DAY_MS, 7 * 60_000]),
    first=st.integers(-48, 48),
    count=st.integers(1, 30),
    shift=st.sampled_from([0, 0, 0, 1, 15 * 60_000, 30 * 60_000]),
    odd=st.integers(0, 40),
)
def test_windows_of_one_unit_are_cut_as_split_windows_cuts_them(
    unit: int, first: int, count: int, shift: int, odd: int
) -> None:
    """chplan._split takes a short road when every window is one aligned unit of a grain;
    its pieces are split_windows' (and it takes the long road otherwise: a window shifted
    off the unit, or one of another width)."""
    windows = [
        Window(n, (first + n) * unit + shift, (first + n + 1) * unit + shift) for n in range(count)
    ]
    if odd < count:  # one window of another width
        w = windows[odd]
        windows[odd] = Window(w.index, w.start_ms, w.end_ms + 15 * 60_000)
        windows = windows[: odd + 1]
    for grains in (ACCOUNT_GRAINS, KEY_GRAINS, (HOUR_SETS_GRAIN, SLOTS), (SLOTS,)):
        assert chplan_split(windows, grains) == split_windows(windows, grains)
