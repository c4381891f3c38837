"""The SQLite file's tables, and the rollup rows each batch adds to them.

Layout:
- ``events`` keeps every accepted event (audit, export, unique counts, partial slots).
- ``rollup`` folds events into 15-minute slots per (metric, account, key, billable, dimension
  set, tag set). Every real-world UTC offset is a multiple of 15 minutes, so any zone's hour,
  day or month is a whole number of slots.
- ``rollup_hour[_key]`` and ``rollup_day[_key]`` fold whole UTC hours and days without
  dimension or tag sets, with and without the key, for the reports that need neither.
- Dimension and tag sets are interned once (``dimsets``, ``tagsets``) and named by integer.
- ``folded`` holds the last event ``seq`` folded into the rollups. A batch only appends its
  events, and a copy of each in ``unfolded``; the rollups catch up in long runs (see
  sqlite.py), and meanwhile queries read the rollups and ``unfolded`` together.
- ``event_times`` finds the folded events by time (a ragged end, a void's or retention's
  range); the fold writes it, so a commit dirties no page of it. It has a level of recent
  entries too (``event_times_recent``, merged with the rollups' recent level), and the two
  are read as one through the view ``event_times_all``.
- Each rollup has a level of recent cells beside it (``rollup_recent``, ...: same keys and
  columns): the fold writes there, and a merge moves those cells into the big tables in
  key order, many runs at once (see ``_EVENT_FOLDS``); ``recent_events`` counts what the
  recent level holds.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from usagemeter.store.sqlplan import DAY_MS, HOUR_MS, RECENT, SQLITE, TIMES
from usagemeter.timewindows import SLOT_MS

PORTAL_TOKENS = """
-- Portal tokens (portal.py): short-lived read-only credentials, found like keys by lookup.
CREATE TABLE IF NOT EXISTS portal_tokens (
    id TEXT PRIMARY KEY,
    account TEXT NOT NULL REFERENCES accounts(id),
    metrics TEXT,
    secret_hash BLOB NOT NULL UNIQUE,
    lookup BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE INDEX IF NOT EXISTS portal_tokens_lookup ON portal_tokens(lookup);
"""

SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS accounts (
    rid INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    parent INTEGER REFERENCES accounts(rid),
    cycle_anchor TEXT,
    cycle_period TEXT,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS keys (
    rid INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    account INTEGER REFERENCES accounts(rid),
    name TEXT NOT NULL,
    prefix TEXT NOT NULL,
    scopes TEXT NOT NULL,
    secret_hash BLOB NOT NULL UNIQUE,
    lookup BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE INDEX IF NOT EXISTS keys_lookup ON keys(lookup);
"""
    + PORTAL_TOKENS
    + """CREATE TABLE IF NOT EXISTS metrics (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS dimsets (id INTEGER PRIMARY KEY, dims TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS tagsets (id INTEGER PRIMARY KEY, tags TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS tagset_tags (
    tag TEXT NOT NULL, tagset INTEGER NOT NULL, PRIMARY KEY (tag, tagset)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    account INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    metric INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    key INTEGER NOT NULL,
    billable INTEGER NOT NULL,
    dimset INTEGER NOT NULL,
    tagset INTEGER NOT NULL,
    value REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS events_dedupe ON events(account, event_id);
-- No index by time on events itself: the folded events are found by time in event_times
-- (below), the waiting ones in unfolded. The indexes of versions before: by (metric,
-- account, ts), dropped here; by (ts, metric, account), dropped once event_times is built
-- from it (sqlite.py).
DROP INDEX IF EXISTS events_time;
-- One row: events up to this seq are in the rollups, later ones are not yet. A file that
-- has none yet (new, or written when every batch folded its own) has folded them all.
CREATE TABLE IF NOT EXISTS folded (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    seq INTEGER NOT NULL
);
INSERT OR IGNORE INTO folded (one, seq) SELECT 1, coalesce(max(seq), 0) FROM events;
-- The events after the mark, as a question reads them beside the rollups (sqlplan's
-- ``pending``): the question names a metric and a range of time, so they are kept in that
-- order, and live traffic, in time order, appends to the last pages of its metric. A fold
-- empties it in the transaction that moves the mark. Opening a file folds what waits, so a
-- file of the version before (which has no copies) starts with nothing waiting.
CREATE TABLE IF NOT EXISTS unfolded (
    metric INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    account INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    key INTEGER NOT NULL,
    billable INTEGER NOT NULL,
    dimset INTEGER NOT NULL,
    tagset INTEGER NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (metric, ts, account, seq)
) WITHOUT ROWID;
"""
)
# Each rollup at two levels (see _EVENT_FOLDS below): the big table, and the same table of
# recent cells.
for _table in SQLITE.levels("rollup"):
    SCHEMA += f"""
CREATE TABLE IF NOT EXISTS {_table} (
    metric INTEGER NOT NULL,
    account INTEGER NOT NULL,
    slot INTEGER NOT NULL,
    key INTEGER NOT NULL,
    billable INTEGER NOT NULL,
    dimset INTEGER NOT NULL,
    tagset INTEGER NOT NULL,
    cnt INTEGER NOT NULL,
    total REAL NOT NULL,
    vmin REAL NOT NULL,
    vmax REAL NOT NULL,
    last_ts INTEGER NOT NULL,
    last_val REAL NOT NULL,
    last_seq INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (metric, account, slot, key, billable, dimset, tagset)
) WITHOUT ROWID;
"""
# Coarse rollups: whole UTC hours and days, without dimension or tag sets. Most reports ask
# for a metric per day or hour with no dimension in sight; these answer them from a few rows
# per unit whatever the dimensions' cardinality (a session id per event, say). The keyed
# tables put the key before the time, so one key's range is one contiguous read.
_VALUES = """
    cnt INTEGER NOT NULL,
    total REAL NOT NULL,
    vmin REAL NOT NULL,
    vmax REAL NOT NULL,
    last_ts INTEGER NOT NULL,
    last_val REAL NOT NULL,
    last_seq INTEGER NOT NULL DEFAULT 0,"""
