"""Plain typed values shared by every layer: events, accounts, keys, meters, queries, results."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

import msgspec

from usagemeter.bulk import collector_paused, made
from usagemeter.timewindows import BillingCycle, Granularity


class Aggregation(StrEnum):
    """How a metric's events fold into one number per bucket."""

    SUM = "sum"
    COUNT = "count"
    MAX = "max"
    MIN = "min"
    LATEST = "latest"
    UNIQUE_COUNT = "unique_count"
    AVG = "avg"  # the engine's sum / count, never stored: exact over any range

    @property
    def is_additive(self) -> bool:
        """True when a range's value is the fold of its buckets' values (so totals need no
        second query). A gauge's latest value or a distinct count is not; nor is an average,
        but its sum and count are, so the engine folds those and divides at the end."""
        return self in (Aggregation.SUM, Aggregation.COUNT, Aggregation.MAX, Aggregation.MIN)


@dataclass(frozen=True, slots=True)
class Meter:
    """How one metric aggregates: e.g. ``Sessions`` is ``unique_count`` of ``session_id``."""

    metric: str
    aggregation: Aggregation = Aggregation.SUM
    dimension: str | None = None  # the counted dimension, for unique_count only
    allow_negative: bool | None = None  # None: the aggregation's default

    @property
    def negative_allowed(self) -> bool:
        """Whether events may carry negative values: a refund or a credit in a sum, a gauge
        below zero, yes by default; a count or a distinct count, no (its values are not
        amounts, and a negative one is a mistake)."""
        if self.allow_negative is not None:
            return self.allow_negative
        return self.aggregation not in (Aggregation.COUNT, Aggregation.UNIQUE_COUNT)

    def __post_init__(self) -> None:
        if (self.aggregation is Aggregation.UNIQUE_COUNT) != (self.dimension is not None):
            raise ValueError(
                f"meter {self.metric!r}: unique_count needs a dimension,"
                " and only unique_count has one"
            )


class Scope(StrEnum):
    OPERATOR = "operator"  # everything: every account, key management, ingest for anyone
    READ = "read"  # read its own account and its descendants
    INGEST = "ingest"  # send events for its own account
    MANAGE = "manage"  # create, list and revoke keys of its own account and its descendants


@dataclass(frozen=True, slots=True)
class Account:
    id: str
    name: str
    parent_id: str | None = None
    billing_cycle: BillingCycle | None = None
    created_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key as stored: never the secret, only what identifies and limits it."""

    id: str
    account_id: str | None  # None for an operator key
    name: str
    prefix: str
    scopes: frozenset[Scope]
    created_at: datetime
    revoked_at: datetime | None = None
    # A portal token's metrics (portal.py): it reads only these. None: any metric.
    metrics: frozenset[str] | None = None

    @property
    def is_operator(self) -> bool:
        return Scope.OPERATOR in self.scopes


@dataclass(frozen=True, slots=True)
class PortalToken:
    """A short-lived read-only credential for one account's customer (portal.py). Stored,
    like a key, only as the hash of its secret."""

    id: str
    account_id: str
    metrics: frozenset[str] | None  # None: every metric
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None = None


# A Struct, not a frozen dataclass: every event of a file or a request is built once, and
# a frozen dataclass's __init__ sets each field through object.__setattr__ (about 3 us an
# event, a third of reading a file's line); a Struct's is C (0.2 us). gc=False: it holds
# only strings, numbers, a mapping and a frozenset of strings, so it is never in a cycle.
class Event(msgspec.Struct, frozen=True, gc=False):
    """One validated usage record, ready to store."""

    id: str
    account_id: str
    metric: str
    ts_ms: int
    value: float = 1.0
    billable: bool = True
    key_id: str | None = None
    dimensions: Mapping[str, str] = {}
    tags: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What a batch did: events stored, ids seen before (in the store or earlier in the
    batch), and which of those repeats came with another payload (indexes into the batch, in
    order). A conflicting repeat is still a duplicate: the stored event stays as first sent."""

    accepted: int
    duplicates: int
    conflicts: tuple[int, ...] = ()


