"""The SQLite adapter: the embedded default store (its tables: schema.py; its queries:
sqlplan.py).

One writer connection serialises writes (``BEGIN IMMEDIATE``); one committer thread writes
the batches callers queue, many in one commit (group commit). Callers build their batches'
rows from cached row ids before queueing them, so that the one writer's time goes to SQL,
and rows of ids never seen go in without a lookup first. A batch appends its events
(and the dedupe index entries), and a copy of them in ``unfolded``, and nothing else:
``synchronous=FULL`` makes that commit durable before ``append`` returns. The rollups catch
up in long runs (``fold``: when appends pause, or once many events wait), so a rollup page
is written once per run instead of once per batch; meanwhile every question reads the
rollups and the waiting events together (sqlplan's ``pending``), so an acknowledged event
is in the next answer of every endpoint without a question waiting for a fold. The fold is
one transaction that moves the ``folded`` mark with the rollups it wrote, writes the run's
entries by time (the recent level of ``event_times``) and empties ``unfolded``: a crash
loses no event and counts none twice. The fold writes the rollups' level of recent cells;
once it holds MERGE_EVENTS events, the committer merges it into the big rollups a step at
a time between groups (``merge_step``), each step one transaction; once appends pause, it
merges a dense account's cells alone, a few pairs a step between groups (``merge_pairs``).
Readers use their own per-thread connections beside it (WAL).
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from usagemeter.model import (
    Account,
    ApiKey,
    AppendResult,
    Event,
    PortalToken,
)
from usagemeter.store import portalrows
from usagemeter.store.base import (
    AggregateRow,
    AggregateSpec,
    Conflict,
    KeyRevoked,
    NotFound,
    StoreUnavailable,
)
from usagemeter.store.limitstore import LimitTables, Run
from usagemeter.store.rows import (
    ACCOUNT_COLUMNS,
    ACCOUNT_SELECT,
    KEY_COLUMNS,
    KEY_SELECT,
    account_from_row,
    account_values,
    key_from_row,
    key_values,
    row_ids_stale,
)
from usagemeter.store.schema import (
    COPY_UNFOLDED,
    DENSE_ACCOUNTS,
    EVENT_TIMES,
    FOLDED_EVERY_BATCH,
    GONE_TIMES,
    INDEXED_EVERY_BATCH,
    MERGE_ALL,
    MERGE_DENSE,
    MERGE_TIMES_ALL,
    MERGE_TIMES_UP_TO,
    MERGE_UP_TO,
    ONE_LEVEL,
    ROLLUP_COLUMNS,
    ROLLUP_TABLES,
    SCHEMA,
    SCHEMA_VERSION,
    TIME_EVENTS,
    TIMED_BEFORE,
    TIMED_BETWEEN,
    TIMES_AT_ONE_LEVEL,
    TIMES_BOUND,
    UNTIME_GONE,
    add_latest_seqs,
    fold_events,
    fold_selected,
)
from usagemeter.store.sidefile import sqlite_transaction
from usagemeter.store.sqlplan import (
    RECENT,
    SQLITE,
    SQLITE_MERGED,
    event_from_row,
    plan_aggregate,
    plan_export,
    plan_touched,
    run_plans,
)
from usagemeter.store.voidsql import SqlCorrections

log = logging.getLogger("usagemeter")
NO_KEY = 0  # rowid 0 is never assigned, so it stands for "the event named no key"
PAIR_CHUNK = 2000  # (account, id) pairs per dedupe lookup: 4,000 variables, under the limit
# Fold the rollups once this many events wait: large enough that a burst is stored at the
# rate of its appends and that a run updates each busy rollup row once for many batches,
# small enough that a question reading the waiting events of its range stays quick.
FOLD_EVENTS = 200_000
IDLE_FOLD_SECONDS = 0.5  # appends paused this long: fold what waits
# Merge the rollups' recent level into the big tables (schema.py) once it holds this many
# events: the more runs a merge gathers, the more cells each big page it rewrites takes at
# once, but the larger the recent level (past the writer's cache, each fold dirties more of
# it) and the more a question reads twice.
MERGE_EVENTS = 1_000_000
# Cells of the recent ``rollup`` one step of a merge moves (with the same accounts' cells of
# the other rollups), in one transaction: a merge holds the writer a step at a time, and
# batches waiting meanwhile commit between steps.
MERGE_STEP = 100_000
# Entries of the recent ``event_times_recent`` one step of a merge moves (those of the
# earliest times), in one transaction, once the rollups' steps are done: spread over 120
# days, 100,000 of them rewrite about a tenth of the big table's pages.
MERGE_TIMES_STEP = 100_000
# Appends paused this long: merge the recent level, whatever it holds. A question reads the
# recent level only while it holds cells of its metric and accounts, and then costs more (a
# 90-day report of the heavy account of a store of 10M, with 900,000 events in the recent
# level: 2 to 2.5 times the store's time, until ``merge_dense``); a quiet store answers as
# one without levels. Long enough that a backfill sent in bursts is not merged after each
# (a merge rewrites most pages of the big tables).
QUIET_MERGE_SECONDS = 30.0
# Once appends pause, the cells of each dense (metric, account) are merged alone
# (``merge_dense``): one with at least an hour in the recent level for every DENSE_SHARE
# events the level holds, and at least DENSE_HOURS. Why: while nothing waits, a question
# reads the big tables alone unless the recent level holds cells of its metric and accounts,
# and reading two levels cost the heavy account's reports 1.2 to 1.5 times as much; the
# heavy accounts' cells of a backfill of 900,000 into 10M (a third of the level) lie on few
# big pages each (the heaviest's hours of 120 days on about 45), so they merge cheaply. Not
# after each full run: while events wait a question reads both levels anyway, and merging
# then slowed a backfill's acknowledgements by a fifth.
DENSE_SHARE = 1_000
DENSE_HOURS = 200
# Dense pairs one step of that merge moves, in one transaction; the committer takes the
# batches waiting meanwhile between steps. Why: in one transaction, the 102 pairs of a
# backfill of 900,000 into 10M held the writer 4.5 s, and a batch that arrived then waited
# all of it; a step of 8 such pairs takes 0.1 to 0.6 s (the heavy account's first), its
# commit sometimes carrying a checkpoint, as any commit may.
DENSE_STEP = 8
# Kept row ids looked up again once expired (a few statements, a few ms a second); above
# this many, forgotten instead, as looking them all up would cost more than it saves.
REFRESH_AT_MOST = 20_000
# How long a thread holding the GIL runs before one that waits for it may ask for it. The
# committer gives the GIL up for each statement and takes it back after; when request
# threads run Python meanwhile (decoding and checking the next batches), taking it back
# waits this long, unless the holder blocks first: at CPython's 5 ms, the few statements of
# a group waited longer than they ran. A process-wide setting, only ever lowered here.
SWITCH_INTERVAL = 0.0005


def _disk_full(error: BaseException | None) -> bool:
    """True if ``error`` or one it arose from is SQLite's SQLITE_FULL. The chain matters:
    when the disk fills mid-batch, SQLite may roll the whole transaction back, and the
    savepoint rollback that follows fails with an error of its own."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, sqlite3.Error) and (
            getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
            or "database or disk is full" in str(error)
        ):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def _now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)


_K = TypeVar("_K")  # how a name is known: its text, its items, its set of tags
# What a repeated id is compared on: metric, ts, value, billable, key, dimensions, tags.
_Payload = tuple[str, int, float, bool, str | None, dict[str, str], frozenset[str]]


_DimsKey = tuple[tuple[str, str], ...]  # a dimension set, as cached: its items by name


def _cached_dimset(cache: dict[_DimsKey, int], event: Event) -> int | None:
    """The cached id of ``event``'s dimension set. Sets are cached by their sorted items; a
    set sent in sorted order (every set of one, and most others) is found without sorting."""
    items = tuple(event.dimensions.items())
    found = cache.get(items)
    return found if found is not None else cache.get(tuple(sorted(items)))


def _dims_key(event: Event) -> _DimsKey:
    return tuple(sorted(event.dimensions.items()))


def _dims_text(key: _DimsKey) -> str:
    """How ``dimsets`` stores a dimension set: JSON, sorted by name."""
    return json.dumps(dict(key), separators=(",", ":"))


