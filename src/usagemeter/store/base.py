"""The storage protocol: the one boundary below which SQL lives.

Everything above it (engine, ingest, auth, API, CLI) speaks in model values. An adapter
appends batches atomically and idempotently, answers aggregate questions over time windows,
and keeps accounts and keys.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from usagemeter.corrections import Amendment, VoidRecord, VoidSelector
from usagemeter.model import Account, ApiKey, AppendResult, Event, Group, PortalToken
from usagemeter.store.limitbase import LimitStore


class NotFound(LookupError):
    """The named account or key does not exist."""


class Conflict(ValueError):
    """The value would break a uniqueness rule (an account or key id already taken)."""


class UnstorableText(ValueError):
    """A text the store cannot hold (PostgreSQL's text holds no NUL character): an id or
    name sent with one can be neither stored nor found. The API answers it with a 400."""


class KeyRevoked(PermissionError):
    """The key a batch was sent with was revoked (or deleted) before the batch's commit:
    nothing of the batch was stored."""


class StoreUnavailable(RuntimeError):
    """The store cannot take writes for now (its disk is full, say); nothing of the batch was
    stored, and the same batch may be sent again later. Adapters raise this rather than
    their driver's error so that the API answers every store the same way."""


@dataclass(frozen=True, slots=True)
class Window:
    """One half-open interval of epoch milliseconds, numbered by the bucket it feeds."""

    index: int
    start_ms: int
    end_ms: int


@dataclass(frozen=True, slots=True)
class Measure:
    """One number to compute per window and group: an aggregation name from
    ``model.Aggregation`` and, for unique_count, the counted dimension."""

    aggregation: str
    dimension: str | None = None


# The window numbers of the rows a spec with ``totals`` adds (bucket windows count from 0).
TOTAL = -1  # each group folded over every window together
OVERALL = -2  # every group folded together (grouped specs only; its group is empty)


@dataclass(frozen=True, slots=True)
class AggregateSpec:
    """What the engine asks of a store: the events of ``metric`` in ``accounts`` that pass the
    filters, folded per window and group. Windows must not overlap.

    With ``totals``, the answer also holds the fold over all the windows together: per group
    as window TOTAL and, when grouped, over every group as window OVERALL. A distinct count or
    a latest value over a range is not a fold of its buckets, so the store computes these
    beside the buckets, in the same statement where it can."""

    accounts: tuple[str, ...]
    metric: str
    windows: tuple[Window, ...]
    measures: tuple[Measure, ...]
    group_by: tuple[str, ...] = ()  # dimensions, or model.GROUP_KEY / model.GROUP_SUBACCOUNT
    filters: tuple[tuple[str, str], ...] = ()
    tags: frozenset[str] = frozenset()
    billable: bool | None = None
    key_id: str | None = None
    totals: bool = False


@dataclass(frozen=True, slots=True)
class AggregateRow:
    window: int
    group: Group
    values: tuple[float | None, ...]  # one per measure; None where no event contributed


@dataclass(frozen=True, slots=True)
class AggregateColumns:
    """The rows of an aggregate answer as three parallel lists: row i is window
    ``windows[i]``, group ``groups[i]`` and measure values ``values[i]``. A report of
    thousands of cells costs more in Python objects than in the database (an hourly report
    by status has about 10,800): a store that reads its result by columns hands it on so,
    without an AggregateRow per cell."""

    windows: list[int]
    groups: list[Group]
    values: list[tuple[float | None, ...]]

    @classmethod
    def from_rows(cls, rows: Sequence[AggregateRow]) -> AggregateColumns:
        return cls([r.window for r in rows], [r.group for r in rows], [r.values for r in rows])

    def rows(self) -> list[AggregateRow]:
        return list(map(AggregateRow, self.windows, self.groups, self.values))


@runtime_checkable
class ColumnarAggregates(Protocol):
    """A store that answers an aggregate question by columns too (the engine then asks it
    that way); ``aggregate_columns(spec).rows()`` equals ``aggregate(spec)``."""

    def aggregate_columns(self, spec: AggregateSpec) -> AggregateColumns: ...


class Store(LimitStore, Protocol):
    """What every storage adapter provides."""

    # accounts and keys
    def create_account(self, account: Account) -> Account: ...
    def get_account(self, account_id: str) -> Account: ...
    def list_accounts(self) -> list[Account]: ...
    def descendants(self, account_id: str) -> list[str]:
        """The account's id followed by every account below it, at any depth."""
        ...

    def ancestors(self, account_id: str) -> list[str]:
        """The account's id followed by its parent, grandparent, ... up to the root."""
        ...

    def create_key(self, key: ApiKey, secret_hash: bytes) -> ApiKey: ...
    def get_key(self, key_id: str) -> ApiKey: ...
    def find_keys_by_lookup(self, lookup: bytes) -> list[tuple[ApiKey, bytes]]:
        """Keys whose secret digest starts with ``lookup``, each with its whole digest."""
        ...

    def list_keys(self, account_id: str | None) -> list[ApiKey]: ...
    def export_keys(self) -> list[tuple[ApiKey, bytes]]:
        """Every key, the operators' too, with its secret's digest, in creation order: what
        ``usagemeter migrate`` copies to another store."""
        ...

    def revoke_key(self, key_id: str) -> ApiKey: ...

    # portal tokens (portal.py)
    def create_portal_token(self, token: PortalToken, secret_hash: bytes) -> PortalToken:
        """Store a token by its secret's digest; NotFound when its account does not exist."""
        ...

    def find_portal_tokens_by_lookup(self, lookup: bytes) -> list[tuple[PortalToken, bytes]]:
        """Tokens whose secret digest starts with ``lookup``, each with its whole digest."""
        ...

    def revoke_portal_token(self, token_id: str) -> PortalToken:
        """Revoke a token (again is fine); NotFound when there is none by that id."""
        ...

    # events
    def append(self, events: Sequence[Event]) -> AppendResult:
        """Store a batch atomically: all of it (less ids seen before) or nothing. Returns only
        after the batch and its rollups are durable."""
        ...

    def aggregate(self, spec: AggregateSpec) -> list[AggregateRow]: ...
    def metrics_seen(
        self, accounts: Sequence[str], metric: str | None = None, *, dimensions: bool = True
    ) -> dict[str, list[str]]:
        """The metrics any of ``accounts`` has events for (only ``metric``, when given),
        each with the sorted dimension names its events carry (left empty when
        ``dimensions`` is false: a yes-or-no question need not read them). Read from rollups
        and interned names, never from raw events."""
        ...

    def count_events(self) -> int: ...
    def last_seq(self) -> int:
        """The arrival number of the latest stored event (0: none yet). Events are numbered
        as they are stored, so a reader of the event log can go on from where it stopped
        (PostgreSQL and ClickHouse: numbers of concurrent writers may become visible out of
        order; see alerts.py)."""
        ...

    def touched(
        self, after_seq: int, upto_seq: int, metrics: Sequence[str]
    ) -> list[tuple[str, str, int, int]]:
        """What the events numbered in (after_seq, upto_seq] of ``metrics`` touched: per
        account, metric and 15-minute stretch, (account, metric, earliest ts, latest ts)."""
        ...

    def iter_events(
        self,
        accounts: Sequence[str] | None = None,
        start_ms: int | None = None,
        end_ms: int | None = None,
    ) -> Iterator[Event]: ...

    # corrections, retention, deletion (corrections.py, store/voidsql.py)
    def void_events(
        self,
        selector: VoidSelector,
        reason: str,
        by: str | None,
        now_ms: int,
        amend: Amendment | None = None,
    ) -> VoidRecord:
        """Take the selected events out of every report at once (their ids stay taken) and
        record the void; with ``amend``, store the one voided event's replacement too.
        NotFound for an unknown account or id, Conflict for an id no longer stored,
        corrections.RawDropped for a range before the retention horizon."""
        ...

    def list_voids(self, account_id: str | None = None) -> list[VoidRecord]: ...
    def delete_account(self, account_id: str) -> dict[str, int]:
        """Remove the account, its subaccounts and all their data; rows deleted per table."""
        ...

    def retain(self, before_ms: int) -> int:
        """Drop raw events before ``before_ms``, keeping their rollups and ids; how many."""
        ...

    def raw_horizon(self) -> int | None:
        """Raw events before this instant (epoch ms) were dropped; None: none were."""
        ...

    def compact(self) -> None:
        """Give the space of dropped or deleted data back."""
        ...

    def close(self) -> None: ...
