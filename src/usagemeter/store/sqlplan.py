"""SQL for one aggregate question, planned from an AggregateSpec, for every SQL store.

Usage is kept at several grains (see sqlite.py): whole UTC days and hours without dimensions
or tags, 15-minute slots with everything, and the raw events. A window is cut into the
coarsest whole units that fit it, finer units at its ends, and raw events for whatever is
left of a slot. Example, a New York day (UTC-5) from 05:00 to 05:00 UTC next day, with a
ragged start at 05:07:

    [05:07, 05:15) raw events     [05:15, 06:00) three slots
    [06:00, 24:00) 18 hours       [00:00, 05:00) five hours

All pieces become rows of one shape that the outer query folds per window and group, so a
report costs what its buckets cost, not what the account has stored.

The SQL is written once; what differs between databases (placeholders, lists of values, JSON
extraction, the "latest" fold) lives in a ``Dialect``'s small named hooks.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from usagemeter.model import GROUP_KEY, GROUP_SUBACCOUNT, Event, Group
from usagemeter.store.base import (
    OVERALL,
    TOTAL,
    AggregateRow,
    AggregateSpec,
    Measure,
    Window,
)
from usagemeter.timewindows import SLOT_MS

HOUR_MS = 3_600_000
DAY_MS = 86_400_000
# The name of a rollup's level of recent cells, after the table's own (SQLite: schema.py's
# "levels").
RECENT = "_recent"
# The folded events by time, both levels read as one (a view: schema.py's event_times).
TIMES = "event_times_all"


@dataclass(frozen=True, slots=True)
class Grain:
    table: str
    unit_ms: int
    detailed: bool  # keeps dimension and tag sets, so it answers any filter or group
    keyed: bool  # keeps the key; the coarse tables without it hold a tenth of the rows


SLOTS = Grain("rollup", SLOT_MS, detailed=True, keyed=True)
KEY_HOURS = Grain("rollup_hour_key", HOUR_MS, detailed=False, keyed=True)
KEY_DAYS = Grain("rollup_day_key", DAY_MS, detailed=False, keyed=True)
ACCOUNT_HOURS = Grain("rollup_hour", HOUR_MS, detailed=False, keyed=False)
ACCOUNT_DAYS = Grain("rollup_day", DAY_MS, detailed=False, keyed=False)
# The distinct values of each dimension per UTC hour, by account, metric and billable (the
# PostgreSQL store's rollup_values): a distinct count's whole hours, one row per value.
VALUE_HOURS = Grain("rollup_values", HOUR_MS, detailed=False, keyed=False)
# Coarsest first. Slots close every chain: they answer everything, at the finest grain.
KEY_GRAINS = (KEY_DAYS, KEY_HOURS, SLOTS)
ACCOUNT_GRAINS = (ACCOUNT_DAYS, ACCOUNT_HOURS, SLOTS)
VALUE_GRAINS = (VALUE_HOURS, SLOTS)

# The fold of each additive aggregation over source rows (a rollup row or a raw event).
ADDITIVE_SQL = {
    "count": "sum(s.cnt)",
    "sum": "sum(s.total)",
    "max": "max(s.vmax)",
    "min": "min(s.vmin)",
}


class Dialect:
    """SQLite's way of saying the few things that differ between databases. The planner
    writes ``?`` placeholders throughout; ``finish`` turns them into the dialect's own."""

    name = "sqlite"
    # Whether the store keeps VALUE_HOURS, and folds totals with GROUPING SETS (reading the
    # source rows once, not once for the windows and again for the range).
    value_hours = False
    grouping_sets = False
    # Whether the raw events read by ``raw_join`` include those waiting for their fold (the
    # ``pending`` table's). SQLite's do not: it finds only folded events by time (its
    # ``event_times``), and reads the waiting ones of a ragged end from ``pending``.
    raw_includes_pending = False

    def finish(self, sql: str) -> str:
        return sql

    def levels(self, table: str) -> tuple[str, ...]:
        """The tables that together hold the rows of the rollup ``table``, the older level
        first. SQLite's fold writes a level of recent cells, merged into the big table in
        key order now and then (schema.py): a question reads both, in one statement, and
        each cell's events are in one or split between them, never in both."""
        return (table, table + RECENT)

    def values(self, count: int, width: int) -> str:
        """A query body yielding ``count`` rows of ``width`` integer placeholders."""
        return "VALUES " + ",".join(["(" + ",".join("?" * width) + ")"] * count)

    def value_params(self, rows: Sequence[tuple[int, ...]]) -> list[Any]:
        """The parameters of ``values``, in its placeholders' order."""
        return [v for row in rows for v in row]

    def json_field(self, column: str) -> str:
        """The text of one member of a JSON object column; the member's name is a parameter."""
        return f"json_extract({column}, ?)"

    def json_key(self, name: str) -> str:
        """The parameter naming a member for ``json_field``."""
        # Quoted member name: a dimension named "a.b" is one key, not a nested path.
        return '$."' + name.replace('"', '\\"') + '"'

    def join(self, windows: str, table: str, on: str) -> str:
        """The FROM clause pairing each window with the rows of ``table`` (as ``x``) in it."""
        return f"FROM {windows} JOIN {table} x ON {on}"

    def raw_join(self, windows: str, on: Callable[[str], str], extra: str) -> str:
        """The FROM clause pairing each window with the raw events (as ``x``) in it: ``on``
        says, of a table's alias, which are in a window (metric, accounts, time); ``extra``
        (" AND ..." or nothing) what else an event must be."""
        # The folded events by time (schema.py's event_times, at two levels), checked for
        # metric and account there, then each read by its seq. As a lookup per window, not
        # a join: SQLite pushes a window's bounds into each level of the view then, where a
        # join in this statement made it copy both levels whole.
        return (
            f"FROM {windows} JOIN events x ON x.seq IN"
            f" (SELECT t.seq FROM {TIMES} t WHERE {on('t')}){extra}"
        )

    def timed(self, alias: str, start_ms: int | None, end_ms: int | None) -> tuple[str, list[int]]:
        """The condition on the events ``alias`` in [start_ms, end_ms) (either None: open),
        for a read of events by time that is not a question (an export), and its parameters."""
        bounds, params = _time_bounds(start_ms, end_ms)
        # By the folded events' table by time and the waiting events, both keyed by time:
        # events itself has no index by time, and a day's export of a store of 10M scanned
        # it whole. The condition on ``alias`` itself stays: the lookup only narrows.
        lookup = bounds.format(ts="ts")
        sql = (
            f"{alias}.seq IN (SELECT seq FROM {TIMES} WHERE {lookup}"
            f" UNION ALL SELECT seq FROM unfolded WHERE {lookup})"
            f" AND {bounds.format(ts=f'{alias}.ts')}"
        )
        return sql, params * 3

    def tagsets_with_all(self, marks: str) -> str:
        """The condition on ``x.tagset``: a set holding every one of the tags (``marks``
        placeholders, then one for how many they are)."""
        return (
            f"x.tagset IN (SELECT tagset FROM tagset_tags WHERE tag IN ({marks})"
            " GROUP BY tagset HAVING count(*) = ?)"
        )

    def set_value(self, column: str) -> str:
        """The value of one member (a parameter) of the dimension set ``column`` names."""
        return f"(SELECT {self.json_field('y.dims')} FROM dimsets y WHERE y.id = {column})"

    def dimsets_join(self) -> str:
        """The join giving each source row ``s`` its dimension set as ``d.dims``."""
        return "JOIN dimsets d ON d.id = s.dimset"

    # The rank of a source row's latest value: (timestamp, seq of its event), the later
    # event winning a tie of timestamps. Rollup rows keep the seq of their latest event
    # (schema.py's last_seq; 0 in a row written before it was kept, which ranks as its
    # timestamp's earliest event: it came before every event with a seq kept). The pair
    # fits no one integer, so it is compared as text of fixed widths: each number offset
    # to a fixed count of digits (ts below 9 * 10^13 ms, the year 4821; seq below 8.2 *
    # 10^18) and concatenated, which compares as the pair does. Why this form: integer to
    # text in ``||`` adds a third less per row than format() (which cost a heavy 90-day
    # report twice its time), and a rank stored as text made the fold a third dearer
    # (round 15, bench/RESULTS.md).
    def rank(self, ts: str, seq: str) -> str:
        """The rank of the latest value at ``ts`` of the event ``seq`` (SQL expressions)."""
        return f"(({ts}) + 10000000000000) || (({seq}) + 1000000000000000000)"

    def rollup_rank(self) -> str:
        return self.rank("x.last_ts", "x.last_seq")

    def event_rank(self) -> str:
        return self.rank("x.ts", "x.seq")

    def latest(self) -> list[str]:
        """Select-list items whose first is the value of the source row ``s`` with the
        greatest rank ``s.late`` (see rank())."""
        # SQLite returns the bare column last_val from the row that holds max(late), as long
        # as max() is the statement's only aggregate.
        return ["s.last_val", "max(s.late)"]


