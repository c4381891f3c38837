"""The PostgreSQL database's tables, as numbered migrations applied under an advisory lock.

The layout is the SQLite store's (schema.py) with three changes that many processes and
sharding ask for:

- Every key of a table that grows with usage leads with the account (``event_ids``,
  ``events``' index, every rollup), so Citus can distribute them all by ``account`` and keep
  an account's rows, and its transactions, on one node. The small dictionaries (accounts,
  keys, metrics, dimension and tag sets) are reference tables there.
- Raw events are partitioned by UTC month (declarative partitioning), so retention drops a
  partition instead of deleting rows. A partition is created when a batch first needs it;
  the default partition catches anything that has none.
- The dedupe key lives in ``event_ids``, outside the partitioned table: a unique index on a
  partitioned table must include the partition key (ts), which would let the same id in two
  months through. ``event_ids`` remembers every (account, id) forever, with a digest of the
  first payload so that a different payload under a known id is reported as a conflict.
- A batch does not fold its events into the rollups: it copies the columns a fold needs
  into ``unfolded``, an insert-only table no other writer locks a row of, and a folder
  (pgfold.py) moves long runs of them into the rollups later. Queries read the rollups and
  ``unfolded`` together (docs/scaling.md says why an event then counts exactly once).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import psycopg

from usagemeter.store.sqlplan import DAY_MS, HOUR_MS
from usagemeter.timewindows import SLOT_MS

log = logging.getLogger("usagemeter")

# pg_advisory_lock keys: any two distinct bigints this database uses for nothing else.
MIGRATION_LOCK = 0x75_6D_5F_6D_69_67  # "um_mig"
PARTITION_LOCK = 0x75_6D_5F_70_61_72  # "um_par"
FOLD_LOCK = 0x75_6D_5F_66_6F_6C  # "um_fol": shared by folds, held alone by a correction
FOLD_SHARD_LOCK = 0x75_6D_5F_66_73_00  # "um_fs" and a shard's number: one fold of it at a time

_VALUES = """
    cnt bigint NOT NULL,
    total double precision NOT NULL,
    vmin double precision NOT NULL,
    vmax double precision NOT NULL,
    last_ts bigint NOT NULL,
    last_val double precision NOT NULL,
    last_seq bigint NOT NULL DEFAULT 0"""


def floor_div(column: str, unit: int) -> str:
    # PostgreSQL's integer division truncates toward zero; the store's units floor, as
    # Python's // does, so an instant before 1970 lands in the unit that holds it.
    # mod(), not %: the text also goes through psycopg's placeholders.
    return f"(({column} - mod(mod({column}, {unit}) + {unit}, {unit})) / {unit})"


# Each rollup table: its key columns (leading with the account) and the unit its slot counts.
ROLLUPS: dict[str, tuple[tuple[str, ...], int]] = {
    "rollup": (("account", "metric", "slot", "key", "billable", "dimset", "tagset"), SLOT_MS),
    "rollup_hour_key": (("account", "metric", "key", "slot", "billable"), HOUR_MS),
    "rollup_day_key": (("account", "metric", "key", "slot", "billable"), DAY_MS),
    "rollup_hour": (("account", "metric", "slot", "billable"), HOUR_MS),
    "rollup_day": (("account", "metric", "slot", "billable"), DAY_MS),
}


def fold_into(table: str, source: str, order: str) -> str:
    """Fold the events of ``source`` (events' columns, and ``order`` telling later from
    earlier) into ``table``, adding to the rows already there. The latest value is the one
    with the greatest timestamp; on a tie the later event wins, as the later report of a
    gauge should. Rows go in key order, so concurrent batches lock them in one order.

    The latest value is the last of the greatest (ts, order, value) array: an ordered
    array_agg() sorts each group apart, which cost twice the whole fold. The array is of
    float8, exact for every ts and order below 2^53 (ts in ms: the year 287396).

    Each row keeps the ``order`` (seq) of its latest event beside its timestamp, so that a
    question folding several rows (two dimension sets' slots tied at one millisecond, keys'
    hours, a report's total) breaks their tie as one row does (sqlplan's rollup_rank). A
    row written before it was kept has 0 (``add_latest_seqs``): it ranks as its
    timestamp's earliest event, its events having come before every event with a seq kept;
    on a tie of two such the absorbed row (the later fold's) wins."""
    keys, unit = ROLLUPS[table]
    columns = ", ".join(keys)
    select = ", ".join(floor_div("ts", unit) if k == "slot" else k for k in keys)
    positions = ", ".join(str(n + 1) for n in range(len(keys)))
    later = "(excluded.last_ts, excluded.last_seq) >= (r.last_ts, r.last_seq)"
    return f"""INSERT INTO {table} AS r
    ({columns}, cnt, total, vmin, vmax, last_ts, last_val, last_seq)
SELECT {select}, count(*), sum(value), min(value), max(value), max(ts),
       (max(ARRAY[ts, {order}, value]))[3], (max(ARRAY[ts, {order}, value]))[2]::bigint
FROM {source} GROUP BY {positions} ORDER BY {positions}
ON CONFLICT ({columns}) DO UPDATE SET
    cnt = r.cnt + excluded.cnt,
    total = r.total + excluded.total,
    vmin = least(r.vmin, excluded.vmin),
    vmax = greatest(r.vmax, excluded.vmax),
    last_val = CASE WHEN {later} THEN excluded.last_val ELSE r.last_val END,
    last_seq = CASE WHEN {later} THEN excluded.last_seq ELSE r.last_seq END,
    last_ts = greatest(r.last_ts, excluded.last_ts)"""


# Version 1: the dictionaries, accounts and keys, raw events and 15-minute slots.
_V1 = f"""
CREATE TABLE accounts (
    rid bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    id text NOT NULL UNIQUE,
    name text NOT NULL,
    parent bigint REFERENCES accounts(rid),
    cycle_anchor text,
    cycle_period text,
    created_at bigint NOT NULL
);
CREATE TABLE keys (
    rid bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    id text NOT NULL UNIQUE,
    account bigint REFERENCES accounts(rid),
    name text NOT NULL,
    prefix text NOT NULL,
    scopes text NOT NULL,
    secret_hash bytea NOT NULL UNIQUE,
    lookup bytea NOT NULL,
    created_at bigint NOT NULL,
    revoked_at bigint
);
CREATE INDEX keys_lookup ON keys (lookup);
CREATE TABLE metrics (
    id integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, name text NOT NULL UNIQUE
);
-- canon is the sorted, compact JSON text the store looks sets up by; dims is what queries read.
CREATE TABLE dimsets (
    id integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    canon text NOT NULL UNIQUE,
    dims jsonb NOT NULL
);
CREATE TABLE tagsets (
    id integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, tags text NOT NULL UNIQUE
);
CREATE TABLE tagset_tags (tag text NOT NULL, tagset integer NOT NULL, PRIMARY KEY (tag, tagset));

-- Dedupe forever, whatever the month: (account, id) once, with its first payload's digest.
CREATE TABLE event_ids (
    account bigint NOT NULL,
    event_id text NOT NULL,
    digest bytea NOT NULL,
    PRIMARY KEY (account, event_id)
);
-- seq orders exports as the events arrived; a sequence rather than an identity column,
-- which partitioned tables only take from PostgreSQL 17 on.
CREATE SEQUENCE events_seq;
CREATE TABLE events (
    account bigint NOT NULL,
    metric integer NOT NULL,
    ts bigint NOT NULL,
    seq bigint NOT NULL DEFAULT nextval('events_seq'),
    event_id text NOT NULL,
    key bigint NOT NULL,
    billable smallint NOT NULL,
    dimset integer NOT NULL,
    tagset integer NOT NULL,
    value double precision NOT NULL
) PARTITION BY RANGE (ts);
CREATE TABLE events_default PARTITION OF events DEFAULT;
CREATE INDEX events_time ON events (account, metric, ts);

-- 15-minute slots with everything: any zone's hour, day or month is a whole number of them.
CREATE TABLE rollup (
    account bigint NOT NULL,
    metric integer NOT NULL,
    slot bigint NOT NULL,
    key bigint NOT NULL,
    billable smallint NOT NULL,
    dimset integer NOT NULL,
    tagset integer NOT NULL,{_VALUES},
    PRIMARY KEY (account, metric, slot, key, billable, dimset, tagset)
);
"""

# Version 2: whole UTC hours and days without dimension or tag sets, with and without the
# key (the reports that need neither read a few rows per unit), folded from what is stored.
_V2 = "".join(
    f"""
CREATE TABLE {table} (
    account bigint NOT NULL,
    metric integer NOT NULL,{" key bigint NOT NULL," if "key" in keys else ""}
    slot bigint NOT NULL,
    billable smallint NOT NULL,{_VALUES},
    PRIMARY KEY ({", ".join(keys)})
);
{fold_into(table, "events", "seq")};
"""
    for table, (keys, _) in ROLLUPS.items()
    if table != "rollup"
)

# Version 3: portal tokens (portal.py), short-lived read-only credentials found like keys.
# "IF NOT EXISTS": a database taken back to an earlier version (as the migration tests do)
# may still hold the table.
_V3 = """
CREATE TABLE IF NOT EXISTS portal_tokens (
    id text PRIMARY KEY,
    account text NOT NULL REFERENCES accounts(id),
    metrics text,
    secret_hash bytea NOT NULL UNIQUE,
    lookup bytea NOT NULL,
    created_at bigint NOT NULL,
    expires_at bigint NOT NULL,
    revoked_at bigint
);
CREATE INDEX IF NOT EXISTS portal_tokens_lookup ON portal_tokens(lookup);
"""

# Version 4: events found by arrival number, for the alerts' reader of the event log
# (alerts.py); an index per partition, appended at its right edge.
_V4 = """
CREATE INDEX IF NOT EXISTS events_by_seq ON events (seq);
"""

# Version 5: events stored but not yet folded into the rollups (pgfold.py), with the columns
# a fold and a query need, so that neither reads the partitioned events. No key: rows are
# only inserted (by batches) and deleted (by a fold, all of them at once). The index serves
# the queries' reads of the tail, which name an account, a metric and a range of time. A
# database of version 4 has every stored event in its rollups: nothing to copy here.
_V5 = """
CREATE TABLE IF NOT EXISTS unfolded (
    account bigint NOT NULL,
    metric integer NOT NULL,
    ts bigint NOT NULL,
    seq bigint NOT NULL,
    key bigint NOT NULL,
    billable smallint NOT NULL,
    dimset integer NOT NULL,
    tagset integer NOT NULL,
    value double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS unfolded_time ON unfolded (account, metric, ts);
"""

# Version 6: a version of accounts and keys (pgdirectory.py), which every statement that
# changes either moves on in its own transaction; a new number from a sequence each time, so
# that a number never names two states, even after the table is emptied (TRUNCATE fires the
# trigger too, and the next change writes the row again). A process that reads it with a
# key's lookup knows whether what it read of accounts and keys before is still what they hold.
_V6 = """
CREATE SEQUENCE IF NOT EXISTS directory_versions;
CREATE TABLE IF NOT EXISTS directory_version (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    v bigint NOT NULL
);
INSERT INTO directory_version (v) VALUES (nextval('directory_versions')) ON CONFLICT DO NOTHING;
CREATE OR REPLACE FUNCTION directory_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO directory_version (v) VALUES (nextval('directory_versions'))
    ON CONFLICT (one) DO UPDATE SET v = excluded.v;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS accounts_changed ON accounts;
CREATE TRIGGER accounts_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON accounts
    FOR EACH STATEMENT EXECUTE FUNCTION directory_changed();
DROP TRIGGER IF EXISTS keys_changed ON keys;
CREATE TRIGGER keys_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON keys
    FOR EACH STATEMENT EXECUTE FUNCTION directory_changed();
"""


def fold_values(source: str, hour: str) -> str:
    """Add the distinct dimension values of ``source``'s rows (with ``account``, ``metric``,
    ``billable`` and ``dimset``; ``hour`` their UTC hour) to ``rollup_values``. A set, so a
    value added twice is there once: what a fold adds may already be there.

    A key probe per set (OFFSET 0 keeps it one): as a plain join, PostgreSQL hashed the
    whole of ``dimsets`` on every fold, a table that grows with the sessions."""
    return f"""INSERT INTO rollup_values (account, metric, name, slot, billable, value)
SELECT DISTINCT m.account, m.metric, p.key, m.slot, m.billable, p.value
FROM (SELECT DISTINCT account, metric, {hour} AS slot, billable, dimset FROM {source}) m
CROSS JOIN LATERAL (SELECT y.dims FROM dimsets y WHERE y.id = m.dimset OFFSET 0) d
CROSS JOIN LATERAL jsonb_each_text(d.dims) p
ORDER BY 1, 2, 3, 4, 5, 6
ON CONFLICT DO NOTHING"""


# Version 7: the distinct values of each dimension per UTC hour (what a distinct count such
# as Sessions reads for the whole hours of its windows), one row per value and hour instead
# of one per 15-minute slot, key, tag set and dimension set, and no dimension set to look up
# per row. Filled from the slots, which hold every folded event, also those whose raw events
# retention dropped; what waits in ``unfolded`` is added by the fold that takes it.
_V7 = f"""
CREATE TABLE IF NOT EXISTS rollup_values (
    account bigint NOT NULL,
    metric integer NOT NULL,
    name text NOT NULL,
    slot bigint NOT NULL,
    billable smallint NOT NULL,
    value text NOT NULL,
    PRIMARY KEY (account, metric, name, slot, billable, value)
);
{fold_values("rollup", floor_div("slot", HOUR_MS // SLOT_MS))};
"""

MIGRATIONS: tuple[str, ...] = (_V1, _V2, _V3, _V4, _V5, _V6, _V7)  # version n: MIGRATIONS[n - 1]
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: psycopg.Connection[tuple[Any, ...]]) -> int:
    """Bring the database up to SCHEMA_VERSION; returns the version it was at. Two processes
    starting at once queue on the advisory lock, and the second finds nothing to do."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        found = int(row[0]) if row and row[0] is not None else 0
        if found > SCHEMA_VERSION:
            raise RuntimeError(
                f"the database is at schema version {found}, newer than this usagemeter"
                f" ({SCHEMA_VERSION}): upgrade usagemeter"
            )
        for version in range(found + 1, SCHEMA_VERSION + 1):
            log.info("migrating the PostgreSQL schema to version %s", version)
            add_latest_seqs(conn)  # a migration may fold into a table of before
            conn.execute(MIGRATIONS[version - 1])
            conn.execute("INSERT INTO schema_version VALUES (%s)", (version,))
        add_latest_seqs(conn)
    return found


def add_latest_seqs(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
    """Give each rollup table of a database of before its ``last_seq`` column (0 in its
    rows: see fold_into). A column with a constant default rewrites no row; the lock it
    takes is asked for only when the column is missing."""
    missing = conn.execute(
        "SELECT c.relname FROM pg_class c WHERE c.relname = ANY(%s) AND c.relkind IN ('r', 'p')"
        " AND c.relnamespace = current_schema()::regnamespace AND NOT EXISTS (SELECT 1"
        " FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'last_seq')",
        (list(ROLLUPS),),
    ).fetchall()
    for (table,) in missing:
        conn.execute(f"ALTER TABLE {table} ADD COLUMN last_seq bigint NOT NULL DEFAULT 0")


def month_bounds(ts_ms: int) -> tuple[str, int, int]:
    """The name and [start, end) in epoch ms of the UTC month holding ``ts_ms``."""
    at = datetime.fromtimestamp(ts_ms / 1000, UTC)
    start = datetime(at.year, at.month, 1, tzinfo=UTC)
    end = datetime(at.year + at.month // 12, at.month % 12 + 1, 1, tzinfo=UTC)
    return (
        f"events_{start:%Y_%m}",
        int(start.timestamp() * 1000),
        int(end.timestamp() * 1000),
    )


def events_partitions(conn: psycopg.Connection[tuple[Any, ...]]) -> list[tuple[str, int, int]]:
    """The monthly partitions of events that exist, as month_bounds names them."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'events'::regclass AND c.relname <> 'events_default'"
    ).fetchall()
    found = []
    for (name,) in rows:
        year, month = int(name[7:11]), int(name[12:14])
        found.append(month_bounds(int(datetime(year, month, 1, tzinfo=UTC).timestamp() * 1000)))
    return sorted(found)


def ensure_partitions(
    conn: psycopg.Connection[tuple[Any, ...]], months: set[tuple[str, int, int]]
) -> None:
    """Create the missing monthly partitions among ``months`` (from month_bounds), one
    process at a time."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
        for name, start, end in sorted(months):
            exists = conn.execute("SELECT to_regclass(%s)", (name,)).fetchone()
            if exists and exists[0] is not None:
                continue
            # Rows of this month in the default partition would make the new partition's
            # creation fail; they move into it instead (only after a partition was dropped).
            conn.execute(f"CREATE TABLE {name} (LIKE events INCLUDING DEFAULTS)")
            conn.execute(
                f"WITH moved AS (DELETE FROM events_default WHERE ts >= {start} AND ts < {end}"
                f" RETURNING *) INSERT INTO {name} SELECT * FROM moved"
            )
            conn.execute(
                f"ALTER TABLE events ATTACH PARTITION {name} FOR VALUES FROM ({start}) TO ({end})"
            )
