"""The ClickHouse store's write path: events travel as columns (JSONColumns), so any text is
stored as sent and a retry of it is a duplicate, not a conflict; a database whose tables
of sets were created partitioned by month (before round 6), or its events table (before
round 10), takes batches, retention and questions as before; and
batches that queue together are written by one group commit, each answered and stored (or
failed) as if it had been written alone; the latest value keyed by one number (a database
made since round 15) or by the tuple (ts, seq) (one made before) answers as on SQLite."""

from __future__ import annotations

import hashlib
import itertools
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_store_clickhouse_hours import _transport
from usagemeter.corrections import VoidSelector
from usagemeter.model import Account, AppendResult, Event
from usagemeter.store import open_store, rows
from usagemeter.store.base import AggregateSpec, Measure, NotFound, Store, Window
from usagemeter.store.chappend import Group, Prepared, digest, group_columns, sort_out, token
from usagemeter.store.chschema import (
    EVENTS,
    HOUR_SETS,
    LATEST_KEY,
    SLOTS,
    STATEMENTS,
    TUPLE_TABLES_OF_SETS,
)
from usagemeter.store.chtransport import Transport
from usagemeter.store.chupgrade import make_sets_views_before_round_12
from usagemeter.store.clickhouse import ClickHouseStore
from usagemeter.store.sqlite import SQLiteStore

BASE_MS = 1_741_392_000_000  # 2025-03-08T00:00:00Z
DAY_MS = 86_400_000
_accounts = itertools.count()

