"""A ClickHouse database that folds its rollups after the acknowledgement (``?fold=later``,
chfold.py): each unit (one INSERT of events) is folded into each rollup exactly once, by
whichever process, however often a fold is retried or cut short; an acknowledged event is in
the next answer of any process; a process gone before folding loses nothing; the mode is the
database's, read back by every process that opens it."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import LATER_DATABASE, open_clickhouse_later
from tests.questions import answers_to
from tests.test_store_clickhouse import BASE, BASE_MS, queries
from usagemeter.auth import issue_key
from usagemeter.corrections import VoidSelector
from usagemeter.engine import Engine
from usagemeter.meters import Meter, MeterRegistry
from usagemeter.model import Account, Aggregation, Event, Scope
from usagemeter.store import open_store
from usagemeter.store.base import AggregateSpec, Measure, Window
from usagemeter.store.chfold import Folder, Unit
from usagemeter.store.chschema import FOLD_DONE, FOLD_FEED, FOLD_UNITS, FOLDED_TABLES
from usagemeter.store.chtransport import ChdbTransport
from usagemeter.store.clickhouse import ClickHouseStore
from usagemeter.store.sqlite import SQLiteStore

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
METERS = MeterRegistry({"m": Meter("m", Aggregation.UNIQUE_COUNT, "session_id")})
_runs = itertools.count()


def _later(home: str, empty: bool = False) -> ClickHouseStore:
    """A handle on the fold-later database whose fold thread is stopped: it folds only when
    told to, or at a question's barrier."""
    store = open_clickhouse_later(home, empty=empty)
    assert isinstance(store, ClickHouseStore) and store.folder is not None
    store.folder.close()
    return store


@pytest.fixture
def two_writers(clickhouse_home: str) -> Iterator[tuple[ClickHouseStore, ClickHouseStore]]:
    """Two handles on one fold-later database, as two processes would be."""
    first = _later(clickhouse_home, empty=True)
    second = _later(clickhouse_home)
    yield first, second
    second.close()
    first.close()


def _folder(store: ClickHouseStore) -> Folder:
    assert store.folder is not None
    return store.folder


def fold_cut_short(store: ClickHouseStore, unit: Unit, tables: tuple[str, ...]) -> None:
    """A unit's fold that a crash cut short with ``tables`` written and the other rollups
    not (one statement feeds them all, side by side): the others' views on the feed are
    detached while the unit is folded, unmarked, by the statement a whole fold runs."""
    others = [t for t in FOLDED_TABLES if t not in tables]
    for table in others:
        store.transport.command(f"DETACH TABLE {table}_fold_mv")
    try:
        _folder(store).fold_unit(unit, mark=False)
    finally:
        for table in others:
            store.transport.command(f"ATTACH TABLE {table}_fold_mv")


def _count(store: ClickHouseStore, table: str) -> int:
    return int(store.transport.query(f"SELECT count() FROM {table}")[0][0])


def _events(account: str, count: int, start: int = 0) -> list[Event]:
    return [
        Event(
            id=f"e{i}",
            account_id=account,
            metric="m",
            ts_ms=BASE_MS + i * 7 * 60_000,
            value=float(i % 11),
            dimensions={"session_id": f"s{i % 5}"},
        )
        for i in range(start, start + count)
    ]


