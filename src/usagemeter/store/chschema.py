"""The ClickHouse store's tables: raw events, the rollups the engine keeps from them, and the
small tables of accounts and keys. Every statement is idempotent (``IF NOT EXISTS``), so any
number of processes may start on the same database at once.

Times are epoch milliseconds (Int64), as in the other stores, so that a window's bounds mean
the same thing everywhere and the shared window splitter (sqlplan.split_windows) applies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from usagemeter.store.sqlplan import (
    ACCOUNT_DAYS,
    ACCOUNT_HOURS,
    DAY_MS,
    HOUR_MS,
    KEY_DAYS,
    KEY_HOURS,
    Grain,
)
from usagemeter.store.sqlplan import SLOTS as SLOTS_GRAIN
from usagemeter.timewindows import SLOT_MS

if TYPE_CHECKING:
    from usagemeter.store.chtransport import Transport

# Durable before acknowledged: each insert's part (and its directory) is fsynced before the
# INSERT returns, as SQLite's synchronous=FULL and PostgreSQL's synchronous_commit do.
_DURABLE = "fsync_after_insert = 1, fsync_part_directory = 1"
# The events table and every table its views feed remember the dedupe tokens of their last
# 10,000 inserts: a batch inserted twice with the same token (two processes racing on the
# same retried batch, see clickhouse.py) is stored once, rollups included. Every insert into
# events carries a token, so no two different batches are ever taken for one.
_TOKENS = "non_replicated_deduplication_window = 10000"
# A part smaller than this (uncompressed) is stored packed: its files (data, marks, index,
# checksums, columns, count, ...) in one file, so an insert fsyncs one file and the part's
# directory per table instead of about a dozen files. Durable as before (the packed file is
# fsynced before the part is renamed into place). Small inserts (single events, batches of
# a few thousand) write such parts: an insert of one event took 0.4 to 0.75 times as long.
# Larger parts (batches of 10,000 mostly, merged parts) stay whole: they gained little
# (1.06 times an append of 10,000), and a question read small packed parts no faster
# (docs/clickhouse.md, "Ingest, round 7").
PACKED_BELOW = 1024 * 1024
_PACKED_SETTING = "min_bytes_for_full_part_storage"


def floor_div(column: str, unit: int) -> str:
    """Floor division, as Python's ``//`` (ClickHouse's intDiv truncates toward zero, which
    would put an instant before 1970 in the unit after the one that holds it)."""
    return f"intDiv({column} - positiveModulo({column}, {unit}), {unit})"


def _year(ms: str) -> str:
    return f"toYear(toDateTime(intDiv({ms}, 1000), 'UTC'))"


# The values every rollup row holds. Plain sums, minimums and maximums are
# SimpleAggregateFunction columns (read as plain numbers); the latest value is an argMax
# state over (ts, seq), so a tie on the timestamp goes to the later write, as on SQLite.
_COUNTS = """
    cnt SimpleAggregateFunction(sum, UInt64),
    total SimpleAggregateFunction(sum, Float64),
    vmin SimpleAggregateFunction(min, Float64),
    vmax SimpleAggregateFunction(max, Float64),"""
_COUNTS_FOLD = "count() AS cnt, sum(value) AS total, min(value) AS vmin, max(value) AS vmax,"
_VALUES = _COUNTS + "\n    last AggregateFunction(argMax, Float64, Tuple(Int64, UInt64))"
_FOLD = _COUNTS_FOLD + " argMaxState(value, (ts, seq)) AS last"
# Since round 15 the tables of sets of a new database key the argMax by one number, (ts, seq)
# as a UInt128 (LATEST_KEY), which orders as the tuple does: a tuple key kept each row's
# key as a generic field, about 7 ms of CPU per view and 10,000 events of the slots' and
# the hour sets' views, a fifth of each (docs/clickhouse.md, "Ingest, round 15"). A
# database made before keeps the tuple (latest_keyed tells which; both answer alike).
# The instant's sign bit is flipped so that Int64 order is UInt64 order, any instant.
LATEST_KEY = (
    "bitOr(bitShiftLeft(toUInt128(bitXor(reinterpretAsUInt64(ts), 9223372036854775808)), 64),"
    " toUInt128(seq))"
)
_KEYED_VALUES = _COUNTS + "\n    last AggregateFunction(argMax, Float64, UInt128)"
_KEYED_FOLD = _COUNTS_FOLD + f" argMaxState(value, {LATEST_KEY}) AS last"

# A UTC year per partition (databases created before round 10 keep a month per partition,
# and work the same): an INSERT writes a part per partition its rows span, each fsynced
# before the INSERT returns, so a batch over four months wrote four parts here, now one
# (one more for a batch across New Year). Retention deletes rows (chvoids.retain) and
# compaction merges them away, whatever the partition; questions find their rows by the
# ORDER BY key and each part's range of ts, not by partition (docs/clickhouse.md, "Ingest,
# round 10").
EVENTS = f"""
-- Raw events: what every rollup is folded from, and what distinct counts, exports and
-- millisecond-exact range ends read. ORDER BY (account, metric, ts) serves every question,
-- which names an account and a metric and a time range.
CREATE TABLE IF NOT EXISTS events (
    account String,
    metric LowCardinality(String),
    ts Int64,
    id String,
    key String,                          -- '' when the event names no key
    billable UInt8,
    value Float64,
    dims Map(String, String),
    tags Array(String),
    dimset UInt64,                       -- hash of the sorted dimensions: the rollups' key
    tagset UInt64,                       -- hash of the sorted tags
    seq UInt64,                          -- arrival order: exports, and ties of "latest"
    digest String                        -- the payload's hash: a reused id with another
                                         -- payload is reported as a conflict
) ENGINE = MergeTree
PARTITION BY {_year("ts")}
ORDER BY (account, metric, ts)
SETTINGS {_DURABLE}, {_TOKENS}
"""

# Since round 16 a new database orders event_ids by the id first, in granules of 128 rows
# compressed in small blocks, and indexes the id alone: a batch's lookup reads about one
# granule per id, however many ids are stored. Keyed by (account, id) in granules of 8,192,
# a batch of 10,000 random ids (UUIDs) read every granule of the table (its accounts' ids
# match any of the batch's), 0.6 to 0.9 s at 10M ids and growing with them; ids that arrive in
# order (a counter, a time-ordered UUID) still fall in a few granules. A database made
# before keeps (account, id) (EVENT_IDS_BY_ACCOUNT; ids_by_id tells which): the same lookup
# answers on both (docs/clickhouse.md, "Ingest, round 16").
EVENT_IDS = f"""
-- Dedupe: every (account, id) ever stored, found by its key in a few granules. Kept by the
-- engine from the events; the store asks it before each insert (see clickhouse.py for the
-- lock around that and the window it leaves between processes). ReplacingMergeTree: should
-- two processes race and store the same id twice, the copies here collapse on merge.
CREATE TABLE IF NOT EXISTS event_ids (
    account String,
    id String,
    digest String
) ENGINE = ReplacingMergeTree
ORDER BY (id, account)
PRIMARY KEY id
SETTINGS {_DURABLE}, {_TOKENS}, index_granularity = 128,
    min_compress_block_size = 4096, max_compress_block_size = 16384
