"""ClickHouse SQL for one aggregate question: the same plan as sqlplan.py (windows cut into the
coarsest whole days, hours and 15-minute slots that fit, raw events for ragged ends), said
the way ClickHouse answers it fast.

- A piece of a grain maps its rows to a window with an ASOF JOIN on the piece's start (the
  pieces of a grain never overlap): one binary search per row instead of a range join.
- Each part computes the question's group values from its own rows and pre-folds them per
  (window, group), carrying only the values the question asks for; the outer query folds the
  parts per window and group. (Carrying the dimension maps through the join and folding per
  dimension set first took 1.6 times as long for an hourly report grouped by status.) The
  latest value travels as an argMax state, so it is exact over any range; a question with
  no filter, tag or dimension group reads it as a plain maximum of (ts, seq, value) from
  the latest table's hours instead (_latest_tops).
- Distinct counts are never folded from buckets: each window's values are counted (uniqExact)
  over the rows of the tables of sets that cover it (a row per hour or slot and dimension
  set: each value of its events once) and the raw events of its ragged ends, so a range's
  count is distinct over the range. A distinct count with no filter, tag or key merges the
  exact states of the distinct table's whole hours instead (the sets of values themselves,
  never their counts), with states of its ragged slots and milliseconds (_distinct_states).
- A question one table answers is folded once, straight from that table (see _flat).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import compress
from operator import attrgetter
from typing import Any

from usagemeter.model import GROUP_KEY, GROUP_SUBACCOUNT, Group
from usagemeter.store.base import (
    OVERALL,
    TOTAL,
    AggregateColumns,
    AggregateRow,
    AggregateSpec,
    Window,
)
from usagemeter.store.chschema import (
    DISTINCT,
    DISTINCT_GRAIN,
    DISTINCT_VALUES,
    HOUR_SETS_GRAIN,
    LATEST,
    LATEST_GRAIN,
    LATEST_KEY,
    PRESENT,
)
from usagemeter.store.chtransport import literal, literals
from usagemeter.store.sqlplan import (
    SLOTS,
    Grain,
    Piece,
    Plan,
    grains_for,
    row_decoder,
    split_windows,
)

# Each foldable aggregation as (the value a part pre-folds from a rollup's rows, the same
# from raw events, the fold of the parts' values); a part carries only what the question asks.
_FOLDS = {
    "count": ("sum(cnt) AS cnt", "count() AS cnt", "sum(cnt)"),
    "sum": ("sum(total) AS total", "sum(value) AS total", "sum(total)"),
    "max": ("max(vmax) AS vmax", "max(value) AS vmax", "max(vmax)"),
    "min": ("min(vmin) AS vmin", "min(value) AS vmin", "min(vmin)"),
    "latest": (
        "argMaxMergeState(last) AS last",
        "argMaxState(value, (ts, seq)) AS last",
        "argMaxMerge(last)",
    ),
}
# The raw events' latest-value state where the tables of sets key it by one number (a
# database made since round 15, chschema.LATEST_KEY): a UNION ALL of states needs one type.
_KEYED_RAW_LATEST = f"argMaxState(value, {LATEST_KEY}) AS last"
# The rollup columns and the raw event columns each pre-fold reads.
_ROLLUP_COLUMNS = {"count": "cnt", "sum": "total", "max": "vmax", "min": "vmin", "latest": "last"}
_RAW_COLUMNS = {"count": "", "sum": "value", "max": "value", "min": "value", "latest": "value, seq"}


def _windows(pieces: Sequence[Piece]) -> str:
    # The pieces travel as one data literal read by format(): ClickHouse parses a values()
    # list of thousands of tuples (a year of hours) hundreds of times slower.
    rows = "\n".join(f"[{idx},{lo},{hi}]" for idx, lo, hi in pieces)
    return (
        "(SELECT idx, lo, hi, 0 AS z FROM format(JSONCompactEachRow,"
        f" 'idx Int64, lo Int64, hi Int64', '{rows}'))"
    )


# Up to this many pieces, a row finds its piece by comparisons rather than a join.
FEW_PIECES = 8


def _regular(pieces: Sequence[Piece]) -> tuple[int, int, int] | None:
    """(first low, width, first window) when the pieces follow each other without a gap,
    all of one width, one window each in order: an hourly report's hours, a daily report's
    days in whole hours (in any zone, but for a day that DST makes 23 or 25 hours long). A
    row's window is then arithmetic on its unit, with no join or comparison per piece
    (the source's WHERE keeps only the rows of [first low, last high)). None otherwise."""
    if isinstance(pieces, UnitRun):
        return pieces.regular
    if len(pieces) <= 1:
        return None
    ordered = sorted(pieces, key=lambda p: p[1])
    first_idx, first_lo, first_hi = ordered[0]
    width = first_hi - first_lo
    for n, (idx, lo, hi) in enumerate(ordered):
        if lo != first_lo + n * width or hi != lo + width or idx != first_idx + n:
            return None
    return first_lo, width, first_idx


class UnitRun(list[Piece]):
    """The pieces of windows that follow each other in order, one unit of a grain each (an
    hourly report's hours in a zone of whole-hour offsets, DST changes included), as
    _split's short road finds them by comparing whole columns: known regular, so neither
    _regular nor the span (_span) looks at each piece again. Every statement over one
    table asks both, the report by set and by values each: 0.8 ms of planning a
    2,160-hour report, each time a range is asked the first time (round 14)."""

    __slots__ = ("regular",)

    def __init__(self, first_window: int, first_unit: int, units: int) -> None:
        lows = range(first_unit, first_unit + units)
        highs = range(first_unit + 1, first_unit + units + 1)
        super().__init__(zip(range(first_window, first_window + units), lows, highs, strict=True))
        self.regular = (first_unit, 1, first_window)


def _span(pieces: Sequence[Piece]) -> tuple[int, int]:
    """The lowest low and highest high of ``pieces``, in their unit."""
    if isinstance(pieces, UnitRun):
        first = pieces.regular[0]
        return first, first + len(pieces)
    return min(p[1] for p in pieces), max(p[2] for p in pieces)


def _index(column: str, pieces: Sequence[Piece]) -> tuple[str, str] | None:
    """The piece index of a row by arithmetic or comparisons on ``column``, and the condition
    that keeps the rows inside some piece ('' when the source's time bounds do); None when
    the pieces need a join. Regular pieces: arithmetic on the unit. A few (a whole range's
    total, ragged ends): a multiIf, which costs no join (a report tagged prod took 1.3 times
    as long joined)."""
    regular = _regular(pieces)
    if regular is not None:
        lo, width, idx = regular
        return f"intDiv({column} - {lo}, {width}) + {idx}", ""
    if len(pieces) <= FEW_PIECES:
        cases = ", ".join(f"{column} >= {lo} AND {column} < {hi}, {idx}" for idx, lo, hi in pieces)
        return f"multiIf({cases}, -1)", "idx >= 0"
    return None


def _mapped(source: str, column: str, pieces: Sequence[Piece]) -> tuple[str, str]:
    """The piece index of each row of ``source`` (a subquery with ``column`` and z = 0), and
    the FROM and WHERE that keep the rows inside some piece: see _index, and for many
    irregular pieces an ASOF JOIN on the piece's start (one binary search per row)."""
    found = _index(f"s.{column}", pieces)
    if found is not None:
        index, keep = found
        return index, f"FROM ({source}) AS s" + (f" WHERE {keep}" if keep else "")
    return "w.idx", (
        f"FROM ({source}) AS s ASOF JOIN {_windows(pieces)} AS w"
        f" ON s.z = w.z AND s.{column} >= w.lo WHERE s.{column} < w.hi"
    )


def _flat(
    table: str, where: str, column: str, pieces: Sequence[Piece], group_columns: Sequence[str]
) -> tuple[str, str] | None:
    """A WITH clause that names each row's window (idx) and group values (g0, ...) over
    ``table``'s own columns, and the FROM and WHERE of its rows: the one fold then reads the
    table with no subquery (an hourly report by status 1.2 times, a daily one 1.25 times as
    fast as through a subquery). None when the windows need a join (see _mapped)."""
    found = _index(column, pieces)
    if found is None:
        return None
    index, keep = found
    names = [f"{index} AS idx", *_groups(group_columns)]
    return "WITH " + ", ".join(names), f"FROM {table} WHERE {where}" + (
        f" AND {keep}" if keep else ""
    )


def _dimension(name: str) -> str:
    """A dimension's value, or NULL where the event has none (as the SQL stores return).
    Found by its position among the map's keys: ``dims[name]`` with ``mapContains`` took
    1.7 times as long for an hourly report grouped by status (the keys are unique: they
    come from a dict)."""
    position = f"indexOf(dims.keys, {literal(name)})"
    return f"if({position} > 0, dims.values[{position}], NULL)"


def _group_columns(group_by: Sequence[str]) -> list[str]:
    columns = []
    for name in group_by:
        if name == GROUP_KEY:
            columns.append("nullIf(key, '')")
        elif name == GROUP_SUBACCOUNT:
            columns.append("account")
        else:
            columns.append(_dimension(name))
    return columns


def accounts_condition(accounts: Sequence[str]) -> str:
    """The accounts' condition of a statement: one account (nearly every question) as an
    equality, which ClickHouse checks against the primary key's first column more cheaply
    than a set of one (an hourly report's statement 2 to 5% faster, round 14)."""
    if len(accounts) == 1:
        return f"account = {literal(accounts[0])}"
    return f"account IN ({literals(accounts)})"


def _where(spec: AggregateSpec, grain: Grain | None, time_column: str, lo: int, hi: int) -> str:
    """The filters of a source table; ``grain`` None for the raw events."""
    clauses = [
        accounts_condition(spec.accounts),
        f"metric = {literal(spec.metric)}",
        f"{time_column} >= {lo}",
        f"{time_column} < {hi}",
    ]
    detailed = grain is None or grain.detailed
    if spec.key_id is not None and (grain is None or grain.keyed):
        clauses.append(f"key = {literal(spec.key_id)}")
    if spec.billable is not None:
        clauses.append(f"billable = {1 if spec.billable else 0}")
    if spec.tags and detailed:
        clauses.append(f"hasAll(tags, {literal(sorted(spec.tags))})")
    if detailed:
        for dimension, value in spec.filters:
            clauses.append(
                f"mapContains(dims, {literal(dimension)}) AND dims[{literal(dimension)}]"
                f" = {literal(value)}"
            )
    return " AND ".join(clauses)


def _groups(group_columns: Sequence[str]) -> list[str]:
    return [f"{c} AS g{i}" for i, c in enumerate(group_columns)]


def _part(
    spec: AggregateSpec,
    grain: Grain,
    pieces: Sequence[Piece],
    group_columns: Sequence[str],
    aggregations: Sequence[str],
) -> str:
    """One grain's rows pre-folded per window and group. The group values are computed in the
    source, so only they and the asked values travel through the join, not the dimensions."""
    lo, hi = _span(pieces)
    columns = [*_groups(group_columns), *dict.fromkeys(_ROLLUP_COLUMNS[a] for a in aggregations)]
    source = (
        f"SELECT {', '.join([*columns, 'slot', '0 AS z'])} FROM {grain.table}"
        f" WHERE {_where(spec, grain, 'slot', lo, hi)}"
    )
    return _prefold(
        source, "slot", pieces, len(group_columns), [_FOLDS[a][0] for a in aggregations]
    )


def _raw_part(
    spec: AggregateSpec,
    pieces: Sequence[Piece],
    group_columns: Sequence[str],
    aggregations: Sequence[str],
    keyed_latest: bool = True,
) -> str:
    """The raw events of ``pieces`` pre-folded as _part folds a grain's rows, the latest
    value's state keyed as the database's tables of sets key theirs (``keyed_latest``)."""
    lo, hi = _span(pieces)
    raw = [c for a in aggregations for c in _RAW_COLUMNS[a].split(", ") if c]
    columns = [*_groups(group_columns), *dict.fromkeys(raw)]
    source = (
        f"SELECT {', '.join([*columns, 'ts', '0 AS z'])} FROM events"
        f" WHERE {_where(spec, None, 'ts', lo, hi)}"
    )
    folds = [
        _KEYED_RAW_LATEST if keyed_latest and a == "latest" else _FOLDS[a][1] for a in aggregations
    ]
    return _prefold(source, "ts", pieces, len(group_columns), folds)


def _one_table(
    spec: AggregateSpec,
    pieces: dict[Grain, list[Piece]],
    raw_pieces: Sequence[Piece],
    group_columns: Sequence[str],
    raw: bool,
) -> tuple[str, str] | None:
    """The WITH clause and the FROM of a question one table answers with no join (_flat):
    one table of rollups holds all its pieces or, with ``raw`` (a distinct count, whose
    value reads the same from a table of sets as from an event), the raw events do."""
    sources = [g for g, p in pieces.items() if p]
    grain: Grain | None
    if len(sources) == 1 and not raw_pieces:
        (grain,) = sources
        table, column, found = grain.table, "slot", pieces[grain]
    elif raw and not sources:
        grain, table, column, found = None, "events", "ts", list(raw_pieces)
    else:
        return None
    lo, hi = _span(found)
    return _flat(table, _where(spec, grain, column, lo, hi), column, found, group_columns)


def _distinct_part(
    spec: AggregateSpec,
    grain: Grain | None,
    pieces: Sequence[Piece],
    group_columns: Sequence[str],
    value: str,
    has: str,
) -> str:
    """The rows of one table of sets (``grain``) or of the raw events (None) with their
    window, group values, the counted value (v) and whether the row has it (has): only
    these travel through the join."""
    table, column = (grain.table, "slot") if grain is not None else ("events", "ts")
    lo, hi = min(p[1] for p in pieces), max(p[2] for p in pieces)
    columns = [*_groups(group_columns), f"{value} AS v", f"{has} AS has", column, "0 AS z"]
    source = f"SELECT {', '.join(columns)} FROM {table} WHERE {_where(spec, grain, column, lo, hi)}"
    index, rows = _mapped(source, column, pieces)
    refs = [f"g{n}" for n in range(len(group_columns))]
    return f"SELECT {', '.join([f'{index} AS idx', *refs, 'v', 'has'])} {rows}"


def _plain_distinct(spec: AggregateSpec) -> bool:
    """Whether the distinct table answers a distinct count of ``spec``: it keeps no dimension
    set, tag or key, only the account (a subaccount group) and billable."""
    return _plain(spec) and spec.key_id is None and GROUP_KEY not in spec.group_by


def _distinct_states(
    spec: AggregateSpec, group_columns: Sequence[str], value: str, has: str, dimension: str
) -> str:
    """A distinct count merged from exact states: the distinct table's rows of the whole UTC
    hours (the dimension's and the '' rows, which say where events are), and states made
    from the slots and raw events of the ragged ends (uniqExactStateIf's state is the
    table's). Folded once, straight from the table, when its hours are every piece."""
    pieces, raw_pieces = _split(spec.windows, (DISTINCT_GRAIN, SLOTS))
    names = f"name IN ({PRESENT}, {literal(dimension)})"
    hours = pieces[DISTINCT_GRAIN]
    groups, merged = len(group_columns), ["uniqExactMerge(u)"]
    if hours:
        lo, hi = min(p[1] for p in hours), max(p[2] for p in hours)
        where = f"{_where(spec, DISTINCT_GRAIN, 'slot', lo, hi)} AND {names}"
        if not pieces[SLOTS] and not raw_pieces:
            flat = _flat(DISTINCT, where, "slot", hours, group_columns)
            if flat is not None:
                return _select(groups, merged, flat[1], spec.totals, flat[0])
    refs = ["idx", *(f"g{n}" for n in range(groups))]
    parts = []
    if hours:
        source = f"SELECT {', '.join([*_groups(group_columns), 'u', 'slot', '0 AS z'])}"
        index, rows = _mapped(f"{source} FROM {DISTINCT} WHERE {where}", "slot", hours)
        parts.append(f"SELECT {', '.join([f'{index} AS idx', *refs[1:], 'u'])} {rows}")
    keys = ", ".join(refs)
    for grain, found in ((SLOTS, pieces[SLOTS]), (None, raw_pieces)):
        if found:
            part = _distinct_part(spec, grain, found, group_columns, value, has)
            parts.append(
                f"SELECT {keys}, uniqExactStateIf(v, has) AS u FROM ({part}) GROUP BY {keys}"
            )
    return _select(groups, merged, "FROM (" + " UNION ALL ".join(parts) + ")", spec.totals)


# Up to this many hours between a distinct count's first and last whole hour, its windows
# are found by a lookup of each hour when they are not regular (a daily report across a
# change of offset): an array literal of an entry per hour (five years of hours at most).
LOOKUP_HOURS = 5 * 366 * 24
# How a distinct count's rows are read and merged (FINAL): by as many threads as the server
# has, each taking a granule at a time. The default task is 20 granules (163,840 rows): the
# heavy account's 90-day Sessions at 10M reads 25 granules of one settled part, so one
# thread read 20 of them and the second 5, and two threads were no faster than one (wall
# 31.4 against 32.7 ms, quiet machine). A granule per task shares them evenly: 20.0 to 21.6
# ms (docs/clickhouse.md, "Questions, round 17"). Round 14 kept FINAL to one thread (over a
# live tail, 0.85 to 0.88 of the CPU of two), measured before the tasks were split.
FINAL_SETTINGS = (
    "merge_tree_min_rows_for_concurrent_read = 8192, merge_tree_min_bytes_for_concurrent_read = 1"
)
# distinct_values' whole UTC hours, as the window splitter cuts them (chschema.DISTINCT_VALUES).
VALUE_HOURS = Grain(DISTINCT_VALUES, DISTINCT_GRAIN.unit_ms, detailed=False, keyed=False)


def _hour_windows(pieces: Sequence[Piece]) -> str | None:
    """Each entry's window (x, an entry of distinct_values' arrays, 2 * hour + billable,
    known to lie in the pieces' span) by arithmetic on regular pieces, else by a lookup of
    an entry per hour (-1 for an hour between pieces); None for a span too long to look
    up, or pieces that overlap. x - 2 * lo is not negative, so intDiv's truncation is the
    floor."""
    regular = _regular(pieces)
    if regular is not None:
        lo, width, idx = regular
        return f"intDiv(x - {2 * lo}, {2 * width}) + {idx}"
    lo, hi = min(p[1] for p in pieces), max(p[2] for p in pieces)
    if hi - lo > LOOKUP_HOURS:
        return None
    found = [-1] * (hi - lo)
    for idx, start, end in pieces:
        if found[start - lo : end - lo].count(-1) != end - start:
            return None  # windows that overlap (AggregateSpec forbids it): not one per hour
        found[start - lo : end - lo] = [idx] * (end - start)
    return f"[{','.join(map(str, found))}][intDiv(x - {2 * lo}, 2) + 1]"


def _distinct_values(
    spec: AggregateSpec,
    group_columns: Sequence[str],
    value: str,
    has: str,
    dimension: str,
    count_rows: bool,
    values_parts: bool = False,
) -> str | None:
    """A distinct count whose whole UTC hours are read from distinct_values (chschema): each
    value's row names the hours it was seen in (and whether billable), so each row gives
    the windows it was seen in, once each (d). One account, no group, no ragged end (and
    ``count_rows``): a window's count is the number of rows with it, and the range's the
    number with any, read with FINAL so that a value's rows in several parts are one:
    counts, no hash set (at 10M, 2.75 times the CPU of the distinct states merged, settled;
    over the four parts a backfill leaves, FINAL costs 1.5 times that, still below counting
    each value once: docs/clickhouse.md, "Questions, round 14"). Otherwise each value is
    counted once per window and group and over the range (uniqExact, GROUPING SETS), with
    the values of the ragged quarter hours (slots) and milliseconds (raw events) beside
    it: a value in two accounts, two parts or two billable rows is one. The PRESENT rows
    give each window with events its row, 0 when none of them has the dimension. None
    when no window holds a whole UTC hour, or the span is too long to look up: the tables
    of sets answer. ``values_parts``: the table may hold a value's rows in several parts
    (_rows_counted drops the rows with no entry in the range before FINAL merges them)."""
    pieces, raw_pieces = _split(spec.windows, (VALUE_HOURS, SLOTS))
    hours = pieces[VALUE_HOURS]
    if not hours:
        return None
    window = _hour_windows(hours)
    if window is None:
        return None
    lo, hi = min(p[1] for p in hours), max(p[2] for p in hours)
    billable = "" if spec.billable is None else f" AND bitAnd(x, 1) = {int(spec.billable)}"
    inside = f"arrayFilter(x -> x >= {2 * lo} AND x < {2 * hi}{billable}, hours)"
    where = (
        f"{accounts_condition(spec.accounts)} AND metric = {literal(spec.metric)}"
        f" AND name IN ({PRESENT}, {literal(dimension)})"
    )
    one = len(spec.accounts) == 1 and not group_columns
    if count_rows and one and not pieces[SLOTS] and not raw_pieces:
        return _rows_counted(_window_keys(hours, lo), inside, where, spec.totals, values_parts)
    windows = f"arrayMap(x -> {window}, {inside})"
    if _regular(hours) is None:  # a lookup's hours between pieces are -1: in no window
        windows = f"arrayFilter(i -> i >= 0, {windows})"
    found = f"arrayDistinct({windows})"
    columns = ", ".join(["idx", *_groups(group_columns), "v", f"name != {PRESENT} AS has"])
    parts = [
        f"SELECT * FROM (WITH {found} AS d SELECT {columns} FROM {DISTINCT_VALUES}"
        f" ARRAY JOIN d AS idx WHERE {where})"
    ]
    for grain, ragged in ((SLOTS, pieces[SLOTS]), (None, raw_pieces)):
        if ragged:
            parts.append(_distinct_part(spec, grain, ragged, group_columns, value, has))
    source = "FROM (" + " UNION ALL ".join(parts) + ")"
    return _select(len(group_columns), ["uniqExactIf(v, has)"], source, spec.totals)


def _plain(spec: AggregateSpec) -> bool:
    """Whether the tables without dimension or tag sets answer ``spec``: no filter, tag or
    dimension group (the key and subaccount groups are columns of theirs)."""
    return (
        not spec.filters
        and not spec.tags
        and all(g in (GROUP_KEY, GROUP_SUBACCOUNT) for g in spec.group_by)
    )


def _latest_tops(
    spec: AggregateSpec, group_columns: Sequence[str], alone: bool = False
) -> str | None:
    """The latest value as the maximum of (ts, seq, value): the latest table's whole UTC
    hours (straight from it when they are every piece) and the raw events of the rest,
    which are a window's ragged quarter hours and milliseconds. None when no window holds
    a whole UTC hour (Kathmandu's or Kolkata's hours): the slots' argMax states answer
    those rather than every raw event of the range. ``alone`` (the question's only
    statement): each window's whole maximum, no totals; fold_tops adds them (TopsPlan)."""
    pieces, raw_pieces = _split(spec.windows, (LATEST_GRAIN,))
    hours = pieces[LATEST_GRAIN]
    if not hours:
        return None
    groups, latest = len(group_columns), ["max(top)" if alone else "max(top).3"]
    totals = spec.totals and not alone
    lo, hi = min(p[1] for p in hours), max(p[2] for p in hours)
    where = _where(spec, LATEST_GRAIN, "slot", lo, hi)
    if not raw_pieces:
        flat = _flat(LATEST, where, "slot", hours, group_columns)
        if flat is not None:
            return _select(groups, latest, flat[1], totals, flat[0])
    refs = [f"g{n}" for n in range(groups)]
    parts = []
    for found, table, column, top in (
        (hours, LATEST, "slot", "CAST(top, 'Tuple(Int64, UInt64, Float64)')"),
        (raw_pieces, "events", "ts", "(ts, seq, value)"),
    ):
        if found:
            lo, hi = min(p[1] for p in found), max(p[2] for p in found)
            grain = LATEST_GRAIN if table == LATEST else None
            columns = [*_groups(group_columns), f"{top} AS top", column, "0 AS z"]
            source = f"SELECT {', '.join(columns)} FROM {table}"
            index, rows = _mapped(
                f"{source} WHERE {_where(spec, grain, column, lo, hi)}", column, found
            )
            parts.append(f"SELECT {', '.join([f'{index} AS idx', *refs, 'top'])} {rows}")
    return _select(groups, latest, "FROM (" + " UNION ALL ".join(parts) + ")", totals)


@dataclass(frozen=True, slots=True)
class TopsPlan(Plan):
    """A latest value's only statement, whose rows carry each window's whole maximum
    (ts, seq, value) and no totals: decode_columns adds them (fold_tops)."""


def fold_tops(columns: list[list[Any]], groups: int) -> list[list[Any]]:
    """The rows of a TopsPlan with the totals its statement left out, each the greatest
    (ts, seq, value) of its rows: a range's latest value is the latest of its windows',
    a tie on the instant to the later write, as the maximum over the range would give.
    Each group's (TOTAL) and, when grouped, every group's (OVERALL, its group values
    None); the tuples then read as their values. GROUPING SETS made ClickHouse fold the
    same rows twice more (a daily StorageBytes report: 1.08 to 1.2 times the CPU, round 9)."""
    if not columns or not columns[0]:
        return columns
    windows, keys, tops = columns[0], columns[1 : 1 + groups], columns[-1]
    rows = list(zip(*keys, strict=True)) if groups else [()] * len(windows)
    best: dict[tuple[Any, ...], list[Any]] = {}
    for key, top in zip(rows, tops, strict=True):
        if key not in best or top > best[key]:
            best[key] = top
    totals = [(TOTAL, key, top) for key, top in best.items()]
    if groups:
        totals.append((OVERALL, (None,) * groups, max(best.values())))
    out: list[list[Any]] = [list(windows), *map(list, keys), [t[2] for t in tops]]
    for window, key, top in totals:
        out[0].append(window)
        for n in range(groups):
            out[1 + n].append(key[n])
        out[-1].append(top[2])
    return out


# A grouped report answered by dimension set returns a row per window and set: this many at
# most (the hourly report by status at 10M: 10,800), else its statement by values answers.
SETS_ROWS = 100_000


@dataclass(frozen=True, slots=True)
class SetsPlan(Plan):
    """A grouped or tagged report over one table of sets, its rows grouped by the dimension
    set's id (dimset) rather than by the values each row's map holds, and by the tag set's
    id (tagset) rather than filtered by each row's tags: reading and searching the map row
    by row was a third of the hourly report's statement, the tags' filter a sixth of the
    tagged one's, and the ids come back as integers. Its rows: the window, the dimension
    set's id (when grouped), the tag set's id (when tagged), the values. The store turns
    each dimension set's id into its group from the set's dimensions, and keeps only the
    rows of the tag sets that hold every tag asked, both fixed by the id (the hash of the
    sorted members) and so looked up once per set (``lookup``, ``tag_lookup``: the SQL
    before and after the ids). ``by_value`` is the same question grouped by the values and
    filtered by the tags, which answers where the ids cannot: more rows than SETS_ROWS, or
    two sets of the same cell (a set with a dimension the question does not group by, two
    tag sets holding the tags asked), whose rows must then be folded."""

    by_value: str = ""
    lookup: tuple[str, str] = ("", "")
    tag_lookup: tuple[str, str] = ("", "")


def _by_sets(
    spec: AggregateSpec,
    pieces: dict[Grain, list[Piece]],
    raw_pieces: Sequence[Piece],
    values: Sequence[str],
) -> tuple[str, tuple[str, str], tuple[str, str]] | None:
    """The statement by set of a report grouped by dimensions only, or tagged, or both,
    whose every measure folds across sets (a count, sum, minimum or maximum: the latest
    value's state and a distinct count do not), with no totals, that one table of sets
    answers straight (_flat), and its lookups of sets' dimensions and tags; None for any
    other. The tags are not in its WHERE: each row's tag set is kept or not by its id."""
    if not _read_by_sets(spec):
        return None
    sources = [g for g, p in pieces.items() if p]
    if len(sources) != 1 or not sources[0].detailed:
        return None
    flat = _one_table(replace(spec, tags=frozenset()), pieces, raw_pieces, [], raw=False)
    if flat is None:
        return None
    return _sets_statements(spec, *flat, values)


def _read_by_sets(spec: AggregateSpec) -> bool:
    """Whether a report's rows can be read by set: grouped by dimensions only, or tagged, or
    both, every measure folding across sets (a count, sum, minimum or maximum: the latest
    value's state and a distinct count do not), with no totals."""
    if spec.totals or not (spec.group_by or spec.tags):
        return False
    if any(g in (GROUP_KEY, GROUP_SUBACCOUNT) for g in spec.group_by):
        return False
    return all(m.aggregation in ("count", "sum", "min", "max") for m in spec.measures)


def _sets_statements(
    spec: AggregateSpec, names: str, source: str, values: Sequence[str]
) -> tuple[str, tuple[str, str], tuple[str, str]]:
    """A SetsPlan's statement over one table (``names``, ``source``: its WITH clause and its
    FROM and WHERE, the tags left out) and its lookups of sets' dimensions and tags."""
    ids = ["dimset"] * bool(spec.group_by) + ["tagset"] * bool(spec.tags)
    selected = ", ".join(["idx", *ids, *values])
    # A grouped report's rows each group's together, in window order (one set per group),
    # for the engine's sorts; a tagged one's few rows in any (sorting them cost 0.3 ms of a
    # 5 ms statement).
    order = " ORDER BY dimset, idx" if spec.group_by else ""
    sql = (
        f"{names} SELECT {selected} {source} GROUP BY idx, {', '.join(ids)}{order}"
        f" LIMIT {SETS_ROWS + 1}"
    )

    def lookup(column: str, members: str) -> tuple[str, str]:
        if column not in ids:
            return "", ""
        return f"{names} SELECT {column}, {members} {source} AND {column} IN (", (
            f") LIMIT 1 BY {column}"
        )

    return sql, lookup("dimset", "dims"), lookup("tagset", "tags")


def _prefold(
    source: str, column: str, pieces: Sequence[Piece], groups: int, values: Sequence[str]
) -> str:
    refs = ["idx", *[f"g{i}" for i in range(groups)]]
    index, rows = _mapped(source, column, pieces)
    selected = [f"{index} AS idx", *refs[1:], *values]
    return f"SELECT {', '.join(selected)} {rows} GROUP BY {', '.join(refs)}"


def _select(
    groups: int, values: Sequence[str], source: str, totals: bool = False, names: str = ""
) -> str:
    """The outer fold per window and group; with ``totals``, in the same scan, per group over
    every window (TOTAL) and, when grouped, over everything (OVERALL), by GROUPING SETS.
    ``names``: a WITH clause naming idx and the groups over ``source``'s columns (_flat)."""
    refs = [f"g{i}" for i in range(groups)]
    with_ = f"{names} " if names else ""
    if not totals:
        keys = ", ".join(["idx", *refs])
        select = f"{with_}SELECT {', '.join([keys, *values])} {source} GROUP BY {keys}"
        if not refs:
            return select
        # Each group's rows together, in window order, the groups in the engine's order
        # (missing values last): its two sorts of an hourly report's 10,800 cells then only
        # merge runs. The answer is the same in any order; this one is cheaper to shape.
        return f"{select} ORDER BY {', '.join(refs)}, idx"
    # grouping(x) is 1 in the rows of a set that leaves x out.
    if refs:
        window = f"if(grouping(idx) = 0, idx, if(grouping(g0) = 0, {TOTAL}, {OVERALL}))"
        sets = f"({', '.join(['idx', *refs])}), ({', '.join(refs)}), ()"
    else:
        window, sets = f"if(grouping(idx) = 0, idx, {TOTAL})", "(idx), ()"
    selected = [f"{window} AS window_index", *refs, *values]
    # The empty set yields a row even when nothing matched; a fold of nothing has none.
    return (
        f"{with_}SELECT {', '.join(selected)} {source}"
        f" GROUP BY GROUPING SETS ({sets}) HAVING count() > 0"
    )


_START, _END, _INDEX = attrgetter("start_ms"), attrgetter("end_ms"), attrgetter("index")


def _one_unit(window: Window, width: int) -> bool:
    return window.end_ms - window.start_ms == width and window.start_ms % width == 0


def _split(
    windows: Sequence[Window], grains: Sequence[Grain]
) -> tuple[dict[Grain, list[Piece]], list[Piece]]:
    """sqlplan.split_windows, with a short road for the usual report: every window one unit
    of a grain, aligned to it (an hourly report in a zone of whole-hour offsets, a daily one
    in UTC), is that one piece, but for a ragged first and last window. split_windows finds
    the same pieces recursing three times per window: two thirds of planning a 2,160-hour
    report, 2.4 ms when its range starts inside an hour."""
    # The width of a unit: the second window's, as the first may be ragged.
    second = windows[1] if len(windows) > 2 else windows[0]
    width = second.end_ms - second.start_ms
    grain = next((g for g in grains if g.unit_ms == width), None)  # none coarser fits in
    if grain is None:
        return split_windows(windows, grains)
    # The usual report's windows follow each other, in order, one unit each: their columns
    # compared whole with the runs they would be, by C loops, one list of each. A range
    # that starts or ends inside a unit (a dashboard's, ending now) has a ragged first or
    # last window: those two are cut by split_windows, the run between them is the same.
    a = 0 if _one_unit(windows[0], width) else 1
    b = len(windows) - (0 if _one_unit(windows[-1], width) else 1)
    run = windows[a:b]
    n = len(run)
    if n > 1:  # one piece is found by a comparison (_regular)
        first = run[0]
        lo = first.start_ms
        if (
            lo % width == 0
            and list(map(_START, run)) == list(range(lo, lo + n * width, width))
            and list(map(_END, run)) == list(range(lo + width, lo + (n + 1) * width, width))
            and list(map(_INDEX, run)) == list(range(first.index, first.index + n))
        ):
            pieces, raw = split_windows([*windows[:a], *windows[b:]], grains)
            if not pieces[grain]:  # else the ends' units would come before the run's
                unit_run = UnitRun(first.index, lo // width, n)
                return {g: unit_run if g is grain else pieces[g] for g in grains}, raw
    if all(w.end_ms - w.start_ms == width and w.start_ms % width == 0 for w in windows):
        units = [(w.index, w.start_ms // width, w.start_ms // width + 1) for w in windows]
        return {g: units if g is grain else [] for g in grains}, []
    return split_windows(windows, grains)


def plan_aggregate(
    spec: AggregateSpec,
    hour_sets: bool = False,
    distinct_hours: bool = False,
    latest_hours: bool = False,
    coarse_tables: bool = True,
    distinct_values: bool = False,
    count_rows: bool = True,
    keyed_latest: bool = True,
    values_parts: bool = False,
) -> list[Plan]:
    """One statement for the foldable measures together, one per distinct count. With
    ``hour_sets`` (the hour table is complete, see chupgrade.py), a grouped or tagged
    question reads whole UTC hours there and slots only for its ragged quarter hours; with
    ``distinct_values`` (the distinct values are complete), a distinct count with no
    filter, tag or key reads its whole hours' values there (_distinct_values; one
    account's rows counted with FINAL unless not ``count_rows``), or else with
    ``distinct_hours`` (a database made before round 14, its distinct table complete)
    merges its whole hours' states (_distinct_states); with
    ``latest_hours``, a latest value with no filter, tag or dimension group is a maximum
    over the latest table's hours, in a statement of its own (_latest_tops), and the other
    measures of a plain report read its hours too; without it, the hour and day tables of a
    database created before round 9 (``coarse_tables``), or else the slots. ``keyed_latest``:
    the tables of sets key the latest value by one number (chschema.latest_keyed).
    ``values_parts``: the distinct values may be in several parts (written moments ago), so
    the rows counted drop those with no entry in the range before FINAL (_rows_counted)."""
    grains = grains_for(spec)
    if hour_sets and grains == (SLOTS,):
        grains = (HOUR_SETS_GRAIN, SLOTS)
    elif grains != (SLOTS,):  # a plain report: the hours of values, else the older tables
        if latest_hours:
            grains = (LATEST_GRAIN, SLOTS)
        elif not coarse_tables:
            grains = (SLOTS,)
    pieces, raw_pieces = _split(spec.windows, grains)
    if not spec.accounts or (not raw_pieces and not any(pieces.values())):
        return []
    group_columns = _group_columns(spec.group_by)
    plans: list[Plan] = []

    tops = None  # the latest value's own statement, when the latest table answers it
    latest = [i for i, m in enumerate(spec.measures) if m.aggregation == "latest"]
    # With no other measure, its one statement leaves the totals to fold_tops.
    alone = spec.totals and latest == list(range(len(spec.measures)))
    if latest_hours and latest and _plain(spec):
        tops = _latest_tops(spec, group_columns, alone)
    if tops is not None:
        kind = TopsPlan if alone else Plan
        plans.append(kind(tops, (), (latest[0],), _decoder(spec, (latest[0],))))
    foldable = [
        i
        for i, m in enumerate(spec.measures)
        if m.aggregation in _FOLDS and not (tops is not None and i in latest)
    ]
    if foldable:
        plans.append(
            _folded(spec, pieces, raw_pieces, group_columns, tuple(foldable), keyed_latest)
        )

    for i, measure in enumerate(spec.measures):
        if measure.aggregation in _FOLDS:
            continue
        if measure.aggregation != "unique_count" or measure.dimension is None:
            raise ValueError(f"unknown aggregation {measure.aggregation!r}")
        # Distinct values are never folded from buckets: each window's are counted over the
        # rows of the tables of sets that cover it (grains_for gives only those: a row per
        # hour or slot and dimension set holds each of its events' values once) and the raw
        # events of its ragged ends; with totals, over the whole range in the same scan.
        # A session seen in many events of an hour is one row there, not many.
        name = literal(measure.dimension)
        value, has = f"dims[{name}]", f"mapContains(dims, {name})"
        counted = None
        if distinct_values and _plain_distinct(spec):
            counted = _distinct_values(
                spec, group_columns, value, has, measure.dimension, count_rows, values_parts
            )
        elif distinct_hours and _plain_distinct(spec):
            counted = _distinct_states(spec, group_columns, value, has, measure.dimension)
        if counted is not None:
            plans.append(Plan(counted, (), (i,), _decoder(spec, (i,))))
            continue
        flat = _one_table(spec, pieces, raw_pieces, group_columns, raw=True)
        if flat is not None:
            names, source = flat
            counted = f"uniqExactIf({value}, {has})"
            sql = _select(len(group_columns), [counted], source, spec.totals, names)
        else:
            parts = [
                _distinct_part(spec, g, p, group_columns, value, has)
                for g, p in pieces.items()
                if p
            ]
            if raw_pieces:
                parts.append(_distinct_part(spec, None, raw_pieces, group_columns, value, has))
            source = "FROM (" + " UNION ALL ".join(parts) + ")"
            sql = _select(len(group_columns), ["uniqExactIf(v, has)"], source, spec.totals)
        plans.append(Plan(sql, (), (i,), _decoder(spec, (i,))))
    return plans


def _folded(
    spec: AggregateSpec,
    pieces: dict[Grain, list[Piece]],
    raw_pieces: Sequence[Piece],
    group_columns: Sequence[str],
    positions: tuple[int, ...],
    keyed_latest: bool = True,
) -> Plan:
    """The one statement of the foldable measures at ``positions``: one table's (_flat, and
    by set where _by_sets can), else a UNION ALL of each grain's part and the raw events'
    (a RaggedPlan where the whole hours and the ragged ends can be asked apart)."""
    aggregations = list(dict.fromkeys(spec.measures[i].aggregation for i in positions))
    values = [_FOLDS[spec.measures[i].aggregation][2] for i in positions]
    decoder = _decoder(spec, positions)
    # One table answers the usual report (whole hours or days): folded once, straight.
    flat = _one_table(spec, pieces, raw_pieces, group_columns, raw=False)
    if flat is not None:
        names, source = flat
        sql = _select(len(group_columns), values, source, spec.totals, names)
        by_sets = _by_sets(spec, pieces, raw_pieces, values)
        if by_sets is None:
            return Plan(sql, (), positions, decoder)
        by_set, lookup, tag_lookup = by_sets
        return SetsPlan(by_set, (), positions, decoder, sql, lookup, tag_lookup)
    parts = [_part(spec, g, p, group_columns, aggregations) for g, p in pieces.items() if p]
    if raw_pieces:
        parts.append(_raw_part(spec, raw_pieces, group_columns, aggregations, keyed_latest))
    source = "FROM (" + " UNION ALL ".join(parts) + ")"
    sql = _select(len(group_columns), values, source, spec.totals)
    return _ragged(spec, pieces, group_columns, positions, sql) or Plan(sql, (), positions, decoder)


@dataclass(frozen=True, slots=True)
class RaggedPlan(Plan):
    """A report whose range starts or ends inside a unit (a dashboard's, ending now) asked as
    two statements: its whole units by the one-table statement whole ranges take (``whole``,
    by set where it can) and its ragged first and last windows from the raw events alone
    (``ends``, by set where ``whole`` is: the events carry the rollups' set ids). Each
    window is answered by one of them, so their rows are the answer side by side. Its
    ``sql`` is the UNION ALL of the hours, slots and raw events that answers the same in
    one statement (beside a distinct count's, which fills the same cells): every table a
    statement reads costs 7 to 15 ms however few rows it gives, and that UNION ALL read
    three, the raw events over the whole range's span (docs/clickhouse.md, "Questions,
    round 14 (third step)")."""

    whole: Plan | None = None
    ends: Plan | None = None


def _ragged(
    spec: AggregateSpec,
    pieces: dict[Grain, list[Piece]],
    group_columns: Sequence[str],
    positions: tuple[int, ...],
    sql: str,
) -> RaggedPlan | None:
    """The RaggedPlan of a report whose whole units _split found as one run (a UnitRun) between
    a ragged first and last window, when each measure folds across windows apart (a count,
    sum, minimum or maximum: the latest value's state is not read from raw events here) and
    no totals ask a fold across the two statements; None otherwise."""
    if spec.totals or any(
        spec.measures[i].aggregation not in ("count", "sum", "min", "max") for i in positions
    ):
        return None
    runs = [(g, p) for g, p in pieces.items() if isinstance(p, UnitRun)]
    if len(runs) != 1:
        return None
    (grain, run), windows = runs[0], spec.windows
    first, n = run.regular[2], len(run)
    a = 0 if windows[0].index == first else 1
    inner, ends = windows[a : a + n], (*windows[:a], *windows[a + n :])
    if not ends or inner[0].index != first or inner[-1].index != first + n - 1:
        return None
    whole_pieces = {g: run if g is grain else [] for g in pieces}
    # One table's run of units, no raw piece: the statement whole ranges take (_one_table).
    whole = _folded(replace(spec, windows=inner), whole_pieces, [], group_columns, positions)
    # The ends' own instants only: between them lie the range's whole units, whose raw
    # events the statement need not find (its span's condition alone found them all).
    spans = [(w.index, w.start_ms, w.end_ms) for w in ends]
    lo, hi = spans[0][1], spans[-1][2]
    instants = ""
    if len(spans) > 1:
        instants = " AND (" + " OR ".join(f"ts >= {a} AND ts < {b}" for _, a, b in spans) + ")"
    flat = _flat("events", _where(spec, None, "ts", lo, hi) + instants, "ts", spans, group_columns)
    if flat is None:  # at most two pieces are found by comparisons, but for FEW_PIECES = 0
        return None
    raw_values = [_FOLDS[spec.measures[i].aggregation][1].split(" AS ")[0] for i in positions]
    by_value = _select(len(group_columns), raw_values, flat[1], False, flat[0])
    decoder = _decoder(spec, positions)
    read: Plan = Plan(by_value, (), positions, decoder)
    if isinstance(whole, SetsPlan):
        # By set too: the events' dimset and tagset are the rollups' ids, and a row's id read
        # where its dimensions' map was took 12.5 rather than 17.4 ms of CPU (round 14).
        untagged = _where(replace(spec, tags=frozenset()), None, "ts", lo, hi) + instants
        flat = _flat("events", untagged, "ts", spans, [])
        assert flat is not None  # the same pieces as above
        by_set, lookup, tag_lookup = _sets_statements(spec, *flat, raw_values)
        read = SetsPlan(by_set, (), positions, decoder, by_value, lookup, tag_lookup)
    return RaggedPlan(sql, (), positions, decoder, whole, read)


def _whole(spec: AggregateSpec, positions: tuple[int, ...]) -> tuple[bool, ...]:
    # Counts come back whole, everything else as floats: what the SQL stores return.
    return tuple(spec.measures[p].aggregation in ("count", "unique_count") for p in positions)


def _decoder(
    spec: AggregateSpec, positions: tuple[int, ...]
) -> Callable[[Sequence[Any]], AggregateRow]:
    return row_decoder(spec, positions, _whole(spec, positions))


def decode_sets(
    spec: AggregateSpec,
    plan: SetsPlan,
    columns: list[list[Any]],
    dims: dict[int, Any],
    tags: dict[int, frozenset[str]] | None = None,
) -> AggregateColumns | None:
    """The result of a SetsPlan read as decode_columns reads its statement by values: only
    the rows of tag sets holding every tag asked kept (``tags``: each tag set's tags), each
    dimension set's id turned into its group's values (``dims``: each set's dimensions);
    each must hold every id of the result. None when its statement by values must answer
    instead (see SetsPlan). Per row only C loops run."""
    if not columns:
        return AggregateColumns([], [], [])
    windows = columns[0]
    if len(windows) > SETS_ROWS:
        return None
    grouped, tagged = bool(spec.group_by), bool(spec.tags)
    sets = columns[1] if grouped else []
    values = columns[1 + grouped + tagged :]
    if tagged:
        assert tags is not None
        tagsets = columns[1 + grouped]
        wanted = spec.tags
        holding = {t for t in dict.fromkeys(tagsets) if wanted <= tags[t]}
        kept = list(map(holding.__contains__, tagsets))
        windows = list(compress(windows, kept))
        sets = list(compress(sets, kept))
        values = [list(compress(column, kept)) for column in values]
        # Two tag sets holding the tags in one cell: their rows would be folded here.
        cells = list(zip(windows, sets, strict=True)) if grouped else windows
        if len(holding) > 1 and len(set(cells)) < len(cells):
            return None
    if not grouped:
        return decode_columns(spec, plan, [windows, *values])
    names = spec.group_by
    keys = {s: tuple(dims[s].get(name) for name in names) for s in dict.fromkeys(sets)}
    if len(set(keys.values())) < len(keys):  # two sets, one group: folded by the values
        return None
    # Each set's group made once and shared by its rows, straight from the set's id: its
    # values by name, then each row's tuple of them hashed again (decode_columns) took 1.35
    # ms of an hourly report's 10,800 rows (round 14).
    made = {s: tuple(zip(names, k, strict=True)) for s, k in keys.items()}
    _every_measure(spec, plan)
    return AggregateColumns(windows, list(map(made.__getitem__, sets)), _values(spec, plan, values))


def decode_columns(spec: AggregateSpec, plan: Plan, columns: list[list[Any]]) -> AggregateColumns:
    """The result of a question's only statement (every measure: see plan_aggregate), read
    by columns (the window, the group values, each measure's values; see
    Transport.query_columns), as the spec's rows.
    Per row only C loops run: a group tuple is made once per distinct group and shared by
    its rows, and the values' tuples come out of one zip."""
    _every_measure(spec, plan)
    if isinstance(plan, TopsPlan):
        columns = fold_tops(columns, len(spec.group_by))
    if not columns:
        return AggregateColumns([], [], [])
    windows: list[int] = columns[0]
    rows = len(windows)
    names = spec.group_by
    end = 1 + len(names)
    groups: list[Group]
    if not names:
        groups = [()] * rows
    else:
        keys: list[Any] = columns[1] if end == 2 else list(zip(*columns[1:end], strict=True))
        made = {
            k: tuple(zip(names, k if end > 2 else (k,), strict=True)) for k in dict.fromkeys(keys)
        }
        groups = list(map(made.__getitem__, keys))
        if spec.totals and OVERALL in windows:  # the one row over every group
            groups[windows.index(OVERALL)] = ()
    return AggregateColumns(windows, groups, _values(spec, plan, columns[end:]))


def _every_measure(spec: AggregateSpec, plan: Plan) -> None:
    """Refuses a plan that is one of several statements: its rows are not every measure."""
    if plan.positions != tuple(range(len(spec.measures))):
        raise ValueError("one of several statements: merge their rows (sqlplan.run_plans)")


def _values(
    spec: AggregateSpec, plan: Plan, columns: Sequence[list[Any]]
) -> list[tuple[float | None, ...]]:
    """Each row's measure values as one tuple, from the measures' columns: counts whole,
    the rest floats (ClickHouse's JSON says 5 for 5.0), as the SQL stores return them."""
    measured = []
    for column, whole in zip(columns, _whole(spec, plan.positions), strict=True):
        if not whole:
            column = (
                list(map(float, column))
                if None not in column
                else [None if v is None else float(v) for v in column]
            )
        measured.append(column)
    return list(zip(*measured, strict=True))


@dataclass(frozen=True, slots=True)
class WindowKeys:
    """How one account's rows counted (_rows_counted) name each entry's window: as the
    narrowest unsigned integer (``cast``) that holds every window's index, ``marker`` (one
    past the last: the row that says "this row has a window", counted as the range's total)
    and, for a lookup, ``gap`` (two past: an hour between pieces, in no window). A key of one
    or two bytes is grouped by a flat array, not a hash table, and the joined rows carry
    nothing but it and whether the row is a value's (round 16). Window indexes below 0 (never
    made by the engine) keep Int64 keys."""

    cast: str
    marker: int
    gap: int
    lookup: str | None  # the lookup's array of an entry per hour, or None (arithmetic)
    arithmetic: str

    def windows(self, inside: str) -> str:
        """Each entry of ``inside`` (entries in the range) mapped to its window's key; a
        lookup's hours between pieces dropped."""
        if self.lookup is None:
            return f"arrayMap(x -> {self.cast}({self.arithmetic}), {inside})"
        mapped = f"arrayMap(x -> {self.cast}({self.lookup}[{self.arithmetic}]), {inside})"
        return f"arrayFilter(i -> i != {self.gap}, {mapped})"


def _window_keys(pieces: Sequence[Piece], lo: int) -> WindowKeys:
    """The window keys (WindowKeys) of _hour_windows' pieces, whose span starts at hour
    ``lo``: arithmetic on regular pieces, else a lookup of an entry per hour (the caller has
    checked that _hour_windows finds one)."""
    indexes = [p[0] for p in pieces]
    marker, gap = max(indexes) + 1, max(indexes) + 2
    cast = "toInt64"
    if min(indexes) >= 0:
        cast = next((f"toUInt{b}" for b in (8, 16, 32) if gap < 2**b), cast)
    regular = _regular(pieces)
    if regular is not None:
        first, width, idx = regular
        return WindowKeys(cast, marker, gap, None, f"intDiv(x - {2 * first}, {2 * width}) + {idx}")
    hi = max(p[2] for p in pieces)
    found = [gap] * (hi - lo)
    for idx, start, end in pieces:
        found[start - lo : end - lo] = [idx] * (end - start)
    return WindowKeys(
        cast, marker, gap, f"[{','.join(map(str, found))}]", f"intDiv(x - {2 * lo}, 2) + 1"
    )


def _rows_counted(
    keys: WindowKeys, inside: str, where: str, totals: bool, values_parts: bool
) -> str:
    """One account's distinct values over whole UTC hours, counted as rows (_distinct_values):
    each window's count is the number of its rows with the dimension (h) whose windows (d:
    the keys of its entries ``inside`` the range, each once) hold it; with ``totals``, the
    range's is the number of such rows with any window: a row with a window gets one more
    key, the marker (arrayResize appends it only where d is not empty), whose count is the
    total and whose group exists only when some row has a window, as the answer's TOTAL row
    does. One statement: the rows joined to their keys and grouped, no subquery of the rows
    and none over their counts. Round 15 joined each row to its windows as Int64 with its
    first window beside them and added TOTAL's row over the counted windows; this is 1.18
    to 1.25 times as fast in CPU for the heavy account's 90-day Sessions at 10M settled
    (docs/clickhouse.md, "Questions, round 16"). h keeps the count exact whatever the PRESENT
    row holds (counting every joined row less one, its row, cost no less).
    FINAL merges a value's rows in several parts, by every thread (FINAL_SETTINGS): the
    settings of a subquery are its own, and the transport adds its own to the statement.
    With ``values_parts`` (the table may hold a value's rows in several parts), the rows
    with no entry inside the range are dropped by PREWHERE, before the merge: exact, as
    such a row adds nothing in the range to its value's union. Over a backfill's parts,
    where the merge is most of the time, 1.21 to 1.31 times as fast; over one part 0.86 to
    0.90, the filter paid for no merge (docs/clickhouse.md, "Questions, round 15 (third
    step)")."""
    filtered = "PREWHERE" if values_parts else "WHERE"
    if values_parts:
        where = f"{where} AND notEmpty({inside})"
    joined, window = "d", "toInt64(idx)"
    if totals:
        joined = f"arrayResize(d, length(d) + notEmpty(d), {keys.cast}({keys.marker}))"
        window = f"if(idx = {keys.marker}, {TOTAL}, toInt64(idx))"
    return (
        f"SELECT * FROM (WITH arrayDistinct({keys.windows(inside)}) AS d,"
        f" toUInt8(name != {PRESENT}) AS h SELECT {window} AS window_index, sum(h)"
        f" FROM {DISTINCT_VALUES} FINAL"
        f" ARRAY JOIN {joined} AS idx {filtered} {where} GROUP BY idx"
        f" SETTINGS {FINAL_SETTINGS})"
    )