for _table in (t for base in ("rollup_hour_key", "rollup_day_key") for t in SQLITE.levels(base)):
    SCHEMA += f"""
CREATE TABLE IF NOT EXISTS {_table} (
    metric INTEGER NOT NULL,
    account INTEGER NOT NULL,
    key INTEGER NOT NULL,
    slot INTEGER NOT NULL,
    billable INTEGER NOT NULL,{_VALUES}
    PRIMARY KEY (metric, account, key, slot, billable)
) WITHOUT ROWID;
"""
for _table in (t for base in ("rollup_hour", "rollup_day") for t in SQLITE.levels(base)):
    SCHEMA += f"""
CREATE TABLE IF NOT EXISTS {_table} (
    metric INTEGER NOT NULL,
    account INTEGER NOT NULL,
    slot INTEGER NOT NULL,
    billable INTEGER NOT NULL,{_VALUES}
    PRIMARY KEY (metric, account, slot, billable)
) WITHOUT ROWID;
"""

# The events folded into the recent level since it was last empty: a merge is due past
# MERGE_EVENTS of them (sqlite.py). One row; a fold adds its run in its own transaction.
SCHEMA += """
CREATE TABLE IF NOT EXISTS recent_events (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    events INTEGER NOT NULL
);
INSERT OR IGNORE INTO recent_events (one, events) VALUES (1, 0);
"""

# A rollup row absorbs a run's partial row. The latest value is the one with the greatest
# timestamp; on a tie the later event wins, as the later report of a gauge should. Each row
# keeps the seq of its latest event beside its timestamp, so that a question folding several
# rows (two dimension sets' slots tied at one millisecond, keys' hours, a report's total)
# breaks their tie as one row does (sqlplan's Dialect.rank). A row written before it was
# kept has 0 (``add_latest_seqs``): it ranks as its timestamp's earliest event, its events
# having come before every event with a seq kept; on equal pairs (two such rows) the
# absorbed row wins, its events having come later (a run's, a recent cell's).
_LATER = "(excluded.last_ts, excluded.last_seq) >= (last_ts, last_seq)"
UPSERT_SET = f"""ON CONFLICT DO UPDATE SET
    cnt = cnt + excluded.cnt,
    total = total + excluded.total,
    vmin = min(vmin, excluded.vmin),
    vmax = max(vmax, excluded.vmax),
    last_val = CASE WHEN {_LATER} THEN excluded.last_val ELSE last_val END,
    last_seq = CASE WHEN {_LATER} THEN excluded.last_seq ELSE last_seq END,
    last_ts = max(last_ts, excluded.last_ts)
"""

