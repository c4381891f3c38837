"""The rollups settle: once a table has taken no insert for a while, its parts are merged into
one per partition, so that each hour (or slot) and set is one row again.

A question reads every part's row of each hour it covers and folds them: a distinct count
merges each part's state of the hour (its hash set rebuilt and merged again), a report sums
each part's row. ClickHouse's own merges pick parts of like sizes and leave a table of a few
large parts; when events arrive in time order (a live service), each hour's rows sit in one
of them. A backfill's batches, a migration's or the bench's, each span the whole range, so
every part holds a row of nearly every hour: after 10M such events ``distinct_hour`` held
24,022 rows of the heavy account's 90 days where 4,320 merged would do, and each question
cost 1.3 to 2.8 times the CPU it costs merged (docs/clickhouse.md, "Questions, round 10").

``min_age_to_force_merge_seconds`` with ``min_age_to_force_merge_on_partition_only``: once
every part of a partition is older than SETTLE_AFTER_S, the partition is merged whole. A
store written steadily never meets that (a new part is always younger), and its merges go
on as before; a store whose writes stop (a backfill's end, a night) has its rollups merged
once, SETTLE_AFTER_S later. The cost is that merge: each table's partition rewritten once
per quiet spell (the sets tables and the distinct table are not partitioned on a database
created since round 6, so the whole table: at 10M events the four took 72 s side by side,
467 MB before, 291 MB after). A store written in bursts far apart, at billions of events,
sets the age to 0 (never) or to hours; settle_rollups keeps an age a table has.
Answers do not change: a merge folds the rows of one key as a question would.

Set by ALTER, as chschema.pack_small_parts sets its own: on a database of any age, and only
where the server knows the settings (an older server's tables keep merging as they did).

The distinct values settle sooner (VALUES_SETTLE_AFTER_S): Sessions reads them with FINAL,
and over a backfill's few parts that merge cost nearly six times the settled statement, slower
than the raw peer for the ten minutes the others wait (docs/clickhouse.md, "Questions, round
15 (second step)"). The table is small (a row per value, its hours as an array: 24 MB at
10M events) and its merge whole cost about a second of CPU at 10M: paid after each quiet
minute, it is bounded by size, the short age only while the table holds at most
VALUES_SETTLE_ROWS rows (checked when a store opens), the others' age above it.
"""

from __future__ import annotations

from usagemeter.store.chschema import DISTINCT_VALUES, HOUR_SETS, HOUR_VALUES
from usagemeter.store.chtransport import Transport, literal, literals

SETTLE_AFTER_S = 600
"""Seconds every part of a partition must have stood before it is merged whole: longer than
any pause between a live service's batches, so that only a quiet store settles."""

VALUES_SETTLE_AFTER_S = 60
"""The distinct values' own quiet age: a minute, so that Sessions after a backfill reads one
part a minute or two after the writes stop (the server looks for merges every few seconds,
up to a minute apart when it finds none), where the others wait ten."""

VALUES_SETTLE_ROWS = 20_000_000
"""Up to this many rows (about 100M events; 2.1M at 10M), the distinct values settle after
VALUES_SETTLE_AFTER_S; above it after SETTLE_AFTER_S, so that a store written in bursts a
minute apart does not rewrite a large table after each (at 10M about 0.5 us of CPU a row)."""

VALUES_PARTS_S = VALUES_SETTLE_AFTER_S + 30
"""For this long after a process last wrote history's distinct values (VALUES_HISTORY_MS), it
takes the table to hold a value's rows in several large parts: a minute's quiet age and the
server's look for merges (one part 61.5 s after a backfill's last part at 10M). Sessions
then drops the rows with no entry in its range before FINAL merges them
(chplan._rows_counted), which pays only over such parts; afterwards, over one, FINAL alone.
Either form is exact: another process's writes, not seen here, or a table past
VALUES_SETTLE_ROWS (ten minutes' age), cost only speed."""

VALUES_HISTORY_MS = 24 * 3_600_000
"""An insert holding an event this much older than the clock writes history (a backfill, a
migration, the bench's load): its parts each hold rows of months, and dropping the rows out
of a question's range before the merge pays. A live service's inserts (its recent hours, a
small part beside the settled one) do not count: over such a tail the drop cost 0.92 to
0.96 of FINAL alone (docs/clickhouse.md, "Questions, round 15 (third step)")."""

# The tables the questions read their whole hours and slots from, and the distinct values,
# whose rows a question reads with FINAL: merged, it reads one row per value. An older
# database's distinct_hour got its setting from the version that made it (chschema.DISTINCT).
SETTLED = ("rollup", HOUR_SETS, HOUR_VALUES, DISTINCT_VALUES)
_AGE = "min_age_to_force_merge_seconds"
_WHOLE = "min_age_to_force_merge_on_partition_only"


def settle_rollups(
    transport: Transport,
    after_s: int = SETTLE_AFTER_S,
    values_after_s: int = VALUES_SETTLE_AFTER_S,
    values_rows: int = VALUES_SETTLE_ROWS,
) -> None:
    """Give every table of SETTLED that exists the settling merge, after ``after_s`` quiet
    seconds, the distinct values after ``values_after_s`` while they hold at most
    ``values_rows`` rows. A table with an age this module did not set keeps it: an
    operator who set another (0 turns the settling off, see docs/clickhouse.md) is not
    overruled at the next start. One of this module's ages (SETTLE_AFTER_S or
    VALUES_SETTLE_AFTER_S, as an older version set them) is replaced by the one wanted."""
    known = transport.query(
        f"SELECT count() FROM system.merge_tree_settings WHERE name IN ({literals([_AGE, _WHOLE])})"
    )
    if not known or int(known[0][0]) != 2:
        return
    rows = transport.query(
        "SELECT name, engine_full FROM system.tables"
        f" WHERE database = currentDatabase() AND name IN ({literals(SETTLED)})"
    )
    own = {str(SETTLE_AFTER_S), str(VALUES_SETTLE_AFTER_S)}
    for name, engine in rows:
        age = table_settings(engine).get(_AGE)
        sooner = name == DISTINCT_VALUES and _rows(transport, name) <= values_rows
        wanted = str(int(values_after_s if sooner else after_s))
        if age is None or (age in own and age != wanted):
            transport.command(f"ALTER TABLE {name} MODIFY SETTING {_AGE} = {wanted}, {_WHOLE} = 1")


def _rows(transport: Transport, table: str) -> int:
    """The rows of ``table``'s active parts, as they stand (not merged)."""
    rows = transport.query(
        "SELECT sum(rows) FROM system.parts WHERE database = currentDatabase()"
        f" AND table = {literal(table)} AND active"
    )
    return int(rows[0][0]) if rows else 0


def table_settings(engine_full: str) -> dict[str, str]:
    """The SETTINGS of a table's ``engine_full`` (system.tables), by name."""
    _, _, settings = engine_full.partition(" SETTINGS ")
    pairs = (item.split(" = ", 1) for item in settings.split(", ") if " = " in item)
    return {k.strip(): v.strip() for k, v in pairs}