class PostgresDialect(Dialect):
    name = "postgresql"
    value_hours = True
    grouping_sets = True
    raw_includes_pending = True  # its events keep their index by time

    def levels(self, table: str) -> tuple[str, ...]:
        return (table,)  # its fold writes the rollups themselves

    def finish(self, sql: str) -> str:
        # The planner puts no "?" or "%" in its text other than placeholders (names and
        # values are always parameters), so this swap is safe. Binary parameters: a list of
        # ints is then a bigint[] whatever its values (the store dumps ints as int8), so a
        # statement keeps one set of parameter types and one prepared plan.
        return sql.replace("?", "%b")

    def values(self, count: int, width: int) -> str:
        # One array per column instead of count * width parameters: the statement text stays
        # the same whatever the number of pieces, so the server plans it once.
        return "SELECT * FROM unnest(" + ", ".join(["?::bigint[]"] * width) + ")"

    def value_params(self, rows: Sequence[tuple[int, ...]]) -> list[Any]:
        return [list(column) for column in zip(*rows, strict=True)]

    def json_field(self, column: str) -> str:
        return f"({column} ->> ?::text)"

    def json_key(self, name: str) -> str:
        return name

    def join(self, windows: str, table: str, on: str) -> str:
        # One index range scan per window: a LATERAL subquery that OFFSET 0 keeps from being
        # flattened. As a plain join, PostgreSQL read the account's rows once and tested
        # every window against every row (a join filter): a 90-day report in New York days
        # cost 90 passes over the account's hours.
        return f"FROM {windows} CROSS JOIN LATERAL (SELECT * FROM {table} x WHERE {on} OFFSET 0) x"

    def raw_join(self, windows: str, on: Callable[[str], str], extra: str) -> str:
        return self.join(windows, "events", on("x") + extra)

    def timed(self, alias: str, start_ms: int | None, end_ms: int | None) -> tuple[str, list[int]]:
        bounds, params = _time_bounds(start_ms, end_ms)
        return bounds.format(ts=f"{alias}.ts"), params  # its events keep their index by time

    def tagsets_with_all(self, marks: str) -> str:
        # An array computed once (an InitPlan), tested in each index scan. As IN (...), the
        # subquery became the inner side of a join that every slot row scanned again: 2,500
        # rescans, 14 ms of a 90-day tagged report at 200,000 events, where this takes 1.
        return (
            f"x.tagset = ANY(ARRAY(SELECT tagset FROM tagset_tags WHERE tag IN ({marks})"
            " GROUP BY tagset HAVING count(*) = ?))"
        )

    def dimsets_join(self) -> str:
        # One primary-key probe per source row, which OFFSET 0 keeps from being flattened.
        # As a plain join, PostgreSQL (expecting a row per window) hashed every dimension
        # set ever seen, and a set per session makes that table grow with the events: 2 to
        # 3 ms of a 90-day report at 200,000 events, twice when totals are asked too.
        return "CROSS JOIN LATERAL (SELECT y.dims FROM dimsets y WHERE y.id = s.dimset OFFSET 0) d"

    def rollup_rank(self) -> str:
        return "x.last_seq"  # the seq of the row's latest event (pgschema.py)

    def event_rank(self) -> str:
        return "x.seq"

    def latest(self) -> list[str]:
        return ["(array_agg(s.last_val ORDER BY s.last_ts DESC, s.late DESC))[1]"]


