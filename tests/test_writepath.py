"""The write path: a batch appends its events, the rollups catch up in runs (``fold``), and
no promise moves: durable acknowledgement, whole batches, dedupe forever, read-your-writes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.test_sqlite_levels import to_one_level
from usagemeter.auth import issue_key
from usagemeter.corrections import VoidSelector
from usagemeter.ingest import BatchRejected, Ingestor
from usagemeter.model import Account, Event, Scope
from usagemeter.records import count_lines
from usagemeter.store import rows as rows_module
from usagemeter.store import schema as schema_module
from usagemeter.store import sqlite as sqlite_module
from usagemeter.store.base import AggregateSpec, Measure, NotFound, Window
from usagemeter.store.sqlite import SQLiteStore

BASE_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
HOUR_MS = 3_600_000
MEASURES = (Measure("count"), Measure("sum"), Measure("min"), Measure("max"))


def _open(path: Path, accounts: tuple[str, ...] = ("a", "b")) -> SQLiteStore:
    store = SQLiteStore(path)
    for account in accounts:
        if not any(a.id == account for a in store.list_accounts()):
            store.create_account(Account(account, account.upper()))
    return store


def _totals(store: SQLiteStore, account: str, windows: tuple[Window, ...]) -> dict[int, tuple]:
    spec = AggregateSpec(accounts=(account,), metric="m", windows=windows, measures=MEASURES)
    return {row.window: row.values for row in store.aggregate(spec)}


def _day() -> tuple[Window, ...]:
    return (Window(0, BASE_MS, BASE_MS + 24 * HOUR_MS),)


def _rewrite(path: Path, *statements: str) -> None:
    """Change a closed file as an older version would have left it (one level of rollups
    first, as every version before 5 kept them)."""
    conn = sqlite3.connect(path)
    to_one_level(conn)
    for statement in statements:
        conn.execute(statement)
    conn.commit()
    conn.close()


def _stored_rollup_rows(store: SQLiteStore) -> int:
    """The slots' rows, in both levels."""
    return sum(
        int(store._writer.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
        for table in ("rollup", "rollup_recent")
    )


def test_appends_wait_for_a_run_then_fold_together(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "FOLD_EVENTS", 30)
    monkeypatch.setattr(sqlite_module, "IDLE_FOLD_SECONDS", 3600.0)
    store = _open(db_path)
    store.append([Event(f"e{i}", "a", "m", BASE_MS + i) for i in range(20)])
    assert _stored_rollup_rows(store) == 0  # appended only: the run is not full yet
    store.append([Event(f"f{i}", "a", "m", BASE_MS + i) for i in range(20)])
    # The committer folds a full run before it writes the next batch: once this one is
    # acknowledged, the run of 40 is in the rollups, this one not yet.
    store.append([Event("g", "a", "m", BASE_MS + 24 * HOUR_MS)])
    assert _stored_rollup_rows(store) == 1  # 40 events of one slot: one row
    assert _totals(store, "a", _day()) == {0: (40, 40.0, 1.0, 1.0)}
    store.close()


def test_a_query_folds_what_another_process_appended(db_path: Path) -> None:
    """Read-your-writes across processes: the CLI's `ingest` writes the file a server reads."""
    server = _open(db_path)
    assert _totals(server, "a", _day()) == {}
    importer = _open(db_path)
    importer.append([Event(f"e{i}", "a", "m", BASE_MS + i * 1000, value=2) for i in range(5)])
    assert _totals(server, "a", _day()) == {0: (5, 10.0, 2.0, 2.0)}
    importer.close()
    server.close()


def test_a_file_of_the_version_that_folded_every_batch_is_not_folded_twice(
    db_path: Path,
) -> None:
    store = _open(db_path)
    store.append([Event(f"e{i}", "a", "m", BASE_MS + i * HOUR_MS) for i in range(10)])
    store.close()
    # As version 2 left a file: every event already in the rollups, no fold mark.
    raw = SQLiteStore(db_path)
    raw.close()
    _rewrite(db_path, "DROP TABLE folded", "PRAGMA user_version = 2")
    reopened = _open(db_path)
    assert _totals(reopened, "a", _day()) == {0: (10, 10.0, 1.0, 1.0)}
    reopened.close()


def test_a_file_indexed_by_metric_first_finds_its_events_by_time_and_answers_ragged_ends(
    db_path: Path,
) -> None:
    store = _open(db_path)
    # One event a minute for two hours, in two accounts.
    store.append([Event(f"e{i}", "a", "m", BASE_MS + i * 60_000) for i in range(120)])
    store.append([Event(f"e{i}", "b", "m", BASE_MS + i * 60_000) for i in range(120)])
    store.close()
    # As the version two before left a file: events indexed by (metric, account, ts).
    _rewrite(
        db_path,
        "DROP TABLE event_times",
        "CREATE INDEX events_time ON events(metric, account, ts)",
        "PRAGMA user_version = 3",
    )
    reopened = _open(db_path)
    names = {
        row[0]: row[1] for row in reopened._writer.execute("SELECT name, type FROM sqlite_master")
    }
    assert names.get("event_times") == "table"
    assert "events_time" not in names and "events_ts" not in names
    # Ragged ends read raw events: from 00:07:30 to 01:52:00.5, minutes 8 to 112 of "a" only.
    ragged = (Window(0, BASE_MS + 450_000, BASE_MS + 112 * 60_000 + 500),)
    assert _totals(reopened, "a", ragged) == {0: (105, 105.0, 1.0, 1.0)}
    reopened.close()


APPENDER = """
import sys
from usagemeter.model import Event
from usagemeter.store.sqlite import SQLiteStore

store = SQLiteStore(sys.argv[1])
for n in range(100_000):
    store.append([Event(f"e{n}-{i}", "a", "m", {base} + n * 1000 + i) for i in range(50)])
    print(n, flush=True)  # acknowledged: append returned
"""


def test_sigkill_during_ingest_loses_no_acknowledged_event(db_path: Path) -> None:
    _open(db_path).close()
    proc = subprocess.Popen(
        [sys.executable, "-c", APPENDER.replace("{base}", str(BASE_MS)), str(db_path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.stdout is not None
    acknowledged = -1
    try:
        # Past the first fold of the rollups, so the kill may land in a fold or an append.
        while acknowledged < 2 * sqlite_module.FOLD_EVENTS // 50:
            acknowledged = int(proc.stdout.readline())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    store = _open(db_path)
    stored = store.count_events()
    assert stored >= (acknowledged + 1) * 50
    assert stored % 50 == 0  # whole batches only
    ids = {e.id for e in store.iter_events()}
    assert all(f"e{n}-{i}" in ids for n in range(acknowledged + 1) for i in range(50))
    # The rollups hold every stored event exactly once, whatever the kill interrupted.
    window = (Window(0, BASE_MS, BASE_MS + 10**9),)
    assert _totals(store, "a", window)[0][0] == stored
    store.close()


# Any interleaving of concurrent batches, each maybe sent twice (a retry racing its first
# try): the totals equal a naive fold of the distinct events. An event's payload is a
# function of its id, as a client's retry is.
def _payload(n: int) -> tuple[str, int, float]:
    return ("a" if n % 3 else "b", BASE_MS + (n * 7_919_417) % (48 * HOUR_MS), float(n % 5 + 1))


batches = st.lists(
    st.tuples(st.lists(st.integers(0, 60), min_size=1, max_size=30), st.booleans()),
    min_size=1,
    max_size=8,
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(batches=batches, fold_every=st.sampled_from([1, 25, 1000]))
def test_concurrent_batches_with_retries_fold_to_the_distinct_events(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    batches: list[tuple[list[int], bool]],
    fold_every: int,
) -> None:
    monkeypatch.setattr(sqlite_module, "FOLD_EVENTS", fold_every)
    path = tmp_path / f"prop-{os.urandom(4).hex()}.db"
    store = _open(path)
    sends = [ids for ids, retried in batches for _ in range(2 if retried else 1)]

    def send(ids: list[int]) -> None:
        store.append(
            [Event(f"e{n}", _payload(n)[0], "m", _payload(n)[1], _payload(n)[2]) for n in ids]
        )

    threads = [threading.Thread(target=send, args=(ids,)) for ids in sends]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    distinct = {n for ids in sends for n in ids}
    # Hours, and one window with ragged millisecond ends, over both days.
    windows = tuple(
        Window(h, BASE_MS + h * HOUR_MS, BASE_MS + (h + 1) * HOUR_MS) for h in range(48)
    )
    for account in ("a", "b"):
        expected: dict[int, tuple] = {}
        for n in sorted(distinct):
            owner, ts, value = _payload(n)
            if owner != account:
                continue
            h = (ts - BASE_MS) // HOUR_MS
            cnt, total, lo, hi = expected.get(h, (0, 0.0, value, value))
            expected[h] = (cnt + 1, total + value, min(lo, value), max(hi, value))
        assert _totals(store, account, windows) == expected
        ragged = (Window(0, BASE_MS + 1234, BASE_MS + 47 * HOUR_MS + 5678),)
        want = sum(
            1
            for n in distinct
            if _payload(n)[0] == account and BASE_MS + 1234 <= _payload(n)[1] < ragged[0].end_ms
        )
        assert (_totals(store, account, ragged).get(0) or (0,))[0] == want
    assert store.count_events() == len(distinct)
    store.close()


# The compiled path (msgspec) and the item-by-item path must accept the same events and
# build the same ones; any batch the compiled path refuses goes the other way for its errors.
names = st.text(alphabet="ab_.-1", min_size=1, max_size=4)
valid_events = st.fixed_dictionaries(
    {
        "id": names,
        "account": st.sampled_from(["a", "b"]),
        "metric": st.sampled_from(["m", "lookups", "a.b:c"]),
        "ts": st.one_of(
            st.integers(946_684_800_000, 7_258_118_399_999),
            st.sampled_from(["2025-01-01T00:00:00Z", "2025-01-01T05:30:00.250+05:30"]),
        ),
    },
    optional={
        "value": st.one_of(st.integers(-3, 3), st.floats(allow_nan=False, allow_infinity=False)),
        "billable": st.booleans(),
        "dimensions": st.dictionaries(names, st.text(max_size=3), max_size=2),
        "tags": st.lists(names, max_size=3),
        "key": st.just("ka"),
    },
)
# One field of an event set to something that may be wrong, in a way each path sees.
wild = {
    "id": st.one_of(st.just(""), st.integers()),
    "account": st.sampled_from(["ghost", ""]),
    "metric": st.sampled_from(["bad metric", ""]),
    "ts": st.one_of(
        st.integers(946_684_800_000 - 2, 946_684_800_001),
        st.sampled_from(["2025-01-01", "2025-01-01T00:00:00", "soon"]),
        st.booleans(),
        st.floats(),
    ),
    "value": st.one_of(st.booleans(), st.text(max_size=2), st.just(float("inf"))),
    "billable": st.integers(0, 1),
    "dimensions": st.one_of(
        st.dictionaries(st.sampled_from(["key", "a b", "subaccount"]), st.text(max_size=2)),
        st.dictionaries(names, st.integers()),
        st.lists(names, max_size=1),
    ),
    "tags": st.one_of(st.lists(st.sampled_from(["a,b", ""]), min_size=1), names),
    "key": st.sampled_from(["nokey", ""]),
    "extra": st.just(1),
}
raw_events = st.one_of(
    valid_events,
    st.tuples(valid_events, st.sampled_from(sorted(wild))).flatmap(
        lambda pair: wild[pair[1]].map(lambda bad: {**pair[0], pair[1]: bad})
    ),
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raws=st.lists(raw_events, max_size=6))
def test_the_compiled_and_the_itemised_validation_agree(
    ingest_store: SQLiteStore, raws: list[dict[str, object]]
) -> None:
    # One clock for both: an error about a future ts quotes the server's time.
    frozen = datetime.now(UTC)
    ingestor = Ingestor(ingest_store, now=lambda: frozen)

    def outcome(validate: Callable[[], list[Event]]) -> object:
        try:
            return validate()
        except BatchRejected as exc:
            return exc.errors

    compiled = outcome(lambda: ingestor.validate(raws))
    assert compiled == outcome(lambda: ingestor._validate_each(raws, None))


@pytest.fixture
def ingest_store(tmp_path: Path) -> Iterator[SQLiteStore]:
    store = _open(tmp_path / "ingest.db")
    issue_key(store, "a", key_id="ka", scopes=[Scope.READ])
    yield store
    store.close()


# ------------------------------------------------------------ the fold, in SQL

# Offsets from BASE_MS on the edges of every grain, few enough that timestamps often tie.
EDGES = (0, 1, 899_999, 900_000, HOUR_MS - 1, HOUR_MS, 24 * HOUR_MS - 1, 24 * HOUR_MS)
fold_cases = st.lists(
    st.tuples(
        st.sampled_from(["a", "b"]),
        st.sampled_from(["m", "g"]),
        st.sampled_from(EDGES),
        st.integers(-3, 3),
        st.booleans(),
        st.sampled_from([None, "ka"]),
        st.sampled_from([{}, {"d": "x"}]),
        st.sampled_from([frozenset(), frozenset({"t"})]),
        st.booleans(),  # fold after this event's batch
    ),
    min_size=1,
    max_size=40,
)


def _rollup_tables(store: SQLiteStore) -> dict[str, set[tuple]]:
    """Every rollup table, once merged: the recent level empty, the big tables whole."""
    store.merge()
    for table in schema_module.ROLLUP_TABLES:
        assert not store._writer.execute(f"SELECT 1 FROM {table}_recent").fetchall()
    return {
        table: set(store._writer.execute(f"SELECT * FROM {table}"))
        for table in schema_module.ROLLUP_TABLES
    }


def _folded_in_python(rows: list[tuple]) -> dict[str, set[tuple]]:
    """Every rollup table as folding ``rows`` (ROLLUP_COLUMNS and seq, in arrival order) one
    by one gives it: the latest value is the greatest ts's, and on a tie the later row's,
    whose seq the row keeps."""
    tables: dict[str, set[tuple]] = {}
    for table, (keys, unit) in schema_module.ROLLUP_KEYS.items():
        acc: dict[tuple, list] = {}
        for metric, account, key, billable, dimset, tagset, ts, value, seq in rows:
            named = dict(
                metric=metric, account=account, key=key, billable=billable,
                dimset=dimset, tagset=tagset, slot=ts // unit,
            )  # fmt: skip
            group = tuple(named[k] for k in keys)
            row = acc.setdefault(group, [0, 0.0, value, value, ts, value, seq])
            row[0] += 1
            row[1] += value
            row[2], row[3] = min(row[2], value), max(row[3], value)
            if ts >= row[4]:
                row[4], row[5], row[6] = ts, value, seq
        tables[table] = {(*group, *values) for group, values in acc.items()}
    return tables


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cases=fold_cases)
# Two dropped events tied on ts: the later one's value stays the latest after a rebuild.
@example(cases=[("a", "m", 0, v, True, None, {}, frozenset(), False) for v in (1, 2)])
# Two keys' events at one ms: the hour without the key takes the later one's value, whichever
# key sorts first (folded from the key hours, it would take the greater key's).
@example(
    cases=[("a", "m", 0, v, True, k, {}, frozenset(), False) for v, k in ((1, "ka"), (2, None))]
)
@example(
    cases=[("a", "m", 0, v, True, k, {}, frozenset(), False) for v, k in ((1, None), (2, "ka"))]
)
def test_the_sql_fold_equals_folding_event_by_event_and_survives_rebuild_and_retention(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cases: list[tuple]
) -> None:
    """Folded in runs at any points, merged into the big tables at others, rebuilt from the
    raw events, and rebuilt again after retention dropped some (whose payloads the
    tombstones keep), the rollups are those of
    folding every event in arrival order, ties of the latest value included; a run longer
    than one pass (RUN_ROWS, made small here) is folded in passes."""
    monkeypatch.setattr(schema_module, "RUN_ROWS", 3)
    store = _open(tmp_path / f"fold-{os.urandom(4).hex()}.db")
    issue_key(store, "a", key_id="ka")
    batch: list[Event] = []
    for n, (account, metric, offset, amount, billable, key, dims, tags, cut) in enumerate(cases):
        value = float(amount)
        key = key if account == "a" else None
        # Ids in the reverse of arrival order: an order of ids is no order of arrival.
        ts = BASE_MS + offset
        batch.append(
            Event(f"e{len(cases) - n:03}", account, metric, ts, value, billable, key, dims, tags)
        )
        if cut or n == len(cases) - 1:
            store.append(batch)
            batch = []
            if n % 2:
                store.fold()
            if n % 3 == 1:  # the cells so far into the big tables, later ones beside them
                store.merge()
    store.fold()
    arrived = store._writer.execute(
        f"SELECT {schema_module.ROLLUP_COLUMNS}, seq FROM events ORDER BY seq"
    ).fetchall()
    expected = _folded_in_python(arrived)
    assert _rollup_tables(store) == expected
    store.rebuild_rollups()
    assert _rollup_tables(store) == expected
    store.retain(BASE_MS + HOUR_MS)  # drops the events of the first hour
    store.rebuild_rollups()
    assert _rollup_tables(store) == expected
    store.close()


# Batches are built into rows by the caller from cached row ids and inserted without an id
# lookup first (the unique index finds a seen id); a batch with a seen id, a repeat inside
# it or a voided id goes the whole way. Every answer must equal the event-by-event model.
sends = st.lists(
    st.lists(
        st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 12), st.integers(0, 1)),
        min_size=1,
        max_size=8,
    ),
    min_size=1,
    max_size=8,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batches=sends, voided=st.sets(st.integers(0, 12), max_size=3))
def test_each_batch_counts_new_repeated_conflicting_and_voided_ids_as_event_by_event(
    tmp_path: Path, batches: list[list[tuple[str, int, int]]], voided: set[int]
) -> None:
    store = _open(tmp_path / f"fresh-{os.urandom(4).hex()}.db")
    seen: dict[tuple[str, str], float] = {}
    if voided:  # stored, then voided: their ids stay taken, with their payload
        store.append([Event(f"e{n}", "a", "m", BASE_MS + n, 1.0) for n in sorted(voided)])
        store.void_events(VoidSelector("a", ids=tuple(f"e{n}" for n in voided)), "r", None, 0)
        seen.update({("a", f"e{n}"): 1.0 for n in voided})
    for batch in batches:
        events = [Event(f"e{n}", a, "m", BASE_MS + n, 1.0 + v) for a, n, v in batch]
        accepted, duplicates, conflicts = 0, 0, []
        for index, event in enumerate(events):
            ident = (event.account_id, event.id)
            if ident in seen:
                duplicates += 1
                if seen[ident] != event.value:
                    conflicts.append(index)
            else:
                seen[ident] = event.value
                accepted += 1
        result = store.append(events)
        assert (result.accepted, result.duplicates, list(result.conflicts)) == (
            accepted,
            duplicates,
            conflicts,
        )
    stored = {(e.account_id, e.id): e.value for e in store.iter_events()}
    assert stored == {k: v for k, v in seen.items() if int(k[1][1:]) not in voided or k[0] != "a"}
    store.close()


def test_a_batch_built_before_its_account_was_deleted_and_made_again_goes_to_the_new_one(
    db_path: Path,
) -> None:
    store = _open(db_path)
    store.append([Event("e0", "a", "m", BASE_MS, 1.0)])  # the account's row id is cached
    events = [Event("e1", "a", "m", BASE_MS + 1, 2.0)]
    generation = store._row_ids_generation
    built = store._prepare(events)
    assert built is not None and built[0] is not None  # built from the cached row id
    store.delete_account("a")
    store.create_account(Account("a", "A"))
    batch = sqlite_module._PendingBatch(events, None, built, generation)
    with store._queue_ready:
        store._queue.append(batch)
        store._queue_ready.notify()
    assert batch.future.result().accepted == 1
    assert [(e.account_id, e.id) for e in store.iter_events()] == [("a", "e1")]
    orphans = store._writer.execute(
        "SELECT count(*) FROM events WHERE account NOT IN (SELECT rid FROM accounts)"
    ).fetchone()[0]
    assert orphans == 0
    assert _totals(store, "a", _day()) == {0: (1, 2.0, 2.0, 2.0)}
    store.close()


def test_kept_row_ids_are_looked_up_again_and_kept_while_they_hold(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once kept row ids expire, the committer looks them up again: while they hold, the
    rows callers built from them stand; when another process deleted an account and made
    it again, batches built before go to its new row."""
    store = _open(db_path)
    other = SQLiteStore(db_path)
    try:
        issue_key(store, "a", key_id="ka")
        store.append([Event("e0", "a", "m", BASE_MS, 1.0, key_id="ka")])  # ids kept
        monkeypatch.setattr(rows_module, "ROW_IDS_KEPT_FOR", 0.0)
        generation = store._row_ids_generation
        store.append([Event("e1", "a", "m", BASE_MS, 2.0, key_id="ka")])
        assert store._row_ids_generation == generation
        assert set(store._account_rids) >= {"a"} and set(store._key_rids) == {"ka"}
        events = [Event("e2", "a", "m", BASE_MS + 1, 4.0)]
        built = store._prepare(events)
        assert built is not None and built[0] is not None
        other.delete_account("a")
        other.create_account(Account("a", "A again"))
        batch = sqlite_module._PendingBatch(events, None, built, generation)
        with store._queue_ready:
            store._queue.append(batch)
            store._queue_ready.notify()
        assert batch.future.result().accepted == 1
        assert store._row_ids_generation != generation
        assert _totals(other, "a", _day()) == {0: (1, 4.0, 4.0, 4.0)}
    finally:
        other.close()
        store.close()


def test_batches_of_one_group_keep_their_own_answers_when_one_repeats_or_fails(
    db_path: Path,
) -> None:
    store = _open(db_path)
    store.append([Event("e0", "a", "m", BASE_MS, 1.0)])  # names and row ids cached
    groups = [
        # One insert for all: nothing repeated, a new dimension set built by the committer.
        [
            [Event("e1", "a", "m", BASE_MS + 1, 1.0)],
            [Event("e2", "b", "m", BASE_MS + 2, 2.0, dimensions={"new": "set"})],
        ],
        # A repeat across batches (the unique index refuses the insert of all): each its own.
        [
            [Event("e3", "a", "m", BASE_MS + 3, 3.0)],
            [Event("e3", "a", "m", BASE_MS + 3, 3.0), Event("e4", "a", "m", BASE_MS + 4, 4.0)],
        ],
        # A repeat within a batch, an unknown account, a conflict with a stored event.
        [
            [Event("e5", "b", "m", BASE_MS + 5, 5.0), Event("e5", "b", "m", BASE_MS + 5, 6.0)],
            [Event("e6", "ghost", "m", BASE_MS + 6, 6.0)],
            [Event("e1", "a", "m", BASE_MS + 1, 9.0)],
        ],
    ]
    answers = []
    for group in groups:
        with store._queue_ready:  # the committer takes the whole queue as one group
            futures = [store.submit(events) for events in group]
        for future in futures:
            try:
                result = future.result()
                answers.append((result.accepted, result.duplicates, result.conflicts))
            except Exception as exc:
                answers.append(type(exc).__name__)
    assert answers == [
        (1, 0, ()),
        (1, 0, ()),
        (1, 0, ()),
        (1, 1, ()),
        (1, 1, (1,)),
        "NotFound",
        (0, 1, (0,)),
    ]
    stored = sorted((e.account_id, e.id, e.value) for e in store.iter_events())
    assert stored == [
        ("a", "e0", 1.0),
        ("a", "e1", 1.0),
        ("a", "e3", 3.0),
        ("a", "e4", 4.0),
        ("b", "e2", 2.0),
        ("b", "e5", 5.0),
    ]
    assert _totals(store, "b", _day()) == {0: (2, 7.0, 2.0, 5.0)}
    store.close()


def test_a_batch_committed_just_after_its_account_was_deleted_is_refused(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The committer may take a group between the deletion's commit and anything done after
    it: that group must not find the deleted account's row id still cached."""
    store = _open(db_path)
    store.append([Event("e0", "a", "m", BASE_MS, 1.0)])  # the account's row id is cached
    late: list[BaseException | None] = []
    forget = store._forget_accounts

    def append_then_forget(account_ids: Sequence[str]) -> None:
        try:
            store.append([Event("e1", "a", "m", BASE_MS + 1, 2.0)])
            late.append(None)
        except Exception as exc:
            late.append(exc)
        forget(account_ids)

    monkeypatch.setattr(store, "_forget_accounts", append_then_forget)
    store.delete_account("a")
    assert len(late) == 1 and late[0] is not None, "an event was stored for a deleted account"
    orphans = store._writer.execute(
        "SELECT count(*) FROM events WHERE account NOT IN (SELECT rid FROM accounts)"
    ).fetchone()[0]
    assert orphans == 0
    store.close()


@settings(max_examples=25, deadline=None)
@given(count=st.integers(0, 3000), repeat=st.booleans())
@example(count=2048, repeat=False)
@example(count=2049, repeat=True)
@example(count=129, repeat=False)
@example(count=1000, repeat=True)
@example(count=4095, repeat=False)
def test_rows_inserted_by_statements_of_many_go_in_whole_and_in_order(
    count: int, repeat: bool
) -> None:
    """``insert_events`` puts rows in by statements of up to 2,048 rows, each of the next
    power of two, whose spare rows its LIMIT leaves unread: every row goes in, in the order
    given (seq is the order of arrival), no spare row with them, or, when one repeats an id,
    none."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.executescript(schema_module.SCHEMA)
    rows = [(1, f"e{i}", 1, BASE_MS + i, 0, 1, 1, 1, float(i)) for i in range(count)]
    if repeat and rows:
        rows.append(rows[count // 2])
    conn.execute("BEGIN")
    if repeat and rows:
        with pytest.raises(sqlite3.IntegrityError):
            sqlite_module.insert_events(conn, rows)
    else:
        sqlite_module.insert_events(conn, rows)
    conn.execute("COMMIT")
    stored = conn.execute("SELECT event_id, value FROM events ORDER BY seq").fetchall()
    given_rows = [(row[1], row[8]) for row in rows]
    if repeat and rows:
        # The failing statement undid itself whole (the store's savepoint undoes those
        # before it): what is stored is the rows of the statements before, in order.
        assert len(stored) < len(rows) and stored == given_rows[: len(stored)]
    else:
        assert stored == given_rows
    conn.close()


def test_a_batch_of_many_new_names_interns_each_once(db_path: Path) -> None:
    """New metrics, dimension sets and tag sets of a batch are interned in a few statements:
    each once, the same id for the same set however its dimensions are ordered, its tags
    findable, and a key or account that does not exist still refuses the batch."""
    store = _open(db_path)
    store.append([Event("e0", "a", "m", BASE_MS, 1.0)])  # a few names cached, most not
    events = [
        Event(
            f"e{i}",
            "ab"[i % 2],
            f"m{i % 3}" if i % 4 else "m",
            BASE_MS + i,
            1.0,
            dimensions={"session_id": f"s{i % 50}", "agent": "x"}
            if i % 2
            else {"agent": "x", "session_id": f"s{i % 50}"},
            tags=frozenset({f"t{i % 7}", "all"}),
        )
        for i in range(1, 501)
    ]
    assert store.append(events).accepted == 500
    conn = store._writer
    assert conn.execute("SELECT count(*) FROM metrics").fetchone()[0] == 4
    assert conn.execute("SELECT count(*) FROM dimsets").fetchone()[0] == 1 + 50
    assert conn.execute("SELECT count(*) FROM tagsets").fetchone()[0] == 1 + 7
    assert conn.execute("SELECT count(*) FROM tagset_tags WHERE tag = 'all'").fetchone()[0] == 7
    stored = {e.id: e for e in store.iter_events()}
    assert all(stored[e.id] == e for e in events)
    # A repeat beside new events: the new ones stored with their names, the repeat not.
    repeat = Event("e1", "b", "m", BASE_MS, dimensions={"only": "in a repeat"})
    fresh = Event("e501", "a", "m9", BASE_MS, dimensions={"new": "set"}, tags=frozenset("z"))
    assert store.append([repeat, fresh]).duplicates == 1
    assert {e.id: e for e in store.iter_events()}["e501"] == fresh
    with pytest.raises(NotFound):
        store.append([Event("k1", "a", "m", BASE_MS, key_id="no_such_key")])
    with pytest.raises(NotFound):
        store.append([Event("k2", "ghost", "new_metric", BASE_MS)])
    assert conn.execute("SELECT count(*) FROM metrics WHERE name = 'new_metric'").fetchone()[0] == 0
    store.close()


def test_the_command_line_starts_without_the_web_app() -> None:
    """`usagemeter ingest` of a file pays for its start: the web app's modules (FastAPI,
    pydantic: half a second) are imported only by the commands that print its answers."""
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, usagemeter.cli; print(sorted(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "'fastapi'" not in loaded and "'pydantic'" not in loaded


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    text=st.binary(max_size=300)
    | st.lists(st.sampled_from([b"\n", b"\r", b"x", b"{}"])).map(b"".join)
)
@example(text=b"")
@example(text=b"x" * ((1 << 20) - 1) + b"\n")
@example(text=b"x" * (1 << 20) + b"\nlast")
def test_counting_a_files_lines_in_blocks_counts_as_iterating_it(
    tmp_path: Path, text: bytes
) -> None:
    path = tmp_path / "lines.ndjson"
    path.write_bytes(text)
    with path.open("rb") as handle:
        assert count_lines(path) == sum(1 for _ in handle)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_a_stored_id_in_any_place_of_a_batch_is_its_only_repeat(
    tmp_path: Path, data: st.DataObject
) -> None:
    """Whatever the statements a batch's rows go in by (3 rows went in as 2 + 1): a repeat
    in a later statement must not leave the earlier rows stored and then counted as
    repeats."""
    size = data.draw(st.integers(1, 40), label="size")
    place = data.draw(st.integers(0, size - 1), label="place")
    store = _open(tmp_path / f"fresh-{os.urandom(4).hex()}.db")
    store.append([Event("old", "a", "m", BASE_MS, 1.0)])  # names and row ids cached
    events = [Event(f"n{i}", "a", "m", BASE_MS + 1 + i, 1.0) for i in range(size - 1)]
    events.insert(place, Event("old", "a", "m", BASE_MS, 1.0))
    result = store.append(events)
    assert (result.accepted, result.duplicates, result.conflicts) == (size - 1, 1, ())
    assert store.count_events() == size
    assert _totals(store, "a", _day()) == {0: (size, float(size), 1.0, 1.0)}
    store.close()


def test_batches_of_one_group_whose_repeat_is_in_a_later_statement_answer_each_their_own(
    db_path: Path,
) -> None:
    store = _open(db_path)
    store.append([Event("e0", "a", "m", BASE_MS, 1.0)])  # names and row ids cached
    group = [  # three rows: a statement of two, then one, which meets the stored e0
        [Event("e1", "a", "m", BASE_MS + 1, 1.0)],
        [Event("e2", "a", "m", BASE_MS + 2, 2.0)],
        [Event("e0", "a", "m", BASE_MS, 1.0)],
    ]
    with store._queue_ready:  # the committer takes the whole queue as one group
        futures = [store.submit(events) for events in group]
    answers = [(f.result().accepted, f.result().duplicates) for f in futures]
    assert answers == [(1, 0), (1, 0), (0, 1)]
    assert sorted(e.id for e in store.iter_events()) == ["e0", "e1", "e2"]
    store.close()
