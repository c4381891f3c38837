"""The embedded store's rollups at two levels: the fold writes a level of recent cells, a
merge moves them into the big tables a step at a time. Every question reads both levels and
the waiting events in one statement, so each event counts once whatever level it is in, the
latest value across levels is the later event's; voids, amends, retention and deletions see
and correct both; a SIGKILL during a merge loses nothing and counts nothing twice; a file of
the version before opens with an empty recent level."""

from __future__ import annotations

import itertools
import os
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from msgspec.structs import replace

from tests.reference import fold_cells
from usagemeter.auth import issue_key
from usagemeter.corrections import Amendment, VoidSelector
from usagemeter.model import Account, Event, Scope
from usagemeter.store import sqlite as sqlite_module
from usagemeter.store.base import TOTAL, AggregateSpec, Measure, Window
from usagemeter.store.schema import MERGE_ALL, ONE_LEVEL, ROLLUP_TABLES, SCHEMA_VERSION
from usagemeter.store.sqlite import SQLiteStore
from usagemeter.timewindows import Granularity, bucket_edges, parse_zone

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
# Two stretches of three days: New York springs forward on 2025-03-09 (07:00 UTC), Lord
# Howe falls back half an hour on 2025-04-06 (15:00 UTC the day before); Kathmandu is +05:45.
BASES = (1_741_392_000_000, 1_743_724_800_000)  # 2025-03-08 and 2025-04-04, 00:00 UTC
SPAN_MS = 3 * DAY_MS
ZONES = ("America/New_York", "Asia/Kathmandu", "Australia/Lord_Howe", "UTC")
MEASURES = tuple(Measure(a) for a in ("count", "sum", "min", "max", "latest"))
ACCOUNTS = ("a", "b")
# Few distinct times, so that latest values tie within a cell split between the levels;
# on slot, hour and day edges, a millisecond off them, and anywhere.
EDGES = (0, 1, 15 * 60_000 - 1, 15 * 60_000, HOUR_MS, 31 * HOUR_MS + 45 * 60_000, DAY_MS - 1)
TIMES = st.tuples(
    st.sampled_from(BASES), st.one_of(st.sampled_from(EDGES), st.integers(0, SPAN_MS - 1))
).map(sum)


def to_one_level(conn: sqlite3.Connection) -> None:
    """Change a file as the version before (4) left it: every cell in the big rollups, no
    recent level."""
    for statement in MERGE_ALL:
        conn.execute(statement)
    for table in ROLLUP_TABLES:
        conn.execute(f"DROP TABLE {table}_recent")
    conn.execute("DROP TABLE recent_events")
    conn.execute("INSERT INTO event_times SELECT * FROM event_times_recent")
    conn.execute("DROP VIEW event_times_all")
    conn.execute("DROP TABLE event_times_recent")
    conn.execute(f"PRAGMA user_version = {ONE_LEVEL}")
    conn.commit()


def _open(path: Path) -> SQLiteStore:
    store = SQLiteStore(path)
    known = {a.id for a in store.list_accounts()}
    for account in ACCOUNTS:
        if account not in known:
            store.create_account(Account(account, account.upper()))
            issue_key(store, account, key_id=f"k{account}", scopes=[Scope.READ])
    return store


def _in_cell(n: int, account: str, at: int, value: float) -> Event:
    """The event ``e<n>``, in one of several cells by its number: two dimension sets, with a
    key or without, a tag or none. Events at one millisecond then tie across cells, in a
    question that folds their rows together (a slot's sets, an hour's keys)."""
    return Event(
        f"e{n}",
        account,
        "m",
        at,
        value,
        key_id=f"k{account}" if n % 4 >= 2 else None,
        dimensions={"status": str(n % 2)},
        tags=frozenset({"x"}) if n % 3 == 0 else frozenset(),
    )


def _scalar(store: SQLiteStore, sql: str) -> Any:
    """One value read on the writer's connection under its lock, as the store reads it: the
    committer's thread may be folding or merging on that connection meanwhile."""
    with store._write_lock:
        return store._writer.execute(sql).fetchone()[0]


def _cells(store: SQLiteStore, level: str) -> int:
    return int(_scalar(store, f"SELECT count(*) FROM rollup{level}"))