def _every_table(store: Any, accounts: tuple[str, ...]) -> list[Any]:
    """Counts and sums (what a second fold of a unit would double) by day, by UTC hour with
    the agent's groups and a tag (the hour table of sets), by ragged quarter hours (the
    slots), by hour alone (the hour values), and distinct sessions (the distinct values)."""
    days = tuple(Window(d, BASE_MS + d * DAY_MS, BASE_MS + (d + 1) * DAY_MS) for d in range(4))
    hours = tuple(Window(h, BASE_MS + h * HOUR_MS, BASE_MS + (h + 1) * HOUR_MS) for h in range(80))
    quarters = tuple(
        Window(q, BASE_MS + q * 900_000, BASE_MS + (q + 1) * 900_000) for q in range(0, 300, 3)
    )
    counted = (Measure("count"), Measure("sum"))
    asked = [
        AggregateSpec(accounts, "m", days, (*counted, Measure("unique_count", "session_id"))),
        AggregateSpec(accounts, "m", hours, counted, group_by=("agent",)),
        AggregateSpec(accounts, "m", hours, counted, tags=frozenset({"t1"})),
        AggregateSpec(accounts, "m", hours, (*counted, Measure("latest"))),
        AggregateSpec(accounts, "m", quarters, counted, group_by=("session_id",)),
    ]
    return [
        sorted(((r.window, r.group, r.values) for r in store.aggregate(spec)), key=repr)
        for spec in asked
    ]


def _totals(store: Any, account: str) -> list[Any]:
    """Count, sum, maximum, latest and distinct sessions per day, over four days."""
    spec = AggregateSpec(
        (account,),
        "m",
        tuple(Window(d, BASE_MS + d * DAY_MS, BASE_MS + (d + 1) * DAY_MS) for d in range(4)),
        (
            Measure("count"),
            Measure("sum"),
            Measure("max"),
            Measure("latest"),
            Measure("unique_count", "session_id"),
        ),
    )
    return [(r.window, r.values) for r in sorted(store.aggregate(spec), key=lambda r: r.window)]


# ---------------------------------------------------------------- the mode


def test_the_mode_is_the_databases_and_the_rollups_have_no_view(
    two_writers: tuple[ClickHouseStore, ClickHouseStore], clickhouse_home: str
) -> None:
    first, _ = two_writers
    views = {
        str(table): set(dependents)
        for table, dependents in first.transport.query(
            "SELECT name, dependencies_table FROM system.tables"
            " WHERE database = currentDatabase() AND notEmpty(dependencies_table)"
        )
    }
    # The events' INSERT feeds the ids and the units' log alone; the rollups' views are on
    # the feed, which a fold alone inserts into.
    assert views == {
        "events": {"event_ids_mv", f"{FOLD_UNITS}_mv"},
        FOLD_FEED: {f"{table}_fold_mv" for table in FOLDED_TABLES},
    }
    # A handle opened without the option on this database folds later too.
    home = clickhouse_home.split("://", 1)[1][1:]
    plain = ClickHouseStore(ChdbTransport(home, LATER_DATABASE), str(Path(home) / "side-x.sqlite"))
    assert plain.fold_later and plain.folder is not None
    plain.close()


def test_a_view_database_stays_one_whatever_the_url_says(
    chstore: ClickHouseStore, clickhouse_home: str
) -> None:
    store = open_store(clickhouse_home + "?fold=later")
    assert isinstance(store, ClickHouseStore)
    assert not store.fold_later and store.folder is None
    store.close()


# ---------------------------------------------------------------- exactly once


def test_a_units_fold_is_one_part_per_table_and_a_second_fold_is_dropped(
    two_writers: tuple[ClickHouseStore, ClickHouseStore],
) -> None:
    first, _ = two_writers
    first.create_account(Account("a", "A"))
    # More rows than one block of the SELECT (65,536), over months: one part per table.
    assert first.append(_events("a", 70_000)).accepted == 70_000
    (unit,) = _folder(first).waiting()

    def parts() -> dict[str, int]:
        rows = first.transport.query(
            "SELECT table, count() FROM system.parts WHERE database = currentDatabase()"
            " AND active GROUP BY table"
        )
        return {str(t): int(n) for t, n in rows}

    before = parts()
    _folder(first).fold_unit(unit)
    after = parts()
    assert all(after.get(t, 0) - before.get(t, 0) == 1 for t in FOLDED_TABLES), after
    once = _totals(first, "a")
    _folder(first).fold_unit(unit)  # again, as a process that crashed before marking would
    assert parts() == after
    assert _totals(first, "a") == once
    assert once[0][1][0] == 24 * 60 // 7 + 1  # the first day's events, counted once
    assert _count(first, FOLD_DONE) == _count(first, FOLD_UNITS) == 1


