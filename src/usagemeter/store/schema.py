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
  events; the rollups catch up in runs of many batches (see sqlite.py), and always before a
  query reads them.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from usagemeter.store.sqlplan import DAY_MS, HOUR_MS
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
-- Raw events are read only for the ragged millisecond ends of a range, each shorter than a
-- 15-minute slot: time first, so that live traffic, which arrives in time order, appends to
-- this index's last pages. Led by (metric, account) as it was (events_time), each batch
-- dirtied a page per (metric, account) it touched: most of its commit's WAL, and half the
-- rate of the table with its dedupe index alone. A ragged end now scans the events of all
-- accounts in less than a slot, checking metric and account in the index.
CREATE INDEX IF NOT EXISTS events_ts ON events(ts, metric, account);
DROP INDEX IF EXISTS events_time;
-- One row: events up to this seq are in the rollups, later ones are not yet. A file that
-- has none yet (new, or written when every batch folded its own) has folded them all.
CREATE TABLE IF NOT EXISTS folded (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    seq INTEGER NOT NULL
);
INSERT OR IGNORE INTO folded (one, seq) SELECT 1, coalesce(max(seq), 0) FROM events;
CREATE TABLE IF NOT EXISTS rollup (
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
    PRIMARY KEY (metric, account, slot, key, billable, dimset, tagset)
) WITHOUT ROWID;
"""
)
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
    last_val REAL NOT NULL,"""
for _table in ("rollup_hour_key", "rollup_day_key"):
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
for _table in ("rollup_hour", "rollup_day"):
    SCHEMA += f"""
CREATE TABLE IF NOT EXISTS {_table} (
    metric INTEGER NOT NULL,
    account INTEGER NOT NULL,
    slot INTEGER NOT NULL,
    billable INTEGER NOT NULL,{_VALUES}
    PRIMARY KEY (metric, account, slot, billable)
) WITHOUT ROWID;
"""

# A rollup row absorbs a batch's partial row. The latest value is the one with the greatest
# timestamp; on a tie the later write wins, as the later report of a gauge should.
UPSERT_SET = """ON CONFLICT DO UPDATE SET
    cnt = cnt + excluded.cnt,
    total = total + excluded.total,
    vmin = min(vmin, excluded.vmin),
    vmax = max(vmax, excluded.vmax),
    last_val = CASE WHEN excluded.last_ts >= last_ts THEN excluded.last_val ELSE last_val END,
    last_ts = max(last_ts, excluded.last_ts)
"""
UPSERT_SLOTS = "INSERT INTO rollup VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) " + UPSERT_SET
UPSERT_KEY_HOURS = "INSERT INTO rollup_hour_key VALUES (?,?,?,?,?,?,?,?,?,?,?) " + UPSERT_SET
UPSERT_KEY_DAYS = "INSERT INTO rollup_day_key VALUES (?,?,?,?,?,?,?,?,?,?,?) " + UPSERT_SET
UPSERT_HOURS = "INSERT INTO rollup_hour VALUES (?,?,?,?,?,?,?,?,?,?) " + UPSERT_SET
UPSERT_DAYS = "INSERT INTO rollup_day VALUES (?,?,?,?,?,?,?,?,?,?) " + UPSERT_SET

SCHEMA_VERSION = 3  # PRAGMA user_version; a file of another version has its rollups rebuilt
# Version 2 folded every batch into the rollups as it stored it: a file it wrote has folded
# all its events, and needs no rebuild, only the mark that says so.
FOLDED_EVERY_BATCH = 2
ROLLUP_TABLES = ("rollup", "rollup_hour_key", "rollup_day_key", "rollup_hour", "rollup_day")


class Rollups:
    """A run of events' partial rollup rows at every grain, written with one upsert per
    grain."""

    def __init__(self) -> None:
        self.slots: dict[tuple[int, ...], list[Any]] = {}
        self.key_hours: dict[tuple[int, ...], list[Any]] = {}
        self.key_days: dict[tuple[int, ...], list[Any]] = {}
        self.hours: dict[tuple[int, ...], list[Any]] = {}
        self.days: dict[tuple[int, ...], list[Any]] = {}

    def add(
        self,
        metric: int,
        account: int,
        key: int,
        billable: int,
        dimset: int,
        tagset: int,
        ts: int,
        value: float,
    ) -> None:
        hour, day = ts // HOUR_MS, ts // DAY_MS
        slot = (metric, account, ts // SLOT_MS, key, billable, dimset, tagset)
        fold(self.slots, slot, ts, value)
        fold(self.key_hours, (metric, account, key, hour, billable), ts, value)
        fold(self.key_days, (metric, account, key, day, billable), ts, value)
        fold(self.hours, (metric, account, hour, billable), ts, value)
        fold(self.days, (metric, account, day, billable), ts, value)

    def write(self, conn: sqlite3.Connection) -> None:
        # In primary-key order: each B-tree page is then dirtied in one stretch, where a
        # run's rows in arrival order would revisit pages that a large fold's cache spill
        # had already written out.
        for statement, rows in (
            (UPSERT_SLOTS, self.slots),
            (UPSERT_KEY_HOURS, self.key_hours),
            (UPSERT_KEY_DAYS, self.key_days),
            (UPSERT_HOURS, self.hours),
            (UPSERT_DAYS, self.days),
        ):
            conn.executemany(statement, [rows[key] for key in sorted(rows)])


def fold(
    into: dict[tuple[int, ...], list[Any]], key: tuple[int, ...], ts: int, value: float
) -> None:
    """Add one event to a run's partial rollup row: the key's columns, then count, sum, min,
    max, last ts, last value (so the row is the upsert's parameters as it stands)."""
    acc = into.get(key)
    if acc is None:
        into[key] = [*key, 1, value, value, value, ts, value]
        return
    acc[-6] += 1
    acc[-5] += value
    if value < acc[-4]:
        acc[-4] = value
    if value > acc[-3]:
        acc[-3] = value
    if ts >= acc[-2]:
        acc[-2] = ts
        acc[-1] = value
