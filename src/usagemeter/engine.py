"""The usage engine: plans a Query over the store and shapes its Result.

Every endpoint, the dashboard and the CLI ask their questions here. The engine turns the
query's range into zone-aligned buckets, asks the store for folded values per bucket and
group, and works out totals: folded from the buckets where the aggregation allows it, asked
again over the whole range where it does not (a distinct count or a gauge's latest value over
a month is not the sum of its days).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import accumulate, chain
from operator import itemgetter
from typing import cast

from usagemeter.bulk import collector_paused, made
from usagemeter.meters import MeterRegistry
from usagemeter.model import (
    NO_CELLS,
    Aggregation,
    BucketCells,
    Group,
    GroupValues,
    Query,
    Result,
)
from usagemeter.portal import check_metric
from usagemeter.store.base import (
    OVERALL,
    TOTAL,
    AggregateColumns,
    AggregateSpec,
    ColumnarAggregates,
    Measure,
    Store,
    Window,
)
from usagemeter.store.retention import check_raw
from usagemeter.timewindows import Bucket, Granularity, bucket_edges, parse_zone


def _sort_key(group: Group) -> tuple[tuple[bool, str], ...]:
    # Missing values (None) sort after every present value.
    return tuple((value is None, value or "") for _, value in group)


def _fold(aggregation: Aggregation, values: Iterable[float | None]) -> float:
    # A column of a group's rows is a tuple, without None as a rule: no copy then.
    present: tuple[float, ...]
    if isinstance(values, tuple) and None not in values:
        present = values
    else:
        present = tuple(v for v in values if v is not None)
    if not present:
        return 0
    if aggregation is Aggregation.MAX:
        return max(present)
    if aggregation is Aggregation.MIN:
        return min(present)
    return sum(present)


@dataclass(frozen=True, slots=True)
class MeasurePlan:
    """The query's aggregations, the measures the store computes for them, and which
    measures feed each aggregation (one each; an average's sum and count)."""

    aggregations: tuple[Aggregation, ...]
    measures: tuple[Measure, ...]
    sources: tuple[tuple[int, ...], ...]

    @property
    def direct(self) -> bool:
        """Each aggregation is its own measure, in order (the usual case): the measures'
        values are the aggregations'."""
        return self.sources == _DIRECT[: len(self.sources)]

    @property
    def measured(self) -> tuple[Aggregation, ...]:
        return tuple(Aggregation(m.aggregation) for m in self.measures)

    def derive(self, measured: Sequence[float | None]) -> tuple[float, ...]:
        """The aggregations' values from the measures' (None where no event counted)."""
        values = _zeros(measured)
        if self.direct:
            return values
        out = []
        for aggregation, source in zip(self.aggregations, self.sources, strict=True):
            if aggregation is Aggregation.AVG:
                total, count = values[source[0]], values[source[1]]
                out.append(total / count if count else 0.0)
            else:
                out.append(values[source[0]])
        return tuple(out)


# The sources of a plan whose every aggregation is its own measure, in order.
_DIRECT = tuple((i,) for i in range(32))


class Engine:
    """Answers queries over one store with one set of meters."""

    def __init__(self, store: Store, meters: MeterRegistry | None = None) -> None:
        self.store = store
        self.meters = meters or MeterRegistry()

    def plan(self, query: Query) -> MeasurePlan:
        """What to ask the store for the query's aggregations: each one's own measure, except
        an average, which is the sum and the count (both kept in every rollup) divided."""
        meter = self.meters.get(query.metric)
        measures: list[Measure] = []

        def position(measure: Measure) -> int:
            if measure not in measures:
                measures.append(measure)
            return measures.index(measure)

        aggregations = query.aggregations or (meter.aggregation,)
        sources: list[tuple[int, ...]] = []
        for aggregation in aggregations:
            if aggregation is Aggregation.AVG:
                sources.append((position(Measure("sum")), position(Measure("count"))))
                continue
            dimension = None
            if aggregation is Aggregation.UNIQUE_COUNT:
                dimension = query.unique_dimension or meter.dimension
                if dimension is None:
                    raise ValueError(
                        f"metric {query.metric!r} has no unique_count meter: name its"
                        " dimension, e.g. unique_count(session_id)"
                    )
            sources.append((position(Measure(aggregation.value, dimension)),))
        return MeasurePlan(tuple(aggregations), tuple(measures), tuple(sources))

    def buckets(self, query: Query) -> list[Bucket]:
        cuts = self._edges(query)[0]
        return list(map(Bucket, cuts, cuts[1:]))

    @staticmethod
    def _edges(query: Query) -> Cuts:
        """The query's bucket boundaries in its zone and as epoch milliseconds
        (timewindows.bucket_edges), as far as its limit reaches, and its buckets' windows:
        kept for the ranges asked lately (_kept_cuts)."""
        start, end = query.start, query.end
        if start.tzinfo is None or end.tzinfo is None:  # refused by bucket_edges, not kept
            return _cuts(start, end, query.granularity, query.tz, query.limit)
        # Keyed by the instants in UTC: two readings of one wall time in a zone (a fall
        # back's) compare equal within that zone, and the cuts depend on the instants only.
        return _kept_cuts(
            start.astimezone(UTC), end.astimezone(UTC), query.granularity, query.tz, query.limit
        )

    def run(self, query: Query) -> Result:
        check_metric(query.metric)  # a portal token limited to some metrics (portal.py)
        # The cyclic collector paused for the whole question (bulk.collector_paused): a
        # store's answer is thousands of young tuples and lists (an hourly report's 10,800
        # rows), which it then walked every 700 allocations while they were read and shaped,
        # about 3 ms of a 25 ms report. None of them forms a cycle; one pass after sees them.
        with collector_paused():
            return self._run(query)

    def _run(self, query: Query) -> Result:
        plan = self.plan(query)
        cuts, _, windows = self._edges(query)
        aggregations = plan.aggregations
        if not cuts:
            return Result(
                query, aggregations, NO_CELLS, (), plan.derive((None,) * len(plan.measures))
            )
        buckets = len(windows)
        additive = all(m.is_additive for m in plan.measured)
        # A distinct count or a latest value over the range is not a fold of its buckets:
        # the store computes the range's totals beside the buckets, in the same call.
        spec = self._spec(query, windows, plan.measures, query.group_by, totals=not additive)
        answer = self._aggregate(spec)
        at, groups, values = answer.windows, answer.groups, answer.values

        # Rows ordered by window, and by group within a window: each bucket's cells are then one
        # run of the columns, already sorted (an hourly report by status has thousands of
        # buckets and about 10,800 cells). The totals' rows (negative windows) come first. Ranks,
        # orders and columns are all made by C loops; no Python statement runs per cell, and no
        # object is made per cell or bucket: the answer keeps its cells as columns
        # (model.BucketCells), which the native API writes out as they are.
        counts = Counter(groups)
        ranked = sorted(counts, key=_sort_key)
        by_group: Sequence[int] = range(len(at))
        ranks: list[int] = []
        if len(ranked) > 1:
            rank = {group: r for r, group in enumerate(ranked)}
            ranks = list(map(rank.__getitem__, groups))
            by_group = sorted(by_group, key=ranks.__getitem__)
        order = sorted(by_group, key=at.__getitem__)  # stable: groups stay in order
        if plan.direct and None not in chain.from_iterable(values):
            cell_values: Sequence[tuple[float, ...]] = values  # type: ignore[assignment]
        else:
            cell_values = list(map(plan.derive, values))
        # Where each bucket's cells begin: its windows' rows counted, after the totals' rows.
        per_window = Counter(at)
        before_buckets = per_window[TOTAL] + per_window[OVERALL]
        in_buckets = order[before_buckets:]
        cells = BucketCells(
            cuts,
            list(accumulate(map(per_window.__getitem__, range(buckets)), initial=0)),
            ranked,
            # Each cell's group by its rank: the response looks a group's text up by position
            # rather than hashing each cell's nested tuple again.
            [0] * len(in_buckets) if len(ranked) < 2 else list(map(ranks.__getitem__, in_buckets)),
            list(map(cell_values.__getitem__, in_buckets)),
        )

        if additive:
            # Fold the stored measures, then derive: an average over a range is the range's
            # sum over its count, never an average of the buckets' averages.
            folded = []
            start = 0
            for group in ranked:
                stop = start + counts[group]
                rows = list(map(values.__getitem__, by_group[start:stop]))
                # Each measure's column by itemgetter, not zip(*rows): that made an iterator
                # per row (10,800 for an hourly report), each one tracked by the collector.
                measured = tuple(
                    _fold(m, tuple(map(itemgetter(n), rows))) for n, m in enumerate(plan.measured)
                )
                folded.append(GroupValues(group, measured))
                start = stop
            totals = [GroupValues(g.group, plan.derive(g.values)) for g in folded]
            total = plan.derive(
                [_fold(m, (g.values[i] for g in folded)) for i, m in enumerate(plan.measured)]
            )
        else:
            # The totals' rows, first in ``order``: each group's (TOTAL, in group order) and,
            # when grouped, the one over every group (OVERALL).
            first = order[:before_buckets]
            range_rows = [i for i in first if at[i] == TOTAL]
            overall = next((i for i in first if at[i] != TOTAL), None)
            totals = [GroupValues(groups[i], plan.derive(values[i])) for i in range_rows]
            whole = overall if query.group_by else (range_rows[0] if range_rows else None)
            total = plan.derive(
                values[whole] if whole is not None else (None,) * len(plan.measures)
            )
        return Result(query, aggregations, cells, tuple(totals), total)

    def _aggregate(self, spec: AggregateSpec) -> AggregateColumns:
        check_raw(spec, self.store.raw_horizon())
        if _by_columns(type(self.store)):
            return cast(ColumnarAggregates, self.store).aggregate_columns(spec)
        return AggregateColumns.from_rows(self.store.aggregate(spec))

    @staticmethod
    def _spec(
        query: Query,
        windows: tuple[Window, ...],
        measures: tuple[Measure, ...],
        group_by: tuple[str, ...],
        totals: bool = False,
    ) -> AggregateSpec:
        return AggregateSpec(
            accounts=query.accounts,
            metric=query.metric,
            windows=windows,
            measures=measures,
            group_by=group_by,
            filters=query.filters,
            tags=query.tags,
            billable=query.billable,
            key_id=query.key_id,
            totals=totals,
        )


@functools.cache
def _by_columns(kind: type) -> bool:
    """Whether a store class answers by columns too, looked up once per class: checking an
    instance against a runtime protocol costs tens of microseconds, as much as a small
    answer on SQLite."""
    return issubclass(kind, ColumnarAggregates)


def _zeros(values: Sequence[float | None]) -> tuple[float, ...]:
    if None not in values and isinstance(values, tuple):
        return values  # the usual row: no None, no copy
    return tuple([0.0 if v is None else v for v in values])


# A range's boundaries in its zone, as epoch milliseconds, and its buckets' windows.
Cuts = tuple[tuple[datetime, ...], tuple[int, ...], tuple[Window, ...]]


def _cuts(
    start: datetime, end: datetime, granularity: Granularity, tz: str, limit: int | None
) -> Cuts:
    zone = parse_zone(tz)
    if limit is not None and granularity is not Granularity.TOTAL:
        # Step only as far as the limit reaches: 500 hours of a 200-year range cost 500
        # steps, not the 1.75 million buckets of the whole range.
        t = start.astimezone(zone)
        for _ in range(limit):
            t = granularity.next_start(t)
            if t >= end:
                break
        end = min(end, t)
    cuts, edges = bucket_edges(start, end, granularity, zone)
    if limit is not None:
        cuts, edges = cuts[: limit + 1], edges[: limit + 1]
    # A bucket's end is the next one's start: each boundary is made once.
    windows = made(Window, range(max(len(edges) - 1, 0)), edges[:-1], edges[1:])
    return tuple(cuts), tuple(edges), tuple(windows)


# The cuts of the ranges asked lately, kept: a dashboard or a client polling a report asks
# the same range again, and its 2,160 hours' boundaries, milliseconds and windows took 1.1
# ms of a 90-day hourly report's 21 (round 14). Each is fixed by its key, immutable (tuples
# of immutable values) and shared; a year of hours is about 1.3 MB, so only a few are kept.
RANGES_KEPT = 16
_kept_cuts = functools.lru_cache(maxsize=RANGES_KEPT)(_cuts)