def test_another_handle_answers_with_an_event_acknowledged_and_not_folded(
    two_writers: tuple[ClickHouseStore, ClickHouseStore],
) -> None:
    """Read-your-writes across processes: the second handle folds what the first wrote."""
    first, second = two_writers
    first.create_account(Account("a", "A"))
    for n in range(3):
        first.append(_events("a", 10, start=10 * n))
        assert _folder(first).waiting()  # nothing folded it yet
        assert _totals(second, "a")[0][1][0] == 10 * (n + 1)
        assert not _folder(first).waiting()


def test_a_void_and_retention_fold_what_waits_first(
    two_writers: tuple[ClickHouseStore, ClickHouseStore], tmp_path: Path
) -> None:
    first, _ = two_writers
    sqlite = SQLiteStore(tmp_path / "same.db")
    for store in (first, sqlite):
        store.create_account(Account("a", "A"))
        store.append(_events("a", 400))
        store.void_events(VoidSelector("a", ids=("e3", "e4")), "wrong", None, BASE_MS)
        store.append(_events("a", 50, start=400))
        store.retain(BASE_MS + DAY_MS)
        store.append(_events("a", 50, start=450))
    assert _totals(first, "a") == _totals(sqlite, "a")
    sqlite.close()


# ---------------------------------------------------------------- any order of folds

batches_strategy = st.lists(
    st.tuples(
        st.integers(0, 3 * DAY_MS),  # ms after BASE
        st.integers(0, 14),  # id: repeated ids are retries or conflicts
        st.integers(-5, 50),  # value
        st.sampled_from([None, "x", "y"]),  # agent
        st.sampled_from(["s1", "s2", "s3"]),  # session
        st.frozensets(st.sampled_from(["t1", "t2"])),
        st.booleans(),  # billable
    ),
    min_size=1,
    max_size=40,
    unique_by=lambda e: e[0],  # distinct instants: "latest" then has one answer
)
steps_strategy = st.lists(
    st.tuples(
        st.booleans(),  # which handle writes the batch
        st.integers(1, 12),  # the batch's size
        st.sampled_from(["none", "fold", "twice", "partly", "ask"]),
        st.integers(1, len(FOLDED_TABLES) - 1),  # tables a cut-short fold does
    ),
    min_size=1,
    max_size=6,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=batches_strategy, steps=steps_strategy, asked=st.lists(queries, min_size=1, max_size=3))