class MergedDialect(Dialect):
    """SQLite's, for a question asked while the rollups' recent level is empty: the big
    tables alone, as before they had levels (SQLite's store checks, sqlite.py)."""

    def levels(self, table: str) -> tuple[str, ...]:
        return (table,)


SQLITE = Dialect()
SQLITE_MERGED = MergedDialect()
POSTGRES = PostgresDialect()


@dataclass(frozen=True, slots=True)
class Plan:
    sql: str
    params: tuple[Any, ...]
    positions: tuple[int, ...]  # which of spec.measures this statement's values fill
    decode: Callable[[Sequence[Any]], AggregateRow]


Piece = tuple[int, int, int]  # (window index, low, high): units of a grain, or ms for raw


def split_windows(
    windows: Sequence[Window], grains: Sequence[Grain]
) -> tuple[dict[Grain, list[Piece]], list[Piece]]:
    """Cut each window into whole units of the grains, coarsest first, and raw ms pieces."""
    pieces: dict[Grain, list[Piece]] = {g: [] for g in grains}
    raw: list[Piece] = []

    def cut(index: int, lo: int, hi: int, level: int) -> None:
        if lo >= hi:
            return
        if level == len(grains):
            raw.append((index, lo, hi))
            return
        unit = grains[level].unit_ms
        first = -(-lo // unit)  # ceil
        last = hi // unit  # floor
        if first >= last:
            cut(index, lo, hi, level + 1)
            return
        pieces[grains[level]].append((index, first, last))
        cut(index, lo, first * unit, level + 1)
        cut(index, last * unit, hi, level + 1)

    for w in windows:
        cut(w.index, w.start_ms, w.end_ms, 0)
    return pieces, raw


def grains_for(spec: AggregateSpec) -> tuple[Grain, ...]:
    """The coarse grains keep no dimensions or tags: they serve only questions that need
    neither; the leanest of them keep no key either."""
    plain = (
        not spec.filters
        and not spec.tags
        and all(g in (GROUP_KEY, GROUP_SUBACCOUNT) for g in spec.group_by)
        and all(m.aggregation != "unique_count" for m in spec.measures)
    )
    if not plain:
        return (SLOTS,)
    return KEY_GRAINS if spec.key_id is not None or GROUP_KEY in spec.group_by else ACCOUNT_GRAINS


def counts_values(spec: AggregateSpec, key: int | None) -> bool:
    """Whether VALUE_HOURS answers the question: one distinct count, of the whole account
    (or per subaccount), billable or not, with no other filter."""
    return (
        len(spec.measures) == 1
        and spec.measures[0].aggregation == "unique_count"
        and key is None
        and not spec.filters
        and not spec.tags
        and all(g == GROUP_SUBACCOUNT for g in spec.group_by)
    )


def plan_aggregate(
    spec: AggregateSpec,
    metric: int,
    accounts: Sequence[int],
    key: int | None,
    dialect: Dialect = SQLITE,
    pending: str | None = None,
) -> list[Plan]:
    """One statement for the additive measures together, one for each other measure.

    ``pending`` names a table of events stored but not yet folded into the rollups (the
    PostgreSQL store's ``unfolded``, with the events' columns and ``seq``): they count
    wherever the rollups do, read in the same statement. On a tie of timestamps, the
    latest value is a waiting event's (it came after every folded one), the later of them
    by ``seq``."""
    # A distinct count from VALUE_HOURS reads each source row's value (``s.v``) instead of
    # its dimension set: the value hours hold it, the others look it up in their set.
    values = dialect.value_hours and counts_values(spec, key)
    grains = VALUE_GRAINS if values else grains_for(spec)
    pieces, raw_pieces = split_windows(spec.windows, grains)
    if not raw_pieces and not any(pieces.values()):
        return []

    # Filters that narrow each source before the fold.
    source_where: list[str] = []
    source_params: list[Any] = []
    if key is not None:
        source_where.append("x.key = ?")
        source_params.append(key)
    if spec.billable is not None:
        source_where.append("x.billable = ?")
        source_params.append(1 if spec.billable else 0)
    if spec.tags:
        tags = sorted(spec.tags)
        marks = ",".join("?" * len(tags))
        source_where.append(dialect.tagsets_with_all(marks))
        source_params.extend([*tags, len(tags)])
    account_marks = ",".join("?" * len(accounts))
    extra = "".join(f" AND {clause}" for clause in source_where)

    # See Dialect.rank(): of values at one timestamp the later event's is the latest, across
    # rows too (two dimension sets', keys' or levels' rows tied at one millisecond). Each
    # source row carries its rank as ``late`` when a latest value is asked, and whenever a
    # pending table's rows (which always carry theirs) are read beside the rollups.
    has_latest = any(m.aggregation == "latest" for m in spec.measures)
    ranked = bool(pending) or has_latest
    late = f", {dialect.rollup_rank()} AS late" if ranked else ""
    raw_late = f", {dialect.event_rank()} AS late" if ranked else ""  # of an event read raw
    # An event's columns as a source row (the raw events, and those waiting to be folded).
    event_row = (
        " x.account AS account, x.key AS key, x.dimset AS dimset,"
        " 1 AS cnt, x.value AS total, x.value AS vmin, x.value AS vmax,"
        " x.ts AS last_ts, x.value AS last_val"
    )
    if values:
        # The counted value of a row with a dimension set; of the value hours, their own.
        name = _dimension(spec.measures[0])
        event_row = f" x.account AS account, {dialect.set_value('x.dimset')} AS v"
        late = raw_late = ""
    ctes: list[str] = []
    cte_params: list[Any] = []
    parts: list[str] = []
    part_params: list[Any] = []
    for n, grain in enumerate(grains):
        found = pieces[grain]
        if not found:
            continue
        ctes.append(f"w{n}(idx, lo, hi) AS ({dialect.values(len(found), 3)})")
        cte_params.extend(dialect.value_params(found))
        named = ""
        if not values:
            dimset = "x.dimset" if grain.detailed else "0"
            key_column = "x.key" if grain.keyed else "0"
            columns = (
                f" x.account AS account, {key_column} AS key, {dimset} AS dimset,"
                " x.cnt AS cnt, x.total AS total, x.vmin AS vmin, x.vmax AS vmax,"
                " x.last_ts AS last_ts, x.last_val AS last_val"
            )
        elif grain is VALUE_HOURS:
            columns, named = " x.account AS account, x.value AS v", " AND x.name = ?"
            # A row per hour with events, counting nothing: an hour whose events lack the
            # dimension still has its (window, account) counted as 0, as the slots say.
            parts.append(
                f"SELECT w{n}.idx AS idx, x.account AS account, NULL AS v "
                + dialect.join(
                    f"w{n}",
                    ACCOUNT_HOURS.table,
                    f"x.metric = ? AND x.account IN ({account_marks})"
                    f" AND x.slot >= w{n}.lo AND x.slot < w{n}.hi{extra}",
                )
            )
            part_params.extend([metric, *accounts, *source_params])
        else:
            columns = event_row
        tables = (grain.table,) if grain is VALUE_HOURS else dialect.levels(grain.table)
        for table in tables:
            if values and grain is not VALUE_HOURS:
                part_params.append(name)  # the set_value's member, in the select list
            parts.append(
                f"SELECT w{n}.idx AS idx,{columns}{late} "
                + dialect.join(
                    f"w{n}",
                    table,
                    f"x.metric = ?{named} AND x.account IN ({account_marks})"
                    f" AND x.slot >= w{n}.lo AND x.slot < w{n}.hi{extra}",
                )
            )
            part_params.extend([metric, *([name] if named else []), *accounts, *source_params])
    if raw_pieces:
        ctes.append(f"rw(idx, lo, hi) AS ({dialect.values(len(raw_pieces), 3)})")
        cte_params.extend(dialect.value_params(raw_pieces))
        if values:
            part_params.append(name)
        parts.append(
            f"SELECT rw.idx AS idx,{event_row}{raw_late} "
            + dialect.raw_join(
                "rw",
                lambda t: (
                    f"{t}.metric = ? AND {t}.account IN ({account_marks})"
                    f" AND {t}.ts >= rw.lo AND {t}.ts < rw.hi"
                ),
                extra,
            )
        )
        part_params.extend([metric, *accounts, *source_params])
    # The waiting events of the ragged ends too, where the raw read finds only folded ones.
    waiting_raw = bool(raw_pieces) and not dialect.raw_includes_pending
    if pending and (any(pieces.values()) or waiting_raw):
        # Where the rollups answer, in ms: the grains' own windows, scaled (no parameters);
        # and the ragged ends, in ms already.
        used = [(n, g) for n, g in enumerate(grains) if pieces[g]]
        spans = [f"SELECT idx, lo * {g.unit_ms}, hi * {g.unit_ms} FROM w{n}" for n, g in used]
        if waiting_raw:
            spans.append("SELECT idx, lo, hi FROM rw")
        ctes.append(f"tw(idx, lo, hi) AS ({' UNION ALL '.join(spans)})")
        # As the raw events are read: by time, one index range per window; but only when
        # anything waits in the whole range (one probe, evaluated once), so that a question
        # with nothing waiting (the usual case) pays one probe, not one per window.
        if values:
            part_params.append(name)
        parts.append(
            f"SELECT tw.idx AS idx,{event_row}{raw_late} "
            + dialect.join(
                "tw",
                pending,
                f"x.metric = ? AND x.account IN ({account_marks})"
                f" AND x.ts >= tw.lo AND x.ts < tw.hi{extra}",
            )
            + f" WHERE EXISTS (SELECT 1 FROM {pending} y WHERE y.metric = ?"
            f" AND y.account IN ({account_marks}) AND y.ts >= ? AND y.ts < ?)"
        )
        ranges = [(lo * g.unit_ms, hi * g.unit_ms) for _, g in used for _, lo, hi in pieces[g]]
        ranges.extend((lo, hi) for _, lo, hi in raw_pieces if waiting_raw)
        low, high = min(lo for lo, _ in ranges), max(hi for _, hi in ranges)
        part_params.extend([metric, *accounts, *source_params, metric, *accounts, low, high])
    source = "(" + " UNION ALL ".join(parts) + ") AS s"

    # Group columns and dimension filters, which need the interned dimension set.
    joins: list[str] = []
    group_cols: list[str] = []
    group_params: list[Any] = []
    needs_dims = bool(spec.filters) or any(
        g not in (GROUP_KEY, GROUP_SUBACCOUNT) for g in spec.group_by
    )
    needs_dims = needs_dims or any(m.aggregation == "unique_count" for m in spec.measures)
    needs_dims = needs_dims and not values
    if needs_dims:
        joins.append(dialect.dimsets_join())
    if GROUP_KEY in spec.group_by:
        joins.append("LEFT JOIN keys k ON k.rid = s.key")
    if GROUP_SUBACCOUNT in spec.group_by:
        joins.append("JOIN accounts a ON a.rid = s.account")
    for name in spec.group_by:
        if name == GROUP_KEY:
            group_cols.append("k.id")
        elif name == GROUP_SUBACCOUNT:
            group_cols.append("a.id")
        else:
            group_cols.append(dialect.json_field("d.dims"))
            group_params.append(dialect.json_key(name))
    where: list[str] = []
    where_params: list[Any] = []
    for dimension, value in spec.filters:
        where.append(f"{dialect.json_field('d.dims')} = ?")
        where_params.extend([dialect.json_key(dimension), value])

    def select(index: str, columns: list[str], refs: list[str], values: list[str]) -> str:
        selected = [index, *[f"{c} AS g{i}" for i, c in enumerate(columns)], *values]
        return (
            f"SELECT {', '.join(selected)} FROM {source} "
            + " ".join(joins)
            + (f" WHERE {' AND '.join(where)}" if where else "")
            # "GROUP BY 1" (the constant index) folds everything into one row, and into none
            # when nothing matched, as a grouped fold does.
            + f" GROUP BY {', '.join(refs or ['1'])}"
        )

    def statement(select_values: list[str], value_params: list[Any]) -> tuple[str, list[Any]]:
        group_refs = [f"g{i}" for i in range(len(group_cols))]
        # Each select's parameters follow its text: group columns, values, source, where.
        body = [*group_params, *value_params, *part_params, *where_params]
        selects = [select("s.idx", group_cols, ["s.idx", *group_refs], select_values)]
        params = [*cte_params, *body]
        if spec.totals and dialect.grouping_sets and not group_cols:
            # The windows and the whole range in one pass over the source rows; HAVING
            # drops the empty range's row, which a grouped fold would not return.
            index = f"CASE WHEN GROUPING(s.idx) = 0 THEN s.idx ELSE {TOTAL} END"
            sets = select(index, [], ["GROUPING SETS ((s.idx), ())"], select_values)
            return dialect.finish(f"WITH {', '.join(ctes)} {sets} HAVING count(*) > 0"), params
        if spec.totals:
            # The whole range per group, then (grouped) over every group: one statement, as
            # UNION ALL, which SQLite and PostgreSQL both read (SQLite has no GROUPING SETS).
            selects.append(select(str(TOTAL), group_cols, group_refs, select_values))
            params.extend(body)
            if group_cols:
                nulls = ["NULL"] * len(group_cols)
                selects.append(select(str(OVERALL), nulls, [], select_values))
                params.extend([*value_params, *part_params, *where_params])
        sql = f"WITH {', '.join(ctes)} " + " UNION ALL ".join(selects)
        return dialect.finish(sql), params

    plans: list[Plan] = []
    additive = [i for i, m in enumerate(spec.measures) if m.aggregation in ADDITIVE_SQL]
    if additive:
        sql, params = statement([ADDITIVE_SQL[spec.measures[i].aggregation] for i in additive], [])
        positions = tuple(additive)
        plans.append(Plan(sql, tuple(params), positions, row_decoder(spec, positions)))
    for i, measure in enumerate(spec.measures):
        if measure.aggregation == "latest":
            sql, params = statement(dialect.latest(), [])
            plans.append(Plan(sql, tuple(params), (i,), row_decoder(spec, (i,))))
        elif values:
            sql, params = statement(["count(DISTINCT s.v)"], [])
            plans.append(Plan(sql, tuple(params), (i,), row_decoder(spec, (i,))))
        elif measure.aggregation == "unique_count":
            sql, params = statement(
                [f"count(DISTINCT {dialect.json_field('d.dims')})"],
                [dialect.json_key(_dimension(measure))],
            )
            plans.append(Plan(sql, tuple(params), (i,), row_decoder(spec, (i,))))
        elif measure.aggregation not in ADDITIVE_SQL:
            raise ValueError(f"unknown aggregation {measure.aggregation!r}")
    return plans


def row_decoder(
    spec: AggregateSpec, positions: tuple[int, ...], whole: tuple[bool, ...] | None = None
) -> Callable[[Sequence[Any]], AggregateRow]:
    """Decodes one result row (window index, group values, then the values of the measures
    at ``positions``) into an AggregateRow of all the spec's measures. With ``whole``, each
    value that is not whole becomes a float (ClickHouse's JSON says 5 for 5.0).

    A report may return tens of thousands of rows, so the common shapes (one or no group,
    every measure from this statement) take the short road."""
    names = tuple(spec.group_by)
    width = len(names)
    end = 1 + width
    stop = end + len(positions)  # SQLite's latest fold selects a timestamp after its value
    total = len(spec.measures)
    # ClickHouse's JSON writes counts as integers already; only the others need float().
    floats = [n for n, w in enumerate(whole or ()) if not w]
    everything = positions == tuple(range(total))

    def values_of(row: Sequence[Any]) -> tuple[float | None, ...]:
        if everything and stop == end + 1:  # one measure: the usual question
            value = row[end]
            return (float(value) if floats and value is not None else value,)
        found = row[end:stop]
        if floats:
            found = list(found)
            for n in floats:
                if found[n] is not None:
                    found[n] = float(found[n])
        if everything:
            return tuple(found)
        out: list[float | None] = [None] * total
        for pos, value in zip(positions, found, strict=True):
            out[pos] = value
        return tuple(out)

    if width == 0:

        def decode(row: Sequence[Any]) -> AggregateRow:
            return AggregateRow(int(row[0]), (), values_of(row))

    elif width == 1:
        name = names[0]
        # One tuple per distinct group, shared by its rows: fewer objects for the collector.
        groups: dict[Any, Group] = {}

        def decode(row: Sequence[Any]) -> AggregateRow:
            index = int(row[0])
            if index == OVERALL:
                return AggregateRow(index, (), values_of(row))
            group = groups.get(row[1])
            if group is None:
                group = groups[row[1]] = ((name, row[1]),)
            return AggregateRow(index, group, values_of(row))

    else:

        def decode(row: Sequence[Any]) -> AggregateRow:
            index = int(row[0])
            group: Group = () if index == OVERALL else tuple(zip(names, row[1:end], strict=True))
            return AggregateRow(index, group, values_of(row))

    return decode


def run_plans(
    plans: Sequence[Plan], execute: Callable[[Plan], Iterable[Sequence[Any]]], width: int
) -> list[AggregateRow]:
    """Run a question's statements and merge their rows: several statements fill different
    measures (``width`` in all) of the same (window, group) cells."""
    if len(plans) == 1:
        return [plans[0].decode(row) for row in execute(plans[0])]
    merged: dict[tuple[int, Group], list[float | None]] = {}
    for plan in plans:
        for raw in execute(plan):
            row = plan.decode(raw)
            cell = merged.setdefault((row.window, row.group), [None] * width)
            for pos in plan.positions:
                cell[pos] = row.values[pos]
    return [AggregateRow(w, g, tuple(v)) for (w, g), v in merged.items()]


# Stored events (as ``e``) as rows for ``event_from_row``; a WHERE clause may follow.
EXPORT_SELECT = (
    "SELECT e.event_id, a.id, m.name, e.ts, e.value, e.billable, k.id, d.dims, t.tags"
    " FROM events e JOIN accounts a ON a.rid = e.account JOIN metrics m ON m.id = e.metric"
    " LEFT JOIN keys k ON k.rid = e.key JOIN dimsets d ON d.id = e.dimset"
    " JOIN tagsets t ON t.id = e.tagset"
)


def _time_bounds(start_ms: int | None, end_ms: int | None) -> tuple[str, list[int]]:
    """``{ts} >= ? AND {ts} < ?`` for the bounds given (the time's name left to fill in),
    and their parameters."""
    named = [(b, op) for b, op in ((start_ms, ">="), (end_ms, "<")) if b is not None]
    return " AND ".join(f"{{ts}} {op} ?" for _, op in named), [b for b, _ in named]


def plan_export(
    accounts: Sequence[str] | None,
    start_ms: int | None,
    end_ms: int | None,
    dialect: Dialect = SQLITE,
) -> tuple[str, list[Any]]:
    """The stored events of ``accounts`` (every account: None) in [start_ms, end_ms), in the
    order they arrived, as rows for ``event_from_row``."""
    where = ["1 = 1"]
    params: list[Any] = []
    if accounts is not None:
        where.append(f"a.id IN ({','.join('?' * len(accounts))})")
        params.extend(accounts)
    if start_ms is not None or end_ms is not None:
        timed, timed_params = dialect.timed("e", start_ms, end_ms)
        where.append(timed)
        params.extend(timed_params)
    sql = f"{EXPORT_SELECT} WHERE {' AND '.join(where)} ORDER BY e.seq"
    return dialect.finish(sql), params


def plan_touched(
    after_seq: int, upto_seq: int, metrics: Sequence[str], dialect: Dialect = SQLITE
) -> tuple[str, list[Any]]:
    """What the events stored with seq in (after_seq, upto_seq] of ``metrics`` touched: per
    account, metric and 15-minute stretch of time, the earliest and latest timestamp (two
    real timestamps, so no period they touch is missed however the division rounds)."""
    sql = (
        "SELECT a.id, m.name, min(e.ts), max(e.ts) FROM events e"
        " JOIN accounts a ON a.rid = e.account JOIN metrics m ON m.id = e.metric"
        f" WHERE e.seq > ? AND e.seq <= ? AND m.name IN ({','.join('?' * len(metrics))})"
        f" GROUP BY a.id, m.name, e.ts / {SLOT_MS}"
    )
    return dialect.finish(sql), [after_seq, upto_seq, *metrics]


def event_from_row(row: Sequence[Any]) -> Event:
    """One row of ``plan_export``: dimensions as JSON text or, from PostgreSQL, decoded."""
    dims = row[7]
    return Event(
        id=row[0],
        account_id=row[1],
        metric=row[2],
        ts_ms=row[3],
        value=row[4],
        billable=bool(row[5]),
        key_id=row[6],
        dimensions=json.loads(dims) if isinstance(dims, str) else dims,
        tags=frozenset(json.loads(row[8])),
    )


def _dimension(measure: Measure) -> str:
    if measure.dimension is None:
        raise ValueError("unique_count needs a dimension")
    return measure.dimension