def _tags_text(tags: frozenset[str]) -> str:
    """How ``tagsets`` stores a tag set: a sorted JSON list."""
    return json.dumps(sorted(tags), separators=(",", ":"))


# Names per statement that finds or makes their ids: under SQLite's limit of variables.
NAME_CHUNK = 2000


def _lookup(
    conn: sqlite3.Connection, table: str, column: str, rid: str, values: Iterable[str]
) -> dict[str, int]:
    """The ``rid`` of each of ``values`` found in ``table``'s ``column``."""
    todo = list(values)
    found: dict[str, int] = {}
    for i in range(0, len(todo), NAME_CHUNK):
        chunk = todo[i : i + NAME_CHUNK]
        found.update(
            (value, int(row_id))
            for value, row_id in conn.execute(
                f"SELECT {column}, {rid} FROM {table} WHERE {column} IN"
                f" ({','.join('?' * len(chunk))})",
                chunk,
            )
        )
    return found


def _payload(event: Event) -> _Payload:
    return (
        event.metric,
        event.ts_ms,
        event.value,
        event.billable,
        event.key_id,
        dict(event.dimensions),
        event.tags,
    )


_Row = tuple[int, str, int, int, int, int, int, int, float]  # an events row, as inserted
# Names a batch interned (metrics, dimension sets, tag sets -> id), keyed as the caches are
# and cached once its transaction commits. (Keyed by their text, each event of a new set
# cost the committer a json.dumps: 55,000 of them for the bench's 200,000-line file.)
_Names = tuple[dict[str, int], dict[_DimsKey, int], dict[frozenset[str], int]]
_EVENT_COLUMNS = "account, event_id, metric, ts, key, billable, dimset, tagset, value"
# Rows go in by statements of many rows each, not by executemany. Why: executemany gives
# the GIL up and takes it back around each row's step, and a thread that asks for the GIL
# back while another runs Python waits for that one's switch interval (5 ms): the committer
# stored a row per wait while callers decoded the next batches, so the C that was meant to
# run beside their Python ran between it instead. One statement of 2,048 rows gives the GIL
# up once and runs its inserts in C meanwhile. 2,048 rows of nine columns bind 18,432
# variables, under SQLite's limit of 32,766.
ROWS_PER_INSERT = 2048
# A statement is prepared once for each number of rows it takes, so rows go in by
# statements of a few sizes: the next power of two, whose spare rows its LIMIT leaves
# unread, so that a group of 3 or of 1,000 rows is one statement, not two or six. Why: each
# statement's return waits for the GIL while the event loop and the request threads decode
# the next batches, and under live traffic those waits were most of the committer's wall
# time; and one statement undoes itself whole, so a group needs no savepoint (which cost
# single events 0.9x their rate when groups of 3 went in as 2 + 1). The spare rows are
# zeros: binding None costs the sqlite3 module an adapter lookup, about 0.3 µs a value,
# more than the row it pads.
_SPARE_ROW = (0,) * 9


@functools.cache
def _insert_events_sql(rows: int, limited: bool = False) -> str:
    values = ",".join(["(?,?,?,?,?,?,?,?,?)"] * rows)
    if not limited:
        return f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES {values}"
    return f"INSERT INTO events ({_EVENT_COLUMNS}) SELECT * FROM (VALUES {values}) LIMIT ?"


def inserted_by_one_statement(rows: int) -> bool:
    """Whether `insert_events` puts ``rows`` rows in by a single statement, which undoes itself
    whole if a row breaks a constraint: up to ROWS_PER_INSERT rows."""
    return 0 < rows <= ROWS_PER_INSERT


def insert_events(conn: sqlite3.Connection, rows: Sequence[_Row]) -> None:
    """Insert ``rows`` into ``events``, in order, by a statement of up to ROWS_PER_INSERT
    rows each (see its comment). A row that breaks a constraint fails its own statement
    whole; the caller's savepoint undoes the statements before it."""
    start, left = 0, len(rows)
    while left:
        size = min(left, ROWS_PER_INSERT)
        padded = 1 << (size - 1).bit_length()  # the next power of two, or size itself
        params: list[object] = list(itertools.chain.from_iterable(rows[start : start + size]))
        if padded > size:
            params.extend(_SPARE_ROW * (padded - size))
            params.append(size)
        conn.execute(_insert_events_sql(padded, padded > size), params)
        start, left = start + size, left - size


class _PendingBatch:
    """One caller's batch, waiting for the group commit that carries it; ``key``: the
    (secret hash, key id) it must still be sent under when it commits (``submit``).
    ``rows``: its rows, built by the caller from the row ids cached in ``generation`` (None
    where one was not cached), or None for the committer to build them all."""

    __slots__ = ("events", "future", "generation", "key", "result", "rows")

    def __init__(
        self,
        events: Sequence[Event],
        key: tuple[bytes, str] | None = None,
        rows: list[_Row | None] | None = None,
        generation: int = 0,
    ) -> None:
        self.events = events
        self.key = key
        self.rows = rows
        self.generation = generation
        self.future: Future[AppendResult] = Future()
        self.result: AppendResult | None = None


# Ids of events no longer stored raw (voided, or dropped by retention), with their payloads:
# a retry of one is still a duplicate, and a reuse of its id with another payload a conflict.
TOMBSTONES = """
CREATE TABLE IF NOT EXISTS tombstones (
    account INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    metric INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    key INTEGER NOT NULL,
    billable INTEGER NOT NULL,
    dimset INTEGER NOT NULL,
    tagset INTEGER NOT NULL,
    value REAL NOT NULL,
    void TEXT,                           -- the void that took it; NULL: retention did
    seq INTEGER,                         -- its place among the events (NULL: kept before it was)
    PRIMARY KEY (account, event_id)
) WITHOUT ROWID;
"""