def test_answers_equal_sqlites_whatever_folds_when_and_how_often(
    two_writers: tuple[ClickHouseStore, ClickHouseStore],
    tmp_path_factory: pytest.TempPathFactory,
    raw: list[tuple[Any, ...]],
    steps: list[tuple[bool, int, str, int]],
    asked: list[dict[str, Any]],
) -> None:
    """Batches from two writers (repeated ids among them), folded at random points: a unit
    folded twice, a fold cut short between tables (a crash) and done again later, others
    left to the next question's barrier. Every answer equals SQLite's of the same batches."""
    run = next(_runs)  # each example in accounts of its own: the database is shared
    a, b, key = f"a{run}", f"b{run}", f"ka{run}"
    sqlite = SQLiteStore(tmp_path_factory.mktemp("fold") / "s.db")
    for store in (two_writers[0], sqlite):  # the writers share one database
        store.create_account(Account(a, "A"))
        store.create_account(Account(b, "B", a))
        issue_key(store, a, key_id=key, scopes=[Scope.READ])
    events = [
        Event(
            id=f"e{n}",
            account_id=a if offset % 3 else b,
            metric="m",
            ts_ms=BASE_MS + offset,
            value=float(value),
            billable=billable,
            key_id=key if offset % 2 else None,
            dimensions={"session_id": session, **({"agent": agent} if agent else {})},
            tags=tags,
        )
        for offset, n, value, agent, session, tags, billable in raw
    ]
    sent = 0
    for writer, size, fold, tables in steps:
        batch, sent = events[sent : sent + size], sent + size
        if not batch:
            break
        store = two_writers[int(writer)]
        assert store.append(batch) == sqlite.append(batch)
        folder = _folder(two_writers[1 - int(writer)])  # the other process folds
        waiting = folder.waiting()
        if fold == "fold" and waiting:
            folder.fold_unit(waiting[-1])
        elif fold == "twice" and waiting:
            folder.fold_unit(waiting[0])
            _folder(store).fold_unit(waiting[0])
        elif fold == "partly" and waiting:
            fold_cut_short(two_writers[1 - int(writer)], waiting[-1], FOLDED_TABLES[:tables])
        elif fold == "ask":
            reference = answers_to(Engine(sqlite, METERS), (a, b), BASE, asked)
            assert answers_to(Engine(store, METERS), (a, b), BASE, asked) == reference
            assert _every_table(store, (a, b)) == _every_table(sqlite, (a, b))
    reference = answers_to(Engine(sqlite, METERS), (a, b), BASE, asked)
    for store in two_writers:
        assert answers_to(Engine(store, METERS), (a, b), BASE, asked) == reference
        assert _every_table(store, (a, b)) == _every_table(sqlite, (a, b))
    assert not _folder(two_writers[0]).waiting()
    sqlite.close()


# ---------------------------------------------------------------- a process gone

_WRITER = """
import os, sys
from usagemeter.model import Account, Event
from usagemeter.store import open_store
store = open_store(sys.argv[1] + "?fold=later")
store.folder.close()  # gone before folding: nothing of the rollups is written
store.create_account(Account("a", "A"))
events = [Event(id=f"e{i}", account_id="a", metric="m", ts_ms=%d + i * 420_000,
                value=float(i %% 11), dimensions={"session_id": f"s{i %% 5}"})
          for i in range(%d)]
assert store.append(events[:600]).accepted == 600
assert store.append(events[600:]).accepted == len(events) - 600
if sys.argv[2] == "cut":  # the second unit's fold cut short, two rollups of four written
    from tests.test_store_clickhouse_fold import fold_cut_short
    fold_cut_short(store, store.folder.waiting()[-1], ("rollup", "rollup_hour_sets"))
os._exit(0)  # no close, no fold: as if killed
"""

_READER = """
import json, sys
from tests.test_store_clickhouse_fold import _events, _totals
from usagemeter.store import open_store
store = open_store(sys.argv[1])
first = _totals(store, "a")
retried = store.append(_events("a", 700))
print(json.dumps([first, _totals(store, "a"), [retried.accepted, retried.duplicates],
                  store.fold_later]))
store.close()
"""


@pytest.mark.parametrize("how", ["unfolded", "cut"])
def test_events_acknowledged_by_a_process_gone_before_folding_are_counted_once(
    tmp_path: Path, how: str
) -> None:
    url = f"chdb:///{tmp_path / 'chdb'}"
    writer = textwrap.dedent(_WRITER % (BASE_MS, 700))
    root = Path(__file__).parents[1]
    subprocess.run([sys.executable, "-c", writer, url, how], check=True, timeout=120, cwd=root)
    read = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_READER), url],
        check=True,
        cwd=root,
        timeout=120,
        capture_output=True,
        text=True,
    )
    first, again, retried, fold_later = json.loads(read.stdout.strip().splitlines()[-1])
    sqlite = SQLiteStore(tmp_path / "same.db")
    sqlite.create_account(Account("a", "A"))
    sqlite.append(_events("a", 700))
    expected = json.loads(json.dumps(_totals(sqlite, "a")))
    sqlite.close()
    assert fold_later
    assert first == again == expected
    assert retried == [0, 700]
