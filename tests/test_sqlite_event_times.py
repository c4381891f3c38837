"""The embedded store's folded events by time (``event_times``), kept by the fold instead of
by each commit: a ragged end of a range reads the folded events through it and the waiting
ones from ``unfolded``, as does an export of a range; voids, amends, retention and deletions
keep it exact; a file of the version before gets it built once, in one transaction that a
SIGKILL leaves undone."""

from __future__ import annotations

import itertools
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.reference import fold_cells
from tests.test_sqlite_levels import to_one_level
from usagemeter.corrections import Amendment, VoidSelector
from usagemeter.model import Account, Event
from usagemeter.store import sqlite as sqlite_module
from usagemeter.store.base import AggregateSpec, Measure, Window
from usagemeter.store.schema import INDEXED_EVERY_BATCH, SCHEMA_VERSION, TIMES_AT_ONE_LEVEL
from usagemeter.store.sqlite import SQLiteStore

BASE_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
SLOT_MS = 15 * 60_000
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
MEASURES = tuple(Measure(a) for a in ("count", "sum", "min", "max", "latest"))
ACCOUNTS = ("a", "b")
METRICS = ("m", "n")
# Times of events and of windows' ends: on slot, hour and day edges, a millisecond off
# them, and anywhere in two days.
EDGES = (0, 1, SLOT_MS - 1, SLOT_MS, SLOT_MS + 1, HOUR_MS - 1, HOUR_MS, DAY_MS - 1, DAY_MS)
OFFSETS = st.one_of(st.sampled_from(EDGES), st.integers(0, 2 * DAY_MS))


def _open(path: Path) -> SQLiteStore:
    store = SQLiteStore(path)
    known = {a.id for a in store.list_accounts()}
    for account in ACCOUNTS:
        if account not in known:
            store.create_account(Account(account, account.upper()))
    return store


def _answer(store: SQLiteStore, account: str, metric: str, windows: tuple[Window, ...]) -> dict:
    spec = AggregateSpec((account,), metric, windows, MEASURES, totals=True)
    return {row.window: row.values for row in store.aggregate(spec)}


def _expected(events: list[Event], account: str, metric: str, windows: tuple[Window, ...]) -> dict:
    """Folding the stored events one by one in the order they were stored."""
    return fold_cells(events, windows, lambda e: e.account_id == account and e.metric == metric)


def _times(conn: sqlite3.Connection) -> tuple[list[tuple], list[tuple]]:
    """The entries of event_times at both levels, and what they should be: every folded
    event's, once (in one level)."""
    entries = conn.execute("SELECT ts, metric, account, seq FROM event_times_all ORDER BY seq")
    folded = conn.execute(
        "SELECT ts, metric, account, seq FROM events"
        " WHERE seq <= (SELECT seq FROM folded) ORDER BY seq"
    )
    return entries.fetchall(), folded.fetchall()


def _scalar(store: SQLiteStore, sql: str) -> int:
    with store._write_lock:  # the committer may be folding on this connection meanwhile
        return int(store._writer.execute(sql).fetchone()[0])


def _waiting(store: SQLiteStore) -> int:
    return _scalar(store, "SELECT count(*) FROM unfolded")


def _windows(cuts: list[int]) -> tuple[Window, ...]:
    ends = sorted(BASE_MS + c for c in cuts)
    return tuple(
        Window(i, lo, hi) for i, (lo, hi) in enumerate(itertools.pairwise(ends)) if lo < hi
    )