class SQLiteStore(SqlCorrections, LimitTables):
    """The embedded store on one SQLite file. Safe to share between threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._queue_ready = threading.Condition()
        self._queue: list[_PendingBatch] = []
        self._closing = False
        self._writer = self._connect()
        # Interned ids, cached for the write path. Only filled after a commit, so a rolled
        # back batch never leaves a cached id that the file does not hold.
        self._metric_ids: dict[str, int] = {}
        self._dimset_ids: dict[tuple[tuple[str, str], ...], int] = {}
        self._tagset_ids: dict[frozenset[str], int] = {}
        self._account_rids: dict[str, int] = {}
        self._key_rids: dict[str, int] = {}
        self._row_ids_since = time.monotonic()  # see rows.ROW_IDS_KEPT_FOR
        # Bumped whenever a cached account or key row id is forgotten: rows a caller built
        # under an older generation are built again by the committer.
        self._row_ids_generation = 0
        # Events this process appended since its last fold (others' appends fold when they
        # reach their own count, when a query asks, or when this file is next opened).
        self._unfolded = 0
        self._writer.executescript(TOMBSTONES)  # before _migrate: a rebuild reads it
        self._add_tombstone_seq()
        self._migrate()
        self._create_limit_tables()
        self._create_void_tables()
        self.fold()  # what a crash or another process left unfolded
        # A merge due (or one a crash cut short) goes on between the committer's groups.
        self._merging = self.merge_due()
        self._recent_held = self._recent(self._writer)  # to merge once appends pause
        self._appended_at = time.monotonic()
        if sys.getswitchinterval() > SWITCH_INTERVAL:
            sys.setswitchinterval(SWITCH_INTERVAL)
        self._committer = threading.Thread(target=self._commit_loop, daemon=True)
        self._committer.start()

    def _migrate(self) -> None:
        """Create the schema, or bring an older file's rollups up to this version's."""
        conn = self._writer
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        existed = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'"
        ).fetchone()
        conn.executescript(SCHEMA)
        add_latest_seqs(conn)
        if existed and version not in (SCHEMA_VERSION, TIMES_AT_ONE_LEVEL):
            # A version before this one folded into the big rollups alone; one that opened
            # this file after this version had rebuilt them from the events, the recent
            # cells' included: what the recent level holds is counted there already.
            for table in ROLLUP_TABLES:
                conn.execute(f"DELETE FROM {table}{RECENT}")
            conn.execute("UPDATE recent_events SET events = 0")
        if existed and version != SCHEMA_VERSION:
            # Only this version writes recent entries by time; one before that opened this
            # file after it built event_times again from every folded event, theirs too.
            conn.execute("DELETE FROM event_times_recent")
        if existed and version == FOLDED_EVERY_BATCH:
            conn.execute("UPDATE folded SET seq = (SELECT coalesce(max(seq), 0) FROM events)")
        timed = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'event_times'"
        ).fetchone()
        if version not in (SCHEMA_VERSION, TIMES_AT_ONE_LEVEL, ONE_LEVEL) or not timed:
            # Built anew whenever a version before 4 wrote the file last: it may have folded
            # events without their entries (4 kept them as this one does).
            if existed:
                log.warning("indexing the folded events of %s by time (once)", self.path)
            self._with_temporary_files(lambda: self._in_transaction(self._time_folded_events))
        if existed and version not in (
            SCHEMA_VERSION,
            TIMES_AT_ONE_LEVEL,
            ONE_LEVEL,
            INDEXED_EVERY_BATCH,
            FOLDED_EVERY_BATCH,
        ):
            # Rollup tables came and changed shape between versions; the raw events are
            # the truth, so the rollups are folded again from them.
            log.warning(
                "rebuilding rollups of %s (schema %s -> %s)", self.path, version, SCHEMA_VERSION
            )
            self.rebuild_rollups()
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @staticmethod
    def _time_folded_events(conn: sqlite3.Connection) -> None:
        """Build ``event_times`` from the folded events, in one transaction: a crash midway
        leaves the file as it was (with its old index, if any), and the next open builds it
        again. The index of version 3 holds the events in the table's key order, so the
        copy walks it and sorts nothing (a store of 10M: no sorter, no temporary file)."""
        indexed = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'events_ts'"
        ).fetchone()
        insert = TIME_EVENTS.format(table="event_times", where="seq <= (SELECT seq FROM folded)")
        if indexed:
            insert = insert.replace("FROM events", "FROM events INDEXED BY events_ts")
        conn.execute("DROP TABLE IF EXISTS event_times")
        conn.execute(EVENT_TIMES)
        conn.execute("DELETE FROM event_times_recent")  # every folded event is in the big one
        conn.execute(insert)
        conn.execute("DROP INDEX IF EXISTS events_ts")

    def _add_tombstone_seq(self) -> None:
        """Tombstones keep their event's seq since it decides a tie of latest values when
        the rollups are folded again; a file of before gains the column (NULL: unknown)."""
        columns = {row[1] for row in self._writer.execute("PRAGMA table_info(tombstones)")}
        if "seq" not in columns:
            self._writer.execute("ALTER TABLE tombstones ADD COLUMN seq INTEGER")

    def rebuild_rollups(self) -> None:
        """Fold every stored event into empty rollups again, in one transaction."""
        with self._write_lock:
            self._in_transaction(lambda conn: self._fold_locked(conn, rebuild=True))
            self._unfolded = 0

    def fold(self) -> None:
        """Fold the events the rollups lack (appended by any process), in one transaction."""
        with self._write_lock:
            # A statement of many rows keeps a statement journal (to undo itself alone should
            # a row break a constraint): the original of every page it changes. A fold of
            # events spread over months into a store of 10M changes most pages of each
            # rollup, so in memory (the connection's temp_store) that journal grew the
            # server by 270 MB for a fold of 100,000 such events. During a fold it goes to a
            # temporary file instead: past 64 KB into the kernel's cache, never synced,
            # deleted after the statement. Only then: a temporary file costs every small
            # group's statements a little (single events 10-20% more CPU), and changing the
            # setting drops the temporary tables, which a fold makes afresh anyway.
            self._with_temporary_files(lambda: self._in_transaction(self._fold_locked))
            self._unfolded = 0

    def _with_temporary_files(self, work: Callable[[], None]) -> None:
        """Run ``work`` with the writer's temporary files (statement journals, sorters) in
        files, the kernel's cache: see ``fold``."""
        self._writer.execute("PRAGMA temp_store=FILE")
        try:
            work()
        finally:
            self._writer.execute("PRAGMA temp_store=MEMORY")

    def _in_transaction(self, work: Callable[[sqlite3.Connection], None]) -> None:
        """Run ``work`` on the writer in one write transaction, undone whole if it fails."""
        conn = self._writer
        conn.execute("BEGIN IMMEDIATE")
        try:
            work(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _fold_locked(self, conn: sqlite3.Connection, rebuild: bool = False) -> None:
        # Every event after the mark is folded here, so none waits any more. Emptied even
        # when the mark says nothing waits: a version before may have moved it since.
        conn.execute("DELETE FROM unfolded")
        start, end = conn.execute(
            "SELECT seq, (SELECT coalesce(max(seq), 0) FROM events) FROM folded"
        ).fetchone()
        if end > start:  # the events of this run, found by time from now on (recent level)
            run = TIME_EVENTS.format(table="event_times_recent", where="seq > ? AND seq <= ?")
            conn.execute(run, (start, end))
        if rebuild:
            for table in ROLLUP_TABLES:
                conn.execute(f"DELETE FROM {table}")
                conn.execute(f"DELETE FROM {table}{RECENT}")
            # Events retention dropped still count: their payloads wait in the tombstones,
            # folded with the stored events in the order they arrived, into the big tables.
            fold_selected(
                conn,
                f"SELECT {ROLLUP_COLUMNS}, coalesce(seq, 0) FROM (SELECT {ROLLUP_COLUMNS}, seq"
                f" FROM tombstones WHERE void IS NULL UNION ALL SELECT {ROLLUP_COLUMNS}, seq"
                " FROM events)"
                " ORDER BY seq NULLS FIRST, ts",
                big=True,
            )
            conn.execute("UPDATE folded SET seq = ?", (end,))
            conn.execute("UPDATE recent_events SET events = 0")
            return
        if end <= start:
            return
        fold_events(conn, start, end)
        conn.execute("UPDATE folded SET seq = ?", (end,))
        conn.execute("UPDATE recent_events SET events = events + ?", (end - start,))

    def merge_due(self) -> bool:
        """Whether the recent level holds enough events for a merge (MERGE_EVENTS)."""
        with self._write_lock:
            found = self._writer.execute("SELECT events FROM recent_events").fetchone()
        return int(found[0]) >= MERGE_EVENTS

    def merge(self) -> None:
        """Move every cell of the rollups' recent level into the big tables, a step at a time
        (``merge_step``)."""
        while not self.merge_step():
            pass

    def merge_step(self) -> bool:
        """One step of a merge, in one transaction: the recent cells of the first accounts
        (about MERGE_STEP cells of ``rollup``) into the big tables, in key order; once fewer
        are left, the recent entries by time of the earliest times (MERGE_TIMES_STEP); then
        all that is left of both; whether it was the last (the recent level is empty, its
        count of events back to 0). A SIGKILL leaves each step done or undone: every cell
        and every entry is in one level or the other."""
        with self._write_lock:
            conn = self._writer
            bound = conn.execute(
                f"SELECT metric, account FROM rollup{RECENT} LIMIT 1 OFFSET ?", (MERGE_STEP,)
            ).fetchone()
            times = None
            if bound is None:
                times = conn.execute(TIMES_BOUND, (MERGE_TIMES_STEP,)).fetchone()
            last = bound is None and times is None

            def step(conn: sqlite3.Connection) -> None:
                if bound is not None:
                    for statement in MERGE_UP_TO:
                        conn.execute(statement, tuple(bound))
                elif times is not None:
                    for statement in MERGE_TIMES_UP_TO:
                        conn.execute(statement, tuple(times))
                else:
                    for statement in (*MERGE_ALL, *MERGE_TIMES_ALL):
                        conn.execute(statement)
                    conn.execute("UPDATE recent_events SET events = 0")

            # Its statements change many pages of the big tables: their statement journals
            # in temporary files, as a fold's (see ``fold``).
            self._with_temporary_files(lambda: self._in_transaction(step))
            if last:
                self._recent_held = False
        return last

    def merge_dense(self) -> int:
        """Merge the recent cells of each dense (metric, account) (see DENSE_SHARE) into the
        big tables, DENSE_STEP pairs a transaction (``merge_pairs``); how many pairs."""
        dense = self.dense_pairs()
        for start in range(0, len(dense), DENSE_STEP):
            self.merge_pairs(dense[start : start + DENSE_STEP])
        return len(dense)

    def dense_pairs(self) -> list[tuple[int, int]]:
        """The (metric, account) pairs whose recent cells are dense (see DENSE_SHARE), in key
        order."""
        with self._write_lock:
            conn = self._writer
            events = int(conn.execute("SELECT events FROM recent_events").fetchone()[0])
            least = max(DENSE_HOURS, events // DENSE_SHARE)
            return [(int(m), int(a)) for m, a in conn.execute(DENSE_ACCOUNTS, (least,))]

    def merge_pairs(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Move every recent cell of these (metric, account) pairs into the big tables, in one
        transaction. A pair's cells are moved whole whenever they were counted dense: a fold
        since only added to them, and a merge step since may have moved them already. The
        count of events in the recent level stays: the big merge comes as soon, and finds
        less to move."""
        if not pairs:
            return

        def move(conn: sqlite3.Connection) -> None:
            for pair in pairs:
                for statement in MERGE_DENSE:
                    conn.execute(statement, pair)

        with self._write_lock:
            self._in_transaction(move)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before it returns, so an acknowledged batch survives a
        # power cut, not only a crash of this process.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA cache_size=-65536")
        # Checkpoint every 64 MB of WAL rather than 4 MB: a large batch dirties hundreds of
        # pages, and checkpointing after nearly every commit doubled its disk writes.
        conn.execute("PRAGMA wal_autocheckpoint=16384")
        # Temporary files in memory: a statement of many rows keeps a statement journal (to
        # undo itself alone should a row break a constraint), and a fold sorts its run;
        # on disk, both wrote about as much again as the commits did.
        conn.execute("PRAGMA temp_store=MEMORY")
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    def close(self) -> None:
        with self._queue_ready:
            if self._closing:
                return
            self._closing = True
            self._queue_ready.notify()
        self._committer.join()
        self.fold()
        self._checkpoint()  # a clean close leaves no WAL behind to replay or to hold space
        with self._write_lock:
            self._writer.close()
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # ---------------------------------------------------------------- accounts

    def _account_rid(self, conn: sqlite3.Connection, account_id: str) -> int:
        rid = self._account_rids.get(account_id)
        if rid is None:
            row = conn.execute("SELECT rid FROM accounts WHERE id = ?", (account_id,)).fetchone()
            if row is None:
                raise NotFound(f"account {account_id!r} does not exist")
            rid = int(row[0])
            self._account_rids[account_id] = rid
        return rid

    def create_account(self, account: Account) -> Account:
        with self._write_lock:
            parent = None
            if account.parent_id is not None:
                parent = self._account_rid(self._writer, account.parent_id)
            try:
                self._writer.execute(
                    f"INSERT INTO accounts ({ACCOUNT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                    account_values(account, parent),
                )
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"account id {account.id!r} is already taken") from exc
            # A deleted account's id may come back as a new row (delete_account).
            self._account_rids.pop(account.id, None)
            self._row_ids_generation += 1
        return self.get_account(account.id)

    def get_account(self, account_id: str) -> Account:
        row = (
            self._reader()
            .execute(f"SELECT {ACCOUNT_SELECT} WHERE a.id = ?", (account_id,))
            .fetchone()
        )
        if row is None:
            raise NotFound(f"account {account_id!r} does not exist")
        return account_from_row(row)

    def list_accounts(self) -> list[Account]:
        rows = self._reader().execute(f"SELECT {ACCOUNT_SELECT} ORDER BY a.rid")
        return [account_from_row(row) for row in rows]

    def descendants(self, account_id: str) -> list[str]:
        rows = (
            self._reader()
            .execute(
                """WITH RECURSIVE tree(rid, id, depth) AS (
                   SELECT rid, id, 0 FROM accounts WHERE id = ?
                   UNION ALL
                   SELECT a.rid, a.id, tree.depth + 1
                   FROM accounts a JOIN tree ON a.parent = tree.rid
               ) SELECT id FROM tree ORDER BY depth, rid""",
                (account_id,),
            )
            .fetchall()
        )
        if not rows:
            raise NotFound(f"account {account_id!r} does not exist")
        return [row[0] for row in rows]

    def ancestors(self, account_id: str) -> list[str]:
        rows = (
            self._reader()
            .execute(
                """WITH RECURSIVE up(rid, id, parent, depth) AS (
                   SELECT rid, id, parent, 0 FROM accounts WHERE id = ?
                   UNION ALL
                   SELECT a.rid, a.id, a.parent, up.depth + 1
                   FROM accounts a JOIN up ON a.rid = up.parent
               ) SELECT id FROM up ORDER BY depth""",
                (account_id,),
            )
            .fetchall()
        )
        if not rows:
            raise NotFound(f"account {account_id!r} does not exist")
        return [row[0] for row in rows]

    # -------------------------------------------------------------------- keys

    def create_key(self, key: ApiKey, secret_hash: bytes) -> ApiKey:
        with self._write_lock:
            account = None
            if key.account_id is not None:
                account = self._account_rid(self._writer, key.account_id)
            try:
                self._writer.execute(
                    f"INSERT INTO keys ({KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    key_values(key, account, secret_hash),
                )
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"key id {key.id!r} is already taken") from exc
            self._key_rids.pop(key.id, None)
            self._row_ids_generation += 1
        return self.get_key(key.id)

    def get_key(self, key_id: str) -> ApiKey:
        row = self._reader().execute(f"SELECT {KEY_SELECT} WHERE k.id = ?", (key_id,))
        found = row.fetchone()
        if found is None:
            raise NotFound(f"key {key_id!r} does not exist")
        return key_from_row(found)

    def find_keys_by_lookup(self, lookup: bytes) -> list[tuple[ApiKey, bytes]]:
        rows = self._reader().execute(f"SELECT {KEY_SELECT} WHERE k.lookup = ?", (lookup,))
        return [(key_from_row(row), bytes(row[7])) for row in rows]

    def list_keys(self, account_id: str | None) -> list[ApiKey]:
        if account_id is None:
            rows = self._reader().execute(
                f"SELECT {KEY_SELECT} WHERE k.account IS NULL ORDER BY k.rid"
            )
        else:
            rows = self._reader().execute(
                f"SELECT {KEY_SELECT} WHERE a.id = ? ORDER BY k.rid", (account_id,)
            )
        return [key_from_row(row) for row in rows]

    def export_keys(self) -> list[tuple[ApiKey, bytes]]:
        rows = self._reader().execute(f"SELECT {KEY_SELECT} ORDER BY k.rid")
        return [(key_from_row(row), bytes(row[7])) for row in rows]

    def revoke_key(self, key_id: str) -> ApiKey:
        with self._write_lock:
            cur = self._writer.execute(
                "UPDATE keys SET revoked_at = coalesce(revoked_at, ?) WHERE id = ?",
                (_now_ms(), key_id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"key {key_id!r} does not exist")
        return self.get_key(key_id)

    def create_portal_token(self, token: PortalToken, secret_hash: bytes) -> PortalToken:
        with self._write_lock:
            self._account_rid(self._writer, token.account_id)  # NotFound says which
            try:
                self._writer.execute(portalrows.insert("?"), portalrows.params(token, secret_hash))
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"portal token id {token.id!r} is already taken") from exc
        return token

    def find_portal_tokens_by_lookup(self, lookup: bytes) -> list[tuple[PortalToken, bytes]]:
        rows = self._reader().execute(portalrows.select_by_lookup("?"), (lookup,)).fetchall()
        return [portalrows.token_from_row(row) for row in rows]

    def revoke_portal_token(self, token_id: str) -> PortalToken:
        with self._write_lock:
            row = self._writer.execute(portalrows.revoke("?"), (_now_ms(), token_id)).fetchone()
        if row is None:
            raise NotFound(f"portal token {token_id!r} does not exist")
        return portalrows.token_from_row(row)[0]

    def _key_rid(self, conn: sqlite3.Connection, key_id: str) -> int:
        rid = self._key_rids.get(key_id)
        if rid is None:
            row = conn.execute("SELECT rid FROM keys WHERE id = ?", (key_id,)).fetchone()
            if row is None:
                raise NotFound(f"key {key_id!r} does not exist")
            rid = int(row[0])
            self._key_rids[key_id] = rid
        return rid

    # ------------------------------------------------------------------ events

    def _intern(
        self, table: str, column: str, value: str, pending: dict[Any, int], key: Any
    ) -> int:
        """The id of ``value`` (``key`` as ``pending`` and the caches know it), made if new."""
        found = pending.get(key)
        if found is not None:
            return found
        conn = self._writer
        row = conn.execute(f"SELECT id FROM {table} WHERE {column} = ?", (value,)).fetchone()
        if row is None:
            cur = conn.execute(f"INSERT INTO {table} ({column}) VALUES (?)", (value,))
            assert cur.lastrowid is not None
            new_id = int(cur.lastrowid)
            if table == "tagsets":
                conn.executemany(
                    "INSERT INTO tagset_tags (tag, tagset) VALUES (?, ?)",
                    [(tag, new_id) for tag in json.loads(value)],
                )
        else:
            new_id = int(row[0])
        pending[key] = new_id
        return new_id

    def _intern_names(
        self, conn: sqlite3.Connection, events: Iterable[Event], names: _Names
    ) -> None:
        """Find or make, in a few statements, the row ids of every name of ``events`` not
        cached yet (accounts, keys, metrics, dimension and tag sets), so that ``_row`` then
        builds their rows from dictionaries. One by one, a batch of new session ids cost
        the committer two statements an event, each taking the GIL back from callers."""
        new_metrics, new_dimsets, new_tagsets = names
        metrics: set[str] = set()
        dimsets: set[_DimsKey] = set()
        tagsets: set[frozenset[str]] = set()
        accounts: set[str] = set()
        keys: set[str] = set()
        for event in events:
            if event.metric not in self._metric_ids:
                metrics.add(event.metric)
            if _cached_dimset(self._dimset_ids, event) is None:
                dimsets.add(_dims_key(event))
            if event.tags not in self._tagset_ids:
                tagsets.add(event.tags)
            if event.account_id not in self._account_rids:
                accounts.add(event.account_id)
            if event.key_id is not None and event.key_id not in self._key_rids:
                keys.add(event.key_id)
        self._intern_many(conn, "metrics", "name", {m: m for m in metrics}, new_metrics)
        self._intern_many(conn, "dimsets", "dims", {k: _dims_text(k) for k in dimsets}, new_dimsets)
        made = self._intern_many(
            conn, "tagsets", "tags", {t: _tags_text(t) for t in tagsets}, new_tagsets
        )
        if made:
            conn.executemany(
                "INSERT INTO tagset_tags (tag, tagset) VALUES (?, ?)",
                [(tag, new_tagsets[tags]) for tags in made for tag in sorted(tags)],
            )
        # Those not found are left out: _row raises NotFound for them, as before.
        self._account_rids.update(_lookup(conn, "accounts", "id", "rid", accounts))
        self._key_rids.update(_lookup(conn, "keys", "id", "rid", keys))

    def _intern_many(
        self,
        conn: sqlite3.Connection,
        table: str,
        column: str,
        texts: dict[_K, str],
        pending: dict[_K, int],
    ) -> list[_K]:
        """Put the ids of the names ``texts`` holds (each key's text in ``column``) into
        ``pending``, making those ``table`` lacks; the keys of those made."""
        todo = {key: text for key, text in texts.items() if key not in pending}
        found = _lookup(conn, table, column, "id", todo.values())
        made = []
        for key, text in todo.items():
            if text in found:
                pending[key] = found[text]
            else:
                made.append(key)
        key_of = {todo[key]: key for key in made}  # a name's text says which name it is
        for i in range(0, len(made), NAME_CHUNK):
            chunk = [todo[key] for key in made[i : i + NAME_CHUNK]]
            rows = conn.execute(
                f"INSERT INTO {table} ({column}) VALUES {','.join(['(?)'] * len(chunk))}"
                f" RETURNING {column}, id",
                chunk,
            ).fetchall()
            pending.update((key_of[text], int(rid)) for text, rid in rows)
        return made

    def append(self, events: Sequence[Event]) -> AppendResult:
        return self.submit(events).result()

    def submit(
        self, events: Sequence[Event], key: tuple[bytes, str] | None = None
    ) -> Future[AppendResult]:
        """``append`` without waiting: the future resolves once the batch is durable (or
        fails with the batch's error). An async caller awaits it without a thread of its
        own (``asyncio.wrap_future``).

        ``key``: the SHA-256 of the secret the batch was sent with, and its key's id. The
        batch is stored only if, in the transaction that stores it, that key still stands
        (not revoked, not deleted); else it fails with KeyRevoked. So a caller may trust a
        key it looked up earlier: a revocation committed by any process before the batch's
        commit still refuses the batch."""
        generation = self._row_ids_generation  # read before the caches the rows come from
        mine = _PendingBatch(events, key, self._prepare(events), generation)
        if not events:
            mine.future.set_result(AppendResult(0, 0))
            return mine.future
        with self._queue_ready:
            if self._closing:
                raise RuntimeError(f"store {self.path} is closed")
            self._queue.append(mine)
            self._queue_ready.notify()
        return mine.future

    def _prepare(self, events: Sequence[Event]) -> list[_Row | None] | None:
        """The rows of ``events`` from the row ids cached so far (None for a row whose names
        are not all cached yet: the committer builds it), or None if the batch repeats an
        id. Runs in the caller's thread, so that the committer's own Python stays out from
        between its SQL statements: its inserts and folds run in SQLite's C, without the
        GIL, while callers build the next batches."""
        count = len(events)
        # Ids distinct across the batch say the pairs are, without a tuple an event.
        if len({e.id for e in events}) < count and (
            len({(e.account_id, e.id) for e in events}) < count
        ):
            return None  # the committer's whole path tells the repeats apart
        accounts, keys, metrics = self._account_rids, self._key_rids, self._metric_ids
        cached_dimset, tagsets = self._dimset_ids.get, self._tagset_ids
        rows: list[_Row | None] = []
        append = rows.append
        for e in events:
            # As _cached_dimset: a set sent in sorted order is found without sorting.
            items = tuple(e.dimensions.items())
            dimset = cached_dimset(items) or cached_dimset(tuple(sorted(items)))
            try:
                if not dimset:  # ids start at 1
                    raise KeyError(items)
                key_id = e.key_id
                append(
                    (
                        accounts[e.account_id],
                        e.id,
                        metrics[e.metric],
                        e.ts_ms,
                        NO_KEY if key_id is None else keys[key_id],
                        1 if e.billable else 0,
                        dimset,
                        tagsets[e.tags],
                        e.value,
                    )
                )
            except KeyError:
                append(None)
        return rows

    def _commit_loop(self) -> None:
        """The committer thread. Group commit: the batches that arrived while it wrote the
        last group go in one transaction, so one fsync acknowledges them all; each keeps its
        own savepoint, so a failing batch rolls back alone and each caller gets its own
        result or error. Between groups it folds full runs, and a tail once appends pause."""
        dense: list[tuple[int, int]] = []  # dense pairs still to merge, a step at a time
        while True:
            with self._queue_ready:
                if not self._queue and not self._closing and not self._merging and not dense:
                    self._queue_ready.wait(IDLE_FOLD_SECONDS)
                group, self._queue = self._queue, []
                closing = self._closing
            if group:
                self._appended_at = time.monotonic()
                with self._write_lock:
                    self._commit_group(group)
            if not group and closing:
                return
            if self._unfolded >= FOLD_EVENTS or (not group and self._anything_waits()):
                try:
                    self.fold()
                    if not group:  # appends paused: see DENSE_SHARE
                        dense = self.dense_pairs()
                    self._recent_held = True
                    self._merging = self._merging or self.merge_due()
                except Exception:  # tried again at the next pause; questions read them
                    log.exception("folding the rollups of %s failed", self.path)
            elif dense:
                # A step between groups (DENSE_STEP): batches that arrived meanwhile first.
                step, dense = dense[:DENSE_STEP], dense[DENSE_STEP:]
                try:
                    self.merge_pairs(step)
                except Exception:  # tried again at the next pause
                    dense = []
                    log.exception("merging the dense cells of %s failed", self.path)
            elif self._merging:
                # A step between groups: the batches that arrived meanwhile commit first.
                try:
                    self._merging = not self.merge_step()
                except Exception:  # tried again after the next fold
                    self._merging = False
                    log.exception("merging the rollups of %s failed", self.path)
            elif (
                not group
                and self._recent_held
                and time.monotonic() - self._appended_at >= QUIET_MERGE_SECONDS
            ):
                self._merging = True

    def _anything_waits(self) -> bool:
        """Events wait for their fold: this process's, or those another process left (an
        `ingest` killed before it folded), which no question folds any more."""
        if self._unfolded:
            return True
        try:
            with self._write_lock:
                found = self._writer.execute("SELECT EXISTS (SELECT 1 FROM unfolded)").fetchone()
        except sqlite3.Error as exc:
            log.warning("reading what waits in %s failed: %s", self.path, exc)
            return False
        return bool(found[0])

    def _translate(self, error: BaseException) -> BaseException:
        """A full disk as the store-agnostic StoreUnavailable (after a checkpoint, so that
        space freed from now on goes to new batches, not to a growing WAL); any other error
        as it is. Called by the committer, outside a transaction, with the write lock held."""
        if not _disk_full(error):
            return error
        log.error("writes to %s fail: %s", self.path, error)
        try:
            # Checkpoint every 4 MB of WAL from now on rather than every 64: with little
            # space freed, a WAL left to grow would take all of it again.
            self._writer.execute("PRAGMA wal_autocheckpoint=1000")
        except sqlite3.Error as exc:
            log.warning("lowering the WAL checkpoint interval of %s failed: %s", self.path, exc)
        self._checkpoint_locked()
        unavailable = StoreUnavailable(
            "the store's disk is full: nothing of this batch was stored; send it again"
            " once space is freed"
        )
        unavailable.__cause__ = error
        return unavailable

    def _checkpoint(self) -> None:
        with self._write_lock:
            self._checkpoint_locked()

    def _checkpoint_locked(self) -> None:
        """Copy the WAL into the database file and truncate the WAL, giving its space back."""
        try:
            self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning("checkpoint of %s failed: %s", self.path, exc)

    def _commit_group(self, group: list[_PendingBatch]) -> None:
        conn = self._writer
        interned: list[_Names] = []
        failed: dict[int, BaseException] = {}  # a batch's place in the group -> its error
        try:
            conn.execute("BEGIN IMMEDIATE")
            if row_ids_stale(self._row_ids_since):
                self._refresh_row_ids(conn)
            # Two questions in one statement: each statement's return waits for the GIL.
            stored_before, tombstones = conn.execute(
                "SELECT (SELECT coalesce(max(seq), 0) FROM events),"
                " EXISTS (SELECT 1 FROM tombstones)"
            ).fetchone()
            failed.update(self._revoked(conn, group))
            todo = [place for place in range(len(group)) if place not in failed]
            batches = [group[place] for place in todo]
            if tombstones or not self._append_together(conn, batches, interned):
                for place in todo:
                    batch = group[place]
                    conn.execute("SAVEPOINT batch")
                    try:
                        names: _Names = ({}, {}, {})
                        rows = self._rows_of(batch)
                        fresh = None
                        if rows is not None:
                            fresh = self._append_fresh(
                                conn, batch.events, rows, names, bool(tombstones)
                            )
                        batch.result = fresh or self._append_locked(conn, batch.events, names)
                        interned.append(names)
                    except Exception as exc:
                        conn.execute("ROLLBACK TO batch")
                        failed[place] = exc
                    conn.execute("RELEASE batch")
            # What this group stored waits for a fold; questions read it meanwhile.
            conn.execute(COPY_UNFOLDED, (stored_before,))
            conn.execute("COMMIT")
        except BaseException as exc:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error as rollback_error:  # every caller must still get its answer
                log.warning("rollback on %s failed: %s", self.path, rollback_error)
            # Errors are translated only now, outside the transaction: a full disk's
            # translation checkpoints the WAL.
            for place, batch in enumerate(group):
                batch.future.set_exception(self._translate(failed.get(place, exc)))
            if not isinstance(exc, Exception):
                raise
            return
        for place, error in failed.items():
            group[place].future.set_exception(self._translate(error))
        for metrics, dimsets, tagsets in interned:
            self._metric_ids.update(metrics)
            self._dimset_ids.update(dimsets)
            self._tagset_ids.update(tagsets)
        for place, batch in enumerate(group):
            if place not in failed and batch.result is not None:
                self._unfolded += batch.result.accepted
                batch.future.set_result(batch.result)

    def _revoked(
        self, conn: sqlite3.Connection, group: list[_PendingBatch]
    ) -> dict[int, Exception]:
        """The batches of ``group`` whose key no longer stands, by their place: one lookup
        per distinct key, inside the group's transaction (so after any revocation another
        connection committed before it)."""
        standing: dict[tuple[bytes, str], bool] = {}
        refused: dict[int, Exception] = {}
        for place, batch in enumerate(group):
            if batch.key is None:
                continue
            if batch.key not in standing:
                digest, key_id = batch.key
                row = conn.execute(
                    "SELECT id FROM keys WHERE secret_hash = ? AND revoked_at IS NULL", (digest,)
                ).fetchone()
                standing[batch.key] = row is not None and row[0] == key_id
            if not standing[batch.key]:
                refused[place] = KeyRevoked("the key this batch was sent with is revoked")
        return refused

    def _rows_of(self, batch: _PendingBatch) -> list[_Row | None] | None:
        """The rows the caller built, as far as they still hold."""
        if batch.rows is not None and batch.generation != self._row_ids_generation:
            return [None] * len(batch.rows)  # row ids forgotten since: built here
        return batch.rows

    def _append_together(
        self, conn: sqlite3.Connection, batches: list[_PendingBatch], interned: list[_Names]
    ) -> bool:
        """Store ``batches`` in one insert, the common case of a group: no id repeated or
        seen before (the unique index tells; the caller checked that no tombstone is there
        to look at). Else store no event and return False: the batches then go one by one,
        each in a savepoint of its own, so that one batch's error or repeat is its own.
        One-event requests come in groups of a few: three statements a batch were a large
        part of their commit.

        Rows all built by their callers that go in by one statement, which undoes itself
        whole if it fails, take no savepoint, whose two statements each waited for the GIL.
        Rows of several statements take one (the first could stand while a later one fails),
        and so does a name to intern, so that a batch refused leaves none behind."""
        built = [self._rows_of(batch) for batch in batches]
        if not batches or any(rows is None for rows in built):
            return False
        names: _Names = ({}, {}, {})
        total = sum(len(batch.events) for batch in batches)
        guarded = not inserted_by_one_statement(total) or any(
            row is None for rows in built for row in rows or ()
        )
        if guarded:
            conn.execute("SAVEPOINT together")
        try:
            self._intern_names(
                conn,
                (
                    event
                    for batch, prepared in zip(batches, built, strict=True)
                    for row, event in zip(prepared or (), batch.events, strict=True)
                    if row is None
                ),
                names,
            )
            rows = [
                row if row is not None else self._row(conn, event, names)
                for batch, prepared in zip(batches, built, strict=True)
                for row, event in zip(prepared or (), batch.events, strict=True)
            ]
            insert_events(conn, rows)
        except Exception:  # a repeat, an account gone: batch by batch sorts it out
            if guarded:
                conn.execute("ROLLBACK TO together")
                conn.execute("RELEASE together")
            return False
        if guarded:
            conn.execute("RELEASE together")
        interned.append(names)
        for batch in batches:
            batch.result = AppendResult(len(batch.events), 0)
        return True

    def _append_fresh(
        self,
        conn: sqlite3.Connection,
        events: Sequence[Event],
        prepared: list[_Row | None],
        names: _Names,
        tombstones: bool,
    ) -> AppendResult | None:
        """Insert the rows a caller ``prepared`` (their ids distinct; the missing ones built
        here) if none of their ids was seen before, the common case; else None, having
        stored nothing. Seen ids are found by the unique index itself as the rows go in,
        not looked up first: the lookup cost as much as the insert. Ids of voided or
        dropped events (tombstones) are looked up, when there are any."""
        self._intern_names(
            conn, (e for row, e in zip(prepared, events, strict=True) if row is None), names
        )
        rows = [
            row if row is not None else self._row(conn, event, names)
            for row, event in zip(prepared, events, strict=True)
        ]
        if tombstones:
            for i in range(0, len(rows), PAIR_CHUNK):
                chunk = rows[i : i + PAIR_CHUNK]
                values = ",".join(["(?,?)"] * len(chunk))
                if conn.execute(
                    f"WITH v(a, i) AS (VALUES {values}) SELECT 1 FROM v JOIN tombstones t"
                    " ON t.account = v.a AND t.event_id = v.i LIMIT 1",
                    [v for row in chunk for v in row[:2]],
                ).fetchone():
                    return None
        conn.execute("SAVEPOINT fresh")
        try:
            insert_events(conn, rows)
        except sqlite3.IntegrityError:  # an id seen before: the whole path sorts them out
            conn.execute("ROLLBACK TO fresh")
            conn.execute("RELEASE fresh")
            return None
        conn.execute("RELEASE fresh")
        return AppendResult(len(rows), 0)

    def _row(self, conn: sqlite3.Connection, event: Event, names: _Names) -> _Row:
        """``event`` as a row of ``events``; names not interned yet are, in ``names``."""
        new_metrics, new_dimsets, new_tagsets = names
        metric = self._metric_ids.get(event.metric) or self._intern(
            "metrics", "name", event.metric, new_metrics, event.metric
        )
        key_id = event.key_id
        key = NO_KEY if key_id is None else self._key_rid(conn, key_id)
        dimset = _cached_dimset(self._dimset_ids, event)
        if dimset is None:
            dims = _dims_key(event)
            dimset = new_dimsets.get(dims)
            if dimset is None:
                dimset = self._intern("dimsets", "dims", _dims_text(dims), new_dimsets, dims)
        tags = event.tags
        tagset = self._tagset_ids.get(tags) or new_tagsets.get(tags)
        if tagset is None:
            tagset = self._intern("tagsets", "tags", _tags_text(tags), new_tagsets, tags)
        return (
            self._account_rid(conn, event.account_id),
            event.id,
            metric,
            event.ts_ms,
            key,
            1 if event.billable else 0,
            dimset,
            tagset,
            event.value,
        )

    def _append_locked(
        self, conn: sqlite3.Connection, events: Sequence[Event], names: _Names
    ) -> AppendResult:
        """Store ``events``, looking each id up first: repeats are counted, and compared
        with what is stored. Names interned go into ``names``."""
        # Which (account, id) pairs this file has already seen, asked in a few statements
        # whatever the number of accounts: a batch often spans hundreds of them. The stored
        # payload comes along (joins that cost nothing when, as usual, no pair is found) so
        # that a repeat with another payload is reported as a conflict.
        rids = {a: self._account_rid(conn, a) for a in {e.account_id for e in events}}
        account_of = {rid: account for account, rid in rids.items()}
        pairs = list(dict.fromkeys((rids[e.account_id], e.id) for e in events))
        stored: dict[tuple[str, str], _Payload] = {}
        # Tombstones too: the ids of voided events and of those retention dropped stay taken.
        for i, table in (
            (i, table)
            for i in range(0, len(pairs), PAIR_CHUNK)
            for table in ("events", "tombstones")
        ):
            chunk = pairs[i : i + PAIR_CHUNK]
            values = ",".join(["(?,?)"] * len(chunk))
            for rid, event_id, *payload in conn.execute(
                # A join, not "(account, event_id) IN (VALUES ...)": SQLite plans that
                # as a scan of the whole index, and this as one index search per pair.
                f"WITH v(a, i) AS (VALUES {values}) SELECT e.account, e.event_id,"
                " m.name, e.ts, e.value, e.billable, k.id, d.dims, t.tags"
                f" FROM v JOIN {table} e ON e.account = v.a AND e.event_id = v.i"
                " JOIN metrics m ON m.id = e.metric LEFT JOIN keys k ON k.rid = e.key"
                " JOIN dimsets d ON d.id = e.dimset JOIN tagsets t ON t.id = e.tagset",
                [v for pair in chunk for v in pair],
            ):
                metric, ts, value, billable, key_id, dims, tags = payload
                stored[(account_of[rid], event_id)] = (
                    metric,
                    ts,
                    value,
                    bool(billable),
                    key_id,
                    json.loads(dims),
                    frozenset(json.loads(tags)),
                )

        duplicates = 0
        conflicts: list[int] = []
        earlier: dict[tuple[str, str], Event] = {}  # this batch's first event of each id
        for index, event in enumerate(events):
            ident = (event.account_id, event.id)
            if ident in stored or ident in earlier:
                duplicates += 1
                first = stored.get(ident) or _payload(earlier[ident])
                if first != _payload(event):
                    conflicts.append(index)
                continue
            earlier[ident] = event
        fresh = list(earlier.values())  # in the batch's order: a dict keeps its insertions'
        self._intern_names(conn, fresh, names)
        rows = [self._row(conn, event, names) for event in fresh]
        insert_events(conn, rows)
        return AppendResult(len(rows), duplicates, tuple(conflicts))

    # ---------------------------------------------------------------- queries

    def _ids(self, conn: sqlite3.Connection, table: str, column: str, value: str) -> int | None:
        row = conn.execute(f"SELECT id FROM {table} WHERE {column} = ?", (value,)).fetchone()
        return None if row is None else int(row[0])

    def aggregate(self, spec: AggregateSpec) -> list[AggregateRow]:
        conn = self._reader()
        metric = self._ids(conn, "metrics", "name", spec.metric)
        if metric is None or not spec.windows:
            return []
        account_rids = []
        for account_id in spec.accounts:
            row = conn.execute("SELECT rid FROM accounts WHERE id = ?", (account_id,)).fetchone()
            if row is not None:
                account_rids.append(int(row[0]))
        key_rid: int | None = None
        if spec.key_id is not None:
            row = conn.execute("SELECT rid FROM keys WHERE id = ?", (spec.key_id,)).fetchone()
            if row is None:
                return []
            key_rid = int(row[0])
        if not account_rids:
            return []
        # What waits and what the recent level holds, and the question, in one snapshot: a
        # fold, a merge's step or a void (which folds its days again into the recent level)
        # committed between the checks and the question would hide cells from it.
        conn.execute("BEGIN")
        try:
            pending = "unfolded" if self._waiting(conn) else None
            # The recent level too, unless it holds no cell of the question's metric and
            # accounts: reading it costs a question a fifth to a half more even when it finds
            # few rows there (twice the parts); a dense account's leave it once appends pause.
            held = self._recent_of(conn, metric, account_rids)
            dialect = SQLITE if pending or held else SQLITE_MERGED
            plans = plan_aggregate(spec, metric, account_rids, key_rid, dialect, pending)
            return run_plans(plans, lambda p: conn.execute(p.sql, p.params), len(spec.measures))
        finally:
            conn.execute("COMMIT")

    @staticmethod
    def _recent_of(conn: sqlite3.Connection, metric: int, account_rids: list[int]) -> bool:
        """Whether the rollups' recent level holds a cell of ``metric`` and these accounts
        (every rollup's key begins with them: a few index probes)."""
        marks = ",".join(f"?{n}" for n in range(2, len(account_rids) + 2))
        where = f"metric = ?1 AND account IN ({marks})"  # numbered: each table's the same
        found = conn.execute(
            "SELECT "
            + " OR ".join(
                f"EXISTS (SELECT 1 FROM {table}{RECENT} WHERE {where})" for table in ROLLUP_TABLES
            ),
            [metric, *account_rids],
        ).fetchone()
        return bool(found[0])

    @staticmethod
    def _recent(conn: sqlite3.Connection) -> bool:
        """Whether the recent level holds any cell, or any entry by time."""
        tables = (*(f"{table}{RECENT}" for table in ROLLUP_TABLES), "event_times_recent")
        found = conn.execute(
            "SELECT " + " OR ".join(f"EXISTS (SELECT 1 FROM {table})" for table in tables)
        ).fetchone()
        return bool(found[0])

    def _waiting(self, conn: sqlite3.Connection) -> bool:
        """Whether any event waits for its fold. Questions read the waiting events beside
        the rollups, in the same statement, only then: a settled store gets the statement
        without them, which SQLite runs in about half the time. An event acknowledged
        before the question is in ``unfolded`` or, moved there by a fold in one
        transaction, in the rollups, so the check misses none."""
        return bool(conn.execute("SELECT EXISTS (SELECT 1 FROM unfolded)").fetchone()[0])

    def metrics_seen(
        self, accounts: Sequence[str], metric: str | None = None, *, dimensions: bool = True
    ) -> dict[str, list[str]]:
        conn = self._reader()
        waiting = self._waiting(conn)
        rids = [
            int(row[0])
            for account_id in accounts
            for row in conn.execute("SELECT rid FROM accounts WHERE id = ?", (account_id,))
        ]
        if not rids:
            return {}
        where_accounts = f"account IN ({','.join('?' * len(rids))})"
        if metric is None:
            names = conn.execute("SELECT id, name FROM metrics").fetchall()
        else:
            names = conn.execute(
                "SELECT id, name FROM metrics WHERE name = ?", (metric,)
            ).fetchall()
        seen: dict[str, list[str]] = {}
        for metric_id, name in names:
            # One index seek per metric on the day rollups: is there any day with usage? Or
            # any event of it waiting for its fold.
            if not conn.execute(
                "SELECT "
                + " OR ".join(
                    f"EXISTS (SELECT 1 FROM {table} WHERE metric = ? AND {where_accounts})"
                    for table in (*SQLITE.levels("rollup_day"), "unfolded")
                ),
                (metric_id, *rids) * 3,
            ).fetchone()[0]:
                continue
            if not dimensions:
                seen[name] = []
                continue
            # The dimension sets in use are interned: read their ids off the slot rollups
            # of this metric and accounts (one range of the primary key), then their names.
            dimension_names: set[str] = set()
            # Of both levels, and of the waiting events when any wait (a UNION costs a
            # quarter more).
            sources = (*SQLITE.levels("rollup"), *(("unfolded",) if waiting else ()))
            for (dims,) in conn.execute(
                "SELECT dims FROM dimsets WHERE id IN ("
                + " UNION ".join(
                    f"SELECT dimset FROM {table} WHERE metric = ? AND {where_accounts}"
                    for table in sources
                )
                + ")",
                (metric_id, *rids) * len(sources),
            ):
                dimension_names.update(json.loads(dims))
            seen[name] = sorted(dimension_names)
        return seen

    def backup(self, dest: str | Path) -> None:
        """Write a consistent copy of the whole file to ``dest`` (which must not exist) while
        writers go on. VACUUM INTO reads one snapshot, so the copy holds every batch committed
        before it began and nothing of one committed after: no batch is ever half in it."""
        conn = self._connect()  # a connection of its own: the copy is one long read
        try:
            conn.execute("VACUUM INTO ?", (str(dest),))
        finally:
            conn.close()

    def count_events(self) -> int:
        return int(self._reader().execute("SELECT count(*) FROM events").fetchone()[0])

    def last_seq(self) -> int:
        return int(self._reader().execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0])

    def touched(
        self, after_seq: int, upto_seq: int, metrics: Sequence[str]
    ) -> list[tuple[str, str, int, int]]:
        if not metrics:
            return []
        sql, params = plan_touched(after_seq, upto_seq, metrics)
        return [(r[0], r[1], int(r[2]), int(r[3])) for r in self._reader().execute(sql, params)]

    def iter_events(
        self,
        accounts: Sequence[str] | None = None,
        start_ms: int | None = None,
        end_ms: int | None = None,
    ) -> Iterator[Event]:
        sql, params = plan_export(accounts, start_ms, end_ms)
        # A connection of its own, so a long export does not hold a pooled reader.
        conn = self._connect()
        try:
            for row in conn.execute(sql, params):
                yield event_from_row(row)
        finally:
            conn.close()

    # ------------------------------------------------------------ corrections

    _dialect = SQLITE
    _ts_between = TIMED_BETWEEN
    _ts_before = TIMED_BEFORE

    def _begin_correction(self, run: Run, hold_ingest: bool) -> None:
        # The write lock is held: fold what waits, so that rollups and events agree.
        self._fold_locked(self._writer)

    def _keep_gone(self, run: Run, where: str, params: Sequence[Any], void_id: str | None) -> None:
        run(
            "INSERT INTO tombstones (account, event_id, metric, ts, key, billable, dimset,"
            " tagset, value, void, seq) SELECT account, event_id, metric, ts, key, billable,"
            f" dimset, tagset, value, ?, seq FROM events WHERE {where}",
            [void_id, *params],
        )

    def _delete_events(self, run: Run, where: str, params: Sequence[Any]) -> int:
        # Their keys first: ``where`` may find them by their entries (TIMED_BETWEEN).
        run("DROP TABLE IF EXISTS temp.gone_times", ())
        run(f"CREATE TEMP TABLE gone_times AS {GONE_TIMES.format(where=where)}", params)
        run("DELETE FROM events WHERE seq IN (SELECT seq FROM temp.gone_times)", ())
        for untime in UNTIME_GONE:
            run(untime, ())
        gone = run("SELECT count(*) FROM temp.gone_times", ())
        run("DROP TABLE temp.gone_times", ())
        return int(gone[0][0])

    def _time_added(self, run: Run, account: int, event_id: str) -> None:
        where = "account = ? AND event_id = ?"
        run(TIME_EVENTS.format(table="event_times_recent", where=where), (account, event_id))

    def _gone(self, run: Run, account: int, ids: Sequence[str]) -> set[str]:
        rows = run(
            f"SELECT event_id FROM tombstones WHERE account = ? AND event_id IN"
            f" ({','.join('?' * len(ids))})",
            [account, *ids],
        )
        return {row[0] for row in rows}

    def _claim_id(self, run: Run, account: int, event: Event) -> None:
        for table in ("events", "tombstones"):
            if run(
                f"SELECT 1 FROM {table} WHERE account = ? AND event_id = ?", (account, event.id)
            ):
                raise Conflict(f"event id {event.id!r} is already taken in this account")

    def _refold(self, run: Run, account: int, metric: int, start_ms: int, end_ms: int) -> None:
        fold_selected(
            self._writer,
            f"SELECT {ROLLUP_COLUMNS}, seq FROM events"
            f" WHERE {TIMED_BETWEEN} AND metric = ? AND account = ? ORDER BY seq",
            (start_ms, end_ms, metric, account),
        )

    def _end_correction(self, run: Run) -> None:
        # Everything was folded first, and an amend's replacement with its day since.
        run("UPDATE folded SET seq = (SELECT coalesce(max(seq), 0) FROM events)", ())

    def _forget_accounts(self, account_ids: Sequence[str]) -> None:
        with self._write_lock:
            self._forget_row_ids()

    def _forget_accounts_in_transaction(self) -> None:
        # Inside the deletion's transaction, with the write lock held: forgotten only after
        # it, a group the committer took between the commit and the lock would store its
        # events under the deleted account's row id, and acknowledge them.
        self._forget_row_ids()

    def _forget_row_ids(self) -> None:
        # The caches go before the generation moves: a caller reads the generation first,
        # so rows it builds from a forgotten cache always carry an older generation.
        self._account_rids, self._key_rids = {}, {}
        self._row_ids_generation += 1
        self._row_ids_since = time.monotonic()

    def _refresh_row_ids(self, conn: sqlite3.Connection) -> None:
        """Look the kept account and key row ids up again, together, in the transaction of
        the group about to use them (another process may have deleted an account or key
        since, or made it again under a new row id: rows.ROW_IDS_KEPT_FOR); only if one no
        longer holds are rows built from them built again. Why not forget them all, as
        before: callers then found few ids cached for a while after each second, so the
        committer built the rows itself (65% of the rows of the bench's 200,000-line file,
        whose events name 1,000 accounts and 4,899 keys), between its statements."""
        if len(self._account_rids) + len(self._key_rids) > REFRESH_AT_MOST:
            self._forget_row_ids()
            return
        accounts = _lookup(conn, "accounts", "id", "rid", self._account_rids)
        keys = _lookup(conn, "keys", "id", "rid", self._key_rids)
        if accounts != self._account_rids or keys != self._key_rids:
            self._account_rids, self._key_rids = accounts, keys
            self._row_ids_generation += 1
        self._row_ids_since = time.monotonic()

    def _account_tables(self) -> tuple[str, ...]:
        return ("tombstones",)

    def compact(self) -> None:
        """Give the space of dropped events back to the file system (VACUUM)."""
        self.fold()
        with self._write_lock:
            self._writer.execute("VACUUM")
        self._checkpoint()

    # ------------------------------------------------------ limits and alerts

    def _limit_read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._reader().execute(sql, params).fetchall()

    def _limit_write(self) -> AbstractContextManager[Run]:
        return sqlite_transaction(self._writer, self._write_lock)