SCHEMA_VERSION = 6  # PRAGMA user_version; a file of another version has its rollups rebuilt
# Version 2 folded every batch into the rollups as it stored it: a file it wrote has folded
# all its events, and needs no rebuild, only the mark that says so.
FOLDED_EVERY_BATCH = 2
# Version 3 kept today's rollups and indexed every event by time as it stored it
# (events_ts); a file it wrote needs only its event_times built, from that index.
INDEXED_EVERY_BATCH = 3
# Version 4 folded into the big rollups themselves: a file it wrote gets an empty recent
# level (and one it opened last, after this version, has its recent level emptied: it
# rebuilt the big rollups from the events, recent cells included).
ONE_LEVEL = 4
# Version 5 kept the rollups at two levels, and the folded events by time at one: a file it
# wrote opens as it is, its recent cells kept (and one it opened last, after this version,
# has its recent entries by time dropped: it built ``event_times`` again from every folded
# event, those entries' events included).
TIMES_AT_ONE_LEVEL = 5

# The folded events by time, for the ragged millisecond ends of a range (each shorter than
# a 15-minute slot), the voids' and retention's time filters. The fold writes it, not each
# commit. Why: a backfill's times are random, so an index by time kept by each commit
# dirtied a page of its own per event once the index outgrew the cache (at 10M events,
# about 30 of the 85 µs of the server's CPU an event, round 12); the fold writes a run's
# entries sorted by key, so each page once per run. The events waiting for their fold are
# in ``unfolded``, read beside it (sqlplan's raw read), and the fold moves them from one to
# the other in one transaction. Time first, as the index it replaces: a ragged end scans
# less than a slot of every account's entries, checking metric and account here before it
# reads an event, retention drops a prefix, and a file of version 3 copies its index in
# order, without a sort.
EVENT_TIMES = """CREATE TABLE event_times (
    ts INTEGER NOT NULL,
    metric INTEGER NOT NULL,
    account INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (ts, metric, account, seq)
) WITHOUT ROWID"""
_TIME_COLUMNS = "ts, metric, account, seq"
# The folded events by time at two levels, as the rollups (below): a fold writes its run's
# entries into ``event_times_recent``, small enough to stay in the writer's cache, and a
# merge moves them into ``event_times`` in its key order, a range of times a step. Why: a
# backfill's times are random, so a run of 200,000 spread events into a store of 10M wrote
# 50,000 of the big table's pages (a quarter of all the WAL a backfill wrote, round 15); a
# merge writes each of them once for the many runs it gathers. Each entry is in one level.
EVENT_TIMES_RECENT = EVENT_TIMES.replace("event_times", "event_times_recent", 1)
SCHEMA += f"""
{EVENT_TIMES_RECENT.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS", 1)};
"""
# Both levels, read as one (sqlplan's TIMES): a condition on it, a window's bounds
# included, is pushed into each level and found there by its key. A view: nothing is stored
# twice.
SCHEMA += f"""
CREATE VIEW IF NOT EXISTS {TIMES} AS SELECT {_TIME_COLUMNS} FROM event_times
UNION ALL SELECT {_TIME_COLUMNS} FROM event_times_recent;
"""
# The events of ``where`` into event_times (or ``table``), in its key's order (a run's
# entries then fill each page they touch at once, and a sorted copy of the old index needs
# no sort).
TIME_EVENTS = (
    f"INSERT INTO {{table}} ({_TIME_COLUMNS}) SELECT {_TIME_COLUMNS} FROM events"
    " WHERE {where} ORDER BY ts, metric, account, seq"
)
# Events about to be deleted: the keys of their entries, kept in ``temp.gone_times`` so
# that the entries go after them, each found by its key (UNTIME_GONE: one per level).
GONE_TIMES = f"SELECT {_TIME_COLUMNS} FROM events WHERE {{where}}"
UNTIME_GONE = tuple(
    f"DELETE FROM {table} WHERE ({_TIME_COLUMNS}) IN (SELECT {_TIME_COLUMNS} FROM temp.gone_times)"
    for table in ("event_times", "event_times_recent")
)
# The events with a time in [?, ?) (or before ?), by their entries: a condition on events.
TIMED_BETWEEN = f"seq IN (SELECT seq FROM {TIMES} WHERE ts >= ? AND ts < ?)"
TIMED_BEFORE = f"seq IN (SELECT seq FROM {TIMES} WHERE ts < ?)"
# One step of a merge of the recent entries: those up to the key (?, ?, ?, ?), or all.
_TIMES_KEY = f"({_TIME_COLUMNS})"
MERGE_TIMES_UP_TO = (
    f"INSERT INTO event_times ({_TIME_COLUMNS}) SELECT {_TIME_COLUMNS} FROM event_times_recent"
    f" WHERE {_TIMES_KEY} <= (?, ?, ?, ?) ORDER BY {_TIME_COLUMNS}",
    f"DELETE FROM event_times_recent WHERE {_TIMES_KEY} <= (?, ?, ?, ?)",
)
MERGE_TIMES_ALL = (
    f"INSERT INTO event_times ({_TIME_COLUMNS}) SELECT {_TIME_COLUMNS} FROM event_times_recent"
    f" ORDER BY {_TIME_COLUMNS}",
    "DELETE FROM event_times_recent",
)
# The key of the entry ? places into the recent level, in key order: a step's bound.
TIMES_BOUND = (
    f"SELECT {_TIME_COLUMNS} FROM event_times_recent ORDER BY {_TIME_COLUMNS} LIMIT 1 OFFSET ?"
)