"""

EVENT_IDS_VIEW = """
CREATE MATERIALIZED VIEW IF NOT EXISTS event_ids_mv TO event_ids AS
SELECT account, id, digest FROM events
"""


def _sets_table(table: str, keyed: bool = True) -> str:
    # Not partitioned by month (databases created before round 6 are, and work the same):
    # nothing drops a month of rollups (retention deletes raw events only), and a batch
    # spanning months (a backfill, a migration, late events) wrote a part per month into
    # each of these two tables, every part fsynced: an append of 10,000 events over four
    # months wrote 17 parts, now 11. Questions find their rows by the ORDER BY key, as before.
    return f"""
CREATE TABLE IF NOT EXISTS {table} (
    account String,
    metric LowCardinality(String),
    slot Int64,
    key String,
    billable UInt8,
    dimset UInt64,
    tagset UInt64,
    dims SimpleAggregateFunction(any, Map(String, String)),
    tags SimpleAggregateFunction(any, Array(String)),{_KEYED_VALUES if keyed else _VALUES}
) ENGINE = AggregatingMergeTree
ORDER BY (account, metric, slot, key, billable, dimset, tagset)
SETTINGS {_DURABLE}, {_TOKENS}
"""


# 15-minute slots with everything (key, billable, dimension and tag sets): any zone's hour,
# day or month is a whole number of slots, and any filter or group can be answered here.
# ORDER BY leads with (account, metric, slot): a question reads one contiguous range.
# The dimension and tag values ride along (any() on merge): they are fixed by dimset and
# tagset.
SLOTS = _sets_table("rollup")
# The same at whole UTC hours: a grouped or tagged question reads a quarter of the rows
# (fewer where an hour repeats a set), and slots only for its ragged quarter hours. Its view
# counts the events from a boundary on, and a database that had events before it is
# backfilled up to that boundary once (chupgrade.py); the planner reads it only after that.
HOUR_SETS = "rollup_hour_sets"
HOUR_SETS_TABLE = _sets_table(HOUR_SETS)
HOUR_SETS_GRAIN = Grain(HOUR_SETS, HOUR_MS, detailed=True, keyed=True)


def _sets_select(unit: int, source: str, where: str = "", keyed: bool = True) -> str:
    # The dimensions and tags are grouped by, not folded by any(): they are fixed by dimset
    # and tagset, and any() of a Map or an Array keeps each value as a generic field, row by
    # row, which cost the slots' view half its time (docs/clickhouse.md, "Ingest, round
    # 12"). A set sent in two key orders within one insert makes two rows of one cell, as
    # two inserts do: the table's key is (..., dimset, tagset), so merges fold them, and
    # every question folds the rows it reads.
    return f"""