def _windows(zone: str, granularity: Granularity, start: int, end: int) -> tuple[Window, ...]:
    _, edges = bucket_edges(
        datetime.fromtimestamp(start / 1000, UTC),
        datetime.fromtimestamp(end / 1000, UTC),
        granularity,
        parse_zone(zone),
    )
    return tuple(Window(i, lo, hi) for i, (lo, hi) in enumerate(itertools.pairwise(edges)))


def _answer(
    store: SQLiteStore,
    account: str,
    windows: tuple[Window, ...],
    metric: str = "m",
    tags: frozenset[str] = frozenset(),
) -> dict:
    spec = AggregateSpec((account,), metric, windows, MEASURES, totals=True, tags=tags)
    return {row.window: row.values for row in store.aggregate(spec)}


def _expected(
    events: list[Event],
    account: str,
    windows: tuple[Window, ...],
    metric: str = "m",
    tags: frozenset[str] = frozenset(),
) -> dict:
    """Folding the stored events one by one in the order they were stored."""
    return fold_cells(
        events,
        windows,
        lambda e: e.account_id == account and e.metric == metric and tags <= e.tags,
    )


_event = st.tuples(
    st.sampled_from(ACCOUNTS),
    TIMES,
    st.integers(-3, 9),
    st.integers(0, 40),  # value, id (which also places the event in a cell: _in_cell)
)
_question = st.tuples(
    st.sampled_from(ZONES),
    st.sampled_from([Granularity.HOUR, Granularity.DAY, Granularity.TOTAL]),
    TIMES,
    st.integers(1, SPAN_MS),
)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.lists(_event, min_size=1, max_size=10)),
        st.tuples(st.just("fold"), st.just(())),
        st.tuples(st.just("merge step"), st.just(())),
        st.tuples(st.just("merge"), st.just(())),
        st.tuples(st.just("merge dense"), st.just(())),
        st.tuples(st.just("ask"), _question),
        st.tuples(st.just("void ids"), st.lists(st.integers(0, 100), min_size=1, max_size=3)),
        st.tuples(st.just("void range"), st.tuples(TIMES, st.integers(1, DAY_MS))),
        st.tuples(st.just("amend"), st.tuples(st.integers(0, 100), st.integers(-3, 9))),
    ),
    min_size=1,
    max_size=20,
)


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=steps,
    step_cells=st.sampled_from([1, 3, 10**9]),
    dense_hours=st.sampled_from([1, 2, 10**9]),
)
# One cell split between the levels, its two events at one millisecond, and a third waiting
# at it too: the later event's value is the latest, each counted once.
@example(
    steps=[
        ("append", [("a", BASES[0] + 7, 5, 1)]),
        ("fold", ()),
        ("merge", ()),
        ("append", [("a", BASES[0] + 7, 2, 2)]),
        ("fold", ()),
        ("append", [("a", BASES[0] + 7, 4, 3)]),
        ("ask", ("UTC", Granularity.HOUR, BASES[0], HOUR_MS)),
        ("fold", ()),
        ("ask", ("UTC", Granularity.HOUR, BASES[0], HOUR_MS)),
    ],
    step_cells=10**9,
    dense_hours=10**9,
)
# A dense account's cells merged alone while another's wait, a cell of it then split between
# the levels at one millisecond, and a merge step after: each counted once, the later latest.
@example(
    steps=[
        ("append", [("a", BASES[0] + 7, 5, 1), ("b", BASES[0] + 7, 1, 5)]),
        ("fold", ()),
        ("merge", ()),
        ("append", [("a", BASES[0] + 7, 2, 2), ("a", BASES[0] + HOUR_MS, 3, 4)]),
        ("fold", ()),
        ("merge dense", ()),
        ("ask", ("Asia/Kathmandu", Granularity.HOUR, BASES[0], DAY_MS)),
        ("append", [("a", BASES[0] + 7, 4, 3)]),
        ("merge step", ()),
        ("ask", ("UTC", Granularity.DAY, BASES[0], DAY_MS)),
    ],
    step_cells=1,
    dense_hours=2,
)
# A merge cut after its first accounts: b's cells wait in the recent level, a's are big.
@example(
    steps=[
        ("append", [("a", BASES[1], 1, 1), ("b", BASES[1] + 1, 2, 2)]),
        ("fold", ()),
        ("append", [("a", BASES[1] + 1, 3, 3), ("b", BASES[1], 4, 4)]),
        ("fold", ()),
        ("merge step", ()),
        ("ask", ("Australia/Lord_Howe", Granularity.DAY, BASES[1], SPAN_MS)),
    ],
    step_cells=1,
    dense_hours=10**9,
)
def test_questions_read_both_levels_and_the_waiting_events_as_the_reference(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    steps: list[tuple[str, object]],
    step_cells: int,
    dense_hours: int,
) -> None:
    monkeypatch.setattr(sqlite_module, "FOLD_EVENTS", 10**9)
    monkeypatch.setattr(sqlite_module, "DENSE_HOURS", dense_hours)
    monkeypatch.setattr(sqlite_module, "IDLE_FOLD_SECONDS", 3600.0)
    monkeypatch.setattr(sqlite_module, "MERGE_STEP", step_cells)
    monkeypatch.setattr(sqlite_module, "MERGE_TIMES_STEP", step_cells)
    monkeypatch.setattr(sqlite_module, "DENSE_STEP", 1)  # each dense pair its own step
    store = _open(tmp_path / f"levels-{os.urandom(4).hex()}.db")
    stored: list[Event] = []  # in the order stored: a replacement after every other
    taken: set[tuple[str, str]] = set()
    amends = 0
    final = ("ask", ("America/New_York", Granularity.DAY, BASES[0], BASES[1] + SPAN_MS - BASES[0]))
    for action, arg in [*steps, final, ("fold", ()), final, ("merge", ()), final]:
        if action == "append":
            batch = {
                (account, f"e{n}"): _in_cell(n, account, at, float(v))
                for account, at, v, n in arg  # type: ignore[attr-defined]
            }
            store.append(list(batch.values()))
            stored.extend(e for ident, e in batch.items() if ident not in taken)
            taken.update(batch)
        elif action == "fold":
            store.fold()
        elif action == "merge step":
            store.merge_step()
        elif action == "merge":
            store.merge()
            assert _cells(store, "_recent") == 0
        elif action == "merge dense":
            slots = _cells(store, "_recent")
            store.merge_dense()
            if dense_hours == 1:  # every account with a recent hour is dense
                for table in ROLLUP_TABLES:
                    assert _scalar(store, f"SELECT count(*) FROM {table}_recent") == 0
            elif dense_hours == 10**9:
                assert _cells(store, "_recent") == slots
        elif action == "ask":
            zone, granularity, start, length = arg  # type: ignore[misc]
            windows = _windows(zone, granularity, start, start + length)
            for account in ACCOUNTS:
                assert _answer(store, account, windows) == _expected(stored, account, windows)
            # The slots alone, of every dimension set and key, and the raw ends beside them.
            tagged = frozenset({"x"})
            assert _answer(store, "a", windows, tags=tagged) == _expected(
                stored, "a", windows, tags=tagged
            )
        elif action == "void ids":
            mine = [e for e in stored if e.account_id == "a"]
            ids = tuple(dict.fromkeys(mine[i % len(mine)].id for i in arg)) if mine else ()  # type: ignore[attr-defined]
            if ids:
                store.void_events(VoidSelector("a", ids=ids), "wrong", None, 0)
                stored = [e for e in stored if not (e.account_id == "a" and e.id in ids)]
        elif action == "void range":
            lo, length = arg  # type: ignore[misc]
            selector = VoidSelector("a", metric="m", start_ms=lo, end_ms=lo + length)
            if any(e.account_id == "a" and lo <= e.ts_ms < lo + length for e in stored):
                store.void_events(selector, "wrong", None, 0)
                stored = [
                    e for e in stored if not (e.account_id == "a" and lo <= e.ts_ms < lo + length)
                ]
        elif action == "amend":
            index, value = arg  # type: ignore[misc]
            mine = [e for e in stored if e.account_id == "a"]
            if mine:
                old = mine[index % len(mine)]
                new_id = f"r{amends}"
                amends += 1
                amend = Amendment(float(value), new_id=new_id)
                store.void_events(VoidSelector("a", ids=(old.id,)), "fix", None, 0, amend)
                stored.remove(old)
                stored.append(replace(old, id=new_id, value=float(value)))  # stored last
                taken.add(("a", new_id))
    store.close()