_event = st.tuples(
    st.sampled_from(ACCOUNTS),
    st.sampled_from(METRICS),
    OFFSETS,
    st.integers(-3, 9),  # the value
    st.integers(0, 40),  # the id: a repeat counts once, a voided id stays taken
)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.lists(_event, min_size=1, max_size=12)),
        st.tuples(st.just("fold"), st.just(())),
        st.tuples(st.just("merge step"), st.just(())),
        st.tuples(st.just("ask"), st.lists(OFFSETS, min_size=2, max_size=4)),
        st.tuples(st.just("void ids"), st.lists(st.integers(0, 100), min_size=1, max_size=3)),
        st.tuples(st.just("void range"), st.lists(OFFSETS, min_size=2, max_size=2)),
        st.tuples(st.just("amend"), st.tuples(st.integers(0, 100), st.integers(-3, 9))),
    ),
    min_size=1,
    max_size=20,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=steps, fold_every=st.sampled_from([4, 10**9]))
# A folded and a waiting event in one ragged end, at one millisecond: the waiting one came
# later, and each is counted once.
@example(
    steps=[
        ("append", [("a", "m", 7, 5, 1)]),
        ("fold", ()),
        ("append", [("a", "m", 7, 2, 2), ("a", "n", 7, 1, 3)]),
        ("ask", [5, 9]),
    ],
    fold_every=10**9,
)
# The latest event voided, then a new one stored (it may take the voided event's seq): the
# voided one's entry must not find it.
@example(
    steps=[
        ("append", [("a", "m", 7, 5, 1), ("a", "m", 9, 4, 2)]),
        ("fold", ()),
        ("void ids", [1]),
        ("append", [("a", "m", 8, 3, 3)]),
        ("fold", ()),
        ("ask", [0, 10]),
    ],
    fold_every=10**9,
)
# Entries split between the levels by a merge cut short: a ragged end reads both, a void of
# one in each finds and removes each where it is.
@example(
    steps=[
        ("append", [("a", "m", 7, 5, 1), ("a", "m", 9, 4, 2), ("a", "m", 11, 3, 3)]),
        ("fold", ()),
        ("merge step", ()),  # two entries into the big table, the third left
        ("ask", [5, 10]),
        ("void ids", [0, 2]),
        ("ask", [5, 12]),
    ],
    fold_every=10**9,
)
# An amend's replacement, stored and folded by the correction itself, is read in a ragged end.
@example(
    steps=[("append", [("a", "m", 7, 5, 1)]), ("amend", (0, 3)), ("ask", [5, 9])],
    fold_every=10**9,
)
def test_ragged_ends_read_folded_and_waiting_events_as_the_reference(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    steps: list[tuple[str, object]],
    fold_every: int,
) -> None:
    monkeypatch.setattr(sqlite_module, "FOLD_EVENTS", fold_every)
    monkeypatch.setattr(sqlite_module, "IDLE_FOLD_SECONDS", 3600.0)
    # A merge's steps move a cell, then an entry by time, at a time: entries split between
    # the levels in any way.
    monkeypatch.setattr(sqlite_module, "MERGE_STEP", 1)
    monkeypatch.setattr(sqlite_module, "MERGE_TIMES_STEP", 1)
    store = _open(tmp_path / f"times-{os.urandom(4).hex()}.db")
    stored: list[Event] = []  # in the order stored: a replacement after every other
    taken: set[tuple[str, str]] = set()
    amends = 0
    for action, arg in [*steps, ("fold", ()), ("ask", [0, 2 * DAY_MS])]:
        if action == "append":
            batch = {
                (account, f"e{n}"): Event(f"e{n}", account, metric, BASE_MS + at, float(v))
                for account, metric, at, v, n in arg  # type: ignore[attr-defined]
            }
            store.append(list(batch.values()))
            stored.extend(e for ident, e in batch.items() if ident not in taken)
            taken.update(batch)
        elif action in ("fold", "merge step"):
            store.fold() if action == "fold" else store.merge_step()
            assert _waiting(store) == 0 or action == "merge step"
            entries, folded = _times(store._reader())
            assert entries == folded
        elif action == "ask":
            windows = _windows(arg)  # type: ignore[arg-type]
            for account in ACCOUNTS:
                for metric in METRICS:
                    expected = _expected(stored, account, metric, windows)
                    assert _answer(store, account, metric, windows) == expected
            # An export of a range finds its events by time the same way, folded and waiting.
            if windows:
                lo, hi = windows[0].start_ms, windows[-1].end_ms
                for accounts, start, end in ((None, lo, hi), (("a",), lo, None), (None, None, hi)):
                    exported = store.iter_events(accounts, start, end)
                    assert sorted((e.account_id, e.id) for e in exported) == sorted(
                        (e.account_id, e.id)
                        for e in stored
                        if (accounts is None or e.account_id in accounts)
                        and (start is None or e.ts_ms >= start)
                        and (end is None or e.ts_ms < end)
                    )
        elif action == "void ids":
            mine = [e for e in stored if e.account_id == "a"]
            ids = tuple(dict.fromkeys(mine[i % len(mine)].id for i in arg)) if mine else ()  # type: ignore[attr-defined]
            if ids:
                store.void_events(VoidSelector("a", ids=ids), "wrong", None, 0)
                stored = [e for e in stored if not (e.account_id == "a" and e.id in ids)]
        elif action == "void range":
            lo, hi = sorted(BASE_MS + at for at in arg)  # type: ignore[attr-defined]
            if lo < hi:
                selector = VoidSelector("a", metric="m", start_ms=lo, end_ms=hi)
                store.void_events(selector, "wrong", None, 0)
                stored = [
                    e
                    for e in stored
                    if not (e.account_id == "a" and e.metric == "m" and lo <= e.ts_ms < hi)
                ]
        else:  # amend: one stored event of "a" gets a new value, under a new id
            mine = [e for e in stored if e.account_id == "a"]
            if mine:
                which, value = arg  # type: ignore[misc]
                old = mine[which % len(mine)]
                new_id = f"r{amends}"
                amends += 1
                amend = Amendment(float(value), new_id=new_id)
                store.void_events(VoidSelector("a", ids=(old.id,)), "fix", None, 0, amend)
                stored.remove(old)
                stored.append(
                    Event(new_id, "a", old.metric, old.ts_ms, float(value))  # stored last
                )
                taken.add(("a", new_id))
    store.close()