SELECT account, metric, {floor_div("ts", unit)} AS slot, key, billable, dimset, tagset,
       dims, tags, {_KEYED_FOLD if keyed else _FOLD}
FROM {source}{where} GROUP BY account, metric, slot, key, billable, dimset, tagset, dims, tags
"""


SLOTS_VIEW = "CREATE MATERIALIZED VIEW IF NOT EXISTS rollup_mv TO rollup AS" + _sets_select(
    SLOT_MS, "events"
)


# Exact distinct-count states per UTC hour and dimension: a distinct count with no filter,
# tag or key (Sessions per day, say) merges a day's 24 states per account rather than
# hashing every event's value out of its map of strings (round 8: Sessions per day 1.6 to
# 2.2 times as fast at 1M events, 2.5 times at 10M). Each row holds the values one
# dimension took in an hour; every (account, metric, hour, billable) that has events also
# has a row named '' (no dimension is: ingest.py refuses an empty name) whose state is
# empty, so that a window whose events lack the dimension still answers 0, as a fold of
# the events does, rather than nothing. Its view counts the events from a boundary on and
# an older database is backfilled up to it once (chupgrade.py), as for the hour table.
# Since round 14 a new database has no such table (DISTINCT_VALUES answers every question it
# did): one made before keeps it, fed by its view for older processes that read it,
# refolded by voids, and read by this version only until its distinct values are complete.
DISTINCT = "distinct_hour"
DISTINCT_GRAIN = Grain(DISTINCT, HOUR_MS, detailed=False, keyed=False)
PRESENT = "''"  # the name of the rows that say "events here", with an empty state
DISTINCT_TABLE = f"""
CREATE TABLE IF NOT EXISTS {DISTINCT} (
    account String,
    metric LowCardinality(String),
    name LowCardinality(String),         -- the dimension; {PRESENT}: see above
    slot Int64,
    billable UInt8,
    u AggregateFunction(uniqExact, String)
) ENGINE = AggregatingMergeTree
ORDER BY (account, metric, name, slot, billable)
SETTINGS {_DURABLE}, {_TOKENS}
"""


def _distinct_select(source: str, where: str = "") -> str:
    # uniqExactStateIf's state is uniqExact's own: the '' rows' states are empty.
    return f"""