def test_a_merge_moves_every_cell_once_and_the_answers_stay(db_path: Path) -> None:
    """Folded runs gather in the recent level; a merge in steps empties it into the big
    tables, each cell counted once (the cells of both levels add up to the same answers)."""
    store = _open(db_path)
    events = [
        Event(f"e{i}", ACCOUNTS[i % 2], "m", BASES[0] + (i * 7_919_993) % SPAN_MS, float(i % 5))
        for i in range(600)
    ]
    windows = _windows("Asia/Kathmandu", Granularity.HOUR, BASES[0], BASES[0] + SPAN_MS)
    store.append(events[:300])
    store.fold()
    store.merge()
    store.append(events[300:])
    store.fold()
    assert _cells(store, "") > 0 and _cells(store, "_recent") > 0
    before = {a: _answer(store, a, windows) for a in ACCOUNTS}
    assert before == {a: _expected(events, a, windows) for a in ACCOUNTS}
    assert _scalar(store, "SELECT events FROM recent_events") == 300
    steps = 1
    while not store.merge_step():
        steps += 1
    assert _cells(store, "_recent") == 0
    assert _scalar(store, "SELECT events FROM recent_events") == 0
    assert {a: _answer(store, a, windows) for a in ACCOUNTS} == before
    for table in ROLLUP_TABLES:
        count = _scalar(store, f"SELECT sum(cnt) FROM {table}")
        assert count == 600, table
    store.close()