# Each rollup table: its key columns in primary-key order, and the unit its slot counts.
ROLLUP_KEYS: dict[str, tuple[tuple[str, ...], int]] = {
    "rollup": (("metric", "account", "slot", "key", "billable", "dimset", "tagset"), SLOT_MS),
    "rollup_hour_key": (("metric", "account", "key", "slot", "billable"), HOUR_MS),
    "rollup_day_key": (("metric", "account", "key", "slot", "billable"), DAY_MS),
    "rollup_hour": (("metric", "account", "slot", "billable"), HOUR_MS),
    "rollup_day": (("metric", "account", "slot", "billable"), DAY_MS),
}
ROLLUP_TABLES = tuple(ROLLUP_KEYS)

# A run is folded event by event, in the order the events arrived, by upserts that SQLite
# runs in C: each event adds itself to its cell (UPSERT_SET), so the latest value is the
# last of the greatest timestamp without a tie to break. Why not GROUP BY first: grouping a
# run by a rollup's key sorts the run, and an import spread over months has nearly a cell
# per event (200,000 events: 200,000 slots, 190,000 key hours), so the sorts were most of
# the fold (2.0 s of CPU for 200,000 such events, 0.9 s event by event). The upsert finds
# its row in a B-tree whose pages a run touches again and again, all in the cache.
RUN_ROWS = 1 << 20  # events one pass covers: the run's hours wait in memory meanwhile

# A run's cells per key and hour, then per hour, in temporary tables (in memory). The
# coarser rollups fold from these, a few rows per hour, instead of from every event again.
# Hours across keys can tie on their latest timestamp (two keys' events at one ms): their
# rows keep the seq of their latest event (UPSERT_SET), and the later event wins the tie.
_HOURS = {"fold_key_hours": "rollup_hour_key", "fold_hours": "rollup_hour"}
_FROM_HOURS = {"rollup_hour_key": "fold_key_hours", "rollup_day_key": "fold_key_hours",
               "rollup_hour": "fold_hours", "rollup_day": "fold_hours"}  # fmt: skip
_VALUE_COLUMNS = "cnt, total, vmin, vmax, last_ts, last_val, last_seq"


def _hours_ddl(temp: str) -> str:
    keys = ", ".join(ROLLUP_KEYS[_HOURS[temp]][0])
    return f"""CREATE TEMP TABLE IF NOT EXISTS {temp} (
    {keys}, {_VALUE_COLUMNS}, PRIMARY KEY ({keys})
) WITHOUT ROWID"""


def _select(keys: tuple[str, ...], slot: str) -> str:
    return ", ".join(slot if k == "slot" else k for k in keys)