SELECT account, metric, name, {floor_div("ts", HOUR_MS)} AS slot, billable,
       uniqExactStateIf(v, name != {PRESENT}) AS u
FROM {source} ARRAY JOIN arrayConcat([{PRESENT}], mapKeys(dims)) AS name,
     arrayConcat([{PRESENT}], mapValues(dims)) AS v{where}
GROUP BY account, metric, name, slot, billable
"""


# Each dimension's values, a row per value, with the UTC hours it was seen in (round 13), and
# since round 14 whether billable events were, so that the table answers every distinct
# count the distinct table did (a billable filter, several accounts, a subaccount group) and
# a new database no longer feeds that table's view: one view of distinct values per INSERT
# where round 13 had two (docs/clickhouse.md, "Questions, round 14"). Each entry of
# ``hours`` is 2 * hour + billable (hours since 1970 in UTC): a value seen in an hour in
# billable and other events has both entries; a question without a billable filter reads
# the hour of either. A distinct count over whole hours of one account, its rows merged,
# counts the values with an hour in each window, plain counts over arrays where merging the
# distinct table's states inserted each of the heavy account's 750,000 hourly values into
# its day's hash set and again into the range's ("Questions, round 13"); any other counts
# each value once per window and over the range (uniqExact of the values themselves, not
# of counts). The value is stored itself, not a hash of it: the count is exact. The rows of
# a value merge (the union of their entries). Every (account, metric) with events also has
# the row named PRESENT (value ''), whose entries are those with events, so that a window
# whose events lack the dimension still answers 0. A void refolds an (account, metric)'s
# rows whole (chvoids.py): a value's row spans all its time. Backfilled on an older
# database as the others (chupgrade.py).
DISTINCT_VALUES = "distinct_values"
DISTINCT_VALUES_TABLE = f"""
CREATE TABLE IF NOT EXISTS {DISTINCT_VALUES} (
    account String,
    metric LowCardinality(String),
    name LowCardinality(String),         -- the dimension; {PRESENT}: see above
    v String,                            -- the value ('' in the {PRESENT} rows)
    hours SimpleAggregateFunction(groupUniqArrayArray, Array(Int32))  -- 2 * UTC hour + billable
) ENGINE = AggregatingMergeTree
ORDER BY (account, metric, name, v)
SETTINGS {_DURABLE}, {_TOKENS}
"""


def _distinct_values_select(source: str, where: str = "") -> str:
    hour = floor_div("ts", HOUR_MS)
    return f"""
SELECT account, metric, name, v, groupUniqArray(toInt32(2 * {hour} + billable)) AS hours
FROM {source} ARRAY JOIN arrayConcat([{PRESENT}], mapKeys(dims)) AS name,
     arrayConcat([''], mapValues(dims)) AS v{where}
GROUP BY account, metric, name, v
"""


# Everything an hour holds per key and billable, without dimensions or tags: the count, sum,
# minimum and maximum, and the latest value as a plain tuple maximum, max((ts, seq, value)).
# It answers every report without a filter, tag or dimension group (folding the keys when
# the question has none; a day is 24 of its hours), where databases before round 9 fed six
# tables (the hour and day tables with and without the key, and the latest values per hour,
# LEGACY_GRAINS): an INSERT writes a part per table fed, each fsynced, and that was most of
# an INSERT's time (docs/clickhouse.md, "Ingest, round 9"). The latest value as a tuple
# maximum is read like a sum, where argMax states are parsed row by row (round 8: a daily
# StorageBytes report 1.98 times as fast at 1M events); the tuple orders as argMax over
# (ts, seq) did: a tie on the timestamp goes to the later write. Backfilled on an older
# database as the hour table of sets is (chupgrade.py).
HOUR_VALUES = "hour_values"
HOUR_VALUES_GRAIN = Grain(HOUR_VALUES, HOUR_MS, detailed=False, keyed=True)


def _per_hour_and_key(table: str, values: str) -> str:
    """A table of values per UTC hour, key and billable, the one shape of hour_values and
    of the latest values before it."""
    return f"""