# Any text a client may send: quotes, backslashes, newlines, tabs, NUL, any plane.
text = st.text(min_size=1, max_size=12)
event_fields = st.fixed_dictionaries(
    {
        "id": text,
        "metric": text,
        "ts_ms": st.integers(BASE_MS - 400 * DAY_MS, BASE_MS + 400 * DAY_MS),
        "value": st.floats(allow_nan=False, allow_infinity=False, width=64),
        "billable": st.booleans(),
        "dimensions": st.dictionaries(text, st.text(max_size=12), max_size=3),
        "tags": st.frozensets(text, max_size=3),
    }
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(fields=st.lists(event_fields, min_size=1, max_size=30, unique_by=lambda f: f["id"]))
def test_any_text_is_stored_as_sent_and_a_retry_is_a_duplicate(
    chstore: ClickHouseStore, fields: list[dict[str, object]]
) -> None:
    account = f"acct-{next(_accounts)}"
    chstore.create_account(Account(account, account))
    sent = [Event(account_id=account, **f) for f in fields]  # type: ignore[arg-type]
    assert chstore.append(sent).accepted == len(sent)
    stored = list(chstore.iter_events([account]))
    assert sorted(stored, key=lambda e: e.id) == sorted(sent, key=lambda e: e.id)
    retry = chstore.append(sent)
    assert (retry.accepted, retry.duplicates, retry.conflicts) == (0, len(sent), ())
    cells = chstore.transport.query(
        f"SELECT sum(cnt) FROM rollup WHERE account = '{account}'"
        f" UNION ALL SELECT sum(cnt) FROM {HOUR_SETS} WHERE account = '{account}'"
    )
    assert [int(row[0]) for row in cells] == [len(sent), len(sent)]


def _partitioned(ddl: str, unit_ms: int) -> str:
    """A table of sets as created before round 6: a partition per UTC month."""
    month = f"toYYYYMM(toDateTime(intDiv(slot * {unit_ms}, 1000), 'UTC'))"
    return ddl.replace("ORDER BY", f"PARTITION BY {month}\nORDER BY", 1)


def test_tables_of_sets_partitioned_by_month_take_batches_as_before(
    clickhouse_home: str, tmp_path: Path
) -> None:
    database = f"partitioned_{time.time_ns()}"
    transport = _transport(clickhouse_home, database)
    for ddl, unit in ((SLOTS, 900_000), (SLOTS.replace("rollup", HOUR_SETS, 1), 3_600_000)):
        transport.command(_partitioned(ddl, unit))
    side = str(tmp_path / "side.sqlite")
    store = ClickHouseStore(transport, side)
    try:
        assert store.hour_sets.boundary == 0  # no events table yet: its view counts all
        store.create_account(Account("a", "A"))
        events = [
            Event(id=f"e{i}", account_id="a", metric="m", ts_ms=BASE_MS + i * 9 * DAY_MS)
            for i in range(12)  # over four months
        ]
        assert store.append(events).accepted == 12
        assert store.append(events).duplicates == 12
        found = transport.query(
            "SELECT table, partition_key FROM system.tables WHERE database = currentDatabase()"
            f" AND name IN ('rollup', '{HOUR_SETS}') ORDER BY table"
        )
        assert all(row[1] for row in found), found  # still partitioned, as created
        parts = transport.query(
            "SELECT count(DISTINCT partition) FROM system.parts"
            " WHERE database = currentDatabase() AND table = 'rollup' AND active"
        )
        assert int(parts[0][0]) >= 4
        cells = transport.query(
            f"SELECT sum(cnt) FROM rollup UNION ALL SELECT sum(cnt) FROM {HOUR_SETS}"
        )
        assert [int(row[0]) for row in cells] == [12, 12]
    finally:
        transport.command(f"DROP DATABASE {database}")
        store.close()


def test_a_fresh_database_writes_one_part_per_table_for_a_batch_over_months(
    clickhouse_home: str, tmp_path: Path
) -> None:
    """A batch over several months writes one part to the events table (a UTC year per
    partition) and to each table of sets, not one a month; a batch across New Year two into
    the events table. A database of its own: the shared one's tables are emptied between
    tests, but not its background merges."""
    database = f"fresh_{time.time_ns()}"
    chstore = ClickHouseStore(_transport(clickhouse_home, database), str(tmp_path / "side.sqlite"))
    try:
        _one_part_per_table(chstore)
    finally:
        chstore.transport.command(f"DROP DATABASE {database}")
        chstore.close()


def _one_part_per_table(chstore: ClickHouseStore) -> None:
    chstore.create_account(Account("a", "A"))
    events = [
        Event(id=f"e{i}", account_id="a", metric="m", ts_ms=BASE_MS + i * 9 * DAY_MS)
        for i in range(12)
    ]
    chstore.append(events)
    watched = f"('events', 'rollup', '{HOUR_SETS}')"
    parts = f"""SELECT table, count() FROM system.parts WHERE database = currentDatabase()
        AND active AND table IN {watched} GROUP BY table ORDER BY table"""
    found = chstore.transport.query(parts)
    assert [(row[0], int(row[1])) for row in found] == [
        ("events", 1),
        ("rollup", 1),
        (HOUR_SETS, 1),
    ]
    for table in ("events", "rollup", HOUR_SETS):  # the next batch's parts stay apart
        chstore.transport.command(f"SYSTEM STOP MERGES {table}")
    try:
        new_year = 1_767_225_600_000  # 2026-01-01T00:00:00Z
        across = [
            Event(id=f"y{i}", account_id="a", metric="m", ts_ms=new_year + (i - 2) * DAY_MS)
            for i in range(4)
        ]
        chstore.append(across)
        found = chstore.transport.query(parts)
        assert [(row[0], int(row[1])) for row in found] == [
            ("events", 3),
            ("rollup", 2),
            (HOUR_SETS, 2),
        ]
    finally:
        for table in ("events", "rollup", HOUR_SETS):
            chstore.transport.command(f"SYSTEM START MERGES {table}")


# The events table as databases before round 10 created it: a partition per UTC month.
_MONTHLY_EVENTS = EVENTS.replace("PARTITION BY toYear(", "PARTITION BY toYYYYMM(", 1)
_EXACT = (Measure("count"), Measure("sum"), Measure("min"), Measure("max"), Measure("latest"))
_monthly_accounts = itertools.count()


@pytest.fixture
def monthly(clickhouse_home: str, tmp_path: Path) -> Iterator[ClickHouseStore]:
    """A store on a database whose events table is partitioned by month (before round 10)."""
    assert _MONTHLY_EVENTS != EVENTS
    yield from _store_on_tables(clickhouse_home, tmp_path, "monthly", (_MONTHLY_EVENTS,))


def _store_on_tables(
    clickhouse_home: str, tmp_path: Path, name: str, statements: Iterable[str]
) -> Iterator[ClickHouseStore]:
    """A store opened on a database of its own where ``statements`` made some tables first,
    as an older version made them; the database dropped after."""
    database = f"{name}_{time.time_ns()}"
    transport = _transport(clickhouse_home, database)
    for statement in statements:
        transport.command(statement)
    store = ClickHouseStore(transport, str(tmp_path / f"{name}-side.sqlite"))
    try:
        yield store
    finally:
        transport.command(f"DROP DATABASE {database}")
        store.close()


def _answers(store: ClickHouseStore, account: str, first: int, last: int) -> list[Any]:
    """Every exact measure, and a distinct count, per UTC day and over ragged ends, from
    ``first`` to ``last`` (ms)."""
    lo = first - first % DAY_MS
    days = tuple(Window(i, lo + i * DAY_MS, lo + (i + 1) * DAY_MS) for i in range(400))
    ragged = (Window(0, first + 1, last), Window(1, lo + 7 * 60_000, last + 1))
    out = []
    for windows in (days[: (last - lo) // DAY_MS + 1], ragged):
        for measures in (_EXACT, (Measure("unique_count", "s"),)):
            rows = store.aggregate(AggregateSpec((account,), "m", windows, measures))
            out.append(sorted((r.window, r.group, r.values) for r in rows))
    return out


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    spans=st.lists(
        st.lists(st.integers(0, 700 * DAY_MS), min_size=1, max_size=12), min_size=1, max_size=3
    ),
    values=st.lists(st.integers(-5, 5), min_size=36, max_size=36),
)
def test_an_events_table_partitioned_by_month_answers_as_one_by_year(
    chstore: ClickHouseStore, monthly: ClickHouseStore, spans: list[list[int]], values: list[int]
) -> None:
    """Batches over any months and years, with repeated ids: both layouts store the same
    events and answer every question alike, whatever parts each wrote."""
    account = f"m{next(_monthly_accounts)}"
    first = BASE_MS - 300 * DAY_MS
    sent = [
        [
            Event(
                id=f"e{offset % 7}-{b}" if b else f"e{offset % 7}",
                account_id=account,
                metric="m",
                ts_ms=first + offset,
                value=float(values[(b * 12 + i) % len(values)]),
                dimensions={"s": str(offset % 5)},
            )
            for i, offset in enumerate(batch)
        ]
        for b, batch in enumerate(spans)
    ]
    results = []
    for store in (chstore, monthly):
        store.create_account(Account(account, account))
        results.append([store.append(batch) for batch in sent])
    assert results[0] == results[1]
    assert chstore.count_events() == monthly.count_events()
    stamps = [e.ts_ms for batch in sent for e in batch]
    answers = [_answers(s, account, min(stamps), max(stamps)) for s in (chstore, monthly)]
    assert answers[0] == answers[1]


def test_retention_and_compaction_on_an_events_table_partitioned_by_month(
    chstore: ClickHouseStore, monthly: ClickHouseStore
) -> None:
    """Retention deletes the same rows from either layout, and compaction merges them away
    and leaves the same answers."""
    events = [
        Event(
            id=f"e{i}",
            account_id="a",
            metric="m",
            ts_ms=BASE_MS + i * 5 * DAY_MS + i,
            value=float(i),
            dimensions={"s": str(i % 3)},
        )
        for i in range(40)  # over about seven months
    ]
    horizon = BASE_MS + 61 * DAY_MS
    for store in (chstore, monthly):
        store.create_account(Account("a", "A"))
        assert store.append(events).accepted == 40
        assert store.retain(horizon) == 13
        store.compact()
        assert store.count_events() == 27
    kept = [e.ts_ms for e in events if e.ts_ms >= horizon]
    assert _answers(chstore, "a", min(kept), max(kept)) == _answers(
        monthly, "a", min(kept), max(kept)
    )
    for store in (chstore, monthly):  # the deleted rows merged away, in either layout
        held = store.transport.query(
            "SELECT count(DISTINCT partition), sum(rows) FROM system.parts"
            " WHERE database = currentDatabase() AND table = 'events' AND active AND rows > 0"
        )
        assert [int(v) for v in held[0]] == [1 if store is chstore else 5, 27]


def _grouped(
    store: ClickHouseStore, batches: list[list[Event]]
) -> tuple[list[AppendResult | BaseException], int]:
    """Append ``batches`` from a thread each, held until all but the first are queued behind
    the first one's INSERT: the first is written alone, the others by one group commit.
    Returns each batch's outcome (in order) and the number of INSERTs into events."""
    inserts = 0
    insert = store.transport.insert_columns

    def counted(table: str, *args: Any) -> None:
        nonlocal inserts
        inserts += table == "events"
        insert(table, *args)

    store.transport.insert_columns = counted  # type: ignore[method-assign]
    outcomes: list[AppendResult | BaseException] = [ValueError("not run")] * len(batches)

    def run(index: int) -> None:
        try:
            outcomes[index] = store.append(batches[index])
        except Exception as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(batches))]
    try:
        with store._lock:  # the first batch's writer waits here, the others queue
            threads[0].start()
            # Until the first has taken its group (itself alone) off the queue.
            while not store._group_commit._writers or store._group_commit._queue:
                time.sleep(0.001)
            # One at a time, so that they queue in order (a group answers in its order).
            for queued, thread in enumerate(threads[1:], start=1):
                thread.start()
                while len(store._group_commit._queue) < queued:
                    time.sleep(0.001)
        for thread in threads:
            thread.join()
    finally:
        store.transport.insert_columns = insert  # type: ignore[method-assign]
    return outcomes, inserts