def _from_events(table: str, source: str, level: str = "") -> str:
    """Add each row of ``source`` with ``?1 < rowid <= ?2``, in rowid order (the order
    they arrived), into ``table``: the slots (at ``level``), or the temporary key hours."""
    temp = table.removeprefix("temp.")
    keys = ROLLUP_KEYS[_HOURS.get(temp, temp)][0]
    unit = SLOT_MS if table == "rollup" else HOUR_MS
    # Integer division truncates, as // floors, for the ts >= 0 that ingest admits.
    target = table + level if table == "rollup" else table
    head = f"INSERT INTO {target} ({', '.join(keys)}, {_VALUE_COLUMNS}"
    values = f"SELECT {_select(keys, f'ts / {unit}')}, 1, value, value, value, ts, value, seq"
    where = f"FROM {source} WHERE rowid > ?1 AND rowid <= ?2 ORDER BY rowid"
    return f"{head}) {values} {where} {UPSERT_SET}"


def _from_hours(table: str, level: str) -> str:
    """Add the run's rows of ``_FROM_HOURS[table]`` into ``table`` at ``level``, walking
    them in their key's order."""
    keys, unit = ROLLUP_KEYS[table]
    source = _FROM_HOURS[table]
    select = _select(keys, "slot" if unit == HOUR_MS else f"slot / {unit // HOUR_MS}")
    return f"""INSERT INTO {table}{level} ({", ".join(keys)}, {_VALUE_COLUMNS})
SELECT {select}, {_VALUE_COLUMNS} FROM temp.{source} WHERE true
{UPSERT_SET}"""


# The hours across keys, from the key hours: a row per key hour instead of one per event.
_HOURS_FROM_KEY_HOURS = f"""INSERT INTO temp.fold_hours
    ({", ".join(ROLLUP_KEYS["rollup_hour"][0])}, {_VALUE_COLUMNS})
SELECT {", ".join(ROLLUP_KEYS["rollup_hour"][0])}, {_VALUE_COLUMNS}
FROM temp.fold_key_hours WHERE true
{UPSERT_SET}"""


def _fold_statements(source: str, level: str) -> tuple[tuple[str, int], ...]:
    """A run's fold from ``source`` into the rollups' ``level`` (RECENT, or "": the big
    tables): each statement, and how many of the run's bounds (start, end) it takes."""
    return (
        (_from_events("rollup", source, level), 2),
        *((f"DELETE FROM temp.{temp}", 0) for temp in _HOURS),
        (_from_events("temp.fold_key_hours", source), 2),
        (_HOURS_FROM_KEY_HOURS, 0),
        *((_from_hours(table, level), 0) for table in _FROM_HOURS),
    )


# The rollups at two levels, as a log-structured store keeps its data. A fold writes its
# run's cells into a level of recent cells (each rollup's table named with RECENT, same keys
# and columns), small enough to stay in the cache; a merge moves them into the big tables in
# key order now and then, many runs at once (``MERGE_STEP``). Why: a backfill's times are
# random, so once the big rollups outgrew the cache each event of a run dirtied a page of
# its own in each (a run of 100,000 spread events into a store of 10M: 66,000 pages of
# ``rollup``), and the fold was most of what such an event cost. A merge rewrites each page
# of the big tables once for the many runs it gathers. A question reads both levels in one
# statement (sqlplan's ``levels``); a cell's events are in one level or split between them
# (the recent one holding the later events), never counted in both: a merge's step moves
# its rows and deletes them from the recent level in one transaction.
_EVENT_FOLDS = _fold_statements("events", RECENT)
RUN_TABLE = "temp.fold_run"
_RUN_FOLDS = _fold_statements(RUN_TABLE, RECENT)
_REBUILD_FOLDS = _fold_statements(RUN_TABLE, "")  # all of it, straight into the big tables
ROLLUP_COLUMNS = "metric, account, key, billable, dimset, tagset, ts, value"
# A group's events, from the first seq it stored, into ``unfolded`` (one statement in C),
# in the order they arrived. Sorted first into the table's key order, as until round 9,
# live traffic (in time order already) paid the sort, 0.25 of the copy's 1.1 µs an event,
# and events spread over months went in no faster (2.2 against 2.1 µs).
COPY_UNFOLDED = (
    f"INSERT INTO unfolded ({ROLLUP_COLUMNS}, seq) SELECT {ROLLUP_COLUMNS}, seq FROM events"
    " WHERE seq > ?"
)