CREATE TABLE IF NOT EXISTS {table} (
    account String,
    metric LowCardinality(String),
    slot Int64,
    key String,
    billable UInt8,
    {values}
) ENGINE = AggregatingMergeTree
ORDER BY (account, metric, slot, key, billable)
SETTINGS {_DURABLE}, {_TOKENS}
"""


_TOP = "top SimpleAggregateFunction(max, Tuple(Int64, UInt64, Float64))  -- (ts, seq, value)"
HOUR_VALUES_TABLE = _per_hour_and_key(
    HOUR_VALUES,
    """cnt SimpleAggregateFunction(sum, UInt64),
    total SimpleAggregateFunction(sum, Float64),
    vmin SimpleAggregateFunction(min, Float64),
    vmax SimpleAggregateFunction(max, Float64),
    """
    + _TOP,
)

# The planner reads the latest values' hours here (chplan._latest_tops).
LATEST = HOUR_VALUES
LATEST_GRAIN = HOUR_VALUES_GRAIN


def _hour_values_select(source: str, where: str = "") -> str:
    return f"""
SELECT account, metric, {floor_div("ts", HOUR_MS)} AS slot, key, billable, count() AS cnt,
       sum(value) AS total, min(value) AS vmin, max(value) AS vmax, max((ts, seq, value)) AS top
FROM {source}{where} GROUP BY account, metric, slot, key, billable
"""


# Before round 9: the latest value per UTC hour, key and billable alone (round 8), and the
# hour and day tables with and without the key (the SQL stores' coarse grains). A database
# created before keeps them, fed by their views, for the processes of older versions that
# read them (a rolling upgrade): this version never creates them, reads them only until
# hour_values is complete, and refolds and deletes their cells with the others'.
LEGACY_LATEST = "latest_hour"
LEGACY_LATEST_GRAIN = Grain(LEGACY_LATEST, HOUR_MS, detailed=False, keyed=True)
LEGACY_GRAINS = (LEGACY_LATEST_GRAIN, KEY_HOURS, KEY_DAYS, ACCOUNT_HOURS, ACCOUNT_DAYS)
LEGACY_LATEST_TABLE = _per_hour_and_key(LEGACY_LATEST, _TOP)


def _latest_select(source: str, where: str = "") -> str:
    return f"""
SELECT account, metric, {floor_div("ts", HOUR_MS)} AS slot, key, billable,
       max((ts, seq, value)) AS top
FROM {source}{where} GROUP BY account, metric, slot, key, billable
"""


def _coarse_select(unit: int, keyed: bool, source: str, where: str = "") -> str:
    key = " key," if keyed else ""
    return f"""
SELECT account, metric,{key} {floor_div("ts", unit)} AS slot, billable, {_FOLD}
FROM {source}{where} GROUP BY account, metric,{key} slot, billable
"""


def _coarse(table: str, unit: int, keyed: bool) -> tuple[str, str]:
    key = " key," if keyed else ""
    return (
        f"""