def _rewrite_as_version_3(path: Path) -> None:
    """Change a closed file as version 3 left it: every event indexed by time as it was
    stored (events_ts), no event_times."""
    conn = sqlite3.connect(path)
    to_one_level(conn)
    conn.execute("DROP TABLE event_times")
    conn.execute("CREATE INDEX events_ts ON events(ts, metric, account)")
    conn.execute(f"PRAGMA user_version = {INDEXED_EVERY_BATCH}")
    conn.commit()
    conn.close()


def _schema(path: Path) -> tuple[dict[str, str], int]:
    conn = sqlite3.connect(path)
    try:
        names = dict(conn.execute("SELECT name, type FROM sqlite_master").fetchall())
        return names, int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


# Appends events that wait for their fold, then dies: a file with events both folded and
# waiting, as a killed server or import leaves it.
_APPEND_AND_DIE = """
import os, signal, sys
from usagemeter.model import Event
from usagemeter.store import sqlite as sqlite_module
from usagemeter.store.sqlite import SQLiteStore
sqlite_module.FOLD_EVENTS = 10**9
sqlite_module.IDLE_FOLD_SECONDS = 3600.0
store = SQLiteStore(sys.argv[1])
base = int(sys.argv[2])
store.append([Event(f"w{i}", "ab"[i % 2], "m", base + i * 61_001, 2.0) for i in range(60)])
print(store._writer.execute("SELECT count(*) FROM unfolded").fetchone()[0], flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""

# Opens a file of version 3 and is killed while event_times is being built from its index.
_DIE_WHILE_INDEXING = """
import os, signal, sys
from usagemeter.store.sqlite import SQLiteStore
build = SQLiteStore._time_folded_events
def killed(conn):
    conn.set_progress_handler(lambda: os.kill(os.getpid(), signal.SIGKILL), 20_000)
    build(conn)