def test_batches_that_queue_together_are_one_insert_and_answer_each_for_itself(
    chstore: ClickHouseStore,
) -> None:
    chstore.create_account(Account("a", "A"))
    first = [Event(id=f"e{i}", account_id="a", metric="m", ts_ms=BASE_MS + i) for i in range(5)]
    second = [Event(id=f"e{i}", account_id="a", metric="m", ts_ms=BASE_MS + i) for i in (3, 5, 6)]
    # A repeat of the second's e6 (the same group), and e5 with another payload: a conflict.
    third = [
        Event(id="e6", account_id="a", metric="m", ts_ms=BASE_MS + 6),
        Event(id="e5", account_id="a", metric="m", ts_ms=BASE_MS + 5, value=2.0),
        Event(id="e7", account_id="a", metric="m", ts_ms=BASE_MS + 7),
    ]
    outcomes, inserts = _grouped(chstore, [first, second, third])
    assert outcomes == [AppendResult(5, 0), AppendResult(2, 1), AppendResult(1, 2, (1,))]
    assert inserts == 2  # the first alone, then the other two together
    assert chstore.count_events() == 8
    cells = chstore.transport.query(
        f"SELECT sum(cnt) FROM rollup UNION ALL SELECT sum(cnt) FROM {HOUR_SETS}"
    )
    assert [int(row[0]) for row in cells] == [8, 8]