-- Whole UTC {"hours" if unit == HOUR_MS else "days"} without dimensions or tags
-- ({"with" if keyed else "without"} the key): reports that need neither read a few rows per
-- unit. ORDER BY (account, metric,{key} slot): one range per question.
CREATE TABLE IF NOT EXISTS {table} (
    account String,
    metric LowCardinality(String),{" key String," if keyed else ""}
    slot Int64,
    billable UInt8,{_VALUES}
) ENGINE = AggregatingMergeTree
ORDER BY (account, metric,{key} slot, billable)
SETTINGS {_DURABLE}, {_TOKENS}
""",
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {table}_mv TO {table} AS"
        + _coarse_select(unit, keyed, "events"),
    )


def fold_select(table: str, source: str, where: str = "", keyed_latest: bool = True) -> str:
    """The SELECT that folds the events of ``source`` (a table or subquery with the events'
    columns; ``where`` narrows them) into rows of rollup ``table``, column for column: what
    its view runs on every insert, and what a void runs to recompute the cells it cleared.
    ``keyed_latest``: the database's tables of sets key the latest value by LATEST_KEY."""
    if table == "rollup":
        return _sets_select(SLOT_MS, source, where, keyed_latest)
    if table == HOUR_SETS:
        return _sets_select(HOUR_MS, source, where, keyed_latest)
    if table == DISTINCT:
        return _distinct_select(source, where)
    if table == HOUR_VALUES:
        return _hour_values_select(source, where)
    if table == DISTINCT_VALUES:
        return _distinct_values_select(source, where)
    if table == LEGACY_LATEST:
        return _latest_select(source, where)
    unit = HOUR_MS if "hour" in table else DAY_MS
    return _coarse_select(unit, table.endswith("_key"), source, where)


def backfilled_view(table: str, boundary: int, keyed_latest: bool = True) -> str:
    """The view of a table that chupgrade.py backfills: it folds the events of ``seq >=
    boundary`` as each insert lands; the boundary is part of its definition, so every
    process reads the same one."""
    return f"CREATE MATERIALIZED VIEW IF NOT EXISTS {table}_mv TO {table} AS" + fold_select(
        table, "events", f" WHERE seq >= {int(boundary)}", keyed_latest
    )


def backfill(
    table: str, boundary: int, start_ms: int, end_ms: int, keyed_latest: bool = True
) -> str:
    """The events of [start_ms, end_ms) that ``table``'s view did not count (``seq <
    boundary``), folded into it."""
    settings = "SETTINGS insert_deduplicate = 0, max_partitions_per_insert_block = 0"
    where = f" WHERE seq < {int(boundary)} AND ts >= {int(start_ms)} AND ts < {int(end_ms)}"
    return f"INSERT INTO {table} {settings}" + fold_select(table, "events", where, keyed_latest)


ACCOUNTS = f"""
-- Accounts and keys: small tables read whole or by id. A key's revocation is a newer
-- version of its row (ReplacingMergeTree on version); reads use FINAL, so they see one row
-- per id at once, merged or not.
CREATE TABLE IF NOT EXISTS accounts (
    id String,
    name String,
    parent Nullable(String),
    cycle_anchor Nullable(String),
    cycle_period Nullable(String),
    created_at Int64,
    seq UInt64                           -- creation order, for listings
) ENGINE = ReplacingMergeTree
ORDER BY id
SETTINGS {_DURABLE}
"""

KEYS = f"""
CREATE TABLE IF NOT EXISTS keys (
    id String,
    account Nullable(String),
    name String,
    prefix String,
    scopes String,
    secret_hash String,                  -- hex of the digest; auth compares it whole
    lookup String,                       -- hex of its first bytes: what requests look up by
    created_at Int64,
    revoked_at Nullable(Int64),
    seq UInt64,                          -- creation order, for listings
    version UInt64
) ENGINE = ReplacingMergeTree(version)
ORDER BY id
SETTINGS {_DURABLE}
"""