SQLiteStore._time_folded_events = staticmethod(killed)
SQLiteStore(sys.argv[1])
print("not killed", flush=True)
"""


def _stored_events(path: Path) -> list[Event]:
    store = SQLiteStore(path)
    try:
        return list(store.iter_events())
    finally:
        store.close()


RAGGED = (
    Window(0, BASE_MS + 7, BASE_MS + SLOT_MS - 3),
    Window(1, BASE_MS + SLOT_MS - 3, BASE_MS + 5 * HOUR_MS + 1),
    Window(2, BASE_MS + 5 * HOUR_MS + 1, BASE_MS + DAY_MS + 12_345),
)


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120
    )


def test_a_file_of_version_3_finds_its_folded_and_waiting_events_by_time(db_path: Path) -> None:
    store = _open(db_path)
    store.append([Event(f"e{i}", "ab"[i % 2], "m", BASE_MS + i * 97_003, 1.0) for i in range(900)])
    store.close()
    done = _run(_APPEND_AND_DIE, str(db_path), str(BASE_MS + 11))
    assert done.returncode == -9 and done.stdout.strip() == "60"
    _rewrite_as_version_3(db_path)
    stored = _stored_events(db_path)  # opening it built event_times, and folded what waited
    names, version = _schema(db_path)
    assert names.get("event_times") == "table" and "events_ts" not in names
    assert version == SCHEMA_VERSION
    reopened = _open(db_path)
    entries, folded = _times(reopened._reader())
    assert entries == folded and len(entries) == 960
    for account in ACCOUNTS:
        assert _answer(reopened, account, "m", RAGGED) == _expected(stored, account, "m", RAGGED)
    reopened.close()


def test_a_sigkill_while_a_file_of_version_3_is_indexed_leaves_it_as_it_was(
    db_path: Path,
) -> None:
    store = _open(db_path)
    events = [Event(f"e{i}", "ab"[i % 2], "m", BASE_MS + i * 9_001, 1.0) for i in range(20_000)]
    store.append(events)
    store.close()
    _rewrite_as_version_3(db_path)
    done = _run(_DIE_WHILE_INDEXING, str(db_path))
    assert done.returncode == -9, done.stdout + done.stderr
    # Killed midway: the file is as version 3 left it, its index whole.
    names, version = _schema(db_path)
    assert names.get("events_ts") == "index" and "event_times" not in names
    assert version == INDEXED_EVERY_BATCH
    reopened = _open(db_path)  # builds it whole this time
    entries, folded = _times(reopened._reader())
    assert entries == folded and len(entries) == 20_000
    for account in ACCOUNTS:
        assert _answer(reopened, account, "m", RAGGED) == _expected(events, account, "m", RAGGED)
    reopened.close()


def test_retention_and_deletion_drop_their_events_entries_and_keep_the_others(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "IDLE_FOLD_SECONDS", 3600.0)
    store = _open(db_path)
    store.create_account(Account("c", "C"))
    first = [Event(f"e{i}", "abc"[i % 3], "m", BASE_MS + i * 59_999, 1.0) for i in range(300)]
    store.append(first)
    store.fold()
    waiting = [Event(f"w{i}", "abc"[i % 3], "m", BASE_MS + i * 60_001, 3.0) for i in range(300)]
    store.append(waiting)
    assert _waiting(store) == 300
    horizon = BASE_MS + 2 * HOUR_MS + 17
    dropped = [e for e in first + waiting if e.ts_ms < horizon]
    assert store.retain(horizon) == len(dropped)  # the waiting ones too, folded first
    store.delete_account("c")
    kept = [e for e in first + waiting if e.ts_ms >= horizon and e.account_id != "c"]
    entries, folded = _times(store._reader())
    assert entries == folded and len(entries) == len(kept)
    late = (
        Window(0, horizon, BASE_MS + 4 * HOUR_MS + 7),
        Window(1, BASE_MS + 4 * HOUR_MS + 7, BASE_MS + DAY_MS),
    )
    for account in ACCOUNTS:
        assert _answer(store, account, "m", late) == _expected(kept, account, "m", late)
    store.close()


def _spread(count: int, prefix: str = "e") -> list[Event]:
    return [
        Event(f"{prefix}{i}", ACCOUNTS[i % 2], METRICS[i % 3 % 2], BASE_MS + i * 997_003, 1.0)
        for i in range(count)
    ]


def _ragged(store: SQLiteStore, events: list[Event]) -> None:
    """Every account's and metric's answer over windows with ragged ends, as the reference."""
    windows = _windows([7, SLOT_MS + 5, HOUR_MS * 9 + 11, DAY_MS + 1, 2 * DAY_MS - 3])
    for account in ACCOUNTS:
        for metric in METRICS:
            expected = _expected(events, account, metric, windows)
            assert _answer(store, account, metric, windows) == expected


def _folded_file(db_path: Path, count: int) -> tuple[list[Event], sqlite3.Connection]:
    """A store's file holding ``count`` spread events, folded and closed, and a plain
    connection to it, to make it look as an older version left it."""
    store = _open(db_path)
    events = _spread(count)
    store.append(events)
    store.fold()
    store.close()
    return events, sqlite3.connect(db_path)


def test_a_file_of_version_5_opens_with_its_recent_cells_and_its_entries_at_one_level(
    db_path: Path,
) -> None:
    """Version 5 kept every entry by time in event_times: such a file opens as it is (its
    recent rollup cells kept, nothing rebuilt), and its folds then write recent entries."""
    events, conn = _folded_file(db_path, 200)
    cells = conn.execute("SELECT count(*) FROM rollup_recent").fetchone()[0]
    conn.execute("INSERT INTO event_times SELECT * FROM event_times_recent")
    conn.execute("DROP VIEW event_times_all")
    conn.execute("DROP TABLE event_times_recent")
    conn.execute(f"PRAGMA user_version = {TIMES_AT_ONE_LEVEL}")
    conn.commit()
    conn.close()
    reopened = _open(db_path)
    assert _scalar(reopened, "PRAGMA user_version") == SCHEMA_VERSION
    assert _scalar(reopened, "SELECT count(*) FROM rollup_recent") == cells
    assert _scalar(reopened, "SELECT count(*) FROM event_times") == 200
    _ragged(reopened, events)
    more = _spread(100, "f")
    reopened.append(more)
    reopened.fold()
    recent = _scalar(reopened, "SELECT count(*) FROM event_times_recent")
    assert recent == 100
    _ragged(reopened, [*events, *more])
    reopened.merge()
    assert _scalar(reopened, "SELECT count(*) FROM event_times") == 300
    _ragged(reopened, [*events, *more])
    reopened.close()


def test_a_file_version_5_opened_after_this_one_drops_its_recent_entries(db_path: Path) -> None:
    """Version 5, opening a file of this one, builds event_times again from every folded
    event (it knows no recent entries) and leaves the recent ones behind: opened here
    again, they are dropped rather than found twice."""
    events, conn = _folded_file(db_path, 150)
    assert conn.execute("SELECT count(*) FROM event_times_recent").fetchone()[0] == 150
    conn.execute("DELETE FROM event_times")  # what version 5 did: every folded event's entry
    conn.execute(
        "INSERT INTO event_times SELECT ts, metric, account, seq FROM events"
        " WHERE seq <= (SELECT seq FROM folded)"
    )
    conn.execute(f"PRAGMA user_version = {TIMES_AT_ONE_LEVEL}")
    conn.commit()
    conn.close()
    reopened = _open(db_path)
    assert _scalar(reopened, "SELECT count(*) FROM event_times_recent") == 0
    _ragged(reopened, events)
    reopened.close()