def _fold_run(
    conn: sqlite3.Connection, statements: tuple[tuple[str, int], ...], start: int, end: int
) -> None:
    for temp in _HOURS:
        conn.execute(_hours_ddl(temp))
    for low in range(start, end, RUN_ROWS):
        bounds = (low, min(low + RUN_ROWS, end))
        for statement, taken in statements:
            conn.execute(statement, bounds[:taken])


def fold_events(conn: sqlite3.Connection, start: int, end: int) -> None:
    """Fold the events with ``start < seq <= end`` into every rollup."""
    _fold_run(conn, _EVENT_FOLDS, start, end)


def fold_selected(
    conn: sqlite3.Connection, select: str, params: Sequence[Any] = (), big: bool = False
) -> None:
    """Fold the rows ``select`` returns (ROLLUP_COLUMNS then the event's seq, 0 if unknown,
    earliest first) into every rollup
    (the recent level; the big tables with ``big``, for a rebuild): numbered in a temporary
    table, then folded as a run of events is."""
    conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS fold_run ({ROLLUP_COLUMNS}, seq)")
    conn.execute(f"DELETE FROM {RUN_TABLE}")
    conn.execute(f"INSERT INTO {RUN_TABLE} ({ROLLUP_COLUMNS}, seq) {select}", params)
    end = conn.execute(f"SELECT coalesce(max(rowid), 0) FROM {RUN_TABLE}").fetchone()[0]
    _fold_run(conn, _REBUILD_FOLDS if big else _RUN_FOLDS, 0, end)
    conn.execute(f"DELETE FROM {RUN_TABLE}")


def merge_statements(where: str) -> tuple[str, ...]:
    """One step of a merge: the recent cells of every rollup that ``where`` selects (by metric
    and account) added into the big tables, walked in their key order (so each big page is
    read and written once), then deleted from the recent level. Every rollup's key begins
    with (metric, account), so a step moves the same accounts' cells in all five, and a
    question finds each of them once, in one level or the other."""
    statements: list[str] = []
    for table, (keys, _) in ROLLUP_KEYS.items():
        columns = f"{', '.join(keys)}, {_VALUE_COLUMNS}"
        # The recent cell's events came after the big one's: on a tie of timestamps its
        # latest value wins, as UPSERT_SET says.
        statements.append(
            f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {table}{RECENT}"
            f" WHERE {where} ORDER BY {', '.join(keys)} {UPSERT_SET}"
        )
        statements.append(f"DELETE FROM {table}{RECENT} WHERE {where}")
    return tuple(statements)


MERGE_ALL = merge_statements("true")
# The cells with (metric, account) up to (?1, ?2).
MERGE_UP_TO = merge_statements("(metric, account) <= (?1, ?2)")

# A dense account's cells, merged alone once appends pause (sqlite.py's ``merge_dense``). Why: a
# backfill fills the heavy account's hours and slots in both levels, and a question that
# reads two levels costs a fifth to a half more than one reading the big tables alone, even
# when it finds few rows in the recent one (twice the parts). A dense account's cells lie
# together in each big table (every key begins with (metric, account)), so moving them
# rewrites few pages that take many cells each, where a sparse account's cell costs a page of
# its own (what the recent level saves); its questions then read the big tables alone.
# The (metric, account) pairs with at least ? hours in the recent level, in key order:
DENSE_ACCOUNTS = (
    f"SELECT metric, account FROM rollup_hour{RECENT}"
    " GROUP BY metric, account HAVING count(*) >= ? ORDER BY metric, account"
)
# One (metric, account)'s recent cells, (?1, ?2): they are then in the big tables alone.
MERGE_DENSE = merge_statements("metric = ?1 AND account = ?2")


def add_latest_seqs(conn: sqlite3.Connection) -> None:
    """Give a file written before rollup rows kept their latest event's seq the column: 0 in
    its rows (see UPSERT_SET). A column with a constant default rewrites no row, so a store
    of 10M opens at once."""
    for base in ROLLUP_TABLES:
        for table in SQLITE.levels(base):
            columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            if "last_seq" not in columns:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN last_seq INTEGER NOT NULL DEFAULT 0")