def test_the_committer_merges_once_the_recent_level_is_full(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "FOLD_EVENTS", 100)
    monkeypatch.setattr(sqlite_module, "MERGE_EVENTS", 250)
    monkeypatch.setattr(sqlite_module, "MERGE_STEP", 20)
    store = _open(db_path)
    events = [
        Event(f"e{i}", ACCOUNTS[i % 2], "m", BASES[1] + (i * 7_919_993) % SPAN_MS, 1.0)
        for i in range(1000)
    ]
    windows = _windows("UTC", Granularity.DAY, BASES[1], BASES[1] + SPAN_MS)
    for n in range(0, 1000, 50):
        store.append(events[n : n + 50])
        for account in ACCOUNTS:  # read-your-writes, whatever the committer is doing
            expected = _expected(events[: n + 50], account, windows)
            assert _answer(store, account, windows) == expected
    store.close()  # a merge under way goes on when the file is opened again
    reopened = _open(db_path)
    reopened.fold()
    reopened.merge()
    assert _cells(reopened, "") > 0 and _cells(reopened, "_recent") == 0
    assert _scalar(reopened, "SELECT sum(cnt) FROM rollup") == 1000
    reopened.close()


def test_the_committer_merges_a_dense_accounts_cells_once_appends_pause(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Account a's hours pass DENSE_HOURS, b's do not: after the fold of a pause, a's cells
    are in the big tables alone, b's still in the recent level; a question about a reads the
    big tables alone, one about b both levels, and both answer as the reference."""
    monkeypatch.setattr(sqlite_module, "IDLE_FOLD_SECONDS", 0.02)
    monkeypatch.setattr(sqlite_module, "DENSE_HOURS", 20)
    store = _open(db_path)
    events = [Event(f"a{i}", "a", "m", BASES[0] + i * HOUR_MS + i, 1.0) for i in range(60)]
    events += [Event(f"b{i}", "b", "m", BASES[0] + i * HOUR_MS, 2.0) for i in range(5)]
    events += [Event(f"c{i}", "a", "m", BASES[0] + i * HOUR_MS + i, 3.0) for i in range(60)]
    store.append(events)
    recent: dict[str, int] = {}
    deadline = time.monotonic() + 30
    while recent != {"b": 5}:  # folded, then a's cells merged: two steps of the committer
        assert time.monotonic() < deadline, f"never merged a's cells alone: {recent}"
        time.sleep(0.01)
        with store._write_lock:
            recent = dict(
                store._writer.execute(
                    "SELECT a.id, count(*) FROM rollup_hour_recent r"
                    " JOIN accounts a ON a.rid = r.account GROUP BY a.id"
                ).fetchall()
            )
    with store._write_lock:
        metric = store._writer.execute("SELECT id FROM metrics WHERE name = 'm'").fetchone()[0]
        rids = dict(store._writer.execute("SELECT id, rid FROM accounts").fetchall())
        of = {a: store._recent_of(store._writer, metric, [rids[a]]) for a in ACCOUNTS}
    assert recent == {"b": 5}
    assert _cells(store, "_recent") == 5
    assert of == {"a": False, "b": True}
    windows = _windows("Asia/Kathmandu", Granularity.DAY, BASES[0], BASES[0] + SPAN_MS)
    for account in ACCOUNTS:
        assert _answer(store, account, windows) == _expected(events, account, windows)
    store.close()


def test_a_batch_arriving_during_the_dense_merge_commits_between_its_steps(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Account a is dense in four metrics: the merge at the pause moves them a pair a step
    (DENSE_STEP), and a batch sent during its first step is committed, acknowledged, before
    its last; the merge still moves every dense cell, and the answers stay the reference's."""
    monkeypatch.setattr(sqlite_module, "IDLE_FOLD_SECONDS", 0.02)
    monkeypatch.setattr(sqlite_module, "DENSE_HOURS", 20)
    monkeypatch.setattr(sqlite_module, "DENSE_STEP", 1)
    store = _open(db_path)
    metrics = ("m", "n", "o", "p")
    events = [
        Event(f"{metric}{i}", "a", metric, BASES[0] + i * HOUR_MS + i, 1.0)
        for metric in metrics
        for i in range(30)
    ]
    late = [Event("late", "b", "m", BASES[0] + 5, 7.0)]
    done: list[str] = []
    sent: list[Any] = []
    merge_pairs, commit_group = store.merge_pairs, store._commit_group

    def step(pairs: Any) -> None:
        if not sent:  # a batch arriving while the first step holds the writer
            sent.append(store.submit(late))
        merge_pairs(pairs)
        done.append("step")

    def group(batches: Any) -> None:
        commit_group(batches)
        if sent:  # the late batch's group, not the first
            done.append("group")

    monkeypatch.setattr(store, "merge_pairs", step)
    monkeypatch.setattr(store, "_commit_group", group)
    store.append(events)
    deadline = time.monotonic() + 30
    while done.count("step") < len(metrics):
        assert time.monotonic() < deadline, f"the dense merge never ended: {done}"
        time.sleep(0.01)
    assert done.index("group") < len(done) - 1, done  # between two steps, not after all
    assert sent[0].result(timeout=10).accepted == 1
    a_left = "SELECT count(*) FROM rollup_hour_recent r JOIN accounts a ON a.rid = r.account"
    assert _scalar(store, f"{a_left} WHERE a.id = 'a'") == 0
    windows = _windows("America/New_York", Granularity.DAY, BASES[0], BASES[0] + SPAN_MS)
    for account in ACCOUNTS:
        for metric in metrics:
            expected = _expected([*events, *late], account, windows, metric)
            assert _answer(store, account, windows, metric) == expected
    store.close()


def test_a_quiet_store_merges_its_recent_level_and_answers_from_the_big_tables(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "IDLE_FOLD_SECONDS", 0.02)
    monkeypatch.setattr(sqlite_module, "QUIET_MERGE_SECONDS", 0.1)
    store = _open(db_path)
    events = [Event(f"e{i}", "a", "m", BASES[0] + i * 900_007, float(i % 4)) for i in range(300)]
    windows = _windows("Asia/Kathmandu", Granularity.DAY, BASES[0], BASES[0] + SPAN_MS)
    store.append(events)
    assert _answer(store, "a", windows) == _expected(events, "a", windows)
    deadline = time.monotonic() + 20
    while (_cells(store, "_recent") or not _cells(store, "")) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _cells(store, "_recent") == 0 and _cells(store, "") > 0
    assert _answer(store, "a", windows) == _expected(events, "a", windows)
    store.close()


def test_deleting_an_account_and_retention_see_both_levels(db_path: Path) -> None:
    store = _open(db_path)
    events = [
        Event(f"e{i}", ACCOUNTS[i % 2], "m", BASES[0] + (i * 7_919_993) % SPAN_MS, 2.0)
        for i in range(200)
    ]
    store.append(events[:100])
    store.fold()
    store.merge()
    store.append(events[100:])
    store.fold()
    # Retention drops raw events, folded in either level, and keeps their rollups.
    horizon = BASES[0] + DAY_MS
    windows = _windows("UTC", Granularity.HOUR, BASES[0], BASES[0] + SPAN_MS)
    before = _answer(store, "a", windows)
    dropped = store.retain(horizon)
    assert dropped == sum(1 for e in events if e.ts_ms < horizon)
    assert store.count_events() == 200 - dropped
    assert _answer(store, "a", windows) == before
    counts = store.delete_account("b")
    assert counts["rollup"] > 0 and counts["rollup_recent"] > 0
    for table in ROLLUP_TABLES:
        for level in ("", "_recent"):
            left = _scalar(
                store,
                f"SELECT count(*) FROM {table}{level} WHERE account NOT IN"
                " (SELECT rid FROM accounts)",
            )
            assert left == 0, table + level
    assert _answer(store, "a", windows) == before
    store.close()


# Fills both levels, then dies in the middle of a merge: its first step committed, the
# second killed inside its transaction.
_MERGE_AND_DIE = """
import os, signal, sys
from usagemeter.model import Account, Event
from usagemeter.store import schema, sqlite as sqlite_module
from usagemeter.store.sqlite import SQLiteStore
sqlite_module.MERGE_STEP = 5
store = SQLiteStore(sys.argv[1])
for account in ("a", "b"):
    store.create_account(Account(account, account.upper()))
base, span = int(sys.argv[2]), 3 * 86_400_000
store.append([Event(f"e{i}", "ab"[i % 2], "m", base + (i * 7_919_993) % span, 1.5)
              for i in range(400)])
store.fold()
store.merge()
store.append([Event(f"f{i}", "ab"[i % 2], "m", base + (i * 3_999_971) % span, 2.5)
              for i in range(400)])
store.fold()
assert not store.merge_step()
kill = schema.MERGE_UP_TO[3]  # after the slots and key hours moved, inside the transaction
real = store._writer
class Dying:
    def __getattr__(self, name):
        return getattr(real, name)
    def execute(self, sql, *args):
        if sql == kill:
            print("killed", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return real.execute(sql, *args)
store._writer = Dying()
store.merge_step()
"""


def test_a_sigkill_mid_merge_loses_nothing_and_counts_nothing_twice(db_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _MERGE_AND_DIE, str(db_path), str(BASES[0])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == -9 and done.stdout.strip() == "killed", done.stderr
    store = _open(db_path)
    assert _cells(store, "_recent") > 0  # the merge was cut short; opening resumes it
    windows = _windows("America/New_York", Granularity.DAY, BASES[0], BASES[0] + SPAN_MS)
    for account in ACCOUNTS:
        totals = _answer(store, account, windows)[TOTAL]
        assert totals[:2] == (400, 400 * 2.0)  # 200 of 1.5 and 200 of 2.5 each
    for table in ROLLUP_TABLES:
        both = sum(
            _scalar(store, f"SELECT coalesce(sum(cnt), 0) FROM {table}{lv}")
            for lv in ("", "_recent")
        )
        assert both == 800, table
    store.merge()
    assert _cells(store, "_recent") == 0
    for account in ACCOUNTS:
        assert _answer(store, account, windows)[TOTAL][:2] == (400, 800.0)
    store.close()


def test_a_file_of_the_version_before_opens_with_an_empty_recent_level(db_path: Path) -> None:
    store = _open(db_path)
    events = [
        Event(f"e{i}", ACCOUNTS[i % 2], "m", BASES[1] + (i * 7_919_993) % SPAN_MS, float(i % 3))
        for i in range(300)
    ]
    store.append(events)
    store.fold()
    store.close()
    conn = sqlite3.connect(db_path)
    to_one_level(conn)
    conn.close()
    reopened = _open(db_path)
    version = _scalar(reopened, "PRAGMA user_version")
    assert version == SCHEMA_VERSION
    assert _cells(reopened, "_recent") == 0 and _cells(reopened, "") > 0
    windows = _windows("Australia/Lord_Howe", Granularity.HOUR, BASES[1], BASES[1] + SPAN_MS)
    for account in ACCOUNTS:
        assert _answer(reopened, account, windows) == _expected(events, account, windows)
    more = [Event(f"f{i}", "a", "m", BASES[1] + i * 61_001, 1.0) for i in range(50)]
    reopened.append(more)
    reopened.fold()
    assert _cells(reopened, "_recent") > 0
    assert _answer(reopened, "a", windows) == _expected([*events, *more], "a", windows)
    reopened.close()


def test_a_file_an_older_version_rebuilt_drops_its_recent_cells(db_path: Path) -> None:
    """An older version opening a file of this one rebuilds the big rollups from the events,
    the recent cells' included (it knows no recent level): opened here again, the recent
    level is emptied rather than counted a second time."""
    store = _open(db_path)
    events = [Event(f"e{i}", "a", "m", BASES[0] + i * 600_001, 1.0) for i in range(100)]
    store.append(events)
    store.fold()
    assert _cells(store, "_recent") > 0
    store.rebuild_rollups()  # what the older version did: the big tables from the events
    with store._write_lock:
        store._writer.execute("INSERT INTO rollup_recent SELECT * FROM rollup")  # left behind
        store._writer.execute(f"PRAGMA user_version = {ONE_LEVEL}")
    store.close()
    reopened = _open(db_path)
    assert _cells(reopened, "_recent") == 0
    windows = _windows("UTC", Granularity.TOTAL, BASES[0], BASES[0] + SPAN_MS)
    assert _answer(reopened, "a", windows)[TOTAL][0] == 100
    reopened.close()


def without_latest_seqs(conn: sqlite3.Connection) -> None:
    """Change a file as the code before seqs were kept left it: no ``last_seq`` column in
    any rollup, at either level (the schema version is the same)."""
    for table in ROLLUP_TABLES:
        for level in ("", "_recent"):
            conn.execute(f"ALTER TABLE {table}{level} DROP COLUMN last_seq")
    conn.commit()


def test_a_file_without_latest_seqs_gains_them_and_its_rows_rank_as_earliest(
    db_path: Path,
) -> None:
    """A file written before rollup rows kept their latest event's seq opens with the
    column added (0 in its rows); they rank as the earliest event at their timestamp: a
    later event of another cell at that millisecond wins, one a millisecond before loses,
    in every question, in both levels and after a merge."""
    at = BASES[0] + 7
    store = _open(db_path)
    store.append([_in_cell(1, "a", at, 5.0), _in_cell(4, "b", at, 5.0)])  # big level
    store.fold()
    store.merge()
    store.append([_in_cell(5, "a", at + HOUR_MS, 6.0)])  # recent level
    store.fold()
    store.close()
    conn = sqlite3.connect(db_path)
    without_latest_seqs(conn)
    conn.close()
    reopened = _open(db_path)
    for table in ROLLUP_TABLES:
        for level in ("", "_recent"):
            ranked = f"SELECT count(*) FROM pragma_table_info('{table}{level}')"
            assert _scalar(reopened, ranked + " WHERE name = 'last_seq'") == 1
    stored = [_in_cell(1, "a", at, 5.0), _in_cell(4, "b", at, 5.0)]
    stored.append(_in_cell(5, "a", at + HOUR_MS, 6.0))
    # Other cells (key, dimension set, tag) of the same milliseconds, and a millisecond before.
    later = [
        _in_cell(2, "a", at, 9.0),
        _in_cell(3, "b", at - 1, 8.0),
        _in_cell(6, "a", at + HOUR_MS, 7.0),
    ]
    reopened.append(later)
    stored.extend(later)
    windows = _windows("Asia/Kathmandu", Granularity.DAY, BASES[0] - DAY_MS, BASES[0] + DAY_MS)
    hours = _windows("UTC", Granularity.HOUR, BASES[0], BASES[0] + 2 * HOUR_MS)
    for stage in ("waiting", "folded", "merged"):
        for account in ACCOUNTS:
            for shape in (windows, hours):
                assert _answer(reopened, account, shape) == _expected(stored, account, shape), stage
        assert _answer(reopened, "a", hours)[TOTAL][4] == 7.0
        assert _answer(reopened, "b", hours)[TOTAL][4] == 5.0
        reopened.fold() if stage == "waiting" else reopened.merge()
    reopened.close()