# Group-by names that are not event dimensions but columns every event has.
GROUP_SUBACCOUNT = "subaccount"  # the account the event belongs to (within the queried tree)
GROUP_KEY = "key"  # the key public id the event names


@dataclass(frozen=True, slots=True)
class Query:
    """One question to the engine. ``accounts`` is the resolved scope (an account and, when
    asked, its descendants); tenancy has been checked before a Query is built."""

    accounts: tuple[str, ...]
    metric: str
    start: datetime
    end: datetime
    granularity: Granularity = Granularity.DAY
    tz: str = "UTC"
    aggregations: tuple[Aggregation, ...] = ()  # empty: the metric's meter
    group_by: tuple[str, ...] = ()
    filters: tuple[tuple[str, str], ...] = ()  # dimension = value, all must hold
    tags: frozenset[str] = frozenset()  # all-of
    billable: bool | None = None  # None: billable or not
    key_id: str | None = None
    limit: int | None = None  # at most this many buckets, the earliest first
    # The dimension a unique_count counts; None: the metric's meter's. Lets two meters of one
    # metric count different things (OpenMeter's meters share an event type).
    unique_dimension: str | None = None


Group = tuple[tuple[str, str | None], ...]  # ((dimension, value), ...) in group_by order


@dataclass(frozen=True, slots=True)
class GroupValues:
    group: Group
    values: tuple[float, ...]  # one per aggregation, in Result.aggregations order

    def as_dict(self) -> dict[str, str | None]:
        return dict(self.group)


@dataclass(frozen=True, slots=True)
class ResultBucket:
    start: datetime  # in the query zone, clipped to the range
    end: datetime
    groups: tuple[GroupValues, ...]  # only groups with usage; empty when idle


@dataclass(frozen=True, slots=True)
class BucketCells:
    """An answer's buckets as columns, as the engine ordered the store's rows: no object per
    cell or bucket (an hourly report by status has about 10,800 cells and 2,160 buckets).
    The native API writes its response from these columns; ``buckets()`` makes the objects
    for the readers that walk them (the CLI's table, the contract endpoints)."""

    cuts: Sequence[datetime]  # the boundaries in the query zone: bucket i is cuts[i]..cuts[i+1]
    bounds: Sequence[int]  # bucket i's cells: group_of[bounds[i]:bounds[i + 1]], values alike
    groups: Sequence[Group]  # the answer's groups, in order
    group_of: Sequence[int]  # each cell's group, its position in groups: bucket by bucket,
    # groups in order within one
    values: Sequence[tuple[float, ...]]  # each cell's values, one per aggregation

    def __len__(self) -> int:
        return max(len(self.cuts) - 1, 0)

    def buckets(self) -> tuple[ResultBucket, ...]:
        # Made by C loops with the collector paused (bulk.py): thousands of objects, no cycle.
        with collector_paused():
            cells = made(GroupValues, map(self.groups.__getitem__, self.group_of), self.values)
            slices = map(slice, self.bounds, self.bounds[1:])
            groups = map(tuple, map(cells.__getitem__, slices))
            return tuple(made(ResultBucket, self.cuts[:-1], self.cuts[1:], groups))


NO_CELLS = BucketCells((), (0,), (), (), ())


@dataclass(frozen=True, slots=True)
class Result:
    query: Query
    aggregations: tuple[Aggregation, ...]
    cells: BucketCells  # the buckets, as columns
    totals: tuple[GroupValues, ...]  # per group over the whole range
    total: tuple[float, ...]  # over the whole range and every group
    # The buckets as objects once asked for (``buckets``): a frozen class keeps them in a list.
    _made: list[tuple[ResultBucket, ...]] = field(default_factory=list, compare=False, repr=False)

    @property
    def buckets(self) -> tuple[ResultBucket, ...]:
        """Each bucket with its groups' values, made on first use from ``cells``."""
        if not self._made:
            self._made.append(self.cells.buckets())
        return self._made[0]