# Tables before the views that write into them; the events table before the views on it.
# The views of the tables chupgrade.py backfills are created by it (their boundary).
STATEMENTS: tuple[str, ...] = (
    ACCOUNTS,
    KEYS,
    EVENTS,
    EVENT_IDS,
    EVENT_IDS_VIEW,
    SLOTS,
    SLOTS_VIEW,
    HOUR_SETS_TABLE,
    HOUR_VALUES_TABLE,
    DISTINCT_VALUES_TABLE,
)
TABLES = (
    "accounts",
    "keys",
    "events",
    "event_ids",
    "rollup",
    HOUR_SETS,
    HOUR_VALUES,
    DISTINCT_VALUES,
)
# The rollups of every database, each refolded by a void: ClickHouse's own grains, apart
# from the SQL stores' (voidsql.ROLLUP_GRAINS); an older database adds the LEGACY_GRAINS it has.
GRAINS = (SLOTS_GRAIN, HOUR_SETS_GRAIN, HOUR_VALUES_GRAIN)
# What a database created before round 9 held besides: tests build one with them.
LEGACY_STATEMENTS: tuple[str, ...] = (
    LEGACY_LATEST_TABLE,
    backfilled_view(LEGACY_LATEST, 0),
    *_coarse("rollup_hour_key", HOUR_MS, keyed=True),
    *_coarse("rollup_day_key", DAY_MS, keyed=True),
    *_coarse("rollup_hour", HOUR_MS, keyed=False),
    *_coarse("rollup_day", DAY_MS, keyed=False),
)


def pack_small_parts(transport: Transport) -> None:
    """Give every table of TABLES the packed storage of small parts (PACKED_BELOW), a table
    created before round 7 too. Set by ALTER rather than in the DDL: a server that does not
    know the setting (packed parts are recent) keeps its tables as they are, and works."""
    known = transport.query(
        f"SELECT count() FROM system.merge_tree_settings WHERE name = '{_PACKED_SETTING}'"
    )
    if not known or not int(known[0][0]):
        return
    tables = ", ".join(f"'{name}'" for name in TABLES)
    rows = transport.query(
        "SELECT name, engine_full FROM system.tables"
        f" WHERE database = currentDatabase() AND name IN ({tables})"
    )
    for name, engine in rows:
        if _PACKED_SETTING not in engine:
            transport.command(
                f"ALTER TABLE {name} MODIFY SETTING {_PACKED_SETTING} = {PACKED_BELOW}"
            )


# The tables of sets and the slots' view as databases before round 15 made them: the latest
# value's argMax keyed by the tuple (ts, seq). Such a database keeps them (an aggregate
# state's type cannot be altered in place), and the tables it creates later (the hour sets)
# take its layout, so that a question may read both tables of sets in one statement.
TUPLE_SLOTS = _sets_table("rollup", keyed=False)
TUPLE_HOUR_SETS_TABLE = _sets_table(HOUR_SETS, keyed=False)
# What makes a new database take that layout (tests, bench.chturns --latest-key): these two
# tables alone, created before a store opens it, which then creates the rest as for a new
# database (no events table: every view counts from the first event), in their layout.
TUPLE_TABLES_OF_SETS = (TUPLE_SLOTS, TUPLE_HOUR_SETS_TABLE)
TUPLE_SLOTS_VIEW = "CREATE MATERIALIZED VIEW IF NOT EXISTS rollup_mv TO rollup AS" + _sets_select(
    SLOT_MS, "events", keyed=False
)


def statements(keyed_latest: bool) -> tuple[str, ...]:
    """STATEMENTS for a database whose tables of sets key the latest value by LATEST_KEY
    (a new one) or by the tuple (one made before round 15: latest_keyed)."""
    if keyed_latest:
        return STATEMENTS
    tuple_layout = {
        SLOTS: TUPLE_SLOTS,
        SLOTS_VIEW: TUPLE_SLOTS_VIEW,
        HOUR_SETS_TABLE: TUPLE_HOUR_SETS_TABLE,
    }
    return tuple(tuple_layout.get(statement, statement) for statement in STATEMENTS)


def latest_keyed(transport: Transport) -> bool | None:
    """Whether the database's slots key the latest value by LATEST_KEY (True) or by the tuple
    (False, a database made before round 15); None when it has no slots' table yet."""
    rows = transport.query(
        "SELECT type FROM system.columns WHERE database = currentDatabase()"
        " AND table = 'rollup' AND name = 'last'"
    )
    if not rows:
        return None
    return "UInt128" in str(rows[0][0])