def test_a_group_whose_insert_fails_fails_every_batch_of_it_whole(
    chstore: ClickHouseStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    chstore.create_account(Account("a", "A"))
    batches = [
        [Event(id=f"e{b}-{i}", account_id="a", metric="m", ts_ms=BASE_MS + i) for i in range(3)]
        for b in range(3)
    ]
    real = chstore.transport.insert_columns
    calls = 0

    def second_fails(table: str, *args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise ConnectionError("ClickHouse went away")
        real(table, *args)

    monkeypatch.setattr(chstore.transport, "insert_columns", second_fails)
    outcomes, _ = _grouped(chstore, batches)
    assert outcomes[0] == AppendResult(3, 0)
    assert [type(o) for o in outcomes[1:]] == [ConnectionError, ConnectionError]
    assert chstore.count_events() == 3
    # Their retries are whole, and counted once.
    assert [chstore.append(b) for b in batches] == [AppendResult(0, 3)] + [AppendResult(3, 0)] * 2
    assert chstore.count_events() == 9


ids = st.sampled_from([f"e{i}" for i in range(8)])
batch_strategy = st.lists(
    st.tuples(ids, st.sampled_from(["a", "b"]), st.integers(0, 2)), min_size=1, max_size=6
)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batches=st.lists(batch_strategy, min_size=2, max_size=4))
def test_a_group_commit_answers_as_the_batches_one_by_one_on_sqlite(
    chstore: ClickHouseStore,
    tmp_path_factory: pytest.TempPathFactory,
    batches: list[list[tuple[str, str, int]]],
) -> None:
    """Whatever ids the batches of a group share, with whatever payloads, each batch's
    answer (new, repeated, conflicting by index) and what is stored are SQLite's, where the
    same batches are appended one after the other."""
    sqlite = SQLiteStore(str(tmp_path_factory.mktemp("sqlite") / "db.sqlite"))
    try:
        accounts, events = accounts_and_batches((chstore, sqlite), batches, next(_accounts))
        outcomes, _ = _grouped(chstore, events)
        assert outcomes == [sqlite.append(batch) for batch in events]
        listed = sorted(accounts.values())
        assert sorted(chstore.iter_events(listed), key=_identity) == sorted(
            sqlite.iter_events(listed), key=_identity
        )
    finally:
        sqlite.close()


def accounts_and_batches(
    stores: Sequence[Store], batches: list[list[tuple[str, str, int]]], run: int
) -> tuple[dict[str, str], list[list[Event]]]:
    """An example's accounts a and b (named for its run: the database is shared) made in
    each store, and its batches of (id, account, value) as events."""
    accounts = {name: f"{name}-{run}" for name in ("a", "b")}
    for store in stores:
        for account in accounts.values():
            store.create_account(Account(account, account))
    events = [
        [
            Event(id=i, account_id=accounts[a], metric="m", ts_ms=BASE_MS, value=float(v))
            for i, a, v in batch
        ]
        for batch in batches
    ]
    return accounts, events


def _identity(e: Event) -> tuple[str, str, float]:
    return (e.account_id, e.id, e.value)


def test_small_parts_are_packed_also_in_a_database_created_before(
    clickhouse_home: str, tmp_path: Path
) -> None:
    """An insert's parts are stored packed (one file each), in the tables of a database
    created before the setting (by the DDL alone) once a store opens it."""
    database = f"unpacked_{time.time_ns()}"
    transport = _transport(clickhouse_home, database)
    for statement in STATEMENTS:
        transport.command(statement)
    store = ClickHouseStore(transport, str(tmp_path / "side.sqlite"))
    try:
        store.create_account(Account("a", "A"))
        events = [
            Event(id=f"e{i}", account_id="a", metric="m", ts_ms=BASE_MS + i * 9 * DAY_MS)
            for i in range(12)  # over four months
        ]
        assert store.append(events).accepted == 12
        parts = transport.query(
            "SELECT table, groupUniqArray(part_storage_type) FROM system.parts"
            " WHERE database = currentDatabase() AND active GROUP BY table ORDER BY table"
        )
        assert {row[0] for row in parts} >= {"accounts", "events", "event_ids", "rollup"}
        assert all(row[1] == ["Packed"] for row in parts), parts
        assert store.append(events).duplicates == 12
        assert store.count_events() == 12
    finally:
        transport.command(f"DROP DATABASE {database}")
        store.close()


def test_an_id_stored_under_one_account_is_new_under_another_in_the_same_group(
    chstore: ClickHouseStore,
) -> None:
    """The dedupe lookup asks for a group's ids among its accounts (not for its (account, id)
    pairs): a stored id found under another account of the group is no duplicate."""
    for name in ("a", "b"):
        chstore.create_account(Account(name, name.upper()))
    assert chstore.append([Event(id="x", account_id="a", metric="m", ts_ms=BASE_MS)]).accepted
    both = [
        [Event(id="x", account_id="b", metric="m", ts_ms=BASE_MS)],
        [Event(id="y", account_id="a", metric="m", ts_ms=BASE_MS)],
    ]
    outcomes, _ = _grouped(chstore, [[Event(id="z", account_id="a", metric="m", ts_ms=1)], *both])
    assert outcomes == [AppendResult(1, 0)] * 3
    assert chstore.append(both[0] + both[1]) == AppendResult(0, 2)
    assert chstore.count_events() == 4


def test_a_batch_naming_an_account_deleted_by_another_process_fails_alone_in_its_group(
    chstore: ClickHouseStore, clickhouse_home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a process knows of accounts is looked up again by the group's writer once stale
    (not before a batch queues): the batch naming the account another process deleted
    fails, saying which, and the other batches of its group are stored."""
    other = open_store(clickhouse_home)
    try:
        for name in ("a", "b"):
            chstore.create_account(Account(name, name.upper()))
        assert chstore.append([Event(id="seen", account_id="b", metric="m", ts_ms=BASE_MS)])
        other.delete_account("b")  # this process still knows "b"
        monkeypatch.setattr(rows, "ROW_IDS_KEPT_FOR", 0.0)
        batches = [
            [Event(id=f"e{i}", account_id=name, metric="m", ts_ms=BASE_MS)]
            for i, name in enumerate("aab")
        ]
        outcomes, inserts = _grouped(chstore, batches)
        assert outcomes[:2] == [AppendResult(1, 0)] * 2
        assert isinstance(outcomes[2], NotFound) and "account 'b'" in str(outcomes[2])
        assert inserts == 2  # the first alone, then the second without the third
        assert sorted(e.id for e in chstore.iter_events(["a", "b"])) == ["e0", "e1"]
    finally:
        other.close()


# An event of one cell: its quarter hour, its two dimensions' values, the order its
# dimensions are sent in, its tags and its value.
cell_event = st.tuples(
    st.integers(0, 5),
    st.sampled_from(["x", "y"]),
    st.sampled_from(["1", "2"]),
    st.booleans(),
    st.sampled_from([(), ("prod",), ("prod", "eu")]),
    st.integers(-3, 3),
)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(sent=st.lists(cell_event, min_size=1, max_size=24), cut=st.integers(0, 24))
def test_a_dimension_set_sent_in_any_key_order_answers_as_on_sqlite(
    chstore: ClickHouseStore,
    tmp_path_factory: pytest.TempPathFactory,
    sent: list[tuple[int, str, str, bool, tuple[str, ...], int]],
    cut: int,
) -> None:
    """The tables of sets group an insert's rows by the dimensions and tags as they come
    (chschema._sets_select), so one set sent in two key orders in one insert makes two rows
    of one cell: every question, grouped or filtered by a dimension or a tag, answers as
    SQLite does for the same events, in one batch or two."""
    account = f"order-{next(_accounts)}"
    events = [
        Event(
            id=f"e{i}",
            account_id=account,
            metric="m",
            ts_ms=BASE_MS + quarter * 900_000 + i,
            value=float(value),
            dimensions={"a": a, "b": b} if a_first else {"b": b, "a": a},
            tags=frozenset(tags),
        )
        for i, (quarter, a, b, a_first, tags, value) in enumerate(sent)
    ]
    sqlite = SQLiteStore(str(tmp_path_factory.mktemp("sqlite") / "db.sqlite"))
    try:
        for store in (chstore, sqlite):
            store.create_account(Account(account, account))
            for batch in (events[:cut], events[cut:]):
                if batch:
                    store.append(batch)
        hours, quarters = _hours_and_quarters(6)
        exact = (*_EXACT, Measure("unique_count", "b"))
        asked = [
            AggregateSpec(
                (account,), "m", windows, exact, group_by=group, filters=filters, tags=tags
            )
            for windows in (hours, quarters)
            for group, filters, tags in (
                (("a",), (), frozenset()),
                (("a", "b"), (), frozenset({"prod"})),
                ((), (("b", "2"),), frozenset({"eu"})),
            )
        ]
        for spec in asked:
            answers = [
                sorted((r.window, r.group, r.values) for r in s.aggregate(spec))
                for s in (chstore, sqlite)
            ]
            assert answers[0] == answers[1], spec
    finally:
        sqlite.close()


def _views(transport: Transport) -> dict[str, str]:
    rows = transport.query(
        "SELECT name, create_table_query FROM system.tables WHERE database = currentDatabase()"
        f" AND name IN ('rollup_mv', '{HOUR_SETS}_mv')"
    )
    return {str(name): str(query) for name, query in rows}


def test_a_database_before_round_12_gets_the_grouping_views_in_place(
    clickhouse_home: str, tmp_path: Path
) -> None:
    """A database whose tables of sets' views fold by any() (before round 12) has them
    swapped in place when this version opens it, the hour sets' boundary kept; the events
    an older process and this one insert, before and after, answer as on SQLite."""
    database = f"anyviews_{time.time_ns()}"
    transport = _transport(clickhouse_home, database)
    for statement in TUPLE_TABLES_OF_SETS:  # as before round 15 too
        transport.command(statement)
    older = ClickHouseStore(transport, str(tmp_path / "a.sqlite"))
    sqlite = SQLiteStore(str(tmp_path / "db.sqlite"))
    try:
        # The hour sets' boundary 1, so that it shows whether it is kept.
        make_sets_views_before_round_12(older.transport, 1)
        assert all("any(dims)" in q for q in _views(older.transport).values())

        def sent(batch: int) -> list[Event]:
            return [
                Event(
                    id=f"e{batch}-{i}",
                    account_id="a",
                    metric="m",
                    ts_ms=BASE_MS + (i % 3) * 900_000 + i,
                    value=float(i - batch),
                    dimensions={"a": "x", "b": str(i % 2)} if i % 2 else {"b": "0", "a": "x"},
                    tags=frozenset({"prod"} if i % 3 else ()),
                )
                for i in range(12)
            ]

        for store in (older, sqlite):
            store.create_account(Account("a", "A"))
            store.append(sent(0))
        upgraded = ClickHouseStore(
            _transport(clickhouse_home, database), str(tmp_path / "b.sqlite")
        )
        try:
            assert upgraded.hour_sets.boundary == 1
            views = _views(upgraded.transport)
            assert not any("any(dims)" in q for q in views.values()), views
            assert "seq >= 1" in views[f"{HOUR_SETS}_mv"] and "WHERE" not in views["rollup_mv"]
            for store in (older, upgraded):  # both processes insert on
                batch = sent(1 if store is older else 2)
                assert store.append(batch).accepted == len(batch)
                sqlite.append(batch)
            hours = tuple(
                Window(h, BASE_MS + h * 3_600_000, BASE_MS + (h + 1) * 3_600_000) for h in (0, 1)
            )
            for group, tags in ((("a", "b"), frozenset()), (("b",), frozenset({"prod"}))):
                spec = AggregateSpec(("a",), "m", hours, _EXACT, group_by=group, tags=tags)
                answers = [
                    sorted((r.window, r.group, r.values) for r in s.aggregate(spec))
                    for s in (upgraded, sqlite)
                ]
                assert answers[0] == answers[1]
            cells = upgraded.transport.query(
                f"SELECT sum(cnt) FROM rollup UNION ALL SELECT sum(cnt) FROM {HOUR_SETS}"
            )
            assert [int(row[0]) for row in cells] == [36, 36]
        finally:
            upgraded.transport.command(f"DROP DATABASE {database}")
            upgraded.close()
    finally:
        older.close()
        sqlite.close()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    pairs=st.lists(
        st.tuples(st.integers(-(2**63), 2**63 - 1), st.integers(0, 2**64 - 1)),
        min_size=1,
        max_size=20,
    )
)
def test_the_latest_key_is_the_instant_then_the_arrival_as_one_number(
    chstore: ClickHouseStore, pairs: list[tuple[int, int]]
) -> None:
    """LATEST_KEY is (ts, seq) as a UInt128, the instant's sign bit flipped: it orders as the
    tuple does, an instant before 1970 and the widest seq included."""
    rows = "\n".join(f"[{ts},{seq}]" for ts, seq in pairs)
    found = chstore.transport.query(
        f"SELECT toString({LATEST_KEY}) FROM format(JSONCompactEachRow,"
        f" 'ts Int64, seq UInt64', '{rows}')"
    )
    keys = [int(row[0]) for row in found]
    assert keys == [(ts + 2**63) << 64 | seq for ts, seq in pairs]
    assert sorted(range(len(pairs)), key=keys.__getitem__) == sorted(
        range(len(pairs)), key=pairs.__getitem__
    )


def _hours_and_quarters(quarters: int) -> tuple[tuple[Window, ...], tuple[Window, ...]]:
    """The first two UTC hours from BASE_MS, and its first ``quarters`` quarter hours."""
    hours = tuple(Window(h, BASE_MS + h * 3_600_000, BASE_MS + (h + 1) * 3_600_000) for h in (0, 1))
    return hours, tuple(
        Window(q, BASE_MS + q * 900_000, BASE_MS + (q + 1) * 900_000) for q in range(quarters)
    )


@pytest.fixture
def tuple_keyed(clickhouse_home: str, tmp_path: Path) -> Iterator[ClickHouseStore]:
    """A store on a database whose tables of sets key the latest value by the tuple (ts, seq),
    as every database made before round 15 does."""
    yield from _store_on_tables(clickhouse_home, tmp_path, "tuplekey", TUPLE_TABLES_OF_SETS)


def test_a_database_keeps_its_latest_values_layout(
    chstore: ClickHouseStore, tuple_keyed: ClickHouseStore, clickhouse_home: str, tmp_path: Path
) -> None:
    """A new database keys the latest value by one number; one made before round 15 keeps the
    tuple when this version opens it, the hour sets it creates later included, and a second
    process reads the same layout."""
    types = "SELECT table, type FROM system.columns WHERE database = currentDatabase()"
    types += f" AND name = 'last' AND table IN ('rollup', '{HOUR_SETS}') ORDER BY table"
    keyed = "AggregateFunction(argMax, Float64, UInt128)"
    older = "AggregateFunction(argMax, Float64, Tuple(Int64, UInt64))"
    assert chstore.keyed_latest and not tuple_keyed.keyed_latest
    assert [row[1] for row in chstore.transport.query(types)] == [keyed, keyed]
    assert [row[1] for row in tuple_keyed.transport.query(types)] == [older, older]
    transport = tuple_keyed.transport
    transport.command(f"DROP VIEW {HOUR_SETS}_mv")
    transport.command(f"DROP TABLE {HOUR_SETS}")  # as a database before round 3
    again = ClickHouseStore(_transport(clickhouse_home, transport.database), str(tmp_path / "b"))
    try:
        assert not again.keyed_latest
        assert [row[1] for row in transport.query(types)] == [older, older]
    finally:
        again.close()


# An event of two hours: its quarter hour, its millisecond in it (few, so that events of one
# cell tie on the instant), its value (zeros of both signs, equal values, the extremes ingest
# takes, the smallest subnormals), its status and whether tagged. Events of two cells (sets)
# never tie here: SQLite's answer to such a tie is not always the later write (docs/
# clickhouse.md, "Ingest, round 15"); the test after this one asks it of both layouts.
latest_event = st.tuples(
    st.integers(0, 7),
    st.integers(0, 2),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, 1e15, -1e15, 5e-324, -5e-324, 0.1]),
    st.sampled_from(["200", "500"]),
    st.booleans(),
)


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(sent=st.lists(latest_event, min_size=1, max_size=24), cut=st.integers(0, 24))
def test_latest_values_answer_alike_in_both_layouts_as_on_sqlite(
    chstore: ClickHouseStore,
    tuple_keyed: ClickHouseStore,
    tmp_path_factory: pytest.TempPathFactory,
    sent: list[tuple[int, int, float, str, bool]],
    cut: int,
) -> None:
    """The latest value (beside a count), read from the tables of sets (grouped, filtered,
    tagged), from the slots and raw events (ragged windows) and from the hour values
    (plain), is SQLite's in
    a database keyed by one number and in one keyed by the tuple: tied on the millisecond
    (the later write wins), across two inserts, after the rollups are merged, and after a
    void refolds them (SQLite's answer then is that of the events left, sent afresh)."""
    account = f"latest-{next(_accounts)}"
    events = [
        Event(
            id=f"e{i}",
            account_id=account,
            metric="m",
            ts_ms=BASE_MS + quarter * 900_000 + 3 * (2 * (status == "500") + tagged) + ms,
            value=value,
            dimensions={"status": status},
            tags=frozenset({"prod"} if tagged else ()),
        )
        for i, (quarter, ms, value, status, tagged) in enumerate(sent)
    ]
    sqlite = SQLiteStore(str(tmp_path_factory.mktemp("sqlite") / "db.sqlite"))
    left = SQLiteStore(str(tmp_path_factory.mktemp("sqlite") / "left.sqlite"))
    voided = {
        e.id for e in events if e.dimensions["status"] == "500" and e.ts_ms < BASE_MS + 3_600_000
    }
    try:
        for store in (sqlite, chstore, tuple_keyed, left):
            store.create_account(Account(account, account))
            for batch in (events[:cut], events[cut:]):
                batch = [e for e in batch if store is not left or e.id not in voided]
                if batch:
                    store.append(batch)
        hours, quarters = _hours_and_quarters(8)
        ragged = (
            Window(0, BASE_MS + 1, BASE_MS + 3_600_001),
            Window(1, BASE_MS + 3_600_001, BASE_MS + 7_199_999),
        )
        asked = [
            AggregateSpec(
                (account,),
                "m",
                windows,
                (Measure("latest"), Measure("count")),
                group_by=group,
                filters=filters,
                tags=tags,
                totals=totals,
            )
            for windows in (hours, quarters, ragged)
            for group, filters, tags, totals in (
                (("status",), (), frozenset(), True),
                ((), (("status", "500"),), frozenset(), False),
                ((), (), frozenset({"prod"}), True),
                ((), (), frozenset(), True),
            )
        ]

        def answers(store: SQLiteStore | ClickHouseStore) -> list[Any]:
            return [
                sorted((r.window, r.group, r.values) for r in store.aggregate(spec))
                for spec in asked
            ]

        expected = answers(sqlite)
        assert answers(chstore) == expected and answers(tuple_keyed) == expected
        for store in (chstore, tuple_keyed):  # the parts of both inserts merged
            for table in ("rollup", HOUR_SETS, "hour_values"):
                store.transport.command(f"OPTIMIZE TABLE {table} FINAL")
        assert answers(chstore) == expected and answers(tuple_keyed) == expected
        selector = VoidSelector(
            account,
            metric="m",
            start_ms=BASE_MS,
            end_ms=BASE_MS + 3_600_000,
            dimensions=(("status", "500"),),
        )
        for store in (chstore, tuple_keyed):
            assert store.void_events(selector, "test", None, BASE_MS + DAY_MS).count == len(voided)
        expected = answers(left)
        assert answers(chstore) == expected and answers(tuple_keyed) == expected
    finally:
        sqlite.close()
        left.close()


def test_a_tie_across_dimension_sets_goes_to_the_later_write_in_both_layouts(
    chstore: ClickHouseStore, tuple_keyed: ClickHouseStore
) -> None:
    """Two events of two dimension sets at one millisecond: the latest value over both (a
    total across groups, a question without the group) is the later write's, in either
    layout, before and after the rollups are merged. (An example on which SQLite answered
    the earlier write's.)"""
    sent = [(6, 1e15, "200"), *[(0, 0.0, "200")] * 8, (2, 1.0, "500"), (6, 0.0, "500")]
    events = [
        Event(
            id=f"e{i}",
            account_id="tie",
            metric="m",
            ts_ms=BASE_MS + quarter * 900_000 + 2,
            value=value,
            dimensions={"status": status},
        )
        for i, (quarter, value, status) in enumerate(sent)
    ]
    hours = tuple(Window(h, BASE_MS + h * 3_600_000, BASE_MS + (h + 1) * 3_600_000) for h in (0, 1))
    ragged = (Window(0, BASE_MS + 1, BASE_MS + 3_600_001),)
    latest = (Measure("latest"), Measure("count"))

    def later(chosen: list[Event]) -> float:  # the rule: the greatest (ts, order sent)
        return max(enumerate(chosen), key=lambda pair: (pair[1].ts_ms, pair[0]))[1].value

    for store in (chstore, tuple_keyed):
        store.create_account(Account("tie", "tie"))
        store.append(events[:5])
        store.append(events[5:])
        for merged in (False, True):
            if merged:
                for table in ("rollup", HOUR_SETS):
                    store.transport.command(f"OPTIMIZE TABLE {table} FINAL")
            for windows in (hours, ragged):
                spec = AggregateSpec(("tie",), "m", windows, latest, ("status",), totals=True)
                rows = {(r.window, r.group): r.values for r in store.aggregate(spec)}
                inside = [e for e in events if windows[0].start_ms <= e.ts_ms < windows[-1].end_ms]
                assert rows[(-2, ())] == (later(inside), len(inside)), (store.keyed_latest, merged)
                for status in ("200", "500"):
                    of = [e for e in inside if e.dimensions["status"] == status]
                    assert rows[(-1, (("status", status),))] == (later(of), len(of))


# The batch's Python before round 17, kept as the reference: the digests and the sets' ids
# are stored (a retry of an event stored before must still be a retry, every table holds the
# sets' ids), so the faster Prepared must give exactly these columns.
def _set_id_before_round_17(items: tuple[Any, ...]) -> int:
    key = hashlib.blake2b(msgspec.json.encode(items), digest_size=8).digest()
    return int.from_bytes(key, "big")


def _columns_before_round_17(events: Sequence[Event]) -> dict[str, list[Any]]:
    dims = [tuple(sorted(e.dimensions.items())) if e.dimensions else () for e in events]
    tags = [tuple(sorted(e.tags)) if e.tags else () for e in events]
    digests = [
        hashlib.blake2b(
            msgspec.json.encode((e.metric, e.ts_ms, float(e.value), e.billable, e.key_id, d, t)),
            digest_size=16,
        ).hexdigest()
        for e, d, t in zip(events, dims, tags, strict=True)
    ]
    return {
        "account": [e.account_id for e in events],
        "metric": [e.metric for e in events],
        "ts": [e.ts_ms for e in events],
        "id": [e.id for e in events],
        "key": [e.key_id or "" for e in events],
        "billable": [1 if e.billable else 0 for e in events],
        "value": [float(e.value) for e in events],
        "dims": [d if type(d) is dict else dict(d) for d in (e.dimensions for e in events)],
        "tags": tags,
        "dimset": [_set_id_before_round_17(d) for d in dims],
        "tagset": [_set_id_before_round_17(t) for t in tags],
        "digest": digests,
    }


prepared_event = st.builds(
    Event,
    id=st.sampled_from(["a", "b", "c", "d"]) | text,
    account_id=st.sampled_from(["acct-1", "acct-2", "acct-3"]),
    metric=text,
    ts_ms=st.integers(-(2**53), 2**53),
    # An int value too (a Struct does not convert it): its digest hashes it as a float.
    value=st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(10**6), 10**6),
    billable=st.booleans(),
    key_id=st.none() | text,
    # Dimensions of one key, and the same few keys and values again, so that sets repeat
    # within a batch in several key orders; a mapping that is no dict too.
    dimensions=st.dictionaries(
        st.sampled_from(["status", "region", "z", "a"]) | text,
        st.sampled_from(["200", "eu", ""]) | st.text(max_size=12),
        max_size=4,
    ).flatmap(lambda d: st.sampled_from([d, dict(reversed(d.items())), MappingProxyType(d)])),
    tags=st.frozensets(st.sampled_from(["prod", "eu", "b", "a"]) | text, max_size=4),
)


@settings(max_examples=300, deadline=None)
@given(batches=st.lists(st.lists(prepared_event, min_size=1, max_size=25), min_size=1, max_size=4))
def test_a_prepared_batch_has_the_columns_digests_and_set_ids_of_before(
    batches: list[list[Event]],
) -> None:
    """Prepared (sorts skipped for one-key maps, tag sets once per batch, hashers copied)
    gives exactly the columns before round 17, each value of the same type; a group of the
    batches asks for the same ids, pairs and accounts; its token is unchanged."""
    prepared = [Prepared(batch) for batch in batches]
    for batch, ready in zip(batches, prepared, strict=True):
        before = _columns_before_round_17(batch)
        assert ready.columns == before
        for name, values in before.items():
            assert [type(v) for v in ready.columns[name]] == [type(v) for v in values], name
        assert ready.pairs == set(zip(before["account"], before["id"], strict=True))
        # digest() (the definition, one event at a time) agrees with the batch's loop.
        assert ready.columns["digest"] == [
            digest(e, d, t)
            for e, d, t in zip(
                batch,
                (tuple(sorted(e.dimensions.items())) for e in batch),
                before["tags"],
                strict=True,
            )
        ]
    group = Group(prepared)
    pairs = {(e.account_id, e.id) for batch in batches for e in batch}
    assert group.ids == [e.id for batch in batches for e in batch]
    assert group.pairs == pairs
    assert group.accounts == sorted({account for account, _ in pairs})
    results, picks = sort_out(prepared, {}, len(group.pairs))
    seen: set[tuple[str, str]] = set()
    for batch, result in zip(batches, results, strict=True):
        fresh = 0
        for e in batch:
            if (e.account_id, e.id) not in seen:
                seen.add((e.account_id, e.id))
                fresh += 1
        assert (result.accepted, result.duplicates) == (fresh, len(batch) - fresh)
    columns = group_columns(prepared, picks, 1)
    named = (columns["account"], columns["id"], columns["digest"])
    expected = hashlib.blake2b(msgspec.json.encode(named), digest_size=16).hexdigest()
    assert token(columns) == expected


def test_the_digests_and_set_ids_are_those_stored_before() -> None:
    """Two events' digests and sets' ids as the code before round 17 computed them (and
    every database holds): a faster encoding must give these very values."""
    events = [
        Event(
            id="r1",
            account_id="acct-0",
            metric="requests",
            ts_ms=1_741_392_000_000,
            value=2.5,
            key_id="k1",
            dimensions={"status": "200", "region": "eu"},
            tags=frozenset({"prod", "eu"}),
        ),
        Event(
            id="s1",
            account_id="acct-0",
            metric="Sessions",
            ts_ms=1_741_392_000_001,
            dimensions={"session_id": "sess-1"},
        ),
    ]
    columns = Prepared(events).columns
    assert columns["dimset"] == [8718675948749896851, 10442483581504176418]
    assert columns["tagset"] == [11568405735079077163, 8180073448483349959]
    assert columns["digest"] == [
        "d802573bfe23f2b9c5d4f10fe5518417",
        "9d3b6d0dc8d6cf6519d5024cf777c910",
    ]