# event_ids as databases before round 16 made it (tests and bench.chturns build one).
EVENT_IDS_BY_ACCOUNT = f"""
CREATE TABLE IF NOT EXISTS event_ids (
    account String,
    id String,
    digest String
) ENGINE = ReplacingMergeTree
ORDER BY (account, id)
SETTINGS {_DURABLE}, {_TOKENS}
"""


def ids_by_id(transport: Transport) -> bool | None:
    """Whether the database's event_ids is ordered by the id first (True, a database made
    since round 16) or by the account (False, one made before); None when it has none."""
    rows = transport.query(
        "SELECT sorting_key FROM system.tables"
        " WHERE database = currentDatabase() AND name = 'event_ids'"
    )
    if not rows:
        return None
    return str(rows[0][0]).replace(" ", "").startswith("id,")


# A database created to fold its rollups after the acknowledgement (``?fold=later``, see
# chfold.py): its events carry the writing process's id (0: an amend's replacement, which
# the void refolds itself), an index of each granule's range of seq finds a fold unit's
# events in the part its INSERT wrote, and a unit per INSERT is logged by a view as cheap
# as event_ids' (a minimum and a maximum per block). The rollups have no view there.
FOLD_UNITS = "fold_units"
FOLD_DONE = "fold_done"
FOLD_EVENTS: tuple[str, ...] = (
    "ALTER TABLE events ADD COLUMN IF NOT EXISTS writer UInt64 DEFAULT 0",
    "ALTER TABLE events ADD INDEX IF NOT EXISTS seq_range seq TYPE minmax GRANULARITY 1",
)


def _fold_log(table: str) -> str:
    return f"""
CREATE TABLE IF NOT EXISTS {table} (
    writer UInt64,                       -- the writing process's id
    seq_from UInt64,                     -- its INSERT's first seq
    seq_to UInt64,                       -- and last
    events UInt64
) ENGINE = MergeTree
ORDER BY (writer, seq_from)
SETTINGS {_DURABLE}, {_TOKENS}
"""


FOLD_UNITS_TABLE = _fold_log(FOLD_UNITS)
FOLD_DONE_TABLE = _fold_log(FOLD_DONE)
FOLD_UNITS_VIEW = f"""
CREATE MATERIALIZED VIEW IF NOT EXISTS {FOLD_UNITS}_mv TO {FOLD_UNITS} AS
SELECT writer, min(seq) AS seq_from, max(seq) AS seq_to, count() AS events
FROM events WHERE writer != 0 GROUP BY writer
"""
# The tables a fold fills, each by its own fold_select: every rollup a new database has.
FOLDED_TABLES = ("rollup", HOUR_SETS, HOUR_VALUES, DISTINCT_VALUES)
# The views a database folding later never has (the backfilled tables' views are
# chupgrade.Backfilled's, which it skips there).
ROLLUP_VIEWS = (SLOTS_VIEW, TUPLE_SLOTS_VIEW)


# The fold in one statement (chfold.py): a unit's events are inserted into ``fold_feed``, a
# table of the events' shape that keeps nothing (Null), and a view per rollup folds them
# there, each by its table's fold_select, side by side in the one INSERT as the view mode's
# views do. Created after FOLD_EVENTS: the feed copies the events' columns, ``writer`` too.
FOLD_FEED = "fold_feed"
FOLD_FEED_TABLE = f"CREATE TABLE IF NOT EXISTS {FOLD_FEED} AS events ENGINE = Null"


def fold_feed_views(keyed_latest: bool) -> tuple[str, ...]:
    """The views that fold what ``fold_feed`` receives into each of FOLDED_TABLES (named
    apart from the view mode's ``<table>_mv``, whose presence marks a database with views)."""
    return tuple(
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {table}_fold_mv TO {table} AS"
        + fold_select(table, FOLD_FEED, "", keyed_latest)
        for table in FOLDED_TABLES
    )
